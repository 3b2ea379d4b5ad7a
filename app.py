"""DeVec Studio: split task vectors into shared and unique parts, mix them, compare side by side.

UI only: layout and wiring. Every decision lives in ``devec_core.studio`` (pools, decompositions,
mixes, generation, export) and ``devec_core.plots`` (figures). Per-user choices live in
``gr.State``; loaded pools, decompositions and base models are shared, content-keyed caches.
Run: ``python app.py`` (then open http://127.0.0.1:7860).

Why ~800 lines in one file: it is the layout and event wiring of two tabs built by one function
(``build_tab``/``_wire_tab``) plus the small browser-side scripts they attach; every piece is
UI glue with no logic to test apart from the page, and the browser tests drive it as a whole.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import inspect
import io
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from devec_core import hosting, models, plots, studio, toy_flux  # noqa: E402
from devec_core.studio import share  # noqa: E402
from devec_core.algorithm import PAPER_TAU  # noqa: E402
from devec_core.merge.engine import pair_names  # noqa: E402
from devec_core.merge.studio_mix import DEFAULT_LEFT, LEFT_METHODS, left_label  # noqa: E402
from devec_core.studio import MAX_VECTORS, Coefficients, StudioError, clean_message  # noqa: E402

TAU_MIN = 0.05  # the τ slider's lower end (τ → 0 would call every direction shared)
FLUX_HUB_BASE = "black-forest-labs/FLUX.1-schnell"  # the base for uploaded FLUX LoRAs

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
    return hosting.llm_duration(job.settings["max_new_tokens"], outputs=len(job.mixes))


def _run_packed(job: studio.GenerationJob) -> studio.SideBySide | studio.Single:
    try:
        return studio.run_job(job)
    finally:
        if hosting.on_zerogpu():  # each call brings a new packed source: drop the last one's factors
            studio.job_backend(job).editor.clear_cache()


@hosting.gpu(duration=_flux_seconds)
def _generate_flux_gpu(job: studio.GenerationJob) -> studio.SideBySide | studio.Single:
    return _run_packed(job)


@hosting.gpu(duration=_llm_seconds)
def _generate_llm_gpu(job: studio.GenerationJob) -> studio.SideBySide | studio.Single:
    return _run_packed(job)


def run_generation(job: studio.GenerationJob) -> studio.SideBySide:
    """Run a prepared job where its model lives: a CPU model (SmolLM2) in this process, never
    asking for a GPU; a GPU model through the GPU function (on ZeroGPU with the mixes packed into
    CPU tensors; elsewhere the decorator does nothing and the mixes go as they are)."""
    t0 = time.perf_counter()
    backend = studio.job_backend(job)  # loads the model when nothing did before (no warm-up)
    t_model = time.perf_counter() - t0
    if not hosting.runs_on_gpu(backend):
        r = studio.run_job(job)
        r.timings["model"] = r.timings.get("model", 0.0) + t_model
        return r
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
the dashed line is τ. *Heat-map*: the shared fraction of each module's ‖ΔW‖² at this τ
(hover a cell for its module, shared dimension and fraction). *Bars*: how much of each
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
.devec-results.devec-stale {position: relative;}
.devec-results.devec-stale > * {opacity: 0.45;}
.devec-results.devec-stale::before {content: "Out of date: the settings changed since this was made. Generate again to update.";
  display: block; background: #fff3cd; color: #664d03; padding: 4px 10px; border-radius: 6px; font-size: 14px; opacity: 1;}
"""


# --- errors: a toast that closes itself, on the action's own outputs, one log line -----------

log = logging.getLogger("devec.app")
TOAST_S = 8  # seconds an error toast stays up


def _ui_errors(fn):
    """StudioError (and share.SettingsError) → one toast, one log line; anything else is a bug:
    traceback in the log, a toast that says so. The server stays up either way."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (StudioError, share.SettingsError) as e:
            msg = clean_message(e)
            log.info("user error in %s: %s", fn.__name__, msg)
            raise gr.Error(msg, duration=TOAST_S, print_exception=False) from e
        except Exception as e:  # noqa: BLE001 - a bad input must never take the server down
            log.exception("bug in %s", fn.__name__)
            raise gr.Error(clean_message(f"Unexpected error ({type(e).__name__}: {e}). Try another input; if it persists, report it."),
                           duration=TOAST_S, print_exception=False) from e

    wrapper.__name__ = fn.__name__
    wrapper.__signature__ = inspect.signature(fn)
    wrapper.__annotations__ = getattr(fn, "__annotations__", {})
    return wrapper


def wire(fn, named: dict, progress: bool = False, request: bool = False):
    """Named inputs: ``fn(x, ...)`` gets one namespace ``x`` with an attribute per widget name
    (lists of widgets stay lists), instead of slicing ``*args``. Returns (callable, input list)
    for a Gradio event; ``progress`` / ``request`` add gr.Progress / gr.Request after the inputs."""
    comps, layout, pnames = [], [], []
    for name, c in named.items():
        if isinstance(c, (list, tuple)):
            layout.append((name, len(c)))
            comps += list(c)
            pnames += [f"{name}_{i}" for i in range(len(c))]
        else:
            layout.append((name, None))
            comps.append(c)
            pnames.append(name)

    def call(*values):
        vals = list(values[: len(comps)])
        extra = list(values[len(comps):])
        ns, i = {}, 0
        for name, n in layout:
            if n is None:
                ns[name] = vals[i]
                i += 1
            else:
                ns[name] = vals[i : i + n]
                i += n
        kw = {}
        if progress:
            kw["progress"] = extra.pop(0)
        if request:
            kw["request"] = extra.pop(0)
        return fn(SimpleNamespace(**ns), **kw)

    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in pnames]  # the API's parameter names (gradio_client kwargs)
    ann = {}
    if progress:
        params.append(P("progress", P.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    if request:
        params.append(P("request", P.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request))
        ann["request"] = gr.Request
    call.__signature__ = inspect.Signature(params)
    call.__annotations__ = ann
    call.__name__ = fn.__name__
    return call, comps


def _progress_cb(progress):
    return lambda done, total, stage: progress(done / max(total, 1), desc=f"{stage} {done}/{total}")


# --- one tab's widgets, by name ----------------------------------------------------------------


def _need(session):
    if session is None:
        raise StudioError("no pool loaded yet: pick a preset or load your own vectors")
    return session


def _slider_updates(w, session: studio.Session, coef: Coefficients, off=()):
    """Rows, on/off, link, vanilla and DeVec sliders for this pool (hidden beyond it)."""
    out = {}
    for i in range(MAX_VECTORS):
        if i < len(session.names):
            n = session.names[i]
            role = " · target" if session.mode == "isolate" and n == session.target else ""
            v, u = coef.vanilla.get(n, 0.0), coef.unique.get(n, 0.0)
            linked = abs(v - u) < 1e-12
            out[w.rows[i]] = gr.Row(visible=True)
            out[w.ons[i]] = gr.Checkbox(value=n not in off, label=f"{n}{role}")
            out[w.links[i]] = gr.Checkbox(value=linked)
            out[w.vans[i]] = gr.Slider(value=v, label="λ (vanilla)" if not linked else "λ (both sides)", visible=True)
            out[w.unis[i]] = gr.Slider(value=u, label="DeVec unique λ", visible=True, interactive=not linked)
        else:
            out[w.rows[i]] = gr.Row(visible=False)
            out[w.ons[i]] = gr.Checkbox(value=True)
            out[w.links[i]] = gr.Checkbox(value=True)
            out[w.vans[i]] = gr.Slider(value=0.0)
            out[w.unis[i]] = gr.Slider(value=0.0)
    out[w.shared] = gr.Slider(value=coef.shared)
    pairs = pair_names(session.names) if session.mode == "pairwise" else []
    out[w.pair_box] = gr.Group(visible=bool(pairs))
    out[w.link] = gr.Checkbox(value=True)
    for i in range(MAX_PAIRS):
        if i < len(pairs):
            out[w.pair_sliders[i]] = gr.Slider(value=coef.shared, label=f"{pairs[i]} · shared λ", visible=True, interactive=False)
        else:
            out[w.pair_sliders[i]] = gr.Slider(value=0.0, visible=False)
    return out


def pool_updates(w, session, dec, coef=None, prompt=None, off=()):
    """Everything that changes when a pool, mode, target or references change: state, texts,
    sliders, plots; the prompt box and the preset prompts when ``prompt`` is given."""
    coef = coef or studio.default_coefficients(session)
    iso = session.mode == "isolate"
    others = [n for n in session.names if n != session.target]
    out = {
        w.state: session,
        w.info: clean_message(studio.session_markdown(session)),
        w.mode: gr.Radio(value=session.mode),
        w.target: gr.Dropdown(choices=session.names, value=session.target, visible=iso),
        w.refs: gr.CheckboxGroup(choices=others, value=list(session.effective_references() or others), visible=iso),
        w.tau: gr.Slider(value=session.tau),
        w.report: studio.describe(dec).markdown,
        **_slider_updates(w, session, coef, off),
        **dict(zip(w.plots, plots.page_figures(dec))),
    }
    if prompt is not None:
        out[w.prompt] = gr.Textbox(value=prompt)
        out[w.examples] = gr.Dataset(samples=[[p] for p in session.prompts] or [[prompt]])
    return out


def _coefficients(w, x) -> Coefficients:
    """The sliders as Coefficients: a vector switched off is 0 on both sides; a linked one takes
    its vanilla λ on the DeVec side too; the left method, density and (pairwise) pair λ's."""
    session = x.state
    n = len(session.names)
    vans = [v if on else 0.0 for v, on in zip(x.vans[:n], x.ons[:n])]
    unis = [(v if link else u) if on else 0.0 for v, u, on, link in zip(x.vans[:n], x.unis[:n], x.ons[:n], x.links[:n])]
    coef = Coefficients.from_lists(session.names, vans, unis, x.shared)
    coef.left = LEFT_METHODS.get(x.left, DEFAULT_LEFT)
    coef.density = float(x.density) if coef.left != DEFAULT_LEFT and x.density is not None else None
    if session.mode == "pairwise" and not x.link:
        coef.pairs = {p: float(v) for p, v in zip(pair_names(session.names), x.pair_sliders)}
    return coef


def current_settings(w, x) -> dict:
    """The shareable settings (devec_core.share) of what is on screen."""
    session = x.state
    n = len(session.names)
    coef = _coefficients(w, x)
    s = {"tab": w.backend}
    if session.source and session.source[0] == "preset":
        s["preset"] = session.source[1]
    else:
        s["pool"] = "custom"
    s.update(mode=session.mode, tau=round(float(session.tau), 4))
    if session.mode == "isolate":
        s["target"] = session.target
        if session.references is not None:
            s["references"] = list(session.effective_references() or [])
    s["vanilla"] = {nm: float(v) for nm, v in zip(session.names, x.vans[:n])}
    s["unique"] = {nm: float(v if link else u) for nm, v, u, link in zip(session.names, x.vans[:n], x.unis[:n], x.links[:n])}
    s["off"] = [nm for nm, on in zip(session.names, x.ons[:n]) if not on]
    s["shared"] = float(x.shared)
    s["left"] = x.left
    if coef.density is not None:
        s["density"] = coef.density
    s["prompt"] = x.prompt
    s["seed"] = int(x.seed or 0)
    for k in w.extra:
        s[k] = getattr(x, k)
    return s


def settings_outputs(w, settings: dict) -> dict:
    q = share.to_query(settings) if settings.get("preset") else ""
    link = (f"[🔗 Link to these settings](?{q}) (right-click → copy link; opens this page with them)" if q
            else "Settings of an uploaded pool: load the same files to restore them.")
    return {w.settings_json: share.to_json(settings), w.settings_link: link}


def _tab_restore(w, settings: dict, progress=None):
    """Open the settings' preset and put every control where the settings say."""
    session, _ = studio.open_preset(settings["preset"], _progress_cb(progress) if progress else None)
    session = studio.with_settings(session, mode=settings.get("mode"), target=settings.get("target"), tau=settings.get("tau"),
                                   references=settings.get("references"))
    dec = studio.decompose_cached(session)
    base = studio.default_coefficients(session)
    van = {n: float(settings.get("vanilla", {}).get(n, base.vanilla[n])) for n in session.names}
    uni = {n: float(settings.get("unique", {}).get(n, base.unique[n])) for n in session.names}
    coef = Coefficients(van, uni, float(settings.get("shared", base.shared)))
    out = pool_updates(w, session, dec, coef, prompt=settings.get("prompt") or (session.prompts[0] if session.prompts else ""),
                       off=settings.get("off", ()))
    out[w.preset] = gr.Dropdown(value=settings["preset"])
    if "seed" in settings:
        out[w.seed] = settings["seed"]
    if settings.get("left") in LEFT_METHODS:
        out[w.left] = settings["left"]
    if settings.get("density") is not None:
        out[w.density] = settings["density"]
    for k, comp in w.extra.items():
        if settings.get(k) is not None:
            out[comp] = settings[k]
    return out


# --- the model's one-time work, in the background at server start --------------------------

_WARM: dict[str, threading.Thread] = {}


class _Visitors:
    """Visitors' generations in flight. Background warm-up work that a click does not need (the
    FLUX tab's, while the page opens on the LLM tab) waits until there are none: on two cores it
    would otherwise take half the machine from the first click (``bench/bench_first_generate.py``,
    first start, page ready → both outputs: 8.4 s while it ran beside the click, 4.2 s since it waits;
    README "The first Generate both")."""

    def __init__(self) -> None:
        self._n = 0
        self._cv = threading.Condition()

    def serving(self, fn):
        """Decorator: count ``fn``'s calls as a visitor's generation."""

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self._cv:
                self._n += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._cv:
                    self._n -= 1
                    self._cv.notify_all()

        return wrapped

    def wait_idle(self, timeout: float = 600.0) -> bool:
        """Block until no visitor's generation is in flight (False after ``timeout`` seconds)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._n == 0, timeout=timeout)

    @property
    def active(self) -> int:
        return self._n


_VISITORS = _Visitors()
_OPENINGS: dict[str, tuple | None] = {}  # backend -> (session, decomposition) of its default preset (build_demo)
_OPENED = threading.Event()  # set once build_demo has them
WARM_TOKENS = 2  # the warm-up's own answer: enough to run every one-time path of a generation
WARM_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.95}  # the LLM tab's default decoding path


def _warm_first_pair(b: str, session) -> str:
    """Run the default preset's first pair once, small, through the path a click takes (prepare the
    job, both switches, both generations, the scores), so the one-time costs of a first generation
    (the report's chance level, resolving the mixes' factors, saving the touched weights' originals,
    the first forward, the chat template, the scorers) are paid before a user clicks. The model's
    lock is held only for that short pair. The LLM renders both sides as rows of one batch and writes
    no weight (``LLMBackend.side_by_side``); a FLUX model stays at the DeVec mix, and a click on the
    same settings renders that side first without a switch (``Backend.side_by_side``). Returns what
    was done, for the log."""
    coef = studio.default_coefficients(session)
    prompt = session.prompts[0] if session.prompts else "Hello"
    if b == "llm":
        job = studio.llm_job(session, coef, prompt, 0, WARM_TOKENS)
        job.settings.update(WARM_SAMPLING)
    else:
        why = studio.flux_can_generate(session)
        if why:
            return "no first pair (this machine cannot render it)"
        job = studio.flux_job(session, coef, prompt, 0, 1, 256, 256)
    be = studio.job_backend(job)
    if hosting.on_zerogpu() and hosting.runs_on_gpu(be):
        return "no first pair (a ZeroGPU model's first call belongs to a visitor's request)"
    if b == "flux" and job.base == studio.toy.TOY_BASE:
        # a click on the tiny model renders 2 × TOY_SEEDS images at full steps in any case; what the
        # warm-up can take off it is the one-time part: both mixes resolved and fused once, one
        # forward pass per module (one 1-step image), the scorers' loads. Seconds less of the cores
        # taken from a visitor who clicks on the LLM tab meanwhile.
        t = time.perf_counter()
        with be.lock:
            for mix in job.mixes:
                be.apply(mix)
            toy_flux.generate(be.pipe, [job.prompt], [0], steps=1)
        studio.toy.toy_extras()
        return f"first pair (one 1-step image, both mixes fused) {time.perf_counter() - t:.2f}"
    r = studio.score_job(session, run_generation(job))
    return "first pair " + " ".join(f"{k} {v:.2f}" for k, v in r.timings.items())


def start_warmup(backends=("llm", "flux")) -> dict[str, threading.Thread]:
    """The default presets' one-time work in background threads, so the first "Generate both" only
    waits for what is left: SmolLM2's GGUF conversion at once (in a child process, so the page build
    keeps the GIL and the cores are both used); then, once ``build_demo`` has decomposed the default
    presets, the model loads (SmolLM2 from its converted folder, the tiny FLUX model), the scorers and
    one small first pair (``_warm_first_pair``). Every stage is timed in the
    log ("warm-up llm: ..."). A base that fails to load is logged; its error reaches the user when
    they generate."""
    for b in backends:
        if b in _WARM:
            continue
        pid = studio.default_preset(b)
        if not pid:
            continue
        preset = studio.get_preset(pid)
        base = preset.base.id

        def work(b=b, base=base, scores=tuple(preset.scores)):
            t, done = time.perf_counter(), []

            def lap(what):
                nonlocal t
                now = time.perf_counter()
                done.append(f"{what} {now - t:.2f} s")
                t = now

            try:
                if b == "llm" and models.converted_folder(base, in_subprocess=True) is not None:
                    lap("GGUF conversion (child process) or its check")
                # what follows imports transformers / diffusers in this thread: only after the page
                # build's own imports (two threads importing one package can see it half-initialised)
                _OPENED.wait(timeout=600)
                lap("waiting for the page build")
                if b == "llm":
                    studio.get_llm_backend(base)
                    lap("model load")
                    if scores:
                        studio.score_texts(["warm-up"], scores)  # the scorers' own one-time loads
                        lap("scorers")
                else:
                    first = _WARM.get("llm")  # the page opens on the LLM tab: its warm-up has the cores first
                    if first is not None and first is not threading.current_thread():
                        first.join(timeout=600)
                        lap("waiting for the LLM warm-up")
                    if _VISITORS.active:
                        _VISITORS.wait_idle()
                        lap("waiting for visitors' generations")
                    studio.get_flux_backend(base)
                    lap("model load")
                opening = _OPENINGS.get(b)
                if opening:
                    if b != "llm" and _VISITORS.active:
                        _VISITORS.wait_idle()
                        lap("waiting for visitors' generations")
                    what = _warm_first_pair(b, opening[0])
                    lap(what)
                log.info("warm-up %s (%s): %s", b, base, "; ".join(done))
            except Exception as e:  # noqa: BLE001 - a missing model is the user's error later, not a crash now
                log.warning("warm-up: %s base %s not ready (%s) after %s", b, base, clean_message(e), "; ".join(done) or "nothing")

        t = threading.Thread(target=work, name=f"devec-warmup-{b}", daemon=True)
        t.start()
        _WARM[b] = t
    return _WARM


def _log_timings(backend: str, t_prepare: float, r, t_score: float, t_total: float) -> None:
    """One log line per generation with its stages (``bench/bench_first_generate.py`` reads it)."""
    parts = [f"prepare {t_prepare:.2f}"] + [f"{k} {v:.2f}" for k, v in r.timings.items()] + [f"score {t_score:.2f}", f"total {t_total:.2f}"]
    log.info("timings %s generate: %s s", backend, " · ".join(parts))


# --- layout + events ----------------------------------------------------------------------------

STALE_JS = """(prefix) => { const r = document.getElementById(prefix + '-results'); if (r && r.dataset.made) r.classList.add('devec-stale');
 const d = document.getElementById(prefix + '-downloads'); if (d) d.classList.add('devec-stale'); }"""


def _js_mark_stale(prefix: str) -> str:
    # returns a stamp for a hidden box: a js-only step with no output ran only once in Gradio 6.31
    return f"() => {{ ({STALE_JS})('{prefix}'); return 'stale ' + Date.now(); }}"


def _js_fresh_then(prefix: str, part: str) -> str:
    """A click's browser step: mark ``part`` fresh, pass the inputs on unchanged."""
    return f"(...args) => {{ ({_js_fresh(prefix, part)})(); return args; }}"


def _js_fresh(prefix: str, part: str) -> str:
    return (f"() => {{ const r = document.getElementById('{prefix}-{part}'); if (r) {{ r.classList.remove('devec-stale');"
            f" r.dataset.made = '1'; }} return 'fresh ' + Date.now(); }}")


def build_tab(backend: str, prefix: str, opening: tuple | None):
    """One tab's widgets and events. ``opening`` = (session, decomposition) of the default preset,
    computed once at server start: the page opens with it, no load event races the user."""
    session, dec = opening if opening else (None, None)
    coef = studio.default_coefficients(session) if session else None
    w = SimpleNamespace(backend=backend, prefix=prefix)
    w.state = gr.State(session)
    w.stamp = gr.Textbox(visible=False)  # written by the browser-side stale / fresh steps
    w.history_state = gr.State([])
    with gr.Column(elem_id=f"{prefix}-controls"):
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                gr.Markdown("### 1 · Pool")
                w.preset = gr.Dropdown(choices=studio.preset_choices(backend), value=session.preset_id if session else None,
                                       label="Preset", elem_id=f"{prefix}-preset")
                with gr.Accordion("Your own task vectors (upload or Hub ids)", open=False):
                    w.files = gr.File(
                        label="LoRA / DoRA adapters, checkpoints: .safetensors, a zipped adapter folder (.zip, e.g. this page's export), "
                        "or adapter_model.safetensors + adapter_config.json",
                        file_count="multiple", file_types=list(studio.UPLOAD_SUFFIXES),
                    )
                    w.hub = gr.Textbox(label="Hub ids, one per line", placeholder="owner/repo  or  owner/repo/file.safetensors", lines=2)
                    default_base = studio.get_preset(studio.default_preset(backend)).base.id if backend == "llm" else FLUX_HUB_BASE
                    w.base = gr.Textbox(
                        label="Base model", value=default_base,
                        info=("'smollm2' = SmolLM2-135M-Instruct, offline" if backend == "llm" else "images need this model and a CUDA GPU")
                        + "; DoRA adapters and full checkpoints are taken against this model's loaded weights",
                    )
                    w.add_to = gr.Checkbox(label="Add to the preset's pool (e.g. your toxic adapter as target against its references)", value=False)
                    w.load = gr.Button("Decompose my pool", variant="secondary", elem_id=f"{prefix}-load")
                w.mode = gr.Radio(list(studio.MODES), value=session.mode if session else "joint", label="Mode",
                                  info="joint: style mixing · pairwise: merging · isolate: remove a behaviour")
                iso = bool(session and session.mode == "isolate")
                names = session.names if session else []
                others = [n for n in names if n != (session.target if session else None)]
                w.target = gr.Dropdown(choices=names, value=session.target if iso else None, label="Target (isolate): the vector to clean",
                                       visible=iso, elem_id=f"{prefix}-target")
                w.refs = gr.CheckboxGroup(choices=others, value=others if iso else [], visible=iso,
                                          label="References (isolate): what the target shares with these is removed")
                w.info = gr.Markdown(studio.session_markdown(session) if session else "", elem_id=f"{prefix}-info")
            with gr.Column(scale=2):
                gr.Markdown("### 2 · Threshold and coefficients")
                w.tau = gr.Slider(TAU_MIN, 1.0, value=session.tau if session else PAPER_TAU, step=0.01,
                                  label=f"τ (eigenvalue threshold; the paper uses {PAPER_TAU}; {TAU_MIN}–1)", elem_id=f"{prefix}-tau")
                w.report = gr.Markdown(studio.describe(dec).markdown if dec else "", elem_classes=["devec-note"], elem_id=f"{prefix}-report")
                gr.Markdown("<small>Per vector: on/off · 🔗 one λ for both sides (untick to set DeVec's separately)</small>")
                w.rows, w.ons, w.links, w.vans, w.unis = [], [], [], [], []
                for i in range(MAX_VECTORS):
                    # the opening values of the default preset (later pools arrive as updates)
                    n = names[i] if i < len(names) else None
                    v, u = (coef.vanilla[n], coef.unique[n]) if n else (0.0, 0.0)
                    linked = abs(v - u) < 1e-12
                    role = " · target" if iso and n == session.target else ""
                    with gr.Row(visible=n is not None, equal_height=True) as row:
                        w.ons.append(gr.Checkbox(value=True, label=f"{n}{role}" if n else f"vector {i + 1}", scale=1, min_width=120,
                                                 elem_id=f"{prefix}-on-{i}"))
                        w.links.append(gr.Checkbox(value=linked, label="🔗", scale=0, min_width=60, elem_id=f"{prefix}-link-{i}"))
                        w.vans.append(gr.Slider(-2.0, 2.0, value=v, step=0.05, label="λ (both sides)" if linked else "λ (vanilla)", scale=3,
                                                elem_id=f"{prefix}-van-{i}"))
                        w.unis.append(gr.Slider(-2.0, 2.0, value=u, step=0.05, label="DeVec unique λ", scale=3, interactive=not linked,
                                                elem_id=f"{prefix}-uni-{i}"))
                    w.rows.append(row)
                with gr.Row():
                    w.shared = gr.Slider(-2.0, 2.0, value=coef.shared if coef else 0.0, step=0.05, label="DeVec shared λˢ (0 = mix unique parts only)", elem_id=f"{prefix}-shared")
                    w.defaults = gr.Button("Reset coefficients", size="sm", scale=0)
                with gr.Group(visible=False) as w.pair_box:
                    w.link = gr.Checkbox(value=True, label="Link all pairs to λˢ (untick: one slider per pair's shared vector)", elem_id=f"{prefix}-link")
                    w.pair_sliders = []
                    for j in range(0, MAX_PAIRS, 3):
                        with gr.Row():
                            for i in range(j, min(j + 3, MAX_PAIRS)):
                                w.pair_sliders.append(gr.Slider(-2.0, 2.0, value=0.0, step=0.05, label=f"pair {i + 1} · shared λ", visible=False,
                                                                interactive=False, elem_id=f"{prefix}-pair-{i}"))
                with gr.Row():
                    w.left = gr.Dropdown(list(LEFT_METHODS), value=next(iter(LEFT_METHODS)), label="Left side: merge method",
                                         info="what DeVec is compared with (same λᵢ)", elem_id=f"{prefix}-left")
                    w.density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="TIES / DARE density (fraction kept)", elem_id=f"{prefix}-density")

        gr.Markdown("### 3 · Generate: vanilla vs DeVec, same seed")
        with gr.Row():
            first = (session.prompts[0] if session and session.prompts else "")
            w.prompt = gr.Textbox(label="Prompt", value=first, scale=3, elem_id=f"{prefix}-prompt")
            w.seed = gr.Number(label="Seed", value=0, precision=0, scale=1, elem_id=f"{prefix}-seed")
            if backend == "llm":
                w.extra = {
                    "max_new_tokens": gr.Slider(1, 256, value=32, step=1, label="Max new tokens", scale=1),
                    "temperature": gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy: the seed does nothing)",
                                             scale=1, elem_id=f"{prefix}-temperature"),
                    "top_p": gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p", scale=1),
                }
            else:
                w.extra = {
                    "steps": gr.Slider(1, 50, value=4, step=1, label="Steps", scale=1),
                    "width": gr.Slider(256, 1536, value=768, step=64, label="Width", scale=1),
                    "height": gr.Slider(256, 1536, value=768, step=64, label="Height", scale=1),
                }
            w.gen = gr.Button("Generate both", variant="primary", scale=1, elem_id=f"{prefix}-generate")
        w.examples = gr.Dataset(components=[w.prompt], samples=[[p] for p in (session.prompts if session else [])] or [[first]],
                                label="The preset's prompts (click one)", elem_id=f"{prefix}-examples")
        # the model being edited, beside the pair: where it is the story (the toxic model before
        # repair) on by default; on the FLUX tab (the base image without LoRAs) off by default
        w.show_edited = gr.Checkbox(
            value=backend == "llm", elem_id=f"{prefix}-show-edited",
            label=("Also show the model being edited (isolate: the target at λ = 1, e.g. the toxic fine-tune before repair; "
                   "other modes: the base model), same prompt, seed and sampling; made after the pair" if backend == "llm" else
                   "Also show the base model without LoRAs (same prompt and seed; one more generation, made after the pair)"),
        )
        w.edited_req = gr.State(None)  # what the last pair was made with (the third output repeats it)
    if backend == "flux":
        gr.Markdown(
            "<small>The offline *Tiny FLUX* presets render real images on the CPU (a small FLUX-architecture model built "
            "by `python demo/style/build.py`; three seeds per side, scores under each). Other presets: "
            f"{studio.FLUX_NEEDS}</small>"
        )
    with gr.Column(elem_id=f"{prefix}-results", elem_classes=["devec-results"]):
        w.gen_note = gr.Markdown(elem_classes=["devec-note"], elem_id=f"{prefix}-gen-note")
        with gr.Row(equal_height=True):
            ed_title, ed_formula = studio.edited_labels(session) if session else ("Base model (no vectors)", "W₀")
            w.edited_col, w.t_edited, w.out_edited = _output_column(prefix, backend, "edited", f"**{ed_title}**", ed_formula,
                                                                    visible=w.show_edited.value)
            _, w.t_van, w.out_van = _output_column(prefix, backend, "vanilla", "**Vanilla task arithmetic**", "W₀ + Σ λᵢ ΔWᵢ")
            _, w.t_dv, w.out_dv = _output_column(prefix, backend, "devec", "**DeVec**", "W₀ + Σ λᵢᵘ Uᵢ + λˢ S")
    with gr.Accordion("History and settings to share", open=True):
        w.history = gr.Markdown("<small>Each generation is added here (newest first), with a link that restores its settings.</small>",
                                elem_id=f"{prefix}-history")
        with gr.Row(elem_classes=["devec-nostale"]):
            w.settings_json = gr.Code(label="Settings (JSON; copy, or paste and apply)", language="json", interactive=True, lines=6,
                                      elem_id=f"{prefix}-settings-json")
            with gr.Column(scale=0, min_width=220):
                w.settings_link = gr.Markdown(elem_id=f"{prefix}-settings-link")
                w.apply_settings = gr.Button("Apply these settings", size="sm", elem_id=f"{prefix}-apply-settings")

    gr.Markdown("### 4 · What is shared")
    figs = plots.page_figures(dec) if dec else (None, "", None)
    with gr.Row():
        p_spec = gr.Plot(figs[0], label="Eigenvalue spectrum", elem_id=f"{prefix}-spectrum", show_label=False)
        # an inline SVG (gr.HTML): hovering a cell names its module, shared dimension and fraction
        p_dims = gr.HTML(figs[1], label="Shared fraction per module", elem_id=f"{prefix}-dims")
    with gr.Row():
        p_norm = gr.Plot(figs[2], label="Shared vs unique per vector", elem_id=f"{prefix}-norms", show_label=False)
        with gr.Column():
            gr.Markdown("### 5 · Export\nThe unique and shared parts at this τ as LoRA files (FLUX: diffusers `.safetensors`; LLM: PEFT adapter folders, zipped).")
            with gr.Row():
                w.exp = gr.Button("Export parts", elem_id=f"{prefix}-export")
                w.dl = gr.Button("Download this mix", elem_id=f"{prefix}-download")
            with gr.Column(elem_id=f"{prefix}-downloads", elem_classes=["devec-results"]):
                w.exp_files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id=f"{prefix}-files")
    w.plots = [p_spec, p_dims, p_norm]
    _wire_tab(w)
    return w


def _output_column(prefix: str, backend: str, side: str, title: str, label: str, visible: bool = True):
    """One side's column, its title/scores line and its output (text on the LLM tab, image on FLUX)."""
    with gr.Column(visible=visible, elem_id=f"{prefix}-col-{side}") as col:
        head = gr.Markdown(title, elem_id=f"{prefix}-time-{side}")
        if backend == "llm":
            out = gr.Textbox(label=label, lines=5, elem_id=f"{prefix}-out-{side}", elem_classes=["devec-out"])
        else:
            out = gr.Image(label=label, elem_id=f"{prefix}-out-{side}", height=340, format="png")
    return col, head, out


def _pool_out_list(w):
    return [w.state, w.info, w.preset, w.mode, w.target, w.refs, w.tau, w.report, *w.rows, *w.ons, *w.links, *w.vans, *w.unis,
            w.shared, w.pair_box, w.link, *w.pair_sliders, *w.plots, w.prompt, w.examples, w.seed, w.left, w.density,
            *w.extra.values(), w.exp_files]


def _wire_tab(w):
    prefix, backend = w.prefix, w.backend
    pool_outs = _pool_out_list(w)
    coef_named = {"state": w.state, "ons": w.ons, "links": w.links, "vans": w.vans, "unis": w.unis, "shared": w.shared,
                  "left": w.left, "density": w.density, "link": w.link, "pair_sliders": w.pair_sliders}
    gen_named = {**coef_named, "tau": w.tau, "prompt": w.prompt, "seed": w.seed, **w.extra, "history": w.history_state}
    stale = _js_mark_stale(prefix)
    on_report = [w.report]  # pool events show progress and errors on the report only

    @_ui_errors
    def on_preset(x, progress=None):
        # one event per pick: .change fires only when the value differs; a preset that is already
        # the loaded pool (the settings link just opened it, or the box was cleared) does nothing
        if not x.preset or (x.state is not None and x.state.source == ("preset", x.preset)):
            return {w.state: gr.skip()}
        session, dec = studio.open_preset(x.preset, _progress_cb(progress))
        return pool_updates(w, session, dec, prompt=session.prompts[0] if session.prompts else "")

    fn, ins = wire(on_preset, {"preset": w.preset, "state": w.state}, progress=True)
    w.preset.change(fn, ins, pool_outs, api_name=f"{prefix}_preset", concurrency_limit=2, show_progress_on=on_report)

    @_ui_errors
    def on_custom(x, progress=None):
        files = [getattr(f, "name", f) for f in (x.files or [])]
        hubs = [h for h in (x.hub or "").splitlines() if h.strip()]
        base = (x.base or "").strip() or w.base.value
        session, dec = studio.open_custom(backend, base, files, hubs, x.preset if x.add_to else None, mode=x.mode, tau=x.tau,
                                          progress=_progress_cb(progress))
        out = pool_updates(w, session, dec)
        out[w.preset] = gr.Dropdown(value=None)  # the box says what is loaded: not a preset any more
        left_out = [n.removeprefix("⚠ not loaded: ") for n in session.notes if n.startswith("⚠ not loaded: ")]
        if left_out:  # the good files of the batch are loaded; say which were not
            gr.Warning(clean_message(f"{len(left_out)} file(s) left out (see the pool box): " + "; ".join(left_out))[:400], duration=TOAST_S)
        return out

    fn, ins = wire(on_custom, {"files": w.files, "hub": w.hub, "base": w.base, "add_to": w.add_to, "preset": w.preset,
                               "mode": w.mode, "tau": w.tau}, progress=True)
    w.load.click(fn, ins, pool_outs, api_name=f"{prefix}_custom", concurrency_limit=1, show_progress_on=on_report)

    @_ui_errors
    def on_config(x, progress=None):
        session = _need(x.state)
        refs = x.refs
        same_refs = list(session.effective_references() or [n for n in session.names if n != session.target]) == list(refs or [])
        if x.mode == session.mode and (x.mode != "isolate" or (x.target == session.target and same_refs)):
            return {w.state: gr.skip()}  # nothing changed (e.g. the target box was set by the pool that just loaded)
        if x.mode == "isolate" and x.target != session.target:
            refs = None  # a new target: every other vector is a reference again
        session = studio.with_settings(session, mode=x.mode, target=x.target if x.mode == "isolate" else None, tau=x.tau, references=refs)
        return pool_updates(w, session, studio.decompose_cached(session, _progress_cb(progress)))

    fn, ins = wire(on_config, {"state": w.state, "mode": w.mode, "target": w.target, "refs": w.refs, "tau": w.tau}, progress=True)
    w.mode.input(fn, ins, pool_outs, api_name=f"{prefix}_mode", concurrency_limit=2, show_progress_on=on_report)
    # .select: one event per pick (the dropdown also fires "input" on blur, and "change" when a pool sets it)
    w.target.select(fn, ins, pool_outs, api_name=False, concurrency_limit=2, show_progress_on=on_report)
    w.refs.input(fn, ins, pool_outs, api_name=False, concurrency_limit=2, show_progress_on=on_report)

    @_ui_errors
    def on_tau(x):
        # τ goes back into its slider (clamped values included): the report, plots and the next
        # generation all use the τ the box shows
        session = studio.with_settings(_need(x.state), tau=x.tau)
        dec = studio.decompose_cached(session)
        return {w.state: session, w.tau: session.tau, w.report: studio.describe(dec).markdown, **dict(zip(w.plots, plots.page_figures(dec)))}

    fn, ins = wire(on_tau, {"state": w.state, "tau": w.tau})
    # a typed τ outside the slider arrives unclamped (Gradio 6.31 sends "release" before clamping
    # the box): clamp it here, in the browser, so the τ the box shows is the τ that is applied
    w.tau.release(fn, ins, [w.state, w.tau, w.report, *w.plots], api_name=f"{prefix}_tau", concurrency_limit=4,
                  trigger_mode="always_last", show_progress_on=on_report,
                  js=f"(s, t) => [s, Math.min(Math.max(Number(t), {TAU_MIN}), 1.0)]")

    @_ui_errors
    def on_defaults(x):
        session = _need(x.state)
        return _slider_updates(w, session, studio.default_coefficients(session))

    fn, ins = wire(on_defaults, {"state": w.state})
    w.defaults.click(fn, ins, [*w.rows, *w.ons, *w.links, *w.vans, *w.unis, w.shared, w.pair_box, w.link, *w.pair_sliders], api_name=False)

    # linked λ: the DeVec slider follows the vanilla one (in the browser, no request)
    for van, uni, lk in zip(w.vans, w.unis, w.links):
        van.change(None, [van, lk, uni], [uni], js="(v, l, u) => l ? v : u", api_name=False, queue=False)
        lk.input(lambda l, v: gr.Slider(value=v, interactive=False, label="DeVec unique λ") if l else gr.Slider(interactive=True),
                 [lk, van], [uni], api_name=False, queue=False)

    @_ui_errors
    @_VISITORS.serving
    def on_generate(x, progress=None):
        session = studio.with_settings(_need(x.state), tau=x.tau)
        x.state = session
        coef = _coefficients(w, x)
        settings = current_settings(w, x)
        stage = _progress_cb(progress) if progress else None
        t0 = time.perf_counter()
        if stage:
            stage(0, 3, "preparing the mixes (decomposition, merge)")
        if backend == "llm":
            job = studio.llm_job(session, coef, x.prompt, int(x.seed or 0), int(x.max_new_tokens))
            t = float(x.temperature or 0.0)
            job.settings.update(do_sample=t > 0, temperature=t if t > 0 else 0.7, top_p=float(x.top_p))
        else:
            why = studio.flux_can_generate(session)
            if why:
                raise StudioError(why)
            job = studio.flux_job(session, coef, x.prompt, int(x.seed or 0), int(x.steps), int(x.width), int(x.height))
        if stage:
            warm = _WARM.get(backend)
            stage(1, 3, "waiting for the model's one-time start-up" if warm and warm.is_alive() else "generating both sides")
        t1 = time.perf_counter()
        r = run_generation(job)
        t2 = time.perf_counter()
        r = studio.score_job(session, r)
        _log_timings(backend, t1 - t0, r, time.perf_counter() - t2, time.perf_counter() - t0)
        if stage:
            stage(3, 3, "done")
        lab = share.label(settings)
        left = left_label(coef.left)
        van, dv = r.vanilla, r.devec
        if backend == "flux":  # images carry their settings (PNG text chunk "devec")
            d = Path(tempfile.mkdtemp(prefix="devec-out-"))
            van = str(share.png_with_settings(van, {**settings, "side": "left"}, d / "vanilla.png"))
            dv = str(share.png_with_settings(dv, {**settings, "side": "devec"}, d / "devec.png"))
        gid = os.urandom(8).hex()  # the third output (the model being edited) finds its history entry by this
        hist = [{"settings": settings, "label": lab, "left": left, "vanilla": van, "devec": dv, "gid": gid,
                 "vanilla_scores": r.vanilla_scores, "devec_scores": r.devec_scores}] + list(x.history or [])
        hist = hist[:HISTORY_MAX]
        if "both_generate" in r.timings:  # one batched pass made both answers
            timing = f"\n\n<small>Made with {lab}. Both answers in one batched pass: {r.timings['both_generate']:.1f} s.</small>"
        else:
            timing = f"\n\n<small>Made with {lab}. Time per side (model switch + generation): {r.vanilla_s:.1f} s / {r.devec_s:.1f} s.</small>"
        ed_title, ed_formula = studio.edited_labels(session)
        return {
            w.edited_req: {"gid": gid, "session": session, "prompt": job.prompt, "settings": dict(job.settings), "share": settings},
            w.t_edited: f"**{ed_title}**\n\n<small>made after the pair…</small>",
            w.out_edited: (gr.Textbox(value="", label=ed_formula) if backend == "llm" else gr.Image(value=None, label=ed_formula)),
            w.out_van: van, w.out_dv: dv,
            w.t_van: f"**{left}**" + studio.scores_markdown(r.vanilla_scores or {}),
            w.t_dv: "**DeVec**" + studio.scores_markdown(r.devec_scores or {}),
            w.gen_note: (r.note or "") + timing,
            w.state: session, w.history_state: hist, w.history: history_markdown(hist),
            **settings_outputs(w, settings),
        }

    fn, ins = wire(on_generate, gen_named, progress=True)
    gen_outs = [w.out_van, w.out_dv, w.t_van, w.t_dv, w.gen_note, w.state, w.history_state, w.history, w.settings_json, w.settings_link,
                w.edited_req, w.t_edited, w.out_edited]
    gen_event = w.gen.click(fn, ins, gen_outs, api_name=f"{prefix}_generate", concurrency_limit=1, concurrency_id="gpu",
                            show_progress_on=[w.out_van, w.out_dv], js=_js_fresh_then(prefix, "results"))

    @_ui_errors
    @_VISITORS.serving
    def on_edited(x, progress=None):
        """The third column: the model being edited (studio.render_edited) with the last pair's
        prompt, seed and sampling, rendered after the pair (and when the box is ticked)."""
        if not x.show or not x.req:
            return {w.edited_col: gr.Column(visible=bool(x.show))}
        req = x.req
        if progress:
            progress(0.5, desc="generating with the model being edited")
        r = studio.render_edited(req["session"], req["prompt"], req["settings"], run=run_generation)
        out = r.output
        if backend == "flux":  # the image carries its settings, like the pair's
            d = Path(tempfile.mkdtemp(prefix="devec-out-"))
            out = str(share.png_with_settings(out, {**req["share"], "side": "edited"}, d / "edited.png"))
        hist = [dict(h, edited=out, edited_title=r.title) if h.get("gid") == req["gid"] else h for h in (x.history or [])]
        return {
            w.edited_col: gr.Column(visible=True),
            w.t_edited: f"**{r.title}**" + studio.scores_markdown(r.scores or {}),
            w.out_edited: gr.Textbox(value=out, label=r.formula) if backend == "llm" else gr.Image(value=out, label=r.formula),
            w.history_state: hist, w.history: history_markdown(hist),
        }

    fn, ins = wire(on_edited, {"req": w.edited_req, "show": w.show_edited, "history": w.history_state}, progress=True)
    ed_outs = [w.edited_col, w.t_edited, w.out_edited, w.history_state, w.history]
    # after a successful pair (its own queue step: the pair's outputs and history are already shown),
    # and when the box is ticked (for the pair on screen) or unticked (hides the column)
    gen_event.success(fn, ins, ed_outs, api_name=False, concurrency_limit=1, concurrency_id="gpu", show_progress_on=[w.out_edited])
    w.show_edited.input(fn, ins, ed_outs, api_name=False, concurrency_limit=1, concurrency_id="gpu", show_progress_on=[w.out_edited])

    @_ui_errors
    def on_export(x):
        session = studio.with_settings(_need(x.state), tau=x.tau)
        return [str(p) for p in studio.export_parts(session)]

    fn, ins = wire(on_export, {"state": w.state, "tau": w.tau})
    w.exp.click(fn, ins, [w.exp_files], api_name=f"{prefix}_export", concurrency_limit=2, js=_js_fresh_then(prefix, "downloads"))

    @_ui_errors
    def on_download(x):
        session = studio.with_settings(_need(x.state), tau=x.tau)
        x.state = session
        return [str(p) for p in studio.download_mix(session, _coefficients(w, x))]

    fn, ins = wire(on_download, {**coef_named, "tau": w.tau})
    w.dl.click(fn, ins, [w.exp_files], api_name=f"{prefix}_download", concurrency_limit=2, js=_js_fresh_then(prefix, "downloads"))

    @_ui_errors
    def on_settings_now(x):
        session = studio.with_settings(_need(x.state), tau=x.tau)
        x.state = session
        return settings_outputs(w, current_settings(w, x))

    fn, ins = wire(on_settings_now, gen_named)
    w.settings_refresh = fn, ins

    @_ui_errors
    def on_apply(x, progress=None):
        s = share.from_json(x.text or "")
        if s.get("tab") != backend:
            raise StudioError(f"these settings are for the {s.get('tab')} tab")
        return _tab_restore(w, s, progress)

    fn, ins = wire(on_apply, {"text": w.settings_json}, progress=True)
    w.apply_settings.click(fn, ins, pool_outs, api_name=f"{prefix}_apply_settings", concurrency_limit=2,
                           show_progress_on=on_report)

    def on_link(link, shared):
        """Linked: every pair slider follows λˢ (and is locked); unlinked: they move on their own."""
        return [gr.Slider(value=shared, interactive=False) if link else gr.Slider(interactive=True) for _ in range(MAX_PAIRS)]

    w.link.input(on_link, [w.link, w.shared], w.pair_sliders, api_name=False)
    w.shared.release(on_link, [w.link, w.shared], w.pair_sliders, api_name=False)
    w.examples.click(lambda s: s[0] if isinstance(s, (list, tuple)) else s, [w.examples], [w.prompt], api_name=False, queue=False)

    # stale marking, in the browser (no request): any edit a user makes to what the outputs were
    # made with marks the outputs and downloads out of date; a new generation / export clears it
    edits = [w.tau, w.mode, w.refs, *w.ons, *w.links, *w.vans, *w.unis, w.shared, w.link, *w.pair_sliders, w.density, w.prompt,
             w.seed, *w.extra.values()]
    for comp in edits:
        comp.input(None, js=stale, outputs=[w.stamp], api_name=False, queue=False, trigger_mode="multiple")
        if isinstance(comp, gr.Slider):  # a typed number arrives as "release" (on blur)
            comp.release(None, js=stale, outputs=[w.stamp], api_name=False, queue=False, trigger_mode="multiple")
    for comp in (w.target, w.left):
        comp.select(None, js=stale, outputs=[w.stamp], api_name=False, queue=False, trigger_mode="multiple")
    w.examples.click(None, js=stale, outputs=[w.stamp], api_name=False, queue=False, trigger_mode="multiple")
    # a new pool (preset, upload, applied settings): its description changes. Fresh again: when a
    # generation / export starts (the click's own browser step; Gradio 6.31 ran a chained js-only
    # .success step, or a Markdown .change step, only the first time)
    w.info.change(None, js=stale, outputs=[w.stamp], api_name=False, queue=False, trigger_mode="multiple")


HISTORY_MAX = 12


def history_markdown(hist: list[dict]) -> str:
    """The history strip: newest first, both sides, what made them, a link that restores them."""
    rows = []
    for k, h in enumerate(hist):
        s = h["settings"]
        q = share.to_query(s) if s.get("preset") else ""
        link = f" · [restore](?{q})" if q else ""
        head = f"**#{len(hist) - k}** · {h['label']}{link}"
        if isinstance(h["vanilla"], str) and not h["vanilla"].endswith(".png"):
            cut = lambda t: (t[:160] + "…") if len(t) > 160 else t  # noqa: E731
            before = f"  \n*{h['edited_title']}:* {cut(h['edited'])}" if h.get("edited") else ""
            rows.append(f"{head}{before}  \n*{h['left']}:* {cut(h['vanilla'])}  \n*DeVec:* {cut(h['devec'])}")
        else:  # thumbnails inline: Gradio serves the outputs from its own cache, not from where they were written
            sides = ([(h["edited"], h["edited_title"])] if h.get("edited") else []) + [(h["vanilla"], h["left"]), (h["devec"], "DeVec")]
            ims = "".join(f"<img src='{_thumbnail(p)}' style='height:64px;width:auto;margin:0' alt='{html.escape(t, quote=True)}' "
                          f"title='{html.escape(t, quote=True)}'>" for p, t in sides)
            rows.append(f"{head}\n<div style='display:flex;gap:6px;flex-wrap:wrap'>{ims}</div>")
    return "\n\n".join(rows) if rows else ""


@functools.lru_cache(maxsize=3 * HISTORY_MAX)
def _thumbnail(path: str, height: int = 64) -> str:
    """A history image as a small inline PNG (data URI); empty when the file is gone."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((8 * height, height))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except OSError:
        return ""
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _opening(backend: str):
    """The default preset's session and decomposition, made once at server start (cached)."""
    pid = studio.default_preset(backend)
    if not pid:
        return None
    try:
        return studio.open_preset(pid)
    except StudioError as e:
        log.warning("default %s preset %s did not open: %s", backend, pid, e)
        return None


def build_demo() -> gr.Blocks:
    """The whole app (no launch): importable by tests and by Spaces."""
    openings = {b: _opening(b) for b in ("llm", "flux")}
    _OPENINGS.update(openings)  # the warm-up's first pair starts from these
    _OPENED.set()
    tabs = {}
    with gr.Blocks(title="DeVec Studio") as demo:
        gr.Markdown(INTRO)
        with gr.Accordion("How to read this page", open=False):
            gr.Markdown(HOW)
        with gr.Tabs() as tabs_box:
            with gr.Tab("Behaviour editing (LLM)", id="llm"):
                tabs["llm"] = build_tab("llm", "llm", openings["llm"])
            with gr.Tab("Style mixing (FLUX)", id="flux"):
                tabs["flux"] = build_tab("flux", "flux", openings["flux"])

        # a settings link (?tab=…&preset=…) opens the page with those settings; a plain visit
        # changes nothing (the tabs already show their default presets)
        @_ui_errors
        def on_visit(progress=gr.Progress(), request: gr.Request = None):
            params = dict(request.query_params) if request is not None else {}
            s = share.from_query(params)
            if not s:
                return {tabs_box: gr.skip()}
            w = tabs[s["tab"]]
            return {tabs_box: gr.Tabs(selected=s["tab"]), **_tab_restore(w, s, progress)}

        all_outs = [tabs_box] + [c for w in tabs.values() for c in _pool_out_list(w)]
        demo.load(on_visit, None, all_outs, api_name=False, show_progress_on=[tabs["llm"].report, tabs["flux"].report])
    demo.queue(default_concurrency_limit=2, max_size=32)
    demo.devec_tabs = tabs
    return demo


LAUNCH_KWARGS = dict(theme=gr.themes.Soft(primary_hue="orange", secondary_hue="blue"), css=CSS, max_file_size="1gb")

# Base models are built here, at import, on a Space with a GPU (ZeroGPU packs what is moved to
# "cuda" now and streams it into each GPU worker); elsewhere they load on first use.
PRELOADED = hosting.preload()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.environ.get("DEVEC_WARMUP", "1") != "0":
        # the one-time work (SmolLM2's GGUF conversion + load, the tiny FLUX model) starts now, in
        # the background, while the default presets are decomposed and the page is built
        start_warmup()

demo = build_demo()

if __name__ == "__main__":
    demo.launch(**LAUNCH_KWARGS)
