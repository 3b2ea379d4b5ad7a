"""On CUDA: the decomposition, the fused weights and generation agree with the CPU and with the
definition W = W0 + Σ λ·ΔW; restore gives the base weights back bit for bit.

Every test here carries the ``gpu`` marker and is skipped where CUDA is missing (tests/conftest.py):
run them on a GPU machine with ``python -m pytest -q -m gpu``. The references are computed on the
CPU in float64 from the components themselves, never from the editor under test.
"""

from __future__ import annotations

import pytest
import torch

from devec_core import decompose
from devec_core.mix import VectorPool, WeightEditor, devec, vanilla
from tests.tiny_models import FLUX_PREFIX, PEFT_PREFIX, lora_to_taskvector, random_flux_lora, random_llama_lora, tiny_flux_pipeline, tiny_llama

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _llama_pool(model, k=3, scale=0.3):
    return [lora_to_taskvector(random_llama_lora(model, rank=4, seed=s, scale=scale), f"v{s}", PEFT_PREFIX) for s in range(1, k + 1)]


def _expected_weights(base: dict[str, torch.Tensor], terms) -> dict[str, torch.Tensor]:
    """W0 + Σ λ·dense(component) per touched module, in float64 on the CPU (the definition)."""
    out = {}
    for lam, comp in terms:
        for mod, d in comp.items():
            key = mod + ".weight"
            out.setdefault(key, base[key].double().cpu().clone())
            out[key] += lam * d.dense(torch.float64).cpu()
    return out


def test_decomposition_on_cuda_equals_the_cpu_one():
    model, _ = tiny_llama(seed=0)
    pool = _llama_pool(model)
    cpu = decompose(pool, tau=0.5, dtype="float64", device="cpu")
    gpu = decompose(pool, tau=0.5, dtype="float64", device=CUDA)
    assert gpu.shared_dims() == cpu.shared_dims()
    for name in cpu.names:
        u_cpu, u_gpu = cpu.component("unique", name), gpu.component("unique", name)
        for mod in u_cpu:
            a, b = u_cpu[mod].dense(torch.float64).cpu(), u_gpu[mod].dense(torch.float64).cpu()
            assert torch.allclose(a, b, rtol=0, atol=1e-10 * max(1.0, float(a.abs().max()))), (name, mod)


def test_fused_weights_on_cuda_equal_the_definition_and_restore_exactly():
    model, _ = tiny_llama(seed=0)
    pool = _llama_pool(model)
    dec = decompose(pool, tau=0.5)
    model = model.to(CUDA)
    base = _state(model)
    lam = {"v1": 1.0, "v2": -0.5, "v3": 0.75}
    mix = devec(dec, lam, shared=0.3)
    editor = WeightEditor(model)
    editor.apply(mix)
    fused = _state(model)
    assert all(t.device.type == torch.device(CUDA).type for t in fused.values())
    want = _expected_weights(base, [(lam[n], dec.component("unique", n)) for n in dec.names] + [(0.3, dec.component("merged_shared"))])
    assert want, "the mix touches no module"
    for key, w in want.items():
        got = fused[key].double().cpu()
        assert torch.allclose(got, w, rtol=0, atol=1e-5 * max(1.0, float(w.abs().max()))), key
    untouched = [k for k in base if k not in want]
    assert untouched and all(torch.equal(fused[k], base[k]) for k in untouched)
    editor.restore()
    assert all(torch.equal(v, base[k]) for k, v in _state(model).items())  # bit for bit


@torch.inference_mode()
def test_llm_logits_on_cuda_follow_the_mix_like_the_cpu():
    cpu_model, tok = tiny_llama(seed=0)
    gpu_model, _ = tiny_llama(seed=0)
    gpu_model = gpu_model.to(CUDA)
    pool = _llama_pool(cpu_model)
    ids = tok("hello world", return_tensors="pt").input_ids
    base_gpu = gpu_model(ids.to(CUDA)).logits.cpu()
    logits = {}
    for dev, model in (("cpu", cpu_model), (CUDA, gpu_model)):
        editor = WeightEditor(model)
        editor.apply(vanilla(VectorPool(pool), {"v1": 1.0, "v2": 0.5}))
        logits[dev] = model(ids.to(dev)).logits.cpu()
        editor.apply(vanilla(VectorPool(pool), {"v1": 0.0}))  # coefficient 0 is the base model
        if dev == CUDA:
            assert torch.equal(model(ids.to(dev)).logits.cpu(), base_gpu)
        editor.restore()
    assert not torch.allclose(logits[CUDA], base_gpu, atol=1e-4)  # the mix changes the output
    assert torch.allclose(logits[CUDA], logits["cpu"], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_flux_image_on_cuda_changes_with_the_mix_and_comes_back():
    pipe = tiny_flux_pipeline(seed=0)
    vecs = [lora_to_taskvector(random_flux_lora(pipe.transformer, rank=4, seed=s, scale=0.3), f"s{s}", FLUX_PREFIX) for s in (1, 2)]
    dec = decompose(vecs, tau=0.5)
    pipe = pipe.to(CUDA)

    def image():
        gen = torch.Generator(CUDA).manual_seed(3)
        out = pipe("a cat in pixel art", num_inference_steps=2, guidance_scale=0.0, width=32, height=32, generator=gen,
                   max_sequence_length=32, output_type="pt")
        return out.images[0].float().cpu()

    base = image()
    editor = WeightEditor(pipe.transformer)
    editor.apply(devec(dec, {"s1": 1.0, "s2": 1.0}, shared=1.0))
    mixed = image()
    editor.restore()
    again = image()
    assert torch.isfinite(mixed).all()
    assert (mixed - base).abs().max() > 1e-3  # the mix reaches the image
    assert torch.allclose(again, base, rtol=0, atol=1e-5)  # restored weights, the base image (CUDA kernels need not be bitwise repeatable)
