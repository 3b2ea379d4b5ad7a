"""The session's decomposition: computed once per (pool, mode, target, references) at the paper's
τ — from the in-process LRU, else the on-disk cache (``devec_core.cache``), else ``pool.decompose``
— then re-thresholded to the session's τ without another SVD (``Decomposition.with_tau``).
"""

from __future__ import annotations

import os
from collections import OrderedDict

from .. import algorithm, hosting
from ..algorithm import PAPER_TAU
from ..cache import DecompositionCache
from ..pool import MODES, Config, Decomposition, Progress, decompose
from .caches import DECOMPS, LOCK, MAX_DECOMPS, lru_put
from .pools import session_pool
from .session import Session, StudioError, log


def _disk_cache() -> DecompositionCache | None:
    """The on-disk decomposition cache, or None when disabled (``DEVEC_STUDIO_DISK_CACHE=0``)
    or unavailable."""
    if os.environ.get("DEVEC_STUDIO_DISK_CACHE", "1") != "1":
        return None
    try:
        return DecompositionCache()
    except (OSError, ValueError, RuntimeError) as e:  # no home folder, a bad DEVEC_CACHE_MAX_GB: run without it
        log.warning("decomposition cache unavailable (%s)", e)
        return None


def _device_option() -> dict:
    """{"device": "cpu"} on ZeroGPU (the main process has no GPU; ``spaces`` only emulates one),
    else {} (Config's "auto"): see ``devec_core.hosting.decomposition_device``."""
    dev = hosting.decomposition_device()
    return {} if dev == "auto" else {"device": dev}


def decompose_cached(session: Session, progress: Progress | None = None) -> Decomposition:
    """The session's decomposition at its τ; computed once per (pool, mode, target)."""
    key = session.key()
    with LOCK:
        dec = DECOMPS.get(key)
        if dec is not None:
            DECOMPS.move_to_end(key)
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
                key_d = disk.key_for_vectors(vectors, Config(mode=session.mode, target=target, references=refs, **_device_option()))
                dec = disk.get(key_d, PAPER_TAU, vectors)
            except Exception as e:  # noqa: BLE001 - deliberately broad: any corrupt entry means recompute
                log.warning("decomposition cache read failed (%s); recomputing", e, exc_info=True)
        if dec is None:
            try:
                dec = decompose(vectors, tau=PAPER_TAU, mode=session.mode, target=target, references=refs, progress=progress, **_device_option())
            except ValueError as e:
                raise StudioError(f"decomposition failed: {e}") from e
            if disk is not None and key_d is not None:
                try:
                    disk.put(key_d, dec)
                except Exception as e:  # noqa: BLE001 - deliberately broad: a failed write must not lose the result
                    log.warning("decomposition cache write failed (%s)", e, exc_info=True)
        with LOCK:
            lru_put(DECOMPS, key, dec, MAX_DECOMPS)
    return _at_tau_cached(key, dec, session.tau)


AT_TAU: "OrderedDict[tuple, Decomposition]" = OrderedDict()  # (Session.key(), τ) -> the decomposition at that τ
MAX_AT_TAU = 8


def _at_tau_cached(key, dec: Decomposition, tau: float) -> Decomposition:
    """``at_tau``, one object per (decomposition, τ): every request at a τ gets the same object, so
    its selections at τ are computed once and a backend sees the mix it has fused as the same mix
    (``Backend.is_fused``: one switch fewer)."""
    t = check_tau(tau)
    k = (key, id(dec), t)
    with LOCK:
        got = AT_TAU.get(k)
        if got is not None and got.blocks is dec.blocks:
            AT_TAU.move_to_end(k)
            return got
    got = at_tau(dec, t)
    with LOCK:
        lru_put(AT_TAU, k, got, MAX_AT_TAU)
    return got


def check_tau(tau) -> float:
    """τ from the UI: a number in (0, 1] (``algorithm.check_tau``); τ = 0 would call every
    direction shared."""
    try:
        t = float(tau)
    except (TypeError, ValueError) as e:
        raise StudioError(f"τ must be a number in (0, 1]; got {tau!r}") from e
    try:
        return algorithm.check_tau(t)  # NaN and ±inf fail its range test too
    except ValueError as e:
        raise StudioError(f"τ must be in (0, 1] ({PAPER_TAU} is the paper's value); got {t}") from e


def at_tau(dec: Decomposition, tau: float) -> Decomposition:
    """Re-threshold (no SVD): ``Decomposition.with_tau``."""
    t = check_tau(tau)
    return dec if abs(dec.tau - t) < 1e-12 else dec.with_tau(t)
