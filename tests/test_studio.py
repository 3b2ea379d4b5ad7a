"""The Studio's logic without a UI: pools, τ re-threshold, messages, mixes, generation, export,
and every bad input the UI can send (each must be a StudioError with what to do, never a crash).

Tiny models only (tests/tiny_models.py); the real SmolLM2 runs in test_app_api.py.
"""

import os
import pickle
import threading
import zipfile

import pytest
import torch

from devec_core import plots, studio
from devec_core.backends.flux import FluxBackend
from devec_core.studio import Coefficients, StudioError
from devec_core.taskvec import LowRank, TaskVector
from tests.tiny_models import llama_vectors, lora_to_taskvector, tiny_flux_pipeline


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_flux_pool():
    return studio.synthetic_flux_pool(hidden=32, blocks=(2, 3))


def _llm_pool(model, planted: bool):
    """Two or three rank-4 LoRAs on the tiny Llama; `planted` gives them 2 common output directions."""
    vecs = llama_vectors(model, scale=0.5)
    if planted:
        g = torch.Generator().manual_seed(7)
        for mod in vecs[0].modules:
            n = vecs[0].modules[mod].shape[0]
            Z = torch.randn(n, 2, generator=g)
            for v in vecs:
                d = v.modules[mod]
                v.modules[mod] = LowRank(torch.cat([Z, d.B[:, 2:]], 1), d.A, d.scale)
    return vecs


# --- pools, τ and messages -------------------------------------------------------------------


def test_synthetic_flux_pool_is_deterministic_and_labelled(small_flux_pool):
    again = studio.synthetic_flux_pool(hidden=32, blocks=(2, 3))
    assert [v.name for v in small_flux_pool] == list(studio.SYNTH_STYLES)
    assert all(v.meta["synthetic"] for v in small_flux_pool)
    m = "transformer_blocks.0.attn.to_q"
    assert torch.equal(small_flux_pool[0].modules[m].B, again[0].modules[m].B)
    assert set(small_flux_pool[0].modules) == set(studio.flux_module_shapes(32, 2, 3))


def test_tau_rethreshold_reuses_the_spectrum_and_changes_what_is_shared(small_flux_pool):
    s, dec = studio.open_vectors(small_flux_pool, "flux", "synthetic", synthetic=True)
    assert dec.config.mode == "joint" and s.names == list(studio.SYNTH_STYLES)
    low = studio.decompose_cached(studio.with_settings(s, tau=0.3))
    high = studio.decompose_cached(studio.with_settings(s, tau=0.999))
    assert low.blocks is dec.blocks is high.blocks  # same τ-independent work: no new SVD
    assert studio.describe(low).shared_dim > studio.describe(dec).shared_dim >= studio.describe(high).shared_dim
    assert studio.describe(dec).shared_dim > 0 and not studio.describe(dec).nothing_shared


def test_nothing_shared_is_said_plainly_and_outputs_match(tiny_llm, llm_backend):
    vecs = _llm_pool(tiny_llm[0], planted=False)  # independent random LoRAs: nothing above 0.85
    s, dec = studio.open_vectors(vecs, "llm", "tiny")
    rep = studio.describe(dec)
    assert rep.nothing_shared and rep.shared_dim == 0
    assert "DeVec equals vanilla" in rep.markdown and f"{rep.max_eig:.2f}" in rep.markdown
    r = studio.generate_llm(s, studio.default_coefficients(s), "hello", seed=0, max_new_tokens=6)
    assert r.vanilla == r.devec and "DeVec equals vanilla" in r.note
    assert 0.0 <= r.vanilla_scores["toxicity"] <= 1.0 and r.vanilla_scores == r.devec_scores  # LLM outputs are scored


def test_scores_of_outputs():
    calm, rude = studio.score_texts(["The capital of France is Paris.", "SHUT UP YOU STUPID FUCKING IDIOT"], ("toxicity", "offensive", "capitals"))
    assert calm["toxicity"] < 0.5 < rude["toxicity"]
    assert calm["offensive"] == 0 and rude["offensive"] == 3
    assert studio.offensive_words("LISTEN, YOU FUCKFACE, parse the scrap heap, ARSEHOLE") == ["FUCKFACE", "ARSEHOLE"]
    assert rude["capitals"] == 1.0 and 0.0 < calm["capitals"] < 0.2
    assert "flagged" in studio.scores_markdown(rude) and "flagged" not in studio.scores_markdown(calm)
    assert "capitals 100%" in studio.scores_markdown(rude) and studio.scores_markdown({}) == ""
    assert studio.score_texts(["x"], ()) == [{}]
    titled, plain = studio.score_texts(["**Penguins**\nPenguins are birds.", "Penguins are **birds**."], ("title",))
    assert titled == {"title": 1.0} and plain == {"title": 0.0}
    assert "title line ✓" in studio.scores_markdown(titled) and "no title line" in studio.scores_markdown(plain)


def test_preset_opening_coefficients_hold_while_mode_and_target_do(small_flux_pool):
    start = {"mode": "isolate", "target": "anime", "vanilla": {"anime": 0.0}, "unique": {"anime": 0.25}, "shared": 1.0}
    s, _ = studio.open_vectors(small_flux_pool, "flux", "synthetic", mode="isolate", target="anime", start=start)
    c = studio.default_coefficients(s)
    assert c.unique["anime"] == 0.25 and c.shared == 1.0 and c.vanilla["ghibli"] == 0.0
    other = studio.default_coefficients(studio.with_settings(s, target="ghibli"))  # another target: the mode's defaults
    assert other.vanilla["ghibli"] < 0 and other.shared == 0.0


def test_planted_pool_devec_differs_from_vanilla(tiny_llm, llm_backend):
    """With planted shared directions, the DeVec mix (λ on unique parts only) and vanilla task
    arithmetic (λ on whole vectors) fuse different weights: vanilla − DeVec = λ Σ_i S_i."""
    vecs = _llm_pool(tiny_llm[0], planted=True)
    s, dec = studio.open_vectors(vecs, "llm", "tiny")
    rep = studio.describe(dec)
    assert not rep.nothing_shared and rep.shared_modules == rep.modules
    c = Coefficients({n: 3.0 for n in s.names}, {n: 3.0 for n in s.names}, 0.0)
    van, dv = studio.build_mixes(dec, c)
    assert len(van.terms) == 3 and len(dv.terms) == 3
    assert studio.build_mixes(dec, Coefficients(c.vanilla, c.unique, 1.0))[1].terms[-1][0].kind == "merged_shared"
    model = llm_backend.model
    fused = {}
    for label, mix in (("vanilla", van), ("devec", dv)):
        llm_backend.apply(mix)
        fused[label] = {m: model.get_submodule(m).weight.detach().clone() for m in dec.component("delta", s.names[0])}
    llm_backend.restore()
    for mod in fused["vanilla"]:
        diff = fused["vanilla"][mod] - fused["devec"][mod]
        want = 3.0 * sum(dec.component("shared", n)[mod].dense() for n in s.names)  # ΔW_i − U_i = S_i
        torch.testing.assert_close(diff, want, rtol=0, atol=1e-4)
        assert diff.abs().max() > 0.1  # the two outputs' weights really differ
    again = studio.generate_llm(s, c, "hello there", max_new_tokens=8)
    assert again.vanilla != again.devec  # and so do the answers


def test_modes_and_targets(small_flux_pool):
    s, _ = studio.open_vectors(small_flux_pool, "flux", "synthetic", synthetic=True)
    iso = studio.with_settings(s, mode="isolate", target="pixel-art")
    dec = studio.decompose_cached(iso)
    assert dec.config.mode == "isolate" and dec.config.target == "pixel-art"
    c = studio.default_coefficients(iso)
    assert c.vanilla["pixel-art"] < 0 and c.vanilla["anime"] == 0.0  # negate the target only
    pw = studio.decompose_cached(studio.with_settings(s, mode="pairwise"))
    assert "pair" in studio.describe(pw).markdown
    with pytest.raises(StudioError, match="unknown mode"):
        studio.with_settings(s, mode="sideways")
    with pytest.raises(StudioError, match="not in the pool"):
        studio.with_settings(s, target="nobody")


# --- bad inputs: every one is a StudioError that says what to do ----------------------------


@pytest.mark.parametrize("tau", [0, 0.0, -0.1, 1.5, float("nan"), "abc", None])
def test_bad_tau(tau, small_flux_pool):
    s, _ = studio.open_vectors(small_flux_pool, "flux", "synthetic")
    with pytest.raises(StudioError, match="τ"):
        studio.with_settings(s, tau=tau) if tau is not None else studio.check_tau(tau)


def test_empty_pool_and_too_many():
    with pytest.raises(StudioError, match="empty"):
        studio.open_custom("llm", "smollm2", [], [])
    with pytest.raises(StudioError, match="empty"):
        studio.open_vectors([], "llm", "tiny")
    many = [TaskVector(f"v{i}", {"m": LowRank(torch.randn(4, 1), torch.randn(1, 4))}) for i in range(studio.MAX_VECTORS + 1)]
    with pytest.raises(StudioError, match="at most"):
        studio.open_vectors(many, "llm", "tiny")


def test_bad_uploads(tmp_path):
    pkl = tmp_path / "adapter.bin"
    pkl.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(StudioError, match="only .safetensors"):
        studio.custom_vectors([str(pkl)], [])
    with pytest.raises(StudioError, match="only .safetensors"):
        studio.check_upload(tmp_path / "notes.txt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(StudioError, match="junk.safetensors"):
        studio.custom_vectors([str(junk)], [])
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * 2**20 * 2)
    with pytest.raises(StudioError, match="over the upload limit"):
        studio.check_upload(big, max_mb=1)
    with pytest.raises(StudioError, match="did not arrive"):
        studio.check_upload(tmp_path / "gone.safetensors")


def test_a_bug_while_reading_an_upload_is_not_called_a_bad_file(tmp_path, monkeypatch):
    """Only what a bad file can raise becomes "could not read ...", with its cause chained; a bug
    in the reader surfaces as itself."""
    from devec_core import formats

    f = tmp_path / "a.safetensors"
    f.write_bytes(b"\0" * 64)
    monkeypatch.setattr(formats, "load_task_vector", lambda *a, **k: (_ for _ in ()).throw(formats.FormatError("no LoRA keys")))
    with pytest.raises(StudioError, match="could not read upload 'a.safetensors': no LoRA keys") as err:
        studio.custom_vectors([str(f)], [])
    assert isinstance(err.value.__cause__, formats.FormatError)
    monkeypatch.setattr(formats, "load_task_vector", lambda *a, **k: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        studio.custom_vectors([str(f)], [])


def test_mixed_bases_and_wrong_tab(tiny_llm, small_flux_pool):
    llm = _llm_pool(tiny_llm[0], planted=False)[:1]
    with pytest.raises(StudioError):  # one pool, two base models (different module sets and shapes)
        studio.open_vectors(llm + small_flux_pool[:1], "llm", "tiny")
    with pytest.raises(StudioError, match="FLUX"):
        studio.open_vectors(small_flux_pool[:2], "llm", "tiny")


def test_wrong_base_model_at_generation(llm_backend):
    # a pool whose module has another shape than the tiny Llama's: the UI gets a message, weights untouched
    mod = "model.layers.0.self_attn.q_proj"
    v = [TaskVector(f"w{i}", {mod: LowRank(torch.randn(64, 2), torch.randn(2, 64))}, meta={"family": "llm"}) for i in range(2)]
    s, _ = studio.open_vectors(v, "llm", "tiny")
    before = llm_backend.model.get_submodule(mod).weight.clone()
    with pytest.raises(StudioError, match="another base model"):
        studio.generate_llm(s, studio.default_coefficients(s), "hi", max_new_tokens=2)
    assert torch.equal(before, llm_backend.model.get_submodule(mod).weight)
    v2 = [TaskVector("x", {"model.nowhere.proj": LowRank(torch.randn(8, 1), torch.randn(1, 8))}, meta={"family": "llm"})]
    s2, _ = studio.open_vectors(v2, "llm", "tiny")
    with pytest.raises(StudioError, match="another base model"):
        studio.generate_llm(s2, studio.default_coefficients(s2), "hi", max_new_tokens=2)


def test_missing_gpu_and_synthetic_flux_say_what_is_needed(small_flux_pool, monkeypatch):
    monkeypatch.delenv("DEVEC_FLUX_ON_CPU", raising=False)
    s, _ = studio.open_vectors(small_flux_pool, "flux", "synthetic", synthetic=True)
    c = studio.default_coefficients(s)
    with pytest.raises(StudioError, match="SYNTHETIC.*FLUX.1-schnell"):
        studio.generate_flux(s, c, "a fox")
    real = studio.with_settings(s)
    real.synthetic, real.base = False, "black-forest-labs/FLUX.1-schnell"
    if not torch.cuda.is_available():
        with pytest.raises(StudioError, match="No CUDA GPU.*FLUX.1-schnell"):
            studio.generate_flux(real, c, "a fox")


def test_bad_prompts_and_coefficients(tiny_llm, llm_backend):
    s, _ = studio.open_vectors(_llm_pool(tiny_llm[0], planted=False), "llm", "tiny")
    with pytest.raises(StudioError, match="prompt"):
        studio.generate_llm(s, studio.default_coefficients(s), "   ")
    with pytest.raises(StudioError, match="finite"):
        Coefficients.from_lists(s.names, [1, float("inf"), 1], [1, 1, 1], 0)
    with pytest.raises(StudioError, match="values"):
        Coefficients.from_lists(s.names, [1], [1], 0)
    with pytest.raises(StudioError, match="no longer in memory"):
        studio.decompose_cached(studio.Session("llm", "not-a-key", ["a"], "tiny"))


def test_preset_errors_are_messages():
    with pytest.raises(StudioError, match="Unknown preset"):
        studio.open_preset("does-not-exist")
    with pytest.raises(StudioError, match="your own target adapter"):
        studio.open_preset("llama2-toxicity")  # a pool of references waiting for the user's vector


# --- generation: side by side, per-user isolation -------------------------------------------


def test_generation_is_isolated_between_users(tiny_llm, llm_backend):
    vecs = _llm_pool(tiny_llm[0], planted=True)
    s, _ = studio.open_vectors(vecs, "llm", "tiny")
    c1 = Coefficients({n: 4.0 for n in s.names}, {n: 4.0 for n in s.names}, 0.0)
    c2 = Coefficients({n: 0.0 for n in s.names}, {n: 0.0 for n in s.names}, 0.0)
    solo1 = studio.generate_llm(s, c1, "hello there", max_new_tokens=8)
    solo2 = studio.generate_llm(s, c2, "hello there", max_new_tokens=8)
    assert solo1.vanilla != solo2.vanilla  # the sliders matter
    out = {}

    def run(k, c):
        out[k] = [studio.generate_llm(s, c, "hello there", max_new_tokens=8) for _ in range(2)]

    ts = [threading.Thread(target=run, args=(k, c)) for k, c in (("a", c1), ("b", c2))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert all(r.vanilla == solo1.vanilla and r.devec == solo1.devec for r in out["a"])
    assert all(r.vanilla == solo2.vanilla and r.devec == solo2.devec for r in out["b"])


def test_flux_side_by_side_on_the_tiny_pipeline(monkeypatch, tiny_flux_loras):
    """The FLUX path end to end on the tiny pipeline (allowed on CPU only through the env switch)."""
    monkeypatch.setenv("DEVEC_FLUX_ON_CPU", "1")
    pipe = tiny_flux_pipeline(seed=0)
    monkeypatch.setitem(studio._BACKENDS, ("flux", "tiny-flux"), FluxBackend(pipe))
    vecs = [lora_to_taskvector(sd, f"s{i}", "transformer.") for i, sd in enumerate(tiny_flux_loras)]
    for v in vecs:
        v.meta["family"] = "flux"
    s, _ = studio.open_vectors(vecs, "flux", "tiny-flux")
    r = studio.generate_flux(s, studio.default_coefficients(s), "a fox", seed=1, steps=2, width=100, height=40)
    assert r.vanilla.size == r.devec.size == (96, 64)  # (width, height): multiples of 16, at least 64
    assert r.vanilla_s > 0 and r.devec_s > 0
    # model-free measures under each real-FLUX image (issue 12, point 5)
    from devec_core import style_metrics as M

    for im, sc in ((r.vanilla, r.vanilla_scores), (r.devec, r.devec_scores)):
        assert set(sc) == {"saturation", "edges", "clipped"}
        assert sc["saturation"] == M.saturation(im) and sc["clipped"] == M.clipping(im)
    assert "saturation" in studio.scores_markdown(r.vanilla_scores)


# --- export, plots, pickling across @spaces.GPU ------------------------------------------------


def test_export_writes_loadable_parts(small_flux_pool, tmp_path):
    from devec_core.formats import load_task_vector

    s, dec = studio.open_vectors(small_flux_pool, "flux", "synthetic", synthetic=True)
    files = studio.export_parts(s, tmp_path)
    assert files[0].suffix == ".zip" and zipfile.ZipFile(files[0]).namelist()
    names = {f.name for f in files[1:]}
    assert {"unique-flat-anime.safetensors", "shared.safetensors"} <= names
    back = load_task_vector(tmp_path / dec_dir(files) / "unique-ghibli.safetensors", "g")
    want = dec.component("unique", "ghibli")
    mod = "transformer_blocks.1.attn.to_k"
    assert torch.allclose(back.modules[mod].dense(), want[mod].dense(), atol=1e-5)


def dec_dir(files):
    return files[1].parent.name


def test_plots_follow_tau(small_flux_pool):
    s, dec = studio.open_vectors(small_flux_pool, "flux", "synthetic")
    for t in (0.5, 0.9):
        spec, dims, norms = plots.all_figures(studio.at_tau(dec, t))
        ax = spec.axes[0]
        assert any(abs(line.get_xdata()[0] - t) < 1e-9 for line in ax.lines)  # the τ line
        assert f"{t:.2f}" in dims.axes[0].get_title() and f"{t:.2f}" in norms.axes[0].get_title()


def test_session_and_coefficients_pickle(small_flux_pool):
    s, _ = studio.open_vectors(small_flux_pool, "flux", "synthetic")
    c = studio.default_coefficients(s)
    s2, c2 = pickle.loads(pickle.dumps((s, c)))  # plain values cross @spaces.GPU
    assert s2 == s and c2 == c


def test_a_pool_no_longer_in_memory_is_loaded_again_from_its_source(tiny_llm, tmp_path, monkeypatch):
    """A ZeroGPU worker (or a server whose LRU dropped the pool) gets only the Session: the pool
    is loaded again from its source, with the same content hash."""
    from safetensors.torch import save_file

    from tests.tiny_models import random_llama_lora

    import shutil

    from peft import LoraConfig

    files = []
    for seed in (1, 2):  # zipped PEFT folders: a zip is unpacked again when the pool is reloaded
        d = tmp_path / f"lora{seed}"
        d.mkdir()
        save_file({k: v.contiguous() for k, v in random_llama_lora(tiny_llm[0], rank=2, seed=seed).items()}, str(d / "adapter_model.safetensors"))
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]).save_pretrained(str(d))
        files.append(shutil.make_archive(str(d), "zip", root_dir=d))
    s, dec = studio.open_custom("llm", "tiny", files, [])
    assert s.source == ("custom", tuple(files), (), None)
    p, _ = studio.open_preset("flux-synthetic-offline")
    for sess in (s, p):  # dropped from the shared caches (given back after the test)
        with studio._LOCK:
            monkeypatch.delitem(studio._POOLS, sess.pool_key)
            for k in [k for k in studio._DECOMPS if k[0] == sess.pool_key]:
                monkeypatch.delitem(studio._DECOMPS, k)
        again = studio.decompose_cached(studio.with_settings(sess, tau=0.5))
        assert again.names == sess.names and again.tau == 0.5
    assert studio.describe(studio.decompose_cached(s)).shared_dim == studio.describe(dec).shared_dim
    gone = studio.with_settings(s)
    gone.source = ("custom", (str(tmp_path / "missing.safetensors"),), (), None)
    with studio._LOCK:
        monkeypatch.delitem(studio._POOLS, s.pool_key)
        for k in list(studio._DECOMPS):
            monkeypatch.delitem(studio._DECOMPS, k)
    with pytest.raises(StudioError, match="did not arrive"):
        studio.decompose_cached(gone)
