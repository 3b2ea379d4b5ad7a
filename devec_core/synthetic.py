"""A deterministic SYNTHETIC pool of LoRAs on FLUX's module layout, with planted shared structure.

Demo and test data, not a model: the offline synthetic preset (``presets/*.yaml`` with
``synthetic: true``) opens it in the Studio, so it has to be importable from the installed
library (``devec_core``) rather than live under ``tests/`` or ``demo/``; the tests use it too.
Torch only.
"""

from __future__ import annotations

import math

import torch

from .taskvec import Delta, LowRank, TaskVector

SYNTH_STYLES = ("flat-anime", "ghibli", "anime", "bw-1930s", "pixel-art")
SYNTH_ANIME = ("flat-anime", "ghibli", "anime")


def flux_module_shapes(hidden: int = 128, n_double: int = 19, n_single: int = 38) -> dict[str, tuple[int, int]]:
    """FLUX transformer Linear modules (diffusers paths) → (out, in) at a given hidden width.

    At hidden=3072 these are FLUX.1's real shapes for the attention and MLP layers; the
    synthetic pool uses a reduced width so it builds and decomposes in a second on a CPU.
    """
    d, f = hidden, 4 * hidden
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(n_double):
        p = f"transformer_blocks.{i}."
        for leaf in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"):
            shapes[p + leaf] = (d, d)
        shapes[p + "ff.net.0.proj"], shapes[p + "ff.net.2"] = (f, d), (d, f)
        shapes[p + "ff_context.net.0.proj"], shapes[p + "ff_context.net.2"] = (f, d), (d, f)
    for i in range(n_single):
        p = f"single_transformer_blocks.{i}."
        for leaf in ("attn.to_q", "attn.to_k", "attn.to_v"):
            shapes[p + leaf] = (d, d)
        shapes[p + "proj_mlp"], shapes[p + "proj_out"] = (f, d), (d, d + f)
    return shapes


def synthetic_flux_pool(
    names: tuple[str, ...] = SYNTH_STYLES, rank: int = 8, hidden: int = 128, blocks: tuple[int, int] = (19, 38), seed: int = 0
) -> list[TaskVector]:
    """A deterministic SYNTHETIC pool of rank-``rank`` LoRAs on FLUX's module layout.

    Planted structure, per module: 3 directions common to all vectors and 2 more common to the
    anime-like ones (``SYNTH_ANIME``); each vector's copy of a planted direction is tilted by a
    random amount that grows with depth (so deep blocks fall below τ first); the remaining
    columns are the vector's own random directions.

    Returns:
        TaskVectors with ``meta["synthetic"] = True``.
    """
    if rank < 6:
        raise ValueError(f"synthetic pool: rank must be >= 6 (5 planted directions + 1 own); got {rank}")
    g = torch.Generator().manual_seed(seed)
    shapes = flux_module_shapes(hidden, *blocks)
    mods: dict[str, dict[str, Delta]] = {n: {} for n in names}
    for k, (mod, (n, m)) in enumerate(shapes.items()):
        depth = k / max(1, len(shapes) - 1)
        Z = torch.linalg.qr(torch.randn(n, 5, generator=g))[0]  # (n, 5): 3 common + 2 anime
        tilt = 0.05 + 0.45 * depth * float(torch.rand(1, generator=g))  # tan of the tilt angle
        for name in names:
            planted = Z[:, :5] if name in SYNTH_ANIME else Z[:, :3]
            noise = torch.randn(n, planted.shape[1], generator=g) / math.sqrt(n)
            own = torch.randn(n, rank - planted.shape[1], generator=g) / math.sqrt(n)
            B = torch.cat([planted + tilt * noise, own], 1) * 0.05  # (n, r)
            A = torch.randn(rank, m, generator=g) / math.sqrt(m)  # (r, m)
            mods[name][mod] = LowRank(B.contiguous(), A.contiguous(), 1.0)
    return [TaskVector(n, mods[n], meta={"synthetic": True, "family": "flux", "source": f"synthetic:flux/{n}"}) for n in names]

