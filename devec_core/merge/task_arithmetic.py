"""Task arithmetic: W = W0 + Σ λ_i ΔW_i.

Paper: Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089.

Exact on low-rank factors: Σ λ_i B_i A_i = [λ_1 B_1 | … | λ_k B_k] [A_1; …; A_k], a LoRA of rank
Σ r_i — no dense matrix is formed. A dense delta anywhere in the sum makes the result dense.
"""

from __future__ import annotations

import torch

from ..taskvec import Delta, Dense, LowRank

PAPER = "https://arxiv.org/abs/2212.04089"


def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i Δ_i over dense deltas stacked on dim 0.

    Args:
        deltas: (k, n, m) task vectors of one module.
        weights: (k,) coefficients.

    Returns:
        (n, m) the weighted sum.
    """
    _check_stack(deltas, weights)
    return torch.einsum("k,k...->...", weights.to(deltas.dtype), deltas)


def task_arithmetic_factors(deltas: list[Delta], weights: list[float]) -> Delta:
    """Σ_i w_i ΔW_i on one module, exact: LoRAs concatenate (rank Σ r_i), dense deltas add.

    Args:
        deltas: the module's deltas (LowRank and/or Dense, one shape).
        weights: one coefficient per delta.

    Returns:
        LowRank(scale 1) of rank Σ r_i when every input is LowRank, else Dense.
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"task_arithmetic needs one weight per delta; got {len(deltas)} deltas, {len(weights)} weights")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"task_arithmetic: deltas of one module must share a shape; got {sorted(shapes)}")
    lows = [(w, d) for w, d in zip(weights, deltas) if isinstance(d, LowRank)]
    dense = [(w, d) for w, d in zip(weights, deltas) if isinstance(d, Dense)]
    low = None
    if lows:
        dtype = torch.promote_types(torch.float32, lows[0][1].B.dtype)
        B = torch.cat([d.scaled_B().to(dtype) * w for w, d in lows], 1)  # (n, Σr)
        A = torch.cat([d.A.to(dtype) for _, d in lows], 0)  # (Σr, m)
        low = LowRank(B, A, 1.0)
    if not dense:
        return low
    W = sum(d.dense() * w for w, d in dense)
    return Dense(W if low is None else W + low.dense(W.dtype))


def _check_stack(deltas: torch.Tensor, weights: torch.Tensor) -> None:
    if deltas.ndim < 1 or weights.ndim != 1 or weights.shape[0] != deltas.shape[0]:
        raise ValueError(
            f"deltas must be stacked on dim 0 with one weight each; got deltas {tuple(deltas.shape)}, weights {tuple(weights.shape)}"
        )
