"""Task vectors in: LoRA files, PEFT adapter folders, DoRA adapters, full checkpoints, Hub ids.

Every source format is converted here, at the boundary, into the one internal form
(``devec_core.taskvec.TaskVector``): module name → ``LowRank`` (scale folded in) or ``Dense``.

Normalised module names (the same module of the same base has the same key in every format):
  * FLUX (diffusers, kohya/sd-scripts, XLabs, fal-Kontext, ... LoRAs): the diffusers
    ``FluxTransformer2DModel`` module path, without the ``transformer.`` prefix, e.g.
    ``"transformer_blocks.0.attn.to_q"``, ``"single_transformer_blocks.3.proj_out"``.
    Text-encoder modules (rare) keep a ``"text_encoder."`` prefix.
  * LLMs (PEFT adapters, full checkpoints): the model's module path as in
    ``model.named_modules()`` of the ``*ForCausalLM``, e.g. ``"model.layers.0.self_attn.q_proj"``
    (PEFT's ``base_model.model.`` prefix and the ``.weight`` suffix are removed).

Scaling is folded in here: a LoRA's alpha/r (rsLoRA: alpha/√r, PEFT ``rank_pattern`` /
``alpha_pattern`` and diffusers ``.alpha`` keys respected) becomes ``LowRank.scale``; kohya files
arrive pre-scaled from diffusers' converter. DoRA deltas are dense (PEFT's merge math, needs the
base weights); a full checkpoint's delta is fine-tuned − base, read one module at a time.

Formats are detected and converted by diffusers (``FluxPipeline.lora_state_dict``) and PEFT
where they parse them; this file only sniffs which one to call and normalises the names.
Pickled files (.bin/.pt/.ckpt/.pth) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .taskvec import Delta, Dense, LowRank, TaskVector

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


# ---------------------------------------------------------------------------------------------
# 1. Resolving a source: local file / folder, or a Hub id
# ---------------------------------------------------------------------------------------------


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
    if p.exists():
        return p
    s = str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+(/.+)?", s) or s.startswith((".", "/")):
        raise FormatError(f"{s!r}: no such file or folder")
    from huggingface_hub import hf_hub_download, snapshot_download  # lazy: only for Hub ids

    parts = s.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json", "*.safetensors.index.json"])
        )
    except Exception as e:  # offline, missing repo, gated, ...
        raise FormatError(f"{s!r}: not a local path, and the Hub could not provide it ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# 2. Reading tensors safely
# ---------------------------------------------------------------------------------------------


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
        except Exception as e:
            raise FormatError(f"{str(path)!r}: torch.load(weights_only=True) failed ({type(e).__name__}: {str(e)[:200]})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise FormatError(f"{str(path)!r}: pickled file does not hold a flat name → tensor dict")
        return dict(sd), {}
    if suffix not in SAFE_SUFFIXES:
        raise FormatError(f"{str(path)!r}: unknown file type {path.suffix!r}; expected .safetensors")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise FormatError(
            f"{str(path)!r}: not a readable safetensors file, truncated or corrupt ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    return sd, meta


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise FormatError(
            f"{str(path)!r}: not a readable safetensors file, truncated or corrupt ({type(e).__name__}: {str(e)[:200]})"
        ) from None


# ---------------------------------------------------------------------------------------------
# 3. Sniffing
# ---------------------------------------------------------------------------------------------


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
        cfg_path = path / "adapter_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
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
        cfg = path.parent / "adapter_config.json"
        return Sniffed("lora", path, json.loads(cfg.read_text()) if cfg.exists() else None, path.parent)
    if suffix == ".json" and path.name.endswith(".index.json"):
        return Sniffed("checkpoint", path, None, path.parent)
    if suffix not in SAFE_SUFFIXES:
        raise FormatError(f"{str(path)!r}: unknown file type {path.suffix!r}; expected .safetensors or a folder")
    keys = safetensors_keys(path)
    if any(m in k for k in keys for m in _LORA_MARKERS) or any(".processor." in k or k.endswith(".alpha") for k in keys):
        cfg = path.parent / "adapter_config.json"
        return Sniffed("lora", path, json.loads(cfg.read_text()) if cfg.exists() else None, path.parent)
    return Sniffed("checkpoint", path, None, path.parent)


def default_name(source: str | os.PathLike, path: Path | None = None) -> str:
    """A vector's default name: the file or folder name; for a Hub id, its file or repo name."""
    s = str(source)
    if path is not None and not Path(os.path.expanduser(s)).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+(/.+)?", s):
        parts = s.split("/")
        return _default_name(Path(parts[-1])) if len(parts) > 2 else parts[1]
    return _default_name(path if path is not None else Path(s))


def _default_name(path: Path) -> str:
    p = path
    if p.is_file() and (p.name in _LORA_FILE_NAMES or p.name in _CKPT_FILE_NAMES):
        p = p.parent
    name = p.name
    for suf in (".safetensors", ".index.json", ".json") + PICKLE_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name or "vector"


# ---------------------------------------------------------------------------------------------
# 4. LoRA state dicts → modules
# ---------------------------------------------------------------------------------------------


def peft_scale(config: dict, module: str, rank: int) -> float:
    """The LoRA scale of one module under a PEFT ``LoraConfig`` dict (alpha/r or rsLoRA alpha/√r).

    Uses PEFT's own pattern matching for ``rank_pattern`` / ``alpha_pattern``.

    Args:
        config: LoraConfig fields (adapter_config.json, or diffusers' lora_adapter_metadata).
        module: the module path as PEFT's tuner sees it (e.g. "model.layers.0.self_attn.q_proj").
        rank: the module's actual rank (rows of lora_A).
    Returns:
        The factor s with ΔW = s · B A.
    """
    from peft.utils.other import get_pattern_key

    alpha = config.get("lora_alpha", config.get("r", rank)) or rank
    alpha_pattern = config.get("alpha_pattern") or {}
    if alpha_pattern:
        key = get_pattern_key(list(alpha_pattern), module)
        alpha = alpha_pattern.get(key, alpha)
    r = rank
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(r)
    return float(alpha) / r


def _is_peft_keys(keys: list[str]) -> bool:
    """PEFT naming (``base_model.model.<module>.lora_A.weight``), not fal-Kontext's BFL names."""
    return bool(keys) and all(k.startswith("base_model.model.") for k in keys) and not any(
        ".double_blocks." in k or ".single_blocks." in k for k in keys
    )


def _flux_format_label(keys: list[str]) -> str:
    """The label of the layout diffusers' ``FluxPipeline.lora_state_dict`` will detect (its own tests)."""
    if any(".lora_down.weight" in k for k in keys):
        return "kohya"
    if any("processor" in k for k in keys):
        return "xlabs"
    if any("query_norm.scale" in k for k in keys):
        return "bfl-control"
    if any("base_model" in k for k in keys):
        return "fal-kontext"
    return "diffusers"


def _unknown_layout(path: Path, keys: list[str], why: str) -> FormatError:
    shown = ", ".join(repr(k) for k in keys[:5])
    return FormatError(f"{str(path)!r}: unknown key layout ({why}); first keys: {shown}{' ...' if len(keys) > 5 else ''}")


def _group_lora(
    sd: dict[str, torch.Tensor], path: Path, display: Callable[[str], str] = lambda k: k
) -> dict[str, dict[str, torch.Tensor]]:
    """``<module>.lora_A.weight`` style keys → module → {"A", "B", "alpha", "magnitude", "bias"}.

    ``display`` maps a key back to how the file spells it, for error messages.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    leftovers = []
    patterns = (
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_B.bias", "bias"),
        (".lora_magnitude_vector.weight", "magnitude"),
        (".lora_magnitude_vector", "magnitude"),
        (".alpha", "alpha"),
    )
    for k, v in sd.items():
        for suf, part in patterns:
            if k.endswith(suf):
                groups.setdefault(k[: -len(suf)], {})[part] = v
                break
        else:
            leftovers.append(k)
    if leftovers:
        raise _unknown_layout(path, [display(k) for k in leftovers], f"{len(leftovers)} keys are not LoRA factors")
    for mod, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise FormatError(f"{str(path)!r}: module {mod!r} has no {missing} weight")
        A, B = parts["A"], parts["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise FormatError(
                f"{str(path)!r}: module {mod!r}: only linear LoRAs are supported; lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
            )
        if B.shape[1] != A.shape[0]:
            raise FormatError(f"{str(path)!r}: module {mod!r}: lora_B {tuple(B.shape)} does not match lora_A {tuple(A.shape)}")
    return groups


def _lora_modules(
    groups: dict[str, dict[str, torch.Tensor]], scale_of: Callable[[str, int], float], dtype: torch.dtype
) -> tuple[dict[str, Delta], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Groups → (LowRank modules, extras (lora_B biases), DoRA magnitudes)."""
    modules: dict[str, Delta] = {}
    extras: dict[str, torch.Tensor] = {}
    mags: dict[str, torch.Tensor] = {}
    for mod, parts in groups.items():
        A, B = parts["A"].to(dtype), parts["B"].to(dtype)
        r = A.shape[0]
        if "alpha" in parts:  # diffusers / kohya-style per-module alpha
            scale = float(parts["alpha"]) / r
        else:
            scale = scale_of(mod, r)
        modules[mod] = LowRank(B.contiguous(), A.contiguous(), scale)
        if "bias" in parts:
            extras[mod + ".bias"] = parts["bias"].to(dtype) * scale
        if "magnitude" in parts:
            mags[mod] = parts["magnitude"].to(dtype)
    return modules, extras, mags


def _flux_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str], path: Path):
    """Any FLUX LoRA layout → (diffusers keys without prefix per component, alphas, config, label).

    Calls ``FluxPipeline.lora_state_dict`` (diffusers' own detection and converters).
    """
    from diffusers import FluxPipeline  # lazy: heavy

    keys = list(sd)
    label = _flux_format_label(keys)
    try:
        out, alphas = FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    except Exception as e:
        raise _unknown_layout(path, keys, f"diffusers' FLUX converter ({label}) failed: {type(e).__name__}: {str(e)[:160]}")
    out = dict(out)
    for k, v in (alphas or {}).items():
        out[k] = v
    added = bool(out) and not any(k.startswith(("transformer.", "text_encoder.")) for k in out)
    if added:
        out = {"transformer." + k: v for k, v in out.items()}  # older diffusers files: no prefix
    bad = [k for k in out if not k.startswith(("transformer.", "text_encoder."))]
    if bad:
        raise _unknown_layout(path, bad, "not a FLUX transformer/text-encoder key")
    config = None
    raw = meta.get("lora_adapter_metadata")
    if raw:
        try:
            full = json.loads(raw)
            config = {k.removeprefix("transformer."): v for k, v in full.items() if k.startswith("transformer.")} or full
        except json.JSONDecodeError:
            config = None
    return out, config, label, (lambda k: k.removeprefix("transformer.")) if added else (lambda k: k)


def _strip_component(groups: dict, prefix: str) -> dict:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in groups.items()}


def load_lora(
    path: Path, config: dict | None, *, name: str, base: str | None, allow_pickle: bool, dtype: torch.dtype
) -> TaskVector:
    """A LoRA file (any FLUX layout, or PEFT naming) → TaskVector. DoRA needs ``base``."""
    sd, meta = read_state_dict(path, allow_pickle=allow_pickle)
    if not sd:
        raise FormatError(f"{str(path)!r}: the file holds no tensors")
    keys = list(sd)
    if not any(m in k for k in keys for m in _LORA_MARKERS) and not any(".processor." in k for k in keys):
        raise _unknown_layout(path, keys, "no LoRA factor keys (lora_A/lora_B, lora_down/lora_up)")

    if config is not None or _is_peft_keys(keys):
        # PEFT naming: base_model.model.<module>.lora_A.weight (LLMs, or any PEFT-wrapped model)
        fmt = "peft"
        stripped = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
        groups = _group_lora(stripped, path)
        cfg = dict(config or {})
        scale_of = lambda mod, r: peft_scale(cfg, mod, r)  # noqa: E731
        family = "flux" if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in groups) else "llm"
        if family == "flux" and config is None:
            fmt = "peft"  # exported back as a PEFT folder
    else:
        out, cfg, fmt, display = _flux_state_dict(sd, meta, path)
        groups = _group_lora(out, path, display)
        groups = _strip_component(groups, "transformer.")
        cfg = cfg or {}
        family = "flux"
        if cfg:
            scale_of = lambda mod, r: peft_scale(cfg, mod, r)  # noqa: E731
        else:
            scale_of = lambda mod, r: 1.0  # noqa: E731  diffusers: no alpha → scale 1

    modules, extras, mags = _lora_modules(groups, scale_of, dtype)
    tv_meta = {
        "format": fmt,
        "family": family,
        "source": str(path),
        "config": cfg if fmt == "peft" else None,
        "base_model": guess_base_model(family, modules, cfg),
        "dora": bool(mags),
    }
    if mags:
        if base is None:
            raise FormatError(
                f"{str(path)!r}: DoRA adapter ({len(mags)} modules with lora_magnitude_vector): its delta depends on "
                f"the base weights; pass base=... / --base MODEL"
            )
        modules = dora_deltas(modules, mags, base, dtype=dtype, source=path)
    return TaskVector(name, modules, extras, tv_meta)


def guess_base_model(family: str, modules: dict[str, Delta], config: dict | None) -> str:
    """A human guess of the base model (from the adapter config, else from shapes)."""
    if config and config.get("base_model_name_or_path"):
        return str(config["base_model_name_or_path"])
    if family == "flux":
        q = modules.get("transformer_blocks.0.attn.to_q")
        dims = {d.shape[1] for m, d in modules.items() if m.endswith("attn.to_q")}
        if 3072 in dims or (q is not None and q.shape == (3072, 3072)):
            return "FLUX.1 (dev/schnell): hidden 3072"
        return f"FLUX-like transformer (hidden {sorted(dims)[0] if dims else '?'})"
    hid = {d.shape[1] for m, d in modules.items() if m.endswith("q_proj")}
    return f"LLM (hidden {sorted(hid)[0]})" if hid else "unknown"


# ---------------------------------------------------------------------------------------------
# 5. Full checkpoints: lazy, one tensor at a time
# ---------------------------------------------------------------------------------------------


class CheckpointReader:
    """Lazy reader of a safetensors checkpoint (one file, a sharded folder, or an index.json).

    ``keys()`` reads headers only; ``get(key)`` opens the shard that holds ``key`` and reads that
    one tensor (safetensors memory-maps; nothing else is materialised).
    """

    def __init__(self, path: Path, *, allow_pickle: bool = False):
        self.path = path
        self._where: dict[str, Path] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.reads: list[tuple[str, str]] = []  # (file, key) log, for tests and diagnostics
        files = self._files(path, allow_pickle)
        for f in files:
            if f.suffix.lower() in PICKLE_SUFFIXES:
                sd, _ = read_state_dict(f, allow_pickle=allow_pickle)
                self._pickled = {**(self._pickled or {}), **sd}
                self._where.update({k: f for k in sd})
            else:
                for k in safetensors_keys(f):
                    self._where[k] = f
        if not self._where:
            raise FormatError(f"{str(path)!r}: checkpoint holds no tensors")

    @staticmethod
    def _files(path: Path, allow_pickle: bool) -> list[Path]:
        if path.is_file() and path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            return sorted({path.parent / f for f in index.get("weight_map", {}).values()})
        if path.is_file():
            _check_pickle(path, allow_pickle)
            return [path]
        for n in _CKPT_INDEX_NAMES:
            if (path / n).exists():
                return CheckpointReader._files(path / n, allow_pickle)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        pick = sorted(p for s in PICKLE_SUFFIXES for p in path.glob("*" + s))
        if pick:
            for p in pick:
                _check_pickle(p, allow_pickle)
            return pick
        raise FormatError(f"{str(path)!r}: no safetensors weights found")

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        f = self._where[key]
        self.reads.append((str(f), key))
        if self._pickled is not None and key in self._pickled:
            return self._pickled[key]
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(key)
        except Exception as e:
            raise FormatError(f"{str(f)!r}: tensor {key!r} unreadable, file truncated or corrupt ({type(e).__name__})") from None


def _module_of(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def iter_checkpoint_deltas(
    finetuned: list[CheckpointReader], base: CheckpointReader, *, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, list[torch.Tensor | None]]]:
    """Stream deltas, one parameter at a time across all k fine-tuned checkpoints.

    For each parameter of the base, reads it once and the same key from each fine-tuned
    checkpoint, yields (key, [ft_i − base]), and drops them: memory holds one tensor × (k + 1).
    A fine-tuned checkpoint lacking the key gets None. Shapes must match (error names them).
    """
    for key in base.keys():
        w0 = base.get(key)
        if not torch.is_floating_point(w0):
            continue
        w0 = w0.to(dtype)
        out: list[torch.Tensor | None] = []
        for r in finetuned:
            if key not in r._where:
                out.append(None)
                continue
            w = r.get(key)
            if tuple(w.shape) != tuple(w0.shape):
                raise FormatError(
                    f"{str(r.path)!r}: parameter {key!r} has shape {tuple(w.shape)} but the base "
                    f"{str(base.path)!r} has {tuple(w0.shape)} (fine-tuned from a different base model?)"
                )
            out.append(w.to(dtype) - w0)
        del w0
        yield key, out


def load_checkpoint_deltas(
    sources: list[Path], base: str | os.PathLike, names: list[str], *, allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32, progress: Callable[[int, int, str], None] | None = None,
    compress: tuple[int | None, float | None] | None = None,
) -> list[TaskVector]:
    """Full fine-tuned checkpoints → task vectors (fine-tuned − base), streamed module by module.

    2-D ``*.weight`` parameters become ``Dense`` modules named by their module path; other
    floating parameters (biases, norms) go to ``extras``. Unchanged parameters are dropped.
    With ``compress=(rank, energy)`` each dense delta is cut by SVD to LoRA factors as soon as
    it is read (``export.to_lowrank``), so the pool holds factors, not dense deltas (big models;
    the residual beyond the cut is dropped, so unique parts are of the cut delta).

    Args:
        sources: the fine-tuned checkpoints (file, folder, or index.json), all of one base.
        base: the base checkpoint (path or Hub id).
        names: one name per source.
        compress: None (keep exact dense deltas) or (rank, energy) for the cut.
    Returns:
        One TaskVector per source.
    """
    base_reader = CheckpointReader(resolve_source(base), allow_pickle=allow_pickle)
    readers = [CheckpointReader(s, allow_pickle=allow_pickle) for s in sources]
    for r in readers:
        extra = [k for k in r.keys() if k not in base_reader._where]
        if extra:
            raise FormatError(
                f"{str(r.path)!r}: {len(extra)} parameters are not in the base {str(base_reader.path)!r}, e.g. {extra[:3]} "
                f"(fine-tuned from a different base model?)"
            )
    vecs = [TaskVector(n, {}, {}, {"format": "checkpoint", "source": str(s), "base": str(base)}) for n, s in zip(names, sources)]
    keys = base_reader.keys()
    for done, (key, deltas) in enumerate(iter_checkpoint_deltas(readers, base_reader, dtype=dtype), 1):
        for v, d in zip(vecs, deltas):
            if d is None or not torch.any(d):
                continue
            if d.ndim == 2 and key.endswith(".weight"):
                if compress is None:
                    v.modules[_module_of(key)] = Dense(d)
                else:
                    from .export import to_lowrank

                    lr = to_lowrank(Dense(d), rank=compress[0], energy=compress[1])
                    if lr is not None:
                        v.modules[_module_of(key)] = lr
                del d
            else:
                v.extras[key] = d
        if progress:
            progress(done, len(keys), "checkpoint")
    for v in vecs:
        family = "flux" if any(m.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in v.modules) else "llm"
        v.meta.update(family=family, base_model=str(base), dora=False)
    return vecs


# ---------------------------------------------------------------------------------------------
# 6. DoRA: dense deltas with PEFT's math
# ---------------------------------------------------------------------------------------------


def dora_delta(W0: torch.Tensor, lr: LowRank, magnitude: torch.Tensor) -> torch.Tensor:
    """The dense delta of one DoRA linear module, as PEFT merges it.

    PEFT (``tuners/lora/dora.py``, ``lora/layer.py`` merge): W' = (m / ‖W0 + s·BA‖_row) ⊙ (W0 + s·BA),
    with the norm over the input dim of each output row (``DoraLinearLayer.get_weight_norm``).

    Args:
        W0: base weight (n, m). lr: the LoRA factors with scale s. magnitude: m, (n,).
    Returns:
        ΔW = W' − W0, (n, m).
    """
    from peft.tuners.lora.dora import DoraLinearLayer

    W0 = W0.to(lr.B.dtype)
    lora_weight = lr.B @ lr.A  # (n, m)
    norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(W0, lora_weight.detach(), lr.scale)
    factor = (magnitude.to(W0.dtype) / norm).view(-1, 1)
    return factor * (W0 + lr.scale * lora_weight) - W0


def dora_deltas(
    modules: dict[str, Delta], mags: dict[str, torch.Tensor], base: str | os.PathLike, *, dtype: torch.dtype, source: Path
) -> dict[str, Delta]:
    """Replace each DoRA module's LowRank by its dense delta (base weights read one at a time)."""
    reader = CheckpointReader(resolve_source(base))
    out = dict(modules)
    for mod, mag in mags.items():
        key = next((k for k in (mod + ".weight", "model." + mod + ".weight") if k in reader._where), None)
        if key is None:
            raise FormatError(f"{str(source)!r}: DoRA module {mod!r} has no weight {mod + '.weight'!r} in the base {str(base)!r}")
        W0 = reader.get(key).to(dtype)
        lr = modules[mod]
        if tuple(W0.shape) != tuple(lr.shape):
            raise FormatError(
                f"{str(source)!r}: module {mod!r} has shape {tuple(lr.shape)} but the base {str(base)!r} has {tuple(W0.shape)}"
            )
        out[mod] = Dense(dora_delta(W0, lr, mag))
    return out


# ---------------------------------------------------------------------------------------------
# 7. The entry points
# ---------------------------------------------------------------------------------------------


def load_task_vector(
    source: str | os.PathLike,
    name: str | None = None,
    *,
    base: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    check_finite: bool = True,
) -> TaskVector:
    """Load one task vector from a file, a folder, or a Hub id.

    Accepts: diffusers FLUX LoRA safetensors (``transformer.``-prefixed or bare keys), every FLUX
    layout diffusers converts (kohya/sd-scripts, XLabs, fal-Kontext, ...), PEFT adapter folders
    (or their ``adapter_model.safetensors``), DoRA adapters (needs ``base``), and full fine-tuned
    checkpoints (safetensors file/folder/index.json; needs ``base``: delta = fine-tuned − base).

    Module names are normalised (see the module docstring): FLUX → diffusers transformer module
    paths (``"transformer_blocks.0.attn.to_q"``); LLM → model module paths
    (``"model.layers.0.self_attn.q_proj"``). Alpha/rank (rsLoRA: alpha/√r) is folded into
    ``LowRank.scale`` (kohya: into the factors, by diffusers' converter).

    Args:
        source: local path or Hub id (``owner/repo`` or ``owner/repo/file.safetensors``).
        name: the vector's name (default: from the file or folder name).
        base: base model weights (path or Hub id), needed for DoRA and full checkpoints.
        allow_pickle: allow .bin/.pt/.ckpt files, read with ``torch.load(weights_only=True)``.
        revision: Hub revision.
        dtype: dtype of the loaded factors / deltas.
        check_finite: raise on NaN/Inf (naming the module).
    Returns:
        The TaskVector; ``meta`` has format, family ("flux"/"llm"), source, base_model guess,
        config (PEFT), dora.
    Raises:
        FormatError (a ValueError) naming the source and the reason.
    """
    path = resolve_source(source, revision=revision)
    s = sniff(path)
    name = name or default_name(source, path)
    if s.kind == "lora":
        tv = load_lora(s.path, s.config, name=name, base=base, allow_pickle=allow_pickle, dtype=dtype)
    else:
        if base is None:
            keys = safetensors_keys(s.path) if s.path.suffix == ".safetensors" else []
            shown = f" (first keys: {', '.join(repr(k) for k in keys[:5])})" if keys else ""
            raise FormatError(
                f"{str(path)!r}: no LoRA keys, so it is read as a full checkpoint{shown}; its task vector is "
                f"fine-tuned − base: pass base=... / --base MODEL"
            )
        tv = load_checkpoint_deltas([s.path], base, [name], allow_pickle=allow_pickle, dtype=dtype)[0]
    tv.meta.setdefault("source", str(source))
    tv.meta["input"] = str(source)
    if not tv.modules:
        raise FormatError(f"{str(source)!r}: no modules with a nonzero delta")
    if check_finite:
        try:
            tv.check_finite()
        except ValueError as e:
            raise FormatError(f"{str(source)!r}: {e}") from None
    return tv


def load_pool(
    sources: list[str | os.PathLike],
    names: list[str] | None = None,
    *,
    base: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int, str], None] | None = None,
    compress: tuple[int | None, float | None] | None = None,
) -> list[TaskVector]:
    """Load several task vectors of one base: checks the pool is non-empty and free of duplicates.

    Full checkpoints are streamed together (one parameter × k in memory at a time); with
    ``compress=(rank, energy)`` their dense deltas are cut to LoRA factors as they are read.
    Names default to file/folder names, made unique with a numeric suffix.

    Returns:
        The vectors in the given order.
    """
    if not sources:
        raise FormatError("empty pool: give at least one input")
    paths = [resolve_source(s) for s in sources]
    seen: dict[str, str] = {}
    for s, p in zip(sources, paths):
        key = str(p.resolve())
        if key in seen:
            raise FormatError(f"{str(s)!r}: duplicate input (same file as {seen[key]!r})")
        seen[key] = str(s)
    if names is None:
        names = []
        for src, p in zip(sources, paths):
            n = default_name(src, p)
            k, cand = 2, n
            while cand in names:
                cand, k = f"{n}-{k}", k + 1
            names.append(cand)
    elif len(names) != len(sources) or len(set(names)) != len(names):
        raise FormatError(f"names must be unique, one per input; got {names}")
    sniffs = [sniff(p) for p in paths]
    vecs: list[TaskVector | None] = [None] * len(sources)
    ckpt = [i for i, s in enumerate(sniffs) if s.kind == "checkpoint"]
    if ckpt:
        if base is None:
            raise FormatError(f"{str(sources[ckpt[0]])!r}: a full checkpoint, not a LoRA; pass base=... / --base MODEL")
        loaded = load_checkpoint_deltas(
            [sniffs[i].path for i in ckpt], base, [names[i] for i in ckpt], allow_pickle=allow_pickle, dtype=dtype,
            progress=progress, compress=compress,
        )
        for i, v in zip(ckpt, loaded):
            v.meta["input"] = str(sources[i])
            vecs[i] = v
    for i, s in enumerate(sniffs):
        if vecs[i] is None:
            vecs[i] = load_task_vector(paths[i], names[i], base=base, allow_pickle=allow_pickle, dtype=dtype, check_finite=False)
            vecs[i].meta["input"] = str(sources[i])
        if progress:
            progress(i + 1, len(sniffs), "load")
    for v in vecs:
        if not v.modules:
            raise FormatError(f"{v.meta['input']!r}: no modules with a nonzero delta")
        try:
            v.check_finite()
        except ValueError as e:
            raise FormatError(f"{v.meta['input']!r}: {e}") from None
    check_same_base(vecs)
    _check_duplicate_content(vecs)
    return vecs


def check_same_base(vectors: list[TaskVector]) -> None:
    """Modules present in several vectors must have one shape; error names module and shapes."""
    first: dict[str, tuple[str, tuple]] = {}
    for v in vectors:
        for mod, d in v.modules.items():
            if mod in first and first[mod][1] != tuple(d.shape):
                other, shape = first[mod]
                raise FormatError(
                    f"{v.meta.get('input', v.name)!r}: module {mod!r} has shape {tuple(d.shape)} but {shape} in "
                    f"{other!r}: task vectors for different base models"
                )
            first.setdefault(mod, (v.meta.get("input", v.name), tuple(d.shape)))
    fams = {v.meta.get("family") for v in vectors} - {None}
    if len(fams) > 1:
        raise FormatError(f"the pool mixes model families {sorted(fams)}: task vectors for different base models")


def _check_duplicate_content(vectors: list[TaskVector]) -> None:
    from .cache import hash_task_vector

    seen: dict[str, str] = {}
    for v in vectors:
        h = hash_task_vector(v, include_name=False)
        if h in seen:
            raise FormatError(f"{v.meta.get('input', v.name)!r}: duplicate input (same content as {seen[h]!r})")
        seen[h] = v.meta.get("input", v.name)


def module_report(vectors: list[TaskVector]) -> dict[str, list[str]]:
    """Which vectors have which modules: module → names of the vectors that have it."""
    out: dict[str, list[str]] = {}
    for v in vectors:
        for mod in v.modules:
            out.setdefault(mod, []).append(v.name)
    return out
