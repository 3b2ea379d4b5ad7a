"""Merging a pool of task vectors, module by module.

``merge(vectors, "ties", weights, density=0.2)`` returns the merged task vector (module → delta).
``iter_merge`` yields one module at a time, so entry-wise methods (TIES, DARE, magnitude pruning)
hold one module's dense deltas at a time; a writer (``writeout``) can compress or fuse each module
as it comes. Task arithmetic and the DeVec merge over it stay on the LoRA factors (exact, rank
Σ r_i; DeVec adds each pair's shared vector, rank s_ab).

A module that only some vectors have is merged among those that have it (PEFT does the same).
Parameters that are not matrices (biases) are merged linearly with the vectors' weights (their
unique weights for DeVec methods), whatever the method.

DARE's masks: each module draws from its own generator seeded with ``module_seed(seed, module)``,
masks for the vectors in pool order, so a merge does not depend on the order modules are visited
in (and a single module can be reproduced on its own).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Sequence

import torch

from ..pool import decompose
from ..taskvec import Delta, Dense, TaskVector
from . import dare, magnitude_prune, ties
from .registry import MergeMethod, MethodName, get_method, resolve_params
from .task_arithmetic import task_arithmetic_factors

Weights = "float | Sequence[float] | dict[str, float]"


def module_seed(seed: int, module: str) -> int:
    """The seed of ``module``'s DARE masks: 63 bits of sha256("<seed>:<module>")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "big") >> 1


def _weights_for(names: list[str], weights) -> dict[str, float]:
    if isinstance(weights, (int, float)):
        out = {n: float(weights) for n in names}
    elif isinstance(weights, dict):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"weights name unknown vector(s) {unknown}; the pool has {names}")
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights: no coefficient for {missing}")
        out = {n: float(weights[n]) for n in names}
    else:
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"weights: {len(weights)} coefficients for {len(names)} vectors {names}")
        out = {n: float(w) for n, w in zip(names, weights)}
    for n, w in out.items():
        if w != w or w in (float("inf"), float("-inf")):
            raise ValueError(f"weight of {n!r} is {w}")
    return out


def merge_dense_module(
    method: MergeMethod, deltas: list[Delta], weights: list[float], params: dict, module: str,
    dtype: torch.dtype = torch.float32,
) -> Dense:
    """One module by an entry-wise method: stack the dense deltas (k, n, m), merge, return Dense."""
    base = method.base or method.name
    X = torch.stack([d.dense(dtype) for d in deltas])  # (k, n, m)
    w = torch.tensor(weights, dtype=dtype)
    if base == MethodName.ties:
        W = ties.ties(X, w, params["density"], params["majority_sign"], params["elect_on"], params["normalize"])
    elif base == MethodName.magnitude_prune:
        W = magnitude_prune.magnitude_prune(X, w, params["density"])
    elif base in (MethodName.dare_linear, MethodName.dare_ties):
        g = torch.Generator(device=X.device).manual_seed(module_seed(params["seed"], module))
        if base == MethodName.dare_linear:
            W = dare.dare_linear(X, w, params["density"], g, params["rescale"])
        else:
            W = dare.dare_ties(X, w, params["density"], g, params["rescale"], params["majority_sign"], params["elect_on"], params["normalize"])
    else:
        raise ValueError(f"Unknown entry-wise method {base!r}")
    return Dense(W)


def _modules_in_order(parts: list[dict[str, Delta]]) -> list[str]:
    seen: dict[str, None] = {}
    for p in parts:
        for m in p:
            seen.setdefault(m, None)
    return list(seen)


def pair_names(names: list[str]) -> list[str]:
    """The pairwise shared vectors' names, "a+b" with a before b in pool order."""
    return [f"{a}+{b}" for i, a in enumerate(names) for b in names[i + 1 :]]


def _pair_weights(names: list[str], w: dict[str, float], pair_weights) -> dict[str, float]:
    default = {f"{a}+{b}": (w[a] + w[b]) / 2 for i, a in enumerate(names) for b in names[i + 1 :]}
    pairs = list(default)
    if pair_weights is None:
        return default
    if isinstance(pair_weights, (int, float)):
        return {p: float(pair_weights) for p in pairs}
    unknown = sorted(set(pair_weights) - set(pairs))
    if unknown:
        raise ValueError(f"pair weights name unknown pair(s) {unknown}; the pairs are {pairs}")
    return {p: float(pair_weights.get(p, default[p])) for p in pairs}


def iter_merge(
    vectors: Sequence[TaskVector], method: str | MethodName, weights=1.0, *, convention: str = "peft",
    dtype: torch.dtype = torch.float32, decomposition=None, pair_weights=None, **params,
) -> Iterator[tuple[str, Delta]]:
    """Yield (module, merged delta) one module at a time (see ``merge`` for the arguments)."""
    m = get_method(method)
    p = resolve_params(m, params, convention)
    vectors = list(vectors)
    names = [v.name for v in vectors]
    if not vectors:
        raise ValueError("empty pool: nothing to merge")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate vector names in the pool: {names}")
    w = _weights_for(names, weights)
    if m.is_devec:
        dec = decomposition if decomposition is not None else _pairwise(vectors, p["tau"], dtype)
        if dec.config.mode != "pairwise" or list(dec.names) != names:
            raise ValueError(f"DeVec merges need a pairwise decomposition of {names}; got mode {dec.config.mode!r} of {list(dec.names)}")
        parts = [dec.component("unique", n) for n in names] if p["parts"] == "unique" else [v.modules for v in vectors]
        pw = _pair_weights(names, w, pair_weights)
        shared = {pn: dec.component("pair_shared", pn) for pn in pw if pw[pn] != 0.0}
    else:
        if decomposition is not None or pair_weights is not None:
            raise ValueError(f"decomposition / pair_weights apply to DeVec methods only, not {m.name.value!r}")
        parts = [v.modules for v in vectors]
        shared, pw = {}, {}
    order = _modules_in_order(parts + list(shared.values()))
    for mod in order:
        have = [(w[n], part[mod]) for n, part in zip(names, parts) if mod in part]
        extra = [(pw[pn], s[mod]) for pn, s in shared.items() if mod in s]
        if not m.dense:  # task arithmetic (+ DeVec's shared vectors): exact on the factors
            terms = have + extra
            yield mod, task_arithmetic_factors([d for _, d in terms], [x for x, _ in terms])
            continue
        if have:
            out = merge_dense_module(m, [d for _, d in have], [x for x, _ in have], p, mod, dtype)
        else:
            out = Dense(torch.zeros(extra[0][1].shape, dtype=dtype))
        for lam, s in extra:  # DeVec: shared vectors added once, outside the entry-wise method
            out.W.add_(s.dense(dtype), alpha=lam)
        yield mod, out


def _pairwise(vectors: list[TaskVector], tau: float, dtype: torch.dtype):
    return decompose(vectors, tau=tau, mode="pairwise", dtype="float64" if dtype == torch.float64 else "float32")


def merge(
    vectors: Iterable[TaskVector], method: str | MethodName, weights=1.0, *, name: str = "merged", convention: str = "peft",
    dtype: torch.dtype = torch.float32, decomposition=None, pair_weights=None, **params,
) -> TaskVector:
    """Merge a pool of task vectors with a registered method.

    Args:
        vectors: the pool (order matters for DeVec, see docs/METHOD.md "Order").
        method: a name in ``registry.METHODS`` (or an alias: ta, vanilla, linear, devec_ta).
        weights: one coefficient for all, a list in pool order, or name → coefficient
            (DeVec methods: the unique parts' coefficients).
        name: the merged vector's name.
        convention: "peft" (default) or "mergekit": how weights enter TIES/DARE (``registry.CONVENTIONS``).
        dtype: arithmetic dtype (float32 or float64).
        decomposition: DeVec methods: a pairwise ``Decomposition`` of the same pool (else one is
            computed at ``tau``).
        pair_weights: DeVec methods: one coefficient for every pair's shared vector, or "a+b" →
            coefficient; default: the mean of the pair's two weights.
        params: the method's parameters (density, seed, majority_sign, elect_on, normalize,
            rescale; DeVec: tau, parts = "unique" | "delta"); see ``registry``.

    Returns:
        TaskVector(name, module → LowRank (task arithmetic, devec) or Dense, extras merged
        linearly, meta["merge"] = the settings).
    """
    vectors = list(vectors)
    m = get_method(method)
    p = resolve_params(m, params, convention)
    modules = dict(iter_merge(vectors, m.name, weights, convention=convention, dtype=dtype, decomposition=decomposition,
                              pair_weights=pair_weights, **params))
    w = _weights_for([v.name for v in vectors], weights)
    extras = merged_extras(vectors, w, dtype)
    meta = {"merge": settings(m, p, w, [v.name for v in vectors], convention,
                              _pair_weights([v.name for v in vectors], w, pair_weights) if m.is_devec else None)}
    return TaskVector(name, modules, extras, meta)


def merged_extras(vectors: Sequence[TaskVector], weights: dict[str, float], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Parameters that are not matrices (biases), merged linearly: Σ_i w_i · extra_i."""
    extras: dict[str, torch.Tensor] = {}
    for v in vectors:
        for key, t in v.extras.items():
            extras[key] = extras.get(key, 0) + weights[v.name] * t.to(dtype)
    return extras


def settings(method: MergeMethod, params: dict, weights: dict, names: list[str], convention: str, pair_weights: dict | None) -> dict:
    """The merge's settings as plain data (what exported files carry in their metadata)."""
    out = {"method": method.name.value, "paper": method.paper, "params": dict(params), "weights": dict(weights),
           "names": list(names), "convention": convention}
    if pair_weights is not None:
        out["pair_weights"] = dict(pair_weights)
    return out
