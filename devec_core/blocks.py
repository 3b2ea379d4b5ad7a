"""Blocks: a pool's modules with the same signature, their small matrices stacked on dim 0.

A FLUX pool of ~500 modules has a handful of signatures (members, kinds, shapes, ranks), so a
block turns thousands of tiny r×r operations into a few batched calls. A ``Block`` holds the
inputs' factors (references, no copies), and everything τ-independent computed from them:
Gram matrices, the bases' small matrices T (Q = s·F·T, ``algorithm.lowrank_basis``), norms,
spectra of member tuples, projections. ``Block.state()`` / ``Block.from_state()`` are its small
view without the factors (``pool.Decomposition.state_dict``).

Modes (``devec_core.modes``) decide which spectra and projections are needed; the block computes
each on first use and keeps it.
"""

from __future__ import annotations

import os

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from . import algorithm
from .taskvec import Delta, LowRank, TaskVector

Progress = Callable[[int, int, str], None]

SMALL = torch.float64  # every r×r computation runs in float64: cheap, and it spends no precision
COMPLEX = torch.complex128  # spectra of SMALL matrices


@dataclass
class Spectrum:
    """τ-independent data of one ordered tuple of members (the first is the basis side)."""

    order: tuple[int, ...]  # positions within the block's members
    eigvals: torch.Tensor  # (b, p1) complex
    eigvecs: torch.Tensor  # (b, p1, p1) complex


@dataclass
class Block:
    """Modules with the same shapes, kinds and members. Per member (position p in `members`):
    F[p][b] is the tall factor of module b (a LoRA's B, unscaled, or a dense delta's kept left
    singular vectors), scale[b, p] its scale, so the basis is Q = scale·F·T[p][b].

    Gram matrices of the scaled factors are computed per pair of members when first needed
    (``gram``): joint mode's spectrum needs only the diagonal blocks and the chain C_12 … C_k1."""

    modules: list[str]
    members: tuple[int, ...]  # vector indices in pool order
    shape: tuple[int, int]
    F: list[list[torch.Tensor]]  # per member, per module: (n, p_i), compute dtype
    A: list[list[torch.Tensor] | None]  # per member, per module: (r, m); None for dense
    W: list[list[torch.Tensor] | None]  # per member, per module: dense (n, m); None for LoRA
    scale: torch.Tensor  # (b, k) SMALL
    wide: torch.Tensor  # (b,) bool: Grams of these modules computed in float64 (range edge)
    grams: dict[tuple[int, int], torch.Tensor]  # (i, j) -> (b, p_i, p_j) SMALL: (s_iF_i)ᵀ(s_jF_j)
    GA: list[torch.Tensor | None]  # per member: A Aᵀ (b, r, r) SMALL; None for dense
    T: list[torch.Tensor]  # per member: (b, p_i, p_i) SMALL, Q = sF T
    ranks: torch.Tensor  # (b, k)
    sq_norms: torch.Tensor  # (b, k) SMALL: ‖ΔW_i‖_F²
    spectra: dict[tuple[int, ...], Spectrum] = field(default_factory=dict)
    _proj: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def gram(self, i: int, j: int) -> torch.Tensor:
        """(s_iF_i)ᵀ (s_jF_j), (b, p_i, p_j) SMALL; one GEMM per module on first use."""
        if (i, j) not in self.grams:
            if (j, i) in self.grams:
                return self.grams[(j, i)].mT
            G = _grams(self.F[i], self.F[j], self.wide)
            self.grams[(i, j)] = G * (self.scale[:, i] * self.scale[:, j])[:, None, None]
        return self.grams[(i, j)]

    def cross(self, i: int, j: int) -> torch.Tensor:
        """C_ij = Q_iᵀ Q_j = T_iᵀ (s_iF_i)ᵀ(s_jF_j) T_j, (b, p_i, p_j)."""
        return self.T[i].mT @ self.gram(i, j) @ self.T[j]

    def proj(self, f: int, i: int) -> torch.Tensor:
        """Q_fᵀ X_i: member i's factor (scaled B, or dense W) in member f's basis, (b, p_f, r|m)."""
        if (f, i) not in self._proj:
            if self.W[i] is None:
                P = self.T[f].mT @ self.gram(f, i)
            else:
                FtW = torch.stack([Ff.mT @ Wi for Ff, Wi in zip(self.F[f], self.W[i])]).to(SMALL)
                P = self.T[f].mT @ (self.scale[:, f, None, None] * FtW)
            self._proj[(f, i)] = P
        return self._proj[(f, i)]

    def spectrum(self, order: tuple[int, ...], symmetric: bool) -> Spectrum:
        if order not in self.spectra:
            chain = [self.cross(a, b) for a, b in zip(order, order[1:] + order[:1])]
            vals, vecs = batched(lambda *c: algorithm.chain_spectrum(list(c), symmetric=symmetric), chain)
            self.spectra[order] = Spectrum(order, vals, vecs)
        return self.spectra[order]

    def factor(self, p: int, b: int) -> torch.Tensor:
        """Member p's own delta factor X for module b: scaled B (n, r) or dense W (n, m)."""
        return self.W[p][b] if self.W[p] is not None else self.F[p][b] * float(self.scale[b, p])

    def project(self, f: int, Y: torch.Tensor, i: int) -> list[torch.Tensor]:
        """Z Zᵀ X_i per module with Z = Q_f Y: s_f F_f (T_f Y Yᵀ Q_fᵀ X_i), one GEMM each."""
        K = self.T[f] @ Y @ (Y.mT @ self.proj(f, i)) * self.scale[:, f, None, None]
        K = in_range(K, self.F[f][0].dtype, self.modules)
        return [Ff @ k for Ff, k in zip(self.F[f], K)]

    def basis(self, p: int, b: int) -> torch.Tensor:
        """The orthonormal basis Q (n, p_i) of member p for module b (zero columns where cut)."""
        Tb = in_range(self.T[p][b : b + 1] * self.scale[b, p], self.F[p][b].dtype, self.modules[b : b + 1])[0]
        return self.F[p][b] @ Tb

    def shared_sq_norm(self, f: int, Y: torch.Tensor, i: int) -> torch.Tensor:
        """‖Z Zᵀ ΔW_i‖_F² = ‖Yᵀ Q_fᵀ X_i · A_i‖² from small products; (b,)."""
        core = Y.mT @ self.proj(f, i)
        if self.GA[i] is None:
            return core.pow(2).sum((-1, -2))
        return ((core @ self.GA[i]) * core).sum((-1, -2))

    # --- the small view (cache entries): no factor of the inputs --------------------------------
    def state(self) -> dict:
        """The τ-independent tensors that are small, as plain containers.

        Module names, members, scales, the Gram matrices computed so far, A Aᵀ, the bases' small
        matrices T, ranks, norms, spectra and projections computed so far; for dense members also
        their kept left singular vectors (an SVD of the input: not cheap to redo). The LoRA
        factors and dense deltas are not stored: ``from_state`` takes them from the vectors.
        """
        return {
            "modules": list(self.modules), "members": tuple(self.members), "shape": tuple(self.shape),
            "scale": self.scale, "wide": self.wide, "grams": dict(self.grams),
            "GA": list(self.GA), "T": list(self.T), "ranks": self.ranks, "sq_norms": self.sq_norms,
            "spectra": {o: (sp.eigvals, sp.eigvecs) for o, sp in self.spectra.items()},
            "proj": dict(self._proj),
            "dense_F": {p: self.F[p] for p in range(len(self.members)) if self.W[p] is not None},
        }

    @classmethod
    def from_state(cls, st: dict, vectors: list[TaskVector], signatures: dict[str, tuple], dev, dtype) -> "Block":
        """A block from ``state()`` and the pool's vectors; ValueError if they do not fit it.

        ``signatures``: module → signature of the vectors (``group_modules``), checked against
        what the state says of its members' kinds, shapes and ranks.
        """
        mods, members = list(st["modules"]), tuple(st["members"])
        want = tuple(
            (i, "Dense" if st["GA"][p] is None else "LowRank", tuple(st["shape"]),
             None if st["GA"][p] is None else st["T"][p].shape[-1])
            for p, i in enumerate(members)
        )
        if {signatures.get(m) for m in mods} != {want}:
            raise ValueError(f"decomposition state does not fit the vectors (block of {mods[0]!r})")
        F, A, W, _ = block_inputs(vectors, members, mods, dev, dtype)
        for p, Fs in st["dense_F"].items():
            F[p] = [f.to(dev) for f in Fs]
        to = lambda t: None if t is None else t.to(dev)  # noqa: E731
        return cls(
            mods, members, tuple(st["shape"]), F, A, W, to(st["scale"]), to(st["wide"]),
            {tuple(k): to(g) for k, g in st["grams"].items()}, [to(g) for g in st["GA"]], [to(t) for t in st["T"]],
            to(st["ranks"]), to(st["sq_norms"]),
            {tuple(o): Spectrum(tuple(o), to(v), to(e)) for o, (v, e) in st["spectra"].items()},
            {tuple(k): to(x) for k, x in st["proj"].items()},
        )


def _chunk_threads_from_env() -> int | None:
    """``DEVEC_CHUNK_THREADS``: a positive integer, or "auto" (None: torch's thread count); unset: auto.

    Auto since the quiet-machine run of 2026-11-30 (load 1.7–1.9, `python bench/bench_decompose.py
    --pool-only --compare-only --threads 2 --baseline-ref 1f1261c --rounds 4`, README "Decomposition"):
    the FLUX pool took 0.306 s median with workers against 0.321 / 0.364 s serial (two runs)."""
    raw = os.environ.get("DEVEC_CHUNK_THREADS", "").strip().lower() or "auto"
    if raw == "auto":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"DEVEC_CHUNK_THREADS must be a positive integer or 'auto'; got {raw!r}")
    return int(raw)


CHUNK_THREADS: int | None = _chunk_threads_from_env()
"""Python threads for a pool's per-module work (``workers``, ``parallel_tasks``); None (the default, "auto"):
``torch.get_num_threads()``; 1: serial. Env ``DEVEC_CHUNK_THREADS``."""


def workers(units: int, device: torch.device | None = None) -> int:
    """How many Python threads ``parallel_tasks`` should use for ``units`` independent pieces:
    ``CHUNK_THREADS`` (None: torch's thread count), at most ``units``; on a GPU one."""
    if device is not None and device.type != "cpu":
        return 1
    return max(1, min(CHUNK_THREADS if CHUNK_THREADS is not None else torch.get_num_threads(), units))


def parallel_tasks(tasks: list[Callable], w: int, on_done: Callable[[int], None] | None = None) -> list:
    """``[task() for task in tasks]`` on ``w`` Python threads (torch releases the GIL in its
    kernels): a free worker takes the next task in list order, so put the costliest first.

    Each worker runs its calls with ``torch.get_num_threads() // w`` intra-op threads
    (``torch.set_num_threads`` acts on the calling thread's OpenMP and MKL pools) and restores the
    caller's count when done. The first version had no such limit: every worker opened a full
    OpenMP team and the FLUX pool took 2.99 s instead of 0.51 s on the quiet 2-core machine
    (docs/METHOD.md "Whole calls on threads"). ``on_done(i)`` is called in the calling thread as
    task i finishes; if it raises (a caller aborting through its progress callback), the tasks not
    started yet are dropped and its exception propagates once the running ones end. A failing task's exception is
    raised after every task has ended (the first failing one in list order), so nothing is left
    running.
    """
    if w < 2:
        out = []
        for i, task in enumerate(tasks):
            out.append(task())
            if on_done:
                on_done(i)
        return out
    caller = torch.get_num_threads()
    per_worker = max(1, caller // w)

    def run(task: Callable):
        # the caller's count, not the worker's own: a worker started while another had lowered
        # torch's default for new threads would otherwise restore the lowered one
        torch.set_num_threads(per_worker)
        try:
            return task()
        finally:
            torch.set_num_threads(caller)

    with ThreadPoolExecutor(max_workers=w) as ex:
        futures = [ex.submit(run, task) for task in tasks]
        index = {f: i for i, f in enumerate(futures)}
        try:
            for f in as_completed(futures):
                if on_done and f.exception() is None:
                    on_done(index[f])
        except BaseException:  # on_done raised (a caller aborting), or an interrupt:
            for f in futures:  # the tasks not started yet never start
                f.cancel()
            raise
    return [f.result() for f in futures]


def parallel_chunks(fn: Callable, b: int, min_chunk: int = 16, device: torch.device | None = None) -> list:
    """``[fn(slice) for slice in chunks of range(b)]``, one chunk per worker (``workers``, chunks of
    at least ``min_chunk``), run by ``parallel_tasks``.

    On by default (``CHUNK_THREADS`` None = torch's thread count; env ``DEVEC_CHUNK_THREADS=1`` for
    serial). A block's work is many small independent calls (a 16×16 Gram per module and member
    pair, a 16×16 solve per matrix), which MKL threads poorly one call at a time. Results do not
    depend on the split: every call sees the same matrices
    (``test_work_split_over_threads_gives_the_serial_answer``).
    """
    w = workers(b // min_chunk, device)
    if w < 2:
        return [fn(slice(0, b))]
    bounds = [b * i // w for i in range(w + 1)]
    return parallel_tasks([partial(fn, slice(lo, hi)) for lo, hi in zip(bounds, bounds[1:])], w)


def batched(fn: Callable, tensors: list[torch.Tensor], min_chunk: int = 16) -> tuple[torch.Tensor, ...]:
    """``fn(*tensors)`` for a function batched over dim 0 of every tensor (and of every output),
    its batch split over threads by ``parallel_chunks``."""
    parts = parallel_chunks(lambda s: fn(*[t[s] for t in tensors]), tensors[0].shape[0], min_chunk, tensors[0].device)
    return parts[0] if len(parts) == 1 else tuple(torch.cat(out) for out in zip(*parts))


def in_range(K: torch.Tensor, dtype: torch.dtype, mods: list[str]) -> torch.Tensor:
    """K (SMALL) cast to the factors' dtype; an error naming the module if it overflows there."""
    out = K.to(dtype)
    bad = ~torch.isfinite(out).flatten(1).all(-1) & torch.isfinite(K).flatten(1).all(-1)
    if bad.any():
        mod = mods[int(bad.nonzero()[0])]
        raise ValueError(
            f"module {mod!r}: overflow: an intermediate of {float(K.abs().max()):.3g} exceeds the {dtype} range "
            "(the pool's factors differ in scale by more than it can hold); decompose with dtype='float64'"
        )
    return out


def _grams(Fi: list[torch.Tensor], Fj: list[torch.Tensor], wide: torch.Tensor) -> torch.Tensor:
    """Per module F_iᵀ F_j, stacked (b, p_i, p_j) in SMALL; GEMM in the factors' dtype, or in
    float64 for the ``wide`` modules (factors whose squares under- or overflow that dtype)."""
    out = []
    for a, b_, w in zip(Fi, Fj, wide.tolist()):
        if w and a.dtype != SMALL:
            a, b_ = a.to(SMALL), b_.to(SMALL)
        out.append(a.mT @ b_)
    return torch.stack(out).to(SMALL)


def _edge(Gs: list[torch.Tensor]) -> torch.Tensor:
    """(b,) True where a diagonal of the Grams Gs (each (b, r, r)) left the normal range of its
    dtype: an entry below tiny/eps (its factor column underflowed, or is zero) or not finite
    (overflow, or NaN)."""
    d = torch.cat([G.diagonal(dim1=-2, dim2=-1) for G in Gs], -1)
    lim = torch.finfo(d.dtype).tiny / torch.finfo(d.dtype).eps
    return (~torch.isfinite(d) | (d < lim)).any(-1)


def _member(i: int, d: Delta) -> tuple:
    """(vector index, kind, shape, rank) of one delta: its part of a module's signature."""
    if isinstance(d, LowRank):
        B = d.B
        return (i, "LowRank", (B.shape[0], d.A.shape[1]), B.shape[1])
    return (i, type(d).__name__, tuple(d.shape), None)


def group_modules(vectors: list[TaskVector]) -> dict[tuple, list[str]]:
    """Modules grouped by signature (members, kinds, shapes, ranks); shapes checked across vectors."""
    present: dict[str, list[tuple[int, Delta]]] = {}
    for i, v in enumerate(vectors):
        for mod, d in v.modules.items():
            present.setdefault(mod, []).append((i, d))
    groups: dict[tuple, list[str]] = {}
    for mod, deltas in present.items():
        sig = tuple(_member(i, d) for i, d in deltas)
        i0, _, shape0, _ = sig[0]
        for i, _, shape, _ in sig[1:]:
            if shape != shape0:
                raise ValueError(
                    f"module {mod!r}: shape {shape0} in {vectors[i0].name!r} but {shape} "
                    f"in {vectors[i].name!r} (task vectors for different base models?)"
                )
        groups.setdefault(sig, []).append(mod)
    return groups


def _on(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dev, dtype)``, skipping the call where nothing would change (thousands per pool)."""
    return t if t.dtype is dtype and t.device == dev else t.to(dev, dtype)


def block_inputs(vectors, members, mods, dev, dtype):
    """Per member: (F, A, W, scale) lists for the block's modules, no copies where dtype/device match.
    Dense members get F = None here (their basis needs an SVD)."""
    F, A, W, scales = [], [], [], []
    for i in members:
        ds = [vectors[i].modules[mod] for mod in mods]
        if isinstance(ds[0], LowRank):
            F.append([_on(d.B, dev, dtype) for d in ds])
            A.append([_on(d.A, dev, dtype) for d in ds])
            W.append(None)
            scales.append(torch.tensor([float(d.scale) for d in ds], dtype=SMALL))
        else:
            F.append(None)
            A.append(None)
            W.append([_on(d.W, dev, dtype) for d in ds])
            scales.append(torch.ones(len(mods), dtype=SMALL))
    return F, A, W, torch.stack(scales, -1).to(dev)


MIN_PIECE = 4
"""Fewest modules in one piece of a block's work (``build_blocks``); a piece has a fixed cost
(``PIECES_PER_WORKER``), so a piece of one module would be mostly that."""

PIECES_PER_WORKER = 4
"""About how many pieces of work each worker gets over a whole pool (``build_blocks``). A piece
has a fixed cost (its batched small calls: range checks, bases, spectra; a one-module piece took
~1.3 ms ad hoc), so more pieces balance the workers better but cost more. On the FLUX pool
(``bench/bench_decompose.py --pool-only --pieces-sweep 3,4,6,8,16,32 --threads 2 --rounds 10``)
3 to 8 per worker took 0.232–0.258 s median (within noise), 16 took 0.276 s and 32 took 0.340 s."""

GEMM_CALL_ROWS = 2048
"""A Gram GEMM call's fixed cost, in factor rows (``gram_cost``). Fitted to the FLUX pool's
pieces (``bench/bench_decompose.py --pool-only --timeline``): per module 0.72 ms at 3072×3072,
2.2 ms at 18432×3072, 1.4 ms at 3072×15360 (k = 4, rank 16, 2 workers); rows alone made the
wide modules look 1.5× costlier than they are."""


def build_blocks(vectors: list[TaskVector], cfg, dev, dtype, progress: Progress | None,
                 orders: Callable[[tuple[int, ...]], list[tuple[int, ...]]] | None = None,
                 groups: dict[tuple, list[str]] | None = None) -> list[Block]:
    """The pool's blocks with Grams, norms, bases and the spectra ``orders(members)`` names
    (``groups``: the pool's ``group_modules``, if the caller has it).

    All of it is per module (``_BlockJob.run``): the Grams while the module's factors are in the
    CPU's cache, the norms (checked before any eigen-solve), the bases T and the mode's spectra.
    The blocks' modules are cut into pieces of similar cost, and one queue of them, costliest
    first, feeds the worker threads (``parallel_tasks``): no worker waits at the end of a block
    for the other, and a slower core simply takes fewer pieces (docs/METHOD.md "Speed: one queue
    of pieces"). Results do not depend on the cut: every call is per module.
    """
    # 1. Which vectors have which module, with shape checks (error names module and shapes)
    groups = group_modules(vectors) if groups is None else groups
    total = sum(len(m) for m in groups.values())

    # 2. Per block: tall factors (a dense member's basis by SVD), and what its modules need
    jobs = []
    for sig, mods in groups.items():
        members = tuple(i for i, *_ in sig)
        k, (n, m) = len(members), sig[0][2]
        F, A, W, scale = block_inputs(vectors, members, mods, dev, dtype)
        dense_sq: list[torch.Tensor | None] = [None] * k
        for p in range(k):
            if W[p] is not None:  # dense: ‖W‖² in float64 (no underflow), basis by truncated SVD
                dense_sq[p] = torch.stack([torch.linalg.vector_norm(w, dtype=SMALL) ** 2 for w in W[p]])
                _check_finite(dense_sq[p], vectors, members[p], mods)
                U = [algorithm.dense_basis(w, rank=cfg.dense_rank, energy=cfg.dense_energy)[0] for w in W[p]]
                width = max(1, max(int((u.abs().sum(0) > 0).sum()) for u in U))
                F[p] = [u[:, :width].contiguous() for u in U]
        ords = [tuple(o) for o in orders(members)] if orders else []
        # the Grams the spectra read: the diagonal blocks and the chain C_12, C_23, …, C_k1 of each
        need = sorted({(p, p) for p in range(k)} | {
            (min(a, b), max(a, b)) for o in ords for a, b in zip(o, o[1:] + o[:1]) if a != b})
        jobs.append(_BlockJob(mods, members, (n, m), F, A, W, scale, dense_sq, need, algorithm.rank_rtol(n, m, dtype),
                              ords, cfg.symmetric, partial(_check_finite, vectors=vectors)))

    # 3. Pieces of similar cost, costliest first, on the worker threads
    w = workers(total // MIN_PIECE, torch.device(dev))
    pieces = cut_pieces([len(j.modules) for j in jobs], [j.cost() for j in jobs], w)
    left = [sum(1 for _, bi, _ in pieces if bi == i) for i in range(len(jobs))]
    done = [0]

    def finished(t: int) -> None:  # progress per block, as its last piece ends
        bi = pieces[t][1]
        left[bi] -= 1
        if left[bi] == 0 and progress:
            done[0] += len(jobs[bi].modules)
            progress(done[0], total, "bases and spectra")

    for j in jobs:
        j.allocate()
    results = parallel_tasks([partial(_attempt, jobs[bi].run, sl) for _, bi, sl in pieces], w, finished)
    errors = sorted((((bi, sl.start), r) for (_, bi, sl), r in zip(pieces, results) if r is not None), key=lambda e: e[0])
    if errors:  # the error a serial run would raise first: earliest block, then module
        raise errors[0][1]
    return [j.assemble() for j in jobs]


def cut_pieces(sizes: list[int], costs: list[float], w: int) -> list[tuple[float, int, slice]]:
    """Blocks of ``sizes`` modules, each module costing ``costs[block]``, cut into pieces of similar
    cost for ``w`` workers (about ``PIECES_PER_WORKER`` each, at least ``MIN_PIECE`` modules): a list
    of (cost, block, module slice), costliest first. One worker: one piece per block, in order."""
    target = sum(c * b for c, b in zip(costs, sizes)) / (w * PIECES_PER_WORKER)
    pieces = []
    for bi, (b, c) in enumerate(zip(sizes, costs)):
        parts = 1 if w < 2 else max(1, min(b // MIN_PIECE, round(c * b / target)))
        bounds = [b * i // parts for i in range(parts + 1)]
        pieces += [(c * (hi - lo), bi, slice(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    return sorted(pieces, key=lambda x: -x[0]) if w > 1 else pieces


def gram_cost(shape: tuple[int, int], widths: list[int], need: list[tuple[int, int]], lora: list[int]) -> float:
    """Relative cost of one module's Grams: per GEMM its factors' rows × width, plus
    ``GEMM_CALL_ROWS`` rows for the call itself (B side: the ``need`` pairs; A side: the ``lora``
    members)."""
    n, m = shape
    return (sum((n + GEMM_CALL_ROWS) * (widths[i] + widths[j]) / 2 for i, j in need)
            + sum((m + GEMM_CALL_ROWS) * widths[p] for p in lora))


def _attempt(fn: Callable, *args) -> Exception | None:
    """Run ``fn(*args)``; the exception it raised, or None (``build_blocks`` raises the earliest)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (re-raised by the caller, in pool order)
        return e
    return None


@dataclass
class _BlockJob:
    """One block's per-module work: ``run`` on a range of its modules (a piece, ``build_blocks``)
    writes that range's rows of ``out``; ``assemble`` makes the Block once every piece has run."""

    modules: list[str]
    members: tuple[int, ...]
    shape: tuple[int, int]
    F: list
    A: list
    W: list
    scale: torch.Tensor
    dense_sq: list
    need: list[tuple[int, int]]
    rtol: float
    orders: list[tuple[int, ...]]
    symmetric: bool
    check_finite: Callable  # (sq_norms, i=vector index, mods=module names) -> None; raises naming them

    out: dict = field(default_factory=dict)  # the block's results, filled piece by piece (``run``)

    def allocate(self) -> None:
        """Empty result tensors for all modules: each piece writes its rows, so no result is
        concatenated afterwards (~0.5 MB of copies per Gram of a 266-module block)."""
        b, k, dev = len(self.modules), len(self.members), self.scale.device
        w = [self.F[p][0].shape[1] for p in range(k)]
        new = lambda *shape, dtype=SMALL: torch.empty(b, *shape, dtype=dtype, device=dev)  # noqa: E731
        self.out = {
            "grams": {(i, j): new(w[i], w[j]) for i, j in self.need},
            "GA": [None if self.A[p] is None else new(w[p], w[p]) for p in range(k)],
            "T": [new(w[p], w[p]) for p in range(k)],
            "sq": new(k),
            "wide": new(dtype=torch.bool),
            "spectra": {o: (new(w[o[0]], dtype=COMPLEX), new(w[o[0]], w[o[0]], dtype=COMPLEX)) for o in self.orders},
            # s_i s_j per module, (b, 1, 1), for the Grams of the scaled factors; None where all are 1
            "pair_scale": {(i, j): None if bool((self.scale[:, [i, j]] == 1).all())
                           else (self.scale[:, i] * self.scale[:, j])[:, None, None] for i, j in self.need},
        }

    def cost(self) -> float:
        """Relative cost of one module's ``run`` (``gram_cost``: its Grams dominate)."""
        return gram_cost(self.shape, [F[0].shape[1] for F in self.F], self.need,
                         [p for p in range(len(self.F)) if self.A[p] is not None])

    def run(self, sl: slice) -> None:
        """Everything per module for modules ``sl``, written into ``out`` (``allocate`` first)."""
        grams, GA = self.grams(sl)
        T = self.bases(sl, grams, GA)
        out = self.out
        for p in range(len(self.members)):
            out["T"][p][sl] = T[p]
        for o, (vals, vecs) in self.spectra(grams, T).items():
            out["spectra"][o][0][sl] = vals
            out["spectra"][o][1][sl] = vecs

    def assemble(self) -> Block:
        """The block, from ``out`` once every piece has run."""
        o = self.out
        ranks = torch.stack([(t.abs().sum(-2) > 0).sum(-1) for t in o["T"]], -1)
        spectra = {order: Spectrum(order, vals, vecs) for order, (vals, vecs) in o["spectra"].items()}
        return Block(self.modules, self.members, self.shape, self.F, self.A, self.W, self.scale,
                     o["wide"], o["grams"], o["GA"], o["T"], ranks, o["sq"], spectra)

    def grams(self, sl: slice):
        """The Grams of modules ``sl`` in float64, scaled: {(i, j): (s_iF_i)ᵀ(s_jF_j)}, [A_p A_pᵀ]
        (views of ``out``, written there, as is ``wide``).

        GEMMs in the compute dtype, module-major: the diagonal blocks and every cross block the
        spectra need, while the module's factors are in the CPU's cache (each factor is read from
        memory once; with rank 16 these GEMMs are bound by that read). Modules whose Grams left the
        dtype's range (``wide``) are redone in float64: factors ~1e-30 square to 0 in float32,
        ~1e+30 to inf."""
        F, A, need, k = self.F, self.A, self.need, len(self.F)
        lora = [p for p in range(k) if A[p] is not None]
        f0, nb, mm = F[0][sl.start], sl.stop - sl.start, torch.mm
        G32 = {(i, j): f0.new_empty(nb, F[i][sl.start].shape[1], F[j][sl.start].shape[1]) for i, j in need}
        GA32 = {p: f0.new_empty(nb, A[p][sl.start].shape[0], A[p][sl.start].shape[0]) for p in lora}
        g, ga = {ij: x.unbind(0) for ij, x in G32.items()}, {p: x.unbind(0) for p, x in GA32.items()}
        for t, b in enumerate(range(sl.start, sl.stop)):  # each product straight into its row
            for i, j in need:
                mm(F[i][b].mT, F[j][b], out=g[(i, j)][t])
            for p in lora:
                mm(A[p][b], A[p][b].mT, out=ga[p][t])
        wide = self.out["wide"][sl]
        if lora:
            wide.copy_(_edge([G32[(p, p)] for p in lora] + [GA32[p] for p in lora]))
        else:
            wide.zero_()
        G = {ij: self.out["grams"][ij][sl] for ij in need}  # views of the block's results
        GA = [self.out["GA"][p][sl] if p in lora else None for p in range(k)]
        for ij, x in G32.items():
            G[ij].copy_(x)
        for p in lora:
            GA[p].copy_(GA32[p])
        if f0.dtype != SMALL:
            for r in wide.nonzero().flatten().tolist():
                b = sl.start + r
                for i, j in need:
                    G[(i, j)][r] = F[i][b].to(SMALL).mT @ F[j][b].to(SMALL)
                for p in lora:
                    a = A[p][b].to(SMALL)
                    GA[p][r] = a @ a.mT
        for ij, x in G.items():
            if self.out["pair_scale"][ij] is not None:
                x.mul_(self.out["pair_scale"][ij][sl])
        return G, GA

    def bases(self, sl: slice, grams: dict, GA: list) -> list[torch.Tensor]:
        """The squared norms ‖ΔW_p‖² (written into ``out``, checked before any eigen-solve) and
        the bases' T (Q = s·F·T), returned."""
        F, W, k = self.F, self.W, len(self.F)
        sq = self.out["sq"][sl]  # (b, k) view
        T: list = [None] * k
        for p in range(k):
            if W[p] is not None:
                sq[:, p] = self.dense_sq[p][sl]
                keep = grams[(p, p)].diagonal(dim1=-2, dim2=-1) > 0.5  # orthonormal kept columns (G = I there)
                T[p] = torch.diag_embed(keep.to(SMALL))
            else:
                sq[:, p] = algorithm.sq_norm_from_grams(grams[(p, p)], GA[p])
        if not bool(torch.isfinite(sq).all()):
            for p in range(k):  # the first member with a bad module names it
                self.check_finite(sq[:, p], i=self.members[p], mods=self.modules[sl])
        widths = [F[p][sl.start].shape[1] for p in range(k)]
        lora = [p for p in range(k) if W[p] is None]
        for w in sorted({widths[p] for p in lora}):  # one batched call per LoRA width
            ps = [p for p in lora if widths[p] == w]
            Ts = algorithm.lowrank_bases(torch.stack([grams[(p, p)] for p in ps], 1),
                                         torch.stack([GA[p] for p in ps], 1), self.rtol)  # (b, len(ps), w, w)
            for j, p in enumerate(ps):
                T[p] = Ts[:, j]
        return T

    def spectra(self, grams: dict, T: list) -> dict:
        """The spectra of ``orders``: chain C_12 ⋯ C_k1 with C_ij = T_iᵀ (s_iF_i)ᵀ(s_jF_j) T_j."""
        def cross(i, j):
            x = grams[(i, j)] if (i, j) in grams else grams[(j, i)].mT
            return T[i].mT @ x @ T[j]

        return {o: algorithm.chain_spectrum([cross(a, b) for a, b in zip(o, o[1:] + o[:1])], symmetric=self.symmetric)
                for o in self.orders}


def _check_finite(sq_norms: torch.Tensor, vectors: list[TaskVector], i: int, mods: list[str]) -> None:
    """A squared norm that is not finite: NaN/Inf in the input, or an overflow (named as such)."""
    bad = ~torch.isfinite(sq_norms)
    if not bad.any():
        return
    mod = mods[int(bad.nonzero()[0])]
    d = vectors[i].modules[mod]
    tensors = {"B": d.B, "A": d.A} if isinstance(d, LowRank) else {"W": d.W}
    for part, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"task vector {vectors[i].name!r}, module {mod!r}: {part} contains NaN/Inf")
    big = max(float(t.abs().max()) for t in tensors.values()) if all(t.numel() for t in tensors.values()) else 0.0
    raise ValueError(
        f"task vector {vectors[i].name!r}, module {mod!r}: overflow: its squared norm exceeds the float64 range "
        f"(largest factor entry {big:.3g}, scale {getattr(d, 'scale', 1.0):.3g}); rescale the input"
    )


def check_not_zero(vectors: list[TaskVector], blocks: list[Block]) -> None:
    """A vector whose every module is exactly zero has nothing to decompose: refuse it plainly."""
    total = torch.zeros(len(vectors), dtype=SMALL)
    for blk in blocks:
        for p, i in enumerate(blk.members):
            total[i] += blk.sq_norms[:, p].sum().cpu()
    zero = [v for i, v in enumerate(vectors) if total[i] == 0 and v.modules]
    if zero:
        v = zero[0]
        raise ValueError(
            f"task vector {v.name!r} is all zero (all {len(v.modules)} of its module deltas are 0): "
            "nothing to decompose; remove it from the pool"
        )
