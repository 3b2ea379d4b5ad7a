"""The interface every mode shares, and the two pieces of math more than one mode uses.

A mode (docs/METHOD.md "Modes") answers three questions about a pool's decomposition:
  1. which spectra it needs (``orders``: tuples of member positions, the first is the basis
     side) — τ-independent, computed once per block and kept;
  2. what is removed from member ``pos`` of a block at τ (``removed``: Z = Q_f Y as (f, Y));
  3. which extra components it defines (``component``: joint's merged shared vector, pairwise's
     pair vectors) and which parts it exports (``parts``).
Everything else (parts as low-rank factors, norms, shared dimensions, bases) follows from 2 in
``Mode``'s default methods; a mode that does not fit that shape (sequential isolate) overrides them.
A ``pool.Decomposition`` holds the results (blocks, τ, selections); it asks its mode, never
branches on the mode's name.
"""

from __future__ import annotations

import math

import torch

from .. import algorithm
from ..blocks import SMALL, in_range
from ..taskvec import Delta, LowRank


class Mode:
    """One way of splitting a pool. Subclasses set ``name``, ``paper`` and implement ``orders``
    and ``removed``; ``cfg`` is the decomposition's ``pool.Config``."""

    name = ""
    paper = ""  # the paper's section this mode implements (arXiv 2512.22511)
    kinds: tuple[str, ...] = ()  # extra kinds of Decomposition.component this mode defines

    def __init__(self, cfg):
        self.cfg = cfg

    # --- configuration ---------------------------------------------------------------------
    def validate(self, names: list[str]) -> None:
        """Mode-specific checks of ``cfg`` against the pool's names (ValueError naming the value)."""

    # --- τ-independent ---------------------------------------------------------------------
    def orders(self, names: list[str], members: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Member tuples (positions into ``members``, vector indices in pool order) whose spectra
        this mode reads for a module with these members."""
        raise NotImplementedError

    def precomputed_orders(self, names: list[str], members: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The spectra ``decompose`` computes up front (default: all of ``orders``)."""
        return self.orders(names, members)

    def reported_position(self, names: list[str], members: tuple[int, ...]) -> int | None:
        """The member whose removed subspace ``shared_dims`` / ``shared_basis`` report."""
        return 0

    # --- at τ ------------------------------------------------------------------------------
    def removed(self, dec, bi: int, pos: int) -> tuple[int, torch.Tensor] | None:
        """(f, Y): the subspace removed from member ``pos`` of block ``bi`` is Z = Q_f Y
        (Y (b, p_f, p_f) with orthonormal or zero columns); None if nothing is removed."""
        raise NotImplementedError

    def shared_X(self, dec, bi: int, pos: int) -> list[torch.Tensor | None]:
        """Z Zᵀ X for member ``pos`` (its scaled B, or dense delta), per module; None: nothing removed."""
        blk = dec.blocks[bi]
        removed = self.removed(dec, bi, pos)
        if removed is None:
            return [None] * len(blk.modules)
        f, Y = removed
        return blk.project(f, Y, pos)

    def shared_sq(self, dec, bi: int, pos: int) -> torch.Tensor:
        """‖S_i‖_F² per module of a block, (b,), from small products."""
        blk = dec.blocks[bi]
        removed = self.removed(dec, bi, pos)
        if removed is None:
            return torch.zeros(len(blk.modules), dtype=SMALL, device=blk.scale.device)
        f, Y = removed
        return blk.shared_sq_norm(f, Y, pos)

    def shared_dims(self, dec, bi: int) -> list[int]:
        """Dimension of the reported member's removed subspace, per module of a block."""
        blk = dec.blocks[bi]
        pos = self.reported_position(dec.names, blk.members)
        removed = None if pos is None or len(blk.members) < 2 else self.removed(dec, bi, pos)
        if removed is None:
            return [0] * len(blk.modules)
        return (removed[1].abs().sum(-2) > 0).sum(-1).tolist()

    def shared_basis(self, dec, bi: int, b: int) -> torch.Tensor:
        """Orthonormal basis Z (n, s) of the reported member's removed subspace for module b."""
        blk = dec.blocks[bi]
        pos = self.reported_position(dec.names, blk.members)
        removed = None if pos is None else self.removed(dec, bi, pos)
        if removed is None:
            return torch.zeros(blk.shape[0], 0, dtype=blk.F[0][b].dtype)
        f, Y = removed
        Yb = Y[b][:, Y[b].abs().sum(0) > 0]
        return (blk.basis(f, b) @ Yb.to(blk.F[f][b].dtype)).cpu()

    # --- components ------------------------------------------------------------------------
    def component(self, dec, kind: str, name) -> dict[str, Delta]:
        """A component kind this mode defines (``kinds``); called for kinds beyond delta/unique/shared."""
        owner = {k: m.name for m in _all_modes() for k in m.kinds}.get(kind)
        if owner is not None:
            raise ValueError(f"{kind} is defined in {owner} mode; this decomposition is {self.name!r}")
        raise ValueError(f"Unknown component kind {kind!r}; expected delta, unique, shared, merged_shared, pair_shared")

    def parts(self, names: list[str]) -> list[tuple[str, object]]:
        """The components this mode's result consists of, as (kind, name) for
        ``Decomposition.component`` (what export writes and the studio mixes)."""
        raise NotImplementedError


def _all_modes():
    from . import REGISTRY

    return REGISTRY.values()


# ---------------------------------------------------------------------------------------------
# Shared math: the union of pair subspaces (pairwise, isolate) and eq. 14 (joint, pairwise)
# ---------------------------------------------------------------------------------------------


def union_removed(dec, bi: int, pos: int, orders: list[tuple[int, ...]]) -> tuple[int, torch.Tensor] | None:
    """What member ``pos`` shares with any other member of ``orders`` (pairs (pos, j)): the union
    of the pair subspaces in its own basis, by ``algorithm.union_basis`` (docs/METHOD.md "Isolate")."""
    Ys = [dec.select(bi, order)[0] for order in orders if order[0] == pos]
    return (pos, algorithm.union_basis(Ys, dec.tau, dec.precision)) if Ys else None


def merged_shared(dec, bi: int, order: tuple[int, ...]) -> dict[str, Delta]:
    """Eq. 14: S = Z [Σ w_i Zᵀ ΔW_i / Σ w_i], Z = Q_f Y the shared basis of ``order`` (f = its
    first member), w_i = ‖Z Zᵀ ΔW_i‖_F; a LowRank of rank s per module of the block."""
    blk = dec.blocks[bi]
    f = order[0]
    Y, dims = dec.select(bi, order)
    sq = torch.stack([blk.shared_sq_norm(f, Y, p) for p in order], -1)
    w = algorithm.merge_weights(sq)  # (b, k)
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
            c = in_range((c / alpha).unsqueeze(0), Ff.dtype, [mod])[0]
            core = core + float(w[b, j]) * (c if blk.A[p] is None else c @ blk.A[p][b])
        Z = Ff @ in_range(Zsmall[b : b + 1, :, :s] * alpha, Ff.dtype, [mod])[0]
        out[mod] = LowRank(Z.cpu().contiguous(), core.cpu().contiguous())
    return out


def merged_all(dec, order_of) -> dict[str, Delta]:
    """``merged_shared`` over every block where ``order_of(block)`` gives a member tuple."""
    out: dict[str, Delta] = {}
    for bi, blk in enumerate(dec.blocks):
        order = order_of(blk)
        if order is not None:
            out.update(merged_shared(dec, bi, order))
    return out
