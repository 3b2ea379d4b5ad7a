"""DeVec: split task vectors into a shared part and unique parts, on the low-rank factors.

Paper: Damirchi, Abbasnejad, Zhang, Shi, "Decomposing Task Vectors for Refined Model Editing",
arXiv 2512.22511, eqs. 6-14; the project's decisions are in docs/METHOD.md.

For one module with task vectors ΔW_1..ΔW_k (each (n, m), PyTorch orientation):
  1. Q_i (n, r_i): orthonormal basis of the significant column space of ΔW_i.
  2. P = P_1 P_2 ⋯ P_k with P_i = Q_i Q_iᵀ.  Never formed: its nonzero eigenvalues are those of
     the small r_1×r_1 matrix M = C_12 C_23 ⋯ C_k1, C_ij = Q_iᵀ Q_j, and an eigenvector y of M
     maps to z = Q_1 y (because P Q_1 y = Q_1 M y).
  3. Keep eigenvalues with Re λ > τ (a complex pair as a whole, contributing span(Re y, Im y));
     orthonormalise the kept vectors: Z = Q_1 Y, Y (r_1, s) orthonormal.
  4. S_i = Z Zᵀ ΔW_i, U_i = ΔW_i − S_i.  For ΔW_i = B_i A_i both stay LoRAs of the same rank:
     S_i = (Z Zᵀ B_i) A_i, U_i = (B_i − Z Zᵀ B_i) A_i.
  5. S = Σ ‖S_i‖ S_i / Σ ‖S_i‖  (eq. 14), = Z [Σ w_i Zᵀ B_i A_i / Σ w_i], rank ≤ s.

Bases without QR. A basis is kept as Q_i = F_i T_i: F_i is the vector's own tall factor (a LoRA's
scaled B, or the left singular vectors of a dense delta) and T_i a small r×r matrix. Then every
product the method needs is small: C_ij = T_iᵀ (F_iᵀ F_j) T_j, Q_1ᵀ B_i = T_1ᵀ (F_1ᵀ B_i), and
Z Zᵀ B_i = F_1 (T_1 Y Yᵀ T_1ᵀ F_1ᵀ B_i). The only passes over the n-sized factors are one Gram
GEMM per module (and one GEMM per part materialised) — on a 2-core CPU, Householder QR of the
~20M factor rows of a FLUX pool took ~4 s, the Grams a fraction of that.

Every function here imports only torch and works on stacked inputs: leading ``...`` dimensions
are a batch of same-shaped modules (``devec_core.pool`` stacks them). Zero columns in a basis
stand for directions that were cut (below numerical rank, or not selected at this τ); they
change no projection, so a batch can hold modules of different ranks and shared dimensions.
"""

from __future__ import annotations

import torch

PAPER_TAU = 0.85
"""The paper's eigenvalue threshold τ (used for every experiment in arXiv 2512.22511); the one
place the default is written. Import it; do not write 0.85 elsewhere."""

# ---------------------------------------------------------------------------------------------
# 1. Column-space bases
# ---------------------------------------------------------------------------------------------


def rank_rtol(n: int, m: int, gram_dtype: torch.dtype) -> float:
    """Relative singular-value cut for a LoRA's numerical rank, computed from Gram matrices.

    docs/METHOD.md "Rank of a LoRA": singular values above max(n, m)·eps·s_max. A Gram matrix holds
    σ², so it cannot resolve σ below ~√eps·s_max of the precision it was computed in; the cut is
    the larger of the two (float32: 3.5e-3·s_max, i.e. directions with < 1.2e-5 of the energy;
    float64: 1.5e-7).
    """
    eps = torch.finfo(gram_dtype).eps
    return max(max(n, m) * eps, 10 * eps**0.5)


def lowrank_basis(G_B: torch.Tensor, G_A: torch.Tensor, rtol: float):
    """Basis of the column space of B @ A from the Grams G_B = BᵀB and G_A = A Aᵀ, (..., r, r).

    0. Balance: B A = (B D)(D⁻¹ A) with D = diag(1/‖column i of B‖), done on the Grams
       (G_B → D G_B D, unit diagonal; G_A → D⁻¹ G_A D⁻¹). A column of B that is 1000× weaker but
       carries a 1000× stronger row of A is then judged by its product (step 1's second cut), not
       cut by B's own scale; and the first eigen-solve sees an equilibrated matrix (its rounding
       no longer grows with the spread of B's column norms).
    1. With G_B = V Λ Vᵀ, B = Q̃ Λ^½ Vᵀ (Q̃ orthonormal), so B A = Q̃ (Λ^½ Vᵀ A) and its left
       singular vectors are Q̃ U where U Σ² Uᵀ = Λ^½ Vᵀ G_A V Λ^½. Hence Q = B D V Λ^-½ U = B T.
    Returns:
        T: (..., r, r) with Q = B T orthonormal on kept columns, zero columns where cut
           (σ ≤ rtol·σ_max, the numerical rank).
        sv: (..., r) singular values of B @ A, descending.
    """
    nb = G_B.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (..., r) column norms of B
    d = torch.where(nb > 0, 1 / torch.where(nb > 0, nb, torch.ones_like(nb)), torch.zeros_like(nb))
    G_B = d.unsqueeze(-1) * G_B * d.unsqueeze(-2)
    G_A = nb.unsqueeze(-1) * G_A * nb.unsqueeze(-2)
    lam, V = torch.linalg.eigh(G_B)
    okB = lam > rtol**2 * lam[..., -1:].clamp_min(0)  # directions of B D resolvable at all
    half = torch.where(okB, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    K = half.unsqueeze(-1) * (V.mT @ G_A @ V) * half.unsqueeze(-2)
    s2, U = torch.linalg.eigh(K)
    s2, U = s2.flip(-1), U.flip(-1)  # descending
    sv = s2.clamp_min(0).sqrt()
    keep = sv > rtol * sv[..., :1]
    inv = torch.where(okB, 1 / torch.where(okB, half, torch.ones_like(half)), torch.zeros_like(half))
    T = d.unsqueeze(-1) * (V @ (inv.unsqueeze(-1) * U)) * keep.unsqueeze(-2)
    return T, sv


FAST_BASIS_COND = 1e6
"""Largest condition-number bound for which ``lowrank_bases`` takes the Cholesky route: its basis is
orthonormal to ~cond·eps of float64 (1e-10 at most), as tight as the eigen route's."""


def lowrank_bases(G_B: torch.Tensor, G_A: torch.Tensor, rtol: float) -> torch.Tensor:
    """``lowrank_basis(G_B, G_A, rtol)[0]`` up to a rotation of the kept columns (same span, same
    rank), without an eigen-solve wherever that is certified to change nothing.

    A LoRA whose rank cut keeps all r directions has col(B A) = col(B), and any orthonormal basis of
    it serves: with the balanced Gram G = D G_B D = L Lᵀ (Cholesky), Q = B D L⁻ᵀ (QᵀQ = L⁻¹ G L⁻ᵀ = I).
    The cut is certified to keep everything from bounds, not estimates: for a positive definite
    G = L Lᵀ, λ_min ≥ 1/‖L⁻¹‖_F² and λ_max ≤ tr G. ``lowrank_basis`` keeps every direction of B D when
    λ_min(G) > rtol²·λ_max(G), and every singular value of B A when λ_min(K) > rtol²·λ_max(K) with
    K = Lᵀ (D⁻¹ G_A D⁻¹) L (similar to its K: L = V Λ^½ O for an orthogonal O). Both are checked with
    a factor 2 to spare, and the condition bound tr·‖L⁻¹‖_F² must not exceed ``FAST_BASIS_COND``.
    Modules that fail (a Cholesky breaks down, a zero column, a near cut, ill conditioning) take
    ``lowrank_basis``. On the FLUX pool the bases took 0.04 s of CPU instead of 0.15 s (cProfile,
    1 thread, busy machine; docs/METHOD.md "Speed: bases without eigen-solves").
    Args: as ``lowrank_basis`` (G_B, G_A (..., r, r) in float64). Returns T (..., r, r).
    """
    batch, r = G_B.shape[:-2], G_B.shape[-1]
    if r == 0 or G_B.numel() == 0:
        return lowrank_basis(G_B, G_A, rtol)[0]
    GB, GA = G_B.reshape(-1, r, r), G_A.reshape(-1, r, r)
    nb = GB.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    ok = (nb > 0).all(-1)
    d = 1 / torch.where(nb > 0, nb, torch.ones_like(nb))
    G = d.unsqueeze(-1) * GB * d.unsqueeze(-2)
    eye = torch.eye(r, dtype=G.dtype, device=G.device).expand_as(G)
    # a failed factorization (info > 0) leaves garbage: swap in I there and mark the module
    L, info = torch.linalg.cholesky_ex(G)
    ok &= info == 0
    L = _eye_where_not(ok, L, eye)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    cut = 2 * rtol**2
    cond_G = G.diagonal(dim1=-2, dim2=-1).sum(-1) * torch.linalg.vector_norm(Linv, dim=(-1, -2)) ** 2
    ok &= (cond_G * cut < 1) & (cond_G <= FAST_BASIS_COND)
    K = L.mT @ (nb.unsqueeze(-1) * GA * nb.unsqueeze(-2)) @ L
    M, info = torch.linalg.cholesky_ex(K)
    ok &= info == 0
    M = _eye_where_not(ok, M, eye)
    Minv = torch.linalg.solve_triangular(M, eye, upper=False)
    cond_K = K.diagonal(dim1=-2, dim2=-1).sum(-1) * torch.linalg.vector_norm(Minv, dim=(-1, -2)) ** 2
    ok &= (cond_K * cut < 1) & (cond_K <= FAST_BASIS_COND) & torch.isfinite(cond_G) & torch.isfinite(cond_K)
    T = d.unsqueeze(-1) * Linv.mT
    slow = (~ok).nonzero().flatten()
    if slow.numel():
        T = T.clone()
        T[slow] = lowrank_basis(GB[slow], GA[slow], rtol)[0]
    return T.reshape(*batch, r, r)


def _eye_where_not(ok: torch.Tensor, X: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """X with the identity in place of the matrices where ``ok`` is False (a failed factorization
    leaves garbage); X itself when all are ok (the usual case: no copy)."""
    return X if bool(ok.all()) else torch.where(ok[:, None, None], X, eye)


def dense_basis(W: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """Basis of the significant column space of a dense delta W (..., n, m) by truncated SVD.

    The cut keeps the smallest number of leading directions that holds ``energy`` (a fraction
    of ‖W‖_F²), capped at ``rank``; both None keeps the numerical rank (max(n, m)·eps·s_max).
    Returns Q (..., n, p) with zero columns where cut, and the singular values.
    """
    n, m = W.shape[-2], W.shape[-1]
    U, sv, _ = torch.linalg.svd(W, full_matrices=False)
    keep = sv > max(n, m) * torch.finfo(sv.dtype).eps * sv[..., :1]
    if energy is not None:
        # keep direction j while the energy *before* it is still short of the target
        before = torch.cumsum(sv**2, -1) - sv**2
        keep &= before < energy * (sv**2).sum(-1, keepdim=True)
    if rank is not None:
        keep &= torch.arange(sv.shape[-1], device=sv.device) < rank
    return U * keep.unsqueeze(-2), sv


# ---------------------------------------------------------------------------------------------
# 2.-3. Spectrum of the chained projection, and the shared basis for a τ
# ---------------------------------------------------------------------------------------------


def chain_spectrum(chain: list[torch.Tensor], symmetric: bool = False):
    """Eigenvalues and eigenvectors of P_1 ⋯ P_k restricted to span(Q_1), from r×r matrices.

    Args:
        chain: [C_12, C_23, ..., C_(k-1)k, C_k1], C_ij = Q_iᵀ Q_j, (..., r_i, r_j).
        symmetric: use Q_1ᵀ P_2⋯P_k⋯P_2 Q_1 = N Nᵀ with N = C_12 ⋯ C_(k-1)k instead: real
            eigenvalues (σ² of N) and orthonormal eigenvectors. For k = 2 both give cos² of the
            principal angles between the two column spaces.
    Returns:
        eigvals: (..., r_1) complex, sorted by real part, descending.
        eigvecs: (..., r_1, r_1) complex; column j belongs to eigvals[..., j].
    """
    N = chain[0]
    for C in chain[1:-1]:
        N = N @ C  # C_12 ⋯ C_(k-1)k, (..., r_1, r_k)
    if symmetric:
        U, sv, _ = torch.linalg.svd(N, full_matrices=True)
        ev = torch.zeros(U.shape[:-1], dtype=sv.dtype, device=sv.device)
        ev[..., : sv.shape[-1]] = sv**2  # r_1 > r_k: the rest are 0
        cdtype = torch.complex128 if ev.dtype == torch.float64 else torch.complex64
        return ev.to(cdtype), U.to(cdtype)
    eigvals, eigvecs = torch.linalg.eig(N @ chain[-1])  # M = C_12 ⋯ C_k1
    order = torch.argsort(eigvals.real, dim=-1, descending=True)
    eigvals = torch.gather(eigvals, -1, order)
    eigvecs = torch.gather(eigvecs, -1, order.unsqueeze(-2).expand_as(eigvecs))
    return eigvals, eigvecs


def selection_tolerance(precision: torch.dtype) -> float:
    """Slack on τ so that τ = 1 keeps directions that are shared exactly up to rounding.

    ``precision`` is the dtype the spectrum's inputs (the Gram matrices of the factors) were
    computed in, not the float64 of the r×r steps: a float32 Gram carries float32 rounding into
    every eigenvalue (measured: exactly shared directions at 1 − λ up to ~7·eps of float32 for
    n = 64..18432, conditioned factors; docs/METHOD.md "τ slack").
    """
    return 64 * torch.finfo(precision).eps


def check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and 0.0 < float(tau) <= 1.0):
        raise ValueError(f"tau must be in (0, 1]; got {tau!r}")
    return float(tau)


def select_shared(eigvals: torch.Tensor, eigvecs: torch.Tensor, tau: float, precision: torch.dtype | None = None):
    """Orthonormal shared basis, in Q_1 coordinates, of the eigenvectors with Re λ > τ.

    A complex-conjugate pair has one real part, so it is kept or dropped as a whole; its real
    invariant subspace is span(Re y, Im y). Real eigenvectors have Im y = 0.
    Args:
        precision: dtype the Grams behind the spectrum were computed in (sets the τ slack);
            default: the eigenvectors' own precision.
    Returns:
        Y: (..., r_1, r_1) orthonormal columns spanning the kept subspace, zero columns after.
        dim: (...) integer shared dimension s.
    """
    tau = check_tau(tau)
    real_dtype = eigvecs.real.dtype
    keep = eigvals.real > tau - selection_tolerance(precision or real_dtype)  # (..., r_1)
    span = torch.cat([eigvecs.real, eigvecs.imag], dim=-1) * torch.cat([keep, keep], -1).unsqueeze(-2)
    U, sv, _ = torch.linalg.svd(span, full_matrices=False)  # (..., r_1, r_1)
    # eigenvectors have unit norm, so an independent kept one gives sv ≈ 1 (≥ ~0.7 for a pair)
    basis = sv[..., : U.shape[-1]] > torch.finfo(real_dtype).eps ** 0.5
    return U * basis.unsqueeze(-2), basis.sum(-1)


def copy_cos2(tau: float) -> float:
    """cos² within which a shared direction must lie of the union (isolate/pairwise rule).

    Two directions count as copies of one when cos² of their angle exceeds τ, i.e. the angle is
    below θ_τ = arccos √τ. One direction (their bisector) serves both iff each lies within θ_τ/2
    of it: cos²(θ_τ/2) = (1 + √τ)/2 (τ = 0.85: 0.961, 11.3°).
    """
    return (1 + check_tau(tau) ** 0.5) / 2


def union_basis(Ys: list[torch.Tensor], tau: float, precision: torch.dtype | None = None) -> torch.Tensor:
    """Orthonormal basis of the union of several shared bases (same coordinates), (..., r, r).

    The rule (docs/METHOD.md "Isolate"): take the eigenvectors u_1, u_2, … of Σ_j Y_j Y_jᵀ by
    descending eigenvalue (the left singular vectors of [Y_1 … Y_J]; order-free) and keep the
    fewest leading ones, R_s = span(u_1 … u_s), such that every direction of every Y_j lies
    within half the copy angle of R_s: cos² ≥ copy_cos2(τ), i.e. the largest squared residual
    ‖(I − R_sR_sᵀ) Y_j‖₂² ≤ 1 − copy_cos2(τ). Consequences: two shared directions at cos² ≤ τ
    can never share one kept direction (both are removed, however close); tilted copies of one
    direction (cos² > τ) count once; s never exceeds the dimension of the plain span, where
    every residual is 0.
    Args:
        Ys: shared bases (..., r, r_j) with orthonormal or zero columns.
        precision: dtype of the Grams behind them (slack on the residual, as for τ).
    """
    if len(Ys) == 1:
        return Ys[0]
    r = Ys[0].shape[-2]
    U, sv, _ = torch.linalg.svd(torch.cat(Ys, -1), full_matrices=False)  # U (..., r, r), descending
    slack = selection_tolerance(precision or U.dtype)
    allowed = 1 - copy_cos2(tau) + slack  # largest squared residual sin² allowed
    span_dim = (sv > torch.finfo(U.dtype).eps ** 0.5).sum(-1)  # the plain union's dimension
    W = torch.stack([U.mT @ Y for Y in Ys], -3)  # (..., J, r, r_j): Y_j in the u coordinates
    lower = torch.stack([(Y.abs().sum(-2) > 0).sum(-1) for Y in Ys], -1).amax(-1)  # dim R ≥ dim Y_j
    s = span_dim.clone()
    found = torch.zeros_like(span_dim, dtype=torch.bool)
    for cand in range(int(lower.min()) if lower.numel() else 0, r + 1):
        if bool(found.all()):
            break
        tail = W[..., cand:, :]  # residual coordinates of each Y_j outside R_cand
        resid = torch.linalg.matrix_norm(tail, ord=2) ** 2 if cand < r else torch.zeros(W.shape[:-2], dtype=W.dtype)
        ok = (resid.amax(-1) <= allowed) & (cand >= lower) & ~found
        s = torch.where(ok, torch.minimum(torch.full_like(s, cand), span_dim), s)
        found |= ok
    keep = torch.arange(r, device=U.device) < s.unsqueeze(-1)  # (..., r)
    return U * keep.unsqueeze(-2)


# ---------------------------------------------------------------------------------------------
# 4.-5. Norms and the merge weights of eq. 14
# ---------------------------------------------------------------------------------------------


def sq_norm_from_grams(G_B: torch.Tensor, G_A: torch.Tensor) -> torch.Tensor:
    """‖B A‖_F² = Σ (BᵀB) ⊙ (A Aᵀ), from r×r Grams."""
    return (G_B * G_A).sum((-1, -2))


def merge_weights(shared_sq_norms: torch.Tensor) -> torch.Tensor:
    """Eq. 14 weights w_i / Σ w_i with w_i = ‖S_i‖_F, along the last dim; all-zero gives 0."""
    w = shared_sq_norms.clamp_min(0).sqrt()
    total = w.sum(-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, w / safe, torch.zeros_like(w))


# ---------------------------------------------------------------------------------------------
# Appendix 6: principal angles (k = 2), a cross-check of the projection method
# ---------------------------------------------------------------------------------------------


def principal_vectors(Q1: torch.Tensor, Q2: torch.Tensor, tau: float, precision: torch.dtype | None = None):
    """Principal vectors of two subspaces whose cos² exceeds τ (subspace-intersection route).

    SVD Q_1ᵀ Q_2 = U Σ Vᵀ: cos θ_j = σ_j, principal vectors p_j = Q_1 u_j, q_j = Q_2 v_j.
    Returns (p, q, bisector, cos2): the kept p (n, s) and q, the normalised bisectors
    (p + q)/‖p + q‖ (the paper's symmetric choice), and all cos² values.
    """
    tau = check_tau(tau)
    U, sv, Vh = torch.linalg.svd(Q1.mT @ Q2, full_matrices=False)
    cos2 = sv**2
    keep = cos2 > tau - selection_tolerance(precision or cos2.dtype)
    p, q = (Q1 @ U)[..., keep], (Q2 @ Vh.mT)[..., keep]
    bis = p + q
    bis = bis / bis.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(bis.dtype).tiny)
    return p, q, bis, cos2


def subspace_angles_deg(Z1: torch.Tensor, Z2: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees between the column spans of two orthonormal bases."""
    sv = torch.linalg.svdvals(Z1.mT @ Z2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(sv))
