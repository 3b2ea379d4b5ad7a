"""DARE: drop and rescale, then merge linearly or with TIES.

Paper: Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", arXiv 2311.03099 (§3, eq. 1-2).

Each entry of Δ_i is kept with probability ``density`` (= 1 − p, p the drop rate), and the kept
entries are rescaled so the expectation is unchanged: by 1/density (the paper's and PEFT's), or
so that the L1 norm is unchanged ("l1", mergekit's ``rescale: true``). The mask is drawn with
``torch.bernoulli(full_like(Δ, density), generator=g)``: with ``g`` seeded like torch's global
generator, the masks equal PEFT's and mergekit's (both use the global generator). Entry-wise, so
it needs dense deltas and a pool merge streams one module at a time.
"""

from __future__ import annotations

import torch

from .magnitude_prune import check_density
from .task_arithmetic import _check_stack
from .ties import ties_from_trimmed

PAPER = "https://arxiv.org/abs/2311.03099"
RESCALE = ("inverse_density", "l1", "none")


def drop_and_rescale(
    delta: torch.Tensor, density: float, generator: torch.Generator | None = None, rescale: str = "inverse_density"
) -> torch.Tensor:
    """Keep each entry with probability ``density``; rescale the survivors.

    Args:
        delta: one task vector of one module.
        density: keep probability in [0, 1]; 1 returns ``delta`` unchanged (no random draw).
        generator: the random source (None: torch's global generator).
        rescale: "inverse_density" (÷ density), "l1" (match ‖Δ‖₁; mergekit) or "none".

    Returns:
        The sparsified tensor (same shape and dtype).
    """
    density = check_density(density)
    if rescale not in RESCALE:
        raise ValueError(f"Unknown rescale {rescale!r}; expected one of {RESCALE}")
    if density >= 1.0:
        return delta
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    mask = torch.bernoulli(torch.full_like(work, density), generator=generator)
    kept = work * mask
    if rescale == "inverse_density":
        kept = kept / density if density > 0 else kept
    elif rescale == "l1":
        before, after = work.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:  # mergekit's guard against tiny norms
            kept = kept * (before / after)
    return kept.to(delta.dtype)


def _dropped(deltas: torch.Tensor, density: float, generator, rescale: str) -> torch.Tensor:
    return torch.stack([drop_and_rescale(d, density, generator, rescale) for d in deltas])


def dare_linear(
    deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator | None = None,
    rescale: str = "inverse_density",
) -> torch.Tensor:
    """Σ_i w_i · DARE(Δ_i): masks drawn for Δ_1, Δ_2, … in order from ``generator``.

    Args:
        deltas: (k, n, m). weights: (k,). density: keep probability.
        generator: random source. rescale: see ``drop_and_rescale``.

    Returns:
        (n, m) the merged delta.
    """
    _check_stack(deltas, weights)
    dropped = _dropped(deltas, density, generator, rescale)
    return torch.einsum("k,k...->...", weights.to(dropped.dtype), dropped)


def dare_ties(
    deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator | None = None,
    rescale: str = "inverse_density", majority_sign: str = "total", elect_on: str = "trimmed", normalize: str = "count",
) -> torch.Tensor:
    """DARE's random drop in place of TIES' trim, then TIES' sign election and disjoint merge.

    Args:
        deltas, weights, density, generator, rescale: as ``dare_linear``.
        majority_sign, elect_on, normalize: as ``ties.ties`` (PEFT's defaults; mergekit's dare_ties
            is elect_on="weighted", normalize="none", rescale="l1").

    Returns:
        (n, m) the merged delta.
    """
    _check_stack(deltas, weights)
    dropped = _dropped(deltas, density, generator, rescale)
    return ties_from_trimmed(dropped, weights, majority_sign, elect_on, normalize)
