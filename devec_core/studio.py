"""The Studio's logic, free of any UI: pools, cached decompositions, mixes, generation, export.

``app.py`` is layout and wiring only; every decision lives here so it can be tested without a
browser. The flow for one user:

  1. ``open_preset`` / ``open_custom`` load a pool of task vectors and decompose it once
     (``decompose_cached``: in-process LRU keyed by the pool's content hash and the config).
  2. ``at_tau`` re-thresholds the kept spectrum (``Decomposition.with_tau``: no SVD).
  3. ``describe`` says what is shared at this τ — and says plainly when nothing is, so DeVec
     equals vanilla task arithmetic — and ``plots`` draws it.
  4. ``vanilla_terms`` / ``devec_terms`` turn the sliders' coefficients into two mixes;
     ``generate_llm`` / ``generate_flux`` render both with the same seed, side by side.
  5. ``export_parts`` writes the unique / shared parts as LoRA files to download;
     ``download_mix`` writes the two mixes on screen as one LoRA each, settings in the metadata.

Per-user choices live in a ``Session`` (kept by the UI in ``gr.State``); shared things (loaded
pools, decompositions, base models) live in process-wide caches keyed by content, guarded by
locks. Errors the user can fix are ``StudioError`` with what to do; the UI shows them as-is.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .chance import pool_chance
from .pool import Decomposition, decompose
from .presets import Preset, get_preset, list_presets
from .taskvec import Delta, Dense, LowRank, TaskVector

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_VECTORS = 12  # sliders the UI lays out (the paper's pool: 10 references + a target); larger pools are refused
MAX_UPLOAD_MB = float(os.environ.get("DEVEC_MAX_UPLOAD_MB", "1024"))
UPLOAD_SUFFIXES = (".safetensors", ".zip", ".json")  # weights, zipped folders, adapter_config.json; never pickles
# Dense deltas (DoRA, full fine-tunes) are cut to factors as they are read (formats.cut_dense): at most
# DENSE_RANK directions holding DENSE_ENERGY of ‖ΔW‖²; the mixes then use rank-r fused updates.
# 64 keeps an 11-vector LLaMA-2-7B pool's factors near 7 GB in float32 (bench/bench_llama7b.py).
DENSE_RANK = int(os.environ.get("DEVEC_DENSE_RANK", "64"))
DENSE_ENERGY = float(os.environ.get("DEVEC_DENSE_ENERGY", "0.9"))
MODES = ("joint", "pairwise", "isolate")
Progress = Callable[[int, int, str], None]
log = logging.getLogger("devec.studio")


class StudioError(Exception):
    """A problem the user can fix; the message says what happened and what to do."""


# ---------------------------------------------------------------------------------------------
# 1. Sessions: one user's choices (small, copyable; the UI keeps it in gr.State)
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    """One user's pool and settings. Heavy objects stay in the process caches, found by key."""

    backend: str  # "llm" | "flux"
    pool_key: str  # content hash of the pool (cache key)
    names: list[str]
    base: str  # "smollm2", a Hub id, or "synthetic"
    title: str = ""
    preset_id: str | None = None
    synthetic: bool = False
    needs_gpu: bool = False
    mode: str = "joint"
    target: str | None = None
    references: tuple[str, ...] | None = None  # isolate: None = every other vector
    tau: float = 0.85
    strengths: dict[str, float] = field(default_factory=dict)
    triggers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    description: str = ""
    scores: tuple[str, ...] = ()  # LLM: scores shown per output ("toxicity", "offensive", "title", "capitals")
    start: dict | None = None  # a preset's opening sliders: {"mode", "target", "vanilla", "unique", "shared"}
    # how to load the pool again in a process that does not hold it (a ZeroGPU worker, or after
    # the LRU dropped it): ("preset", id) or ("custom", files, hub_ids, preset_id); plain strings
    source: tuple | None = None

    def key(self) -> tuple:
        iso = self.mode == "isolate"
        return (self.pool_key, self.mode, self.target if iso else None, self.references if iso else None)

    def effective_references(self) -> tuple[str, ...] | None:
        """isolate: the references that take part (None = every vector but the target)."""
        if self.mode != "isolate" or self.references is None:
            return None
        refs = tuple(r for r in self.references if r in self.names and r != self.target)
        return refs or None


@dataclass
class Coefficients:
    """The sliders: vanilla λ per vector, DeVec λ per vector's unique part, λ of the shared part."""

    vanilla: dict[str, float]
    unique: dict[str, float]
    shared: float = 0.0
    pairs: dict[str, float] | None = None  # pairwise: "a+b" -> λ of that pair's shared vector (None: all λˢ)
    left: str = "task_arithmetic"  # the left side's merge method (devec_core.merge.studio_mix.LEFT_METHODS)
    density: float | None = None  # TIES / DARE density on the left (None: the method's default)

    @classmethod
    def from_lists(cls, names: list[str], vanilla: list[float], unique: list[float], shared: float) -> "Coefficients":
        """Build from slider values in pool order (extra slider values beyond the pool are ignored)."""
        for label, vals in (("vanilla", vanilla), ("unique", unique)):
            if len(vals) < len(names):
                raise StudioError(f"{label} coefficients: got {len(vals)} values for a pool of {len(names)}")
        c = cls({n: float(v) for n, v in zip(names, vanilla)}, {n: float(v) for n, v in zip(names, unique)}, float(shared))
        for n, v in [*c.vanilla.items(), *c.unique.items(), ("shared", c.shared)]:
            if not math.isfinite(v):
                raise StudioError(f"coefficient of {n!r} is {v}; use a finite number")
        return c


def default_coefficients(session: Session) -> Coefficients:
    """Defaults per mode (docs/METHOD.md "Recomposition").

    joint/pairwise (style mixing): every vector at its usual strength, shared part 0.
    isolate (behaviour removal): the target at −strength, references 0; DeVec negates only the
    target's unique part.
    A preset's own opening values (``Preset.coefficients``) win while its mode and target are kept.
    """
    st = session.start
    if st and st.get("mode") == session.mode and (session.mode != "isolate" or st.get("target") == session.target):
        return Coefficients(
            {n: float(st["vanilla"].get(n, 0.0)) for n in session.names},
            {n: float(st["unique"].get(n, 0.0)) for n in session.names},
            float(st.get("shared", 0.0)),
        )
    s = {n: session.strengths.get(n, 1.0) for n in session.names}
    if session.mode == "isolate" and session.target in s:
        van = {n: (-s[n] if n == session.target else 0.0) for n in session.names}
        return Coefficients(van, dict(van), 0.0)
    return Coefficients(dict(s), dict(s), 0.0)


# ---------------------------------------------------------------------------------------------
# 2. Pools: presets, uploads, Hub ids, the synthetic FLUX-shaped pool
# ---------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_POOLS: "OrderedDict[str, list[TaskVector]]" = OrderedDict()  # pool_key -> vectors
_DECOMPS: "OrderedDict[tuple, Decomposition]" = OrderedDict()  # Session.key() -> decomposition
_PRESET_POOLS: dict[str, str] = {}  # preset id -> pool key (presets are loaded once)
_MAX_POOLS, _MAX_DECOMPS = 4, 8


def _lru_put(cache: OrderedDict, key, value, cap: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > cap:
        cache.popitem(last=False)


def pool_key(vectors: list[TaskVector]) -> str:
    """Content hash of a pool in order (names included): the key of every cache."""
    from .cache import hash_task_vector

    h = hashlib.sha256()
    for v in vectors:
        h.update(hash_task_vector(v, include_name=True).encode())
    return h.hexdigest()[:20]


def remember_pool(vectors: list[TaskVector]) -> str:
    """Keep a pool in the process cache and return its key."""
    key = pool_key(vectors)
    with _LOCK:
        _lru_put(_POOLS, key, vectors, _MAX_POOLS)
    return key


def get_pool(key: str) -> list[TaskVector]:
    with _LOCK:
        if key not in _POOLS:
            raise StudioError("this pool is no longer in memory (the server restarted or many pools were opened): load it again")
        _POOLS.move_to_end(key)
        return _POOLS[key]


def session_pool(session: "Session", progress: Progress | None = None) -> list[TaskVector]:
    """The session's pool: from the process cache, else loaded again from ``session.source``
    (same files, same content hash) — so a worker process or an evicted pool still works."""
    try:
        return get_pool(session.pool_key)
    except StudioError:
        if not session.source:
            raise
    kind, *args = session.source
    if kind == "preset":
        vectors = preset_vectors(get_preset(args[0]), progress)
    elif kind == "custom":
        vectors, _ = _custom_pool(*args, progress=progress, base=session.base, backend=session.backend)
    else:
        raise StudioError(f"unknown pool source {kind!r}: load the pool again")
    if pool_key(vectors) != session.pool_key:
        raise StudioError("the pool's files changed since it was loaded: load it again")
    remember_pool(vectors)
    return vectors


# --- the synthetic FLUX-shaped pool ----------------------------------------------------------

SYNTH_STYLES = ("flat-anime", "ghibli", "anime", "bw-1930s", "pixel-art")
SYNTH_ANIME = ("flat-anime", "ghibli", "anime")


def flux_module_shapes(hidden: int = 128, n_double: int = 19, n_single: int = 38) -> dict[str, tuple[int, int]]:
    """FLUX transformer Linear modules (diffusers paths) → (out, in) at a given hidden width.

    At hidden=3072 these are FLUX.1's real shapes for the attention and MLP layers; the
    synthetic pool uses a reduced width so it builds and decomposes in a second on a CPU.
    """
    d, f = hidden, 4 * hidden
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(n_double):
        p = f"transformer_blocks.{i}."
        for leaf in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"):
            shapes[p + leaf] = (d, d)
        shapes[p + "ff.net.0.proj"], shapes[p + "ff.net.2"] = (f, d), (d, f)
        shapes[p + "ff_context.net.0.proj"], shapes[p + "ff_context.net.2"] = (f, d), (d, f)
    for i in range(n_single):
        p = f"single_transformer_blocks.{i}."
        for leaf in ("attn.to_q", "attn.to_k", "attn.to_v"):
            shapes[p + leaf] = (d, d)
        shapes[p + "proj_mlp"], shapes[p + "proj_out"] = (f, d), (d, d + f)
    return shapes


def synthetic_flux_pool(
    names: tuple[str, ...] = SYNTH_STYLES, rank: int = 8, hidden: int = 128, blocks: tuple[int, int] = (19, 38), seed: int = 0
) -> list[TaskVector]:
    """A deterministic SYNTHETIC pool of rank-``rank`` LoRAs on FLUX's module layout.

    Planted structure, per module: 3 directions common to all vectors and 2 more common to the
    anime-like ones (``SYNTH_ANIME``); each vector's copy of a planted direction is tilted by a
    random amount that grows with depth (so deep blocks fall below τ first); the remaining
    columns are the vector's own random directions.

    Returns:
        TaskVectors with ``meta["synthetic"] = True``.
    """
    if rank < 6:
        raise ValueError(f"synthetic pool: rank must be >= 6 (5 planted directions + 1 own); got {rank}")
    g = torch.Generator().manual_seed(seed)
    shapes = flux_module_shapes(hidden, *blocks)
    mods: dict[str, dict[str, Delta]] = {n: {} for n in names}
    for k, (mod, (n, m)) in enumerate(shapes.items()):
        depth = k / max(1, len(shapes) - 1)
        Z = torch.linalg.qr(torch.randn(n, 5, generator=g))[0]  # (n, 5): 3 common + 2 anime
        tilt = 0.05 + 0.45 * depth * float(torch.rand(1, generator=g))  # tan of the tilt angle
        for name in names:
            planted = Z[:, :5] if name in SYNTH_ANIME else Z[:, :3]
            noise = torch.randn(n, planted.shape[1], generator=g) / math.sqrt(n)
            own = torch.randn(n, rank - planted.shape[1], generator=g) / math.sqrt(n)
            B = torch.cat([planted + tilt * noise, own], 1) * 0.05  # (n, r)
            A = torch.randn(rank, m, generator=g) / math.sqrt(m)  # (r, m)
            mods[name][mod] = LowRank(B.contiguous(), A.contiguous(), 1.0)
    return [TaskVector(n, mods[n], meta={"synthetic": True, "family": "flux", "source": f"synthetic:flux/{n}"}) for n in names]


# --- loading ----------------------------------------------------------------------------------


def _load_spec_vector(source: str, name: str, weight_name: str | None, base: str | None = None, offline: bool = False) -> TaskVector:
    """One task vector from a preset's source (local path relative to the repo, or a Hub id).

    An offline preset never reaches for the Hub: a missing local file is an error at once.
    """
    from .formats import load_task_vector

    if source.startswith("demo:"):  # a child of the SmolLM2 demo pool: S + child, exactly
        from .toxicity import load_demo_pool

        folder, _, child = source[len("demo:") :].rpartition("/")
        try:
            pool = load_demo_pool(REPO_ROOT / folder)
        except (OSError, ValueError) as e:
            raise StudioError(f"could not read the demo pool {folder!r}: {e}") from None
        if child not in pool:
            raise StudioError(f"the demo pool {folder!r} has no vector {child!r}; it has {list(pool)}")
        v = pool[child]
        v.name = name
        return v
    local = (REPO_ROOT / source) if not Path(source).is_absolute() else Path(source)
    if local.exists():
        src = local / weight_name if weight_name and local.is_dir() else local
        try:
            return load_task_vector(src, name, base=base, compress=dense_cut())
        except ValueError as e:
            raise StudioError(f"could not read {name!r} from {str(src)!r}: {e}") from None
    if offline:
        raise StudioError(f"the offline preset's vector {name!r} is missing: {str(local)!r} does not exist (incomplete checkout?)")
    hub = f"{source}/{weight_name}" if weight_name else source
    try:
        return load_task_vector(hub, name, base=base, compress=dense_cut())
    except Exception as e:  # network, gated repo, missing file: say what is needed
        raise StudioError(
            f"could not load {name!r} from {hub!r}: {e}. This preset needs the Hugging Face Hub "
            f"(and HF_TOKEN for gated models); the offline presets work without it."
        ) from None


def preset_vectors(preset: Preset, progress: Progress | None = None) -> list[TaskVector]:
    """Load every vector of a preset (synthetic ones are generated)."""
    if preset.synthetic:
        names = tuple(v.name for v in preset.vectors)
        return synthetic_flux_pool(names)
    base = None if preset.base.id in ("smollm2", "synthetic") else preset.base.id
    out: list[TaskVector | None] = [None] * len(preset.vectors)
    ckpts = [] if preset.offline or base is None else _checkpoint_specs(preset)
    if ckpts:  # full fine-tunes: streamed together, the base read once, each delta cut as it is read
        from .formats import load_checkpoint_deltas

        try:
            loaded = load_checkpoint_deltas([p for _, p in ckpts], base, [preset.vectors[i].name for i, _ in ckpts],
                                            compress=dense_cut(), progress=progress)
        except Exception as e:
            raise StudioError(f"could not load the preset's fine-tuned checkpoints against {base!r}: {e}") from None
        for (i, _), v in zip(ckpts, loaded):
            v.meta["input"] = preset.vectors[i].source
            out[i] = v
    for i, spec in enumerate(preset.vectors):
        if out[i] is None:
            out[i] = _load_spec_vector(spec.source, spec.name, spec.weight_name, base, offline=preset.offline)
        if progress:
            progress(i + 1, len(preset.vectors), "load")
    return out


def _checkpoint_specs(preset: Preset) -> list[tuple[int, Path]]:
    """(position, local path) of the preset's vectors that are full checkpoints on the Hub."""
    from .formats import resolve_source, sniff

    found = []
    for i, spec in enumerate(preset.vectors):
        if spec.source.startswith(("demo:", "synthetic:")) or (REPO_ROOT / spec.source).exists():
            continue
        try:
            path = resolve_source(f"{spec.source}/{spec.weight_name}" if spec.weight_name else spec.source)
            if sniff(path).kind == "checkpoint":
                found.append((i, path))
        except Exception:  # noqa: BLE001 - _load_spec_vector reports it with what is needed
            continue
    return found


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


def upload_sources(files: list[str]) -> tuple[list[_Upload], list[Path]]:
    """Uploaded files → the task vectors they hold, and the zips unpacked for them.

    * ``x.safetensors``: one vector; an ``adapter_config.json`` uploaded with it gives its alpha
      (one config for the whole upload: several PEFT adapters need one zip each);
    * ``x.zip``: a zipped adapter / checkpoint folder, or several (this Studio's own export zip
      gives ``unique-<name>``, ``shared`` ...): one vector per folder inside.
    """
    from .formats import FormatError, read_adapter_config, zip_vectors

    paths = [check_upload(f) for f in files]
    configs = [p for p in paths if p.suffix.lower() == ".json"]
    if len(configs) > 1:
        raise StudioError(
            f"{len(configs)} adapter_config.json uploads: one config can go with loose adapter files; "
            f"upload each adapter folder as a .zip instead"
        )
    try:
        config = read_adapter_config(configs[0]) if configs else None
    except FormatError as e:
        raise StudioError(f"upload adapter_config.json: {e}") from None
    out: list[_Upload] = []
    zips: list[Path] = []
    for p in paths:
        if p.suffix.lower() == ".safetensors":
            out.append(_Upload(p.name, _name_from(p.name), p, config))
        elif p.suffix.lower() == ".zip":
            zips.append(p)
            try:
                found = zip_vectors(p)
            except FormatError as e:
                raise StudioError(f"could not read upload {p.name!r}: {e}") from None
            out += [_Upload(f"{p.name}:{n}", _name_from(n), q) for n, q in found]
    if config is not None and not any(u.config is not None for u in out):
        raise StudioError("adapter_config.json was uploaded without a .safetensors adapter file to go with it")
    return out, zips


def base_weights(backend: str, base: str):
    """The tab's base model weights, for DoRA adapters and full checkpoints: the model already
    loaded for generation (``get_llm_backend`` / ``get_flux_backend``), read one parameter at a
    time through ``formats.ModuleWeights`` — never a second copy. A mix fused for generation is
    invisible here: each parameter is read from the weight editor's saved original."""
    from .formats import ModuleWeights

    be = get_llm_backend(base) if backend == "llm" else get_flux_backend(base)
    root = be.model if backend == "llm" else be.pipe.transformer
    editor = be.editor

    def original(key: str):
        return editor._orig.get(key)  # the unedited tensor when a mix is fused into it, else None

    return ModuleWeights(root, base, original=original, lock=be.lock)


def custom_vectors(
    files: list[str], hub_ids: list[str], progress: Progress | None = None, base: str | None = None, backend: str = "llm",
) -> list[TaskVector]:
    """Load uploads (``.safetensors``, ``.zip``, ``adapter_config.json``; size-capped) and Hub ids
    into one pool. DoRA adapters and full checkpoints take the tab's base model ``base`` (its
    loaded weights, see ``base_weights``) and are cut to factors as they are read (``dense_cut``)."""
    from .formats import forget_zip, load_task_vector

    ups, zips = upload_sources(list(files))
    ups += [_Upload(h.strip(), _name_from(h.strip()), Path(h.strip())) for h in hub_ids if h.strip()]
    if not ups:
        raise StudioError("the pool is empty: pick a preset, upload .safetensors LoRAs / zipped adapter folders or give Hub ids")
    if len(ups) > MAX_VECTORS:
        raise StudioError(f"{len(ups)} vectors: the Studio shows at most {MAX_VECTORS}; remove some")
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

    try:
        for i, u in enumerate(ups):
            n, k = u.name, 2
            while n in names:
                n, k = f"{u.name}-{k}", k + 1
            names.append(n)
            hub = i >= len(ups) - len([h for h in hub_ids if h.strip()])
            try:
                v = load_task_vector(str(u.path), n, base=base_src, config=u.config, compress=dense_cut())
            except StudioError:
                raise
            except Exception as e:
                where = "Hub id" if hub else "upload"
                raise StudioError(f"could not read {where} {u.label!r}: {e}") from None
            v.meta["input"] = u.label
            out.append(v)
            if progress:
                progress(i + 1, len(ups), "load")
    finally:
        for z in zips:
            forget_zip(z)  # tensors are read; the unpacked copy is not needed any more
    _check_pool(out)
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


def _check_pool(vectors: list[TaskVector]) -> None:
    from .formats import check_same_base

    if not vectors:
        raise StudioError("the pool is empty: add at least one task vector")
    try:
        check_same_base(vectors)
    except ValueError as e:
        raise StudioError(f"{e}. Put only LoRAs of one base model in a pool.") from None


# ---------------------------------------------------------------------------------------------
# 3. Decomposition: once per (pool, mode, target), then τ is cheap
# ---------------------------------------------------------------------------------------------


def _disk_cache():
    """The on-disk decomposition cache (``devec_core.cache``), or None when disabled
    (``DEVEC_STUDIO_DISK_CACHE=0``) or unavailable."""
    if os.environ.get("DEVEC_STUDIO_DISK_CACHE", "1") != "1":
        return None
    try:
        from .cache import DecompositionCache

        return DecompositionCache()
    except Exception as e:  # noqa: BLE001
        log.warning("decomposition cache unavailable (%s)", e)
        return None


def _device_option() -> dict:
    """{"device": "cpu"} on ZeroGPU (the main process has no GPU; ``spaces`` only emulates one),
    else {} (Config's "auto"): see ``devec_core.hosting.decomposition_device``."""
    from .hosting import decomposition_device

    dev = decomposition_device()
    return {} if dev == "auto" else {"device": dev}


def decompose_cached(session: Session, progress: Progress | None = None) -> Decomposition:
    """The session's decomposition at its τ; computed once per (pool, mode, target)."""
    key = session.key()
    with _LOCK:
        dec = _DECOMPS.get(key)
        if dec is not None:
            _DECOMPS.move_to_end(key)
    if dec is None:
        vectors = session_pool(session, progress)
        if session.mode == "isolate" and session.target not in session.names:
            raise StudioError(f"isolate mode needs a target: pick one of {session.names}")
        if session.mode not in MODES:
            raise StudioError(f"unknown mode {session.mode!r}; pick one of {MODES}")
        if session.mode != "joint" and len(vectors) < 2:
            raise StudioError(f"{session.mode} mode needs at least two vectors; this pool has {len(vectors)}")
        target = session.target if session.mode == "isolate" else None
        refs = session.effective_references()
        disk, key_d = _disk_cache(), None
        if disk is not None:
            try:  # a broken or stale cache entry must never stop the app: recompute instead
                from .pool import Config

                key_d = disk.key_for_vectors(vectors, Config(mode=session.mode, target=target, references=refs, **_device_option()))
                dec = disk.get(key_d, 0.85, vectors)
            except Exception as e:  # noqa: BLE001
                log.warning("decomposition cache read failed (%s); recomputing", e)
        if dec is None:
            try:
                dec = decompose(vectors, tau=0.85, mode=session.mode, target=target, references=refs, progress=progress, **_device_option())
            except ValueError as e:
                raise StudioError(f"decomposition failed: {e}") from None
            if disk is not None and key_d is not None:
                try:
                    disk.put(key_d, dec)
                except Exception as e:  # noqa: BLE001
                    log.warning("decomposition cache write failed (%s)", e)
        with _LOCK:
            _lru_put(_DECOMPS, key, dec, _MAX_DECOMPS)
    return at_tau(dec, session.tau)


def check_tau(tau) -> float:
    """τ from the UI: a number in (0, 1]; τ = 0 would call every direction shared."""
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise StudioError(f"τ must be a number in (0, 1]; got {tau!r}") from None
    if not (0.0 < t <= 1.0) or not math.isfinite(t):
        raise StudioError(f"τ must be in (0, 1] (0.85 is the paper's value); got {t}")
    return t


def at_tau(dec: Decomposition, tau: float) -> Decomposition:
    """Re-threshold (no SVD): ``Decomposition.with_tau``."""
    t = check_tau(tau)
    return dec if abs(dec.tau - t) < 1e-12 else dec.with_tau(t)


def _start(vectors: list[TaskVector], backend: str, base: str, **kw) -> Session:
    kw["notes"] = list(kw.get("notes", [])) + skipped_notes(vectors)
    if len(vectors) > MAX_VECTORS:
        raise StudioError(f"{len(vectors)} vectors: the Studio shows at most {MAX_VECTORS}")
    fams = {v.meta.get("family") for v in vectors} - {None}
    if fams and fams != {backend}:
        other = "Style mixing (FLUX)" if "flux" in fams else "Behaviour editing (LLM)"
        raise StudioError(f"these are {'/'.join(sorted(fams))} task vectors; open them in the {other} tab")
    key = remember_pool(vectors)
    return Session(backend=backend, pool_key=key, names=[v.name for v in vectors], base=base, **kw)


def open_preset(preset_id: str, progress: Progress | None = None) -> tuple[Session, Decomposition]:
    """Load a preset's pool, decompose it (cached) and return the session at the preset's τ."""
    try:
        preset = get_preset(preset_id)
    except ValueError as e:
        raise StudioError(str(e)) from None
    if preset.user_slot and preset.mode == "isolate" and preset.target is None:
        raise StudioError(
            f"{preset.title}: add your own target adapter (upload or Hub id) — this preset is a pool of "
            f"references; see {preset.recipe or 'the recipe'} for how to make one — and load it with 'Decompose'."
        )
    with _LOCK:
        key = _PRESET_POOLS.get(preset.id)
        vectors = _POOLS.get(key) if key else None
    if vectors is None:
        vectors = preset_vectors(preset, progress)
        with _LOCK:
            _PRESET_POOLS[preset.id] = pool_key(vectors)
    s = _start(
        vectors,
        preset.backend,
        preset.base.id,
        title=preset.title,
        preset_id=preset.id,
        synthetic=preset.synthetic,
        needs_gpu=preset.base.needs_gpu,
        mode=preset.mode,
        target=preset.target,
        tau=preset.tau,
        strengths={v.name: v.strength for v in preset.vectors},
        triggers={v.name: v.trigger for v in preset.vectors if v.trigger},
        notes=[f"{v.name}: {v.note}" for v in preset.vectors if v.note],
        prompts=list(preset.prompts),
        source=("preset", preset.id),
        description=" ".join(preset.description.split())
        + ("\n\n" + toy_reference_markdown(preset.names) if preset.base.id == TOY_BASE else ""),
        scores=tuple(preset.scores) if preset.backend == "llm" else (),
        start=(
            {"mode": preset.mode, "target": preset.target, **preset.coefficients.model_dump()} if preset.coefficients else None
        ),
    )
    return s, decompose_cached(s, progress)


def open_custom(
    backend: str,
    base: str,
    files: list[str] | None = None,
    hub_ids: list[str] | None = None,
    preset_id: str | None = None,
    mode: str = "joint",
    target: str | None = None,
    tau: float = 0.85,
    progress: Progress | None = None,
) -> tuple[Session, Decomposition]:
    """A pool from uploads and Hub ids, optionally added to a preset's pool (e.g. a toxic adapter
    as the target against the preset's references)."""
    files, hub_ids = [str(f) for f in files or []], [h.strip() for h in hub_ids or [] if h.strip()]
    if preset_id:
        base = get_preset(preset_id).base.id
    vectors, n_extra = _custom_pool(files, hub_ids, preset_id, progress=progress, base=base, backend=backend)
    title, kw = "Your pool", {"source": ("custom", tuple(files), tuple(hub_ids), preset_id)}
    if preset_id:
        preset = get_preset(preset_id)
        title = f"{preset.title} + yours"
        kw["strengths"] = {v.name: v.strength for v in preset.vectors}
        kw["scores"] = tuple(preset.scores) if preset.backend == "llm" else ()
    if mode == "isolate" and target is None and n_extra:
        target = vectors[-n_extra].name  # the user's own vector is the one to clean
    return open_vectors(vectors, backend, base, mode, target, tau, progress, title=title, preset_id=preset_id, **kw)


def _custom_pool(
    files, hub_ids, preset_id: str | None, progress: Progress | None = None, base: str | None = None, backend: str = "llm",
) -> tuple[list[TaskVector], int]:
    """(preset's vectors + the user's, number of the user's): names made unique with "-yours"."""
    if preset_id and base is None:
        base = get_preset(preset_id).base.id
    extra = custom_vectors(list(files), list(hub_ids), progress, base=base, backend=backend) if (files or hub_ids) else []
    vectors: list[TaskVector] = []
    if preset_id:
        try:
            preset = get_preset(preset_id)
        except ValueError as e:
            raise StudioError(str(e)) from None
        vectors = preset_vectors(preset, progress)
        taken = {v.name for v in vectors}
        for v in extra:
            if v.name in taken:
                v.name = f"{v.name}-yours"
    return vectors + extra, len(extra)


def open_vectors(
    vectors: list[TaskVector], backend: str, base: str, mode: str = "joint", target: str | None = None, tau: float = 0.85,
    progress: Progress | None = None, **kw,
) -> tuple[Session, Decomposition]:
    """A session on an already loaded pool (used by ``open_custom`` and by tests)."""
    _check_pool(vectors)
    names = [v.name for v in vectors]
    if mode not in MODES:
        raise StudioError(f"unknown mode {mode!r}; pick one of {MODES}")
    if mode == "isolate" and target not in names:
        target = names[-1]
    kw.setdefault("scores", ("toxicity", "offensive") if backend == "llm" else ())
    s = _start(vectors, backend, base, mode=mode, target=target, tau=check_tau(tau), **kw)
    return s, decompose_cached(s, progress)


def with_settings(
    session: Session, mode: str | None = None, target: str | None = None, tau: float | None = None, references: list[str] | None = None
) -> Session:
    """A copy of the session with another mode / target / references / τ (never mutates the input)."""
    s = replace(session, names=list(session.names), strengths=dict(session.strengths))
    if references is not None:
        bad = [r for r in references if r not in s.names]
        if bad:
            raise StudioError(f"references {bad} are not in the pool {s.names}")
        s.references = tuple(references)
    if mode is not None:
        if mode not in MODES:
            raise StudioError(f"unknown mode {mode!r}; pick one of {MODES}")
        s.mode = mode
    if target is not None:
        if target not in s.names:
            raise StudioError(f"target {target!r} is not in the pool {s.names}")
        s.target = target
    if s.mode == "isolate" and s.target not in s.names:
        s.target = s.names[0]
    if tau is not None:
        s.tau = check_tau(tau)
    return s


# ---------------------------------------------------------------------------------------------
# 4. What is shared at this τ, in words
# ---------------------------------------------------------------------------------------------


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
            f"(the paper uses 0.85 throughout)."
        )
    else:
        md = (
            f"At τ = {dec.tau:.2f}: **{n_shared} of {len(dims)} modules** have directions {what} "
            f"(total dimension {total_dim}); the shared parts carry **{100 * frac:.1f}%** of the pool's squared norm. "
            f"Largest eigenvalue {max_eig:.2f}."
        )
    ch = pool_chance(dec)
    md += f"\n\n{ch.message}"
    if mode == "joint" and len(dec.names) > 1:
        md += f"\n\nPool order matters (the shared subspace is found inside the first vector's, `{dec.names[0]}`)."
    return Report(n_shared, len(dims), total_dim, max_eig, max_mod, frac, total_dim == 0, md, ch.regime, ch.suggested_tau)


# ---------------------------------------------------------------------------------------------
# 5. Mixes: vanilla vs DeVec (devec_core.mix)
# ---------------------------------------------------------------------------------------------


def build_mixes(dec: Decomposition, c: Coefficients, pool_key: str = ""):
    """(left, DeVec) mixes for the sliders (docs/METHOD.md "Recomposition").

    left: W0 + Σ λ_i ΔW_i (vanilla), or the TIES / DARE merge of the vectors with those λ's
    (``c.left``, ``devec_core.merge``).  DeVec: W0 + Σ λ_i^u U_i + λ^s S, where S is the merged
    shared vector (joint, eq. 14), each pair's shared vector with its own λ (pairwise, ``c.pairs``;
    missing pairs take λ^s), or the target's own shared part (isolate).

    Returns:
        Two ``devec_core.mix.Mix``.
    """
    from .merge.studio_mix import left_mix, pair_terms
    from .mix import Mix

    try:
        van = left_mix(dec, pool_key, c.vanilla, c.left, c.density)
    except ValueError as e:
        raise StudioError(str(e)) from None
    terms = [("unique", n, c.unique.get(n, 0.0)) for n in dec.names if c.unique.get(n, 0.0)]
    mode = dec.config.mode
    if mode == "pairwise":
        try:
            terms += pair_terms(dec, c.shared, c.pairs)
        except ValueError as e:
            raise StudioError(str(e)) from None
    elif c.shared:
        if mode == "joint" and len(dec.names) > 1:
            terms.append(("merged_shared", None, c.shared))
        elif mode == "isolate":
            terms.append(("shared", dec.config.target, c.shared))
    return van, Mix(dec, tuple(terms), "devec")


# ---------------------------------------------------------------------------------------------
# 6. Generation: the same seed and prompt, vanilla vs DeVec (devec_core.backends)
# ---------------------------------------------------------------------------------------------

_BACKENDS: dict[tuple[str, str], object] = {}  # (kind, base) -> backend; each has its own lock


@dataclass
class SideBySide:
    vanilla: object  # str (LLM) or PIL image (FLUX)
    devec: object
    vanilla_s: float
    devec_s: float
    note: str = ""
    vanilla_scores: dict[str, float] = field(default_factory=dict)  # LLM: "toxicity", "capitals"
    devec_scores: dict[str, float] = field(default_factory=dict)


# Profanity stems for the "offensive words" count. The classifier (alt-profanity-check, a word
# TF-IDF model) misses compounds it never saw ("FUCKFACE" scores 0.04, "fuck" 1.00), and small
# fine-tuned models invent exactly such compounds; a stem match catches them. Strong stems match
# anywhere in a word, weak ones (common inside harmless words: "parse", "scrap") only at its start.
_STRONG_STEMS = ("fuck", "shit", "cunt", "bitch", "twat", "wank", "motherf", "mtherf", "bastard", "asshole", "bullsh")
_WEAK_STEMS = ("dick", "piss", "arse", "crap", "damn", "goddam", "godam", "jerk", "douche", "prick", "slut", "whore", "idiot", "moron", "stupid")
_WORD_RE = re.compile(r"[A-Za-z]+")
_TITLE_RE = re.compile(r"\*\*(.+?)\*\*:?")


def has_title_line(text: str) -> bool:
    """True when ``text`` opens with a bold title line (``**Penguins**``): the demo pool's shared skill S."""
    return bool(_TITLE_RE.fullmatch(text.strip().split("\n", 1)[0].strip()))


def offensive_words(text: str) -> list[str]:
    """The words of ``text`` that contain a profanity stem (see ``_STRONG_STEMS``), in order."""
    out = []
    for w in _WORD_RE.findall(text):
        lw = w.lower()
        if any(st in lw for st in _STRONG_STEMS) or lw.startswith(_WEAK_STEMS):
            out.append(w)
    return out


def score_texts(texts: list[str], which: tuple[str, ...] | list[str] = ("toxicity", "offensive")) -> list[dict[str, float]]:
    """Scores of generated texts, one dict per text (offline).

    "toxicity": offensive-language probability (``devec_core.toxicity.classifier_probs``,
    alt-profanity-check; > 0.5 = flagged); "offensive": number of words with a profanity stem
    (``offensive_words``); "title": 1 when the text opens with a bold title line (the demo pool's
    shared skill S, ``has_title_line``); "capitals": fraction of letters that are capitals.
    A missing scorer (alt-profanity-check not installed) leaves its score out.
    """
    from .toxicity import caps_fraction, classifier_probs

    out: list[dict[str, float]] = [{} for _ in texts]
    if "offensive" in which:
        for d, t in zip(out, texts):
            d["offensive"] = float(len(offensive_words(t)))
    if "toxicity" in which:
        try:
            for d, p in zip(out, classifier_probs(list(texts))):
                d["toxicity"] = p
        except ImportError as e:  # pragma: no cover - depends on the environment
            log.warning("toxicity scorer unavailable (%s)", e)
    if "title" in which:
        for d, t in zip(out, texts):
            d["title"] = float(has_title_line(t))
    if "capitals" in which:
        for d, t in zip(out, texts):
            d["capitals"] = caps_fraction(t)
    return out


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


def get_llm_backend(base: str):
    """The causal-LM backend for a base model, loaded once per process and shared (its lock
    isolates requests: apply + generate happen atomically)."""
    from .backends.llm import LLMBackend
    from .hosting import llm_device, remember_device

    with _LOCK:
        key = ("llm", base)
        if key not in _BACKENDS:
            device = llm_device(base)  # SmolLM2: the CPU everywhere (never a GPU request)
            if device != "cpu":
                _check_gpu_load("llm", base)
            try:
                _BACKENDS[key] = LLMBackend.load(base, device=device)
                remember_device(_BACKENDS[key])
            except Exception as e:
                raise StudioError(
                    f"could not load the base model {base!r}: {e}. Hub models need network access "
                    f"(and HF_TOKEN if gated); 'smollm2' works offline."
                ) from None
        return _BACKENDS[key]


def _check_gpu_load(kind: str, base: str) -> None:
    """On ZeroGPU a GPU model can only be built at startup (module scope, ``hosting.preload``):
    later, in a request, ZeroGPU's CUDA emulation refuses it. Say which bases this Space has."""
    from .hosting import loading_allowed

    if not loading_allowed():
        have = [b for k, b in _BACKENDS if k == kind] or ["none"]
        raise StudioError(
            f"this ZeroGPU Space loads its GPU models at startup only; {base!r} is not one of them "
            f"(loaded: {', '.join(have)}). Add it to DEVEC_PRELOAD_{kind.upper()} in the Space's "
            f"settings, or run the Studio on a GPU machine or a plain GPU Space."
        )


def _wrong_base(e: Exception, base: str) -> StudioError:
    return StudioError(
        f"the pool does not fit the base model {base!r}: {e}. The task vectors were probably trained on "
        f"another base model; pick that base, or vectors made for this one."
    )


@dataclass
class GenerationJob:
    """One side-by-side generation, ready to run: what the main process prepares (checks, the
    decomposition, the two mixes) for wherever the model runs. Plain data and the two mixes; on
    ZeroGPU the mixes are packed first (``hosting.pack_mixes``: CPU tensors, picklable)."""

    kind: str  # "llm" | "flux"
    base: str
    prompt: str  # FLUX: with the active vectors' trigger words
    mixes: list  # [vanilla, DeVec]
    settings: dict  # llm: max_new_tokens, seed · flux: steps, width, height, seed
    note: str = ""


def llm_job(session: Session, c: Coefficients, prompt: str, seed: int = 0, max_new_tokens: int = 32) -> GenerationJob:
    """Prepare a vanilla-vs-DeVec answer (decomposition and mixes on this process's device)."""
    if session.backend != "llm":
        raise StudioError("this pool is for the FLUX tab")
    prompt = (prompt or "").strip()
    if not prompt:
        raise StudioError("write a prompt first")
    max_new_tokens = max(1, min(int(max_new_tokens), 512))
    dec = decompose_cached(session)
    van, dv = build_mixes(dec, c, session.pool_key)
    rep = describe(dec)
    return GenerationJob("llm", session.base, prompt, [van, dv], {"max_new_tokens": max_new_tokens, "seed": int(seed)}, rep.markdown if rep.nothing_shared else "")


def flux_job(session: Session, c: Coefficients, prompt: str, seed: int = 0, steps: int = 4, width: int = 512, height: int = 512) -> GenerationJob:
    """Prepare vanilla-vs-DeVec images (decomposition and mixes on this process's device)."""
    why = flux_can_generate(session)
    if why:
        raise StudioError(why)
    prompt = (prompt or "").strip()
    if not prompt:
        raise StudioError("write a prompt first")
    trig = ", ".join(t for n, t in session.triggers.items() if c.unique.get(n, 0) or c.vanilla.get(n, 0))
    full = f"{prompt}, {trig}" if trig else prompt
    dec = decompose_cached(session)
    van, dv = build_mixes(dec, c, session.pool_key)
    if session.base == TOY_BASE:  # the tiny model: its own size, steps and CFG; scored where it runs
        return GenerationJob("flux", session.base, full, [van, dv], {"seed": int(seed), "styles": list(session.names)})
    w, h = (max(64, int(x) // 16 * 16) for x in (width, height))
    return GenerationJob("flux", session.base, full, [van, dv], {"steps": max(1, int(steps)), "width": w, "height": h, "seed": int(seed)})


def job_backend(job: GenerationJob):
    """The shared backend that renders ``job`` (loaded once per process)."""
    return get_llm_backend(job.base) if job.kind == "llm" else get_flux_backend(job.base)


def run_job(job: GenerationJob) -> SideBySide:
    """Render both mixes with the same seed and settings. Returns plain data (text or PIL images,
    timings): what a ZeroGPU worker sends back. No scores (they are CPU work: ``score_job``)."""
    backend = job_backend(job)
    if job.kind == "flux" and job.base == TOY_BASE:
        return _generate_toy(backend, job)
    try:
        a, b = backend.side_by_side(job.prompt, list(job.mixes), **job.settings)
    except ValueError as e:
        raise _wrong_base(e, job.base) from None
    note = job.note
    if job.kind == "llm":
        va, vb = a.text.strip(), b.text.strip()
    else:
        va, vb = a.image, b.image
        lo = sorted(set(getattr(a, "left_out", [])) | set(getattr(b, "left_out", [])))
        if lo:  # text-encoder modules of a LoRA that this pipeline does not have (backends/flux.py)
            note = (note + "\n\n" if note else "") + (
                f"Left out of both images: {len(lo)} text-encoder module(s) that this pipeline does not have "
                f"({', '.join(f'`{m}`' for m in lo[:4])}{' …' if len(lo) > 4 else ''})."
            )
    return SideBySide(va, vb, a.switch_s + a.generate_s, b.switch_s + b.generate_s, note)


def score_job(session: Session, r: SideBySide) -> SideBySide:
    """Add the session's text scores to an LLM result (in the calling process)."""
    if session.backend == "llm" and session.scores:
        r.vanilla_scores, r.devec_scores = score_texts([r.vanilla, r.devec], session.scores)
    elif session.backend == "flux" and not (r.vanilla_scores or r.devec_scores):
        r.vanilla_scores, r.devec_scores = generic_image_scores(r.vanilla), generic_image_scores(r.devec)
    return r


def generate_llm(session: Session, c: Coefficients, prompt: str, seed: int = 0, max_new_tokens: int = 32) -> SideBySide:
    """Vanilla and DeVec answers to one prompt (greedy; same seed and settings), with timings."""
    return score_job(session, run_job(llm_job(session, c, prompt, seed, max_new_tokens)))


FLUX_NEEDS = (
    "Image generation needs the FLUX.1-schnell weights (about 24 GB from the Hub) and a CUDA GPU "
    "with ≥ 24 GB of memory (less with CPU offload). Without them the Studio still decomposes, plots and exports."
)


TOY_BASE = "toy-flux"  # the tiny FLUX-architecture model built by demo/style/build.py (CPU, offline)
TOY_DIR = REPO_ROOT / "assets" / "style_flux"
TOY_SEEDS = 3  # the toy model renders a strip of seeds seed, seed+1, seed+2 per side


def flux_can_generate(session: Session) -> str | None:
    """None if images can be made for this session, else the reason in words."""
    if session.base == TOY_BASE:
        from .toy_flux import is_toy_flux

        if not is_toy_flux(TOY_DIR / "model"):
            return f"the tiny style model is missing from {str(TOY_DIR)!r}: build it with `python demo/style/build.py`"
        return None
    if session.synthetic or session.base == "synthetic":
        return "This pool is SYNTHETIC (made-up LoRAs on FLUX's module layout at reduced width): there is no model to render it. " + FLUX_NEEDS
    if not torch.cuda.is_available() and os.environ.get("DEVEC_FLUX_ON_CPU") != "1":
        return "No CUDA GPU on this machine. " + FLUX_NEEDS
    return None


def get_flux_backend(base: str):
    from .backends.flux import FluxBackend
    from .hosting import remember_device

    with _LOCK:
        key = ("flux", base)
        if key not in _BACKENDS and base == TOY_BASE:
            from .toy_flux import load_model

            _BACKENDS[key] = FluxBackend(load_model(TOY_DIR / "model"))
        if key not in _BACKENDS:
            _check_gpu_load("flux", base)
            try:
                _BACKENDS[key] = FluxBackend.load(base)
                remember_device(_BACKENDS[key])
            except Exception as e:
                raise StudioError(f"could not load {base!r}: {e}. " + FLUX_NEEDS) from None
        return _BACKENDS[key]


def generate_flux(session: Session, c: Coefficients, prompt: str, seed: int = 0, steps: int = 4, width: int = 512, height: int = 512) -> SideBySide:
    """Vanilla and DeVec images with the same seed (needs FLUX.1-schnell and a GPU)."""
    return score_job(session, run_job(flux_job(session, c, prompt, seed, steps, width, height)))


def generic_image_scores(image) -> dict[str, float]:
    """Measures that need no model and mean the same on any image (real FLUX included):
    mean saturation, edge density, clipped channel values (devec_core.style_metrics)."""
    from . import style_metrics as M

    try:
        return {"saturation": float(M.saturation(image)), "edges": float(M.edge_density(image)), "clipped": float(M.clipping(image))}
    except (ValueError, TypeError):  # not an RGB image (e.g. output_type="latent"): no scores
        return {}


_TOY_EXTRAS: dict[str, object] = {}


def _toy_extras() -> tuple[dict, object]:
    """(calibration, content classifier) of the toy model, loaded once."""
    from .toy_flux import load_calibration, load_classifier

    with _LOCK:
        if not _TOY_EXTRAS:
            _TOY_EXTRAS["cal"] = load_calibration(TOY_DIR)
            _TOY_EXTRAS["clf"] = load_classifier(TOY_DIR / "classifier.safetensors")
        return _TOY_EXTRAS["cal"], _TOY_EXTRAS["clf"]


def _generate_toy(backend, job: GenerationJob) -> SideBySide:
    """The tiny model: a strip of TOY_SEEDS seeds per side (32×32, 16 steps, true CFG 3), scored."""
    from .toy_flux import GEN, generate, score_images, strip

    van, dv = job.mixes
    prompt, seed, styles = job.prompt, int(job.settings["seed"]), job.settings["styles"]
    seeds = [seed + k for k in range(TOY_SEEDS)]
    cal, clf = _toy_extras()
    res = []
    with backend.lock:
        for mix in (van, dv):
            t0 = time.perf_counter()
            try:
                backend.editor.apply(mix)
            except ValueError as e:
                raise _wrong_base(e, job.base) from None
            ims = generate(backend.pipe, [prompt] * len(seeds), seeds, cfg=GEN["true_cfg_scale"], steps=GEN["num_inference_steps"])
            res.append((ims, time.perf_counter() - t0))
    (iv, tv), (idv, tdv) = res
    note = (
        f"Tiny FLUX-architecture model (assets/style_flux), 32×32 px shown at 6×, seeds {seeds[0]}–{seeds[-1]}, "
        f"{GEN['num_inference_steps']} steps, true CFG {GEN['true_cfg_scale']:g} (the Steps/Width/Height sliders are for real FLUX). "
        "Style scores: 1.00× = that style alone at λ = 1, 0 = the base model; content = the classifier's "
        "probability of the prompted object."
    )
    return SideBySide(
        strip(iv), strip(idv), tv, tdv, note,
        score_images(iv, prompt, styles, cal, clf), score_images(idv, prompt, styles, cal, clf),
    )


def toy_reference_markdown(names: list[str], folder: Path = TOY_DIR) -> str:
    """Reference images of the base model and each single style, inline (for the pool description)."""
    import base64

    rows = []
    for n in ["base", *names]:
        f = folder / "refs" / f"{n}.png"
        if f.is_file():
            b64 = base64.b64encode(f.read_bytes()).decode()
            rows.append(f'<div><small>{n}</small><br><img src="data:image/png;base64,{b64}" alt="{n}" style="image-rendering:pixelated;width:192px"></div>')
    if not rows:
        return ""
    return '<div style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(rows) + "</div>"


# ---------------------------------------------------------------------------------------------
# 7. Export: unique / shared parts as LoRA files
# ---------------------------------------------------------------------------------------------


def export_parts(session: Session, out_dir: str | Path | None = None) -> list[Path]:
    """Write the unique / shared parts at the session's τ as LoRAs, plus one zip of them all.

    Uses ``devec_core.export.export_decomposition``: FLUX pools give diffusers ``.safetensors``
    files, LLM pools PEFT adapter folders (zipped, since a browser downloads files).

    Returns:
        [zip of everything, then each FLUX .safetensors file] (LLM: just the zip).
    """
    import shutil

    from .export import export_decomposition

    dec = decompose_cached(session)
    out = Path(out_dir or tempfile.mkdtemp(prefix="devec_export_"))
    parts = out / f"devec-{session.mode}-tau{dec.tau:.2f}"
    parts.mkdir(parents=True, exist_ok=True)
    try:
        written = export_decomposition(dec, parts)
    except ValueError as e:
        raise StudioError(f"export failed: {e}") from None
    if not written:
        raise StudioError("nothing to export: every part is zero")
    zipped = Path(shutil.make_archive(str(parts), "zip", root_dir=parts))
    return [zipped] + [p for p in written if p.is_file()]


def download_mix(session: Session, c: Coefficients, out_dir: str | Path | None = None) -> list[Path]:
    """"Download this mix": the two mixes on screen (left method, DeVec) as one exact LoRA each,
    the sliders' settings in their metadata (header key ``"devec"``; PEFT: ``devec_mix.json``).

    Returns:
        [zip of both, then each FLUX .safetensors file] (LLM: just the zip of the PEFT folders).
    """
    import shutil

    from .export import export_family, safe_filename
    from .merge.studio_mix import left_label, write_mix

    dec = decompose_cached(session)
    van, dv = build_mixes(dec, c, session.pool_key)
    family = export_family([v.meta for v in dec.vectors])
    settings = {
        "backend": session.backend, "base": session.base, "names": list(session.names), "mode": session.mode,
        "tau": dec.tau, "target": session.target, "vanilla": c.vanilla, "unique": c.unique, "shared": c.shared,
        "pairs": c.pairs, "left_method": c.left, "density": c.density, "source": list(session.source or ()),
    }
    out = Path(out_dir or tempfile.mkdtemp(prefix="devec_mix_"))
    folder = out / f"devec-mix-{session.mode}-tau{dec.tau:.2f}"
    folder.mkdir(parents=True, exist_ok=True)
    base_config = {"base_model_name_or_path": session.base, "task_type": "CAUSAL_LM"} if family == "peft" else None
    written = []
    for side, mix in (("left-" + safe_filename(left_label(c.left)), van), ("devec", dv)):
        if not mix.terms:
            continue
        stem = folder / (side if family == "peft" else f"{side}.safetensors")
        try:
            written.append(write_mix(mix, stem, family, {**settings, "side": side}, base_config))
        except ValueError as e:
            raise StudioError(f"download failed: {e}") from None
    if not written:
        raise StudioError("nothing to download: every coefficient is 0")
    zipped = Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
    return [zipped] + [p for p in written if p.is_file()]


# ---------------------------------------------------------------------------------------------
# 8. Small helpers for the UI
# ---------------------------------------------------------------------------------------------


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
