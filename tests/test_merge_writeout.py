"""devec_core.merge.writeout and ``python -m devec_core mix``: one LoRA (exact or compressed, with
its error), PEFT folders and diffusers FLUX LoRAs that load and reproduce the library's fused
weights, merged full models, clean CLI failures."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from devec_core.cli import main
from devec_core.export import read_devec_metadata
from devec_core.formats import load_pool
from devec_core.merge import merge
from devec_core.merge.writeout import compress, fuse_into, to_lora, write_lora, write_model
from devec_core.taskvec import Dense, LowRank
from tests.test_formats import _peft_folder, _tiny_llama_dir
from tests.tiny_models import random_flux_lora, random_llama_lora, shared_flux_pair, tiny_llama


def _rand_lowrank(n=20, m=14, r=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(n, r, generator=g, dtype=torch.float64), torch.randn(r, m, generator=g, dtype=torch.float64), 0.7)


def test_compress_on_factors_is_the_best_rank_r_approximation():
    d = _rand_lowrank()
    W = d.dense()
    U, S, Vh = torch.linalg.svd(W)
    for r in (1, 3, 5):
        lr, err, norm = compress(d, r)
        assert lr.rank == r
        torch.testing.assert_close(lr.dense(), (U[:, :r] * S[:r]) @ Vh[:r])  # Eckart–Young, from the dense SVD
        assert err == pytest.approx(float((W - lr.dense()).pow(2).sum()), rel=1e-9)
        assert norm == pytest.approx(float(W.pow(2).sum()), rel=1e-9)
    exact, err, _ = compress(d, None)
    assert err == 0.0 and exact.rank == 6
    torch.testing.assert_close(exact.dense(), W)
    big, err, _ = compress(d, 50)  # a rank above the LoRA's keeps it exactly
    assert big.rank == 6 and err == 0.0
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        compress(d, 0)


def test_compress_dense_exact_and_truncated():
    lr = _rand_lowrank(seed=1)
    Wd = Dense(lr.dense())
    exact, err, norm = compress(Wd, None)
    assert exact.rank == 6  # the numerical rank, not min(n, m)
    torch.testing.assert_close(exact.dense(), Wd.W)
    assert err / norm < 1e-20
    cut, err2, _ = compress(Wd, 2)
    assert err2 == pytest.approx(float((Wd.W - cut.dense()).pow(2).sum()), rel=1e-9)
    zero, err, norm = compress(Dense(torch.zeros(4, 3)), None)
    assert zero.rank == 0 and err == norm == 0.0


def test_to_lora_reports_relative_error_over_the_vector():
    mods = {"a": _rand_lowrank(seed=2), "b": _rand_lowrank(seed=3)}
    _, rep = to_lora(mods, rank=2)
    num = sum(float((d.dense() - compress(d, 2)[0].dense()).pow(2).sum()) for d in mods.values())
    den = sum(float(d.dense().pow(2).sum()) for d in mods.values())
    assert rep.relative_error == pytest.approx((num / den) ** 0.5, rel=1e-9)
    assert 0 < rep.relative_error < 1 and rep.to_dict()["modules"] == 2


@pytest.fixture(scope="module")
def llama_vectors():
    model, _ = tiny_llama(0)
    from tests.tiny_models import PEFT_PREFIX, lora_to_taskvector

    return model, [lora_to_taskvector(random_llama_lora(model, rank=4, seed=s), f"v{s}", PEFT_PREFIX) for s in (1, 2, 3)]


def _fused_weights(model, merged):
    """The library's fused weights (WeightEditor), then restored."""
    ed = fuse_into(model, merged)
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    ed.restore()
    return out


@pytest.mark.parametrize("method,rank", [("ta", None), ("ties", None), ("ta", 3)])
def test_peft_folder_loads_and_reproduces_the_fused_weights(tmp_path, llama_vectors, method, rank):
    from peft import PeftModel

    model, vecs = llama_vectors
    merged = merge(vecs, method, [0.5, -1.0, 0.8], **({"density": 0.4} if method == "ties" else {}))
    path, rep = write_lora(merged.modules, tmp_path / "m", family="peft", rank=rank, metadata={"merge": merged.meta["merge"]})
    assert read_devec_metadata(path)["merge"]["method"] == merged.meta["merge"]["method"]
    assert read_devec_metadata(path)["lora"]["relative_error"] == pytest.approx(rep.relative_error)
    want = _fused_weights(model, merged)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    got = dict(pm.merge_and_unload().named_parameters())
    if rank is None:
        assert rep.relative_error < 1e-5
        for n, p in want.items():
            torch.testing.assert_close(got[n].detach(), p, atol=1e-5, rtol=1e-5)
    else:  # compressed: every module's error is the reported one
        assert rep.relative_error > 1e-3
        base = dict(model.named_parameters())
        num = sum(float((got[n] - want[n]).pow(2).sum()) for n in want)
        den = sum(float((want[n] - base[n].detach()).pow(2).sum()) for n in want)
        assert (num / den) ** 0.5 == pytest.approx(rep.relative_error, rel=1e-3)


def test_flux_lora_of_a_devec_merge_loads_in_diffusers(tmp_path, tiny_flux):
    pipe = tiny_flux
    vecs = load_pool(shared_flux_pair(pipe.transformer, tmp_path))
    merged = merge(vecs, "devec", [1.0, 0.5], pair_weights=0.25)
    path, rep = write_lora(merged.modules, tmp_path / "mix.safetensors", family="diffusers", metadata=merged.meta)
    assert rep.relative_error == 0.0
    want = _fused_weights(pipe.transformer, merged)
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(str(path), adapter_name="mix")
    pipe.fuse_lora(adapter_names=["mix"], lora_scale=1.0)
    try:
        assert merged.modules
        for mod in merged.modules:
            sub = pipe.transformer.get_submodule(mod)
            sub = getattr(sub, "base_layer", sub)  # diffusers wraps LoRA-carrying Linears
            torch.testing.assert_close(sub.weight.detach(), want[mod + ".weight"], atol=1e-5, rtol=1e-5)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    for n, p in pipe.transformer.named_parameters():
        torch.testing.assert_close(p.detach(), base[n], atol=1e-6, rtol=0)


def test_write_model_saves_fused_weights_and_restores_memory(tmp_path, llama_vectors):
    from transformers import AutoModelForCausalLM

    model, vecs = llama_vectors
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = merge(vecs, "dare_ties", [1.0, 1.0, 1.0], density=0.5, seed=1)
    want = _fused_weights(model, merged)
    write_model(model, merged, tmp_path / "full", metadata={"merge": merged.meta["merge"]})
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # in memory: the base, bit for bit
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    for n, p in again.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], atol=0, rtol=0)
    assert json.loads((tmp_path / "full" / "devec_merge.json").read_text())["merge"]["params"]["seed"] == 1


# --- the CLI ------------------------------------------------------------------------------------
@pytest.fixture
def peft_inputs(tmp_path):
    model, _ = tiny_llama(0)
    paths = []
    for s in (1, 2, 3):
        sd = random_llama_lora(model, rank=4, seed=s)
        paths.append(str(_peft_folder(tmp_path / f"task{s}", sd, r=4, lora_alpha=4)))
    return model, paths


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_mix_writes_a_peft_folder_equal_to_the_library_merge(tmp_path, peft_inputs, capsys):
    from peft import PeftModel

    model, paths = peft_inputs
    out = tmp_path / "mixed"
    code, stdout, err = _run(["mix", *paths, "--method", "dare_ties", "--coef", "0.5", "1", "0.7", "--density", "0.6",
                              "--seed", "3", "--out", str(out)], capsys)
    assert code == 0, err
    assert "dare_ties" in stdout and "exact" in stdout
    meta = read_devec_metadata(out)
    assert meta["merge"]["weights"] == {"task1": 0.5, "task2": 1.0, "task3": 0.7}
    assert meta["merge"]["params"]["seed"] == 3 and meta["config"]["method"] == "dare_ties"
    merged = merge(load_pool(paths), "dare_ties", [0.5, 1, 0.7], density=0.6, seed=3)
    want = _fused_weights(model, merged)
    got = dict(PeftModel.from_pretrained(copy.deepcopy(model), str(out)).merge_and_unload().named_parameters())
    for n, p in want.items():
        torch.testing.assert_close(got[n].detach(), p, atol=1e-5, rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_cli_mix_devec_compressed_and_from_yaml(tmp_path, peft_inputs, capsys):
    _, paths = peft_inputs
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("method: devec\nweights: {task1: 1.0, task2: 0.5, task3: 0.5}\npair_weights: 0.3\nparams: {tau: 0.5}\n")
    code, stdout, err = _run(["mix", *paths, "--config", str(cfg), "--rank", "2", "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    assert "rank 2" in stdout
    meta = read_devec_metadata(tmp_path / "d")
    assert meta["merge"]["method"] == "devec" and meta["merge"]["pair_weights"]["task1+task2"] == 0.3
    assert meta["merge"]["params"]["tau"] == 0.5 and 0 < meta["lora"]["relative_error"] < 1


def test_cli_mix_full_model(tmp_path, peft_inputs, capsys):
    from transformers import AutoModelForCausalLM

    model, paths = peft_inputs
    _tiny_llama_dir(tmp_path / "base")
    code, _, err = _run(["mix", *paths, "--method", "ties", "--density", "0.3", "--format", "model", "--base",
                         str(tmp_path / "base"), "--out", str(tmp_path / "full")], capsys)
    assert code == 0, err
    want = _fused_weights(model, merge(load_pool(paths), "ties", 1.0, density=0.3))
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    for n, p in got.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("argv,msg", [
    (["--method", "ties", "--seed", "1"], "takes no parameter(s) ['seed']"),
    (["--method", "ties", "--density", "1.5"], "density must be in [0, 1]"),
    (["--coef", "1", "2"], "2 coefficients for 3"),
    (["--coef", "a=1", "2"], "--coef"),
    (["--method", "ties", "--pair-coef", "1"], "DeVec methods only"),
    (["--format", "model"], "needs --base"),
])
def test_cli_mix_bad_input_fails_cleanly(tmp_path, peft_inputs, capsys, argv, msg):
    _, paths = peft_inputs
    out = tmp_path / "never"
    code, _, err = _run(["mix", *paths, *argv, "--out", str(out)], capsys)
    assert code == 1 and msg in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_cli_mix_flux_full_model_writes_the_fused_transformer(tmp_path, capsys):
    from diffusers import FluxTransformer2DModel

    from tests.tiny_models import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "base")
    paths = []
    for s in (1, 2):
        p = tmp_path / f"style{s}.safetensors"
        save_file(random_flux_lora(pipe.transformer, rank=4, seed=s), str(p))
        paths.append(str(p))
    code, _, err = _run(["mix", *paths, "--method", "devec_ties", "--density", "0.5", "--coef", "1", "0.5", "--format", "model",
                         "--base", str(tmp_path / "base"), "--out", str(tmp_path / "full")], capsys)
    assert code == 0, err
    merged = merge(load_pool(paths), "devec_ties", [1.0, 0.5], density=0.5)
    want = _fused_weights(pipe.transformer, merged)
    got = FluxTransformer2DModel.from_pretrained(str(tmp_path / "full"))
    for n, p in got.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], atol=1e-6, rtol=1e-6)
    assert json.loads((tmp_path / "full" / "devec_merge.json").read_text())["merge"]["method"] == "devec_ties"
