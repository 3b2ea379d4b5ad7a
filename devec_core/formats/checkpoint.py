"""Full checkpoints read lazily, one tensor at a time; dense deltas cut to factors as they are read."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..taskvec import Dense, LowRank, TaskVector
from .common import _CKPT_INDEX_NAMES, PICKLE_SUFFIXES, FormatError
from .files import _check_pickle, read_state_dict, resolve_source, safetensors_keys


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
        try:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{str(f)!r}: tensor {key!r} unreadable, file truncated or corrupt ({type(e).__name__})") from e


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
