"""What the Studio needs from the merge package: the left side's method (vanilla TA, TIES, DARE),
per-pair shared coefficients on the DeVec side, and any mix written out as one LoRA.

Merged vectors are cached by content (pool key, method, parameters, coefficients): the same
settings give the same object, so the WeightEditor reuses its resolved parts. The cache holds
results only — one user's sliders are part of the key, never shared state.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

from ..mix import Mix, VectorPool, vanilla
from .engine import merge, pair_names
from .task_arithmetic import task_arithmetic_factors
from .writeout import write_lora

LEFT_METHODS = {  # UI label -> registry name
    "Vanilla task arithmetic": "task_arithmetic",
    "TIES": "ties",
    "DARE-TIES": "dare_ties",
    "DARE (linear)": "dare_linear",
}
DEFAULT_LEFT = "task_arithmetic"

_LOCK = threading.Lock()
_MERGED: "OrderedDict[tuple, object]" = OrderedDict()
_MAX_MERGED = 4


def left_label(method: str) -> str:
    return next((k for k, v in LEFT_METHODS.items() if v == method), method)


def left_mix(dec, pool_key: str, weights: dict[str, float], method: str = DEFAULT_LEFT, density: float | None = None):
    """The left side's mix: vanilla TA over the deltas, or TIES / DARE merged once per setting.

    Args:
        dec: the Decomposition (its ``vectors`` are the pool's task vectors).
        pool_key: the pool's content key (part of the cache key).
        weights: vector name -> λ.
        method: a registry name from ``LEFT_METHODS``.
        density: TIES/DARE density (None: the method's default).

    Returns:
        A ``devec_core.mix.Mix``.
    """
    if method not in LEFT_METHODS.values():
        raise ValueError(f"Unknown left-side method {method!r}; expected one of {list(LEFT_METHODS.values())}")
    active = {n: float(weights.get(n, 0.0)) for n in dec.names}
    if method == "task_arithmetic" or not any(active.values()):
        return vanilla(dec, {n: w for n, w in active.items() if w}, label="vanilla")
    params = {} if density is None else {"density": float(density)}
    key = (pool_key, method, tuple(sorted(params.items())), tuple(active.items()))
    with _LOCK:
        src = _MERGED.get(key)
        if src is not None:
            _MERGED.move_to_end(key)
    if src is None:
        # vectors with λ = 0 stay out (they would only dilute TIES' disjoint mean with zeros)
        vecs = [v for v in dec.vectors if active[v.name]]
        merged = merge(vecs, method, [active[v.name] for v in vecs], **params)
        src = VectorPool([merged])
        with _LOCK:
            _MERGED[key] = src
            while len(_MERGED) > _MAX_MERGED:
                _MERGED.popitem(last=False)
    return Mix(src, (("delta", "merged", 1.0),), method)


def pair_terms(dec, shared: float, pairs: dict[str, float] | None) -> list[tuple]:
    """Pairwise mode: one term per pair's shared vector, λ from ``pairs`` (else ``shared``)."""
    pairs = pairs or {}
    unknown = sorted(set(pairs) - set(pair_names(dec.names)))
    if unknown:
        raise ValueError(f"unknown pair(s) {unknown}; the pairs are {pair_names(dec.names)}")
    return [("pair_shared", p, float(pairs.get(p, shared))) for p in pair_names(dec.names) if float(pairs.get(p, shared))]


def mix_modules(mix) -> tuple[dict, dict]:
    """A mix as one task vector: module -> delta (exact: LoRA factors concatenated, dense added),
    and the extras (biases) its delta/unique terms carry."""
    per: dict[str, list] = {}
    extras: dict = {}
    for comp, lam in mix.active().items():
        for mod, d in mix.source.component(comp.kind, comp.name).items():
            per.setdefault(mod, []).append((lam, d))
        if comp.kind in ("delta", "unique"):
            for v in getattr(mix.source, "vectors", []):
                if v.name == comp.name:
                    for k, t in v.extras.items():
                        extras[k] = extras.get(k, 0) + lam * t.float()
    return {m: task_arithmetic_factors([d for _, d in ts], [x for x, _ in ts]) for m, ts in per.items()}, extras


def write_mix(mix, out: Path, family: str, settings: dict, base_config: dict | None = None) -> Path:
    """Write ``mix`` as one exact LoRA (PEFT folder or diffusers file) carrying ``settings``."""
    modules, extras = mix_modules(mix)
    if not modules:
        raise ValueError(f"mix {mix.label!r} is empty: every coefficient is 0")
    path, _ = write_lora(modules, out, family=family, metadata={"mix": settings}, base_config=base_config, extras=extras or None)
    if family == "peft":
        (Path(path) / "devec_mix.json").write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))
    return path
