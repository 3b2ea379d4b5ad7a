"""The decomposition modes, one file each, behind one interface (``base.Mode``).

    joint      joint.py       one shared subspace common to all vectors      §3, §4.2
    pairwise   pairwise.py    the shared vector of every pair                 §4.1
    isolate    isolate.py     a target's unique part against references       §4.3
               sequential.py  isolate, one reference after another (``isolate_order="sequential"``)

``MODES`` (the names) and ``ISOLATE_ORDERS`` are the one source for every caller (``pool.MODES``
is an alias); ``mode_for(config)`` gives the mode object a ``pool.Decomposition`` asks.
"""

from __future__ import annotations

from .base import Mode
from .isolate import Isolate
from .joint import Joint
from .pairwise import Pairwise, split_pair
from .sequential import SequentialIsolate

REGISTRY: dict[str, type[Mode]] = {"joint": Joint, "pairwise": Pairwise, "isolate": Isolate}
VARIANTS: dict[tuple[str, str], type[Mode]] = {("isolate", "sequential"): SequentialIsolate}  # (mode, isolate_order)
MODES = tuple(REGISTRY)
ISOLATE_ORDERS = ("union", "sequential")


def mode_for(config) -> Mode:
    """The mode object for a ``pool.Config`` (ValueError naming an unknown mode or order)."""
    if config.mode not in REGISTRY:
        raise ValueError(f"Unknown mode {config.mode!r}; expected one of {MODES}")
    if config.isolate_order not in ISOLATE_ORDERS:
        raise ValueError(f"Unknown isolate_order {config.isolate_order!r}; expected one of {ISOLATE_ORDERS}")
    return VARIANTS.get((config.mode, config.isolate_order), REGISTRY[config.mode])(config)


__all__ = ["ISOLATE_ORDERS", "MODES", "Mode", "REGISTRY", "VARIANTS", "Isolate", "Joint", "Pairwise", "SequentialIsolate",
           "mode_for", "split_pair"]
