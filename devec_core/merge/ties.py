"""TIES-merging: trim, elect sign, disjoint merge.

Paper: Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
Models", arXiv 2306.01708 (§3, Algorithm 1).

1. Trim: keep the top ``density`` fraction of each Δ_i by magnitude (``magnitude_prune.trim``).
2. Elect: per entry, the sign γ of Σ_i Δ̂_i ("total", the paper's) or of Σ_i sign(Δ̂_i)
   ("frequency"); a zero sum elects +.
3. Disjoint merge: average, per entry, the values whose sign agrees with γ (zeros never count).

Two conventions differ on how per-task weights enter (the paper has one global λ):
  * PEFT (``add_weighted_adapter``, ``utils/merge_utils.py``): the sign is elected on the
    unweighted trimmed deltas; the weighted values are then summed and divided by the *count* of
    agreeing entries.   → ``elect_on="trimmed", normalize="count"`` (the default here)
  * mergekit (``generalized_task_arithmetic``): deltas are weighted first, the sign is elected on
    the weighted deltas, and the sum is divided by the *sum of the weights* of agreeing entries
    (``normalize: true``) or not at all.   → ``elect_on="weighted", normalize="weights"|"none"``
With equal positive weights all of these agree. Dense deltas per module are needed (trim and sign
are entry-wise), so a pool merge streams one module at a time.
"""

from __future__ import annotations

import torch

from .magnitude_prune import trim
from .task_arithmetic import _check_stack

PAPER = "https://arxiv.org/abs/2306.01708"
SIGN_METHODS = ("total", "frequency")
ELECT_ON = ("trimmed", "weighted")
NORMALIZE = ("count", "weights", "none")


def elect_sign(deltas: torch.Tensor, method: str = "total") -> torch.Tensor:
    """The elected sign per entry, ±1, of deltas stacked on dim 0 (a zero score elects +1).

    Args:
        deltas: (k, ...) trimmed task vectors.
        method: "total" (sign of the sum, the paper's) or "frequency" (sign of the sign count).

    Returns:
        (...) tensor of ±1 in deltas' dtype.
    """
    if method == "total":
        score = deltas.sum(0)
    elif method == "frequency":
        score = deltas.sign().sum(0)
    else:
        raise ValueError(f"Unknown majority sign method {method!r}; expected one of {SIGN_METHODS}")
    return torch.where(score >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_merge(values: torch.Tensor, agree: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i values_i over agreeing entries, divided by ``divisor`` (default: their count); 0/0 → 0.

    Args:
        values: (k, ...) weighted, trimmed deltas.
        agree: (k, ...) bool, entry agrees with the elected sign.
        divisor: (...) what to divide by; None = number of agreeing entries (the disjoint mean).

    Returns:
        (...) the merged entries.
    """
    total = torch.where(agree, values, torch.zeros_like(values)).sum(0)
    if divisor is None:
        divisor = agree.sum(0).to(values.dtype)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor


def ties_from_trimmed(
    trimmed: torch.Tensor, weights: torch.Tensor, majority_sign: str = "total", elect_on: str = "trimmed",
    normalize: str = "count",
) -> torch.Tensor:
    """Steps 2-3 of TIES on already sparsified deltas (shared by TIES and DARE-TIES)."""
    _check_stack(trimmed, weights)
    if elect_on not in ELECT_ON:
        raise ValueError(f"Unknown elect_on {elect_on!r}; expected one of {ELECT_ON}")
    if normalize not in NORMALIZE:
        raise ValueError(f"Unknown normalize {normalize!r}; expected one of {NORMALIZE}")
    w = weights.to(trimmed.dtype).reshape(-1, *([1] * (trimmed.ndim - 1)))  # (k, 1, 1)
    weighted = trimmed * w
    gamma = elect_sign(weighted if elect_on == "weighted" else trimmed, majority_sign)
    # an entry takes part when its sign is the elected one (zeros have sign 0: never)
    agree = (weighted if elect_on == "weighted" else trimmed).sign() == gamma
    if normalize == "count":
        return disjoint_merge(weighted, agree)
    if normalize == "weights":
        return disjoint_merge(weighted, agree, torch.where(agree, w.expand_as(weighted), torch.zeros_like(weighted)).sum(0))
    return disjoint_merge(weighted, agree, torch.ones_like(trimmed[0]))


def ties(
    deltas: torch.Tensor, weights: torch.Tensor, density: float, majority_sign: str = "total",
    elect_on: str = "trimmed", normalize: str = "count",
) -> torch.Tensor:
    """TIES-merge the task vectors of one module.

    Args:
        deltas: (k, n, m) task vectors.
        weights: (k,) coefficients (the paper's λ is a common weight).
        density: fraction of entries each vector keeps in the trim step.
        majority_sign: "total" | "frequency".
        elect_on: "trimmed" (PEFT) | "weighted" (mergekit).
        normalize: "count" (disjoint mean; PEFT, the paper) | "weights" (mergekit normalize) | "none".

    Returns:
        (n, m) the merged delta.
    """
    _check_stack(deltas, weights)
    trimmed = torch.stack([trim(d, density) for d in deltas])
    return ties_from_trimmed(trimmed, weights, majority_sign, elect_on, normalize)
