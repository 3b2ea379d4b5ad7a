"""Isolate mode ("union" order): the unique part of one target against references (toxicity).

Paper: arXiv 2512.22511 §4.3 (negating the unique toxic part of a LLaMA-2-7B task vector). The
target's shared subspace with each reference is found pairwise; their union is projected out of
the target once, independent of the references' order. The union keeps every distinct shared
direction and counts tilted copies of one direction once (``algorithm.union_basis``,
docs/METHOD.md "Isolate"). References default to every other vector of the pool.
"""

from __future__ import annotations

from .base import Mode, union_removed


class Isolate(Mode):
    name = "isolate"
    paper = "arXiv 2512.22511 §4.3"

    def validate(self, names):
        if self.cfg.target not in names:
            raise ValueError(f"isolate mode needs a target among {names}; got {self.cfg.target!r}")
        for r in self.cfg.references or ():
            if r not in names or r == self.cfg.target:
                raise ValueError(f"reference {r!r} must be a vector of the pool other than the target")

    def target_position(self, names, members) -> int | None:
        t = names.index(self.cfg.target)
        return members.index(t) if t in members else None

    def reference_positions(self, names, members) -> list[int]:
        refs = self.cfg.references or tuple(n for n in names if n != self.cfg.target)
        ids = [names.index(r) for r in refs]
        return [members.index(i) for i in ids if i in members]

    def orders(self, names, members):
        t = self.target_position(names, members)
        if t is None or len(members) < 2:
            return []
        return [(t, p) for p in self.reference_positions(names, members)]

    def reported_position(self, names, members):
        return self.target_position(names, members)

    def removed(self, dec, bi, pos):
        """The union of what the target shares with each reference, in its basis; None for others."""
        blk = dec.blocks[bi]
        if pos != self.target_position(dec.names, blk.members):
            return None
        return union_removed(dec, bi, pos, self.orders(dec.names, blk.members))

    def parts(self, names):
        return [("unique", self.cfg.target), ("shared", self.cfg.target)]
