"""A mix as a value: components of a decomposition (or of a plain pool of task vectors) with
coefficients. Nothing here touches a model (``mix.editor`` fuses a mix into one).

A component is (kind, name) resolved against a source — a ``devec_core.Decomposition``
(``dec.component(kind, name)``) or a ``VectorPool`` (kind "delta" only). Kinds: "delta" (the
original vector), "unique", "shared" (that vector's shared part), "merged_shared" (eq. 14, joint
mode, name None), "pair_shared" (pairwise mode, name "a+b").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..taskvec import Delta, TaskVector

KINDS = ("delta", "unique", "shared", "merged_shared", "pair_shared")
EXTRA_KINDS = ("delta", "unique")  # kinds whose vector's extras (biases) follow the coefficient


@dataclass(frozen=True, order=True)
class Component:
    """One component of a decomposition: ``kind`` ∈ KINDS, ``name`` a vector (or "a+b" pair)."""

    kind: str
    name: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown component kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "merged_shared" and self.name is not None:
            raise ValueError(f"merged_shared takes no name; got {self.name!r}")
        if self.kind != "merged_shared" and not self.name:
            raise ValueError(f"component kind {self.kind!r} needs a name")

    def __str__(self) -> str:
        return self.kind if self.name is None else f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> "Component":
        """``"unique:a"`` → Component("unique", "a"); ``"merged_shared"`` → Component("merged_shared")."""
        kind, _, name = text.partition(":")
        return cls(kind.strip(), name.strip() or None)


def _as_term(t: Any) -> tuple[Component, float]:
    """Normalise (Component, λ) / ((kind, name), λ) / (kind, name, λ) / ("kind:name", λ)."""
    if isinstance(t, (tuple, list)) and len(t) == 3:
        comp, coef = Component(t[0], t[1]), t[2]
    elif isinstance(t, (tuple, list)) and len(t) == 2:
        c, coef = t
        if isinstance(c, Component):
            comp = c
        elif isinstance(c, str):
            comp = Component.parse(c)
        elif isinstance(c, (tuple, list)):
            comp = Component(*c)
        else:
            raise ValueError(f"mix term {t!r}: component must be Component, 'kind:name' or (kind, name)")
    else:
        raise ValueError(f"mix term {t!r}: expected (component, coefficient) or (kind, name, coefficient)")
    coef = float(coef)
    if not math.isfinite(coef):
        raise ValueError(f"mix term {comp}: coefficient is {coef}")
    return comp, coef


@dataclass(frozen=True)
class Mix:
    """A mix: ``source`` (Decomposition or VectorPool) + ((Component, coefficient), ...)."""

    source: Any = field(compare=False, repr=False)
    terms: tuple = ()
    label: str = ""

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(_as_term(t) for t in self.terms))
        if self.terms and self.source is None:
            raise ValueError(f"mix {self.label!r} has terms but no source (Decomposition or VectorPool)")

    @classmethod
    def base(cls, source: Any = None) -> "Mix":
        """The empty mix: the base model's weights."""
        return cls(source, (), "base")

    def active(self) -> dict[Component, float]:
        """Coefficients summed per component, zeros dropped, in canonical (sorted) order."""
        acc: dict[Component, float] = {}
        for c, lam in self.terms:
            acc[c] = acc.get(c, 0.0) + lam
        return {c: acc[c] for c in sorted(acc) if acc[c] != 0.0}

    def to_spec(self) -> dict:
        """Plain data (JSON/YAML-safe): ``{"label": ..., "terms": [["unique:a", 1.0], ...]}``."""
        return {"label": self.label, "terms": [[str(c), lam] for c, lam in self.terms]}

    @classmethod
    def from_spec(cls, source: Any, spec: dict) -> "Mix":
        """Inverse of ``to_spec``, bound to ``source``.

        Args:
            source: a Decomposition or VectorPool.
            spec: ``{"label": str, "terms": [[ "kind:name", coefficient ], ...]}``.

        Returns:
            The mix.
        """
        if not isinstance(spec, dict) or not isinstance(spec.get("terms", []), list):
            raise ValueError(f"mix spec must be a dict with a 'terms' list; got {spec!r}")
        return cls(source, tuple(tuple(t) for t in spec.get("terms", [])), str(spec.get("label", "")))

    def describe(self) -> str:
        """``"label: 1·unique:a + 0.5·unique:b"``."""
        body = " + ".join(f"{lam:g}·{c}" for c, lam in self.terms) or "base"
        return f"{self.label}: {body}" if self.label else body


def vanilla(source: Any, weights: dict[str, float], label: str = "vanilla") -> Mix:
    """Vanilla task arithmetic: Σ λ_i ΔW_i over the vectors' original deltas.

    Args:
        source: a Decomposition or VectorPool.
        weights: vector name → λ.
        label: shown in side-by-side results.

    Returns:
        The mix.
    """
    return Mix(source, tuple((Component("delta", n), lam) for n, lam in weights.items()), label)


def devec(
    source: Any,
    unique: dict[str, float],
    shared: float = 0.0,
    pairs: dict[str, float] | None = None,
    label: str = "devec",
) -> Mix:
    """A DeVec mix: Σ λ_i^u U_i + λ^s S (joint) + Σ λ_ab S_ab (pairwise "a+b" shared vectors).

    Args:
        source: a Decomposition.
        unique: vector name → coefficient of its unique part.
        shared: coefficient of the merged shared vector (eq. 14); 0 leaves it out.
        pairs: "a+b" → coefficient of that pair's shared vector (pairwise mode).
        label: shown in side-by-side results.

    Returns:
        The mix.
    """
    terms = [(Component("unique", n), lam) for n, lam in unique.items()]
    if shared:
        terms.append((Component("merged_shared"), shared))
    terms += [(Component("pair_shared", p), lam) for p, lam in (pairs or {}).items()]
    return Mix(source, tuple(terms), label)


class VectorPool:
    """Task vectors without a decomposition: a mix source offering kind "delta" only.

    Args:
        vectors: the task vectors (unique names).
    """

    def __init__(self, vectors: Iterable[TaskVector]):
        self.vectors = list(vectors)
        self.names = [v.name for v in self.vectors]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"VectorPool needs unique vector names; got {self.names}")

    def component(self, kind: str, name: str | None = None) -> dict[str, Delta]:
        if kind != "delta":
            raise ValueError(f"a VectorPool has only 'delta' components; got {kind!r} (decompose the pool first)")
        if name not in self.names:
            raise ValueError(f"Unknown task vector {name!r}; the pool has {self.names}")
        return dict(self.vectors[self.names.index(name)].modules)
