"""Sources to local paths (files, folders, zips, Hub ids), tensors read safely, formats sniffed."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .common import (
    _CKPT_FILE_NAMES,
    _CKPT_INDEX_NAMES,
    _LORA_FILE_NAMES,
    _LORA_MARKERS,
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    FormatError,
    _config_beside,
    _default_name,
)
from .zips import zip_vectors


def resolve_source(source: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local path for ``source``: an existing file/folder, or a Hub repo (``owner/repo`` or
    ``owner/repo/file.safetensors``) fetched through ``huggingface_hub`` (offline mode respected).

    Args:
        source: path or Hub id.
        revision: Hub revision (branch, tag or commit).
    Returns:
        The local file or folder.
    """
    p = Path(os.path.expanduser(str(source)))
    if p.is_file() and p.suffix.lower() == ".zip":
        found = zip_vectors(p)
        if len(found) > 1:
            raise FormatError(
                f"{str(p)!r}: the zip holds {len(found)} task vectors ({', '.join(n for n, _ in found)}); "
                f"give one per input (unzip it and pass the folders you want)"
            )
        return found[0][1]
    if p.exists():
        return p
    s = str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+(/.+)?", s) or s.startswith((".", "/")):
        raise FormatError(f"{s!r}: no such file or folder")
    from huggingface_hub import hf_hub_download, snapshot_download  # lazy: only for Hub ids
    from huggingface_hub.errors import EntryNotFoundError

    try:
        from httpx import HTTPError as TransportError  # huggingface_hub >= 1 talks httpx
    except ImportError:  # older huggingface_hub: requests, whose errors are OSErrors
        TransportError = OSError

    parts = s.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json", "*.safetensors.index.json"])
        )
    except (OSError, ValueError, EntryNotFoundError, TransportError) as e:  # offline, missing repo or file, gated, bad id
        raise FormatError(f"{s!r}: not a local path, and the Hub could not provide it ({type(e).__name__}: {e})") from e


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise FormatError(
            f"{str(path)!r}: pickled file ({path.suffix}) refused: unpickling can run code. "
            f"Convert it to .safetensors, or pass allow_pickle=True / --allow-pickle to read it "
            f"with torch.load(weights_only=True)"
        )


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a whole weights file (a LoRA: small) → (tensors, safetensors metadata).

    Args:
        path: a .safetensors file, or a pickled one if ``allow_pickle``.
    Returns:
        (state dict, header metadata or {}).
    """
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        _check_pickle(path, allow_pickle)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # refused or corrupt
            raise FormatError(f"{str(path)!r}: torch.load(weights_only=True) failed ({type(e).__name__}: {str(e)[:200]})") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise FormatError(f"{str(path)!r}: pickled file does not hold a flat name → tensor dict")
        return dict(sd), {}
    if suffix not in SAFE_SUFFIXES:
        raise FormatError(f"{str(path)!r}: unknown file type {path.suffix!r}; expected .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise FormatError(
            f"{str(path)!r}: not a readable safetensors file, truncated or corrupt ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    return sd, meta


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise FormatError(
            f"{str(path)!r}: not a readable safetensors file, truncated or corrupt ({type(e).__name__}: {str(e)[:200]})"
        ) from e


@dataclass
class Sniffed:
    """What a source is: ``kind`` ∈ "lora" (a LoRA/adapter file), "checkpoint" (full weights)."""

    kind: str
    path: Path  # the weights file (lora) or the file/folder (checkpoint)
    config: dict | None = None  # PEFT adapter_config.json if any
    folder: Path | None = None


def sniff(path: Path) -> Sniffed:
    """Decide what a local file or folder holds (by names and safetensors headers, no tensor reads)."""
    if path.is_dir():
        config = _config_beside(path)
        for n in _LORA_FILE_NAMES:
            if (path / n).exists():
                return Sniffed("lora", path / n, config, path)
        if config is not None:
            raise FormatError(f"{str(path)!r}: has adapter_config.json but no adapter_model.safetensors")
        if any((path / n).exists() for n in _CKPT_INDEX_NAMES + _CKPT_FILE_NAMES):
            return Sniffed("checkpoint", path, None, path)
        for sub in ("transformer", "unet"):
            if (path / sub).is_dir():
                return sniff(path / sub)
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.ckpt")):
            raise FormatError(f"{str(path)!r}: only pickled weights found (.bin/.pt/.ckpt); convert to safetensors")
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return sniff(files[0])
        raise FormatError(f"{str(path)!r}: no adapter, LoRA file or checkpoint found in this folder")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return Sniffed("lora", path, _config_beside(path), path.parent)
    if suffix == ".json" and path.name.endswith(".index.json"):
        return Sniffed("checkpoint", path, None, path.parent)
    if suffix not in SAFE_SUFFIXES:
        raise FormatError(f"{str(path)!r}: unknown file type {path.suffix!r}; expected .safetensors or a folder")
    keys = safetensors_keys(path)
    if any(m in k for k in keys for m in _LORA_MARKERS) or any(".processor." in k or k.endswith(".alpha") for k in keys):
        return Sniffed("lora", path, _config_beside(path), path.parent)
    return Sniffed("checkpoint", path, None, path.parent)


def default_name(source: str | os.PathLike, path: Path | None = None) -> str:
    """A vector's default name: the file or folder name; for a Hub id, its file or repo name."""
    s = str(source)
    if path is not None and not Path(os.path.expanduser(s)).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+(/.+)?", s):
        parts = s.split("/")
        return _default_name(Path(parts[-1])) if len(parts) > 2 else parts[1]
    return _default_name(path if path is not None else Path(s))


