"""FLUX backend on a tiny FluxPipeline built offline: mixes change images, exact restore, diffusers
LoRA parity (set_adapters / fuse_lora), CPU-offload path, isolation."""

import threading

import pytest
import torch

from devec_core import decompose
from devec_core.backends.flux import FluxBackend
from devec_core.mix import VectorPool, devec, vanilla
from tests.tiny_models import FLUX_PREFIX, lora_to_taskvector, random_flux_lora, tiny_flux_pipeline

GEN = dict(steps=2, width=32, height=32, max_sequence_length=32, output_type="pt", seed=3)
PROMPT = "a cat in pixel art"


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline(seed=0)
    sds = [random_flux_lora(pipe.transformer, rank=4, seed=s, scale=0.3) for s in (1, 2, 3)]
    vecs = [lora_to_taskvector(sd, f"s{i}", FLUX_PREFIX) for i, sd in enumerate(sds, 1)]
    backend = FluxBackend(pipe)
    yield backend, vecs, sds
    backend.restore()


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_mix_changes_image_and_zero_is_base(flux):
    b, vecs, _ = flux
    pool = VectorPool(vecs)
    base = b.render(PROMPT, None, **GEN).image
    mixed = b.render(PROMPT, vanilla(pool, {"s1": 1.0, "s2": 1.0}), **GEN).image
    assert (mixed - base).abs().max() > 1e-3
    zero = b.render(PROMPT, vanilla(pool, {"s1": 0.0, "s2": 0.0}), **GEN).image
    assert torch.equal(zero, base)


def test_apply_restore_identity(flux):
    b, vecs, _ = flux
    b.restore()
    base = state(b.pipe.transformer)
    dec = decompose(vecs, mode="joint")
    b.apply(devec(dec, {"s1": 1.0, "s2": 0.5, "s3": -1.0}, shared=0.5))
    b.apply(vanilla(VectorPool(vecs), {"s2": 3.0}))
    b.restore()
    now = state(b.pipe.transformer)
    assert all(torch.equal(now[k], base[k]) for k in base)


def test_devec_mix_equals_hand_set_weights(flux):
    b, vecs, _ = flux
    b.restore()
    dec = decompose(vecs, mode="joint")
    lam = {"s1": 1.0, "s2": 0.8, "s3": -0.5}
    got = b.render(PROMPT, devec(dec, lam, shared=0.4), **GEN).image
    b.restore()
    ref = tiny_flux_pipeline(seed=0)
    with torch.no_grad():
        parts = [(v, dec.component("unique", n)) for n, v in lam.items()] + [(0.4, dec.component("merged_shared"))]
        for coef, comp in parts:
            for mod, d in comp.items():
                ref.transformer.get_submodule(mod).weight.add_(coef * d.dense(torch.float32))
    want = FluxBackend(ref).generate(PROMPT, **GEN).image
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_vanilla_parity_with_diffusers_set_adapters_and_fuse_lora(flux):
    b, vecs, sds = flux
    lam = [0.7, -0.5]
    ours = b.render(PROMPT, vanilla(VectorPool(vecs), {"s1": lam[0], "s2": lam[1]}), **GEN).image
    ours_w = {m: b.pipe.transformer.get_submodule(m).weight.detach().clone() for m in vecs[0].modules}
    b.restore()

    pipe = tiny_flux_pipeline(seed=0)
    pipe.load_lora_weights(dict(sds[0]), adapter_name="s1")
    pipe.load_lora_weights(dict(sds[1]), adapter_name="s2")
    pipe.set_adapters(["s1", "s2"], adapter_weights=lam)
    unfused = FluxBackend(pipe).generate(PROMPT, **GEN).image
    torch.testing.assert_close(unfused, ours, rtol=0, atol=1e-4)
    pipe.fuse_lora(components=["transformer"], adapter_names=["s1", "s2"], lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    for m, w in ours_w.items():
        torch.testing.assert_close(pipe.transformer.get_submodule(m).weight, w, rtol=0, atol=1e-6)
    fused = FluxBackend(pipe).generate(PROMPT, **GEN).image
    torch.testing.assert_close(fused, ours, rtol=0, atol=1e-4)


def test_cpu_offload_path_applies_to_the_live_weights(flux):
    """enable_model_cpu_offload (accelerate hooks; CPU as the 'accelerator') + fused mixes."""
    b, vecs, _ = flux
    pool = VectorPool(vecs)
    mix = vanilla(pool, {"s1": 1.0, "s3": 0.5})
    want = b.render(PROMPT, mix, **GEN).image
    b.restore()
    pipe = tiny_flux_pipeline(seed=0)
    base = state(pipe.transformer)
    off = FluxBackend(pipe, offload=True, offload_device="cpu")
    assert off.offload and getattr(pipe.transformer, "_hf_hook", None) is not None
    base_img = off.generate(PROMPT, **GEN).image
    got = off.render(PROMPT, mix, **GEN).image
    assert torch.equal(got, want)
    off.restore()
    assert torch.equal(off.generate(PROMPT, **GEN).image, base_img)
    now = state(pipe.transformer)
    assert all(torch.equal(now[k], base[k]) for k in base)


def test_side_by_side_and_two_threads(flux):
    b, vecs, _ = flux
    pool = VectorPool(vecs)
    mixes = [vanilla(pool, {"s1": 1.0}, label="a"), vanilla(pool, {"s2": 1.0, "s3": 1.0}, label="b")]
    sbs = b.side_by_side(PROMPT, [None] + mixes, **GEN)
    assert [r.label for r in sbs] == ["base", "a", "b"] and all(r.generate_s > 0 for r in sbs)
    want = {r.label: r.image for r in sbs[1:]}
    got: dict[str, list] = {"a": [], "b": []}
    errors = []

    def worker(m):
        try:
            for _ in range(3):
                got[m.label].append(b.render(PROMPT, m, **GEN).image)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(m,)) for m in mixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not torch.equal(want["a"], want["b"])
    assert all(torch.equal(x, want["a"]) for x in got["a"]) and all(torch.equal(x, want["b"]) for x in got["b"])
    b.restore()


def test_prefixed_module_name_is_an_error(flux):
    b, _, sds = flux
    from tests.tiny_models import lora_to_taskvector as to_tv

    wrong = to_tv(sds[0], "w", prefix="")  # keys keep "transformer."
    with pytest.raises(ValueError, match=r"module 'transformer\.(single_)?transformer_blocks\.0.*does not exist.*without the 'transformer\.' prefix"):
        b.apply(vanilla(VectorPool([wrong]), {"w": 1.0}))


def test_load_flux_pipeline_from_a_local_folder(tmp_path, flux):
    """devec_core.models.load_flux_pipeline on a folder saved from the tiny pipeline, then a backend."""
    from devec_core.models import load_flux_pipeline

    b, vecs, _ = flux
    b.restore()
    b.pipe.save_pretrained(tmp_path)
    backend = FluxBackend.load(str(tmp_path), dtype="float32", offload=False)
    assert not backend.pipe.transformer.training
    mix = vanilla(VectorPool(vecs), {"s1": 1.0})
    torch.testing.assert_close(backend.render(PROMPT, mix, **GEN).image, b.render(PROMPT, mix, **GEN).image, rtol=0, atol=1e-5)
    b.restore()
    assert load_flux_pipeline(tmp_path).transformer.dtype == torch.float32
