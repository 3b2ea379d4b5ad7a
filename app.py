"""DeVec Studio: split task vectors into shared and unique parts, mix them, compare side by side.

UI only: layout and wiring. Every decision lives in ``devec_core.studio`` (pools, decompositions,
mixes, generation, export) and ``devec_core.plots`` (figures). Per-user choices live in
``gr.State``; loaded pools, decompositions and base models are shared, content-keyed caches.
Run: ``python app.py`` (then open http://127.0.0.1:7860).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import traceback

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from devec_core import hosting, plots, studio  # noqa: E402
from devec_core.studio import MAX_VECTORS, Coefficients, StudioError  # noqa: E402
from devec_core.merge.engine import pair_names  # noqa: E402
from devec_core.merge.studio_mix import LEFT_METHODS, left_label  # noqa: E402

MAX_PAIRS = MAX_VECTORS * (MAX_VECTORS - 1) // 2  # pairwise mode: one slider per pair's shared vector


# --- hosting: GPU entry points (ZeroGPU rules: README "Hosting on a Hugging Face Space") -------
# hosting.gpu is spaces.GPU where the `spaces` package is installed (a no-op off ZeroGPU), else the
# identity. It imports `spaces` here, before any model is built, as ZeroGPU requires. Only these
# two functions ever hold a GPU; what crosses in is a GenerationJob (plain data + mixes of CPU
# tensors), what comes back is text or PIL images and timings.


def _flux_seconds(job: studio.GenerationJob) -> int:
    s = job.settings
    return hosting.flux_duration(s["steps"], s["width"], s["height"])


def _llm_seconds(job: studio.GenerationJob) -> int:
    return hosting.llm_duration(job.settings["max_new_tokens"])


def _run_packed(job: studio.GenerationJob) -> studio.SideBySide:
    try:
        return studio.run_job(job)
    finally:
        if hosting.on_zerogpu():  # each call brings a new packed source: drop the last one's factors
            studio.job_backend(job).editor.clear_cache()


@hosting.gpu(duration=_flux_seconds)
def _generate_flux_gpu(job: studio.GenerationJob) -> studio.SideBySide:
    return _run_packed(job)


@hosting.gpu(duration=_llm_seconds)
def _generate_llm_gpu(job: studio.GenerationJob) -> studio.SideBySide:
    return _run_packed(job)


def run_generation(job: studio.GenerationJob) -> studio.SideBySide:
    """Run a prepared job where its model lives: a CPU model (SmolLM2) in this process, never
    asking for a GPU; a GPU model through the GPU function (on ZeroGPU with the mixes packed into
    CPU tensors; elsewhere the decorator does nothing and the mixes go as they are)."""
    if not hosting.runs_on_gpu(studio.job_backend(job)):
        return studio.run_job(job)
    if hosting.on_zerogpu():
        # one packed source per side: a TIES/DARE left side is its own merged vector, not the decomposition's
        job = dataclasses.replace(job, mixes=[hosting.pack_mixes([m])[0] for m in job.mixes])
    return (_generate_flux_gpu if job.kind == "flux" else _generate_llm_gpu)(job)


INTRO = """
# DeVec Studio
Split task vectors (LoRAs, fine-tunes) into the part they **share** and the part **unique** to each
([Damirchi et al., *Decomposing Task Vectors for Refined Model Editing*](https://arxiv.org/abs/2512.22511)),
then mix the parts and compare with plain task arithmetic, **same seed, side by side**.
Directions whose eigenvalue of the chained projections P₁P₂⋯P_k exceeds **τ** count as shared.
"""

HOW = """
**Reading the pictures.** *Spectrum*: every eigenvalue of every module; 1 means a direction that lies in every vector,
the dashed line is τ. *Heat-map*: how many shared directions each module has at this τ. *Bars*: how much of each
vector's squared norm is shared vs unique.

**Modes.** *joint*: one subspace shared by all vectors (style mixing, paper §4.2). *pairwise*: what each pair shares
(merging, §4.1). *isolate*: what the target shares with any reference is removed from it; negate the rest (toxicity, §4.3).
**Coefficients.** Vanilla: W₀ + Σ λᵢ ΔWᵢ. DeVec: W₀ + Σ λᵢᵘ Uᵢ + λˢ S. Pool order matters: the shared subspace is found
inside the first vector's. *Pairwise*: untick "link all pairs" for one λ per pair's shared vector (S_ab).
**Left side.** Compare DeVec with the merge you would otherwise use: vanilla task arithmetic, TIES or DARE
(same λᵢ, `density` = fraction of entries kept). **Download this mix** writes both sides as LoRAs, settings in the metadata.
"""

CSS = """
.devec-out textarea {font-size: 15px !important;}
.devec-note {border-left: 4px solid #DD8452; padding-left: 10px;}
footer {display: none !important;}
"""


def _ui_errors(fn):
    """StudioError → gr.Error with its message; anything else → gr.Error, logged, server stays up."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except StudioError as e:
            raise gr.Error(str(e), duration=None) from None
        except Exception as e:  # noqa: BLE001 - a bad input must never take the server down
            traceback.print_exc()
            raise gr.Error(f"Unexpected error ({type(e).__name__}: {e}). Try another input; if it persists, report it.", duration=None) from None

    return wrapper


def _progress_cb(progress):
    return lambda done, total, stage: progress(done / max(total, 1), desc=f"{stage} {done}/{total}")


# --- callbacks (thin: translate widgets <-> studio) --------------------------------------------


def _pool_outputs(session: studio.Session, dec, new_pool: bool = True):
    """Everything that changes when a pool is (re)loaded: state, texts, sliders, plots."""
    coef = studio.default_coefficients(session)
    rep = studio.describe(dec)
    rows, vans, unis = [], [], []
    for i in range(MAX_VECTORS):
        if i < len(session.names):
            n = session.names[i]
            role = " · target" if session.mode == "isolate" and n == session.target else ""
            rows.append(gr.Row(visible=True))
            vans.append(gr.Slider(value=coef.vanilla[n], label=f"{n}{role} · vanilla λ", visible=True))
            unis.append(gr.Slider(value=coef.unique[n], label=f"{n}{role} · DeVec unique λ", visible=True))
        else:
            rows.append(gr.Row(visible=False))
            vans.append(gr.Slider(value=0.0, visible=False))
            unis.append(gr.Slider(value=0.0, visible=False))
    iso = session.mode == "isolate"
    target = gr.Dropdown(choices=session.names, value=session.target, visible=iso)
    others = [n for n in session.names if n != session.target]
    refs = gr.CheckboxGroup(choices=others, value=list(session.effective_references() or others), visible=iso)
    return [
        session,
        studio.session_markdown(session),
        gr.Radio(value=session.mode),
        target,
        refs,
        gr.Slider(value=session.tau),
        rep.markdown,
        *rows,
        *vans,
        *unis,
        gr.Slider(value=coef.shared),
        *_pair_outputs(session, coef.shared),
        *plots.all_figures(dec),
        gr.Textbox(value=session.prompts[0]) if new_pool and session.prompts else gr.skip(),
    ]


def _pair_outputs(session, shared: float):
    """Pairwise mode: the pair box and one slider per pair (label "a+b"), all at λˢ, linked."""
    pairs = pair_names(session.names) if session.mode == "pairwise" else []
    out = [gr.Group(visible=bool(pairs)), gr.Checkbox(value=True)]
    for i in range(MAX_PAIRS):
        if i < len(pairs):
            out.append(gr.Slider(value=shared, label=f"{pairs[i]} · shared λ", visible=True, interactive=False))
        else:
            out.append(gr.Slider(value=0.0, visible=False))
    return out


def _with_merge(session, coef, left=None, density=None, link=True, *pair_values):
    """The left side's method and (pairwise, unlinked) the per-pair λ's into the coefficients
    (callers that pass none of them get vanilla TA and every pair at λˢ)."""
    coef.left = LEFT_METHODS.get(left, "task_arithmetic")
    coef.density = float(density) if coef.left != "task_arithmetic" and density is not None else None
    if session.mode == "pairwise" and not link:
        coef.pairs = {p: float(v) for p, v in zip(pair_names(session.names), pair_values)}
    return coef


def on_link(link, shared):
    """Linked: every pair slider follows λˢ (and is locked); unlinked: they move on their own."""
    return [gr.Slider(value=shared, interactive=False) if link else gr.Slider(interactive=True) for _ in range(MAX_PAIRS)]


def _tau_outputs(session, dec):
    # τ goes back into its slider: Gradio 6.31 otherwise puts the slider's previous value back when
    # the next event starts after τ was typed or moved with the keyboard (the report said one τ,
    # generation used another)
    return [session, session.tau, studio.describe(dec).markdown, *plots.all_figures(dec)]


def _coefficients(session, values):
    n = MAX_VECTORS
    return Coefficients.from_lists(session.names, list(values[:n]), list(values[n : 2 * n]), values[2 * n])


def _need(session):
    if session is None:
        raise StudioError("no pool loaded yet: pick a preset or load your own vectors")
    return session


@_ui_errors
def on_preset(preset_id, progress=gr.Progress()):
    if not preset_id:
        raise StudioError("pick a preset")
    session, dec = studio.open_preset(preset_id, _progress_cb(progress))
    return _pool_outputs(session, dec)


def make_on_custom(backend):
    @_ui_errors
    def on_custom(files, hub_text, base, add_to_preset, preset_id, mode, tau, progress=gr.Progress()):
        files = [getattr(f, "name", f) for f in (files or [])]
        hubs = [h for h in (hub_text or "").splitlines() if h.strip()]
        base = (base or "").strip() or ("smollm2" if backend == "llm" else "black-forest-labs/FLUX.1-schnell")
        session, dec = studio.open_custom(
            backend, base, files, hubs, preset_id if add_to_preset else None, mode=mode, tau=tau, progress=_progress_cb(progress)
        )
        return _pool_outputs(session, dec)

    return on_custom


@_ui_errors
def on_config(session, mode, target, references, tau, progress=gr.Progress()):
    session = _need(session)
    if mode == "isolate" and target != session.target:
        references = None  # a new target: every other vector is a reference again
    session = studio.with_settings(session, mode=mode, target=target if mode == "isolate" else None, tau=tau, references=references)
    dec = studio.decompose_cached(session, _progress_cb(progress))
    return _pool_outputs(session, dec, new_pool=False)


@_ui_errors
def on_tau(session, tau):
    session = studio.with_settings(_need(session), tau=tau)
    return _tau_outputs(session, studio.decompose_cached(session))


def _timing(label, s, scores=None):
    return f"**{label}** · {s:.1f} s" + studio.scores_markdown(scores or {})


@_ui_errors
def on_generate_llm(session, tau, *args):
    n = 2 * MAX_VECTORS + 1
    session = studio.with_settings(_need(session), tau=tau)
    prompt, seed, max_new = args[n], args[n + 1], args[n + 2]
    coef = _with_merge(session, _coefficients(session, args[:n]), *args[n + 3 :])
    job = studio.llm_job(session, coef, prompt, int(seed), int(max_new))
    r = studio.score_job(session, run_generation(job))
    return (
        r.vanilla, r.devec,
        _timing(left_label(coef.left), r.vanilla_s, r.vanilla_scores), _timing("DeVec", r.devec_s, r.devec_scores),
        r.note,
    )


@_ui_errors
def on_generate_flux(session, tau, *args):
    n = 2 * MAX_VECTORS + 1
    session = studio.with_settings(_need(session), tau=tau)
    prompt, seed, steps, width, height = args[n : n + 5]
    coef = _with_merge(session, _coefficients(session, args[:n]), *args[n + 5 :])
    why = studio.flux_can_generate(session)
    if why:
        raise StudioError(why)
    r = studio.score_job(session, run_generation(studio.flux_job(session, coef, prompt, int(seed), int(steps), int(width), int(height))))
    return (
        r.vanilla, r.devec,
        _timing(left_label(coef.left), r.vanilla_s, r.vanilla_scores), _timing("DeVec", r.devec_s, r.devec_scores),
        r.note,
    )


@_ui_errors
def on_export(session, tau):
    session = studio.with_settings(_need(session), tau=tau)
    return [str(p) for p in studio.export_parts(session)]


@_ui_errors
def on_download(session, tau, *args):
    n = 2 * MAX_VECTORS + 1
    session = studio.with_settings(_need(session), tau=tau)
    coef = _with_merge(session, _coefficients(session, args[:n]), *args[n:])
    return [str(p) for p in studio.download_mix(session, coef)]


@_ui_errors
def on_defaults(session):
    session = _need(session)
    c = studio.default_coefficients(session)
    vals = [c.vanilla.get(n, 0.0) for n in session.names] + [0.0] * (MAX_VECTORS - len(session.names))
    uvals = [c.unique.get(n, 0.0) for n in session.names] + [0.0] * (MAX_VECTORS - len(session.names))
    return [*vals, *uvals, c.shared]


# --- layout ----------------------------------------------------------------------------------


def build_tab(backend: str, prefix: str):
    """One tab's widgets and events. ``prefix`` names its API endpoints (``llm_tau`` ...)."""
    state = gr.State(None)
    choices = studio.preset_choices(backend)
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            gr.Markdown("### 1 · Pool")
            preset = gr.Dropdown(choices=choices, value=studio.default_preset(backend), label="Preset", elem_id=f"{prefix}-preset")
            with gr.Accordion("Your own task vectors (upload or Hub ids)", open=False):
                files = gr.File(
                    label="LoRA / DoRA adapters, checkpoints: .safetensors, a zipped adapter folder (.zip, e.g. this page's export), "
                    "or adapter_model.safetensors + adapter_config.json",
                    file_count="multiple", file_types=list(studio.UPLOAD_SUFFIXES),
                )
                hub = gr.Textbox(label="Hub ids, one per line", placeholder="owner/repo  or  owner/repo/file.safetensors", lines=2)
                base = gr.Textbox(
                    label="Base model",
                    value="smollm2" if backend == "llm" else "black-forest-labs/FLUX.1-schnell",
                    info=("'smollm2' = SmolLM2-135M-Instruct, offline" if backend == "llm" else "images need this model and a CUDA GPU")
                    + "; DoRA adapters and full checkpoints are taken against this model's loaded weights",
                )
                add_to = gr.Checkbox(label="Add to the preset's pool (e.g. your toxic adapter as target against its references)", value=False)
                load = gr.Button("Decompose my pool", variant="secondary")
            mode = gr.Radio(list(studio.MODES), value="joint", label="Mode", info="joint: style mixing · pairwise: merging · isolate: remove a behaviour")
            target = gr.Dropdown(choices=[], label="Target (isolate): the vector to clean", visible=False, elem_id=f"{prefix}-target")
            refs = gr.CheckboxGroup(choices=[], label="References (isolate): what the target shares with these is removed", visible=False)
            info = gr.Markdown()
        with gr.Column(scale=2):
            gr.Markdown("### 2 · Threshold and coefficients")
            tau = gr.Slider(0.05, 1.0, value=0.85, step=0.01, label="τ (eigenvalue threshold; the paper uses 0.85)", elem_id=f"{prefix}-tau")
            report = gr.Markdown(elem_classes=["devec-note"], elem_id=f"{prefix}-report")
            rows, vans, unis = [], [], []
            for i in range(MAX_VECTORS):
                with gr.Row(visible=False) as row:
                    vans.append(gr.Slider(-2.0, 2.0, value=0.0, step=0.05, label=f"vector {i + 1} · vanilla λ", elem_id=f"{prefix}-van-{i}"))
                    unis.append(gr.Slider(-2.0, 2.0, value=0.0, step=0.05, label=f"vector {i + 1} · DeVec unique λ", elem_id=f"{prefix}-uni-{i}"))
                rows.append(row)
            with gr.Row():
                shared = gr.Slider(-2.0, 2.0, value=0.0, step=0.05, label="DeVec shared λˢ (0 = mix unique parts only)", elem_id=f"{prefix}-shared")
                defaults = gr.Button("Reset coefficients", size="sm", scale=0)
            with gr.Group(visible=False) as pair_box:
                link = gr.Checkbox(value=True, label="Link all pairs to λˢ (untick: one slider per pair's shared vector)", elem_id=f"{prefix}-link")
                pair_sliders = []
                for j in range(0, MAX_PAIRS, 3):
                    with gr.Row():
                        for i in range(j, min(j + 3, MAX_PAIRS)):
                            pair_sliders.append(gr.Slider(-2.0, 2.0, value=0.0, step=0.05, label=f"pair {i + 1} · shared λ", visible=False,
                                                          interactive=False, elem_id=f"{prefix}-pair-{i}"))
            with gr.Row():
                left = gr.Dropdown(list(LEFT_METHODS), value=next(iter(LEFT_METHODS)), label="Left side: merge method",
                                   info="what DeVec is compared with (same λᵢ)", elem_id=f"{prefix}-left")
                density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="TIES / DARE density (fraction kept)", elem_id=f"{prefix}-density")

    gr.Markdown("### 3 · Generate: vanilla vs DeVec, same seed")
    with gr.Row():
        if backend == "llm":
            prompt = gr.Textbox(label="Prompt", value="What is the capital of Sweden?", scale=3, elem_id=f"{prefix}-prompt")
            seed = gr.Number(label="Seed", value=0, precision=0, scale=1)
            extra = [gr.Slider(1, 256, value=32, step=1, label="Max new tokens", scale=1)]
        else:
            prompt = gr.Textbox(label="Prompt", value="a fox in a forest clearing at dawn", scale=3, elem_id=f"{prefix}-prompt")
            seed = gr.Number(label="Seed", value=0, precision=0, scale=1)
            extra = [
                gr.Slider(1, 50, value=4, step=1, label="Steps", scale=1),
                gr.Slider(256, 1536, value=768, step=64, label="Width", scale=1),
                gr.Slider(256, 1536, value=768, step=64, label="Height", scale=1),
            ]
        gen = gr.Button("Generate both", variant="primary", scale=1, elem_id=f"{prefix}-generate")
    if backend == "flux":
        gr.Markdown(
            "<small>The offline *Tiny FLUX* presets render real images on the CPU (a small FLUX-architecture model built "
            "by `python demo/style/build.py`; three seeds per side, scores under each). Other presets: "
            f"{studio.FLUX_NEEDS}</small>"
        )
    gen_note = gr.Markdown(elem_classes=["devec-note"])
    with gr.Row(equal_height=True):
        with gr.Column():
            t_van = gr.Markdown("**Vanilla task arithmetic**", elem_id=f"{prefix}-time-vanilla")
            out_van = (
                gr.Textbox(label="W₀ + Σ λᵢ ΔWᵢ", lines=5, elem_id=f"{prefix}-out-vanilla", elem_classes=["devec-out"])
                if backend == "llm"
                else gr.Image(label="W₀ + Σ λᵢ ΔWᵢ", elem_id=f"{prefix}-out-vanilla", height=340)
            )
        with gr.Column():
            t_dv = gr.Markdown("**DeVec**", elem_id=f"{prefix}-time-devec")
            out_dv = (
                gr.Textbox(label="W₀ + Σ λᵢᵘ Uᵢ + λˢ S", lines=5, elem_id=f"{prefix}-out-devec", elem_classes=["devec-out"])
                if backend == "llm"
                else gr.Image(label="W₀ + Σ λᵢᵘ Uᵢ + λˢ S", elem_id=f"{prefix}-out-devec", height=340)
            )

    gr.Markdown("### 4 · What is shared")
    with gr.Row():
        p_spec = gr.Plot(label="Eigenvalue spectrum", elem_id=f"{prefix}-spectrum", show_label=False)
        p_dims = gr.Plot(label="Shared dimension per module", elem_id=f"{prefix}-dims", show_label=False)
    with gr.Row():
        p_norm = gr.Plot(label="Shared vs unique per vector", elem_id=f"{prefix}-norms", show_label=False)
        with gr.Column():
            gr.Markdown("### 5 · Export\nThe unique and shared parts at this τ as LoRA files (FLUX: diffusers `.safetensors`; LLM: PEFT adapter folders, zipped).")
            with gr.Row():
                exp = gr.Button("Export parts", elem_id=f"{prefix}-export")
                dl = gr.Button("Download this mix", elem_id=f"{prefix}-download")
            exp_files = gr.File(label="Downloads", file_count="multiple", interactive=False)

    # --- events ---
    pool_outs = [state, info, mode, target, refs, tau, report, *rows, *vans, *unis, shared, pair_box, link, *pair_sliders,
                 p_spec, p_dims, p_norm, prompt]
    merge_in = [left, density, link, *pair_sliders]
    tau_outs = [state, tau, report, p_spec, p_dims, p_norm]
    coef_in = [*vans, *unis, shared]
    preset.input(on_preset, [preset], pool_outs, api_name=f"{prefix}_preset", concurrency_limit=2)
    load.click(make_on_custom(backend), [files, hub, base, add_to, preset, mode, tau], pool_outs, api_name=f"{prefix}_custom", concurrency_limit=1)
    mode.input(on_config, [state, mode, target, refs, tau], pool_outs, api_name=f"{prefix}_mode", concurrency_limit=2)
    target.input(on_config, [state, mode, target, refs, tau], pool_outs, api_name=False, concurrency_limit=2)
    refs.input(on_config, [state, mode, target, refs, tau], pool_outs, api_name=False, concurrency_limit=2)
    tau.release(on_tau, [state, tau], tau_outs, api_name=f"{prefix}_tau", concurrency_limit=4)
    defaults.click(on_defaults, [state], coef_in, api_name=False)
    gen_fn = on_generate_llm if backend == "llm" else on_generate_flux
    gen.click(
        gen_fn, [state, tau, *coef_in, prompt, seed, *extra, *merge_in], [out_van, out_dv, t_van, t_dv, gen_note],
        api_name=f"{prefix}_generate", concurrency_limit=1, concurrency_id="gpu",
    )
    exp.click(on_export, [state, tau], [exp_files], api_name=f"{prefix}_export", concurrency_limit=2)
    dl.click(on_download, [state, tau, *coef_in, *merge_in], [exp_files], api_name=f"{prefix}_download", concurrency_limit=2)
    link.input(on_link, [link, shared], pair_sliders, api_name=False)
    shared.release(on_link, [link, shared], pair_sliders, api_name=False)
    return preset, pool_outs


def build_demo() -> gr.Blocks:
    """The whole app (no launch): importable by tests and by Spaces."""
    with gr.Blocks(title="DeVec Studio") as demo:
        gr.Markdown(INTRO)
        with gr.Accordion("How to read this page", open=False):
            gr.Markdown(HOW)
        with gr.Tabs():
            with gr.Tab("Behaviour editing (LLM)", id="llm"):
                llm_preset, llm_outs = build_tab("llm", "llm")
            with gr.Tab("Style mixing (FLUX)", id="flux"):
                flux_preset, flux_outs = build_tab("flux", "flux")
        # open the offline presets for each new visitor (per-session state)
        demo.load(on_preset, [llm_preset], llm_outs, api_name=False)
        demo.load(on_preset, [flux_preset], flux_outs, api_name=False)
    demo.queue(default_concurrency_limit=2, max_size=32)
    return demo


LAUNCH_KWARGS = dict(theme=gr.themes.Soft(primary_hue="orange", secondary_hue="blue"), css=CSS, max_file_size="1gb")

# Base models are built here, at import, on a Space with a GPU (ZeroGPU packs what is moved to
# "cuda" now and streams it into each GPU worker); elsewhere they load on first use.
PRELOADED = hosting.preload()

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**LAUNCH_KWARGS)
