"""The sliders and the two mixes they make: ``Coefficients`` (vanilla λ per vector, DeVec λ per
unique part, λ of the shared part), their defaults per mode, and ``build_mixes`` → (left, DeVec)
``devec_core.mix.Mix`` (docs/METHOD.md "Recomposition").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..merge.studio_mix import left_mix, pair_terms
from ..mix import Mix
from ..pool import Decomposition
from .session import Session, StudioError


@dataclass
class Coefficients:
    """The sliders: vanilla λ per vector, DeVec λ per vector's unique part, λ of the shared part."""

    vanilla: dict[str, float]
    unique: dict[str, float]
    shared: float = 0.0
    pairs: dict[str, float] | None = None  # pairwise: "a+b" -> λ of that pair's shared vector (None: all λˢ)
    left: str = "task_arithmetic"  # the left side's merge method (devec_core.merge.studio_mix.LEFT_METHODS)
    density: float | None = None  # TIES / DARE density on the left (None: the method's default)

    @classmethod
    def from_lists(cls, names: list[str], vanilla: list[float], unique: list[float], shared: float) -> "Coefficients":
        """Build from slider values in pool order (extra slider values beyond the pool are ignored)."""
        for label, vals in (("vanilla", vanilla), ("unique", unique)):
            if len(vals) < len(names):
                raise StudioError(f"{label} coefficients: got {len(vals)} values for a pool of {len(names)}")
        c = cls({n: float(v) for n, v in zip(names, vanilla)}, {n: float(v) for n, v in zip(names, unique)}, float(shared))
        for n, v in [*c.vanilla.items(), *c.unique.items(), ("shared", c.shared)]:
            if not math.isfinite(v):
                raise StudioError(f"coefficient of {n!r} is {v}; use a finite number")
        return c


def default_coefficients(session: Session) -> Coefficients:
    """Defaults per mode (docs/METHOD.md "Recomposition").

    joint/pairwise (style mixing): every vector at its usual strength, shared part 0.
    isolate (behaviour removal): the target at −strength, references 0; DeVec negates only the
    target's unique part.
    A preset's own opening values (``Preset.coefficients``) win while its mode and target are kept.
    """
    st = session.start
    if st and st.get("mode") == session.mode and (session.mode != "isolate" or st.get("target") == session.target):
        return Coefficients(
            {n: float(st["vanilla"].get(n, 0.0)) for n in session.names},
            {n: float(st["unique"].get(n, 0.0)) for n in session.names},
            float(st.get("shared", 0.0)),
        )
    s = {n: session.strengths.get(n, 1.0) for n in session.names}
    if session.mode == "isolate" and session.target in s:
        van = {n: (-s[n] if n == session.target else 0.0) for n in session.names}
        return Coefficients(van, dict(van), 0.0)
    return Coefficients(dict(s), dict(s), 0.0)



def build_mixes(dec: Decomposition, c: Coefficients, pool_key: str = ""):
    """(left, DeVec) mixes for the sliders (docs/METHOD.md "Recomposition").

    left: W0 + Σ λ_i ΔW_i (vanilla), or the TIES / DARE merge of the vectors with those λ's
    (``c.left``, ``devec_core.merge``).  DeVec: W0 + Σ λ_i^u U_i + λ^s S, where S is the merged
    shared vector (joint, eq. 14), each pair's shared vector with its own λ (pairwise, ``c.pairs``;
    missing pairs take λ^s), or the target's own shared part (isolate).

    Returns:
        Two ``devec_core.mix.Mix``.
    """
    try:
        van = left_mix(dec, pool_key, c.vanilla, c.left, c.density)
    except ValueError as e:
        raise StudioError(str(e)) from e
    terms = [("unique", n, c.unique.get(n, 0.0)) for n in dec.names if c.unique.get(n, 0.0)]
    mode = dec.config.mode
    if mode == "pairwise":
        try:
            terms += pair_terms(dec, c.shared, c.pairs)
        except ValueError as e:
            raise StudioError(str(e)) from e
    elif c.shared:
        if mode == "joint" and len(dec.names) > 1:
            terms.append(("merged_shared", None, c.shared))
        elif mode == "isolate":
            terms.append(("shared", dec.config.target, c.shared))
    return van, Mix(dec, tuple(terms), "devec")

