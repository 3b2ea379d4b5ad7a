"""Settings you can share and a history of generations: the Studio's UI state as plain data.

A *settings* dict restores a page: tab, preset, mode, target, references, τ, coefficients (per
vector: vanilla λ, DeVec unique λ, on/off), shared λ, prompt, seed, the left side's method and
the backend's generation settings. It travels three ways:

  to_query / from_query   URL query parameters (``?tab=llm&preset=…&tau=0.9&van=toxic:-0.25,…``)
  to_json / from_json     the same dict as JSON (the page's "Settings" box)
  png_with_settings       a PNG whose ``devec`` text chunk holds the JSON (as A1111 / ComfyUI do)

Only preset pools can be restored in a fresh page (uploads live in one visitor's session); the
settings say ``"pool": "custom"`` for those and ``from_query`` refuses them with that reason.
Pure functions: no gradio, no model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

TABS = ("llm", "flux")
_NUM_KEYS = ("tau", "shared", "density", "temperature", "top_p")
_INT_KEYS = ("seed", "max_new_tokens", "steps", "width", "height")
_MAP_KEYS = ("van", "uni")  # name:value,name:value
PNG_KEY = "devec"  # the PNG text chunk that holds the settings JSON


class SettingsError(ValueError):
    """Settings that cannot be restored; the message names the field and the value."""


def _fmt(x: float) -> str:
    return f"{float(x):.4g}"


def to_query(settings: dict) -> str:
    """The settings as URL query parameters (without the leading '?'); keys in a fixed order."""
    q: list[tuple[str, str]] = []
    for k in ("tab", "preset", "mode", "target"):
        if settings.get(k) not in (None, ""):
            q.append((k, str(settings[k])))
    if settings.get("references") is not None:
        q.append(("refs", ",".join(settings["references"])))
    for k in _NUM_KEYS:
        if settings.get(k) is not None:
            q.append((k, _fmt(settings[k])))
    for k, field in (("van", "vanilla"), ("uni", "unique")):
        if settings.get(field):
            q.append((k, ",".join(f"{n}:{_fmt(v)}" for n, v in settings[field].items())))
    if settings.get("off"):
        q.append(("off", ",".join(settings["off"])))
    for k in _INT_KEYS:
        if settings.get(k) is not None:
            q.append((k, str(int(settings[k]))))
    for k in ("left", "prompt"):
        if settings.get(k) not in (None, ""):
            q.append((k, str(settings[k])))
    return urlencode(q)


def _number(key: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise SettingsError(f"settings: {key} must be a number; got {text!r}") from None
    if not math.isfinite(v):
        raise SettingsError(f"settings: {key} must be finite; got {text!r}")
    return v


def from_query(params: dict[str, str] | str) -> dict | None:
    """Settings from URL query parameters (a dict or the query string). None when the URL holds
    no settings (no ``preset``); SettingsError when it holds bad ones."""
    if isinstance(params, str):
        params = dict(parse_qsl(params.lstrip("?"), keep_blank_values=True))
    params = dict(params)
    if not params.get("preset"):
        return None
    s: dict = {"tab": params.get("tab", "llm"), "preset": params["preset"]}
    if s["tab"] not in TABS:
        raise SettingsError(f"settings: tab must be one of {TABS}; got {s['tab']!r}")
    for k in ("mode", "target", "left", "prompt"):
        if params.get(k):
            s[k] = params[k]
    if "refs" in params:
        s["references"] = [r for r in params["refs"].split(",") if r]
    for k in _NUM_KEYS:
        if params.get(k):
            s[k] = _number(k, params[k])
    for k in _INT_KEYS:
        if params.get(k):
            s[k] = int(_number(k, params[k]))
    for k, field in (("van", "vanilla"), ("uni", "unique")):
        if params.get(k):
            m = {}
            for item in params[k].split(","):
                name, sep, val = item.rpartition(":")
                if not sep or not name:
                    raise SettingsError(f"settings: {k} items are name:value; got {item!r}")
                m[name] = _number(f"{k} {name}", val)
            s[field] = m
    if params.get("off"):
        s["off"] = [n for n in params["off"].split(",") if n]
    return s


def to_json(settings: dict) -> str:
    return json.dumps(settings, ensure_ascii=False, indent=1, sort_keys=False)


def from_json(text: str) -> dict:
    """Settings from the page's JSON box (the same keys ``to_json`` writes)."""
    try:
        s = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(f"settings JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    if not isinstance(s, dict):
        raise SettingsError(f"settings JSON must be an object; got {type(s).__name__}")
    if s.get("pool") == "custom" or not s.get("preset"):
        raise SettingsError("these settings are for an uploaded pool: load the same files, then set the sliders")
    # round-trip through the query form: one parser, the same checks
    return from_query(dict(parse_qsl(to_query(s), keep_blank_values=True)))


def png_with_settings(image, settings: dict, path: str | Path) -> Path:
    """Save a PIL image as PNG with the settings JSON in its ``devec`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, to_json(settings))
    path = Path(path)
    tmp = path.with_suffix(".part")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)  # no half-written file under the final name
    return path


def settings_from_png(path: str | Path) -> dict:
    """The settings a PNG made by the Studio carries (SettingsError if it has none)."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get(PNG_KEY)
    if not text:
        raise SettingsError(f"{Path(path).name}: no DeVec settings in this PNG")
    return json.loads(text)


def label(settings: dict) -> str:
    """One line naming what made an output: τ, mode, the λ's, seed."""
    lam = ", ".join(f"{n} {v:g}/{settings.get('unique', {}).get(n, 0.0):g}" for n, v in settings.get("vanilla", {}).items()
                    if n not in settings.get("off", []))
    parts = [f"τ {settings['tau']:.2f}", settings.get("mode", "")]
    if lam:
        parts.append(f"λ vanilla/DeVec: {lam}")
    parts.append(f"λˢ {settings.get('shared', 0.0):g}")
    parts.append(f"seed {settings.get('seed', 0)}")
    return " · ".join(p for p in parts if p)
