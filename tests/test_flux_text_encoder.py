"""FLUX LoRAs that also touch the text encoder: those modules are fused into the text encoder
(vanilla and DeVec alike), matching diffusers' own ``load_lora_weights`` + ``fuse_lora``; modules
this pipeline does not have are left out and said so — never a crash."""

import pytest
import torch
from safetensors.torch import save_file

from devec_core import decompose
from devec_core.backends.flux import FluxBackend
from devec_core.formats import load_task_vector
from devec_core.mix import VectorPool, devec, vanilla
from devec_core.taskvec import LowRank, TaskVector
from tests.tiny_models import random_flux_lora, tiny_flux_pipeline

GEN = dict(steps=2, width=32, height=32, max_sequence_length=32, output_type="pt", seed=3)
TE_MODS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc1")  # CLIPTextModel paths (transformers 5)


def _with_text_encoder(pipe, seed, rank=4, scale=0.3):
    """A diffusers-format FLUX LoRA with transformer and CLIP text-encoder modules."""
    sd = random_flux_lora(pipe.transformer, rank=rank, seed=seed, scale=scale)
    g = torch.Generator().manual_seed(100 + seed)
    te = dict(pipe.text_encoder.named_modules())
    for m in TE_MODS:
        n, k = te[m].weight.shape
        sd[f"text_encoder.{m}.lora_A.weight"] = torch.randn(rank, k, generator=g) * scale
        sd[f"text_encoder.{m}.lora_B.weight"] = torch.randn(n, rank, generator=g) * scale
    return sd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    pipe = tiny_flux_pipeline(seed=0)
    sds = [_with_text_encoder(pipe, s) for s in (1, 2)]
    for i, sd in enumerate(sds, 1):
        save_file(sd, str(d / f"te{i}.safetensors"))
    vecs = [load_task_vector(d / f"te{i}.safetensors") for i in (1, 2)]
    return pipe, sds, vecs, d


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_text_encoder_modules_load_and_match_diffusers_fuse(setup):
    pipe, sds, vecs, d = setup
    assert all(f"text_encoder.{m}" in vecs[0].modules for m in TE_MODS)
    b = FluxBackend(pipe)
    te0, tr0 = _state(pipe.text_encoder), _state(pipe.transformer)
    b.apply(vanilla(VectorPool(vecs), {"te1": 1.0}))
    te_ours, tr_ours = _state(pipe.text_encoder), _state(pipe.transformer)
    b.restore()
    assert all(torch.equal(_state(pipe.text_encoder)[k], te0[k]) for k in te0)  # bit-identical restore
    assert all(torch.equal(_state(pipe.transformer)[k], tr0[k]) for k in tr0)
    # the reference: diffusers' own loader on a fresh copy of the same pipeline
    ref = tiny_flux_pipeline(seed=0)
    ref.load_lora_weights(str(d / "te1.safetensors"), adapter_name="a")
    ref.fuse_lora(lora_scale=1.0, components=["transformer", "text_encoder"])
    ref.unload_lora_weights()
    te_ref, tr_ref = _state(ref.text_encoder), _state(ref.transformer)
    for m in TE_MODS:
        k = m + ".weight"
        assert not torch.equal(te_ours[k], te0[k])  # the text encoder was edited
        torch.testing.assert_close(te_ours[k], te_ref[k], atol=1e-5, rtol=1e-4)
    k = "transformer_blocks.0.attn.to_q.weight"
    torch.testing.assert_close(tr_ours[k], tr_ref[k], atol=1e-5, rtol=1e-4)


def test_devec_mix_reaches_the_text_encoder_and_renders(setup):
    pipe, sds, vecs, d = setup
    b = FluxBackend(pipe)
    dec = decompose(vecs, mode="joint", tau=0.85)
    assert any(m.startswith("text_encoder.") for m in dec.shared_dims())
    te0 = _state(pipe.text_encoder)
    res = b.render("a cat", devec(dec, {"te1": 1.0, "te2": 1.0}), **GEN)
    u = dec.component("unique", "te1")[f"text_encoder.{TE_MODS[0]}"].dense() + \
        dec.component("unique", "te2")[f"text_encoder.{TE_MODS[0]}"].dense()
    got = _state(pipe.text_encoder)[TE_MODS[0] + ".weight"] - te0[TE_MODS[0] + ".weight"]
    torch.testing.assert_close(got, u, atol=1e-5, rtol=1e-4)
    assert res.left_out == [] and res.image.shape[-1] == 32
    b.restore()


def test_text_encoder_modules_the_pipeline_lacks_are_left_out_and_named(setup):
    pipe, sds, vecs, d = setup
    b = FluxBackend(pipe)
    g = torch.Generator().manual_seed(0)
    mods = dict(vecs[0].modules)
    mods["text_encoder.encoder.layers.9.self_attn.q_proj"] = LowRank(torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g))
    mods["text_encoder_3.whatever.q"] = LowRank(torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g))
    odd = TaskVector("odd", mods, meta={"family": "flux"})
    base = b.render("a cat", None, **GEN).image
    res = b.render("a cat", vanilla(VectorPool([odd]), {"odd": 1.0}), **GEN)  # no exception
    assert "text_encoder.encoder.layers.9.self_attn.q_proj" in res.left_out
    assert (res.image - base).abs().max() > 0  # the rest was applied
    b.restore()


def test_packed_mixes_for_a_gpu_worker_route_text_encoder_modules_too(setup):
    """On ZeroGPU the worker gets mixes over a ``hosting.PackedSource``: same routing."""
    from devec_core.hosting import pack_mixes

    pipe, sds, vecs, d = setup
    b = FluxBackend(pipe)
    mix = vanilla(VectorPool(vecs), {"te1": 1.0})
    b.apply(mix)
    want = _state(pipe.text_encoder)
    b.restore()
    b.apply(pack_mixes([mix])[0])
    got = _state(pipe.text_encoder)
    b.restore()
    assert all(torch.equal(got[k], want[k]) for k in want)
