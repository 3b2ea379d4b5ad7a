"""PEFT's factor-wise merge of LoRAs: each method applied to the A's and to the B's separately.

What ``peft``'s ``LoraModel.add_weighted_adapter`` does for ``combination_type`` "linear", "ties",
"dare_linear", "dare_ties" and "magnitude_prune" (``_generalized_task_arithmetic_weighted_adapter``
in ``peft/tuners/lora/model.py``, 0.21): with w̃_i = w_i · scale_i, it merges
A = method([A_i], [sign(w̃_i)·√|w̃_i|]) and B = method([B_i], [√|w̃_i|]) and returns the LoRA B·A of
the common rank r. This is cheap but approximate: B·A is not the merge of the products B_i·A_i
(even "linear" gives Σ_ij √w̃_i √w̃_j B_i A_j, with cross terms). It is offered only to reproduce
PEFT's adapters; the methods of this package merge the products (PEFT's "*_svd" variants do that
too, then truncate by SVD). Needs every LoRA of the module at one rank.
"""

from __future__ import annotations

import math

import torch

from ..taskvec import LowRank
from .dare import dare_linear, dare_ties
from .magnitude_prune import magnitude_prune
from .task_arithmetic import task_arithmetic
from .ties import ties

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def peft_factorwise(
    loras: list[LowRank], weights: list[float], combination_type: str, density: float | None = None,
    majority_sign: str = "total", generator: torch.Generator | None = None,
) -> LowRank:
    """The LoRA PEFT's add_weighted_adapter builds for one module (see the module docstring).

    Args:
        loras: the module's LoRAs, one rank.
        weights: one coefficient per LoRA (PEFT's ``weights``).
        combination_type: one of FACTORWISE.
        density: for everything but "linear".
        majority_sign: "total" | "frequency".
        generator: DARE's random source; masks drawn for A_1..A_k, then B_1..B_k (PEFT's order).

    Returns:
        LowRank(B, A, 1.0).
    """
    if combination_type not in FACTORWISE:
        raise ValueError(f"Unknown combination_type {combination_type!r}; expected one of {FACTORWISE}")
    if len({lr.rank for lr in loras}) != 1:
        raise ValueError(f"factor-wise merging needs one rank; got {[lr.rank for lr in loras]}")
    wA, wB = [], []
    for w, lr in zip(weights, loras):
        ws = w * lr.scale
        wA.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        wB.append(math.sqrt(abs(ws)))
    out = []
    for factors, ww in (([lr.A for lr in loras], wA), ([lr.B for lr in loras], wB)):
        X, w = torch.stack(factors), torch.tensor(ww, dtype=factors[0].dtype)
        if combination_type == "linear":
            out.append(task_arithmetic(X, w))
        elif combination_type == "ties":
            out.append(ties(X, w, density, majority_sign))
        elif combination_type == "dare_linear":
            out.append(dare_linear(X, w, density, generator))
        elif combination_type == "dare_ties":
            out.append(dare_ties(X, w, density, generator, majority_sign=majority_sign))
        else:
            out.append(magnitude_prune(X, w, density))
    A, B = out
    return LowRank(B, A, 1.0)
