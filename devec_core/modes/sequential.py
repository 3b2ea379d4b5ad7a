"""Isolate mode, "sequential" order: remove what the remainder shares with reference 1, then
with reference 2, … (the paper's "iteratively" read literally).

Paper: arXiv 2512.22511 §4.3; docs/METHOD.md "Isolate" (offered as an option beside the
order-free union rule, and the two compared there). Unlike the other modes the basis of the
remainder changes after every reference, so nothing but the references' own bases is reused
across τ: the parts are recomputed per module at each τ (the slow option), and the
decomposition keeps no shared basis.
"""

from __future__ import annotations

import torch

from .. import algorithm
from ..blocks import SMALL
from .isolate import Isolate


class SequentialIsolate(Isolate):
    paper = "arXiv 2512.22511 §4.3 (sequential reading)"

    def precomputed_orders(self, names, members):
        return []  # the spectra it uses are of the remainders, computed at each τ

    def removed(self, dec, bi, pos):
        raise ValueError("isolate_order='sequential' removes no single subspace (it is recomputed per reference)")

    def shared_X(self, dec, bi, pos):
        blk = dec.blocks[bi]
        if pos != self.target_position(dec.names, blk.members) or len(blk.members) < 2:
            return [None] * len(blk.modules)
        return dec.cached((bi, "sequential"), lambda: self._sequential(dec, bi))

    def _sequential(self, dec, bi: int) -> list[torch.Tensor]:
        blk, cfg = dec.blocks[bi], self.cfg
        t = self.target_position(dec.names, blk.members)
        out = []
        for b in range(len(blk.modules)):
            X = blk.factor(t, b)
            R = X
            for p in self.reference_positions(dec.names, blk.members):
                Qp = blk.basis(p, b).to(SMALL)
                if blk.A[t] is None:
                    Qr = algorithm.dense_basis(R.to(SMALL), rank=cfg.dense_rank, energy=cfg.dense_energy)[0]
                else:
                    Rs, As = R.to(SMALL), blk.A[t][b].to(SMALL)
                    Qr = Rs @ algorithm.lowrank_basis(Rs.mT @ Rs, As @ As.mT, algorithm.rank_rtol(*blk.shape, R.dtype))[0]
                C = Qr.mT @ Qp
                vals, vecs = algorithm.chain_spectrum([C, C.mT], symmetric=cfg.symmetric)
                Y, _ = algorithm.select_shared(vals, vecs, dec.tau, dec.precision)
                R = R - (Qr @ (Y @ (Y.mT @ (Qr.mT @ R.to(SMALL))))).to(R.dtype)
            out.append(X - R)
        return out

    def shared_sq(self, dec, bi, pos):
        blk = dec.blocks[bi]
        out = []
        for b, S in enumerate(self.shared_X(dec, bi, pos)):
            if S is None:
                out.append(0.0)
            elif blk.A[pos] is None:
                out.append(float(S.to(SMALL).pow(2).sum()))
            else:
                S, A = S.to(SMALL), blk.A[pos][b].to(SMALL)
                out.append(float(algorithm.sq_norm_from_grams(S.mT @ S, A @ A.mT)))
        return torch.tensor(out, dtype=SMALL)

    def shared_dims(self, dec, bi):
        blk = dec.blocks[bi]
        pos = self.target_position(dec.names, blk.members)
        if pos is None or len(blk.members) < 2:
            return [0] * len(blk.modules)
        return [
            int(torch.linalg.matrix_rank(S.to(SMALL), rtol=1e-6)) if S.abs().max() > 0 else 0
            for S in self.shared_X(dec, bi, pos)
        ]

    def shared_basis(self, dec, bi, b):
        raise ValueError("shared_basis is not kept for isolate_order='sequential'")
