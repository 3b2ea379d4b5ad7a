"""Magnitude pruning: keep the largest-magnitude fraction ``density`` of each task vector, then sum.

The "trim" step of TIES (Yadav et al., arXiv 2306.01708, §3) used alone, as PEFT's
``add_weighted_adapter(combination_type="magnitude_prune")`` does. Needs dense deltas (the top-k
of a product B·A is not a product), so the merge streams one module at a time.
"""

from __future__ import annotations

import torch

from .task_arithmetic import _check_stack

PAPER = "https://arxiv.org/abs/2306.01708"


def check_density(density: float) -> float:
    density = float(density)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1]; got {density}")
    return density


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the k = ⌊density · numel⌋ entries of largest |value| (PEFT's count; density 1: unchanged).

    Args:
        delta: one task vector of one module, any shape.
        density: fraction kept, in [0, 1].

    Returns:
        The trimmed tensor (same shape and dtype). Ties at the cut: the lowest indices.
    """
    density = check_density(density)
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    if k == 0:
        return torch.zeros_like(delta)
    # the k-th largest |value| by selection (O(n); topk sorts), then exactly k kept:
    # everything above it, and entries equal to it in index order until k
    mag = flat.abs()
    thr = torch.kthvalue(mag, flat.numel() - k + 1).values
    keep = mag > thr
    need = k - int(keep.sum())
    if need > 0:
        keep[(mag == thr).nonzero().flatten()[:need]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def magnitude_prune(deltas: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """Σ_i w_i · trim(Δ_i, density).

    Args:
        deltas: (k, n, m) task vectors of one module.
        weights: (k,) coefficients.
        density: fraction of entries kept per task vector.

    Returns:
        (n, m) the merged delta.
    """
    _check_stack(deltas, weights)
    trimmed = torch.stack([trim(d, density) for d in deltas])
    return torch.einsum("k,k...->...", weights.to(deltas.dtype), trimmed)
