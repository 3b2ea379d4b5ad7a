"""Generation: the same prompt, seed and settings rendered with the left mix and the DeVec mix,
side by side, then scored.

A ``GenerationJob`` is what the main process prepares (checks, the decomposition, the two mixes)
for wherever the model runs; ``run_job`` renders it (in a ZeroGPU worker on a Space) and returns
plain data; ``score_job`` adds the CPU-side scores in the calling process.

The model being edited, as a third output (``edited_job`` / ``render_edited``): in isolate mode
the target vector at its usual strength, W0 + s·ΔW_target (the toxic fine-tune before repair);
in joint and pairwise mode the base model W0 that the vectors are added to. Same prompt, seed and
sampling as the pair, rendered as one more job after it (so the pair is not slowed), through the
same apply-under-the-lock discipline. It does not depend on the sliders, so its outputs are kept in
a small process-wide LRU keyed by everything that makes them (``EDITED_CACHE_MAX``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from .. import style_metrics, toy_flux
from ..toxicity import score_texts
from . import toy
from .bases import flux_can_generate, get_flux_backend, get_llm_backend, wrong_base
from .caches import lru_put
from .decomposition import decompose_cached
from ..mix import Mix, vanilla
from .mixes import Coefficients, build_mixes
from .reports import describe
from .session import Session, StudioError


@dataclass
class SideBySide:
    vanilla: object  # str (LLM) or PIL image (FLUX)
    devec: object
    vanilla_s: float
    devec_s: float
    note: str = ""
    vanilla_scores: dict[str, float] = field(default_factory=dict)  # LLM: "toxicity", "capitals"
    devec_scores: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (``run_job``; the app adds its own)


@dataclass
class GenerationJob:
    """One side-by-side generation, ready to run: what the main process prepares (checks, the
    decomposition, the two mixes) for wherever the model runs. Plain data and the two mixes; on
    ZeroGPU the mixes are packed first (``hosting.pack_mixes``: CPU tensors, picklable)."""

    kind: str  # "llm" | "flux"
    base: str
    prompt: str  # FLUX: with the active vectors' trigger words
    mixes: list  # [vanilla, DeVec]
    settings: dict  # llm: max_new_tokens, seed · flux: steps, width, height, seed
    note: str = ""
    part: str = "pair"  # "pair": mixes = [left, DeVec] → SideBySide · "edited": [the model being edited] → Single


@dataclass
class Single:
    """One output of one mix (the model being edited): text or PIL image, seconds, scores, and
    the title / formula the page shows with it."""

    output: object
    seconds: float
    title: str = ""
    formula: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    note: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, where a caller records them


def _prompt(prompt: str | None) -> str:
    """The prompt without surrounding blanks; an empty one is the user's error."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise StudioError("write a prompt first")
    return prompt


def _check_flux(session: Session) -> None:
    why = flux_can_generate(session)
    if why:
        raise StudioError(why)


def llm_job(session: Session, c: Coefficients, prompt: str, seed: int = 0, max_new_tokens: int = 32) -> GenerationJob:
    """Prepare a vanilla-vs-DeVec answer (decomposition and mixes on this process's device)."""
    if session.backend != "llm":
        raise StudioError("this pool is for the FLUX tab")
    prompt = _prompt(prompt)
    max_new_tokens = max(1, min(int(max_new_tokens), 512))
    dec = decompose_cached(session)
    van, dv = build_mixes(dec, c, session.pool_key)
    # the report (with its chance level: seconds on a first call) only when it is the note: nothing shared
    note = describe(dec).markdown if sum(dec.shared_dims().values()) == 0 else ""
    return GenerationJob("llm", session.base, prompt, [van, dv], {"max_new_tokens": max_new_tokens, "seed": int(seed)}, note)


def flux_job(session: Session, c: Coefficients, prompt: str, seed: int = 0, steps: int = 4, width: int = 512, height: int = 512) -> GenerationJob:
    """Prepare vanilla-vs-DeVec images (decomposition and mixes on this process's device)."""
    _check_flux(session)
    prompt = _prompt(prompt)
    trig = ", ".join(t for n, t in session.triggers.items() if c.unique.get(n, 0) or c.vanilla.get(n, 0))
    full = f"{prompt}, {trig}" if trig else prompt
    dec = decompose_cached(session)
    van, dv = build_mixes(dec, c, session.pool_key)
    if session.base == toy.TOY_BASE:  # the tiny model: its own size, steps and CFG; scored where it runs
        return GenerationJob("flux", session.base, full, [van, dv], {"seed": int(seed), "styles": list(session.names)})
    w, h = (max(64, int(x) // 16 * 16) for x in (width, height))
    return GenerationJob("flux", session.base, full, [van, dv], {"steps": max(1, int(steps)), "width": w, "height": h, "seed": int(seed)})


def job_backend(job: GenerationJob):
    """The shared backend that renders ``job`` (loaded once per process)."""
    return get_llm_backend(job.base) if job.kind == "llm" else get_flux_backend(job.base)


def run_job(job: GenerationJob) -> SideBySide | Single:
    """Render both mixes with the same seed and settings. Returns plain data (text or PIL images,
    timings): what a ZeroGPU worker sends back. No scores (they are CPU work: ``score_job``).
    A job of the model being edited (``job.part == "edited"``) gives a ``Single`` (``run_edited``)."""
    if job.part == "edited":
        return run_edited(job)
    t0 = time.perf_counter()
    backend = job_backend(job)
    t_model = time.perf_counter() - t0  # > 0 when the model was still loading (or loads now)
    if job.kind == "flux" and job.base == toy.TOY_BASE:
        r = generate_toy(backend, job)
        r.timings.update(model=t_model, run=time.perf_counter() - t0 - t_model)
        return r
    t1 = time.perf_counter()
    try:
        a, b = backend.side_by_side(job.prompt, list(job.mixes), **job.settings)
    except ValueError as e:
        raise wrong_base(e, job.base) from e
    run = time.perf_counter() - t1  # "other": waiting for the backend's lock, the tokenizer, decoding
    if getattr(a, "rows", 1) > 1:  # both sides in one batched pass (LLM: devec_core.mix.rows)
        timings = {"model": t_model, "both_generate": a.generate_s, "other": max(0.0, run - a.generate_s)}
    else:
        timings = {"model": t_model, "left_switch": a.switch_s, "left_generate": a.generate_s, "devec_switch": b.switch_s,
                   "devec_generate": b.generate_s, "other": max(0.0, run - a.switch_s - a.generate_s - b.switch_s - b.generate_s)}
    note = job.note
    if job.kind == "llm":
        va, vb = a.text.strip(), b.text.strip()
    else:
        va, vb = a.image, b.image
        lo = sorted(set(getattr(a, "left_out", [])) | set(getattr(b, "left_out", [])))
        if lo:  # text-encoder modules of a LoRA that this pipeline does not have (backends/flux.py)
            note = (note + "\n\n" if note else "") + (
                f"Left out of both images: {len(lo)} text-encoder module(s) that this pipeline does not have "
                f"({', '.join(f'`{m}`' for m in lo[:4])}{' …' if len(lo) > 4 else ''})."
            )
    return SideBySide(va, vb, a.switch_s + a.generate_s, b.switch_s + b.generate_s, note, timings=timings)


def score_job(session: Session, r: SideBySide) -> SideBySide:
    """Add the session's text scores to an LLM result (in the calling process)."""
    if session.backend == "llm" and session.scores:
        r.vanilla_scores, r.devec_scores = score_texts([r.vanilla, r.devec], session.scores)
    elif session.backend == "flux" and not (r.vanilla_scores or r.devec_scores):
        r.vanilla_scores, r.devec_scores = generic_image_scores(r.vanilla), generic_image_scores(r.devec)
    return r


def generate_llm(session: Session, c: Coefficients, prompt: str, seed: int = 0, max_new_tokens: int = 32) -> SideBySide:
    """Vanilla and DeVec answers to one prompt (greedy; same seed and settings), with timings."""
    return score_job(session, run_job(llm_job(session, c, prompt, seed, max_new_tokens)))


def generate_flux(session: Session, c: Coefficients, prompt: str, seed: int = 0, steps: int = 4, width: int = 512, height: int = 512) -> SideBySide:
    """Vanilla and DeVec images with the same seed (needs FLUX.1-schnell and a GPU)."""
    return score_job(session, run_job(flux_job(session, c, prompt, seed, steps, width, height)))


def generic_image_scores(image) -> dict[str, float]:
    """Measures that need no model and mean the same on any image (real FLUX included):
    mean saturation, edge density, clipped channel values (devec_core.style_metrics)."""
    try:
        return {"saturation": float(style_metrics.saturation(image)), "edges": float(style_metrics.edge_density(image)), "clipped": float(style_metrics.clipping(image))}
    except (ValueError, TypeError):  # not an RGB image (e.g. output_type="latent"): no scores
        return {}


def _toy_strips(backend, job: GenerationJob) -> list[tuple[list, float]]:
    """The tiny model: per mix of the job, (TOY_SEEDS images, seconds), under the backend's lock."""
    seeds = [int(job.settings["seed"]) + k for k in range(toy.TOY_SEEDS)]
    res = []
    with backend.lock:
        for mix in job.mixes:
            t0 = time.perf_counter()
            try:
                backend.apply(mix)
            except ValueError as e:
                raise wrong_base(e, job.base) from e
            ims = toy_flux.generate(backend.pipe, [job.prompt] * len(seeds), seeds)  # GEN's steps and CFG
            res.append((ims, time.perf_counter() - t0))
    return res


def generate_toy(backend, job: GenerationJob) -> SideBySide:
    """The tiny model: a strip of TOY_SEEDS seeds per side (32×32, toy_flux.GEN steps and CFG), scored."""
    prompt, seed, styles = job.prompt, int(job.settings["seed"]), job.settings["styles"]
    seeds = [seed + k for k in range(toy.TOY_SEEDS)]
    cal, clf = toy.toy_extras()
    (iv, tv), (idv, tdv) = _toy_strips(backend, job)
    note = (
        f"Tiny FLUX-architecture model (assets/style_flux), 32×32 px shown at 6×, seeds {seeds[0]}–{seeds[-1]}, "
        f"{toy_flux.GEN['num_inference_steps']} steps, true CFG {toy_flux.GEN['true_cfg_scale']:g} (the Steps/Width/Height sliders are for real FLUX). "
        "Style scores: 1.00× = that style alone at λ = 1, 0 = the base model; content = the classifier's "
        "probability of the prompted object."
    )
    return SideBySide(
        toy_flux.strip(iv), toy_flux.strip(idv), tv, tdv, note,
        toy_flux.score_images(iv, prompt, styles, cal, clf), toy_flux.score_images(idv, prompt, styles, cal, clf),
    )


# --- the model being edited: a third output ---------------------------------------------------

EDITED_CACHE_MAX = 32  # outputs of the model being edited kept per process (they ignore the sliders)
_EDITED: OrderedDict = OrderedDict()
_EDITED_LOCK = threading.Lock()


def edited_labels(session: Session) -> tuple[str, str]:
    """(title, formula) of the model being edited: isolate → the target before the edit, at its
    usual strength; joint / pairwise → the base model."""
    if session.mode == "isolate" and session.target in session.names:
        s = float(session.strengths.get(session.target, 1.0))
        return f"Before the edit: {session.target} (the model being edited)", f"W₀ + {s:g}·ΔW({session.target})"
    return "Base model (no vectors)", "W₀"


def edited_mix(session: Session, dec) -> Mix:
    """The model being edited as a mix over ``dec``: isolate → vanilla(target at its strength),
    the toxic fine-tune W0 + s·ΔW_target; joint / pairwise → the empty mix (the base W0)."""
    if session.mode == "isolate" and session.target in dec.names:
        return vanilla(dec, {session.target: float(session.strengths.get(session.target, 1.0))}, label="edited")
    return Mix.base(dec)


def edited_job(session: Session, prompt: str, settings: dict) -> GenerationJob:
    """The job that renders the model being edited with the pair's prompt (FLUX: with its trigger
    words) and settings (seed, sampling, size), so the three outputs differ only by their weights."""
    if session.backend == "flux":
        _check_flux(session)
    prompt = _prompt(prompt)
    mix = edited_mix(session, decompose_cached(session))
    return GenerationJob(session.backend, session.base, prompt, [mix], dict(settings), part="edited")


def run_edited(job: GenerationJob) -> Single:
    """Render a job of one mix (the model being edited) with the job's seed and settings; no scores."""
    if len(job.mixes) != 1:
        raise ValueError(f"run_edited renders one mix; got {len(job.mixes)}")
    backend = job_backend(job)
    if job.kind == "flux" and job.base == toy.TOY_BASE:
        ((ims, dt),) = _toy_strips(backend, job)
        cal, clf = toy.toy_extras()
        return Single(toy_flux.strip(ims), dt, scores=toy_flux.score_images(ims, job.prompt, job.settings["styles"], cal, clf))
    try:
        (a,) = backend.side_by_side(job.prompt, list(job.mixes), **job.settings)
    except ValueError as e:
        raise wrong_base(e, job.base) from e
    return Single(a.text.strip() if job.kind == "llm" else a.image, a.switch_s + a.generate_s)


def _edited_key(session: Session, job: GenerationJob) -> tuple:
    """Everything that makes the output: model, pool content (when the mix uses it), the mix's
    terms, prompt, settings, and the scores asked for."""
    (mix,) = job.mixes
    return (job.kind, job.base, session.pool_key if mix.terms else None, mix.terms, job.prompt,
            tuple(sorted((k, repr(v)) for k, v in job.settings.items())), tuple(session.scores))


def render_edited(session: Session, prompt: str, settings: dict, run=None) -> Single:
    """The model being edited answering ``prompt`` with ``settings`` (the pair's), scored and
    labelled; from the process cache when the same output was made before.

    Args:
        session: the user's session (mode, target, pool).
        prompt: the prompt the pair was made with (``GenerationJob.prompt``).
        settings: the pair's ``GenerationJob.settings`` (seed, sampling, size).
        run: renders a job (the app passes its GPU dispatch); default ``run_job`` in this process.

    Returns:
        A ``Single`` with title, formula and scores.
    """
    job = edited_job(session, prompt, settings)
    key = _edited_key(session, job)
    with _EDITED_LOCK:
        hit = _EDITED.get(key)
        if hit is not None:
            _EDITED.move_to_end(key)
    if hit is None:
        r = (run or run_job)(job)
        if session.backend == "llm" and session.scores:
            r.scores = score_texts([r.output], session.scores)[0]
        elif session.backend == "flux" and not r.scores:
            r.scores = generic_image_scores(r.output)
        with _EDITED_LOCK:
            lru_put(_EDITED, key, r, EDITED_CACHE_MAX)
        hit = r
    title, formula = edited_labels(session)
    return replace(hit, title=title, formula=formula, scores=dict(hit.scores))
