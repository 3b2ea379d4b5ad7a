"""Opening a session: on a preset, on the user's files (optionally added to a preset's pool), or
on vectors already loaded; and a copy of a session with another mode / target / references / τ.
Each returns the session and its decomposition (``decomposition.decompose_cached``).
"""

from __future__ import annotations

from dataclasses import replace

from ..algorithm import PAPER_TAU
from ..pool import MODES, Decomposition, Progress
from ..presets import get_preset
from ..taskvec import TaskVector
from . import toy
from .caches import LOCK, POOLS, PRESET_POOLS, pool_key, remember_pool
from .decomposition import check_tau, decompose_cached
from .pools import custom_pool, preset_vectors
from .session import MAX_VECTORS, Session, StudioError
from .uploads import check_pool, skipped_notes


def _start(vectors: list[TaskVector], backend: str, base: str, **kw) -> Session:
    kw["notes"] = list(kw.get("notes", [])) + skipped_notes(vectors)
    if len(vectors) > MAX_VECTORS:
        raise StudioError(f"{len(vectors)} vectors: the Studio shows at most {MAX_VECTORS}")
    fams = {v.meta.get("family") for v in vectors} - {None}
    if fams and fams != {backend}:
        other = "Style mixing (FLUX)" if "flux" in fams else "Behaviour editing (LLM)"
        raise StudioError(f"these are {'/'.join(sorted(fams))} task vectors; open them in the {other} tab")
    key = remember_pool(vectors)
    return Session(backend=backend, pool_key=key, names=[v.name for v in vectors], base=base, **kw)


def open_preset(preset_id: str, progress: Progress | None = None) -> tuple[Session, Decomposition]:
    """Load a preset's pool, decompose it (cached) and return the session at the preset's τ."""
    try:
        preset = get_preset(preset_id)
    except ValueError as e:
        raise StudioError(str(e)) from e
    if preset.user_slot and preset.mode == "isolate" and preset.target is None:
        raise StudioError(
            f"{preset.title}: add your own target adapter (upload or Hub id) — this preset is a pool of "
            f"references; see {preset.recipe or 'the recipe'} for how to make one — and load it with 'Decompose'."
        )
    with LOCK:
        key = PRESET_POOLS.get(preset.id)
        vectors = POOLS.get(key) if key else None
    if vectors is None:
        vectors = preset_vectors(preset, progress)
        with LOCK:
            PRESET_POOLS[preset.id] = pool_key(vectors)
    s = _start(
        vectors,
        preset.backend,
        preset.base.id,
        title=preset.title,
        preset_id=preset.id,
        synthetic=preset.synthetic,
        needs_gpu=preset.base.needs_gpu,
        mode=preset.mode,
        target=preset.target,
        tau=preset.tau,
        strengths={v.name: v.strength for v in preset.vectors},
        triggers={v.name: v.trigger for v in preset.vectors if v.trigger},
        notes=[f"{v.name}: {v.note}" for v in preset.vectors if v.note],
        prompts=list(preset.prompts),
        source=("preset", preset.id),
        description=" ".join(preset.description.split())
        + ("\n\n" + toy.toy_reference_markdown(preset.names) if preset.base.id == toy.TOY_BASE else ""),
        scores=tuple(preset.scores) if preset.backend == "llm" else (),
        start=(
            {"mode": preset.mode, "target": preset.target, **preset.coefficients.model_dump()} if preset.coefficients else None
        ),
    )
    return s, decompose_cached(s, progress)


def open_custom(
    backend: str,
    base: str,
    files: list[str] | None = None,
    hub_ids: list[str] | None = None,
    preset_id: str | None = None,
    mode: str = "joint",
    target: str | None = None,
    tau: float = PAPER_TAU,
    progress: Progress | None = None,
) -> tuple[Session, Decomposition]:
    """A pool from uploads and Hub ids, optionally added to a preset's pool (e.g. a toxic adapter
    as the target against the preset's references)."""
    files, hub_ids = [str(f) for f in files or []], [h.strip() for h in hub_ids or [] if h.strip()]
    if preset_id:
        base = get_preset(preset_id).base.id
    rejected: list[str] = []  # a batch keeps its good files; the bad ones are named in the pool's notes
    vectors, n_extra = custom_pool(files, hub_ids, preset_id, progress=progress, base=base, backend=backend, rejected=rejected)
    title, kw = "Your pool", {"source": ("custom", tuple(files), tuple(hub_ids), preset_id)}
    kw["notes"] = [f"⚠ not loaded: {r}" for r in rejected]
    if preset_id:
        preset = get_preset(preset_id)
        title = f"{preset.title} + yours"
        kw["strengths"] = {v.name: v.strength for v in preset.vectors}
        kw["scores"] = tuple(preset.scores) if preset.backend == "llm" else ()
    if mode == "isolate" and target is None and n_extra:
        target = vectors[-n_extra].name  # the user's own vector is the one to clean
    return open_vectors(vectors, backend, base, mode, target, tau, progress, title=title, preset_id=preset_id, **kw)



def open_vectors(
    vectors: list[TaskVector], backend: str, base: str, mode: str = "joint", target: str | None = None, tau: float = PAPER_TAU,
    progress: Progress | None = None, **kw,
) -> tuple[Session, Decomposition]:
    """A session on an already loaded pool (used by ``open_custom`` and by tests)."""
    check_pool(vectors)
    names = [v.name for v in vectors]
    if mode not in MODES:
        raise StudioError(f"unknown mode {mode!r}; pick one of {MODES}")
    if mode == "isolate" and target not in names:
        target = names[-1]
    kw.setdefault("scores", ("toxicity", "offensive") if backend == "llm" else ())
    s = _start(vectors, backend, base, mode=mode, target=target, tau=check_tau(tau), **kw)
    return s, decompose_cached(s, progress)


def with_settings(
    session: Session, mode: str | None = None, target: str | None = None, tau: float | None = None, references: list[str] | None = None
) -> Session:
    """A copy of the session with another mode / target / references / τ (never mutates the input)."""
    s = replace(session, names=list(session.names), strengths=dict(session.strengths))
    if references is not None:
        bad = [r for r in references if r not in s.names]
        if bad:
            raise StudioError(f"references {bad} are not in the pool {s.names}")
        s.references = tuple(references)
    if mode is not None:
        if mode not in MODES:
            raise StudioError(f"unknown mode {mode!r}; pick one of {MODES}")
        s.mode = mode
    if target is not None:
        if target not in s.names:
            raise StudioError(f"target {target!r} is not in the pool {s.names}")
        s.target = target
    if s.mode == "isolate" and s.target not in s.names:
        s.target = s.names[0]
    if tau is not None:
        s.tau = check_tau(tau)
    return s

