"""Where the Studio runs (ZeroGPU Space, a plain GPU, a CPU) and what that decides.

The rules come from the Hub's ZeroGPU page (docs/hub/spaces-zerogpu.md) and the
``huggingface/skills`` "huggingface-zerogpu" skill; README "Hosting on a Hugging Face Space" lists
them with their source. In short, on ZeroGPU:

- ``import spaces`` patches torch in the main process: ``torch.cuda.is_available()`` is True there
  although no GPU is attached, ``.to("cuda")`` at module scope is recorded and the weights are
  packed to disk at launch; only a ``@spaces.GPU`` function, run in a forked worker (reused while
  warm), gets a real GPU. Arguments and results cross by pickling.
- so base models are built at import (``preload``), decompositions and mixes are computed on the
  CPU in the main process (``decomposition_device``), what crosses into the GPU function is plain
  data with CPU tensors only (``pack_mixes``), and nothing CUDA comes back;
- a GPU call asks for a duration computed from its inputs (``flux_duration``, ``llm_duration``);
  a model on the CPU (SmolLM2, 135M parameters) never asks for one (``runs_on_gpu``).

Everywhere else (a plain GPU Space, a laptop with CUDA, a CPU) the same calls do the obvious
thing: ``gpu(...)`` returns the function unchanged, devices follow ``torch.cuda.is_available()``.

Public API:
    on_zerogpu() -> bool                   SPACES_ZERO_GPU is set (what ``spaces`` itself reads)
    on_space() -> bool                     SPACE_ID is set (any Hugging Face Space)
    spaces_module() -> module | None       ``spaces`` if installed (imported on first use)
    gpu(duration) -> decorator             spaces.GPU(duration=...) when ``spaces`` is importable
                                           (a no-op off ZeroGPU), else the identity
    decomposition_device() -> str          "cpu" on ZeroGPU (never emulated CUDA), else "auto"
    llm_device(base) -> str                "cpu" for SmolLM2 everywhere; else cuda if available
    preload_plan() -> dict                 which bases ``preload`` builds at import, and where
    preload(progress=print) -> dict        build them (studio's shared backend caches)
    loading_allowed() -> bool              False on ZeroGPU outside ``preload`` (no GPU model is
                                           built in a request or inside the GPU function)
    remember_device(backend)               note at load time whether its model sits on CUDA
    runs_on_gpu(backend) -> bool           that note: generation goes through the GPU function
    flux_duration(steps, width, height) -> int        seconds to request for two FLUX images
    llm_duration(max_new_tokens, outputs=2) -> int     seconds for the LLM answers on a GPU
    pack_mixes(mixes) -> list[Mix]         the same mixes over a ``PackedSource``: only the
                                           components they use, CPU tensors, picklable
    PackedSource                           a mix source of plain data (``component``, ``vectors``)
    cuda_tensors(obj) -> list[str]         paths of CUDA tensors inside an object (for checks)
    cpu_requirements(space_text) -> str    requirements-cpu.txt from requirements.txt (CPU torch);
                                           ``python -m devec_core.hosting`` rewrites the file
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .mix import Mix
from .taskvec import Dense, LowRank, TaskVector

SMOLLM2_ALIASES = ("smollm2", "", None)
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"

# GPU-time estimates for the duration requested per call (ZeroGPU checks the *requested* duration
# against the visitor's remaining quota, so it must be the realistic worst case, not a fixed 120 s).
# Not measured here (no GPU was available to this project): FLUX.1-schnell in bf16 at 1024x1024
# is taken as ~0.5 s per step on ZeroGPU's half H200, plus the switch (fusing a mix), the text
# encoders and the VAE; a cold worker also streams the packed weights from disk to the GPU.
FLUX_S_PER_STEP_MEGAPIXEL = 0.5
FLUX_OVERHEAD_S = 15.0  # cold-start streaming of ~33 GB, two weight switches, encoders, VAE
LLM_S_PER_TOKEN = 0.06  # a 7B model in bf16, greedy, batch 1
LLM_OVERHEAD_S = 10.0
MIN_DURATION_S, MAX_DURATION_S = 10, 120


def _truthy(value: str | None) -> bool:
    # the same test as spaces.config.boolean
    return value is not None and value.lower() in ("1", "t", "true")


def on_zerogpu() -> bool:
    """True on a ZeroGPU Space (the platform sets SPACES_ZERO_GPU; ``spaces`` reads the same)."""
    return _truthy(os.environ.get("SPACES_ZERO_GPU"))


def on_space() -> bool:
    """True on any Hugging Face Space (the platform sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def spaces_module():
    """The ``spaces`` package, or None when it is not installed.

    The Gradio SDK image installs it on every Space (and it must not be pinned in requirements.txt:
    the builder adds its own); a local install may lack it. Imported on first use, not with this
    module, so the library and CLI never pay for it. On ZeroGPU it must be imported before any
    CUDA work: app.py calls ``gpu`` (which imports it) before ``preload``.
    """
    try:
        import spaces
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return spaces


def gpu(duration: int | Callable[..., int]) -> Callable:
    """Decorator for a function that needs the GPU: ``spaces.GPU(duration=duration)``.

    ``duration`` may be a callable taking the decorated function's arguments (ZeroGPU's dynamic
    duration). Without the ``spaces`` package (a local install) the function is returned as is;
    with it but off ZeroGPU, ``spaces.GPU`` itself returns the function unchanged.
    """
    spaces = spaces_module()
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def decomposition_device() -> str:
    """Where decompositions are computed: the CPU on ZeroGPU (the main process has no GPU, and
    ``spaces`` makes ``torch.cuda.is_available()`` lie), else "auto" (CUDA when present)."""
    return "cpu" if on_zerogpu() else "auto"


def is_smollm2(base: str | None) -> bool:
    return base in SMOLLM2_ALIASES


def llm_device(base: str | None) -> str:
    """SmolLM2 (135M) runs on the CPU everywhere: about a second per answer, the demo's float32
    numerics, and never a GPU request. Other LLMs: CUDA when present (on ZeroGPU: emulated in the
    main process, real in the GPU worker)."""
    if is_smollm2(base):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def preload_plan() -> dict[str, list[str]]:
    """The bases to build at import: {"llm": [...], "flux": [...]}.

    ``DEVEC_PRELOAD``: "auto" (default) preloads on a Space that has a GPU (ZeroGPU or a plain GPU
    Space) — FLUX.1-schnell and SmolLM2 — and nothing elsewhere (a laptop or CI loads lazily);
    "1" always, "0" never. ``DEVEC_PRELOAD_FLUX`` / ``DEVEC_PRELOAD_LLM``: comma-separated bases
    instead of the defaults (Hub ids or local folders; "smollm2" for the offline LLM).
    """
    mode = os.environ.get("DEVEC_PRELOAD", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"DEVEC_PRELOAD must be 'auto', '0' or '1'; got {mode!r}")
    on = mode == "1" or (mode == "auto" and (on_zerogpu() or (on_space() and torch.cuda.is_available())))
    if not on:
        return {"llm": [], "flux": []}
    flux = _split(os.environ.get("DEVEC_PRELOAD_FLUX")) if "DEVEC_PRELOAD_FLUX" in os.environ else [FLUX_SCHNELL]
    llm = _split(os.environ.get("DEVEC_PRELOAD_LLM")) if "DEVEC_PRELOAD_LLM" in os.environ else ["smollm2"]
    if flux and not torch.cuda.is_available():  # FLUX.1 needs a GPU; a CPU Space would only swap
        flux = [b for b in flux if os.path.isdir(b)]
    return {"llm": llm, "flux": flux}


_preloading = False


def loading_allowed() -> bool:
    """Whether a GPU model may be built now: always, except on ZeroGPU outside ``preload`` (in a
    request, ZeroGPU's CUDA emulation refuses new CUDA tensors, and a model built inside the GPU
    function would be rebuilt by every new worker)."""
    return _preloading or not on_zerogpu()


def preload(progress: Callable[[str], Any] | None = print) -> dict[str, list[str]]:
    """Build the planned base models now (module scope of app.py), into studio's shared caches.

    On ZeroGPU this is where ``.to("cuda")`` must happen (the platform packs those weights at
    launch and streams them into each GPU worker). A base that fails to load is reported and
    skipped: the app still starts, and that base's error reaches the user when they pick it.

    Returns:
        {"llm": [loaded bases], "flux": [loaded bases], "failed": ["base: error", ...]}
    """
    from . import studio  # here, not at the top: studio imports this module (devices, ZeroGPU rules)

    if on_zerogpu():
        spaces_module()  # patches torch before any .to("cuda") below
    global _preloading
    plan = preload_plan()
    done: dict[str, list[str]] = {"llm": [], "flux": [], "failed": []}
    _preloading = True
    try:
        for kind, get in (("llm", studio.get_llm_backend), ("flux", studio.get_flux_backend)):
            for base in plan[kind]:
                try:
                    get(base)
                    done[kind].append(base)
                    if progress:
                        progress(f"[devec] preloaded {kind} base {base!r}")
                except Exception as e:  # noqa: BLE001 - the app must start; the error shows on use
                    done["failed"].append(f"{base}: {e}")
                    if progress:
                        progress(f"[devec] could not preload {kind} base {base!r}: {e}")
    finally:
        _preloading = False
    return done


def _model_of(backend) -> torch.nn.Module | None:
    for attr in ("model", "pipe"):
        m = getattr(backend, attr, None)
        if m is None:
            continue
        if attr == "pipe":
            m = getattr(m, "transformer", None)
        if isinstance(m, torch.nn.Module):
            return m
    return None


def remember_device(backend) -> None:
    """Record where the backend's model was put, at load time. On ZeroGPU the emulated device is
    only visible in the thread that imported ``spaces`` (torch modes are thread-local): a request
    thread would see the placeholder tensors as CPU tensors, so the answer is kept from here."""
    m = _model_of(backend)
    p = next(m.parameters(), None) if m is not None else None
    backend.devec_on_gpu = p is not None and p.device.type == "cuda"


def runs_on_gpu(backend) -> bool:
    """True when the backend's model was put on CUDA (on ZeroGPU: the emulated device), i.e. its
    generation goes through the GPU function; False for CPU models (SmolLM2), which run in the
    calling process and never request GPU time."""
    if not hasattr(backend, "devec_on_gpu"):
        remember_device(backend)
    return bool(backend.devec_on_gpu)


def flux_duration(steps: int, width: int, height: int) -> int:
    """Seconds of GPU to request for one side-by-side (two images) at this size and step count."""
    mp = max(1, int(width)) * max(1, int(height)) / 2**20
    s = FLUX_OVERHEAD_S + 2 * max(1, int(steps)) * FLUX_S_PER_STEP_MEGAPIXEL * mp
    return int(min(MAX_DURATION_S, max(MIN_DURATION_S, round(s))))


def llm_duration(max_new_tokens: int, outputs: int = 2) -> int:
    """Seconds of GPU to request for ``outputs`` answers of up to ``max_new_tokens`` tokens: the
    pair (2) or the model being edited (1). Counted as one generation per answer, the case where
    the mixes are fused in turn (a dense term); the batched rows (``LLMBackend.side_by_side``) take
    about one generation for all of them, so this is an upper bound."""
    s = LLM_OVERHEAD_S + max(1, int(outputs)) * max(1, int(max_new_tokens)) * LLM_S_PER_TOKEN
    return int(min(MAX_DURATION_S, max(MIN_DURATION_S, round(s))))


# --- what crosses into the GPU function ------------------------------------------------------


def _cpu(d):
    if isinstance(d, LowRank):
        return LowRank(d.B.detach().to("cpu"), d.A.detach().to("cpu"), float(d.scale))
    if isinstance(d, Dense):
        return Dense(d.W.detach().to("cpu"))
    raise ValueError(f"unsupported delta type {type(d).__name__}")


@dataclass
class PackedSource:
    """A mix source made of plain data: the components some mixes use, as CPU factors.

    ``component(kind, name)`` and ``vectors`` (extras only) are what ``WeightEditor`` reads, so a
    mix over a PackedSource fuses exactly like the same mix over the Decomposition it came from.
    """

    names: list[str]
    components: dict[tuple[str, str | None], dict[str, Any]] = field(default_factory=dict)
    vectors: list[TaskVector] = field(default_factory=list)

    def component(self, kind: str, name: str | None = None) -> dict[str, Any]:
        try:
            return self.components[(kind, name)]
        except KeyError as e:
            raise ValueError(f"component {kind}:{name} was not packed; packed: {sorted(map(str, self.components))}") from e


def pack_mixes(mixes: list) -> list:
    """The same mixes over one ``PackedSource``: only the components they use, detached, on the
    CPU. Picklable; the original source (a Decomposition, its blocks, the pool) stays behind.

    Args:
        mixes: ``devec_core.mix.Mix`` objects over one source (None entries = the base model).

    Returns:
        New mixes, same terms and labels, in order.
    """
    sources = {id(m.source) for m in mixes if m is not None and m.terms}
    if len(sources) > 1:
        raise ValueError(f"pack_mixes: the mixes must share one source; got {len(sources)}")
    src = next((m.source for m in mixes if m is not None and m.terms), None)
    packed = PackedSource(list(getattr(src, "names", [])))
    extras_of: set[str] = set()
    for m in mixes:
        if m is None:
            continue
        for comp, _ in m.active().items():
            key = (comp.kind, comp.name)
            if key not in packed.components:
                packed.components[key] = {mod: _cpu(d) for mod, d in src.component(comp.kind, comp.name).items()}
            if comp.kind in ("delta", "unique") and comp.name:
                extras_of.add(comp.name)
    for v in getattr(src, "vectors", []) or []:
        if v.name in extras_of and v.extras:
            packed.vectors.append(TaskVector(v.name, {}, {p: t.detach().to("cpu") for p, t in v.extras.items()}))
    return [None if m is None else Mix(packed if m.terms else None, m.terms, m.label) for m in mixes]


def cuda_tensors(obj: Any, path: str = "", _seen: set | None = None) -> list[str]:
    """Paths of CUDA tensors anywhere inside ``obj`` (containers, dataclasses, plain objects)."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [path or "<tensor>"] if obj.device.type == "cuda" else []
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += cuda_tensors(v, f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            out += cuda_tensors(v, f"{path}[{i}]", seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in vars(obj).items():
            out += cuda_tensors(v, f"{path}.{k}", seen)
    return out


# --- requirements: one source for every pin, two torch lines -----------------------------------

CPU_TORCH = "torch==2.13.0"  # local installs and CI: the CPU build (a bare pin on PyPI pulls CUDA)
CPU_HEADER = (
    "# GENERATED from requirements.txt by `python -m devec_core.hosting` — edit requirements.txt.\n"
    "# Local installs and CI: the Space's pins with the CPU torch build instead of the Space's torch.\n"
)


def cpu_requirements(space_text: str) -> str:
    """requirements-cpu.txt from requirements.txt: the torch line swapped for ``CPU_TORCH``,
    comments dropped, everything else kept in order.

    Raises:
        ValueError: requirements.txt has no single ``torch==`` line.
    """
    lines = [ln.strip() for ln in space_text.splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    torch_lines = [i for i, ln in enumerate(reqs) if ln.replace(" ", "").lower().startswith("torch==")]
    if len(torch_lines) != 1:
        raise ValueError(f"requirements.txt must pin torch exactly once (torch==X); found {len(torch_lines)} torch== lines")
    reqs[torch_lines[0]] = CPU_TORCH
    return CPU_HEADER + "\n".join(reqs) + "\n"


if __name__ == "__main__":  # python -m devec_core.hosting: regenerate requirements-cpu.txt
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (root / "requirements-cpu.txt").write_text(cpu_requirements((root / "requirements.txt").read_text()))
    print(f"wrote {root / 'requirements-cpu.txt'}")
