"""devec_core.merge.studio_mix: the Studio's left-side methods, per-pair shared coefficients and
"Download this mix" (one exact LoRA that reproduces what the Studio fuses)."""

import copy

import pytest
import torch

from devec_core import decompose
from devec_core.export import read_devec_metadata
from devec_core.merge import merge
from devec_core.merge.studio_mix import left_mix, pair_terms, write_mix
from devec_core.mix import Mix, WeightEditor
from tests.tiny_models import PEFT_PREFIX, lora_to_taskvector, random_llama_lora, tiny_llama


@pytest.fixture(scope="module")
def pool():
    model, _ = tiny_llama(0)
    sds = [random_llama_lora(model, rank=4, seed=s) for s in (1, 2, 3)]
    for k in sds[0]:  # plant a shared direction between the first two
        if k.endswith("lora_B.weight"):
            sds[1][k][:, 0] = sds[0][k][:, 0]
    vecs = [lora_to_taskvector(sd, n, PEFT_PREFIX) for sd, n in zip(sds, ("a", "b", "c"))]
    return model, decompose(vecs, tau=0.85, mode="pairwise")


def _fused(model, mix):
    ed = WeightEditor(model)
    ed.apply(mix)
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    ed.restore()
    return out


def test_left_mix_ties_fuses_the_ties_merge_and_is_cached(pool):
    model, dec = pool
    w = {"a": 1.0, "b": 0.5, "c": 0.0}
    m1 = left_mix(dec, "k", w, "ties", density=0.3)
    assert m1.source is left_mix(dec, "k", w, "ties", density=0.3).source  # same settings: cached
    assert m1.source is not left_mix(dec, "k", {**w, "b": 0.6}, "ties", density=0.3).source
    ref = merge(dec.vectors[:2], "ties", [1.0, 0.5], density=0.3)  # c at λ = 0 takes no part
    base = dict(model.named_parameters())
    got = _fused(model, m1)
    for mod, d in ref.modules.items():
        torch.testing.assert_close(got[mod + ".weight"] - base[mod + ".weight"].detach(), d.W, atol=1e-6, rtol=1e-5)
    van = left_mix(dec, "k", w, "task_arithmetic")
    assert van.label == "vanilla" and {str(c) for c, _ in van.terms} == {"delta:a", "delta:b"}
    with pytest.raises(ValueError, match="left-side method"):
        left_mix(dec, "k", w, "slerp")


def test_pair_terms_per_pair_with_fallback(pool):
    _, dec = pool
    terms = pair_terms(dec, 0.5, {"a+b": 2.0, "b+c": 0.0})
    assert terms == [("pair_shared", "a+b", 2.0), ("pair_shared", "a+c", 0.5)]
    with pytest.raises(ValueError, match="unknown pair"):
        pair_terms(dec, 0.5, {"b+a": 1.0})


def test_download_this_mix_reproduces_the_fused_devec_mix(pool, tmp_path):
    from peft import PeftModel

    model, dec = pool
    mix = Mix(dec, (("unique", "a", 1.0), ("unique", "b", -0.5), *pair_terms(dec, 0.3, {"a+b": 1.5})), "devec")
    settings = {"mode": "pairwise", "tau": 0.85, "pairs": {"a+b": 1.5}, "unique": {"a": 1.0, "b": -0.5}}
    path = write_mix(mix, tmp_path / "mix", "peft", settings)
    assert read_devec_metadata(path)["mix"]["pairs"] == {"a+b": 1.5}
    want = _fused(model, mix)
    got = dict(PeftModel.from_pretrained(copy.deepcopy(model), str(path)).merge_and_unload().named_parameters())
    for n, p in want.items():
        torch.testing.assert_close(got[n].detach(), p, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        write_mix(Mix(dec, (), "devec"), tmp_path / "e", "peft", {})
