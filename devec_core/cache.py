"""Content-hash keyed cache of decompositions on disk.

Key: SHA-256 over every input's content (the normalised task vectors, or the input files' bytes
plus the load options) and every ``Config`` field, the method version and this file's format
version — everything except τ. τ is re-applied on a hit with ``Decomposition.with_tau``-style
re-selection (r×r work, no SVD).

What an entry stores: ``Decomposition.state_dict()`` — the small τ-independent tensors (per block
of stacked modules: scales, Gram matrices, A Aᵀ, the bases' r×r matrices T, ranks, norms, spectra,
projections; dense members' kept singular vectors), not the inputs' factors. A hit rebuilds the
``Decomposition`` from them and the pool's vectors (``get(key, tau, vectors)``) with no SVD or
eigendecomposition. An entry is a few percent of the inputs (docs/METHOD.md "Cheap τ").

Layout: ``<root>/<key>/{manifest.json, tensors.safetensors}``. An entry is written in a temp
folder and renamed into place (atomic). Integrity (``hashing.digest_tensors``, ``hashing.seal``): the manifest
records a SHA-256 per tensor over its name, dtype, shape and bytes in order, and manifest.json is
sealed by a SHA-256 over its own canonical JSON (which also holds the entry's key). Every read
checks both; any mismatch, and any error while reading or rebuilding an entry, means "unusable":
reported (through ``report``), removed, recomputed and replaced — never an error for the caller,
never a wrong result. An invalid τ is refused before the cache is touched. A size cap
(``DEVEC_CACHE_MAX_GB``, default 20) evicts the least recently used entries (the entry folder's
mtime is touched on every hit).

An entry for a key from the input files (``key_for_sources``) also vouches that those exact bytes,
loaded with those options, passed the content checks (NaN/Inf, duplicates) when it was written:
the CLI skips them on a hit (``has``) and runs them before computing on a miss.

Root: ``$DEVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/devec`` or ``~/.cache/devec``.
(Content hashes and the seal live in ``devec_core.hashing``; this file, ~410 lines, is the one job
"entries on disk": keys, the state encoder, reads that never serve a wrong answer, writes, LRU.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .algorithm import PAPER_TAU
from .paths import cache_root
from .hashing import digest_tensors, hash_file, hash_source, hash_task_vector, seal, unseal
from .taskvec import TaskVector

CACHE_FORMAT = 3
__all__ = ["DecompositionCache", "cached_decompose", "default_cache_dir", "hash_file", "hash_source", "hash_task_vector",
           "make_key", "stale_temp"]

# ---------------------------------------------------------------------------------------------
# 1. Keys
# ---------------------------------------------------------------------------------------------

_NOT_IN_KEY = ("max_work", "max_memory")  # the work budget refuses pools; it never changes a result


def make_key(inputs: list[str], config) -> str:
    """The cache key: input content hashes (in pool order) + every Config field + versions.

    Args:
        inputs: one content hash (or descriptor string) per input, in pool order.
        config: the decomposition's ``Config`` (every parameter except τ).
    Returns:
        Hex digest.
    """
    from .pool import METHOD_VERSION, STATE_FORMAT

    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_KEY}
    payload = {
        "cache_format": CACHE_FORMAT,
        "method_version": METHOD_VERSION,
        "state_format": STATE_FORMAT,
        "config": cfg,
        "inputs": list(inputs),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 2. (De)serialising a decomposition's τ-independent state
# ---------------------------------------------------------------------------------------------


class _Encoder:
    """``Decomposition.state_dict()`` (plain lists, tuples, dicts, tensors, scalars) → JSON + tensors.

    It knows nothing of the engine's classes: the state dict is the cache's only view of a
    decomposition. Aliased tensors are stored once; complex tensors as (…, 2) real views
    (safetensors has no complex128).
    """

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def tensor(self, t: torch.Tensor) -> dict:
        t = t.detach().cpu()
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
        if sig in self._seen:
            return {"t": self._seen[sig]}
        name = f"t{len(self.tensors)}"
        self._seen[sig] = name
        ptr = t.untyped_storage().data_ptr()
        view = t.untyped_storage().nbytes() != t.numel() * t.element_size() or ptr in self._storages
        self._storages.add(ptr)
        if t.is_complex():
            t = torch.view_as_real(t.resolve_conj())
            self.tensors[name] = t.clone(memory_format=torch.contiguous_format) if view else t.contiguous()
            return {"t": name, "complex": True}
        self.tensors[name] = t.clone(memory_format=torch.contiguous_format) if view or not t.is_contiguous() else t
        return {"t": name}

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            return self.tensor(x)
        if isinstance(x, tuple):
            return {"tuple": [self(v) for v in x]}
        if isinstance(x, list):
            return [self(v) for v in x]
        if isinstance(x, dict):
            return {"dict": [[self(k), self(v)] for k, v in x.items()]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cache: cannot store a {type(x).__name__}")


def _decode(x, T: dict[str, torch.Tensor]):
    """The inverse of ``_Encoder``: plain containers and tensors only (nothing is constructed)."""
    if isinstance(x, list):
        return [_decode(v, T) for v in x]
    if not isinstance(x, dict):
        return x
    if "t" in x:
        t = T[x["t"]]
        return torch.view_as_complex(t) if x.get("complex") else t
    if "tuple" in x:
        return tuple(_decode(v, T) for v in x["tuple"])
    if "dict" in x:
        return {_decode(k, T): _decode(v, T) for k, v in x["dict"]}
    raise ValueError(f"cache: unknown entry node {sorted(x)}")


def _to_entry(dec) -> tuple[dict, dict[str, torch.Tensor]]:
    """Decomposition → (manifest dict, flat tensors): ``dec.state_dict()``, the small τ-independent
    tensors only (Grams, bases' r×r matrices, spectra, norms; dense members' kept singular vectors).
    The inputs' factors are not stored: a hit rebuilds from the vectors (``_from_entry``)."""
    enc = _Encoder()
    manifest = {
        "cache_format": CACHE_FORMAT,
        "names": list(dec.names),
        "state": enc(dec.state_dict()),
    }
    return manifest, enc.tensors


def _from_entry(manifest: dict, T: dict[str, torch.Tensor], tau: float, vectors: list[TaskVector]):
    """(manifest, tensors) + the pool's vectors → Decomposition at τ (no SVD / eigen-solve)."""
    from .pool import Decomposition

    if manifest.get("cache_format") != CACHE_FORMAT:
        raise ValueError("cache entry written by another version")
    state = _decode(manifest["state"], T)
    return Decomposition.from_state_dict(state, vectors, tau)


# ---------------------------------------------------------------------------------------------
# 3. The cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The cache root (``paths.cache_root``: one rule for the whole library)."""
    return cache_root()



def stale_temp(d: Path, max_age: float = 3600.0) -> bool:
    """A temp folder ``…tmp-<pid>-…`` / ``…old-<pid>-…`` left by a process that is gone (or older
    than max_age)."""
    import re

    m = re.search(r"(?:tmp|old)-(\d+)-", d.name)
    if m:
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            return True
        except (OSError, OverflowError):
            pass
    try:
        return time.time() - d.stat().st_mtime > max_age
    except OSError:
        return False


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


class DecompositionCache:
    """Decompositions on disk, keyed by content; atomic writes, integrity checks, LRU size cap.

    Args:
        root: cache folder (default ``default_cache_dir()``).
        max_bytes: size cap (default ``$DEVEC_CACHE_MAX_GB`` GiB, else 20 GiB).
        report: called with a one-line message when an entry is corrupt, evicted or skipped.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None,
                 report: Callable[[str], None] | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("DEVEC_CACHE_MAX_GB", "20")) * 2**30)
        self.max_bytes = max_bytes
        self.report = report or (lambda msg: None)
        self._memo_path = self.root / "file-hashes.json"

    # --- keys ---------------------------------------------------------------------------------
    def key_for_vectors(self, vectors: list[TaskVector], config) -> str:
        """Key from the normalised task vectors' content (names included) and the config."""
        return make_key([hash_task_vector(v) for v in vectors], config)

    def key_for_sources(self, sources: list, names: list[str], config, load_options: dict | None = None) -> str:
        """Key from the input files' bytes (folders: every weight/config file), names, load options."""
        memo = self._load_memo()
        digests = [f"{n}:{hash_source(s, memo)}" for s, n in zip(sources, names)]
        opts = dict(load_options or {})
        if opts.get("base") is not None and Path(str(opts["base"])).exists():
            opts["base"] = hash_source(opts["base"], memo)
        self._save_memo(memo)
        return make_key(digests + [json.dumps(opts, sort_keys=True, default=str)], config)

    def _load_memo(self) -> dict:
        try:
            memo = json.loads(self._memo_path.read_text())
        except (OSError, ValueError):
            return {}
        return memo if isinstance(memo, dict) else {}

    def _save_memo(self, memo: dict) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self._memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, self._memo_path)
        except OSError:
            pass

    # --- entries ------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        """Whether an entry for ``key`` is present with an intact, matching manifest (its tensors are
        checked by ``get``). Cheap: reads manifest.json only. The CLI uses it to skip the content
        checks of inputs whose exact bytes and load options were checked when the entry was written."""
        try:
            return unseal((self.path(key) / "manifest.json").read_text()).get("key") == key
        except (OSError, ValueError):
            return False

    def get(self, key: str, tau: float, vectors: list[TaskVector] | None = None):
        """The cached decomposition at τ, rebuilt with the pool's ``vectors`` (an entry holds no
        input factors), or None (no vectors given, missing, or unusable: reported, removed).

        Unusable: a partial entry, a manifest whose seal or key does not match, a tensor whose
        digest (name, dtype, shape, bytes) does not match, an entry of another version, or any
        error while reading or rebuilding it. An invalid τ raises ValueError before anything is read.
        """
        from .algorithm import check_tau

        tau = check_tau(tau)
        d = self.path(key)
        try:
            if vectors is None or not d.is_dir():
                return None
        except OSError:
            return None
        try:
            manifest = unseal((d / "manifest.json").read_text())
            if manifest.get("key") != key:
                raise ValueError(f"manifest.json belongs to entry {str(manifest.get('key'))[:12]!r}")
            tf = d / "tensors.safetensors"
            if tf.stat().st_size != manifest["tensors_bytes"]:
                raise ValueError(f"tensors.safetensors has {tf.stat().st_size} bytes, manifest says {manifest['tensors_bytes']}")
            from safetensors.torch import load_file

            T = load_file(str(tf))
            want = manifest["tensor_sha256"]
            if set(T) != set(want):
                raise ValueError(f"tensors.safetensors holds {len(T)} tensors, manifest lists {len(want)}")
            bad = [n for n, h in digest_tensors(T).items() if want[n] != h]
            if bad:
                raise ValueError(f"tensor {bad[0]!r} does not match its SHA-256 (name, dtype, shape, bytes)")
            dec = _from_entry(manifest, T, tau, vectors)
        except Exception as e:  # partial, corrupt, or from another version: recompute
            self.report(f"cache entry {str(d)!r} is unusable ({type(e).__name__}: {' '.join(str(e).split())[:160]}); recomputing")
            shutil.rmtree(d, ignore_errors=True)
            return None
        try:
            os.utime(d)  # LRU: last use
        except OSError:
            pass
        return dec

    def put(self, key: str, dec) -> Path | None:
        """Store a decomposition (atomically: temp folder, then rename); evicts to the size cap.

        Never raises: a failure to write is reported and the run continues without the cache.
        """
        from safetensors.torch import save_file

        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            manifest, T = _to_entry(dec)
            est = sum(t.numel() * t.element_size() for t in T.values())
            if est > self.max_bytes:
                self.report(f"decomposition of {est / 2**20:.0f} MiB exceeds the cache cap {self.max_bytes / 2**20:.0f} MiB; not cached")
                return None
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{key[:12]}-", dir=self.root))
            tf = tmp / "tensors.safetensors"
            save_file(T, str(tf))
            manifest.update(tensors_bytes=tf.stat().st_size, tensor_sha256=digest_tensors(T), created=time.time(), key=key)
            (tmp / "manifest.json").write_text(seal(manifest))
            final = self.path(key)
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except Exception as e:  # noqa: BLE001 — the cache is an optimisation: never fail the run for it
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            self.report(f"could not write cache entry in {str(self.root)!r} ({type(e).__name__}: {e}); continuing without cache")
            return None
        try:
            self.evict(keep=key)
        except OSError as e:
            self.report(f"cache: eviction failed ({e})")
        return final

    def entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of every complete entry, oldest use first."""
        out = []
        if not self.root.exists():
            return out
        for d in self.root.iterdir():
            try:
                if d.is_dir() and not d.name.startswith(".tmp-"):
                    out.append((d, _dir_size(d), d.stat().st_mtime))
            except OSError:  # removed meanwhile by another process
                continue
        return sorted(out, key=lambda e: e[2])

    def evict(self, keep: str | None = None) -> list[Path]:
        """Delete least-recently-used entries until the total is under the cap; also stale temp folders."""
        removed = []
        if self.root.exists():
            for d in self.root.glob(".tmp-*"):
                if stale_temp(d):
                    shutil.rmtree(d, ignore_errors=True)
        entries = self.entries()
        total = sum(b for _, b, _ in entries)
        for d, b, _ in entries:
            if total <= self.max_bytes:
                break
            if d.name == keep:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= b
            removed.append(d)
            self.report(f"cache: evicted {d.name[:12]} ({b / 2**20:.1f} MiB, least recently used)")
        return removed

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def cached_decompose(vectors: list[TaskVector], tau: float = PAPER_TAU, *, cache: DecompositionCache | None = None,
                     key: str | None = None, progress=None, before_compute: Callable[[], None] | None = None, **options):
    """``pool.decompose`` through the cache. Returns (Decomposition, hit).

    Args:
        vectors: the pool (hashed for the key unless ``key`` is given).
        tau: threshold (not part of the key).
        cache: the cache (default: a ``DecompositionCache()`` at the default root).
        key: a precomputed key (e.g. ``key_for_sources``).
        progress, options: as ``pool.decompose``.
        before_compute: called on a miss before computing (the CLI's input checks that a hit skips).
    """
    from .algorithm import check_tau
    from .pool import Config, decompose

    tau = check_tau(tau)  # before the cache is touched: an invalid τ never costs an entry
    cache = cache or DecompositionCache()
    if key is None:
        mode, target = options.pop("mode", "joint"), options.pop("target", None)
        cfg = Config(mode=mode, target=target, **options)
        key = cache.key_for_vectors(vectors, cfg)
        options.update(mode=mode, target=target)
    dec = cache.get(key, tau, vectors)
    if dec is not None:
        return dec, True
    if before_compute is not None:
        before_compute()
    dec = decompose(vectors, tau=tau, progress=progress, **options)
    cache.put(key, dec)
    return dec, False
