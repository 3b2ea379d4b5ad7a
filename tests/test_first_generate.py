"""The first "Generate both": the converted SmolLM2 cache (reused, checked, rebuilt when damaged),
a model load that does not stop the rest of the Studio, and the server's warm-up, which must pay
the one-time costs without changing any output.

The real SmolLM2 conversion runs in the one slow test here; the rest use a stand-in converter or
the tiny Llama (tests/tiny_models.py). ``bench/bench_first_generate.py`` measures the timings.
"""

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from devec_core import models, studio
from devec_core.backends.llm import LLMBackend
from devec_core.studio import generation
from tests.tiny_models import lora_to_taskvector, random_llama_lora

# --- the converted-weights cache ---------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf file and a stand-in for transformers' conversion that writes a small folder the way
    ``_convert_gguf`` does (files, then the manifest, then one rename) and counts its calls."""
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def convert(folder, gguf_file, out, fast=True):
        calls.append(out)
        tmp = out.parent / (out.name + ".tmp-x")
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text('{"model_type": "llama"}')
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        models._write_manifest(tmp, Path(folder, gguf_file))
        tmp.rename(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return gguf, calls


def test_converted_folder_is_made_once_then_reused(fake_gguf):
    gguf, calls = fake_gguf
    out = models.converted_folder(str(gguf))
    assert len(calls) == 1 and out.is_dir() and models.converted_problem(out) is None
    assert models.converted_folder(str(gguf)) == out and len(calls) == 1  # reused, not converted again
    meta = json.loads((out / models.CONVERTED_MANIFEST).read_text())
    assert meta["files"]["model.safetensors"]["size"] == 256 * 64


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda d: _flip_byte(d / "model.safetensors", 1000), "does not match its sha256"),  # same size, one bit
        (lambda d: (d / "model.safetensors").write_bytes(b"short"), "has 5 bytes"),  # truncated
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / models.CONVERTED_MANIFEST).unlink(), "interrupted or older conversion"),
        (lambda d: (d / models.CONVERTED_MANIFEST).write_text("{not json"), "unreadable"),
        (lambda d: (d / models.CONVERTED_MANIFEST).write_text('{"files": {"config.json": {}}}'), "lists no"),
    ],
)
def test_a_damaged_converted_folder_is_rebuilt_never_trusted(fake_gguf, caplog, damage, why):
    gguf, calls = fake_gguf
    out = models.converted_folder(str(gguf))
    good = (out / "model.safetensors").read_bytes()
    damage(out)
    models._CHECKED.clear()  # a later start: digests are remembered per process only
    assert why in models.converted_problem(out)
    with caplog.at_level(logging.WARNING, logger="devec.models"):
        again = models.converted_folder(str(gguf))
    assert again == out and len(calls) == 2  # converted again
    assert models.converted_problem(out) is None and (out / "model.safetensors").read_bytes() == good
    assert why in caplog.text and "not trusted" in caplog.text


def test_digests_are_checked_once_per_process_until_a_file_changes(fake_gguf, monkeypatch):
    gguf, calls = fake_gguf
    out = models.converted_folder(str(gguf))
    hashed = []
    real = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda p: hashed.append(p.name) or real(p))
    assert models.converted_problem(out) is None and hashed == []  # checked when it was made
    bad = out / "model.safetensors.new"
    bad.write_bytes(b"x" * (256 * 64))  # same size, other bytes, a new file (inode) in its place
    bad.replace(out / "model.safetensors")
    assert "does not match its sha256" in models.converted_problem(out)
    assert "model.safetensors" in hashed


def _flip_byte(path: Path, i: int) -> None:
    b = bytearray(path.read_bytes())
    b[i] ^= 1
    path.write_bytes(bytes(b))


def test_a_second_caller_waits_for_the_conversion_in_progress(fake_gguf, monkeypatch):
    """A click while the warm-up converts must not start a second conversion of the same GGUF."""
    gguf, calls = fake_gguf
    convert, started, release = models._convert_gguf, threading.Event(), threading.Event()

    def slow(*a, **k):
        started.set()
        assert release.wait(10)
        convert(*a, **k)

    monkeypatch.setattr(models, "_convert_gguf", slow)
    got = []
    first = threading.Thread(target=lambda: got.append(models.converted_folder(str(gguf))))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: got.append(models.converted_folder(str(gguf))))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waiting, not converting
    release.set()
    first.join(10)
    second.join(10)
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1]


def test_the_cache_key_follows_the_converters_version(fake_gguf, monkeypatch):
    """Another transformers (or gguf) may convert differently: its folder is another folder."""
    gguf, _ = fake_gguf
    a = models._gguf_cache_folder(gguf)
    monkeypatch.setattr(models, "_versions", lambda: "transformers=0.0,gguf=0.0")
    assert models._gguf_cache_folder(gguf) != a


def test_nothing_to_convert_for_hub_ids_and_plain_folders(tmp_path):
    assert models.converted_folder("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert models.converted_folder(str(tmp_path)) is None


@pytest.mark.slow
def test_a_child_process_that_fails_to_convert_says_so(tmp_path, monkeypatch):
    """``in_subprocess``: the child's failure is an error naming the file, with its last lines."""
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(RuntimeError, match=r"converting broken\.gguf failed in a child process \(exit \d+\)"):
        models.converted_folder(str(bad), in_subprocess=True)
    assert not any((tmp_path / "cache" / "models").glob("broken*"))  # nothing half-written


@pytest.mark.slow
def test_smollm2_conversion_equals_transformers_own_gguf_load_and_is_reused(tmp_path, monkeypatch):
    """The real model: converted once in a child process with the GGUF parsed once
    (``_gguf_read_once``), every tensor equals what transformers' own GGUF load gives (the
    reference: the demo pool was trained on that), the tokenizer encodes alike, and a second load
    reuses the folder (no conversion) with bit-identical logits."""
    pytest.importorskip("gguf")
    try:
        folder, gguf_file = models.smollm2_source()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    out = models.converted_folder("smollm2", in_subprocess=True)
    assert out is not None and models.converted_problem(out) is None

    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    model, tok = models.load_causal_lm("smollm2")
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    texts = ["Tell me about penguins.", "  Ünïcödé, tabs\tand 123 numbers!"]
    assert [tok.encode(t) for t in texts] == [ref_tok.encode(t) for t in texts]
    chat = [{"role": "user", "content": texts[0]}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == ref_tok.apply_chat_template(chat, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(texts[0])])
    with torch.inference_mode():
        a = models.load_causal_lm("smollm2")[0](ids).logits
        b = model(ids).logits
        c = ref(ids).logits
    assert torch.equal(a, b) and torch.equal(b, c)


# --- loading a model does not stop the Studio ---------------------------------------------------


def test_a_slow_model_load_leaves_the_studio_lock_free_and_loads_once(monkeypatch):
    """While a base model loads (SmolLM2's first conversion: seconds), pools and decompositions
    (the studio's lock) stay available; a second request for the same base waits for that load."""
    started, release, loads = threading.Event(), threading.Event(), []

    def slow_load(base, device="cpu"):
        loads.append(base)
        started.set()
        assert release.wait(10)
        return object()

    monkeypatch.setattr(LLMBackend, "load", staticmethod(slow_load))
    monkeypatch.setattr("devec_core.hosting.remember_device", lambda be: None)
    key = ("llm", "slow-base")
    got = []
    try:
        threads = [threading.Thread(target=lambda: got.append(studio.get_llm_backend("slow-base"))) for _ in range(2)]
        threads[0].start()
        assert started.wait(10)
        threads[1].start()
        assert studio._LOCK.acquire(timeout=2), "the studio lock is held during a model load"
        studio._LOCK.release()
        release.set()
        for t in threads:
            t.join(10)
        assert loads == ["slow-base"] and len(got) == 2 and got[0] is got[1]
    finally:
        release.set()
        studio._BACKENDS.pop(key, None)


# --- the warm-up ----------------------------------------------------------------------------


@pytest.fixture
def tiny_session(tiny_llm, monkeypatch, tmp_path):
    """A fresh tiny-LLM backend under base "tiny-warm" and an isolate session on it whose target
    shares two planted directions with a reference (so both sides differ)."""
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_llm
    vecs = [lora_to_taskvector(random_llama_lora(model, rank=4, seed=s, scale=0.5), f"v{s}", "base_model.model.") for s in (1, 2)]
    g = torch.Generator().manual_seed(7)
    for mod in vecs[0].modules:
        Z = torch.randn(vecs[0].modules[mod].shape[0], 2, generator=g)
        for v in vecs:
            d = v.modules[mod]
            v.modules[mod] = type(d)(torch.cat([Z, d.B[:, 2:]], 1), d.A, d.scale)
    s, _ = studio.open_vectors(vecs, "llm", "tiny-warm", mode="isolate", target="v1", tau=0.8, prompts=["Say hi."])
    be = LLMBackend(model, tok)
    monkeypatch.setitem(studio._BACKENDS, ("llm", "tiny-warm"), be)
    yield s, be
    be.restore()


def _first_click(s):
    coef = studio.default_coefficients(s)
    job = studio.llm_job(s, coef, "Say hi.", 3, 6)
    job.settings.update(do_sample=True, temperature=0.9, top_p=0.95)
    return studio.run_job(job)


def test_the_warm_up_pair_changes_no_output(tiny_session):
    """The same first click gives the same (sampled) answers with and without the warm-up before
    it: the warm-up's own pair leaves no weights, mix or random state behind that a user could see."""
    import app

    s, be = tiny_session
    cold = _first_click(s)
    be.restore()
    torch.manual_seed(123)  # the global RNG: sampling must not depend on it either way
    said = app._warm_first_pair("llm", s)
    assert said.startswith("first pair") and "both_generate" in said  # both sides in one batched pass
    assert be.editor.current is None  # the batched pass writes no weight
    warm = _first_click(s)
    assert (warm.vanilla, warm.devec) == (cold.vanilla, cold.devec)
    assert cold.vanilla != cold.devec  # the two sides differ: the comparison above means something


def test_generation_reports_its_stages(tiny_session):
    s, _ = tiny_session
    t0 = time.perf_counter()
    r = _first_click(s)
    wall = time.perf_counter() - t0
    stages = ("model", "both_generate", "other")  # the LLM's two sides: one batched pass
    assert set(r.timings) == set(stages) and all(v >= 0 for v in r.timings.values())
    assert sum(r.timings.values()) <= wall
    _, be = tiny_session
    be.batch_rows = False  # each mix fused in turn: a switch and a generation per side
    try:
        t0 = time.perf_counter()
        r = _first_click(s)
        wall = time.perf_counter() - t0
    finally:
        be.batch_rows = True
    stages = ("model", "left_switch", "left_generate", "devec_switch", "devec_generate", "other")
    assert set(r.timings) == set(stages) and all(v >= 0 for v in r.timings.values())
    assert sum(r.timings.values()) <= wall
    be.restore()


def test_a_job_computes_the_report_only_when_nothing_is_shared(tiny_session, monkeypatch):
    """The report (with its chance level: seconds on a first call) is the job's note only when
    nothing is shared; otherwise a job does not compute it."""
    s, _ = tiny_session
    real = generation.describe
    monkeypatch.setattr(generation, "describe", lambda dec: pytest.fail("describe() for a pool with shared parts"))
    assert studio.llm_job(s, studio.default_coefficients(s), "Say hi.").note == ""
    monkeypatch.setattr(generation, "describe", real)
    model = studio._BACKENDS[("llm", "tiny-warm")].model
    vecs = [lora_to_taskvector(random_llama_lora(model, rank=2, seed=s, scale=0.5), f"w{s}", "base_model.model.") for s in (4, 5)]
    none, dec = studio.open_vectors(vecs, "llm", "tiny-warm", mode="isolate", target="w4", tau=0.99)
    assert sum(dec.shared_dims().values()) == 0  # independent random LoRAs: nothing above τ = 0.99
    job = studio.llm_job(none, studio.default_coefficients(none), "Say hi.")
    assert "DeVec equals vanilla task arithmetic" in job.note


def test_side_by_side_renders_the_fused_mix_first_and_changes_no_output(tiny_session, monkeypatch):
    """One switch fewer when a side's mix is the one fused now; results come back in the order
    asked, equal to those of a cold backend."""
    s, be = tiny_session
    monkeypatch.setattr(be, "batch_rows", False)  # the fused path (the batched rows write no weight: tests/test_rows.py)
    coef = studio.default_coefficients(s)
    job = studio.llm_job(s, coef, "Say hi.", 5, 5)
    settings = dict(job.settings, do_sample=True, temperature=0.9, top_p=0.9)
    cold = be.side_by_side(job.prompt, list(job.mixes), **settings)  # vanilla, then DeVec: DeVec stays fused
    assert be.is_fused(job.mixes[1]) and not be.is_fused(job.mixes[0])
    again = studio.llm_job(s, coef, "Say hi.", 5, 5)  # new Mix objects, same decomposition and terms
    order = []
    real = be.render
    be.render = lambda prompt, mix, **kw: order.append(mix.label) or real(prompt, mix, **kw)
    try:
        warm = be.side_by_side(again.prompt, list(again.mixes), **settings)
    finally:
        del be.render
    assert order == ["devec", "vanilla"]
    assert warm[1].apply.modules_written == 0 and warm[0].apply.modules_written > 0
    assert [r.token_ids for r in warm] == [r.token_ids for r in cold]
    be.restore()
    assert not be.is_fused(again.mixes[1])


# --- the warm-up gives way to visitors -------------------------------------------------------


def test_visitors_gate_counts_calls_in_flight_and_errors():
    import app

    gate = app._Visitors()
    inside, release = threading.Event(), threading.Event()

    @gate.serving
    def click(fail=False):
        inside.set()
        release.wait(10)
        if fail:
            raise ValueError("boom")
        return "ok"

    t = threading.Thread(target=click)
    t.start()
    inside.wait(10)
    assert gate.active == 1 and gate.wait_idle(timeout=0.2) is False  # a warm-up would still wait
    release.set()
    t.join()
    assert gate.active == 0 and gate.wait_idle(timeout=0.2) is True
    with pytest.raises(ValueError, match="boom"):
        click(fail=True)
    assert gate.active == 0  # an error still ends the visit
    assert click.__name__ == "click"


def test_the_tiny_flux_warm_up_changes_no_output():
    """The FLUX tab's warm-up (both mixes fused, one 1-step image, the scorers) leaves nothing a
    user could see: the first click's strips equal those of a cold start."""
    import numpy as np

    import app

    session, _ = studio.open_preset("style-flux-offline")
    c = studio.default_coefficients(session)
    be = studio.job_backend(studio.flux_job(session, c, "a red house", 0))
    be.restore()
    cold = studio.generate_flux(session, c, "a red house", seed=1)
    be.restore()
    said = app._warm_first_pair("flux", session)
    assert said.startswith("first pair (one 1-step image")
    warm = studio.generate_flux(session, c, "a red house", seed=1)
    assert np.array_equal(np.asarray(warm.vanilla), np.asarray(cold.vanilla))
    assert np.array_equal(np.asarray(warm.devec), np.asarray(cold.devec))
