"""A pool from the user's own files: uploads (``.safetensors``, ``.zip``, ``adapter_config.json``;
size-capped, never pickles) and Hub ids, checked and loaded into task vectors.

Dense deltas (DoRA, full fine-tunes) are cut to factors as they are read (``formats.cut_dense``):
at most ``DENSE_RANK`` directions holding ``DENSE_ENERGY`` of ‖ΔW‖²; the mixes then use rank-r
fused updates. Both are read at call time (``dense_cut``), so tests can change them here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
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


def _scrub(msg: str, path: Path, label: str) -> str:
    """``msg`` with the server's copy of an upload (``…/gradio/<hash>/x.safetensors``, an unpacked
    zip's folder) named by ``label``, the name the user uploaded it under."""
    for q in dict.fromkeys((path, path.resolve())):
        msg = msg.replace(str(q), label)
        for parent in q.parents:  # deepest first; never a bare "/tmp/"
            if len(parent.parts) > 2:
                msg = msg.replace(str(parent) + os.sep, "").replace(str(parent), label)
    return msg.removeprefix(f"{label!r}: ")  # the caller names it


def upload_sources(files: list[str], rejected: list[StudioError] | None = None) -> tuple[list[_Upload], list[Path]]:
    """Uploaded files → the task vectors they hold, and the zips unpacked for them.

    * ``x.safetensors``: one vector; an ``adapter_config.json`` uploaded with it gives its alpha
      (one config for the whole upload: several PEFT adapters need one zip each);
    * ``x.zip``: a zipped adapter / checkpoint folder, or several (this Studio's own export zip
      gives ``unique-<name>``, ``shared`` ...): one vector per folder inside.

    With a list ``rejected``, a file that cannot be used is left out and its StudioError (naming
    it and why, the cause chained) goes there, and the others go on; without one, it is raised.
    Two adapter_config.json files always raise (which file goes with which is not known).
    """
    def reject(msg: str, cause: Exception | None = None) -> None:
        err = StudioError(msg)
        err.__cause__ = cause
        if rejected is None:
            raise err
        rejected.append(err)

    paths = []
    for f in files:
        try:
            paths.append(check_upload(f))
        except StudioError as e:
            reject(str(e), e.__cause__)
    configs = [p for p in paths if p.suffix.lower() == ".json"]
    if len(configs) > 1:
        raise StudioError(
            f"{len(configs)} adapter_config.json uploads: one config can go with loose adapter files; "
            f"upload each adapter folder as a .zip instead"
        )
    config, bad_config = None, False
    if configs:
        try:
            config = formats.read_adapter_config(configs[0])
        except formats.FormatError as e:
            reject(f"upload adapter_config.json: {_scrub(str(e), configs[0], 'adapter_config.json')}", e)
            bad_config = True
    out: list[_Upload] = []
    zips: list[Path] = []
    for p in paths:
        if p.suffix.lower() == ".safetensors":
            if bad_config:  # read without its config, its scale would be wrong
                reject(f"{p.name!r}: left out with the adapter_config.json uploaded beside it, which could not be read")
                continue
            out.append(_Upload(p.name, _name_from(p.name), p, config))
        elif p.suffix.lower() == ".zip":
            try:
                found = formats.zip_vectors(p)
            except formats.FormatError as e:
                reject(f"could not read upload {p.name!r}: {_scrub(str(e), p, p.name)}", e)
                continue
            zips.append(p)
            out += [_Upload(f"{p.name}:{n}", _name_from(n), q) for n, q in found]
    if config is not None and not any(Path(f).suffix.lower() == ".safetensors" for f in files):
        raise StudioError("adapter_config.json was uploaded without a .safetensors adapter file to go with it")
    return out, zips


def custom_vectors(
    files: list[str], hub_ids: list[str], progress: Progress | None = None, base: str | None = None, backend: str = "llm",
    rejected: list[str] | None = None,
) -> list[TaskVector]:
    """Load uploads (``.safetensors``, ``.zip``, ``adapter_config.json``; size-capped) and Hub ids
    into one pool. DoRA adapters and full checkpoints take the tab's base model ``base`` (its
    loaded weights, see ``base_weights``) and are cut to factors as they are read (``dense_cut``).

    A batch keeps its good files: with a list ``rejected``, each file or Hub id that cannot be read
    is left out and named there with why (its upload name, never the server's temp path). When
    nothing could be read, or without a list and anything is bad, StudioError names every bad one.
    """
    bad: list[StudioError] = []
    hubs = [h.strip() for h in hub_ids if h.strip()]
    ups, zips = upload_sources(list(files), bad)
    try:
        n_files = len(ups)
        ups += [_Upload(h, _name_from(h), Path(h)) for h in hubs]
        if not ups and not bad:
            raise StudioError("the pool is empty: pick a preset, upload .safetensors LoRAs / zipped adapter folders or give Hub ids")
        if len(ups) > MAX_VECTORS:
            raise StudioError(f"{len(ups)} vectors: the Studio shows at most {MAX_VECTORS}; remove some")
        out = _load_all(ups, n_files, progress, base, backend, bad)
    finally:
        for z in zips:
            formats.forget_zip(z)  # tensors are read; the unpacked copy is not needed any more
    if bad and (rejected is None or not out):
        head = "could not read any upload or Hub id given" if not out else f"{len(bad)} of the uploads / Hub ids could not be read"
        if len(bad) == 1:
            raise bad[0]
        raise StudioError(f"{head}: " + "; ".join(map(str, bad))) from bad[0].__cause__
    if rejected is not None:
        rejected += map(str, bad)
    check_pool(out)
    return out


def _load_all(ups: list[_Upload], n_files: int, progress, base, backend, bad: list[StudioError]) -> list[TaskVector]:
    """Each upload (the first ``n_files``) and Hub id as a task vector; unreadable ones are named
    in ``bad`` and left out."""
    names: list[str] = []
    out = []
    weights = None

    def base_src():  # loaded only when a DoRA adapter or a checkpoint needs it
        nonlocal weights
        if weights is None:
            if not base or base == "synthetic":
                raise StudioError("DoRA adapters and full checkpoints need a base model; set the tab's base model first")
            weights = base_weights(backend, base)
        return weights

    for i, u in enumerate(ups):
        n, k = u.name, 2
        while n in names:
            n, k = f"{u.name}-{k}", k + 1
        hub = i >= n_files
        try:
            v = formats.load_task_vector(str(u.path), n, base=base_src, config=u.config, compress=dense_cut())
        except READ_ERRORS as e:
            reason = str(e).removeprefix(f"{u.label!r}: ") if hub else _scrub(str(e), u.path, u.label)
            err = StudioError(f"could not read {'Hub id' if hub else 'upload'} {u.label!r}: {reason}")
            err.__cause__ = e
            bad.append(err)
            continue
        names.append(n)
        v.meta["input"] = u.label
        out.append(v)
        if progress:
            progress(i + 1, len(ups), "load")
    return out


def skipped_notes(vectors: list[TaskVector]) -> list[str]:
    """One line per vector with parameters skipped for a shape mismatch (resized vocabulary), and
    per FLUX vector that also touches the text encoders."""
    notes = []
    for v in vectors:
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


