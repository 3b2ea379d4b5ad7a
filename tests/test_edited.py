"""The model being edited as a third output (issue 15, point 5): in isolate mode the target
vector at its strength, W0 + s·ΔW_target (the toxic fine-tune before repair); in joint mode the
base model. Same prompt, seed and sampling as the pair; the shared model's weights go back.

References are written from the definition: a private copy of the tiny model whose weights are
W0 + ΔW_target (ΔW = the LoRA's dense product, added by hand), or the untouched base, generating
with the same settings — not the Studio's mixes or weight editor.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from devec_core import studio
from devec_core.backends.llm import LLMBackend
from devec_core.studio import Coefficients, StudioError, generation
from tests.tiny_models import llama_vectors

PROMPT = "hello there"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(generation, "_EDITED", type(generation._EDITED)())  # an empty cache per test


@pytest.fixture(scope="module")
def pristine(tiny_llm):
    """A private copy of the tiny model's base weights, taken before this module edits anything."""
    return copy.deepcopy(tiny_llm[0]), tiny_llm[1]


@pytest.fixture(scope="module")
def llm_backend(pristine, llm_backend):
    """conftest's backend (base "tiny"), taken only after the pristine copy of the weights."""
    return llm_backend


@pytest.fixture(scope="module")
def vectors(tiny_llm):
    return llama_vectors(tiny_llm[0], scale=0.8)


def _by_definition(pristine, vector, settings: dict) -> str:
    """A private copy of the base model with W0 + ΔW_target written in by hand (None: the base)."""
    model, tok = pristine
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod, d in (vector.modules.items() if vector is not None else []):
            w = ref.get_submodule(mod).weight
            w += d.dense(torch.float32).to(w.dtype)
    return LLMBackend(ref, tok).generate(PROMPT, **settings).text.strip()


GREEDY = {"max_new_tokens": 8, "seed": 0}
SAMPLED = {"max_new_tokens": 8, "seed": 3, "do_sample": True, "temperature": 1.0, "top_p": 0.95}


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_isolate_shows_the_target_fine_tune_before_the_edit(pristine, llm_backend, vectors, settings):
    s, _ = studio.open_vectors(vectors, "llm", "tiny", mode="isolate", target="v2")
    r = studio.render_edited(s, PROMPT, settings)
    want = _by_definition(pristine, vectors[1], settings)
    assert r.output == want
    assert r.output != _by_definition(pristine, None, settings)  # not the base model
    assert "Before the edit" in r.title and "v2" in r.title and r.formula == "W₀ + 1·ΔW(v2)"
    assert 0.0 <= r.scores["toxicity"] <= 1.0  # scored like the pair's outputs


def test_joint_mode_shows_the_base_model(pristine, llm_backend, vectors):
    s, _ = studio.open_vectors(vectors, "llm", "tiny", mode="joint")
    r = studio.render_edited(s, PROMPT, SAMPLED)
    assert r.output == _by_definition(pristine, None, SAMPLED)
    assert r.title.startswith("Base model") and r.formula == "W₀"


def test_the_third_output_differs_from_the_repaired_pair_and_matches_the_vanilla_side_at_full_strength(llm_backend, vectors):
    """At the preset's kind of opening (the target removed: vanilla λ = 0), the model being edited
    differs from both sides; with the target at λ = 1 on the vanilla side, vanilla *is* that model."""
    s, _ = studio.open_vectors(vectors, "llm", "tiny", mode="isolate", target="v1")
    removed = Coefficients({n: 0.0 for n in s.names}, {n: 0.0 for n in s.names}, 0.0)
    job = studio.llm_job(s, removed, PROMPT, seed=0, max_new_tokens=8)
    pair = studio.run_job(job)
    edited = studio.render_edited(s, job.prompt, job.settings)
    assert edited.output not in (pair.vanilla, pair.devec)
    full = Coefficients({n: float(n == "v1") for n in s.names}, {n: 0.0 for n in s.names}, 0.0)
    job = studio.llm_job(s, full, PROMPT, seed=0, max_new_tokens=8)
    assert studio.run_job(job).vanilla == studio.render_edited(s, job.prompt, job.settings).output


def test_the_shared_model_is_left_as_it_was_and_users_do_not_mix(tiny_llm, pristine, llm_backend, vectors, monkeypatch):
    monkeypatch.setattr(generation, "EDITED_CACHE_MAX", 0)  # no cache: every call really edits the weights
    model = tiny_llm[0]
    before = pristine[0].state_dict()
    s_iso, _ = studio.open_vectors(vectors, "llm", "tiny", mode="isolate", target="v3")
    s_joint, _ = studio.open_vectors(vectors, "llm", "tiny", mode="joint")
    c = Coefficients({n: 2.0 for n in s_joint.names}, {n: 2.0 for n in s_joint.names}, 0.0)
    solo_edited = studio.render_edited(s_iso, PROMPT, GREEDY).output
    solo_pair = studio.generate_llm(s_joint, c, PROMPT, max_new_tokens=8)
    out = {"a": [], "b": []}

    def edited_user():
        out["a"] += [studio.render_edited(s_iso, PROMPT, GREEDY).output for _ in range(3)]

    def pair_user():
        out["b"] += [studio.generate_llm(s_joint, c, PROMPT, max_new_tokens=8) for _ in range(3)]

    ts = [threading.Thread(target=edited_user), threading.Thread(target=pair_user)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert out["a"] == [solo_edited] * 3
    assert all(r.vanilla == solo_pair.vanilla and r.devec == solo_pair.devec for r in out["b"])
    llm_backend.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # restore gives back the base bit for bit


def test_outputs_are_kept_by_what_makes_them(llm_backend, vectors):
    """The model being edited ignores the sliders and τ: the same prompt and settings are rendered
    once; another seed, prompt or target is rendered again."""
    calls = []

    def run(job):
        calls.append(job)
        return studio.run_job(job)

    s, _ = studio.open_vectors(vectors, "llm", "tiny", mode="isolate", target="v1")
    first = studio.render_edited(s, PROMPT, SAMPLED, run=run)
    again = studio.render_edited(studio.with_settings(s, tau=0.5), PROMPT, SAMPLED, run=run)
    assert len(calls) == 1 and again.output == first.output and again.scores == first.scores
    again.scores["toxicity"] = -1.0  # a caller's copy: the cached scores stay
    assert studio.render_edited(s, PROMPT, SAMPLED, run=run).scores == first.scores
    studio.render_edited(s, PROMPT, {**SAMPLED, "seed": 4}, run=run)
    studio.render_edited(s, "another prompt", SAMPLED, run=run)
    studio.render_edited(studio.with_settings(s, target="v2"), PROMPT, SAMPLED, run=run)
    assert len(calls) == 4
    assert all(j.part == "edited" and len(j.mixes) == 1 for j in calls)


def test_bad_requests_are_messages(llm_backend, vectors):
    s, _ = studio.open_vectors(vectors, "llm", "tiny", mode="isolate", target="v1")
    with pytest.raises(StudioError, match="prompt"):
        studio.render_edited(s, "   ", GREEDY)
    job = studio.llm_job(s, studio.default_coefficients(s), PROMPT, max_new_tokens=4)
    with pytest.raises(ValueError, match="one mix; got 2"):
        studio.run_edited(job)


@pytest.mark.skipif(studio.toy.toy_missing() is not None, reason="the tiny style model is not built")
def test_style_tab_base_strip_has_the_pairs_size_and_is_not_a_side():
    """FLUX tab (off by default there): the base model's strip, same prompt and seeds as the pair."""
    s, _ = studio.open_preset("style-flux-offline")
    job = studio.flux_job(s, studio.default_coefficients(s), s.prompts[0], seed=2)
    pair = studio.run_job(job)
    base = studio.render_edited(s, job.prompt, job.settings)
    assert base.output.size == pair.vanilla.size
    assert list(base.output.getdata()) != list(pair.vanilla.getdata())
    assert base.title.startswith("Base model") and "content" in base.scores


@pytest.mark.parametrize("mode", ["isolate", "joint"])
def test_the_edited_job_crosses_into_a_gpu_worker(llm_backend, vectors, mode):
    """On ZeroGPU the job is pickled with its mix packed into CPU tensors (app.run_generation):
    the packed job renders the same text (the base's empty mix included)."""
    import dataclasses
    import pickle

    from devec_core import hosting

    s, _ = studio.open_vectors(vectors, "llm", "tiny", mode=mode, target="v1" if mode == "isolate" else None)
    job = studio.edited_job(s, PROMPT, GREEDY)
    packed = pickle.loads(pickle.dumps(dataclasses.replace(job, mixes=hosting.pack_mixes(job.mixes))))
    assert packed.part == "edited"
    assert studio.run_job(packed).output == studio.run_job(job).output
