"""Decompose a pool of task vectors over all their modules: the entry point and its result.

``decompose(vectors, tau=PAPER_TAU, mode="joint")`` checks its inputs, builds the blocks
(``devec_core.blocks``: same-signature modules stacked, bases and Grams), computes the spectra its
mode needs (``devec_core.modes``) and returns a ``Decomposition``. Everything that does not depend
on τ is kept; ``with_tau`` re-selects eigenvectors with small r×r operations only — no new SVD.

A ``Decomposition`` holds results (blocks, τ, the selections made at τ) and answers questions
about them (components, shared dimensions, bases, a summary); what each mode removes from which
vector is its mode object's business (``self.mode``), never a branch here.
A module that fewer than two vectors have is entirely unique (nothing to share with).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import algorithm
from .algorithm import PAPER_TAU
from .blocks import Block, Progress, build_blocks, check_not_zero, group_modules
from .budget import MAX_MEMORY, MAX_WORK, WorkBudgetError, check_budget, estimate_work
from .modes import ISOLATE_ORDERS, MODES, Mode, mode_for
from .taskvec import Delta, Dense, LowRank, TaskVector

METHOD_VERSION = "devec-2"  # devec-2: isolate union rule, balanced bases, precision-aware τ slack
STATE_FORMAT = 2  # Decomposition.state_dict layout (2: blocks' own ``state()``)

__all__ = [
    "Config", "Decomposition", "ISOLATE_ORDERS", "MAX_MEMORY", "MAX_WORK", "METHOD_VERSION", "MODES", "Progress",
    "STATE_FORMAT", "WorkBudgetError", "check_budget", "decompose", "estimate_work",
]


@dataclass(frozen=True)
class Config:
    """Every parameter of a decomposition except τ (τ is cheap to change)."""

    mode: str = "joint"  # a name in devec_core.modes.MODES
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
        mode = mode_for(self)  # unknown mode / isolate_order
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
        mode.validate(names)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def decompose(
    vectors: Iterable[TaskVector],
    tau: float = PAPER_TAU,
    mode: str = "joint",
    target: str | None = None,
    progress: Progress | None = None,
    **options,
) -> "Decomposition":
    """Decompose a pool of task vectors (pool order matters: see docs/METHOD.md "Order").

    Args:
        vectors: the pool, in the user's order.
        tau: eigenvalue threshold in (0, 1]; ``PAPER_TAU`` is the paper's value.
        mode: a name in ``devec_core.modes.MODES`` ("joint", "pairwise", "isolate" needs ``target``).
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
    algorithm.check_tau(tau)
    for v in vectors:
        v.check_ranks()
    groups = group_modules(vectors)  # modules by signature; shapes checked across vectors
    check_budget(vectors, cfg, groups)
    # 2. Bases (Grams, numerical ranks), refusing all-zero vectors
    #    and 3. the spectra the mode needs, in the same pass over each block's modules
    mode = mode_for(cfg)
    blocks = build_blocks(vectors, cfg, cfg.torch_device(), cfg.torch_dtype, progress,
                          lambda members: mode.precomputed_orders(names, members), groups)
    check_not_zero(vectors, blocks)
    return Decomposition(names, cfg, blocks, tau, vectors)


class Decomposition:
    """A pool's decomposition at one τ. ``with_tau`` shares every τ-independent tensor."""

    def __init__(self, names, cfg: Config, blocks: list[Block], tau: float, vectors: list[TaskVector]):
        self.names, self.config, self.blocks = list(names), cfg, blocks
        self.tau = algorithm.check_tau(tau)
        self.vectors = vectors  # for extras (biases) and metadata; the math uses the blocks
        self.mode: Mode = mode_for(cfg)
        self._at_tau: dict = {}  # selections and parts computed at self.tau

    def with_tau(self, tau: float) -> "Decomposition":
        """The same decomposition at another τ: re-selects eigenvectors, no new SVD."""
        return Decomposition(self.names, self.config, self.blocks, tau, self.vectors)

    @property
    def precision(self) -> torch.dtype:
        """The dtype the Grams were computed in: it sets the slack on τ (docs/METHOD.md "τ slack")."""
        return self.config.torch_dtype

    # --- at τ (for the modes) -----------------------------------------------------------------
    def cached(self, key, compute: Callable):
        """``compute()`` once per key at this τ."""
        if key not in self._at_tau:
            self._at_tau[key] = compute()
        return self._at_tau[key]

    def select(self, bi: int, order: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, dims): the shared basis of member tuple ``order`` of block ``bi`` at τ, in the first
        member's basis coordinates (``algorithm.select_shared``)."""
        def compute():
            sp = self.blocks[bi].spectrum(order, self.config.symmetric)
            return algorithm.select_shared(sp.eigvals, sp.eigvecs, self.tau, self.precision)

        return self.cached((bi, order), compute)

    # --- τ-independent state without the inputs (cache entries) -------------------------------
    def state_dict(self) -> dict:
        """The τ-independent tensors that are small, as plain containers (no factor of the inputs):
        every block's ``Block.state()``, the names and the config. ``from_state_dict`` rebuilds."""
        return {"format": STATE_FORMAT, "method_version": METHOD_VERSION, "names": list(self.names),
                "config": dataclasses.asdict(self.config), "blocks": [blk.state() for blk in self.blocks]}

    @classmethod
    def from_state_dict(cls, state: dict, vectors: list[TaskVector], tau: float = PAPER_TAU) -> "Decomposition":
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
        seen = {m: sig for sig, mods in group_modules(vectors).items() for m in mods}
        blocks = [Block.from_state(st, vectors, seen, cfg.torch_device(), cfg.torch_dtype) for st in state["blocks"]]
        if sum(len(b.modules) for b in blocks) != len(seen):
            raise ValueError("decomposition state does not cover every module of the vectors")
        return cls(names, cfg, blocks, tau, vectors)

    # --- public: components ------------------------------------------------------------------
    def component(self, kind: str, name=None) -> dict[str, Delta]:
        """One component as module → delta (on the CPU, in the decomposition's dtype).

        kind: "delta" (the original), "unique", "shared" (that vector's shared part), or a kind
              the mode defines: "merged_shared" (eq. 14, joint), "pair_shared" (pairwise, name
              ("a", "b") or "a+b"). A LoRA's unique/shared parts are LoRAs of its rank with the same
              A; dense stays dense.
        """
        if kind not in ("delta", "unique", "shared"):
            return self.mode.component(self, kind, name)
        if name not in self.names:
            raise ValueError(f"Unknown task vector {name!r}; the pool has {self.names}")
        i = self.names.index(name)
        out: dict[str, Delta] = {}
        for bi, blk in enumerate(self.blocks):
            if i not in blk.members:
                continue
            pos = blk.members.index(i)
            shared = self.mode.shared_X(self, bi, pos) if kind != "delta" else [None] * len(blk.modules)
            for b, mod in enumerate(blk.modules):
                X, S = blk.factor(pos, b), shared[b]
                if kind == "shared":
                    part = S if S is not None else torch.zeros_like(X)
                else:
                    part = X if S is None else X - S
                out[mod] = _as_delta(part, None if blk.A[pos] is None else blk.A[pos][b])
        return out

    def parts(self) -> list[tuple[str, object]]:
        """The components this decomposition's mode consists of, as (kind, name) for ``component``."""
        return self.mode.parts(self.names)

    # --- public: numbers --------------------------------------------------------------------
    def shared_dims(self) -> dict[str, int]:
        """Shared dimension per module: joint = s of the common subspace; pairwise/isolate = the
        dimension removed from the first vector / the target."""
        out = {}
        for bi, blk in enumerate(self.blocks):
            out.update(zip(blk.modules, self.mode.shared_dims(self, bi)))
        return out

    def shared_basis(self, module: str) -> torch.Tensor:
        """Orthonormal basis Z (n, s) of the subspace removed for ``module``: the joint shared
        subspace (joint), the union removed from the target (isolate, union order) or from the
        first vector of the pool (pairwise)."""
        for bi, blk in enumerate(self.blocks):
            if module in blk.modules:
                return self.mode.shared_basis(self, bi, blk.modules.index(module))
        raise KeyError(f"module {module!r} is not in this pool")

    def eigenvalues(self) -> dict[str, torch.Tensor]:
        """All eigenvalues (complex) per module, of the joint tuple or of each pair (concatenated)."""
        out = {}
        for blk in self.blocks:
            sps = [blk.spectrum(o, self.config.symmetric) for o in self.mode.orders(self.names, blk.members)]
            for b, mod in enumerate(blk.modules):
                out[mod] = torch.cat([sp.eigvals[b] for sp in sps]).cpu() if sps else torch.zeros(0, dtype=torch.complex128)
        return out

    def summary(self) -> list[dict]:
        """Per module: members, shape, ranks, eigenvalues, complex count, shared dim, norms."""
        dims, eig = self.shared_dims(), self.eigenvalues()
        rows = []
        for bi, blk in enumerate(self.blocks):
            shared_sq = torch.stack([self.mode.shared_sq(self, bi, p) for p in range(len(blk.members))], -1)  # (b, k)
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


def _as_delta(X: torch.Tensor, A: torch.Tensor | None) -> Delta:
    X = X.cpu().contiguous()
    return Dense(X) if A is None else LowRank(X, A.cpu().contiguous())

