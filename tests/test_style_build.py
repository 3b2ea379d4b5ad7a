"""The style demo's builder on a seconds-long configuration: stages, caching, exported LoRA files."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.style import build as B  # noqa: E402
from devec_core import toy_flux as TF  # noqa: E402


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("style_small")
    rep = B.build(out, B.SMALL, threads=1)
    return out, rep


def test_concat_loras_is_the_exact_sum():
    g = torch.Generator().manual_seed(0)
    p = {"m.lora_A.weight": torch.randn(2, 5, generator=g), "m.lora_B.weight": torch.randn(4, 2, generator=g)}
    c = {"m.lora_A.weight": torch.randn(3, 5, generator=g), "m.lora_B.weight": torch.randn(4, 3, generator=g)}
    s = B.concat_loras([p, c])
    want = p["m.lora_B.weight"] @ p["m.lora_A.weight"] + c["m.lora_B.weight"] @ c["m.lora_A.weight"]
    assert s["m.lora_A.weight"].shape == (5, 5)
    torch.testing.assert_close(s["m.lora_B.weight"] @ s["m.lora_A.weight"], want)


def test_caption_language():
    assert TF.caption("house", "red", "big", "left") == "a big red house on the left"
    assert TF.caption("cup", "blue", None, "top") == "a blue cup at the top"
    assert TF.caption("star", "green", "small", "middle") == "a small green star in the middle"
    with pytest.raises(ValueError, match="place"):
        TF.caption("star", "green", None, "nowhere")
    tok = TF.build_tokenizer()
    for text in ("a small purple fish at the bottom", "a big red house on the left"):
        ids = tok(text)["input_ids"]
        assert len(ids) <= TF.MAX_TOKENS and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids


def test_vae_stand_in_is_exact():
    vae = TF.PixelUnshuffleVAE()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 12, 16, 16)
    torch.testing.assert_close(vae.decode(z, return_dict=False)[0], x)


@pytest.mark.slow
def test_small_build_writes_every_stage(small_build):
    out, rep = small_build
    for stage in B.STAGES:
        assert stage in rep, stage
    assert TF.is_toy_flux(out / "model")
    assert (out / "classifier.safetensors").exists()
    assert 0.0 <= rep["check"]["class_accuracy"] <= 1.0 and rep["check"]["n"] == len(TF.CLASSES)
    for name in B.SMALL["styles"]:
        assert (out / "loras" / f"{name}.safetensors").exists(), name
        assert (out / "refs" / f"{name}.png").exists(), name
    assert (out / "refs" / "base.png").exists()
    saved = json.loads((out / "build.json").read_text())
    assert saved["config_hash"] == B.config_hash(B.SMALL)
    # the model renders 32×32 images through FluxPipeline
    pipe = TF.load_model(out / "model")
    im = TF.generate(pipe, ["a red house", "a blue boat"], [0, 1], steps=2)
    assert im.shape == (2, 3, 32, 32) and float(im.min()) >= 0 and float(im.max()) <= 1


@pytest.mark.slow
def test_lora_files_load_through_formats_and_diffusers(small_build):
    from devec_core.formats import load_task_vector
    from devec_core.mix import VectorPool, vanilla
    from devec_core.backends.flux import FluxBackend

    out, _ = small_build
    r = B.SMALL["lora"]["rank"]
    parent = load_task_vector(str(out / "loras" / "storybook.safetensors"))
    child = load_task_vector(str(out / "loras" / "palette.safetensors"))
    assert parent.meta["family"] == "flux"
    mod = "transformer_blocks.0.attn.to_q"
    assert mod in parent.modules and mod in child.modules
    pa, ca = parent.modules[mod], child.modules[mod]
    assert pa.rank == r and ca.rank == 2 * r  # the child file holds parent ⊕ child factors
    # the child's first r factors are the parent's (same direction in weight space)
    torch.testing.assert_close(ca.A[:r].float(), pa.A.float())
    # diffusers loads the file too
    pipe = TF.load_model(out / "model")
    pipe.load_lora_weights(str(out / "loras" / "palette.safetensors"), adapter_name="palette")
    pipe.unload_lora_weights()
    # and the project's backend fuses it: a different image, then bit-identical base back
    be = FluxBackend(TF.load_model(out / "model"))
    w0 = be.pipe.transformer.get_submodule(mod).weight.detach().clone()
    be.apply(vanilla(VectorPool([child]), {child.name: 1.0}))
    assert not torch.equal(be.pipe.transformer.get_submodule(mod).weight, w0)
    be.restore()
    assert torch.equal(be.pipe.transformer.get_submodule(mod).weight, w0)


@pytest.mark.slow
def test_build_is_cached_and_refuses_another_config(small_build):
    out, _ = small_build
    files = [out / "model" / "transformer" / "diffusion_pytorch_model.safetensors", out / "loras" / "palette.safetensors", out / "classifier.safetensors"]
    before = {f: f.stat().st_mtime_ns for f in files}
    B.build(out, B.SMALL, threads=1)
    assert {f: f.stat().st_mtime_ns for f in files} == before  # nothing retrained
    other = json.loads(json.dumps(B.SMALL))
    other["lora"]["steps"] += 1
    with pytest.raises(RuntimeError, match="different configuration"):
        B.build(out, other, threads=1)
    with pytest.raises(ValueError, match="stage"):
        B.build(out, B.SMALL, threads=1, only=["nonsense"])


@pytest.mark.slow
def test_base_training_resumes_from_its_checkpoint(tmp_path):
    """Interrupt after the first checkpoint: a second run continues from it and ends with the same weights."""
    cfg = json.loads(json.dumps(B.SMALL))
    imgs, _, labels = B.D.scenes(cfg["n_data"], seed=cfg["seed"])
    full = tmp_path / "full"
    (full / ".work").mkdir(parents=True)
    B.stage_base(cfg, full, imgs, labels)
    part = tmp_path / "part"
    (part / ".work").mkdir(parents=True)
    half = json.loads(json.dumps(cfg))
    half["base"]["steps"] = cfg["base"]["ckpt_every"]
    B.stage_base(half, part, imgs, labels)  # writes a checkpoint at step ckpt_every and a model
    st = torch.load(part / ".work" / "base_ckpt.pt", weights_only=True)
    assert st["step"] == cfg["base"]["ckpt_every"]
    import shutil

    shutil.rmtree(part / "model")  # as if killed before the end
    B.stage_base(cfg, part, imgs, labels)
    a = TF.load_model(full / "model").transformer.state_dict()
    b = TF.load_model(part / "model").transformer.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.slow
def test_evaluate_runs_on_the_small_build(small_build, tmp_path):
    """The evaluation end to end on the small build: spectra, mixes, measures, files."""
    from demo.style import evaluate as E

    out, _ = small_build
    res = tmp_path / "results"
    assert E.main(["--assets", str(out), "--out", str(res), "--cache", str(tmp_path / "cache"), "--family", "palette,stripes",
                   "--seeds", "1", "--threads", "1"]) == 0
    rep = json.loads((res / "results.json").read_text())
    for f in rep["files"]:
        assert (res / f).is_file(), f
    fam = rep["spectrum"]["family (palette, stripes)"]
    # both children hold the parent's factors: every module shares at least the parent's rank
    assert fam["modules_with_shared"] == fam["modules"] and fam["mean_shared_dim"] >= B.SMALL["lora"]["rank"]
    r = rep["results"]
    assert {"palette+stripes|vanilla_1", "palette+stripes|vanilla_1/k", "palette+stripes|devec_s1", "mono+neon|devec_s1"} <= set(r)
    assert "parent" in r["palette+stripes|vanilla_1"] and "parent" not in r["mono+neon|vanilla_1"]
    for k in ("content", "clipped", "hf_energy"):
        d = r["palette+stripes|devec_s1"][k]
        assert d["lo"] <= d["mean"] <= d["hi"]
    assert set(rep["auroc"]) >= {"palette", "stripes", "mono", "neon", "storybook"}


def test_refine_lr_schedule_is_warmup_then_cosine():
    """Written from the definition: linear warm-up to lr, then a half cosine from lr to lr_end."""
    c = {"steps": 110, "warmup": 10, "lr": 1e-3, "lr_end": 1e-4}
    assert B._lr_at(c, 0) == pytest.approx(1e-4)  # (0 + 1) / 10 of lr
    assert B._lr_at(c, 9) == pytest.approx(1e-3)
    assert B._lr_at(c, 10) == pytest.approx(1e-3)  # cosine starts at lr
    assert B._lr_at(c, 60) == pytest.approx(0.55e-3)  # half way: the mean of lr and lr_end
    assert B._lr_at(c, 110) == pytest.approx(1e-4)
    lrs = [B._lr_at(c, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.slow
def test_refine_starts_from_phase_one_and_resumes(tmp_path, monkeypatch):
    """Refine continues from phase 1's model (not from scratch), changes it, and an interrupted
    refine resumes from its checkpoint to the same weights as an uninterrupted one."""
    cfg = json.loads(json.dumps(B.SMALL))
    # the checkpoint is written after the cosine part has begun: its lr must still load with
    # weights_only=True (a numpy scalar from np.cos made the real build's checkpoint unloadable)
    cfg["refine"]["warmup"] = 1
    imgs, _, labels = B.D.scenes(cfg["n_data"], seed=cfg["seed"])

    def run(folder, interrupt=False):
        (folder / ".work").mkdir(parents=True)
        B.stage_base(cfg, folder, imgs, labels)
        if interrupt:
            real = B._atomic_torch_save

            def save_then_die(obj, path):
                real(obj, path)
                if Path(path).name == "refine_ckpt.pt":
                    raise KeyboardInterrupt

            monkeypatch.setattr(B, "_atomic_torch_save", save_then_die)
            with pytest.raises(KeyboardInterrupt):
                B.stage_refine(cfg, folder, imgs, labels)
            monkeypatch.setattr(B, "_atomic_torch_save", real)
            assert torch.load(folder / ".work" / "refine_ckpt.pt", weights_only=True)["step"] == cfg["refine"]["ckpt_every"]
            assert not (folder / ".work" / "refine.json").exists()
        return B.stage_refine(cfg, folder, imgs, labels)

    full, part = tmp_path / "full", tmp_path / "part"
    info = run(full)
    assert info["steps"] == cfg["refine"]["steps"]
    start = TF.load_model(full / ".work" / "base1").transformer.state_dict()
    a = TF.load_model(full / "model").transformer.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # refine changed phase 1's weights
    run(part, interrupt=True)
    b = TF.load_model(part / "model").transformer.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # cached: a second call returns the saved info and does not retrain
    mt = (full / "model" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert B.stage_refine(cfg, full, imgs, labels) == info
    assert (full / "model" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mt


def test_refine_with_zero_steps_leaves_the_model_alone(tmp_path):
    cfg = json.loads(json.dumps(B.SMALL))
    cfg["refine"]["steps"] = 0
    (tmp_path / ".work").mkdir()
    assert B.stage_refine(cfg, tmp_path, None, None) == {"seconds": 0.0, "steps": 0}
    assert not (tmp_path / "model").exists() and not (tmp_path / ".work" / "base1").exists()
