"""devec_core.export: exported unique/shared parts load in diffusers and PEFT and equal the engine's parts."""

import json

import pytest
import torch
from safetensors.torch import save_file

from devec_core import METHOD_VERSION, decompose
from devec_core.export import export_decomposition, read_devec_metadata, save_flux_lora, to_lowrank
from devec_core.formats import load_pool
from devec_core.taskvec import Dense, LowRank
from tests.tiny_models import LLAMA_TARGETS, random_flux_lora, random_llama_lora, tiny_flux_pipeline, tiny_llama


def _shared_pool_flux(transformer, tmp_path):
    """Two FLUX LoRAs whose first direction is shared, so every part is nonzero."""
    a = random_flux_lora(transformer, rank=4, seed=1)
    b = random_flux_lora(transformer, rank=4, seed=2)
    for k in a:
        if k.endswith("lora_B.weight"):
            b[k][:, 0] = a[k][:, 0]
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    return [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]


def _dense(d):
    return d.dense(torch.float32)


def test_flux_export_loads_in_diffusers_and_equals_parts(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)  # private copy: we fuse into it
    vecs = load_pool(_shared_pool_flux(pipe.transformer, tmp_path))
    dec = decompose(vecs, tau=0.85)
    assert sum(dec.shared_dims().values()) > 0
    out = tmp_path / "out"
    out.mkdir()
    paths = export_decomposition(dec, out)
    assert sorted(p.name for p in paths) == ["shared.safetensors", "unique-a.safetensors", "unique-b.safetensors"]
    meta = read_devec_metadata(out / "unique-a.safetensors")
    assert meta["tau"] == 0.85 and meta["mode"] == "joint" and meta["method_version"] == METHOD_VERSION
    assert meta["source"].endswith("a.safetensors")
    base = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for fname, parts in (("unique-a.safetensors", dec.component("unique", "a")), ("shared.safetensors", dec.component("merged_shared"))):
        pipe.load_lora_weights(str(out / fname), adapter_name="x")
        pipe.fuse_lora(adapter_names=["x"], lora_scale=1.0)
        mods = dict(pipe.transformer.named_modules())
        for mod, d in parts.items():
            if not torch.any(d.dense()):
                continue
            got = mods[mod].weight.detach() - base[mod]
            torch.testing.assert_close(got, _dense(d), atol=1e-5, rtol=1e-4)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        for n, m in pipe.transformer.named_modules():
            if isinstance(m, torch.nn.Linear):
                torch.testing.assert_close(m.weight.detach(), base[n], atol=1e-6, rtol=0)


def test_peft_export_loads_with_peft_and_equals_parts(tmp_path):
    from peft import LoraConfig, PeftModel

    model, _ = tiny_llama(seed=0)
    srcs = []
    for seed, alpha in ((1, 8), (2, 4)):
        sd = random_llama_lora(model, rank=4, seed=seed)
        d = tmp_path / f"llm{seed}"
        d.mkdir()
        save_file(sd, str(d / "adapter_model.safetensors"))
        LoraConfig(r=4, lora_alpha=alpha, target_modules=list(LLAMA_TARGETS), task_type="CAUSAL_LM").save_pretrained(str(d))
        srcs.append(d)
    vecs = load_pool(srcs)
    dec = decompose(vecs, tau=0.5)
    out = tmp_path / "out"
    out.mkdir()
    export_decomposition(dec, out)
    assert (out / "unique-llm1" / "adapter_config.json").exists() and (out / "shared" / "devec.json").exists()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for folder, parts in (("unique-llm1", dec.component("unique", "llm1")), ("shared", dec.component("merged_shared"))):
        peft_model = PeftModel.from_pretrained(model, str(out / folder))
        merged = peft_model.merge_and_unload()
        mods = dict(merged.named_modules())
        n_checked = 0
        for mod, d in parts.items():
            got = mods[mod].weight.detach() - base[mod + ".weight"]
            torch.testing.assert_close(got, _dense(d), atol=1e-5, rtol=1e-4)
            n_checked += 1
        assert n_checked > 0
        model = merged
        with torch.no_grad():  # restore the base weights for the next adapter
            for n, p in model.named_parameters():
                p.copy_(base[n])


def test_dense_part_cut_by_rank_and_energy():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 3, generator=g) @ torch.randn(3, 16, generator=g)
    lr = to_lowrank(Dense(W), energy=0.999999)
    assert lr.rank == 3
    torch.testing.assert_close(lr.dense(), W, atol=1e-4, rtol=1e-4)
    assert to_lowrank(Dense(W), rank=2).rank == 2
    assert to_lowrank(Dense(torch.zeros(4, 4))) is None
    assert to_lowrank(LowRank(torch.zeros(4, 2), torch.ones(2, 4))) is None
    lr = to_lowrank(LowRank(torch.ones(4, 2), torch.ones(2, 4), scale=-0.5))
    torch.testing.assert_close(lr.B, -0.5 * torch.ones(4, 2))
