"""The weight editor's cache of resolved parts: each (source, component) as float32 factors on
the compute device, checked once (shape against the model, finite), and per weight the stacked
[B_1 | … | B_k], [A_1; …; A_k] of the components fused into it.

A switch that only changes coefficients re-uses the stack: its cost does not grow with the
number of components loaded. Parts of the ``max_sources`` most recently used sources are kept.
The cache holds no coefficients and writes nothing: one user's sliders never live here.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..taskvec import Delta, Dense, LowRank
from .terms import EXTRA_KINDS, Component


@dataclass
class Part:
    """One resolved component on one module, as float32 tensors on the compute device."""

    key: tuple  # (source serial, kind, name)
    B: torch.Tensor | None  # (n, r), scale folded in
    A: torch.Tensor | None  # (r, m)
    W: torch.Tensor | None  # (n, m) dense


class PartCache:
    """Resolved parts and stacked factors, keyed by source and component.

    Args:
        weight_of: module path → the model's 2-D weight (raises ValueError for a bad path).
        compute_device: where parts live (default: each weight's own device).
        max_sources: sources whose parts stay cached (least recently used dropped first).
    """

    def __init__(self, weight_of: Callable[[str], torch.Tensor], compute_device: torch.device | None = None, max_sources: int = 4):
        self.weight_of = weight_of
        self.compute_device = compute_device
        self.max_sources = max_sources
        self._serials: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[Any, int]] = {}  # sources that are not weak-referenceable
        self._counter = itertools.count(1)
        self._recent: dict[int, None] = {}  # source serials, least recently used first
        self._parts: dict[tuple, tuple[dict[str, Part], dict[str, torch.Tensor]]] = {}  # key -> (module parts, extras)
        self._stack: dict[str, tuple] = {}  # weight path -> (component keys, Bc, Ac, column → term)

    def _serial(self, source: Any) -> int:
        """A number unique to ``source`` for this cache's lifetime (never reused, unlike id())."""
        try:
            if source not in self._serials:
                self._serials[source] = next(self._counter)
            return self._serials[source]
        except TypeError:  # not weak-referenceable: hold it, so its id stays unique
            if id(source) not in self._strong:
                self._strong[id(source)] = (source, next(self._counter))
            return self._strong[id(source)][1]

    def _touch(self, serial: int) -> None:
        self._recent.pop(serial, None)
        self._recent[serial] = None
        while len(self._recent) > self.max_sources:  # forget parts of the least recent source
            old = next(iter(self._recent))
            del self._recent[old]
            for k in [k for k in self._parts if k[0] == old]:
                del self._parts[k]
            self._stack.clear()

    def resolve(self, source: Any, comp: Component) -> tuple[tuple, dict[str, Part], dict[str, torch.Tensor]]:
        """(key, module → Part, extra path → float32 tensor) of ``comp`` in ``source``.

        Raises:
            ValueError: unknown component, module or shape; NaN/Inf in the component.
        """
        serial = self._serial(source)
        self._touch(serial)
        key = (serial, comp.kind, comp.name or "")
        if key not in self._parts:
            parts = {mod: self._part(key, mod, d) for mod, d in source.component(comp.kind, comp.name).items()}
            extras = {}
            if comp.kind in EXTRA_KINDS:
                for v in getattr(source, "vectors", []):
                    if v.name == comp.name:
                        extras = {p: t.detach().float() for p, t in v.extras.items()}
            _check_finite(comp, parts, extras)
            self._parts[key] = (parts, extras)
        parts, extras = self._parts[key]
        return key, parts, extras

    def _part(self, key: tuple, mod: str, d: Delta) -> Part:
        weight = self.weight_of(mod)
        if tuple(d.shape) != tuple(weight.shape):
            raise ValueError(
                f"component {key[1]}:{key[2]} module {mod!r}: delta shape {tuple(d.shape)} does not match "
                f"the model's weight {tuple(weight.shape)}"
            )
        dev = self.compute_device or weight.device
        if isinstance(d, LowRank):
            return Part(key, d.scaled_B().to(dev, torch.float32), d.A.to(dev, torch.float32), None)
        if isinstance(d, Dense):
            return Part(key, None, None, d.W.to(dev, torch.float32))
        raise ValueError(f"module {mod!r}: unsupported delta type {type(d).__name__}")

    def stacked(self, path: str, lows: list[tuple[float, Part]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B_1 | … | B_k] (n, Σr), [A_1; …; A_k] (Σr, m) and the coefficient of each column,
        for the low-rank terms ``lows`` = [(λ, Part)] on weight ``path``. The stack is cached per
        path for its set of components; the coefficients are not."""
        keys = tuple(part.key for _, part in lows)
        hit = self._stack.get(path)
        if hit is None or hit[0] != keys:
            Bc = torch.cat([part.B for _, part in lows], 1)  # (n, Σr)
            Ac = torch.cat([part.A for _, part in lows], 0)  # (Σr, m)
            col = torch.cat([torch.full((part.B.shape[1],), i, dtype=torch.long) for i, (_, part) in enumerate(lows)])
            hit = self._stack[path] = (keys, Bc, Ac, col.to(Bc.device))
        _, Bc, Ac, col = hit
        lam = torch.tensor([x for x, _ in lows], dtype=torch.float32, device=Bc.device)[col]  # (Σr,)
        return Bc, Ac, lam

    def clear(self) -> None:
        """Drop every resolved part and stack (after a source's contents changed in place)."""
        self._parts.clear()
        self._stack.clear()


def _check_finite(comp: Component, parts: dict[str, Part], extras: dict[str, torch.Tensor]) -> None:
    for mod, p in parts.items():
        for t in (p.B, p.A, p.W):
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"component {comp} module {mod!r} contains NaN/Inf; refusing to apply")
    for path, t in extras.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"component {comp} parameter {path!r} contains NaN/Inf; refusing to apply")
