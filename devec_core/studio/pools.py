"""A pool from a preset (local files, the SmolLM2 demo pool, the synthetic FLUX pool, Hub ids and
Hub checkpoints), a preset plus the user's own vectors, and any pool again from a session's
``source`` in a process that does not hold it (a ZeroGPU worker, or after the LRU dropped it).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .. import formats
from ..pool import Progress
from ..presets import Preset, get_preset
from ..synthetic import synthetic_flux_pool
from ..taskvec import TaskVector
from ..toxicity import load_demo_pool
from .caches import get_pool, pool_key, remember_pool
from .session import READ_ERRORS, REPO_ROOT, Session, StudioError
from .uploads import custom_vectors, dense_cut


def session_pool(session: Session, progress: Progress | None = None) -> list[TaskVector]:
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
        # the batch's bad files were named when it was opened and fail the same way again; anything
        # else that changed shows in the content hash below
        vectors, _ = custom_pool(*args, progress=progress, base=session.base, backend=session.backend, rejected=[])
    else:
        raise StudioError(f"unknown pool source {kind!r}: load the pool again")
    if pool_key(vectors) != session.pool_key:
        raise StudioError("the pool's files changed since it was loaded: load it again")
    remember_pool(vectors)
    return vectors


def _load_spec_vector(source: str, name: str, weight_name: str | None, base: str | None = None, offline: bool = False) -> TaskVector:
    """One task vector from a preset's source (local path relative to the repo, or a Hub id).

    An offline preset never reaches for the Hub: a missing local file is an error at once.
    """
    if source.startswith("demo:"):  # a child of the SmolLM2 demo pool: S + child, exactly
        folder, _, child = source[len("demo:") :].rpartition("/")
        try:
            pool = load_demo_pool(REPO_ROOT / folder)
        except (OSError, ValueError) as e:
            raise StudioError(f"could not read the demo pool {folder!r}: {e}") from e
        if child not in pool:
            raise StudioError(f"the demo pool {folder!r} has no vector {child!r}; it has {list(pool)}")
        v = pool[child]
        v.name = name
        return v
    local = (REPO_ROOT / source) if not Path(source).is_absolute() else Path(source)
    if local.exists():
        src = local / weight_name if weight_name and local.is_dir() else local
        try:
            return formats.load_task_vector(src, name, base=base, compress=dense_cut())
        except ValueError as e:
            raise StudioError(f"could not read {name!r} from {str(src)!r}: {e}") from e
    if offline:
        raise StudioError(f"the offline preset's vector {name!r} is missing: {str(local)!r} does not exist (incomplete checkout?)")
    hub = f"{source}/{weight_name}" if weight_name else source
    try:
        return formats.load_task_vector(hub, name, base=base, compress=dense_cut())
    except READ_ERRORS as e:  # network, gated repo, missing file: say what is needed
        raise StudioError(
            f"could not load {name!r} from {hub!r}: {e}. This preset needs the Hugging Face Hub "
            f"(and HF_TOKEN for gated models); the offline presets work without it."
        ) from e


HUB_CHECK_S = 3.0  # seconds to wait for the Hub's address before calling it unreachable


def hub_reachable(timeout: float = HUB_CHECK_S) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (HF_HUB_OFFLINE=1: no, without asking)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _needs_hub(preset: Preset) -> list[str]:
    """The preset's sources that are neither in the repo nor in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    missing = []
    for spec in preset.vectors:
        if spec.source.startswith(("demo:", "synthetic:")) or (REPO_ROOT / spec.source).exists():
            continue
        parts = spec.source.split("/")
        repo, fname = "/".join(parts[:2]), spec.weight_name or ("/".join(parts[2:]) or None)
        if not (fname and isinstance(try_to_load_from_cache(repo, fname), str)):
            missing.append(spec.source)
    return missing


def preset_vectors(preset: Preset, progress: Progress | None = None) -> list[TaskVector]:
    """Load every vector of a preset (synthetic ones are generated). A preset that needs files
    from the Hub fails at once, with one line, when the Hub cannot be reached (instead of each
    download's retries: 148 s measured here for the first of five LoRAs)."""
    if preset.synthetic:
        names = tuple(v.name for v in preset.vectors)
        return synthetic_flux_pool(names)
    if not preset.offline:
        missing = _needs_hub(preset)
        if missing and not hub_reachable():
            raise StudioError(
                f"{preset.title}: the Hugging Face Hub cannot be reached from this server, and {len(missing)} of its "
                f"{len(preset.vectors)} vectors are not downloaded yet (e.g. {missing[0]!r}). Use an offline preset, or upload the files."
            )
    base = None if preset.base.id in ("smollm2", "synthetic") else preset.base.id
    out: list[TaskVector | None] = [None] * len(preset.vectors)
    ckpts = [] if preset.offline or base is None else _checkpoint_specs(preset)
    if ckpts:  # full fine-tunes: streamed together, the base read once, each delta cut as it is read
        try:
            loaded = formats.load_checkpoint_deltas([p for _, p in ckpts], base, [preset.vectors[i].name for i, _ in ckpts],
                                            compress=dense_cut(), progress=progress)
        except READ_ERRORS as e:
            raise StudioError(f"could not load the preset's fine-tuned checkpoints against {base!r}: {e}") from e
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
    found = []
    for i, spec in enumerate(preset.vectors):
        if spec.source.startswith(("demo:", "synthetic:")) or (REPO_ROOT / spec.source).exists():
            continue
        try:
            path = formats.resolve_source(f"{spec.source}/{spec.weight_name}" if spec.weight_name else spec.source)
            if formats.sniff(path).kind == "checkpoint":
                found.append((i, path))
        except READ_ERRORS:  # _load_spec_vector reports it with what is needed
            continue
    return found



def custom_pool(
    files, hub_ids, preset_id: str | None, progress: Progress | None = None, base: str | None = None, backend: str = "llm",
    rejected: list[str] | None = None,
) -> tuple[list[TaskVector], int]:
    """(preset's vectors + the user's, number of the user's): names made unique with "-yours".
    ``rejected``: see ``custom_vectors`` (bad files named there, the good ones kept)."""
    if preset_id and base is None:
        base = get_preset(preset_id).base.id
    extra = custom_vectors(list(files), list(hub_ids), progress, base=base, backend=backend, rejected=rejected) if (files or hub_ids) else []
    vectors: list[TaskVector] = []
    if preset_id:
        try:
            preset = get_preset(preset_id)
        except ValueError as e:
            raise StudioError(str(e)) from e
        vectors = preset_vectors(preset, progress)
        taken = {v.name for v in vectors}
        for v in extra:
            if v.name in taken:
                v.name = f"{v.name}-yours"
    return vectors + extra, len(extra)

