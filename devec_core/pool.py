"""Decompose a pool of task vectors over all their modules: batching, modes, τ re-thresholds.

``decompose(vectors, tau=0.85, mode="joint")`` is the entry point. Modules whose inputs have the
same shapes, kinds and members are stacked into one block, so a FLUX pool of ~500 modules costs
a handful of batched calls instead of thousands of tiny ones. Everything that does not depend on
τ (bases, spectra, projections onto the first basis, Gram matrices) is kept; ``with_tau`` then
re-selects eigenvectors with small r×r operations only — no new SVD of any factor.

Modes (docs/METHOD.md):
  joint     one shared subspace common to all vectors that have the module; parts per vector
            and the merged shared vector S (eq. 14).
  pairwise  the shared vector of every pair (i, j), i before j in pool order; a vector's unique
            part removes what it shares with any other vector (union of its pair subspaces).
  isolate   the unique part of one target against references: the union of what the target
            shares with each reference, projected out once ("union", order-free, default) or
            one reference after another ("sequential", recomputes bases per τ).
A module that fewer than two vectors have is entirely unique (nothing to share with).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from . import algorithm as D
from .taskvec import Delta, Dense, LowRank, TaskVector

MODES = ("joint", "pairwise", "isolate")
ISOLATE_ORDERS = ("union", "sequential")
METHOD_VERSION = "devec-2"  # devec-2: isolate union rule, balanced bases, precision-aware τ slack
STATE_FORMAT = 1  # Decomposition.state_dict layout

Progress = Callable[[int, int, str], None]

# Budget defaults (docs/METHOD.md "Work budget"). Calibrated on this project's 2-core CPU, where the
# estimate runs at ~2e10 per second: the FLUX pool (494 modules, 4 rank-16 LoRAs) is ~4e10, a 7B LLM
# pool of 4 rank-64 LoRAs on all 224 projections ~3e11; the default allows ~2 minutes.
MAX_WORK = 2e12
MAX_MEMORY = 8 * 2**30


class WorkBudgetError(ValueError):
    """A pool whose estimated cost exceeds ``Config.max_work`` / ``max_memory`` (refused before any work)."""


@dataclass(frozen=True)
class Config:
    """Every parameter of a decomposition except τ (τ is cheap to change)."""

    mode: str = "joint"
    target: str | None = None  # isolate: the vector to clean; pairwise/joint: unused
    references: tuple[str, ...] | None = None  # isolate: default = every other vector
    isolate_order: str = "union"
    symmetric: bool = False  # symmetric spectrum variant instead of the chained product
    dense_rank: int | None = None  # dense deltas: keep at most this many directions
    dense_energy: float | None = 0.9  # dense deltas: keep this fraction of ‖ΔW‖_F²
    dtype: str = "float32"  # "float32" | "float64"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    max_work: float = MAX_WORK  # budget: estimated floating-point operations (``estimate_work``)
    max_memory: int = MAX_MEMORY  # budget: estimated bytes of the engine's own matrices

    def validate(self, names: list[str]) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Unknown mode {self.mode!r}; expected one of {MODES}")
        if self.isolate_order not in ISOLATE_ORDERS:
            raise ValueError(f"Unknown isolate_order {self.isolate_order!r}; expected one of {ISOLATE_ORDERS}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        if self.dense_rank is not None and (not isinstance(self.dense_rank, int) or self.dense_rank < 1):
            raise ValueError(f"dense_rank must be a positive integer; got {self.dense_rank!r}")
        if self.dense_energy is not None and not (0.0 < self.dense_energy <= 1.0):
            raise ValueError(f"dense_energy must be in (0, 1]; got {self.dense_energy!r}")
        for key in ("max_work", "max_memory"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{key} must be a positive number; got {v!r}")
        if self.mode == "isolate":
            if self.target not in names:
                raise ValueError(f"isolate mode needs a target among {names}; got {self.target!r}")
            for r in self.references or ():
                if r not in names or r == self.target:
                    raise ValueError(f"reference {r!r} must be a vector of the pool other than the target")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ---------------------------------------------------------------------------------------------
# Blocks: same-signature modules, their small matrices stacked on dim 0
# ---------------------------------------------------------------------------------------------

SMALL = torch.float64  # every r×r computation runs in float64: cheap, and it spends no precision


@dataclass
class _Spectrum:
    """τ-independent data of one ordered tuple of members (the first is the basis side)."""

    order: tuple[int, ...]  # positions within the block's members
    eigvals: torch.Tensor  # (b, p1) complex
    eigvecs: torch.Tensor  # (b, p1, p1) complex


@dataclass
class _Block:
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
    spectra: dict[tuple[int, ...], _Spectrum] = field(default_factory=dict)
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

    def spectrum(self, order: tuple[int, ...], symmetric: bool) -> _Spectrum:
        if order not in self.spectra:
            chain = [self.cross(a, b) for a, b in zip(order, order[1:] + order[:1])]
            vals, vecs = D.chain_spectrum(chain, symmetric=symmetric)
            self.spectra[order] = _Spectrum(order, vals, vecs)
        return self.spectra[order]

    def factor(self, p: int, b: int) -> torch.Tensor:
        """Member p's own delta factor X for module b: scaled B (n, r) or dense W (n, m)."""
        return self.W[p][b] if self.W[p] is not None else self.F[p][b] * float(self.scale[b, p])

    def project(self, f: int, Y: torch.Tensor, i: int) -> list[torch.Tensor]:
        """Z Zᵀ X_i per module with Z = Q_f Y: s_f F_f (T_f Y Yᵀ Q_fᵀ X_i), one GEMM each."""
        K = self.T[f] @ Y @ (Y.mT @ self.proj(f, i)) * self.scale[:, f, None, None]
        K = _in_range(K, self.F[f][0].dtype, self.modules)
        return [Ff @ k for Ff, k in zip(self.F[f], K)]

    def basis(self, p: int, b: int) -> torch.Tensor:
        """The orthonormal basis Q (n, p_i) of member p for module b (zero columns where cut)."""
        Tb = _in_range(self.T[p][b : b + 1] * self.scale[b, p], self.F[p][b].dtype, self.modules[b : b + 1])[0]
        return self.F[p][b] @ Tb

    def shared_sq_norm(self, f: int, Y: torch.Tensor, i: int) -> torch.Tensor:
        """‖Z Zᵀ ΔW_i‖_F² = ‖Yᵀ Q_fᵀ X_i · A_i‖² from small products; (b,)."""
        core = Y.mT @ self.proj(f, i)
        if self.GA[i] is None:
            return core.pow(2).sum((-1, -2))
        return ((core @ self.GA[i]) * core).sum((-1, -2))


def _in_range(K: torch.Tensor, dtype: torch.dtype, mods: list[str]) -> torch.Tensor:
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


def _edge(G: torch.Tensor) -> torch.Tensor:
    """(b,) True where a Gram's diagonal left the normal range of its dtype: an entry below
    tiny/eps (its factor column underflowed, or is zero) or not finite (overflow, or NaN)."""
    d = G.diagonal(dim1=-2, dim2=-1)
    lim = torch.finfo(G.dtype).tiny / torch.finfo(G.dtype).eps
    return (~torch.isfinite(d) | (d < lim)).any(-1)


def _signature(deltas: list[tuple[int, Delta]]):
    return tuple((i, type(d).__name__, tuple(d.shape), getattr(d, "rank", None)) for i, d in deltas)


def _group_modules(vectors: list[TaskVector]) -> dict[tuple, list[str]]:
    """Modules grouped by signature (members, kinds, shapes, ranks); shapes checked across vectors."""
    present: dict[str, list[tuple[int, Delta]]] = {}
    for i, v in enumerate(vectors):
        for mod, d in v.modules.items():
            present.setdefault(mod, []).append((i, d))
    groups: dict[tuple, list[str]] = {}
    for mod, deltas in present.items():
        i0, d0 = deltas[0]
        for i, d in deltas[1:]:
            if tuple(d.shape) != tuple(d0.shape):
                raise ValueError(
                    f"module {mod!r}: shape {tuple(d0.shape)} in {vectors[i0].name!r} but {tuple(d.shape)} "
                    f"in {vectors[i].name!r} (task vectors for different base models?)"
                )
        groups.setdefault(_signature(deltas), []).append(mod)
    return groups


def _block_inputs(vectors, members, mods, dev, dtype):
    """Per member: (F, A, W, scale) lists for the block's modules, no copies where dtype/device match.
    Dense members get F = None here (their basis needs an SVD)."""
    F, A, W, scales = [], [], [], []
    for i in members:
        ds = [vectors[i].modules[mod] for mod in mods]
        if isinstance(ds[0], LowRank):
            F.append([d.B.to(dev, dtype) for d in ds])
            A.append([d.A.to(dev, dtype) for d in ds])
            W.append(None)
            scales.append(torch.tensor([float(d.scale) for d in ds], dtype=SMALL))
        else:
            F.append(None)
            A.append(None)
            W.append([d.W.to(dev, dtype) for d in ds])
            scales.append(torch.ones(len(mods), dtype=SMALL))
    return F, A, W, torch.stack(scales, -1).to(dev)


def _build_blocks(vectors: list[TaskVector], cfg: Config, dev, dtype, progress: Progress | None) -> list[_Block]:
    # 1. Which vectors have which module, with shape checks (error names module and shapes)
    groups = _group_modules(vectors)
    total = sum(len(m) for m in groups.values())

    # 2. Per block: tall factors, diagonal Grams, bases (cross Grams come later, when needed)
    blocks, done = [], 0
    for sig, mods in groups.items():
        members = tuple(i for i, *_ in sig)
        k, (n, m) = len(members), sig[0][2]
        F, A, W, scale = _block_inputs(vectors, members, mods, dev, dtype)
        sq: list[torch.Tensor | None] = [None] * k
        for p in range(k):
            if W[p] is not None:  # dense: ‖W‖² in float64 (no underflow), basis by truncated SVD
                sq[p] = torch.stack([torch.linalg.vector_norm(w, dtype=SMALL) ** 2 for w in W[p]])
                _check_finite(sq[p], vectors, members[p], mods)
                U = [D.dense_basis(w, rank=cfg.dense_rank, energy=cfg.dense_energy)[0] for w in W[p]]
                width = max(1, max(int((u.abs().sum(0) > 0).sum()) for u in U))
                F[p] = [u[:, :width].contiguous() for u in U]
        # 2a. diagonal Grams in the compute dtype; modules whose Grams left its range are redone in
        #     float64 (factors ~1e-30 square to 0 in float32, ~1e+30 to inf)
        diag = [torch.stack([f.mT @ f for f in F[p]]) for p in range(k)]
        GA = [None if A[p] is None else torch.stack([a @ a.mT for a in A[p]]) for p in range(k)]
        wide = torch.zeros(len(mods), dtype=torch.bool, device=dev)
        for p in range(k):
            if A[p] is not None:
                wide |= _edge(diag[p]) | _edge(GA[p])
        diag = [g.to(SMALL) for g in diag]
        GA = [None if g is None else g.to(SMALL) for g in GA]
        if dtype != SMALL:
            for b in wide.nonzero().flatten().tolist():
                for p in range(k):
                    f = F[p][b].to(SMALL)
                    diag[p][b] = f.mT @ f
                    if A[p] is not None:
                        a = A[p][b].to(SMALL)
                        GA[p][b] = a @ a.mT
        grams = {(p, p): diag[p] * (scale[:, p] ** 2)[:, None, None] for p in range(k)}
        # 2b. norms (checked before any eigen-solve), bases
        T: list[torch.Tensor | None] = [None] * k
        for p in range(k):
            if W[p] is not None:
                keep = grams[(p, p)].diagonal(dim1=-2, dim2=-1) > 0.5  # orthonormal kept columns (G = I there)
                T[p] = torch.diag_embed(keep.to(SMALL))
            else:
                sq[p] = D.sq_norm_from_grams(grams[(p, p)], GA[p])
                _check_finite(sq[p], vectors, members[p], mods)
        rtol = D.rank_rtol(n, m, dtype)
        widths = [F[p][0].shape[1] for p in range(k)]
        for w in {widths[p] for p in range(k) if T[p] is None}:  # one batched call per LoRA width
            ps = [p for p in range(k) if T[p] is None and widths[p] == w]
            GB = torch.stack([grams[(p, p)] for p in ps], 1)
            Ts = D.lowrank_basis(GB, torch.stack([GA[p] for p in ps], 1), rtol)[0]  # (b, len(ps), w, w)
            for j, p in enumerate(ps):
                T[p] = Ts[:, j]
        ranks = torch.stack([(t.abs().sum(-2) > 0).sum(-1) for t in T], -1)
        blocks.append(_Block(mods, members, (n, m), F, A, W, scale, wide, grams, GA, T, ranks, torch.stack(sq, -1)))
        done += len(mods)
        if progress:
            progress(done, total, "bases")
    return blocks


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


def _check_not_zero(vectors: list[TaskVector], blocks: list[_Block]) -> None:
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


# ---------------------------------------------------------------------------------------------
# The decomposition
# ---------------------------------------------------------------------------------------------


def decompose(
    vectors: Iterable[TaskVector],
    tau: float = 0.85,
    mode: str = "joint",
    target: str | None = None,
    progress: Progress | None = None,
    **options,
) -> "Decomposition":
    """Decompose a pool of task vectors (pool order matters: see docs/METHOD.md "Order").

    Args:
        vectors: the pool, in the user's order.
        tau: eigenvalue threshold in (0, 1]; 0.85 is the paper's value.
        mode: "joint", "pairwise" or "isolate" (needs ``target``).
        progress: called as progress(done, total, stage).
        options: the other fields of ``Config`` (dense_rank, dense_energy, dtype, device, ...).
    """
    vectors = list(vectors)
    names = [v.name for v in vectors]
    # 1. Check inputs (cheap: names, options, ranks, the work budget; no tensor is read)
    if not vectors:
        raise ValueError("empty pool: give at least one task vector")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate task vector names in the pool: {dup}")
    cfg = Config(mode=mode, target=target, **options)
    cfg.validate(names)
    D.check_tau(tau)
    for v in vectors:
        v.check_ranks()
    check_budget(vectors, cfg)
    # 2. Bases (Grams, numerical ranks), refusing all-zero vectors; 3. spectra
    dev, dtype = cfg.torch_device(), cfg.torch_dtype
    blocks = _build_blocks(vectors, cfg, dev, dtype, progress)
    _check_not_zero(vectors, blocks)
    dec = Decomposition(names, cfg, blocks, tau, vectors)
    dec._precompute_spectra(progress)
    return dec


def _n_orders(cfg: Config, members: list[int], names: list[str]) -> int:
    """How many spectra a module with these members needs in this mode."""
    k = len(members)
    if k < 2:
        return 0
    if cfg.mode == "joint":
        return 1
    if cfg.mode == "pairwise":
        return k * (k - 1)
    t = names.index(cfg.target)
    refs = [names.index(r) for r in cfg.references] if cfg.references else [i for i in range(len(names)) if i != t]
    return len([i for i in refs if i in members]) if t in members else 0


def estimate_work(vectors: list[TaskVector], cfg: Config) -> tuple[float, float, str]:
    """Estimated cost of decomposing a pool, from shapes and ranks only (no tensor is read).

    Per module with members of widths r_i (a LoRA's rank; a dense delta's min(n, m), its SVD
    bound), P = Σ r_i, r = max r_i and o spectra (1 joint, k(k−1) pairwise, #references isolate):
        work  = 2nP² + Σ_LoRA 2m r_i² + Σ_dense 6nm·min(n, m) + 30(k + o) r³   (flops)
        bytes = 8P² + 32 Σ r_i² + 32 o r²          (the Grams, bases, complex eigenvectors)
    The r³ term is the r×r eigen-solves (measured: two rank-2048 LoRAs on a 1×1 module, 39 s).
    Returns (work, bytes, the costliest module).
    """
    names = [v.name for v in vectors]
    present: dict[str, list[tuple[int, Delta]]] = {}
    for i, v in enumerate(vectors):
        for mod, d in v.modules.items():
            present.setdefault(mod, []).append((i, d))
    work = memory = 0.0
    worst, worst_work = "", -1.0
    for mod, deltas in present.items():
        n, m = deltas[0][1].shape
        widths = [d.rank if isinstance(d, LowRank) else min(n, m) for _, d in deltas]
        P, r, o = sum(widths), max(widths), _n_orders(cfg, [i for i, _ in deltas], names)
        w = 2.0 * n * P * P + 30.0 * (len(deltas) + o) * r**3
        for (_, d), ri in zip(deltas, widths):
            w += 2.0 * m * ri * ri if isinstance(d, LowRank) else 6.0 * n * m * min(n, m)
        work += w
        memory += 8.0 * P * P + 32.0 * sum(x * x for x in widths) + 32.0 * o * r * r
        if w > worst_work:
            worst, worst_work = mod, w
    return work, memory, worst


def check_budget(vectors: list[TaskVector], cfg: Config) -> None:
    """Refuse a pool whose estimated work or memory exceeds the config's budget (``WorkBudgetError``)."""
    work, memory, worst = estimate_work(vectors, cfg)
    if work <= cfg.max_work and memory <= cfg.max_memory:
        return
    ranks = {v.name: v.modules[worst].rank for v in vectors if isinstance(v.modules.get(worst), LowRank)}
    shape = next(v.modules[worst].shape for v in vectors if worst in v.modules)
    what = (f"estimated work {work:.3g} flops exceeds max_work = {cfg.max_work:.3g}" if work > cfg.max_work
            else f"estimated memory {memory / 2**30:.3g} GiB exceeds max_memory = {cfg.max_memory / 2**30:.3g} GiB")
    raise WorkBudgetError(
        f"pool refused before any work: {what} (costliest module {worst!r}, shape {shape}, ranks {ranks}); "
        "raise the budget (Config.max_work / max_memory) if this pool is meant"
    )


class Decomposition:
    """A pool's decomposition at one τ. ``with_tau`` shares every τ-independent tensor."""

    def __init__(self, names, cfg: Config, blocks: list[_Block], tau: float, vectors: list[TaskVector]):
        self.names, self.config, self.blocks = list(names), cfg, blocks
        self.tau = D.check_tau(tau)
        self.vectors = vectors  # for extras (biases) and metadata; the math uses the blocks
        self._sel: dict = {}  # (block idx, order) -> (Y, dim), at self.tau

    # --- τ-independent ----------------------------------------------------------------------
    def _orders(self, blk: _Block) -> list[tuple[int, ...]]:
        k = len(blk.members)
        if k < 2:
            return []
        if self.config.mode == "joint":
            return [tuple(range(k))]
        if self.config.mode == "pairwise":
            return [(a, b) for a in range(k) for b in range(k) if a != b]
        t = self._target_pos(blk)
        return [] if t is None else [(t, p) for p in self._ref_positions(blk)]

    def _target_pos(self, blk: _Block) -> int | None:
        t = self.names.index(self.config.target)
        return blk.members.index(t) if t in blk.members else None

    def _ref_positions(self, blk: _Block) -> list[int]:
        refs = self.config.references or tuple(n for n in self.names if n != self.config.target)
        ids = [self.names.index(r) for r in refs]
        return [blk.members.index(i) for i in ids if i in blk.members]

    def _precompute_spectra(self, progress: Progress | None = None) -> None:
        total, done = sum(len(b.modules) for b in self.blocks), 0
        sequential = self.config.mode == "isolate" and self.config.isolate_order == "sequential"
        for blk in self.blocks:
            if not sequential:
                for order in self._orders(blk):
                    blk.spectrum(order, self.config.symmetric)
            done += len(blk.modules)
            if progress:
                progress(done, total, "spectra")

    # --- τ-independent state without the inputs (cache entries) -------------------------------
    def state_dict(self) -> dict:
        """The τ-independent tensors that are small, as plain containers (no factor of the inputs).

        Per block: module names, members, scales, the Gram matrices computed so far, A Aᵀ, the
        bases' small matrices T, ranks, norms, spectra (eigenvalues, eigenvectors) and the
        projections computed so far; for dense members also their kept left singular vectors
        (an SVD of the input: not cheap to redo). The LoRA factors and dense deltas themselves are
        not stored: ``from_state_dict`` takes them from the vectors.
        """
        blocks = []
        for blk in self.blocks:
            blocks.append({
                "modules": list(blk.modules), "members": tuple(blk.members), "shape": tuple(blk.shape),
                "scale": blk.scale, "wide": blk.wide, "grams": dict(blk.grams),
                "GA": list(blk.GA), "T": list(blk.T), "ranks": blk.ranks, "sq_norms": blk.sq_norms,
                "spectra": {o: (sp.eigvals, sp.eigvecs) for o, sp in blk.spectra.items()},
                "proj": dict(blk._proj),
                "dense_F": {p: blk.F[p] for p in range(len(blk.members)) if blk.W[p] is not None},
            })
        return {"format": STATE_FORMAT, "method_version": METHOD_VERSION, "names": list(self.names),
                "config": dataclasses.asdict(self.config), "blocks": blocks}

    @classmethod
    def from_state_dict(cls, state: dict, vectors: list[TaskVector], tau: float = 0.85) -> "Decomposition":
        """Rebuild a decomposition from ``state_dict()`` and the same vectors (no SVD, no eigen-solve).

        Raises ValueError if the state was written by another format, or the vectors do not fit it
        (names, modules, kinds, shapes or ranks differ).
        """
        if state.get("format") != STATE_FORMAT or state.get("method_version") != METHOD_VERSION:
            raise ValueError(f"decomposition state of another format ({state.get('format')!r}, {state.get('method_version')!r})")
        vectors = list(vectors)
        names = [v.name for v in vectors]
        if names != list(state["names"]):
            raise ValueError(f"decomposition state is for vectors {list(state['names'])}, not {names}")
        cfg_d = dict(state["config"])
        if cfg_d.get("references") is not None:
            cfg_d["references"] = tuple(cfg_d["references"])
        cfg = Config(**cfg_d)
        dev, dtype = cfg.torch_device(), cfg.torch_dtype
        groups = _group_modules(vectors)
        seen = {m: sig for sig, mods in groups.items() for m in mods}
        blocks = []
        for st in state["blocks"]:
            mods, members = list(st["modules"]), tuple(st["members"])
            sigs = {seen.get(m) for m in mods}
            want = tuple(
                (i, "Dense" if st["GA"][p] is None else "LowRank", tuple(st["shape"]),
                 None if st["GA"][p] is None else st["T"][p].shape[-1])
                for p, i in enumerate(members)
            )
            if sigs != {want}:
                raise ValueError(f"decomposition state does not fit the vectors (block of {mods[0]!r})")
            F, A, W, _ = _block_inputs(vectors, members, mods, dev, dtype)
            for p, Fs in st["dense_F"].items():
                F[p] = [f.to(dev) for f in Fs]
            to = lambda t: None if t is None else t.to(dev)  # noqa: E731
            blk = _Block(
                mods, members, tuple(st["shape"]), F, A, W, to(st["scale"]), to(st["wide"]),
                {tuple(k): to(g) for k, g in st["grams"].items()}, [to(g) for g in st["GA"]], [to(t) for t in st["T"]],
                to(st["ranks"]), to(st["sq_norms"]),
                {tuple(o): _Spectrum(tuple(o), to(v), to(e)) for o, (v, e) in st["spectra"].items()},
                {tuple(k): to(x) for k, x in st["proj"].items()},
            )
            blocks.append(blk)
        if sum(len(b.modules) for b in blocks) != len(seen):
            raise ValueError("decomposition state does not cover every module of the vectors")
        return cls(names, cfg, blocks, tau, vectors)

    def with_tau(self, tau: float) -> "Decomposition":
        """The same decomposition at another τ: re-selects eigenvectors, no new SVD."""
        return Decomposition(self.names, self.config, self.blocks, tau, self.vectors)

    # --- selection at τ ---------------------------------------------------------------------
    def _select(self, bi: int, order: tuple[int, ...]):
        key = (bi, order)
        if key not in self._sel:
            sp = self.blocks[bi].spectrum(order, self.config.symmetric)
            self._sel[key] = D.select_shared(sp.eigvals, sp.eigvecs, self.tau, self.precision)
        return self._sel[key]

    def _removed(self, bi: int, pos: int) -> tuple[int, torch.Tensor] | None:
        """(f, Y): what is removed from member `pos` is spanned by Z = Q_f Y; None if nothing.

        joint: the common subspace, in the first member's basis (f = 0), for every member.
        pairwise / isolate: the union of member pos's pair subspaces, in its own basis (f = pos).
        """
        blk, mode = self.blocks[bi], self.config.mode
        if len(blk.members) < 2:
            return None
        if mode == "joint":
            return 0, self._select(bi, tuple(range(len(blk.members))))[0]
        if mode == "isolate" and pos != self._target_pos(blk):
            return None
        Ys = [self._select(bi, order)[0] for order in self._orders(blk) if order[0] == pos]
        return (pos, D.union_basis(Ys, self.tau, self.precision)) if Ys else None

    @property
    def precision(self) -> torch.dtype:
        """The dtype the Grams were computed in: it sets the slack on τ (docs/METHOD.md "τ slack")."""
        return self.config.torch_dtype

    @property
    def _sequential(self) -> bool:
        return self.config.mode == "isolate" and self.config.isolate_order == "sequential"

    def _shared_X(self, bi: int, pos: int) -> list[torch.Tensor | None]:
        """Z Zᵀ X for member `pos` of block `bi`, per module (None: nothing removed)."""
        blk = self.blocks[bi]
        if self._sequential:
            if pos != self._target_pos(blk) or len(blk.members) < 2:
                return [None] * len(blk.modules)
            return self._sequential_shared(bi)
        removed = self._removed(bi, pos)
        if removed is None:
            return [None] * len(blk.modules)
        f, Y = removed
        return blk.project(f, Y, pos)

    def _sequential_shared(self, bi: int) -> list[torch.Tensor]:
        """Isolate, sequential: remove what the remainder shares with ref 1, then ref 2, ...
        Recomputes the remainder's basis for every reference (per module; the slow option)."""
        key = (bi, "sequential")
        if key not in self._sel:
            blk, cfg = self.blocks[bi], self.config
            t = self._target_pos(blk)
            out = []
            for b in range(len(blk.modules)):
                X = blk.factor(t, b)
                R = X
                for p in self._ref_positions(blk):
                    Qp = blk.basis(p, b).to(SMALL)
                    if blk.A[t] is None:
                        Qr = D.dense_basis(R.to(SMALL), rank=cfg.dense_rank, energy=cfg.dense_energy)[0]
                    else:
                        Rs, As = R.to(SMALL), blk.A[t][b].to(SMALL)
                        Qr = Rs @ D.lowrank_basis(Rs.mT @ Rs, As @ As.mT, D.rank_rtol(*blk.shape, R.dtype))[0]
                    C = Qr.mT @ Qp
                    vals, vecs = D.chain_spectrum([C, C.mT], symmetric=cfg.symmetric)
                    Y, _ = D.select_shared(vals, vecs, self.tau, self.precision)
                    R = R - (Qr @ (Y @ (Y.mT @ (Qr.mT @ R.to(SMALL))))).to(R.dtype)
                out.append(X - R)
            self._sel[key] = out
        return self._sel[key]

    # --- public: components ------------------------------------------------------------------
    def component(self, kind: str, name: str | None = None) -> dict[str, Delta]:
        """One component as module → delta (on the CPU, in the decomposition's dtype).

        kind: "delta" (the original), "unique", "shared" (that vector's shared part),
              "merged_shared" (eq. 14, joint mode), "pair_shared" (pairwise mode, name "a+b").
        A LoRA's unique/shared parts are LoRAs of its rank with the same A; dense stays dense.
        """
        if kind == "merged_shared":
            if self.config.mode != "joint":
                raise ValueError(f"merged_shared is defined in joint mode; this decomposition is {self.config.mode!r}")
            return self._eq14_all(lambda blk: tuple(range(len(blk.members))) if len(blk.members) > 1 else None)
        if kind == "pair_shared":
            if self.config.mode != "pairwise":
                raise ValueError(f"pair_shared is defined in pairwise mode; this decomposition is {self.config.mode!r}")
            a, b = _split_pair(name, self.names)
            return self._eq14_all(
                lambda blk: (blk.members.index(a), blk.members.index(b)) if a in blk.members and b in blk.members else None
            )
        if kind not in ("delta", "unique", "shared"):
            raise ValueError(f"Unknown component kind {kind!r}; expected delta, unique, shared, merged_shared, pair_shared")
        if name not in self.names:
            raise ValueError(f"Unknown task vector {name!r}; the pool has {self.names}")
        i = self.names.index(name)
        out: dict[str, Delta] = {}
        for bi, blk in enumerate(self.blocks):
            if i not in blk.members:
                continue
            pos = blk.members.index(i)
            shared = self._shared_X(bi, pos) if kind != "delta" else [None] * len(blk.modules)
            for b, mod in enumerate(blk.modules):
                X, S = blk.factor(pos, b), shared[b]
                if kind == "shared":
                    part = S if S is not None else torch.zeros_like(X)
                else:
                    part = X if S is None else X - S
                out[mod] = _as_delta(part, None if blk.A[pos] is None else blk.A[pos][b])
        return out

    def _eq14_all(self, order_of) -> dict[str, Delta]:
        out: dict[str, Delta] = {}
        for bi, blk in enumerate(self.blocks):
            order = order_of(blk)
            if order is not None:
                out.update(self._eq14(bi, order))
        return out

    def _eq14(self, bi: int, order: tuple[int, ...]) -> dict[str, Delta]:
        """S = Z [Σ w_i Zᵀ ΔW_i / Σ w_i], Z = Q_f Y, as a LowRank of rank s per module (eq. 14)."""
        blk = self.blocks[bi]
        f = order[0]
        Y, dims = self._select(bi, order)
        sq = torch.stack([blk.shared_sq_norm(f, Y, p) for p in order], -1)
        w = D.merge_weights(sq)  # (b, k)
        Zsmall = blk.T[f] @ Y * blk.scale[:, f, None, None]  # Z = F_f · Zsmall, (b, p_f, r_f)
        out = {}
        for b, mod in enumerate(blk.modules):
            s = int(dims[b])
            Ff = blk.F[f][b]
            cs = [(Y[b].mT @ blk.proj(f, p)[b])[:s] for p in order]  # Zᵀ X_p, (s, r|m) SMALL
            # range guard: S = (αZ)(core/α) with α a power of two near max|Zᵀ X_p| when that is far
            # from 1, so factors ~1e±30 (float32) keep S's factors in range; exact (α = 2^k)
            big = max((float(c.abs().max()) for c in cs if c.numel()), default=1.0)
            e = round(math.log2(big)) if big > 0 else 0
            alpha = 2.0**e if abs(e) > 30 else 1.0
            core = torch.zeros(s, blk.shape[1], dtype=Ff.dtype, device=Ff.device)
            for j, (p, c) in enumerate(zip(order, cs)):
                c = _in_range((c / alpha).unsqueeze(0), Ff.dtype, [mod])[0]
                core = core + float(w[b, j]) * (c if blk.A[p] is None else c @ blk.A[p][b])
            Z = Ff @ _in_range(Zsmall[b : b + 1, :, :s] * alpha, Ff.dtype, [mod])[0]
            out[mod] = LowRank(Z.cpu().contiguous(), core.cpu().contiguous())
        return out

    # --- public: numbers --------------------------------------------------------------------
    def shared_dims(self) -> dict[str, int]:
        """Shared dimension per module: joint = s of the common subspace; pairwise/isolate = the
        dimension removed from the first vector / the target."""
        out = {}
        for bi, blk in enumerate(self.blocks):
            pos = self._target_pos(blk) if self.config.mode == "isolate" else 0
            if pos is None or len(blk.members) < 2:
                dims = [0] * len(blk.modules)
            elif self._sequential:
                dims = []
                for S in self._sequential_shared(bi):
                    dims.append(int(torch.linalg.matrix_rank(S.to(SMALL), rtol=1e-6)) if S.abs().max() > 0 else 0)
            else:
                Y = self._removed(bi, pos)[1]
                dims = (Y.abs().sum(-2) > 0).sum(-1).tolist()
            out.update(zip(blk.modules, dims))
        return out

    def shared_basis(self, module: str) -> torch.Tensor:
        """Orthonormal basis Z (n, s) of the subspace removed for ``module``: the joint shared
        subspace (joint), the union removed from the target (isolate, union order) or from the
        first vector of the pool (pairwise)."""
        if self._sequential:
            raise ValueError("shared_basis is not kept for isolate_order='sequential'")
        for bi, blk in enumerate(self.blocks):
            if module in blk.modules:
                b = blk.modules.index(module)
                pos = self._target_pos(blk) if self.config.mode == "isolate" else 0
                removed = None if pos is None else self._removed(bi, pos)
                if removed is None:
                    return torch.zeros(blk.shape[0], 0, dtype=blk.F[0][b].dtype)
                f, Y = removed
                Yb = Y[b][:, Y[b].abs().sum(0) > 0]
                return (blk.basis(f, b) @ Yb.to(blk.F[f][b].dtype)).cpu()
        raise KeyError(f"module {module!r} is not in this pool")

    def eigenvalues(self) -> dict[str, torch.Tensor]:
        """All eigenvalues (complex) per module, of the joint tuple or of each pair (concatenated)."""
        out = {}
        for blk in self.blocks:
            sps = [blk.spectrum(o, self.config.symmetric) for o in self._orders(blk)]
            for b, mod in enumerate(blk.modules):
                out[mod] = torch.cat([sp.eigvals[b] for sp in sps]).cpu() if sps else torch.zeros(0, dtype=torch.complex128)
        return out

    def summary(self) -> list[dict]:
        """Per module: members, shape, ranks, eigenvalues, complex count, shared dim, norms."""
        dims, eig = self.shared_dims(), self.eigenvalues()
        rows = []
        for bi, blk in enumerate(self.blocks):
            shared_sq = torch.stack([self._shared_sq(bi, p) for p in range(len(blk.members))], -1)  # (b, k)
            for b, mod in enumerate(blk.modules):
                ev = eig[mod]
                norms = {}
                for p, i in enumerate(blk.members):
                    total, sh = float(blk.sq_norms[b, p]), float(shared_sq[b, p])
                    norms[self.names[i]] = {
                        "delta": total**0.5,
                        "shared": max(sh, 0.0) ** 0.5,
                        "unique": max(total - sh, 0.0) ** 0.5,
                    }
                rows.append(
                    {
                        "module": mod,
                        "shape": list(blk.shape),
                        "members": [self.names[i] for i in blk.members],
                        "ranks": [int(r) for r in blk.ranks[b]],
                        "eigenvalues": [[float(z.real), float(z.imag)] for z in ev],
                        "complex": int((ev.imag.abs() > 1e-6).sum()),
                        "shared_dim": int(dims[mod]),
                        "norms": norms,
                    }
                )
        return rows

    def _shared_sq(self, bi: int, pos: int) -> torch.Tensor:
        """‖S_i‖_F² per module of a block, (b,), from small products (sequential: from the parts)."""
        blk = self.blocks[bi]
        if self._sequential:
            out = []
            for b, S in enumerate(self._shared_X(bi, pos)):
                if S is None:
                    out.append(0.0)
                elif blk.A[pos] is None:
                    out.append(float(S.to(SMALL).pow(2).sum()))
                else:
                    S, A = S.to(SMALL), blk.A[pos][b].to(SMALL)
                    out.append(float(D.sq_norm_from_grams(S.mT @ S, A @ A.mT)))
            return torch.tensor(out, dtype=SMALL)
        removed = self._removed(bi, pos)
        if removed is None:
            return torch.zeros(len(blk.modules), dtype=SMALL, device=blk.scale.device)
        f, Y = removed
        return blk.shared_sq_norm(f, Y, pos)


def _as_delta(X: torch.Tensor, A: torch.Tensor | None) -> Delta:
    X = X.cpu().contiguous()
    return Dense(X) if A is None else LowRank(X, A.cpu().contiguous())


def _split_pair(name, names: list[str]) -> tuple[int, int]:
    """A pair's indices (pool order) from ``("a", "b")``, or from ``"a+b"`` where that string
    names exactly one pair (names may contain ``+``: "a" + "b+c" and "a+b" + "c" read alike)."""
    if isinstance(name, (tuple, list)) and len(name) == 2 and name[0] != name[1] and all(n in names for n in name):
        i, j = sorted(names.index(n) for n in name)
        return i, j
    hits = [(i, j) for i, a in enumerate(names) for j in range(i + 1, len(names)) if name == f"{a}+{names[j]}"]
    if len(hits) > 1:
        raise ValueError(f"Pair name {name!r} is ambiguous in {names}; give the pair as a tuple (a, b)")
    if not hits:
        raise ValueError(f"Unknown pair {name!r}; pairs are named 'a+b' (or given as (a, b)) with a before b in {names}")
    return hits[0]
