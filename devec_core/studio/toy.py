"""The tiny FLUX-architecture model of the style demo (``assets/style_flux``, built by
``demo/style/build.py``): it runs on a CPU offline, renders a strip of seeds per side and scores
them with its own calibration and content classifier (``devec_core.toy_flux``).

The Studio's generation module renders with it (``generation.generate_toy``). ``TOY_DIR`` is
read at call time, so a test can point it elsewhere (``monkeypatch.setattr(studio.toy, "TOY_DIR", …)``).
"""

from __future__ import annotations

import base64
from pathlib import Path

from .. import toy_flux
from .caches import LOCK
from .session import REPO_ROOT

TOY_BASE = "toy-flux"  # the tiny FLUX-architecture model built by demo/style/build.py (CPU, offline)
TOY_DIR = REPO_ROOT / "assets" / "style_flux"
TOY_SEEDS = 3  # the toy model renders a strip of seeds seed, seed+1, seed+2 per side

_EXTRAS: dict[str, object] = {}


def toy_missing() -> str | None:
    """None when the tiny model is built, else what to run to build it."""
    if not toy_flux.is_toy_flux(TOY_DIR / "model"):
        return f"the tiny style model is missing from {str(TOY_DIR)!r}: build it with `python demo/style/build.py`"
    return None


def load_toy_pipeline():
    """The tiny model's FluxPipeline (CPU)."""
    return toy_flux.load_model(TOY_DIR / "model")


def toy_extras() -> tuple[dict, object]:
    """(calibration, content classifier) of the toy model, loaded once."""
    with LOCK:
        if not _EXTRAS:
            _EXTRAS["cal"] = toy_flux.load_calibration(TOY_DIR)
            _EXTRAS["clf"] = toy_flux.load_classifier(TOY_DIR / "classifier.safetensors")
        return _EXTRAS["cal"], _EXTRAS["clf"]


def toy_reference_markdown(names: list[str], folder: Path | None = None) -> str:
    """Reference images of the base model and each single style, inline (for the pool description)."""
    folder = TOY_DIR if folder is None else folder
    rows = []
    for n in ["base", *names]:
        f = folder / "refs" / f"{n}.png"
        if f.is_file():
            b64 = base64.b64encode(f.read_bytes()).decode()
            rows.append(f'<div><small>{n}</small><br><img src="data:image/png;base64,{b64}" alt="{n}" style="image-rendering:pixelated;width:192px"></div>')
    if not rows:
        return ""
    return '<div style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(rows) + "</div>"
