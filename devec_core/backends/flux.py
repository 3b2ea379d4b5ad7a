"""FLUX backend: fuse mixes into a diffusers FluxPipeline's transformer and render images.

Public API:
    FluxBackend(pipe, offload=False, originals_device="cpu")
    FluxBackend.load(repo_or_path=FLUX_SCHNELL, dtype=None, device=None, offload="auto")
        any diffusers FLUX repo or local folder (devec_core.models.load_flux_pipeline)
    .apply(mix) -> ApplyStats        fuse Σ λ·ΔW into the transformer's touched Linear weights
    .restore() -> int                bit-identical base weights
    .generate(prompt, steps=4, guidance=0.0, width=512, height=512, seed=0,
              max_sequence_length=256, output_type="pil") -> ImageResult   weights now fused
    .render(prompt, mix, **settings) -> ImageResult              apply + generate under the lock
    .side_by_side(prompt, mixes, **settings) -> list[ImageResult] same prompt, seed, settings
    ImageResult(label, image, switch_s, generate_s, steps_per_s, apply)

Module names in the mix's source are diffusers transformer module paths, e.g.
"transformer_blocks.0.attn.to_q" (``pipe.transformer.get_submodule``); a leading "transformer."
is not accepted (normalise keys when loading files).

Offload: ``offload=True`` calls ``pipe.enable_model_cpu_offload(device=...)`` (accelerate hooks
move each whole model to the accelerator for its forward and back). The parameters stay ordinary
tensors that the hooks move with ``.to()``, so a fused weight is written in place into whichever
copy exists (CPU or accelerator) and moves with the model; originals are kept on the CPU and the
sums are formed on the accelerator. Sequential offload (weights on the meta device) is refused.

Isolation: one ``threading.RLock`` per backend instance around apply + generate (``render``,
``side_by_side``); each image uses its own ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..mix import ApplyStats, Mix, WeightEditor


@dataclass
class ImageResult:
    """One image: the mix's label, the image (PIL, or tensor/array per output_type), timings (s)."""

    label: str
    image: Any
    switch_s: float
    generate_s: float
    steps_per_s: float
    apply: ApplyStats | None = None


def _pick_offload(offload, device) -> bool:
    """"auto": offload on CUDA cards with less than 40 GB (FLUX.1 + encoders ~33 GB in bf16)."""
    if offload != "auto":
        return bool(offload)
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        return False
    return torch.cuda.get_device_properties(0).total_memory < 40 * 2**30


class FluxBackend:
    """A FluxPipeline whose transformer takes mixes.

    Args:
        pipe: a diffusers FluxPipeline (models in eval mode).
        offload: True to enable model CPU offload (accelerate) on ``offload_device``.
        offload_device: the accelerator for offload ("cuda" default when available, else "cpu";
            "cpu" exercises the offload hooks without an accelerator).
        originals_device: where originals of touched weights are kept: "cpu" or "same".
    """

    def __init__(self, pipe, offload: bool = False, offload_device: str | None = None, originals_device: str = "cpu"):
        self.pipe = pipe
        compute = None
        if offload:
            offload_device = offload_device or ("cuda" if torch.cuda.is_available() else "cpu")
            pipe.enable_model_cpu_offload(device=offload_device)
            compute = pipe._offload_device  # sums on the accelerator; params may sit on the CPU
            originals_device = "cpu"
        self.offload = bool(offload)
        self.editor = WeightEditor(pipe.transformer, compute_device=compute, originals_device=originals_device)
        self.lock = threading.RLock()

    @classmethod
    def load(cls, repo_or_path: str | None = None, dtype=None, device: str | None = None, offload="auto") -> "FluxBackend":
        """Load a pipeline with ``devec_core.models.load_flux_pipeline`` and wrap it.

        Args:
            repo_or_path: Hub id or local folder (default FLUX.1-schnell).
            dtype: torch dtype or name (default bfloat16 on CUDA, float32 otherwise).
            device: where the whole pipeline goes when not offloading (default: cuda if present).
            offload: True / False / "auto" (offload on CUDA cards under 40 GB).

        Returns:
            The backend.
        """
        from ..models import FLUX_SCHNELL, load_flux_pipeline

        off = _pick_offload(offload, device)
        if not off and device is None:
            device = "cuda" if torch.cuda.is_available() else None
        pipe = load_flux_pipeline(repo_or_path or FLUX_SCHNELL, dtype=dtype, device=None if off else device)
        return cls(pipe, offload=off)

    # -- weights ----------------------------------------------------------------------------
    def apply(self, mix: Mix | None) -> ApplyStats:
        """Fuse ``mix`` (None = base). See ``devec_core.mix.WeightEditor.apply``."""
        with self.lock:
            return self.editor.apply(mix)

    def restore(self) -> int:
        """Give back bit-identical base weights. Returns the number of tensors written."""
        with self.lock:
            return self.editor.restore()

    # -- images -----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        steps: int = 4,
        guidance: float = 0.0,
        width: int = 512,
        height: int = 512,
        seed: int = 0,
        max_sequence_length: int = 256,
        output_type: str = "pil",
        label: str = "",
    ) -> ImageResult:
        """Render one image with the weights now fused.

        Args:
            prompt: the text prompt.
            steps: denoising steps (schnell: 1–4).
            guidance: guidance scale (used by guidance-distilled models such as FLUX.1-dev; schnell
                ignores it).
            width, height: image size in pixels (multiples of 16 for real FLUX).
            seed: seeds a private torch.Generator (same seed + settings → same image).
            max_sequence_length: T5 tokens (≤ 256 for schnell, ≤ 512 for dev).
            output_type: "pil", "pt" or "np".
            label: copied into the result.

        Returns:
            ImageResult (switch_s = 0; see ``render``).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        if width < 1 or height < 1:
            raise ValueError(f"width and height must be positive; got {width}x{height}")
        gen = torch.Generator("cpu").manual_seed(int(seed))
        with self.lock, torch.inference_mode():
            t0 = time.perf_counter()
            out = self.pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=gen,
                max_sequence_length=max_sequence_length,
                output_type=output_type,
            )
            dt = time.perf_counter() - t0
        return ImageResult(label, out.images[0], 0.0, dt, steps / dt if dt > 0 else float("inf"))

    def render(self, prompt: str, mix: Mix | None, **settings) -> ImageResult:
        """Apply ``mix`` and generate, atomically with respect to other requests on this backend.

        Args:
            prompt: the text prompt.
            mix: the mix (None = base).
            **settings: ``generate`` keyword arguments.

        Returns:
            ImageResult with ``switch_s`` and ``apply`` filled in.
        """
        with self.lock:
            stats = self.editor.apply(mix)
            res = self.generate(prompt, label=(mix.label if mix else "base"), **settings)
        res.switch_s, res.apply = stats.seconds, stats
        return res

    def side_by_side(self, prompt: str, mixes: list[Mix | None], **settings) -> list[ImageResult]:
        """Render one prompt under each mix with the same seed and settings (under one lock).

        Args:
            prompt: the text prompt.
            mixes: two or more mixes (None = base).
            **settings: ``generate`` keyword arguments, shared by every mix.

        Returns:
            One ImageResult per mix, in order.
        """
        if not mixes:
            raise ValueError("side_by_side needs at least one mix; got []")
        with self.lock:
            return [self.render(prompt, m, **settings) for m in mixes]
