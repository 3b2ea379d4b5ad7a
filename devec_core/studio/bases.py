"""Base models, loaded once per process and shared by every user: the causal-LM backend, the
FLUX backend (real FLUX.1 or the tiny toy model), and read access to their unedited weights.

Each backend has its own lock: a user's mix is applied and generated with atomically, so one
user's sliders never reach another's output. On ZeroGPU GPU models load only at startup
(``devec_core.hosting.preload``); later requests get a message naming what the Space holds.
"""

from __future__ import annotations

import os
import threading

import torch

from .. import hosting
from ..backends.flux import FluxBackend
from ..backends.llm import LLMBackend
from ..formats import ModuleWeights
from . import toy
from .caches import BACKENDS, LOCK
from .session import READ_ERRORS, Session, StudioError

FLUX_NEEDS = (
    "Image generation needs the FLUX.1-schnell weights (about 24 GB from the Hub) and a CUDA GPU "
    "with ≥ 24 GB of memory (less with CPU offload). Without them the Studio still decomposes, plots and exports."
)


def _load_once(key: tuple[str, str], load):
    """``BACKENDS[key]``, built by ``load()`` once per process. The load runs under a lock of its
    own, not the studio's ``LOCK``: a model that takes seconds to load (SmolLM2's first GGUF
    conversion, FLUX) must not stop the pools and decompositions every other request and the page
    build need meanwhile. A second caller for the same base waits for the first one's load."""
    with LOCK:
        if key in BACKENDS:
            return BACKENDS[key]
        lk = _LOADING.setdefault(key, threading.Lock())
    with lk:
        with LOCK:
            if key in BACKENDS:
                return BACKENDS[key]
        be = load()
        with LOCK:
            BACKENDS[key] = be
        return be


_LOADING: dict[tuple[str, str], threading.Lock] = {}


def get_llm_backend(base: str):
    """The causal-LM backend for a base model, loaded once per process and shared (its lock
    isolates requests: apply + generate happen atomically)."""

    def load():
        device = hosting.llm_device(base)  # SmolLM2: the CPU everywhere (never a GPU request)
        if device != "cpu":
            _check_gpu_load("llm", base)
        try:
            be = LLMBackend.load(base, device=device)
            hosting.remember_device(be)
        except (*READ_ERRORS, ImportError, RuntimeError) as e:  # + a missing package, CUDA out of memory
            raise StudioError(
                f"could not load the base model {base!r}: {e}. Hub models need network access "
                f"(and HF_TOKEN if gated); 'smollm2' works offline."
            ) from e
        return be

    return _load_once(("llm", base), load)


def get_flux_backend(base: str):
    """The FLUX backend for a base model (``toy.TOY_BASE``: the tiny CPU model), loaded once."""

    def load():
        if base == toy.TOY_BASE:
            return FluxBackend(toy.load_toy_pipeline())
        _check_gpu_load("flux", base)
        try:
            be = FluxBackend.load(base)
            hosting.remember_device(be)
        except (*READ_ERRORS, ImportError, RuntimeError) as e:  # + a missing package, CUDA out of memory
            raise StudioError(f"could not load {base!r}: {e}. " + FLUX_NEEDS) from e
        return be

    return _load_once(("flux", base), load)


def _check_gpu_load(kind: str, base: str) -> None:
    """On ZeroGPU a GPU model can only be built at startup (module scope, ``hosting.preload``):
    later, in a request, ZeroGPU's CUDA emulation refuses it. Say which bases this Space has."""
    if not hosting.loading_allowed():
        have = [b for k, b in BACKENDS if k == kind] or ["none"]
        raise StudioError(
            f"this ZeroGPU Space loads its GPU models at startup only; {base!r} is not one of them "
            f"(loaded: {', '.join(have)}). Add it to DEVEC_PRELOAD_{kind.upper()} in the Space's "
            f"settings, or run the Studio on a GPU machine or a plain GPU Space."
        )


def wrong_base(e: Exception, base: str) -> StudioError:
    """The message for a pool whose shapes do not fit the loaded base model."""
    return StudioError(
        f"the pool does not fit the base model {base!r}: {e}. The task vectors were probably trained on "
        f"another base model; pick that base, or vectors made for this one."
    )


def flux_can_generate(session: Session) -> str | None:
    """None if images can be made for this session, else the reason in words."""
    if session.base == toy.TOY_BASE:
        return toy.toy_missing()
    if session.synthetic or session.base == "synthetic":
        return "This pool is SYNTHETIC (made-up LoRAs on FLUX's module layout at reduced width): there is no model to render it. " + FLUX_NEEDS
    if not torch.cuda.is_available() and os.environ.get("DEVEC_FLUX_ON_CPU") != "1":
        return "No CUDA GPU on this machine. " + FLUX_NEEDS
    return None


def base_weights(backend: str, base: str) -> ModuleWeights:
    """The tab's base model weights, for DoRA adapters and full checkpoints: the model already
    loaded for generation (``get_llm_backend`` / ``get_flux_backend``), read one parameter at a
    time through ``formats.ModuleWeights`` — never a second copy. A mix fused for generation is
    invisible here: each parameter is read from the weight editor's saved original."""
    be = get_llm_backend(base) if backend == "llm" else get_flux_backend(base)
    root = be.model if backend == "llm" else be.pipe.transformer
    return ModuleWeights(root, base, original=be.editor.original, lock=be.lock)
