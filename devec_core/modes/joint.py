"""Joint mode: one shared subspace common to every vector that has the module (style mixing).

Paper: arXiv 2512.22511 §3 (eqs. 6-14) and §4.2 (style mixing with FLUX LoRAs). The shared
subspace is spanned by the eigenvectors of P_1 P_2 ⋯ P_k with Re λ > τ; it lies in the first
vector's column space, so pool order matters (docs/METHOD.md "Order"). Each vector's shared part
is its projection onto it; the merged shared vector S is eq. 14.
"""

from __future__ import annotations

from .base import Mode, merged_all


class Joint(Mode):
    name = "joint"
    paper = "arXiv 2512.22511 §3 eqs. 6-14, §4.2"
    kinds = ("merged_shared",)

    def orders(self, names, members):
        return [tuple(range(len(members)))] if len(members) > 1 else []

    def removed(self, dec, bi, pos):
        """The common subspace, in the first member's basis (f = 0), for every member."""
        blk = dec.blocks[bi]
        if len(blk.members) < 2:
            return None
        return 0, dec.select(bi, tuple(range(len(blk.members))))[0]

    def component(self, dec, kind, name):
        if kind != "merged_shared":
            return super().component(dec, kind, name)
        return merged_all(dec, lambda blk: tuple(range(len(blk.members))) if len(blk.members) > 1 else None)

    def parts(self, names):
        return [("unique", n) for n in names] + [("merged_shared", None)]
