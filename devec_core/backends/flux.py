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
is not accepted (normalise keys when loading files). LoRAs that also touch the text encoders keep
those modules under "text_encoder." (CLIP) / "text_encoder_2." (T5), e.g.
"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": they are fused into
``pipe.text_encoder`` / ``pipe.text_encoder_2`` the same way (vanilla and DeVec alike: the method
is per module). Text-encoder modules that this pipeline does not have are left out of the mix and
listed in ``ImageResult.left_out`` (never an error); a transformer module that does not exist is
an error (a LoRA for another model).

Offload: ``offload=True`` calls ``pipe.enable_model_cpu_offload(device=...)`` (accelerate hooks
move each whole model to the accelerator for its forward and back). The parameters stay ordinary
tensors that the hooks move with ``.to()``, so a fused weight is written in place into whichever
copy exists (CPU or accelerator) and moves with the model; originals are kept on the CPU and the
sums are formed on the accelerator. Sequential offload (weights on the meta device) is refused.

Isolation: ``backends.base.Backend`` (apply, restore, render, side_by_side under one lock per
instance); each image uses its own ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import models
from ..mix import ApplyStats, Mix, WeightEditor
from ..taskvec import TaskVector
from .base import Backend

TEXT_ENCODERS = {"text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}  # module prefix -> pipeline attribute
_TE_ANY = "text_encoder"  # any module under a text-encoder prefix is routed there or left out, never sent to the transformer


@dataclass
class ImageResult:
    """One image: the mix's label, the image (PIL, or tensor/array per output_type), timings (s)."""

    label: str
    image: Any
    switch_s: float
    generate_s: float
    steps_per_s: float
    apply: ApplyStats | None = None
    left_out: list[str] = field(default_factory=list)  # text-encoder modules this pipeline does not have


def _module_names(source) -> set[str]:
    """Module names a mix source can touch (a Decomposition's blocks, a ``hosting.PackedSource``'s
    packed components, or a VectorPool's vectors)."""
    if hasattr(source, "blocks"):
        return {m for blk in source.blocks for m in blk.modules}
    if isinstance(getattr(source, "components", None), dict):
        return {m for parts in source.components.values() for m in parts}
    return {m for v in getattr(source, "vectors", []) for m in v.modules}


class _View:
    """One model's share of a mix source: modules under ``prefix`` (prefix removed) that ``keep``
    accepts. Components are computed once per source and shared by the views (``memo``)."""

    def __init__(self, source, prefix: str, keep, memo: dict):
        self._source = weakref.ref(source)  # the backend caches views per source: never keep it alive
        self.prefix, self.keep, self.memo = prefix, keep, memo
        self.names = getattr(source, "names", None)

    @property
    def source(self):
        src = self._source()
        if src is None:
            raise ValueError("the mix's source no longer exists")
        return src

    def _mine(self, key: str) -> str | None:
        if self.prefix:
            return key[len(self.prefix):] if key.startswith(self.prefix) and self.keep(key[len(self.prefix):]) else None
        return None if key.startswith(_TE_ANY) else key

    def component(self, kind: str, name: str | None = None):
        if (kind, name) not in self.memo:
            self.memo[(kind, name)] = self.source.component(kind, name)
        out = {}
        for k, d in self.memo[(kind, name)].items():
            m = self._mine(k)
            if m is not None:
                out[m] = d
        return out

    @property
    def vectors(self) -> list[TaskVector]:
        """Extras (biases) of the vectors, routed the same way as the modules."""
        out = []
        for v in getattr(self.source, "vectors", []):
            ex = {}
            for k, t in v.extras.items():
                mod = k.rsplit(".", 1)[0]
                m = self._mine(mod)
                if m is not None:
                    ex[m + k[len(mod):]] = t
            out.append(TaskVector(v.name, {}, ex, v.meta))
        return out


def _pick_offload(offload, device) -> bool:
    """"auto": offload on CUDA cards with less than 40 GB (FLUX.1 + encoders ~33 GB in bf16)."""
    if offload != "auto":
        return bool(offload)
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        return False
    return torch.cuda.get_device_properties(0).total_memory < 40 * 2**30


class FluxBackend(Backend):
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
        self.text_editors = {  # the text encoders take the LoRA's text-encoder modules
            prefix: WeightEditor(getattr(pipe, attr), compute_device=compute, originals_device=originals_device)
            for prefix, attr in TEXT_ENCODERS.items() if getattr(pipe, attr, None) is not None
        }
        self._views: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
        super().__init__()

    # -- routing a mix to the transformer and the text encoders ---------------------------------
    def _has_weight(self, prefix: str, mod: str) -> bool:
        try:
            w = getattr(self.text_editors[prefix].root.get_submodule(mod), "weight", None)
        except AttributeError:
            return False
        return isinstance(w, torch.Tensor) and w.ndim == 2

    def _routes(self, source) -> dict:
        """{"": transformer view, prefix: text-encoder view, "left_out": [...]} for one source (cached)."""
        try:
            hit = self._views.get(source)
        except TypeError:  # not weak-referenceable: no caching
            hit = None
        if hit is not None:
            return hit
        names = _module_names(source)
        te = sorted(n for n in names if n.startswith(_TE_ANY))
        if not te:  # the common case: the source as it is, nothing routed
            routes = {"": source, "left_out": []}
        else:
            memo: dict = {}
            routes = {"": _View(source, "", None, memo)}
            for prefix in self.text_editors:
                routes[prefix] = _View(source, prefix, lambda m, p=prefix: self._has_weight(p, m), memo)
            routes["left_out"] = [n for n in te if not any(
                n.startswith(p) and self._has_weight(p, n[len(p):]) for p in self.text_editors)]
        try:
            self._views[source] = routes
        except TypeError:
            pass
        return routes

    def left_out(self, mix: Mix | None) -> list[str]:
        """Text-encoder modules of the mix's source that this pipeline does not have."""
        return [] if mix is None or mix.source is None else list(self._routes(mix.source)["left_out"])

    def editors(self) -> list[WeightEditor]:
        return [self.editor, *self.text_editors.values()]

    def _apply(self, mix: Mix | None) -> ApplyStats:
        """The transformer's share of ``mix`` to its editor, each text encoder's to its own."""
        if mix is None or mix.source is None:
            st = [self.editor.apply(mix)] + [ed.apply(None) for ed in self.text_editors.values() if ed.current is not None]
        else:
            routes = self._routes(mix.source)
            st = [self.editor.apply(Mix(routes[""], mix.terms, mix.label) if routes[""] is not mix.source else mix)]
            for prefix, ed in self.text_editors.items():
                if prefix in routes:
                    st.append(ed.apply(Mix(routes[prefix], mix.terms, mix.label)))
                elif ed.current is not None:
                    st.append(ed.apply(None))
        return ApplyStats(sum(s.modules_written for s in st), sum(s.params_written for s in st),
                          sum(s.modules_active for s in st), sum(s.seconds for s in st))

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
        off = _pick_offload(offload, device)
        if not off and device is None:
            device = "cuda" if torch.cuda.is_available() else None
        pipe = models.load_flux_pipeline(repo_or_path or models.FLUX_SCHNELL, dtype=dtype, device=None if off else device)
        return cls(pipe, offload=off)

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

    def _finish(self, res: ImageResult, mix: Mix | None, stats: ApplyStats) -> ImageResult:
        res = super()._finish(res, mix, stats)
        res.left_out = self.left_out(mix)
        return res
