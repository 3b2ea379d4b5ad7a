"""Pairwise mode: the shared vector of every pair, used as extra task vectors when merging.

Paper: arXiv 2512.22511 §4.1 (merging with the pairwise shared vectors). For each pair (i, j),
i before j in pool order, the shared subspace of P_i P_j (cos² of the principal angles > τ) and
its eq.-14 vector; a vector's unique part removes what it shares with any other vector: the
union of its pair subspaces, by the isolate rule (docs/METHOD.md "Isolate").
"""

from __future__ import annotations

from .base import Mode, merged_all, union_removed


class Pairwise(Mode):
    name = "pairwise"
    paper = "arXiv 2512.22511 §4.1"
    kinds = ("pair_shared",)

    def orders(self, names, members):
        k = len(members)
        return [(a, b) for a in range(k) for b in range(k) if a != b] if k > 1 else []

    def removed(self, dec, bi, pos):
        """The union of member ``pos``'s pair subspaces, in its own basis (f = pos)."""
        blk = dec.blocks[bi]
        return union_removed(dec, bi, pos, self.orders(dec.names, blk.members))

    def component(self, dec, kind, name):
        if kind != "pair_shared":
            return super().component(dec, kind, name)
        a, b = split_pair(name, dec.names)
        return merged_all(
            dec, lambda blk: (blk.members.index(a), blk.members.index(b)) if a in blk.members and b in blk.members else None
        )

    def parts(self, names):
        pairs = [("pair_shared", (a, b)) for i, a in enumerate(names) for b in names[i + 1 :]]
        return [("unique", n) for n in names] + pairs


def split_pair(name, names: list[str]) -> tuple[int, int]:
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
