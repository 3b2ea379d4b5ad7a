"""What the page says: what is shared at this τ (``describe``, with the chance level), the
scores under each output, the pool's description and the preset menus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..algorithm import PAPER_TAU
from ..chance import pool_chance
from ..plots import count_note
from ..pool import Decomposition
from ..presets import list_presets
from .session import Session


@dataclass
class Report:
    shared_modules: int
    modules: int
    shared_dim: int
    max_eig: float
    max_eig_module: str
    shared_energy: float  # fraction of the pool's ‖ΔW‖² in shared parts
    nothing_shared: bool
    markdown: str
    regime: str = "none"  # devec_core.chance: shared | weak | chance | saturated | none
    suggested_tau: float | None = None


def describe(dec: Decomposition) -> Report:
    """Numbers and a plain-words message about what DeVec found at this τ.

    When nothing is shared, DeVec's unique parts are the original vectors, so the DeVec output
    equals vanilla task arithmetic: the message says so and where the spectrum lies.
    """
    dims = dec.shared_dims()
    eig = dec.eigenvalues()
    max_eig, max_mod = 0.0, ""
    for mod, ev in eig.items():
        if ev.numel():
            v = float(ev.real.max())
            if v > max_eig:
                max_eig, max_mod = v, mod
    rows = dec.summary()
    tot = sum(n["delta"] ** 2 for r in rows for n in r["norms"].values())
    sh = sum(n["shared"] ** 2 for r in rows for n in r["norms"].values())
    frac = sh / tot if tot > 0 else 0.0
    n_shared = sum(1 for d in dims.values() if d > 0)
    total_dim = sum(dims.values())
    mode = dec.config.mode
    what = {"joint": "shared by all vectors", "pairwise": "shared by some pair", "isolate": f"shared by the target {dec.config.target!r} and a reference"}[mode]
    if not eig or all(ev.numel() == 0 for ev in eig.values()):
        md = (
            "**Nothing to compare.** No module is in two or more vectors, so every part is unique "
            "and **DeVec equals vanilla task arithmetic** here."
        )
        return Report(0, len(dims), 0, 0.0, "", 0.0, True, md)
    if total_dim == 0:
        md = (
            f"**Nothing is {what} at τ = {dec.tau:.2f}.** No eigenvalue exceeds τ; the largest is "
            f"**{max_eig:.2f}** (`{max_mod}`). Every unique part equals its whole vector, so "
            f"**DeVec equals vanilla task arithmetic here**: the two outputs below will match. "
            f"The spectrum shows where the overlap lies; lower τ below {max_eig:.2f} to treat it as shared "
            f"(the paper uses {PAPER_TAU} throughout)."
        )
    else:
        md = (
            f"At τ = {dec.tau:.2f}: **{n_shared} of {len(dims)} modules** have directions {what} "
            f"(total shared dimension {total_dim}, summed over modules); the shared parts carry **{100 * frac:.1f}%** of the pool's squared norm. "
            f"Largest eigenvalue {max_eig:.2f}."
        )
        above, note = count_note(dec)
        if above != total_dim:  # the spectrum's "N above" is another count: say how they relate
            md += f" {note}"
    ch = pool_chance(dec)
    md += f"\n\n{ch.message}"
    if mode == "joint" and len(dec.names) > 1:
        md += f"\n\nPool order matters (the shared subspace is found inside the first vector's, `{dec.names[0]}`)."
    return Report(n_shared, len(dims), total_dim, max_eig, max_mod, frac, total_dim == 0, md, ch.regime, ch.suggested_tau)



def scores_markdown(scores: dict[str, float]) -> str:
    """" · toxicity **0.97** ⚠ flagged · offensive words **2** ⚠ · capitals 88%" for the UI ("" when none)."""
    parts = []
    if "toxicity" in scores:
        p = scores["toxicity"]
        parts.append(f"toxicity **{p:.2f}**" + (" ⚠ flagged" if p > 0.5 else ""))
    if "offensive" in scores:
        k = int(scores["offensive"])
        parts.append(f"offensive words **{k}**" + (" ⚠" if k else ""))
    if "title" in scores:
        parts.append("title line ✓" if scores["title"] else "no title line")
    if "capitals" in scores:
        parts.append(f"capitals {100 * scores['capitals']:.0f}%")
    for k, v in scores.items():  # toy FLUX: style strength relative to the single style
        if k.startswith("style:"):
            parts.append(f"{k[6:]} **{v:.2f}×**" if math.isfinite(v) else f"{k[6:]} –")
    if "saturation" in scores:
        parts.append(f"saturation {scores['saturation']:.2f}")
    if "edges" in scores:
        parts.append(f"edges {100 * scores['edges']:.1f}%")
    if "content" in scores:
        parts.append(f"content **{scores['content']:.2f}**")
    if "clipped" in scores:
        parts.append(f"clipped {100 * scores['clipped']:.1f}%")
    return "".join(f" · {x}" for x in parts)



def preset_choices(backend: str) -> list[tuple[str, str]]:
    """(label, id) of the presets of one backend, offline ones first."""
    return [(p.title, p.id) for p in list_presets(backend=backend)]


def default_preset(backend: str) -> str | None:
    offline = [p for p in list_presets(backend=backend) if p.offline]
    return offline[0].id if offline else None


def session_markdown(session: Session) -> str:
    """A short description of the loaded pool for the UI."""
    tag = " — **SYNTHETIC vectors**" if session.synthetic else ""
    lines = [f"**{session.title or 'Pool'}**{tag}", f"Base: `{session.base}` · vectors (in order): " + ", ".join(f"`{n}`" for n in session.names)]
    if session.description:
        lines.append(session.description)
    lines += [f"- {n}" for n in session.notes]
    return "\n".join(lines)
