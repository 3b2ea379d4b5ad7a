"""Any merge or mix written out: one LoRA (exact or compressed), a PEFT folder, a diffusers FLUX
LoRA, or merged full weights.

One LoRA, exact: LoRA terms are already concatenated factors (rank Σ r_i, ``task_arithmetic``);
a dense module (TIES/DARE/magnitude output) becomes the SVD factors at its numerical rank, which
reproduce it to float precision (but can be as large as min(n, m)).
Compressed to rank r: the best rank-r approximation in Frobenius norm (Eckart–Young). For a LoRA
it is computed on the factors, never densely: B = Q_B R_B, Aᵀ = Q_A R_A (thin QR), SVD of the
small core R_B R_Aᵀ = U Σ Vᵀ, then B' = Q_B U_r Σ_r, A' = (Q_A V_r)ᵀ. The error reported is
exact: ‖ΔW − ΔW_r‖_F² = Σ_{i>r} σ_i², per module and relative over the whole vector.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..export import save_flux_lora, save_peft_adapter
from ..mix import VectorPool, WeightEditor, vanilla
from ..taskvec import Delta, LowRank, TaskVector


@dataclass
class CompressionReport:
    """What compressing to one LoRA lost: rank, ‖error‖/‖ΔW‖ overall and the worst modules."""

    rank: int | None
    sq_error: float = 0.0
    sq_norm: float = 0.0
    modules: dict[str, dict] = field(default_factory=dict)  # module -> {"rank", "relative_error"}

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.sq_error / self.sq_norm) if self.sq_norm > 0 else 0.0

    def to_dict(self) -> dict:
        worst = sorted(self.modules.items(), key=lambda kv: -kv[1]["relative_error"])[:5]
        return {"rank": self.rank, "relative_error": self.relative_error, "modules": len(self.modules),
                "worst_modules": {k: v for k, v in worst}}


def _svd_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int | None):
    """Keep the numerical rank (and at most ``rank``) of U S Vh: (B, A, kept σ², dropped σ²)."""
    cut = S[0] * max(U.shape[0], Vh.shape[1]) * torch.finfo(S.dtype).eps if S.numel() else 0.0
    k = int((S > cut).sum())
    if rank is not None:
        k = min(k, rank)
    S2 = S.double() ** 2
    return (U[:, :k] * S[:k]), Vh[:k], float(S2[:k].sum()), float(S2[k:].sum())


def compress(d: Delta, rank: int | None = None) -> tuple[LowRank, float, float]:
    """One module as LoRA factors (scale 1): exact (rank None) or the best rank-``rank`` approximation.

    Args:
        d: LowRank (compressed on its factors) or Dense (SVD).
        rank: None keeps everything (a LowRank is returned as is); else at most ``rank`` directions.

    Returns:
        (LowRank(B, A, 1.0), ‖ΔW − B A‖_F², ‖ΔW‖_F²). A zero delta gives rank 0.
    """
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None; got {rank!r}")
    if isinstance(d, LowRank):
        B, A = d.scaled_B(), d.A
        if rank is None or rank >= d.rank:
            return LowRank(B.contiguous(), A.contiguous(), 1.0), 0.0, d.sq_norm()
        work = torch.promote_types(B.dtype, torch.float32)
        Qb, Rb = torch.linalg.qr(B.to(work))  # (n, R), (R, R)
        Qa, Ra = torch.linalg.qr(A.to(work).T)  # (m, R), (R, R)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # core (R, R)
        Bs, As, kept, dropped = _svd_factors(U, S, Vh, rank)
        return LowRank((Qb @ Bs).to(B.dtype).contiguous(), (As @ Qa.T).to(A.dtype).contiguous(), 1.0), dropped, kept + dropped
    W = d.dense()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    Bs, As, kept, dropped = _svd_factors(U, S, Vh, rank)
    if rank is None:  # numerical rank: what is dropped is rounding noise; report the true residual
        dropped = float((W.double() - Bs.double() @ As.double()).pow(2).sum())
    return LowRank(Bs.contiguous(), As.contiguous(), 1.0), dropped, float(W.double().pow(2).sum())


def to_lora(modules: Iterable[tuple[str, Delta]] | dict[str, Delta], rank: int | None = None) -> tuple[dict[str, LowRank], CompressionReport]:
    """Every module as LoRA factors, one module at a time (accepts ``engine.iter_merge``'s stream).

    Args:
        modules: (module, delta) pairs or a dict.
        rank: None = exact; else compress each module to at most ``rank``.

    Returns:
        (module → LowRank, the CompressionReport). Zero modules are left out.
    """
    items = modules.items() if isinstance(modules, dict) else modules
    out, rep = {}, CompressionReport(rank)
    for mod, d in items:
        lr, err, norm = compress(d, rank)
        rep.sq_error += err
        rep.sq_norm += norm
        rep.modules[mod] = {"rank": lr.rank, "relative_error": math.sqrt(err / norm) if norm > 0 else 0.0}
        if lr.rank > 0 and torch.any(lr.B) and torch.any(lr.A):
            out[mod] = lr
    return out, rep


def write_lora(
    modules: Iterable[tuple[str, Delta]] | dict[str, Delta], out: str | os.PathLike, *, family: str = "peft",
    rank: int | None = None, metadata: dict | None = None, base_config: dict | None = None,
    extras: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
) -> tuple[Path, CompressionReport]:
    """Write one LoRA: a PEFT folder (``family="peft"``) or a diffusers FLUX ``.safetensors``.

    Args:
        modules: the merged modules (a stream is compressed module by module).
        out: folder (PEFT) or file (diffusers).
        rank: None = exact; else compressed to rank ``rank`` (error in the report and metadata).
        metadata: JSON-able settings stored under the ``"devec"`` header key (and ``devec.json``).
        base_config: PEFT: base model name / task type for adapter_config.json.
        extras: ``<module>.bias`` deltas become ``lora_B.bias``.
        dtype: output dtype (default: the factors').

    Returns:
        (path written, CompressionReport).
    """
    factors, rep = to_lora(modules, rank)
    meta = {**(metadata or {}), "lora": rep.to_dict()}
    if family == "peft":
        path = save_peft_adapter(factors, out, metadata=meta, base_config=base_config, extras=extras, dtype=dtype)
    elif family == "diffusers":
        path = save_flux_lora(factors, out, metadata=meta, extras=extras, dtype=dtype)
    else:
        raise ValueError(f"Unknown LoRA family {family!r}; expected 'peft' or 'diffusers'")
    return path, rep


def fuse_into(root: torch.nn.Module, merged: TaskVector, coefficient: float = 1.0):
    """Fuse ``merged`` into ``root``'s weights with the library's WeightEditor (fp32 accumulation,
    cast to the weights' dtype). Returns the editor: ``editor.restore()`` gives the base back."""
    editor = WeightEditor(root)
    editor.apply(vanilla(VectorPool([merged]), {merged.name: coefficient}, label="merged"))
    return editor


def write_model(root: torch.nn.Module, merged: TaskVector, out: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Save ``root`` (an LLM or a FLUX transformer) with the merge fused in, via ``save_pretrained``;
    the weights in memory are restored afterwards. ``devec_merge.json`` holds the settings."""
    out = Path(out)
    editor = fuse_into(root, merged)
    try:
        root.save_pretrained(str(out))
    finally:
        editor.restore()
    (out / "devec_merge.json").write_text(json.dumps(metadata or {}, indent=1, sort_keys=True, default=str))
    return out
