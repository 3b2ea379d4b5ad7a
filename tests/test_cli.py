"""python -m devec_core decompose|inspect: outputs that diffusers/PEFT load, cache hits, clean failures."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from devec_core import METHOD_VERSION
from devec_core.cli import main
from tests.test_formats import _kohya_real_shapes, _peft_folder, _tiny_llama_dir
from tests.tiny_models import random_flux_lora, random_llama_lora


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DEVEC_CACHE_DIR", str(d))
    return d


@pytest.fixture
def flux_pair(tmp_path, tiny_flux):
    a = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    b = random_flux_lora(tiny_flux.transformer, rank=4, seed=2)
    for k in a:  # plant one shared direction per module
        if k.endswith("lora_B.weight"):
            b[k][:, 0] = a[k][:, 0]
    save_file(a, str(tmp_path / "pixel.safetensors"))
    save_file(b, str(tmp_path / "ink.safetensors"))
    return [str(tmp_path / "pixel.safetensors"), str(tmp_path / "ink.safetensors")]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_decompose_flux_then_cache_hit_at_other_tau(tmp_path, flux_pair, cache_dir, capsys, tiny_flux):
    code, out, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o1"), "--quiet"], capsys)
    assert code == 0, out
    files = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert files == ["report.json", "shared.safetensors", "unique-ink.safetensors", "unique-pixel.safetensors"]
    rep = json.loads((tmp_path / "o1" / "report.json").read_text())
    assert rep["cache"] == "miss" and rep["tau"] == 0.85 and rep["method_version"] == METHOD_VERSION
    row = rep["modules"][0]
    assert {"module", "ranks", "eigenvalues", "shared_dim", "norms"} <= set(row)
    assert sum(r["shared_dim"] for r in rep["modules"]) > 0

    code, out, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o2"), "--tau", "0.3", "--quiet"], capsys)
    assert code == 0 and "cache hit" in out
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["cache"] == "hit"
    code, _, _ = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o3"), "--tau", "0.3", "--no-cache", "--quiet"], capsys)
    assert code == 0
    for f in ("unique-pixel.safetensors", "shared.safetensors"):
        a, b = load_file(str(tmp_path / "o2" / f)), load_file(str(tmp_path / "o3" / f))
        assert a.keys() == b.keys()
        for k in a:  # same numbers up to float rounding (stored vs recomputed operand layouts)
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert all(k.startswith("transformer.") for k in load_file(str(tmp_path / "o2" / "unique-ink.safetensors")))
    from tests.tiny_models import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)  # private: loading wraps modules
    pipe.load_lora_weights(str(tmp_path / "o2" / "unique-ink.safetensors"), adapter_name="cli_u")
    assert "cli_u" in pipe.get_list_adapters()["transformer"]


def test_decompose_peft_pair_writes_adapter_folders(tmp_path, tiny_llm, cache_dir, capsys):
    from peft import PeftModel

    from tests.tiny_models import tiny_llama

    srcs = [str(_peft_folder(tmp_path / n, random_llama_lora(tiny_llm[0], rank=4, seed=s), r=4, lora_alpha=8, task_type="CAUSAL_LM"))
            for n, s in (("polite", 1), ("rude", 2))]
    code, out, _ = _run(["decompose", *srcs, "--out", str(tmp_path / "o"), "--mode", "isolate", "--target", "rude", "--quiet"], capsys)
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.json", "shared-rude", "unique-rude"]
    model, _ = tiny_llama(seed=0)
    PeftModel.from_pretrained(model, str(tmp_path / "o" / "unique-rude"))


def test_kohya_real_shapes_decompose_and_load(tmp_path, cache_dir, capsys):
    """Two kohya FLUX LoRAs at real shapes → decompose → diffusers-format files diffusers accepts."""
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from devec_core import decompose
    from devec_core.formats import load_pool

    _kohya_real_shapes(tmp_path / "k1.safetensors", seed=1)
    _kohya_real_shapes(tmp_path / "k2.safetensors", seed=2, alpha=4.0)
    srcs = [str(tmp_path / "k1.safetensors"), str(tmp_path / "k2.safetensors")]
    code, out, err = _run(["decompose", *srcs, "--out", str(tmp_path / "o"), "--tau", "0.05", "--quiet"], capsys)
    assert code == 0, err
    exported = tmp_path / "o" / "unique-k1.safetensors"
    sd = FluxPipeline.lora_state_dict(str(exported))  # diffusers' own parser: plain diffusers layout
    dec = decompose(load_pool(srcs), tau=0.05)
    for mod, part in dec.component("unique", "k1").items():
        torch.testing.assert_close(sd[f"transformer.{mod}.lora_B.weight"] @ sd[f"transformer.{mod}.lora_A.weight"], part.dense(),
                                   atol=1e-7, rtol=1e-4)
    with init_empty_weights():  # the real FLUX.1 transformer, no memory: checks every key and shape
        tr = FluxTransformer2DModel(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                    guidance_embeds=False, axes_dims_rope=[16, 56, 56])
    tr.load_lora_adapter(load_file(str(exported)), prefix="transformer", adapter_name="u", low_cpu_mem_usage=True)
    q = tr.transformer_blocks[0].attn.to_q
    assert q.lora_B["u"].weight.shape == (3072, 4) and q.scaling["u"] == 1.0
    assert "single_transformer_blocks.0.proj_out" in {m for m, _ in tr.named_modules()}


def test_full_checkpoints_with_base(tmp_path, cache_dir, capsys):
    _tiny_llama_dir(tmp_path / "base")
    _tiny_llama_dir(tmp_path / "ft1", perturb=1)
    _tiny_llama_dir(tmp_path / "ft2", perturb=2)
    args = ["decompose", str(tmp_path / "ft1"), str(tmp_path / "ft2"), "--out", str(tmp_path / "o"), "--quiet", "--rank", "4"]
    code, _, err = _run(args + ["--base", str(tmp_path / "base")], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "unique-ft1" / "adapter_config.json").exists()
    code, _, err = _run(args[:4] + [str(tmp_path / "oc"), "--quiet", "--rank", "4", "--compress", "--base", str(tmp_path / "base")],
                        capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "oc" / "report.json").read_text())
    assert max(max(r["ranks"]) for r in rep["modules"]) <= 4  # factors, cut as read
    code, _, err = _run(["decompose", str(tmp_path / "ft1"), "--out", str(tmp_path / "o2"), "--quiet"], capsys)
    # a lone checkpoint without --base is refused, naming the input
    assert code == 1 and "--base" in err and not (tmp_path / "o2").exists()


def test_failures_leave_no_partial_output(tmp_path, flux_pair, cache_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(open(flux_pair[0], "rb").read()[:200])
    code, _, err = _run(["decompose", flux_pair[0], str(bad), "--out", str(out), "--quiet"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.safetensors" in lines[0] and "corrupt" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    code, _, err = _run(["decompose", flux_pair[0], str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o2")], capsys)
    assert code == 1 and "missing.safetensors" in err and "no such file" in err and not (tmp_path / "o2").exists()
    code, _, err = _run(["decompose", *flux_pair, "--out", str(tmp_path / "o3"), "--mode", "isolate"], capsys)
    assert code == 1 and "--target" in err
    code, _, err = _run(["decompose", flux_pair[0], flux_pair[0], "--out", str(tmp_path / "o4")], capsys)
    assert code == 1 and "duplicate input" in err
    with pytest.raises(SystemExit) as e:  # usage errors: argparse, exit 2
        main(["decompose", *flux_pair, "--out", str(tmp_path / "o5"), "--rank", "2", "--energy", "0.5"])
    assert e.value.code == 2


def test_inspect(tmp_path, flux_pair, capsys):
    code, out, _ = _run(["inspect", *flux_pair], capsys)
    assert code == 0
    assert "format diffusers" in out and "base model: FLUX-like" in out and "modules 20 (r4×20)" in out
    assert "overlap pixel ~ ink: 20 common modules" in out and "mean max cos²" in out
    code, out, _ = _run(["inspect", "--json", flux_pair[0]], capsys)
    info = json.loads(out)
    assert info["inputs"][0]["name"] == "pixel" and info["inputs"][0]["modules"] == 20


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "devec_core", "inspect", str(tmp_path / "nope.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "nope.safetensors" in r.stderr
