"""The work budget: refuse a pool whose cost would be unreasonable, before any tensor is read.

docs/METHOD.md "Work budget". Defaults are calibrated on this project's 2-core CPU, where the
estimate runs at ~2e10 per second: the FLUX pool (494 modules, 4 rank-16 LoRAs) is ~4e10, a 7B
LLM pool of 4 rank-64 LoRAs on all 224 projections ~3e11; the default allows ~2 minutes.
"""

from __future__ import annotations

from .blocks import group_modules
from .modes import mode_for
from .taskvec import LowRank, TaskVector

MAX_WORK = 2e12
MAX_MEMORY = 8 * 2**30


class WorkBudgetError(ValueError):
    """A pool whose estimated cost exceeds ``Config.max_work`` / ``max_memory`` (refused before any work)."""


def estimate_work(vectors: list[TaskVector], cfg, groups: dict | None = None) -> tuple[float, float, str]:
    """Estimated cost of decomposing a pool, from shapes and ranks only (no tensor is read).

    ``groups``: the pool's ``blocks.group_modules`` if already computed (ValueError from it where a
    module's shapes differ between vectors).

    Per module with members of widths r_i (a LoRA's rank; a dense delta's min(n, m), its SVD
    bound), P = Σ r_i, r = max r_i and o spectra (the mode's ``orders``: 1 joint, k(k−1)
    pairwise, #references isolate):
        work  = 2nP² + Σ_LoRA 2m r_i² + Σ_dense 6nm·min(n, m) + 30(k + o) r³   (flops)
        bytes = 8P² + 32 Σ r_i² + 32 o r²          (the Grams, bases, complex eigenvectors)
    The r³ term is the r×r eigen-solves (measured: two rank-2048 LoRAs on a 1×1 module, 39 s).
    Returns (work, bytes, the costliest module).
    """
    names = [v.name for v in vectors]
    mode = mode_for(cfg)
    work = memory = 0.0
    worst, worst_work = "", -1.0
    # modules with one signature (members, kinds, shapes, ranks) cost the same: one estimate per group
    for sig, mods in (group_modules(vectors) if groups is None else groups).items():
        members, (n, m) = tuple(i for i, *_ in sig), sig[0][2]
        widths = [r if kind == "LowRank" else min(n, m) for _, kind, _, r in sig]
        P, r, o = sum(widths), max(widths), len(mode.orders(names, members))
        w = 2.0 * n * P * P + 30.0 * (len(sig) + o) * r**3
        for (_, kind, _, _), ri in zip(sig, widths):
            w += 2.0 * m * ri * ri if kind == "LowRank" else 6.0 * n * m * min(n, m)
        work += w * len(mods)
        memory += (8.0 * P * P + 32.0 * sum(x * x for x in widths) + 32.0 * o * r * r) * len(mods)
        if w > worst_work:
            worst, worst_work = mods[0], w
    return work, memory, worst


def check_budget(vectors: list[TaskVector], cfg, groups: dict | None = None) -> None:
    """Refuse a pool whose estimated work or memory exceeds the config's budget (``WorkBudgetError``)."""
    work, memory, worst = estimate_work(vectors, cfg, groups)
    if work <= cfg.max_work and memory <= cfg.max_memory:
        return
    ranks = {v.name: v.modules[worst].rank for v in vectors if isinstance(v.modules.get(worst), LowRank)}
    shape = next(v.modules[worst].shape for v in vectors if worst in v.modules)
    what = (f"estimated work {work:.3g} flops exceeds max_work = {cfg.max_work:.3g}" if work > cfg.max_work
            else f"estimated memory {memory / 2**30:.3g} GiB exceeds max_memory = {cfg.max_memory / 2**30:.3g} GiB")
    raise WorkBudgetError(
        f"pool refused before any work: {what} (costliest module {worst!r}, shape {shape}, ranks {ranks}); "
        "raise the budget (Config.max_work / max_memory) if this pool is meant"
    )
