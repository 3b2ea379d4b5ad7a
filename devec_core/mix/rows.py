"""Rows of one batch under different mixes, without writing a weight (docs/METHOD.md "Both sides
in one pass").

A side-by-side LLM answer costs two generations when the mixes are fused one after the other,
and on a CPU each generated token is bound by reading every weight once (SmolLM2-135M: 0.54 GB
per token). Both sides share the base weights, though, and their mixes are low-rank. So the two
answers can be one batch of two rows: every Linear layer reads its weight W once for both rows,
and row r adds its own low-rank difference to the mix fused now (F, often the base):

    y_r = x_r Wᵀ + x_r Δ_rᵀ,   Δ_r = Σ_terms(mix_r) λ·B A − Σ_terms(F) λ·B A

with terms common to mix_r and F (same part, same λ) cancelled symbolically, so a row whose mix
is F adds nothing. The terms are the weight editor's own resolved parts (``PartCache``), the
same factors that ``WeightEditor.apply`` fuses. The result equals the fused model's up to the
order of float32 roundings (tests/test_rows.py compares both). Dense terms, extras (biases)
and modules that are not ``nn.Linear`` are not handled here: ``row_deltas`` returns None and
the caller fuses instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .editor import WeightEditor
from .terms import Mix


@dataclass
class RowDeltas:
    """Per touched module: A (ΣR, m), B (n, ΣR) with each column's coefficient folded in, and
    mask (rows, ΣR) marking the row each column belongs to."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rows: int
    active: list[int]  # per row: weights that carry a nonzero term of that row's mix


def _terms(editor: WeightEditor, mix: Mix | None) -> tuple[dict, dict]:
    """(weight path → {part key: (λ, Part)}, extra path → {key: λ}) of ``mix``, resolved by the editor."""
    mods, extras = editor._targets(mix or Mix.base())
    return ({path: {part.key: (lam, part) for lam, part in ts} for path, ts in mods.items()},
            {path: {key: lam for lam, key, _ in ts} for path, ts in extras.items()})


def row_deltas(editor: WeightEditor, mixes: list[Mix | None]) -> RowDeltas | None:
    """Each mix as a low-rank difference to the mix fused in ``editor`` now; None where that is
    not possible (a dense term or an extra that differs, a touched module that is not Linear).

    Raises:
        ValueError: as ``WeightEditor.apply`` (unknown module, shape, NaN/Inf in a component).
    """
    fused_mods, fused_extras = _terms(editor, editor.current)
    per_module: dict[str, list[tuple[int, float, object]]] = {}
    active = []
    for r, mix in enumerate(mixes):
        mods, extras = _terms(editor, mix)
        if extras != fused_extras:
            return None
        active.append(len(mods))
        for path in sorted(set(mods) | set(fused_mods)):
            want, have = mods.get(path, {}), fused_mods.get(path, {})
            for key in sorted(set(want) | set(have)):
                lam = (want[key][0] if key in want else 0.0) - (have[key][0] if key in have else 0.0)
                if lam == 0.0:
                    continue
                part = (want.get(key) or have[key])[1]
                if part.W is not None:
                    return None
                per_module.setdefault(path[: -len(".weight")], []).append((r, lam, part))
    out = {}
    for mod, terms in per_module.items():
        if not isinstance(editor.root.get_submodule(mod), torch.nn.Linear):
            return None
        A = torch.cat([p.A for _, _, p in terms], 0)
        B = torch.cat([p.B * lam for _, lam, p in terms], 1)
        owner = torch.cat([torch.full((p.A.shape[0],), r, dtype=torch.long) for r, _, p in terms]).to(A.device)
        mask = (torch.arange(len(mixes), device=A.device)[:, None] == owner[None, :]).to(A.dtype)
        out[mod] = (A, B, mask)
    return RowDeltas(out, len(mixes), active)


@contextmanager
def hooked(root: torch.nn.Module, deltas: RowDeltas):
    """Forward hooks that add each row's difference to the touched Linear layers' outputs (inputs
    of batch size ``deltas.rows``, row r under mix r); removed on exit, also after an error."""

    def hook_for(A, B, mask):
        At, Bt = A.mT.contiguous(), B.mT.contiguous()  # (m, ΣR), (ΣR, n): one GEMM each, no transposes per call

        def hook(module, args, out):
            x = args[0]
            if x.shape[0] != mask.shape[0]:
                raise RuntimeError(f"row deltas for {mask.shape[0]} rows; the batch has {x.shape[0]}")
            u = (x if x.dtype == At.dtype else x.to(At.dtype)) @ At  # (rows, ..., ΣR)
            u = u * mask.view(mask.shape[0], *([1] * (u.ndim - 2)), mask.shape[1])
            if out.dtype == Bt.dtype and out.is_contiguous():
                return out.view(-1, out.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), Bt).view(out.shape)
            return out + (u @ Bt).to(out.dtype)

        return hook

    handles = []
    try:
        for mod, (A, B, mask) in deltas.modules.items():
            handles.append(root.get_submodule(mod).register_forward_hook(hook_for(A, B, mask)))
        yield
    finally:
        for h in handles:
            h.remove()
