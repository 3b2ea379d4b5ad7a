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

A PEFT adapter keeps its alpha only in ``adapter_config.json``: a PEFT-named file without it
(and without per-module ``.alpha`` keys or this project's own export header) is refused, with
how to supply the config (the folder, a zip of it, ``config=`` / ``--config``, ``alpha=`` /
``--alpha``); it is never given a silent scale.

Dense deltas (DoRA adapters, full fine-tunes) can be cut to factors as they are read
(``compress=(rank, energy)``, ``cut_dense``: a seeded randomized SVD, one module at a time), so
a pool of 7B fine-tunes is held as factors, never as dense fp32 deltas. The base weights for
those deltas come from a checkpoint (path / Hub id) or from a model already in memory
(``ModuleWeights``: no second copy). Parameters whose shape differs between base and fine-tune
(a resized vocabulary) are skipped for that vector and listed in ``meta["skipped"]``.

Zipped folders (``.zip``) are unpacked safely (``extract_zip``: no absolute paths, no ``..``,
no links, size and member caps, pickled members refused) into a private temp folder.

Formats are detected and converted by diffusers (``FluxPipeline.lora_state_dict``) and PEFT
where they parse them; this file only sniffs which one to call and normalises the names.
Pickled files (.bin/.pt/.ckpt/.pth) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import zipfile
import zlib
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
        raise FormatError(f"{str(path)!r}: not a readable adapter_config.json ({type(e).__name__}: {str(e)[:200]})") from None
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


# ---------------------------------------------------------------------------------------------
# 0. Zipped folders, unpacked safely
# ---------------------------------------------------------------------------------------------

ZIP_MAX_MEMBERS = 2000
ZIP_KEEP_SUFFIXES = (".safetensors", ".json")  # everything else (README.md, .txt, ...) is left in the zip
_ZIP_DIRS: dict[tuple, Path] = {}  # (zip path, size, mtime) -> unpacked folder, removed at exit
_ZIP_LOCK = threading.Lock()


def zip_max_bytes() -> int:
    """Cap on the unpacked size of a zip: ``$DEVEC_MAX_UNZIP_MB`` (default 4096 MB)."""
    return int(float(os.environ.get("DEVEC_MAX_UNZIP_MB", "4096")) * 2**20)


def extract_zip(path: Path, dest: Path, *, max_bytes: int | None = None, max_members: int = ZIP_MAX_MEMBERS) -> Path:
    """Unpack the weights and configs of a zip into ``dest`` (which must be empty or absent).

    Safe by construction: every member name is checked (no absolute path, drive, ``..`` or
    backslash; no symlink or other special file; not encrypted) before anything is written; the
    declared sizes must sum to at most ``max_bytes`` and the bytes actually written are counted
    against the same cap (a lying header cannot grow a file); at most ``max_members`` entries.
    Only ``.safetensors`` and ``.json`` members are written; pickled weights are refused.

    Returns:
        ``dest``.
    Raises:
        FormatError naming the zip and the offending member.
    """
    max_bytes = zip_max_bytes() if max_bytes is None else max_bytes
    where = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FormatError(f"{where!r}: not a readable zip file ({type(e).__name__}: {e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise FormatError(f"{where!r}: {len(infos)} entries, more than the limit of {max_members}")
        keep, total = [], 0
        for info in infos:
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise FormatError(f"{where!r}: unsafe member name {name!r} (absolute path or '..'); refused")
            mode = (info.external_attr >> 16) & 0o170000
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise FormatError(f"{where!r}: member {name!r} is a link or special file; refused")
            if info.flag_bits & 0x1:
                raise FormatError(f"{where!r}: member {name!r} is encrypted; refused")
            if info.is_dir():
                continue
            low = name.lower()
            if low.endswith(PICKLE_SUFFIXES):
                raise FormatError(
                    f"{where!r}: member {name!r} is a pickled file ({Path(name).suffix}); unpickling can run code. "
                    f"Zip .safetensors weights instead"
                )
            if parts[0] == "__MACOSX" or parts[-1].startswith(".") or not low.endswith(ZIP_KEEP_SUFFIXES):
                continue
            total += info.file_size
            keep.append(info)
        if total > max_bytes:
            raise FormatError(f"{where!r}: {total / 2**20:.0f} MB unpacked, over the limit of {max_bytes / 2**20:.0f} MB")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        for info in keep:
            out = (dest / info.filename).resolve()
            if root not in out.parents:
                raise FormatError(f"{where!r}: member {info.filename!r} would be written outside the folder; refused")
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise FormatError(f"{where!r}: unpacks to more than {max_bytes / 2**20:.0f} MB; refused")
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                raise FormatError(f"{where!r}: member {info.filename!r} is corrupt ({type(e).__name__}: {e})") from None
    return dest


def _cleanup_zip_dirs() -> None:
    for d in list(_ZIP_DIRS.values()):
        shutil.rmtree(d, ignore_errors=True)
    _ZIP_DIRS.clear()


atexit.register(_cleanup_zip_dirs)


def unpacked_zip(path: Path) -> Path:
    """The folder a zip unpacks to (unpacked once per process and file version; removed at exit)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _ZIP_LOCK:
        d = _ZIP_DIRS.get(key)
        if d is not None and d.is_dir():
            return d
        tmp = Path(tempfile.mkdtemp(prefix="devec_zip_"))
        try:
            extract_zip(path, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _ZIP_DIRS[key] = tmp
        return tmp


def forget_zip(path: Path) -> None:
    """Remove the unpacked folder of a zip now (the Studio calls this once its vectors are read)."""
    with _ZIP_LOCK:
        for key in [k for k in _ZIP_DIRS if k[0] == str(Path(path).resolve())]:
            shutil.rmtree(_ZIP_DIRS.pop(key), ignore_errors=True)


def _is_vector_folder(d: Path) -> bool:
    names = {p.name for p in d.iterdir() if p.is_file()}
    return bool(names & ({"adapter_config.json"} | set(_LORA_FILE_NAMES) | set(_CKPT_INDEX_NAMES) | set(_CKPT_FILE_NAMES)))


def zip_vectors(path: Path) -> list[tuple[str, Path]]:
    """The task vectors inside a zip: (name, folder or file) for each adapter folder, checkpoint
    folder or lone LoRA file, named by its folder (the Studio's own export zip gives
    ``unique-<name>``, ``shared`` ...). A zip of one folder gives that folder.

    Raises:
        FormatError when the zip holds nothing loadable.
    """
    top = root = unpacked_zip(path)
    while True:  # descend through single wrapping folders (a zip of "my_adapter/")
        entries = [p for p in root.iterdir()]
        if len(entries) == 1 and entries[0].is_dir() and not _is_vector_folder(root):
            root = entries[0]
        else:
            break
    if _is_vector_folder(root):
        return [(root.name if root != top else _default_name(path), root)]
    out = []
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        if _is_vector_folder(d) and not any(_is_vector_folder(a) for a in d.parents if root in a.parents):
            out.append((d.name, d))
    for f in sorted(root.glob("*.safetensors")):
        out.append((_default_name(f), f))
    if not out:
        raise FormatError(f"{str(path)!r}: the zip holds no adapter folder, LoRA file or checkpoint (.safetensors)")
    return out


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


def _default_name(path: Path) -> str:
    p = path
    if p.is_file() and (p.name in _LORA_FILE_NAMES or p.name in _CKPT_FILE_NAMES):
        p = p.parent
    name = p.name
    for suf in (".safetensors", ".index.json", ".json", ".zip") + PICKLE_SUFFIXES:
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
    path: Path, config: dict | None, *, name: str, base, allow_pickle: bool, dtype: torch.dtype,
    alpha: float | None = None, compress: tuple[int | None, float | None] | None = None,
) -> TaskVector:
    """A LoRA file (any FLUX layout, or PEFT naming) → TaskVector. DoRA needs ``base``.

    A PEFT-named file needs its alpha: from ``config`` (adapter_config.json), per-module
    ``.alpha`` keys, this project's export header (scale folded in, alpha = r) or ``alpha``
    (one lora_alpha for every module); otherwise it is refused (``_no_alpha``).
    """
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
        if config is None and alpha is None and not any(k.endswith(".alpha") for k in keys):
            if "devec" not in meta:  # this project's exports fold the scale into B (alpha = r)
                raise _no_alpha(path)
        cfg = dict(config or {})
        if config is None and alpha is not None:
            if not math.isfinite(float(alpha)):
                raise FormatError(f"{str(path)!r}: alpha must be a finite number; got {alpha!r}")
            cfg = {"lora_alpha": float(alpha)}
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
        modules = dora_deltas(modules, mags, base, dtype=dtype, source=path, compress=compress)
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

    def __contains__(self, key: str) -> bool:
        return key in self._where

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


class ModuleWeights:
    """The weights of a model already in memory, as the base of DoRA / checkpoint deltas.

    Nothing is copied up front: ``get(key)`` copies one parameter (under ``lock``, from
    ``original(key)`` when given — the Studio passes the weight editor's saved originals, so a
    mix fused into the model for generation never leaks into a delta). The copy stays on the
    parameter's device, so on a GPU the delta and its SVD run there.

    Args:
        module: the model (``LlamaForCausalLM``, a FLUX transformer, ...); keys are its
            ``state_dict`` names (``model.layers.0.self_attn.q_proj.weight``).
        label: how messages name it (e.g. the base model id).
        original: key → the unedited tensor, or None when the parameter is unedited.
        lock: held while a parameter is copied (the backend's lock).
    """

    def __init__(self, module: torch.nn.Module, label: str, original: Callable[[str], torch.Tensor | None] | None = None, lock=None):
        self._params = module.state_dict(keep_vars=True)  # references, no copies
        self.path = label
        self._original = original
        self._lock = lock or threading.RLock()
        self.reads: list[tuple[str, str]] = []

    def keys(self) -> list[str]:
        return list(self._params)

    def __contains__(self, key: str) -> bool:
        return key in self._params

    def get(self, key: str) -> torch.Tensor:
        self.reads.append((str(self.path), key))
        with self._lock, torch.no_grad():
            t = self._original(key) if self._original is not None else None
            if t is None:
                t = self._params[key]
            return t.detach().clone()


def open_base(base) -> "CheckpointReader | ModuleWeights":
    """A weight source for ``base``: a path or Hub id (``CheckpointReader``, lazy), an object with
    ``keys()`` / ``get(key)`` / ``in`` (``ModuleWeights``), or a zero-argument callable that returns
    one of these (called only when a delta needs the base)."""
    if isinstance(base, (str, os.PathLike)):
        return CheckpointReader(resolve_source(base))
    if hasattr(base, "get") and hasattr(base, "keys"):
        return base
    if callable(base):
        return open_base(base())
    raise FormatError(f"base must be a path, a Hub id or loaded weights; got {type(base).__name__}")


# ---------------------------------------------------------------------------------------------
# 5b. Dense deltas → factors as they are read
# ---------------------------------------------------------------------------------------------

CUT_SEED = 0  # the randomized SVD is seeded: the same delta always gives the same factors (and content hash)
CUT_OVERSAMPLE = 8
CUT_POWER_ITERS = 2
CUT_START_RANK = 64  # energy-only cuts start here and double until the energy is reached


def randomized_svd(W: torch.Tensor, q: int, *, niter: int = CUT_POWER_ITERS, seed: int = CUT_SEED):
    """Top-q singular triplets of W (n, m) by a seeded randomized range finder (Halko, Martinsson
    & Tropp 2011, alg. 4.4 with QR-stabilised power iterations; what ``torch.svd_lowrank`` does,
    with its own generator so the result does not depend on the global RNG).

    Returns:
        U (n, q), S (q,), Vh (q, m), in W's dtype and device.
    """
    n, m = W.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    G = torch.randn(m, q, generator=g, dtype=W.dtype).to(W.device)  # (m, q)
    Q = torch.linalg.qr(W @ G).Q  # (n, q): an orthonormal basis of the sampled range
    for _ in range(niter):
        Q = torch.linalg.qr(W.mT @ Q).Q  # (m, q)
        Q = torch.linalg.qr(W @ Q).Q  # (n, q)
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)  # (q, q), (q,), (q, m)
    return Q @ Ub, S, Vh


def cut_dense(W: torch.Tensor, rank: int | None = None, energy: float | None = 0.9, *, start: int = CUT_START_RANK) -> LowRank | None:
    """A dense delta cut to LoRA factors (scale 1): the leading directions holding ``energy`` of
    ‖W‖_F², at most ``rank`` of them (both None: the numerical rank), by a randomized SVD.

    The same rule as ``algorithm.dense_basis`` (keep direction j while the energy before it is
    short of the target; drop singular values below max(n, m)·eps·σ_max). The energy is measured
    against the true ‖W‖_F², so when the sketch's leading values fall short of the target the
    sketch is doubled (up to ``rank``); once it would cover half of min(n, m) an exact SVD is used.

    Args:
        W: (n, m) delta, float32/float64 (any device; the factors stay there).
        rank: at most this many directions. energy: fraction in (0, 1].
    Returns:
        LowRank(B = U·S, A = Vh, 1.0), or None for an all-zero W.
    """
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1]; got {energy!r}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer; got {rank!r}")
    total = float(W.double().pow(2).sum())
    if total == 0.0:
        return None
    if not math.isfinite(total):
        raise ValueError("the delta contains NaN/Inf")
    if energy is not None and energy >= 1.0:
        energy = None  # everything: only the numerical-rank cut (the computed σ² need not sum to ‖W‖² exactly)
    n, m = W.shape
    p = min(n, m)
    cap = min(rank, p) if rank is not None else p
    q = cap if (rank is not None or energy is None) else min(start, p)  # no energy target: all of the cap at once
    while True:
        exact = q + CUT_OVERSAMPLE >= p // 2
        if exact:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        else:
            U, S, Vh = randomized_svd(W, q + CUT_OVERSAMPLE)
        S64 = S.double()
        keep = S64 > max(n, m) * torch.finfo(W.dtype).eps * S64[0]
        reached = True
        if energy is not None:
            before = torch.cumsum(S64**2, 0) - S64**2
            keep &= before < energy * total
            reached = float((S64[:q] ** 2).sum()) >= energy * total
        k = min(int(keep.sum()), cap)
        if exact or reached or q >= cap:
            break
        q = min(2 * q, cap)
    k = max(k, 1)
    return LowRank((U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), 1.0)


def _shape_skip(key: str, got, want) -> dict:
    return {"parameter": key, "shape": list(got), "base_shape": list(want)}


def iter_checkpoint_deltas(
    finetuned: list[CheckpointReader], base, *, dtype: torch.dtype = torch.float32,
    skipped: list[list[dict]] | None = None,
) -> Iterator[tuple[str, list[torch.Tensor | None]]]:
    """Stream deltas, one parameter at a time across all k fine-tuned checkpoints.

    For each parameter of the base, reads it once and the same key from each fine-tuned
    checkpoint, yields (key, [ft_i − base]), and drops them: memory holds one tensor × (k + 1).
    A fine-tuned checkpoint lacking the key gets None; so does one whose shape differs from the
    base's (a resized vocabulary): it is recorded in ``skipped[i]`` (parameter, both shapes).
    """
    for key in base.keys():
        w0 = base.get(key)
        if not torch.is_floating_point(w0):
            continue
        w0 = w0.to(dtype)
        out: list[torch.Tensor | None] = []
        for i, r in enumerate(finetuned):
            if key not in r:
                out.append(None)
                continue
            w = r.get(key)
            if tuple(w.shape) != tuple(w0.shape):
                if skipped is not None:
                    skipped[i].append(_shape_skip(key, w.shape, w0.shape))
                out.append(None)
                continue
            out.append(w.to(w0.device, dtype) - w0)
        del w0
        yield key, out


def _check_mostly_same_base(reader: CheckpointReader, skipped: list[dict], compared: int, base_label: str) -> None:
    """Skipping a resized embedding is fine; a checkpoint whose matrices mostly differ in shape
    is from another base model: an error naming it and the first shapes."""
    if skipped and len(skipped) * 2 > max(compared, 1):
        ex = ", ".join(f"{d['parameter']!r} {tuple(d['shape'])} vs {tuple(d['base_shape'])}" for d in skipped[:3])
        raise FormatError(
            f"{str(reader.path)!r}: {len(skipped)} of {compared} parameters differ in shape from the base "
            f"{base_label!r} (e.g. {ex}): fine-tuned from a different base model?"
        )


def load_checkpoint_deltas(
    sources: list[Path], base, names: list[str], *, allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32, progress: Callable[[int, int, str], None] | None = None,
    compress: tuple[int | None, float | None] | None = None,
) -> list[TaskVector]:
    """Full fine-tuned checkpoints → task vectors (fine-tuned − base), streamed module by module.

    2-D ``*.weight`` parameters become ``Dense`` modules named by their module path; other
    floating parameters (biases, norms) go to ``extras``. Unchanged parameters are dropped.
    Memory holds one base parameter and one delta at a time: for each parameter of the base, the
    fine-tunes are read one after another, each delta is formed, (cut,) stored and dropped.
    With ``compress=(rank, energy)`` each 2-D delta is cut to LoRA factors as soon as it is read
    (``cut_dense``, on the base weights' device), so the pool holds factors, not dense deltas
    (the residual beyond the cut is dropped, so unique parts are of the cut delta).
    Parameters whose shape differs from the base's are skipped for that vector and listed in
    its ``meta["skipped"]``; a checkpoint where most do is refused (another base model).

    Args:
        sources: the fine-tuned checkpoints (file, folder, or index.json), all of one base.
        base: the base (path or Hub id, ``ModuleWeights`` of a loaded model, or a callable
            returning one; see ``open_base``).
        names: one name per source.
        compress: None (keep exact dense deltas) or (rank, energy) for the cut.
    Returns:
        One TaskVector per source.
    """
    base_reader = open_base(base)
    base_label = str(base_reader.path)
    readers = [CheckpointReader(s, allow_pickle=allow_pickle) for s in sources]
    for r in readers:
        extra = [k for k in r.keys() if k not in base_reader]
        if extra:
            raise FormatError(
                f"{str(r.path)!r}: {len(extra)} parameters are not in the base {base_label!r}, e.g. {extra[:3]} "
                f"(fine-tuned from a different base model?)"
            )
    vecs = [TaskVector(n, {}, {}, {"format": "checkpoint", "source": str(s), "base": base_label}) for n, s in zip(names, sources)]
    skipped: list[list[dict]] = [[] for _ in readers]
    compared = [0] * len(readers)
    keys = base_reader.keys()
    for done, key in enumerate(keys, 1):
        w0 = None
        for i, (r, v) in enumerate(zip(readers, vecs)):
            if key not in r:
                continue
            w = r.get(key)
            if not torch.is_floating_point(w):
                continue
            if w0 is None:
                w0 = base_reader.get(key).to(dtype)
            compared[i] += 1
            if tuple(w.shape) != tuple(w0.shape):
                skipped[i].append(_shape_skip(key, w.shape, w0.shape))
                continue
            d = w.to(w0.device, dtype) - w0  # one delta, on the base's device
            del w
            if not torch.any(d):
                continue
            if d.ndim == 2 and key.endswith(".weight"):
                if compress is None:
                    v.modules[_module_of(key)] = Dense(d.cpu())
                else:
                    lr = cut_dense(d, rank=compress[0], energy=compress[1])
                    if lr is not None:
                        v.modules[_module_of(key)] = LowRank(lr.B.cpu(), lr.A.cpu(), 1.0)
            else:
                v.extras[key] = d.cpu()
            del d
        del w0
        if progress:
            progress(done, len(keys), "checkpoint")
    for r, v, sk, c in zip(readers, vecs, skipped, compared):
        _check_mostly_same_base(r, sk, c, base_label)
        family = "flux" if any(m.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in v.modules) else "llm"
        v.meta.update(family=family, base_model=base_label, dora=False, skipped=sk, compress=list(compress) if compress else None)
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
    lora_weight = lr.B.to(W0.device) @ lr.A.to(W0.device)  # (n, m)
    norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(W0, lora_weight.detach(), lr.scale)
    factor = (magnitude.to(W0.device, W0.dtype) / norm).view(-1, 1)
    return factor * (W0 + lr.scale * lora_weight) - W0


def dora_deltas(
    modules: dict[str, Delta], mags: dict[str, torch.Tensor], base, *, dtype: torch.dtype, source: Path,
    compress: tuple[int | None, float | None] | None = None,
) -> dict[str, Delta]:
    """Replace each DoRA module's LowRank by its dense delta (base weights read one at a time),
    cut to factors at once when ``compress=(rank, energy)`` is given (see ``cut_dense``).

    ``base``: a path / Hub id, loaded weights (``ModuleWeights``) or a callable (``open_base``).
    """
    if base is None:
        raise FormatError(
            f"{str(source)!r}: DoRA adapter ({len(mags)} modules with lora_magnitude_vector): its delta depends on "
            f"the base weights; pass base=... / --base MODEL"
        )
    reader = open_base(base)
    label = str(reader.path)
    out = dict(modules)
    for mod, mag in mags.items():
        key = next((k for k in (mod + ".weight", "model." + mod + ".weight") if k in reader), None)
        if key is None:
            raise FormatError(f"{str(source)!r}: DoRA module {mod!r} has no weight {mod + '.weight'!r} in the base {label!r}")
        W0 = reader.get(key).to(dtype)
        lr = modules[mod]
        if tuple(W0.shape) != tuple(lr.shape):
            raise FormatError(
                f"{str(source)!r}: module {mod!r} has shape {tuple(lr.shape)} but the base {label!r} has {tuple(W0.shape)}"
            )
        d = dora_delta(W0, lr, mag)
        del W0
        if compress is None:
            out[mod] = Dense(d.cpu())
        else:
            cut = cut_dense(d, rank=compress[0], energy=compress[1])
            if cut is None:
                del out[mod]
            else:
                out[mod] = LowRank(cut.B.cpu(), cut.A.cpu(), 1.0)
        del d
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
    alpha: float | None = None,
    config: dict | str | os.PathLike | None = None,
    compress: tuple[int | None, float | None] | None = None,
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
        base: base model weights, needed for DoRA and full checkpoints: a path or Hub id, the
            weights of a loaded model (``ModuleWeights``), or a callable returning one.
        allow_pickle: allow .bin/.pt/.ckpt files, read with ``torch.load(weights_only=True)``.
        revision: Hub revision.
        dtype: dtype of the loaded factors / deltas.
        check_finite: raise on NaN/Inf (naming the module).
        alpha: lora_alpha for a PEFT adapter that has no adapter_config.json (used only then).
        config: an adapter_config.json (dict or path) for a PEFT adapter that has none beside it.
        compress: (rank, energy): cut dense deltas (DoRA, checkpoints) to factors as they are read.
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
        cfg = s.config
        if cfg is None and config is not None:
            cfg = dict(config) if isinstance(config, dict) else read_adapter_config(Path(config))
        tv = load_lora(s.path, cfg, name=name, base=base, allow_pickle=allow_pickle, dtype=dtype, alpha=alpha, compress=compress)
    else:
        if base is None:
            keys = safetensors_keys(s.path) if s.path.suffix == ".safetensors" else []
            shown = f" (first keys: {', '.join(repr(k) for k in keys[:5])})" if keys else ""
            raise FormatError(
                f"{str(path)!r}: no LoRA keys, so it is read as a full checkpoint{shown}; its task vector is "
                f"fine-tuned − base: pass base=... / --base MODEL"
            )
        tv = load_checkpoint_deltas([s.path], base, [name], allow_pickle=allow_pickle, dtype=dtype, compress=compress)[0]
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
    alpha: float | None = None,
    config: dict | str | os.PathLike | None = None,
    check_contents: bool = True,
) -> list[TaskVector]:
    """Load several task vectors of one base: checks the pool is non-empty and free of duplicates.

    Full checkpoints are streamed together (one parameter and one delta in memory at a time);
    with ``compress=(rank, energy)`` dense deltas (checkpoints, DoRA) are cut to LoRA factors as
    they are read. Names default to file/folder names, made unique with a numeric suffix.
    ``alpha`` / ``config`` are used for PEFT adapters that carry no adapter_config.json.
    ``check_contents=False`` skips ``check_pool_contents`` (NaN/Inf, duplicate content: two passes
    over every tensor, most of a load's time) for inputs whose exact bytes and options already
    passed it — a cache hit keyed by the files' SHA-256 (``devec_core.cli``); run it before
    computing anything from them otherwise.

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
            vecs[i] = load_task_vector(paths[i], names[i], base=base, allow_pickle=allow_pickle, dtype=dtype, check_finite=False,
                                       alpha=alpha, config=config, compress=compress)
            vecs[i].meta["input"] = str(sources[i])
        if progress:
            progress(i + 1, len(sniffs), "load")
    for v in vecs:
        if not v.modules:
            raise FormatError(f"{v.meta['input']!r}: no modules with a nonzero delta")
    check_same_base(vecs)
    if check_contents:
        check_pool_contents(vecs)
    return vecs


def check_pool_contents(vecs: list[TaskVector]) -> None:
    """Every value finite, and no two vectors with the same content (FormatError naming the input)."""
    for v in vecs:
        try:
            v.check_finite()
        except ValueError as e:
            raise FormatError(f"{v.meta.get('input', v.name)!r}: {e}") from None
    _check_duplicate_content(vecs)


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
    from .hashing import hash_task_vector

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
