"""Merge methods by name: a plain name → method table (mergekit-style), names as a string enum.

Each entry says which paper it follows, whether it needs dense deltas per module (entry-wise
methods: trim, sign, random drop) or is exact on LoRA factors, and which parameters it takes
with their defaults. ``MethodName`` is a ``str`` Enum, so ``yaml.safe_dump(cfg)`` writes plain
strings and reading them back gives the same member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..algorithm import PAPER_TAU
from . import dare, magnitude_prune, task_arithmetic, ties

DEVEC_PAPER = "https://arxiv.org/abs/2512.22511"
# DeVec merges: what the method runs over besides the pairs' shared vectors. "unique" (default): the
# unique parts U_i (the shared directions then enter once, through S_ab). "delta": the original
# vectors, the S_ab as *additional* task vectors (the abstract's wording, "shared components as
# additional task vectors"; the paper's §4.1 setup is read both ways, so both are offered).
DEVEC_PARTS = ("unique", "delta")


class MethodName(str, Enum):
    task_arithmetic = "task_arithmetic"
    ties = "ties"
    dare_linear = "dare_linear"
    dare_ties = "dare_ties"
    magnitude_prune = "magnitude_prune"
    devec = "devec"
    devec_ties = "devec_ties"
    devec_dare_linear = "devec_dare_linear"
    devec_dare_ties = "devec_dare_ties"
    devec_magnitude_prune = "devec_magnitude_prune"

    def __str__(self) -> str:
        return self.value


ALIASES = {"ta": "task_arithmetic", "vanilla": "task_arithmetic", "linear": "task_arithmetic", "devec_ta": "devec"}

# parameters of the entry-wise methods and their defaults (density: TIES' top-20 %, DARE 0.5)
_TIES = {"density": 0.2, "majority_sign": "total", "elect_on": "trimmed", "normalize": "count"}
_DARE_LINEAR = {"density": 0.5, "seed": 0, "rescale": "inverse_density"}
_DARE_TIES = {**_DARE_LINEAR, "majority_sign": "total", "elect_on": "trimmed", "normalize": "count"}
_MAGNITUDE = {"density": 0.2}

# the same methods as mergekit computes them (see ties.py / dare.py); PEFT's are the defaults
CONVENTIONS = {
    "peft": {},
    "mergekit": {
        "ties": {"elect_on": "weighted", "normalize": "weights"},
        "dare_ties": {"elect_on": "weighted", "normalize": "none", "rescale": "l1"},
        "dare_linear": {"rescale": "l1"},
    },
}


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: name, paper, where it works, parameters (name → default)."""

    name: MethodName
    paper: str
    dense: bool  # True: needs each module's dense deltas (streamed one module at a time)
    params: dict = field(default_factory=dict)
    base: MethodName | None = None  # DeVec methods: the method applied to the unique parts
    doc: str = ""

    @property
    def is_devec(self) -> bool:
        return self.base is not None


METHODS: dict[MethodName, MergeMethod] = {}


def register(m: MergeMethod) -> None:
    if m.name in METHODS:
        raise ValueError(f"merge method {m.name.value!r} is already registered")
    METHODS[m.name] = m


for _m in (
    MergeMethod(MethodName.task_arithmetic, task_arithmetic.PAPER, False, {}, doc="Σ λ_i ΔW_i, exact on LoRA factors"),
    MergeMethod(MethodName.ties, ties.PAPER, True, _TIES, doc="trim, elect sign, disjoint mean"),
    MergeMethod(MethodName.dare_linear, dare.PAPER, True, _DARE_LINEAR, doc="random drop + rescale, then Σ λ_i"),
    MergeMethod(MethodName.dare_ties, dare.PAPER, True, _DARE_TIES, doc="random drop + rescale, then TIES' sign election"),
    MergeMethod(MethodName.magnitude_prune, magnitude_prune.PAPER, True, _MAGNITUDE, doc="top-|Δ| entries, then Σ λ_i"),
):
    register(_m)
for _base in (MethodName.task_arithmetic, MethodName.ties, MethodName.dare_linear, MethodName.dare_ties, MethodName.magnitude_prune):
    _b = METHODS[_base]
    _name = MethodName.devec if _base == MethodName.task_arithmetic else MethodName("devec_" + _base.value)
    register(MergeMethod(
        _name, DEVEC_PAPER, _b.dense, {**_b.params, "tau": PAPER_TAU, "parts": "unique"}, base=_base,
        doc=f"{_base.value} over the unique parts + each pair's shared vector added once with its own coefficient",
    ))


def get_method(name: str | MethodName) -> MergeMethod:
    """The method called ``name`` (aliases: ta / vanilla / linear → task_arithmetic, devec_ta → devec)."""
    key = ALIASES.get(str(name), str(name))
    try:
        return METHODS[MethodName(key)]
    except ValueError as e:
        raise ValueError(f"Unknown merge method {name!r}; expected one of {[m.value for m in METHODS]} or {sorted(ALIASES)}") from e


def resolve_params(method: MergeMethod, params: dict, convention: str = "peft") -> dict:
    """The method's defaults, overridden by the convention, then by ``params``; unknown keys are an error."""
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
    base = (method.base or method.name).value
    out = {**method.params, **CONVENTIONS[convention].get(base, {})}
    unknown = sorted(set(params) - set(out))
    if unknown:
        raise ValueError(f"merge method {method.name.value!r} takes no parameter(s) {unknown}; it takes {sorted(out)}")
    out.update({k: v for k, v in params.items() if v is not None})
    if "density" in out:
        out["density"] = magnitude_prune.check_density(out["density"])
    if "seed" in out and not isinstance(out["seed"], int):
        raise ValueError(f"seed must be an integer; got {out['seed']!r}")
    for key, allowed in (("parts", DEVEC_PARTS), ("majority_sign", ties.SIGN_METHODS), ("elect_on", ties.ELECT_ON), ("normalize", ties.NORMALIZE), ("rescale", dare.RESCALE)):
        if key in out and out[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}; got {out[key]!r}")
    return out
