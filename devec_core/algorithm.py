"""DeVec: split task vectors into a shared part and unique parts, on the low-rank factors.

Paper: Damirchi, Abbasnejad, Zhang, Shi, "Decomposing Task Vectors for Refined Model Editing",
arXiv 2512.22511, eqs. 6-14; the project's decisions are in shared/METHOD.md.

For one module with task vectors ΔW_1..ΔW_k (each (n, m), PyTorch orientation):
  1. Q_i (n, r_i): orthonormal basis of the significant column space of ΔW_i.
  2. P = P_1 P_2 ... P_k with P_i = Q_i Q_iᵀ.  Never formed: its nonzero eigenvalues are those of
     the small r_1×r_1 matrix M = C_12 C_23 ... C_k1, C_ij = Q_iᵀ Q_j, and an eigenvector y of M
     maps to z = Q_1 y (P Q_1 y = Q_1 M y).
  3. Keep eigenvalues with Re λ > τ (a complex pair as a whole, contributing span(Re y, Im y));
     orthonormalise the kept vectors: Z = Q_1 Y, Y (r_1, s) orthonormal.
  4. S_i = Z Zᵀ ΔW_i, U_i = ΔW_i − S_i.  For ΔW_i = B_i A_i both stay LoRAs of the same rank:
     S_i = (Z Zᵀ B_i) A_i, U_i = (B_i − Z Zᵀ B_i) A_i.
  5. S = Σ ‖S_i‖ S_i / Σ ‖S_i‖  (eq. 14), = Z [Σ w_i Zᵀ B_i A_i / Σ w_i], rank ≤ s.

Every function here imports only torch and works on stacked inputs: leading ``...`` dimensions
are a batch of same-shaped modules (``devec_core.pool`` stacks them). Zero columns in a basis
stand for directions that were cut (below numerical rank, or not selected at this τ); they
change no projection, so a batch can hold modules of different ranks and shared dimensions.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# 1. Column-space bases
# ---------------------------------------------------------------------------------------------


def lora_basis(B: torch.Tensor, A: torch.Tensor, rank: int | None = None):
    """Orthonormal basis of the column space of B @ A, cut at its numerical rank.

    Args:
        B: (..., n, r) up factor (scale already folded in), A: (..., r, m) down factor.
        rank: optional cap on the rank kept (the leading singular directions).
    Returns:
        Q: (..., n, p) with p = min(n, m, r) columns, orthonormal where kept, zero where cut.
        sv: (..., p) singular values of B @ A, descending.
    The numerical rank counts singular values above max(n, m)·eps·s_max (METHOD.md), so a
    forced rank above it cannot keep rounding-noise directions.
    """
    n, m = B.shape[-2], A.shape[-1]
    Qb, Rb = torch.linalg.qr(B)  # (..., n, p_b), (..., p_b, r)
    Qa, Ra = torch.linalg.qr(A.transpose(-1, -2))  # (..., m, p_a), (..., p_a, r)
    core = Rb @ Ra.transpose(-1, -2)  # B A = Qb · core · Qaᵀ, core (..., p_b, p_a)
    U, sv, _ = torch.linalg.svd(core, full_matrices=False)
    keep = sv > max(n, m) * torch.finfo(sv.dtype).eps * sv[..., :1]
    if rank is not None:
        keep &= torch.arange(sv.shape[-1], device=sv.device) < rank
    Q = (Qb @ U) * keep.unsqueeze(-2)
    return Q, sv


def dense_basis(W: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """Basis of the significant column space of a dense delta W (..., n, m) by truncated SVD.

    The cut keeps the smallest number of leading directions that holds ``energy`` (a fraction
    of ‖W‖_F²), capped at ``rank``; both None keeps the numerical rank. Returns Q (..., n, p)
    with zero columns where cut, and the singular values.
    """
    n, m = W.shape[-2], W.shape[-1]
    U, sv, _ = torch.linalg.svd(W, full_matrices=False)
    keep = sv > max(n, m) * torch.finfo(sv.dtype).eps * sv[..., :1]
    idx = torch.arange(sv.shape[-1], device=sv.device)
    if energy is not None:
        # keep direction j while the energy *before* it is still short of the target
        before = torch.cumsum(sv**2, -1) - sv**2
        keep &= before < energy * (sv**2).sum(-1, keepdim=True)
    if rank is not None:
        keep &= idx < rank
    return U * keep.unsqueeze(-2), sv


# ---------------------------------------------------------------------------------------------
# 2.-3. Spectrum of the chained projection, and the shared basis for a τ
# ---------------------------------------------------------------------------------------------


def chain_spectrum(Qs: list[torch.Tensor], symmetric: bool = False):
    """Eigenvalues and eigenvectors of P_1 ⋯ P_k restricted to span(Q_1), via r_1×r_1 matrices.

    Args:
        Qs: k bases, each (..., n, r_i); Q_1 is the side the shared basis is expressed in.
        symmetric: use Q_1ᵀ P_2⋯P_k⋯P_2 Q_1 (= TᵀT, T = C_k,k-1 ⋯ C_21) instead, whose
            eigenvalues are real and eigenvectors orthonormal. For k = 2 both are cos² of the
            principal angles between the two column spaces.
    Returns:
        eigvals: (..., r_1) complex, sorted by real part, descending.
        eigvecs: (..., r_1, r_1) complex; column j belongs to eigvals[..., j].
    """
    if symmetric:
        T = Qs[1].transpose(-1, -2) @ Qs[0]  # C_21, (..., r_2, r_1)
        for Qa, Qb in zip(Qs[1:-1], Qs[2:]):
            T = (Qb.transpose(-1, -2) @ Qa) @ T  # C_(j+1)j ⋯ C_21
        _, sv, Vh = torch.linalg.svd(T, full_matrices=True)
        r1 = Qs[0].shape[-1]
        ev = torch.zeros(sv.shape[:-1] + (r1,), dtype=sv.dtype, device=sv.device)
        ev[..., : sv.shape[-1]] = sv**2  # r_1 > r_k: the rest are 0
        eigvals, eigvecs = ev.to(torch.complex128 if ev.dtype == torch.float64 else torch.complex64), Vh.mT
        return eigvals, eigvecs.to(eigvals.dtype)
    M = Qs[0].transpose(-1, -2) @ Qs[1]  # C_12
    for Qa, Qb in zip(Qs[1:], Qs[2:] + Qs[:1]):
        M = M @ (Qa.transpose(-1, -2) @ Qb)  # ... C_23 ⋯ C_k1
    eigvals, eigvecs = torch.linalg.eig(M)
    order = torch.argsort(eigvals.real, dim=-1, descending=True)
    eigvals = torch.gather(eigvals, -1, order)
    eigvecs = torch.gather(eigvecs, -1, order.unsqueeze(-2).expand_as(eigvecs))
    return eigvals, eigvecs


def selection_tolerance(dtype: torch.dtype) -> float:
    """Slack on τ so that τ = 1 keeps directions that are shared exactly up to rounding."""
    return 64 * torch.finfo(dtype).eps


def check_tau(tau: float) -> float:
    if not (isinstance(tau, (int, float)) and 0.0 < float(tau) <= 1.0):
        raise ValueError(f"tau must be in (0, 1]; got {tau!r}")
    return float(tau)


def select_shared(eigvals: torch.Tensor, eigvecs: torch.Tensor, tau: float):
    """Orthonormal shared basis, in Q_1 coordinates, of the eigenvectors with Re λ > τ.

    A complex-conjugate pair has one real part, so it is kept or dropped as a whole; its real
    invariant subspace is span(Re y, Im y). Real eigenvectors have Im y = 0.
    Returns:
        Y: (..., r_1, r_1) orthonormal columns spanning the kept subspace, zero columns after.
        dim: (...) integer shared dimension s.
    """
    tau = check_tau(tau)
    real_dtype = eigvecs.real.dtype
    keep = eigvals.real > tau - selection_tolerance(real_dtype)  # (..., r_1)
    span = torch.cat([eigvecs.real, eigvecs.imag], dim=-1) * torch.cat([keep, keep], -1).unsqueeze(-2)
    U, sv, _ = torch.linalg.svd(span, full_matrices=False)  # (..., r_1, r_1)
    # eigenvectors have unit norm, so an independent kept one gives sv ≈ 1 (≥ ~0.7 for a pair)
    basis = sv[..., : U.shape[-1]] > torch.finfo(real_dtype).eps ** 0.5
    return U * basis.unsqueeze(-2), basis.sum(-1)


# ---------------------------------------------------------------------------------------------
# 4.-5. Shared and unique parts, and the pool's merged shared vector
# ---------------------------------------------------------------------------------------------


def project_factor(Q1: torch.Tensor, Y: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Z Zᵀ X with Z = Q_1 Y, computed as Q_1 (Y (Yᵀ (Q_1ᵀ X))): never an n×n matrix.

    X is a LoRA's B (..., n, r) or a dense delta W (..., n, m).
    """
    return Q1 @ (Y @ (Y.transpose(-1, -2) @ (Q1.transpose(-1, -2) @ X)))


def split(Q1: torch.Tensor, Y: torch.Tensor, X: torch.Tensor):
    """Shared and unique parts of one vector's left factor (or dense delta): (Z Zᵀ X, X − Z Zᵀ X).

    For a LoRA (B, A) both parts keep A: S_i = shared_B @ A, U_i = unique_B @ A.
    """
    shared = project_factor(Q1, Y, X)
    return shared, X - shared


def merge_weights(shared_sq_norms: torch.Tensor) -> torch.Tensor:
    """Eq. 14 weights w_i / Σ w_i with w_i = ‖S_i‖_F, along the last dim; all-zero gives 0."""
    w = shared_sq_norms.clamp_min(0).sqrt()
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(w))


def sq_norm_lowrank(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """‖B A‖_F² from r×r Gram products: Σ (BᵀB) ⊙ (A Aᵀ)."""
    return ((B.transpose(-1, -2) @ B) * (A @ A.transpose(-1, -2))).sum((-1, -2))


# ---------------------------------------------------------------------------------------------
# Appendix 6: principal angles (k = 2), a cross-check of the projection method
# ---------------------------------------------------------------------------------------------


def principal_vectors(Q1: torch.Tensor, Q2: torch.Tensor, tau: float):
    """Principal vectors of two subspaces whose cos² exceeds τ (subspace-intersection route).

    SVD Q_1ᵀ Q_2 = U Σ Vᵀ: cos θ_j = σ_j, principal vectors p_j = Q_1 u_j, q_j = Q_2 v_j.
    Returns (p, q, bisector, cos2): the kept p (..., n, s) and q, the normalised bisectors
    (p + q)/‖p + q‖ (the paper's symmetric choice), and all cos² values.
    """
    tau = check_tau(tau)
    U, sv, Vh = torch.linalg.svd(Q1.transpose(-1, -2) @ Q2, full_matrices=False)
    cos2 = sv**2
    keep = cos2 > tau - selection_tolerance(cos2.dtype)
    p = (Q1 @ U)[..., keep]
    q = (Q2 @ Vh.transpose(-1, -2))[..., keep]
    bis = p + q
    bis = bis / bis.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(bis.dtype).tiny)
    return p, q, bis, cos2


def subspace_angles_deg(Z1: torch.Tensor, Z2: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees between the column spans of two orthonormal bases."""
    sv = torch.linalg.svdvals(Z1.transpose(-1, -2) @ Z2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(sv))
