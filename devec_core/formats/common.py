"""Constants, the error type and PEFT adapter configs shared by every reader."""

from __future__ import annotations

import json
import math
from pathlib import Path


PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
SAFE_SUFFIXES = (".safetensors",)
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_magnitude_vector", ".lora.down.", ".lora.up.")
# Files inside a folder that hold a LoRA (first match wins)
_LORA_FILE_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin", "pytorch_lora_weights.bin")
# Single-file and sharded checkpoints inside a folder
_CKPT_INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
_CKPT_FILE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class FormatError(ValueError):
    """A source could not be read as a task vector; the message names the source and why."""


def _no_alpha(path: Path) -> FormatError:
    return FormatError(
        f"{str(path)!r}: a PEFT adapter file without its adapter_config.json: its scale lora_alpha/r is unknown "
        f"(PEFT keeps alpha only in that config), so it is not loaded with a guessed scale. Supply the config: "
        f"put adapter_config.json beside the file (or give the adapter folder), upload the folder as a .zip or "
        f"adapter_config.json together with the file; CLI: --config adapter_config.json or --alpha ALPHA"
    )


def read_adapter_config(path: Path) -> dict:
    """Parse an ``adapter_config.json``; a broken one is an error naming the file."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{str(path)!r}: not a readable adapter_config.json ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{str(path)!r}: adapter_config.json must hold a JSON object; got {type(cfg).__name__}")
    for k in ("r", "lora_alpha"):
        v = cfg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise FormatError(f"{str(path)!r}: {k} must be a number; got {v!r}")
    if isinstance(cfg.get("r"), (int, float)) and cfg["r"] <= 0:
        raise FormatError(f"{str(path)!r}: r must be positive; got {cfg['r']!r}")
    return cfg


def _config_beside(path: Path) -> dict | None:
    cfg = path / "adapter_config.json" if path.is_dir() else path.parent / "adapter_config.json"
    return read_adapter_config(cfg) if cfg.exists() else None


def _default_name(path: Path) -> str:
    p = path
    if p.is_file() and (p.name in _LORA_FILE_NAMES or p.name in _CKPT_FILE_NAMES):
        p = p.parent
    name = p.name
    for suf in (".safetensors", ".index.json", ".json", ".zip") + PICKLE_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name or "vector"
