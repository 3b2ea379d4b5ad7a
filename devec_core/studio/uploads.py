"""A pool from the user's own files: uploads (``.safetensors``, ``.zip``, ``adapter_config.json``;
size-capped, never pickles) and Hub ids, checked and loaded into task vectors.

Dense deltas (DoRA, full fine-tunes) are cut to factors as they are read (``formats.cut_dense``):
at most ``DENSE_RANK`` directions holding ``DENSE_ENERGY`` of ‖ΔW‖²; the mixes then use rank-r
fused updates. Both are read at call time (``dense_cut``), so tests can change them here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import formats
from ..pool import Progress
from ..taskvec import TaskVector
from .bases import base_weights
from .session import MAX_VECTORS, READ_ERRORS, StudioError

MAX_UPLOAD_MB = float(os.environ.get("DEVEC_MAX_UPLOAD_MB", "1024"))
UPLOAD_SUFFIXES = (".safetensors", ".zip", ".json")  # weights, zipped folders, adapter_config.json; never pickles
# 64 keeps an 11-vector LLaMA-2-7B pool's factors near 7 GB in float32 (bench/bench_llama7b.py).
DENSE_RANK = int(os.environ.get("DEVEC_DENSE_RANK", "64"))
DENSE_ENERGY = float(os.environ.get("DEVEC_DENSE_ENERGY", "0.9"))


def dense_cut() -> tuple[int | None, float | None]:
    """(rank, energy) of the cut applied to dense deltas as they are read (``formats.cut_dense``)."""
    return (DENSE_RANK or None, DENSE_ENERGY)


def check_upload(path: str | Path, max_mb: float = MAX_UPLOAD_MB) -> Path:
    """Refuse anything but ``.safetensors``, ``.zip`` and ``adapter_config.json`` under the size cap
    (pickled files are never read, zips are unpacked safely by ``formats.extract_zip``)."""
    p = Path(path)
    if p.suffix.lower() not in UPLOAD_SUFFIXES:
        raise StudioError(
            f"{p.name!r}: only .safetensors files, zipped adapter folders (.zip) and adapter_config.json can be "
            f"uploaded (pickled .bin/.pt/.ckpt files are refused)"
        )
    if p.suffix.lower() == ".json" and p.name != "adapter_config.json":
        raise StudioError(f"{p.name!r}: the only .json upload understood is a PEFT adapter_config.json")
    if not p.is_file():
        raise StudioError(f"{p.name!r}: the upload did not arrive; try again")
    mb = p.stat().st_size / 2**20
    if mb > max_mb:
        raise StudioError(f"{p.name!r}: {mb:.0f} MB is over the upload limit of {max_mb:.0f} MB; give its Hub id instead")
    return p


def _name_from(path_or_id: str) -> str:
    stem = Path(path_or_id).name
    for suf in (".safetensors", ".zip"):
        stem = stem[: -len(suf)] if stem.endswith(suf) else stem
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem)[:40] or "vector"


@dataclass
class _Upload:
    label: str  # how messages name it (the uploaded file's name)
    name: str
    path: Path  # a file, or a folder inside an unpacked zip
    config: dict | None = None  # an adapter_config.json uploaded beside the file
    refused: list[str] = field(default_factory=list)  # the batch's files left out, with why (on its first upload)


def upload_sources(files: list[str]) -> tuple[list[_Upload], list[Path]]:
    """Uploaded files → the task vectors they hold, and the zips unpacked for them.

    * ``x.safetensors``: one vector; an ``adapter_config.json`` uploaded with it gives its alpha
      (one config for the whole upload: several PEFT adapters need one zip each);
    * ``x.zip``: a zipped adapter / checkpoint folder, or several (this Studio's own export zip
      gives ``unique-<name>``, ``shared`` ...): one vector per folder inside.
    """
    paths, refused = [], []
    for f in files:  # a bad file is named and left out; the good ones of the batch are kept
        try:
            paths.append(check_upload(f))
        except StudioError as e:
            refused.append(str(e))
    configs = [p for p in paths if p.suffix.lower() == ".json"]
    if len(configs) > 1:
        raise StudioError(
            f"{len(configs)} adapter_config.json uploads: one config can go with loose adapter files; "
            f"upload each adapter folder as a .zip instead"
        )
    try:
        config = formats.read_adapter_config(configs[0]) if configs else None
    except formats.FormatError as e:
        raise StudioError(f"upload adapter_config.json: {e}") from e
    out: list[_Upload] = []
    zips: list[Path] = []
    for p in paths:
        if p.suffix.lower() == ".safetensors":
            out.append(_Upload(p.name, _name_from(p.name), p, config))
        elif p.suffix.lower() == ".zip":
            zips.append(p)
            try:
                found = formats.zip_vectors(p)
            except formats.FormatError as e:
                refused.append(f"could not read upload {p.name!r}: {e}")
                continue
            out += [_Upload(f"{p.name}:{n}", _name_from(n), q) for n, q in found]
    if config is not None and not any(u.config is not None for u in out):
        raise StudioError("adapter_config.json was uploaded without a .safetensors adapter file to go with it")
    if refused and not out:
        raise StudioError(refused[0] if len(refused) == 1 else "none of the uploads could be read: " + "; ".join(refused))
    if refused:
        out[0].refused = refused
    return out, zips


def custom_vectors(
    files: list[str], hub_ids: list[str], progress: Progress | None = None, base: str | None = None, backend: str = "llm",
) -> list[TaskVector]:
    """Load uploads (``.safetensors``, ``.zip``, ``adapter_config.json``; size-capped) and Hub ids
    into one pool. DoRA adapters and full checkpoints take the tab's base model ``base`` (its
    loaded weights, see ``base_weights``) and are cut to factors as they are read (``dense_cut``)."""
    ups, zips = upload_sources(list(files))
    ups += [_Upload(h.strip(), _name_from(h.strip()), Path(h.strip())) for h in hub_ids if h.strip()]
    if not ups:
        raise StudioError("the pool is empty: pick a preset, upload .safetensors LoRAs / zipped adapter folders or give Hub ids")
    if len(ups) > MAX_VECTORS:
        raise StudioError(f"{len(ups)} vectors: the Studio shows at most {MAX_VECTORS}; remove some")
    names: list[str] = []
    out = []
    refused = [r for u in ups for r in u.refused]
    causes: list[BaseException] = []
    weights = None

    def base_src():  # loaded only when a DoRA adapter or a checkpoint needs it
        nonlocal weights
        if weights is None:
            if not base or base == "synthetic":
                raise StudioError("DoRA adapters and full checkpoints need a base model; set the tab's base model first")
            weights = base_weights(backend, base)
        return weights

    try:
        for i, u in enumerate(ups):
            n, k = u.name, 2
            while n in names:
                n, k = f"{u.name}-{k}", k + 1
            names.append(n)
            hub = i >= len(ups) - len([h for h in hub_ids if h.strip()])
            try:
                v = formats.load_task_vector(str(u.path), n, base=base_src, config=u.config, compress=dense_cut())
            except StudioError as e:
                refused.append(str(e))
                causes.append(e.__cause__ or e)
                names.pop()
                continue
            except READ_ERRORS as e:  # an unreadable file: named, left out, the batch goes on (a bug is raised)
                where = "Hub id" if hub else "upload"
                refused.append(f"could not read {where} {u.label!r}: {e}")
                causes.append(e)
                names.pop()
                continue
            v.meta["input"] = u.label
            out.append(v)
            if progress:
                progress(i + 1, len(ups), "load")
    finally:
        for z in zips:
            formats.forget_zip(z)  # tensors are read; the unpacked copy is not needed any more
    if not out:
        msg = refused[0] if len(refused) == 1 else "none of the inputs could be read: " + "; ".join(refused)
        raise StudioError(msg) from (causes[0] if causes else None)  # the first file's cause, chained
    if refused:
        out[0].meta["refused"] = refused  # the pool's note names what was left out (skipped_notes)
    check_pool(out)
    return out


def skipped_notes(vectors: list[TaskVector]) -> list[str]:
    """One line per vector with parameters skipped for a shape mismatch (resized vocabulary), and
    per FLUX vector that also touches the text encoders."""
    notes = []
    for v in vectors:
        for r in v.meta.get("refused") or []:
            notes.append(f"left out of the pool: {r}")
        te = [m for m in v.modules if m.startswith(("text_encoder.", "text_encoder_2."))]
        if te:
            notes.append(f"{v.name}: {len(te)} text-encoder module(s), applied to the text encoder(s) too (vanilla and DeVec)")
        sk = v.meta.get("skipped") or []
        if sk:
            ex = "; ".join(f"`{d['parameter']}` {tuple(d['shape'])} vs base {tuple(d['base_shape'])}" for d in sk[:3])
            notes.append(f"{v.name}: {len(sk)} parameter(s) skipped, shape differs from the base ({ex}{' …' if len(sk) > 3 else ''})")
    return notes


def check_pool(vectors: list[TaskVector]) -> None:
    if not vectors:
        raise StudioError("the pool is empty: add at least one task vector")
    try:
        formats.check_same_base(vectors)
    except ValueError as e:
        raise StudioError(f"{e}. Put only LoRAs of one base model in a pool.") from e


