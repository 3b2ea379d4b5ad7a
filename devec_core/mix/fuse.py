"""The fused weight of a mix on one module: pure functions on tensors (torch only).

For one Linear weight W0 (n, m) and the mix's terms on it — low-rank parts λ_i B_i A_i and dense
parts λ_j D_j —

    W = W0 + [λ_1 B_1 | … | λ_k B_k] @ [A_1; …; A_k] + Σ_j λ_j D_j

formed in float32 (one matmul of rank Σ r_i), then cast to the parameter's dtype. A result with
NaN/Inf — in float32, or after the cast (bf16/fp16 overflow) — is refused with ValueError naming
the weight. Extras (biases) are the dense-only case. Nothing here touches a model: the editor
(``mix.editor``) decides what to write where.
"""

from __future__ import annotations

from typing import Sequence

import torch

_F32_SAFE = torch.finfo(torch.float32).max / 4  # a bound below this means no float32 overflow


def fused_weight(
    W0: torch.Tensor,
    B: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    dense: Sequence[tuple[float, torch.Tensor]] = (),
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """W0 + B·diag(col_scale)·A + Σ λ·D in float32, cast to ``dtype`` and checked finite.

    Args:
        W0: the original weight (n, m), any dtype/device (not modified).
        B: stacked left factors (n, R) in float32, or None for no low-rank term.
        A: stacked right factors (R, m) in float32.
        col_scale: (R,) coefficient of each column of B (λ of the term the column belongs to).
        dense: (λ, D) pairs, D (n, m).
        dtype: the result's dtype (default W0's).
        device: where the sum is formed and returned (default W0's device).
        name: how an error names the weight.
    Returns:
        A new tensor (n, m) in ``dtype`` on ``device``.
    Raises:
        ValueError: a dense term's shape differs from W0's, or the result has NaN/Inf.
    """
    dev = torch.device(device) if device is not None else W0.device
    W = W0.to(dev, torch.float32, copy=True)
    if B is not None:
        W.addmm_((B * col_scale).to(dev), A.to(dev))  # (n, R) @ (R, m): one matmul of rank R
    for lam, D in dense:
        if tuple(D.shape) != tuple(W0.shape):
            raise ValueError(f"parameter {name!r}: extra shape {tuple(D.shape)} does not match {tuple(W0.shape)}")
        W.add_(D.to(dev), alpha=lam)
    out = W.to(dtype or W0.dtype)  # NaN/Inf in float32 stay NaN/Inf; overflow of a narrower dtype shows here
    if not torch.isfinite(out).all():
        raise ValueError(f"{name!r}: the mixed weight has NaN/Inf in {out.dtype}; refusing to write it")
    return out


def lowrank_bound(W0_absmax: float, B: torch.Tensor, A: torch.Tensor) -> float:
    """An upper bound on max |W0 + B·A| without forming it: |(BA)_ij| ≤ ‖B_i‖·‖A_:j‖
    (Cauchy–Schwarz), so max|W0| + max_i ‖B_i‖ · max_j ‖A_:j‖."""
    return W0_absmax + float(B.norm(dim=1).max()) * float(A.norm(dim=0).max())


def fused_weight_into(
    out: torch.Tensor, W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, col_scale: torch.Tensor, W0_absmax: float
) -> bool:
    """The float32 one-pass form of ``fused_weight`` (low-rank terms only): ``out = W0 + B·diag(s)·A``
    by one addmm straight into ``out`` — one read of W0, one write, no temporary of W's size.

    Finiteness is proved by ``lowrank_bound`` instead of a scan (the factors must already be
    finite); when the bound does not hold, nothing is written and the caller uses ``fused_weight``.

    Args:
        out: the float32 parameter to write (same device as everything else).
        W0: its float32 original; B (n, R), A (R, m), col_scale (R,): as in ``fused_weight``.
        W0_absmax: max |W0| (computed once per weight by the caller).
    Returns:
        True when written, False when the bound could not rule out overflow (nothing written).
    """
    Bl = B * col_scale
    if not lowrank_bound(W0_absmax, Bl, A) < _F32_SAFE:  # also False for NaN
        return False
    torch.addmm(W0, Bl, A, out=out)
    return True
