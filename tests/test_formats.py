"""devec_core.formats: every input format → TaskVector, scaling folded in, bad inputs refused."""

import json

import pytest
import torch
from safetensors.torch import save_file

from devec_core.formats import FormatError, load_pool, load_task_vector
from tests.tiny_models import LLAMA_TARGETS, random_flux_lora, random_llama_lora


def _peft_folder(path, sd, **cfg):
    from peft import LoraConfig

    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "adapter_model.safetensors"))
    LoraConfig(target_modules=list(LLAMA_TARGETS), **cfg).save_pretrained(str(path))
    return path


def test_diffusers_flux_lora_loads(tmp_path, tiny_flux):
    sd = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    save_file(sd, str(tmp_path / "style.safetensors"))
    tv = load_task_vector(tmp_path / "style.safetensors")
    assert tv.name == "style" and tv.meta["format"] == "diffusers" and tv.meta["family"] == "flux"
    d = tv.modules["transformer_blocks.0.attn.to_q"]
    assert d.scale == 1.0
    torch.testing.assert_close(d.B, sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"])


def test_peft_folder_alpha_over_r_and_rslora(tmp_path, tiny_llm):
    sd = random_llama_lora(tiny_llm[0], rank=4, seed=1)
    tv = load_task_vector(_peft_folder(tmp_path / "a", sd, r=4, lora_alpha=8))
    assert set(tv.modules) == {k[len("base_model.model.") : -len(".lora_A.weight")] for k in sd if "lora_A" in k}
    assert tv.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(2.0)
    tv = load_task_vector(_peft_folder(tmp_path / "b", sd, r=4, lora_alpha=8, use_rslora=True))
    assert tv.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(4.0)
