"""DoRA adapters → dense deltas with PEFT's own merge math (needs the base weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..taskvec import Delta, Dense, LowRank
from .checkpoint import cut_dense, open_base
from .common import FormatError


def dora_delta(W0: torch.Tensor, lr: LowRank, magnitude: torch.Tensor) -> torch.Tensor:
    """The dense delta of one DoRA linear module, as PEFT merges it.

    PEFT (``tuners/lora/dora.py``, ``lora/layer.py`` merge): W' = (m / ‖W0 + s·BA‖_row) ⊙ (W0 + s·BA),
    with the norm over the input dim of each output row (``DoraLinearLayer.get_weight_norm``).

    Args:
        W0: base weight (n, m). lr: the LoRA factors with scale s. magnitude: m, (n,).
    Returns:
        ΔW = W' − W0, (n, m).
    """
    from peft.tuners.lora.dora import DoraLinearLayer

    W0 = W0.to(lr.B.dtype)
    lora_weight = lr.B.to(W0.device) @ lr.A.to(W0.device)  # (n, m)
    norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(W0, lora_weight.detach(), lr.scale)
    factor = (magnitude.to(W0.device, W0.dtype) / norm).view(-1, 1)
    return factor * (W0 + lr.scale * lora_weight) - W0


def dora_deltas(
    modules: dict[str, Delta], mags: dict[str, torch.Tensor], base, *, dtype: torch.dtype, source: Path,
    compress: tuple[int | None, float | None] | None = None,
) -> dict[str, Delta]:
    """Replace each DoRA module's LowRank by its dense delta (base weights read one at a time),
    cut to factors at once when ``compress=(rank, energy)`` is given (see ``cut_dense``).

    ``base``: a path / Hub id, loaded weights (``ModuleWeights``) or a callable (``open_base``).
    """
    if base is None:
        raise FormatError(
            f"{str(source)!r}: DoRA adapter ({len(mags)} modules with lora_magnitude_vector): its delta depends on "
            f"the base weights; pass base=... / --base MODEL"
        )
    reader = open_base(base)
    label = str(reader.path)
    out = dict(modules)
    for mod, mag in mags.items():
        key = next((k for k in (mod + ".weight", "model." + mod + ".weight") if k in reader), None)
        if key is None:
            raise FormatError(f"{str(source)!r}: DoRA module {mod!r} has no weight {mod + '.weight'!r} in the base {label!r}")
        W0 = reader.get(key).to(dtype)
        lr = modules[mod]
        if tuple(W0.shape) != tuple(lr.shape):
            raise FormatError(
                f"{str(source)!r}: module {mod!r} has shape {tuple(lr.shape)} but the base {label!r} has {tuple(W0.shape)}"
            )
        d = dora_delta(W0, lr, mag)
        del W0
        if compress is None:
            out[mod] = Dense(d.cpu())
        else:
            cut = cut_dense(d, rank=compress[0], energy=compress[1])
            if cut is None:
                del out[mod]
            else:
                out[mod] = LowRank(cut.B.cpu(), cut.A.cpu(), 1.0)
        del d
    return out
