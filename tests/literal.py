"""The paper's eqs. 6-14 done literally, with n×n projection matrices (test-only reference).

Slow on purpose: dense ΔW, full SVD per vector, P = P_1⋯P_k formed as an n×n matrix, a dense
eigen-decomposition of P. Used to check the fast path in devec_core.decompose / pool.
"""

from __future__ import annotations

import math

import torch


def basis(W: torch.Tensor, rank: int | None = None, energy: float | None = None) -> torch.Tensor:
    """Q_i: left singular vectors of ΔW_i above numerical rank (and the optional cut)."""
    U, sv, _ = torch.linalg.svd(W, full_matrices=False)
    tol = max(W.shape) * torch.finfo(W.dtype).eps * sv[0] if sv.numel() else 0
    keep = int((sv > tol).sum())
    if energy is not None:
        e = torch.cumsum(sv**2, 0) - sv**2
        keep = min(keep, int((e < energy * (sv**2).sum()).sum()))
    if rank is not None:
        keep = min(keep, rank)
    return U[:, :keep]


def shared_basis(Ws: list[torch.Tensor], tau: float, tol: float = 64 * 2.2e-16, **cut) -> tuple[torch.Tensor, torch.Tensor]:
    """Z (n, s) for tau, and all n eigenvalues of P = P_1 ⋯ P_k (eqs. 6-13)."""
    n = Ws[0].shape[0]
    P = torch.eye(n, dtype=Ws[0].dtype)
    for W in Ws:
        Q = basis(W, **cut)
        P = P @ (Q @ Q.T)  # P_i = Q_i Q_iᵀ, n×n
    vals, vecs = torch.linalg.eig(P)
    keep = vals.real > tau - tol
    span = torch.cat([vecs.real[:, keep], vecs.imag[:, keep]], 1)
    if span.shape[1] == 0:
        return torch.zeros(n, 0, dtype=Ws[0].dtype), vals
    U, sv, _ = torch.linalg.svd(span, full_matrices=False)
    return U[:, sv > torch.finfo(Ws[0].dtype).eps ** 0.5], vals


def parts(Ws: list[torch.Tensor], Z: torch.Tensor):
    """S_i = Z Zᵀ ΔW_i, U_i = ΔW_i − S_i, and S = Σ‖S_i‖ S_i / Σ‖S_i‖ (eq. 14)."""
    ZZ = Z @ Z.T
    S = [ZZ @ W for W in Ws]
    U = [W - s for W, s in zip(Ws, S)]
    w = torch.stack([s.norm() for s in S])
    merged = sum(wi * s for wi, s in zip(w, S)) / w.sum() if w.sum() > 0 else torch.zeros_like(Ws[0])
    return S, U, merged


def copies_cos2(tau: float) -> float:
    """Two directions are copies of one when cos² of their angle exceeds τ (angle < θ_τ =
    arccos √τ); one direction serves both iff each is within θ_τ/2 of it: cos²(θ_τ/2)."""
    return math.cos(math.acos(math.sqrt(tau)) / 2) ** 2


def union(Zs: list[torch.Tensor], tau: float, tol: float = 64 * 2.2e-16) -> torch.Tensor:
    """The isolate/pairwise union of shared subspaces Z_j (n, s_j), from its definition (docs/METHOD.md):
    the fewest leading eigenvectors R of Σ_j Z_j Z_jᵀ (an n×n matrix here) such that every principal
    angle between each Z_j and R is within half the copy angle (cos² ≥ copies_cos2(τ))."""
    n = Zs[0].shape[0]
    Zs = [Z for Z in Zs if Z.shape[1]]
    if not Zs:
        return torch.zeros(n, 0, dtype=torch.float64)
    G = sum(Z @ Z.T for Z in Zs)  # n×n
    vals, vecs = torch.linalg.eigh(G)
    vecs = vecs.flip(-1)  # descending eigenvalues
    need = copies_cos2(tau) - tol
    for s in range(max(Z.shape[1] for Z in Zs), n + 1):
        R = vecs[:, :s]
        # cos of the principal angles between span(Z) and span(R): singular values of Zᵀ R
        if all(float(torch.linalg.svdvals(Z.T @ R).min()) ** 2 >= need for Z in Zs):
            return R
    raise AssertionError("unreachable: the plain span covers every Z_j")


def isolate(target: torch.Tensor, refs: list[torch.Tensor], tau: float, **cut) -> torch.Tensor:
    """Remove from the target the union of its pair shared subspaces (target, ref_j), once."""
    Zs = [shared_basis([target, R], tau, **cut)[0] for R in refs]
    Z = union(Zs, tau)
    return target - Z @ (Z.T @ target)


def sequential(target: torch.Tensor, refs: list[torch.Tensor], tau: float, **cut) -> torch.Tensor:
    """The other reading of "iteratively": remove what the remainder shares with ref 1, then ref 2, …"""
    R = target
    for ref in refs:
        Z, _ = shared_basis([R, ref], tau, **cut)
        R = R - Z @ (Z.T @ R)
    return R
