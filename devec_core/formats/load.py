"""The entry points: one source → a TaskVector (``load_task_vector``), many → a checked pool (``load_pool``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..taskvec import TaskVector
from .checkpoint import load_checkpoint_deltas
from .common import FormatError, read_adapter_config
from .files import default_name, resolve_source, safetensors_keys, sniff
from .lora import load_lora


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
            raise FormatError(f"{str(source)!r}: {e}") from e
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
            raise FormatError(f"{v.meta.get('input', v.name)!r}: {e}") from e
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
    seen: dict[str, str] = {}
    for v in vectors:
        h = v.digest(include_name=False)
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
