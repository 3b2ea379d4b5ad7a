"""devec_core.formats: every input format → TaskVector, scaling folded in, bad inputs refused."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from devec_core import decompose
from devec_core.formats import (
    CheckpointReader,
    FormatError,
    iter_checkpoint_deltas,
    load_pool,
    load_task_vector,
    module_report,
)
from devec_core.taskvec import Dense
from tests.tiny_models import dora_folder, random_flux_lora, random_llama_lora, tiny_llama
from tests.tiny_models import peft_folder as _peft_folder

PEFT = "base_model.model."


def _ab(sd, prefix, mod):
    return sd[f"{prefix}{mod}.lora_B.weight"], sd[f"{prefix}{mod}.lora_A.weight"]


# --- formats ----------------------------------------------------------------------------------


def test_diffusers_flux_lora_loads(tmp_path, tiny_flux):
    sd = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    save_file(sd, str(tmp_path / "style.safetensors"))
    tv = load_task_vector(tmp_path / "style.safetensors")
    assert tv.name == "style" and tv.meta["format"] == "diffusers" and tv.meta["family"] == "flux"
    assert set(tv.modules) == {k[len("transformer.") : -len(".lora_A.weight")] for k in sd if "lora_A" in k}
    d = tv.modules["transformer_blocks.0.attn.to_q"]
    assert d.scale == 1.0
    torch.testing.assert_close(d.B, sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"])


def test_diffusers_alpha_keys_and_bare_keys(tmp_path, tiny_flux):
    sd = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    mod = "transformer_blocks.0.attn.to_q"
    with_alpha = dict(sd, **{f"transformer.{mod}.alpha": torch.tensor(2.0)})
    save_file(with_alpha, str(tmp_path / "a.safetensors"))
    tv = load_task_vector(tmp_path / "a.safetensors")
    assert tv.modules[mod].scale == pytest.approx(0.5)  # alpha / r
    assert tv.modules["transformer_blocks.0.attn.to_k"].scale == 1.0
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    assert set(load_task_vector(tmp_path / "bare.safetensors").modules) == set(tv.modules)


def test_peft_folder_alpha_over_r_rslora_and_patterns(tmp_path, tiny_llm):
    sd = random_llama_lora(tiny_llm[0], rank=4, seed=1)
    tv = load_task_vector(_peft_folder(tmp_path / "a", sd, r=4, lora_alpha=8))
    assert set(tv.modules) == {k[len(PEFT) : -len(".lora_A.weight")] for k in sd if "lora_A" in k}
    assert tv.meta["format"] == "peft" and tv.meta["family"] == "llm"
    assert tv.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(2.0)  # 8 / 4
    tv = load_task_vector(_peft_folder(tmp_path / "b", sd, r=4, lora_alpha=8, use_rslora=True))
    assert tv.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(4.0)  # 8 / √4
    tv = load_task_vector(_peft_folder(tmp_path / "c", sd, r=4, lora_alpha=8, alpha_pattern={"v_proj": 2}))
    assert tv.modules["model.layers.1.self_attn.v_proj"].scale == pytest.approx(0.5)
    assert tv.modules["model.layers.1.self_attn.k_proj"].scale == pytest.approx(2.0)
    # the adapter file alone (no config): PEFT naming still recognised, scale 1
    tv = load_task_vector(tmp_path / "a" / "adapter_model.safetensors", "solo")
    assert tv.name == "solo" and set(tv.modules) == set(load_task_vector(tmp_path / "a").modules)


def test_scaling_matches_peft_forward(tmp_path, tiny_llm):
    """Folded scale = what PEFT applies: merged weights − base == scale·B@A (alpha/r and rsLoRA)."""
    from peft import PeftModel

    model, _ = tiny_llama(seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = random_llama_lora(model, rank=4, seed=3)
    for i, cfg in enumerate(({"r": 4, "lora_alpha": 6}, {"r": 4, "lora_alpha": 6, "use_rslora": True})):
        folder = _peft_folder(tmp_path / f"s{i}", sd, **cfg)
        tv = load_task_vector(folder)
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        for mod, d in tv.modules.items():
            got = dict(merged.named_modules())[mod].weight.detach() - base[mod + ".weight"]
            torch.testing.assert_close(got, d.dense(), atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            for n, p in merged.named_parameters():
                p.copy_(base[n])
        model = merged


def _kohya_real_shapes(path, rank=4, alpha=2.0, seed=0):
    """A kohya/sd-scripts FLUX LoRA at FLUX.1's real shapes, a few blocks' worth of keys."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n, m) in {
        "double_blocks_0_img_attn_qkv": (9216, 3072),
        "double_blocks_0_img_mlp_0": (12288, 3072),
        "single_blocks_0_linear1": (21504, 3072),
        "single_blocks_0_linear2": (3072, 15360),
    }.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, m, generator=g) * 0.01
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(n, rank, generator=g) * 0.01
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return sd


def test_kohya_real_shapes_through_diffusers_converter(tmp_path):
    sd = _kohya_real_shapes(tmp_path / "k.safetensors", rank=4, alpha=2.0)
    tv = load_task_vector(tmp_path / "k.safetensors")
    assert tv.meta["format"] == "kohya" and tv.meta["base_model"].startswith("FLUX.1")
    assert tv.modules["transformer_blocks.0.attn.to_k"].shape == (3072, 3072)
    assert tv.modules["single_transformer_blocks.0.proj_out"].shape == (3072, 15360)
    up, down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    expect = 0.5 * up[3072:6144] @ down  # alpha / r = 2 / 4, rows of k in the fused qkv
    torch.testing.assert_close(tv.modules["transformer_blocks.0.attn.to_k"].dense(), expect, atol=1e-9, rtol=1e-4)
    up, down = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"], sd["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    torch.testing.assert_close(tv.modules["single_transformer_blocks.0.proj_mlp"].dense(), 0.5 * up[9216:] @ down, atol=1e-9, rtol=1e-4)


def _tiny_llama_dir(path, seed=0, perturb=None, shard=None):
    model, _ = tiny_llama(seed=seed)
    if perturb is not None:
        g = torch.Generator().manual_seed(perturb)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layers.0" in n or n == "model.norm.weight":
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_full_checkpoint_pair_streams_one_module_at_a_time(tmp_path):
    base = _tiny_llama_dir(tmp_path / "base")
    ft1 = _tiny_llama_dir(tmp_path / "ft1", perturb=1, shard="40KB")  # sharded: index.json
    ft2 = _tiny_llama_dir(tmp_path / "ft2", perturb=2)
    assert (tmp_path / "ft1" / "model.safetensors.index.json").exists()

    # The stream reads one parameter from the base and each fine-tune, then yields: (k + 1) reads per step
    readers = [CheckpointReader(tmp_path / "ft1"), CheckpointReader(tmp_path / "ft2")]
    b = CheckpointReader(tmp_path / "base")
    stream = iter_checkpoint_deltas(readers, b)
    for step in range(1, 6):
        key, deltas = next(stream)
        assert len(b.reads) == step and all(len(r.reads) == step for r in readers)
        assert {r.reads[-1][1] for r in readers} == {key} == {b.reads[-1][1]}

    vecs = load_pool([tmp_path / "ft1", tmp_path / "ft2"], base=tmp_path / "base")
    assert [v.name for v in vecs] == ["ft1", "ft2"] and vecs[0].meta["format"] == "checkpoint"
    mod = "model.layers.0.self_attn.q_proj"
    assert isinstance(vecs[0].modules[mod], Dense)
    torch.testing.assert_close(vecs[0].modules[mod].W, ft1[mod + ".weight"] - base[mod + ".weight"])
    assert "model.layers.1.self_attn.q_proj" not in vecs[0].modules  # unchanged → dropped
    assert "model.norm.weight" in vecs[0].extras
    dec = decompose(vecs, tau=0.85, dense_rank=4)
    for v in vecs:
        for m, d in dec.component("unique", v.name).items():
            s = dec.component("shared", v.name)[m]
            torch.testing.assert_close(d.dense() + s.dense(), v.modules[m].dense(), atol=1e-5, rtol=1e-4)
    with pytest.raises(FormatError, match="full checkpoint.*--base"):
        load_task_vector(tmp_path / "ft2")


def test_dora_dense_delta_equals_peft_merge(tmp_path):
    model, _ = tiny_llama(seed=0)
    model.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    folder, merged = dora_folder(model, tmp_path / "dora", targets=("q_proj", "v_proj"))
    with pytest.raises(FormatError, match="DoRA.*base"):
        load_task_vector(folder)
    tv = load_task_vector(folder, base=tmp_path / "base")
    assert tv.meta["dora"] and all(isinstance(d, Dense) for d in tv.modules.values())
    for mod, d in tv.modules.items():
        got = merged[mod + ".weight"] - base[mod + ".weight"]
        torch.testing.assert_close(d.W, got, atol=1e-5, rtol=1e-4)


# --- scaling and pools ----------------------------------------------------------------------


def test_negative_alpha_and_negated_vectors(tmp_path, tiny_llm):
    sd = random_llama_lora(tiny_llm[0], rank=4, seed=1)
    neg = load_task_vector(_peft_folder(tmp_path / "neg", sd, r=4, lora_alpha=-4))
    pos = load_task_vector(_peft_folder(tmp_path / "pos", sd, r=4, lora_alpha=4))
    assert neg.modules["model.layers.0.self_attn.q_proj"].scale == -1.0
    other = load_task_vector(_peft_folder(tmp_path / "o", random_llama_lora(tiny_llm[0], rank=4, seed=2), r=4, lora_alpha=4))
    neg.name = pos.name = "v"
    d_neg, d_pos = decompose([neg, other], tau=0.3), decompose([pos, other], tau=0.3)
    for m, u in d_pos.component("unique", "v").items():  # sign goes through unchanged
        torch.testing.assert_close(d_neg.component("unique", "v")[m].dense(), -u.dense(), atol=1e-5, rtol=1e-4)


def test_mixed_ranks_in_one_pool(tmp_path, tiny_llm):
    a = load_task_vector(_peft_folder(tmp_path / "r4", random_llama_lora(tiny_llm[0], rank=4, seed=1), r=4, lora_alpha=4))
    b = load_task_vector(_peft_folder(tmp_path / "r8", random_llama_lora(tiny_llm[0], rank=8, seed=2), r=8, lora_alpha=16))
    assert b.modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    dec = decompose([a, b], tau=0.3)
    u = dec.component("unique", "r8")["model.layers.0.self_attn.q_proj"]
    assert u.rank == 8
    s = dec.component("shared", "r8")["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(u.dense() + s.dense(), b.modules["model.layers.0.self_attn.q_proj"].dense(), atol=1e-5, rtol=1e-4)


def test_pool_of_one_returns_the_vector_as_unique(tmp_path, tiny_flux):
    save_file(random_flux_lora(tiny_flux.transformer, rank=4, seed=1), str(tmp_path / "one.safetensors"))
    (v,) = load_pool([tmp_path / "one.safetensors"])
    dec = decompose([v])
    for m, u in dec.component("unique", "one").items():
        torch.testing.assert_close(u.dense(), v.modules[m].dense(), atol=0, rtol=0)
    assert set(dec.component("unique", "one")) == set(v.modules)


def test_module_report(tmp_path, tiny_llm):
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    a = load_task_vector(_peft_folder(tmp_path / "a", random_llama_lora(tiny_llm[0], seed=1), r=4, lora_alpha=4))
    b = load_task_vector(_peft_folder(tmp_path / "b", random_llama_lora(tiny_llm[0], seed=2, modules=mods), r=4, lora_alpha=4,
                                      target_modules=["q_proj"]))
    rep = module_report([a, b])
    assert rep["model.layers.0.self_attn.q_proj"] == ["a", "b"] and rep["model.layers.0.mlp.up_proj"] == ["a"]


# --- bad inputs -----------------------------------------------------------------------------


def test_pickled_refused_unless_flag_then_weights_only(tmp_path, tiny_llm):
    sd = random_llama_lora(tiny_llm[0], rank=4, seed=1)
    torch.save(sd, tmp_path / "lora.bin")
    for suffix in (".bin", ".pt", ".ckpt"):
        p = tmp_path / f"lora{suffix}"
        if not p.exists():
            torch.save(sd, p)
        with pytest.raises(FormatError, match=r"pickled file.*refused.*allow_pickle"):
            load_task_vector(p)
    tv = load_task_vector(tmp_path / "lora.bin", allow_pickle=True, alpha=4)
    assert len(tv.modules) == len(sd) // 2

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(FormatError, match="weights_only=True"):
        load_task_vector(tmp_path / "evil.pt", allow_pickle=True)


def test_truncated_and_corrupt_safetensors(tmp_path, tiny_flux):
    save_file(random_flux_lora(tiny_flux.transformer, rank=4, seed=1), str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x07" * 64)
    for name in ("trunc", "junk"):
        with pytest.raises(FormatError, match=rf"{name}\.safetensors.*truncated or corrupt") as err:
            load_task_vector(tmp_path / f"{name}.safetensors")
        assert err.value.__cause__ is not None  # the reader's own error stays attached


def test_a_bug_while_reading_is_not_reported_as_a_bad_file(tmp_path, tiny_flux, monkeypatch):
    """Only what a broken file raises becomes a FormatError; a bug elsewhere keeps its own type."""
    import devec_core.formats.files as files

    save_file(random_flux_lora(tiny_flux.transformer, rank=4, seed=1), str(tmp_path / "ok.safetensors"))

    def broken(*a, **k):
        raise TypeError("a bug, not a file problem")

    monkeypatch.setattr(files, "safe_open", broken)
    with pytest.raises(TypeError, match="a bug"):
        load_task_vector(tmp_path / "ok.safetensors")


def test_unknown_layout_lists_keys(tmp_path):
    save_file({"foo.weird_down": torch.zeros(2, 2), "foo.weird_up": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(FormatError, match=r"w\.safetensors.*no LoRA keys.*foo\.weird_down.*--base"):
        load_task_vector(tmp_path / "w.safetensors")  # no LoRA keys: looks like a checkpoint, needs --base
    save_file({"foo.lora_A.weight": torch.zeros(2, 2), "foo.lora_B.weight": torch.zeros(2, 2), "foo.mystery": torch.zeros(3)},
              str(tmp_path / "m.safetensors"))
    with pytest.raises(FormatError, match=r"unknown key layout.*'foo.mystery'"):
        load_task_vector(tmp_path / "m.safetensors")


def test_different_base_models_name_module_and_shapes(tmp_path, tiny_flux, tiny_llm):
    from tests.tiny_models import _random_lora

    save_file(random_flux_lora(tiny_flux.transformer, rank=4, seed=1), str(tmp_path / "a.safetensors"))
    bigger = {"transformer_blocks.0.attn.to_q": (64, 64)}
    save_file(_random_lora(bigger, 4, 2, 0.1, "transformer."), str(tmp_path / "b.safetensors"))
    with pytest.raises(FormatError, match=r"transformer_blocks\.0\.attn\.to_q.*\(64, 64\).*\(32, 32\)|\(32, 32\).*\(64, 64\)"):
        load_pool([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    llm = _peft_folder(tmp_path / "llm", random_llama_lora(tiny_llm[0], seed=1), r=4, lora_alpha=4)
    with pytest.raises(FormatError, match="different base models"):
        load_pool([tmp_path / "a.safetensors", llm])


def test_nan_inf_named(tmp_path, tiny_flux):
    sd = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    sd["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"][3, 1] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(FormatError, match=r"nan\.safetensors.*transformer_blocks\.0\.attn\.to_v.*nan"):
        load_task_vector(tmp_path / "nan.safetensors")
    sd["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"][3, 1] = float("inf")
    save_file(sd, str(tmp_path / "inf.safetensors"))
    with pytest.raises(FormatError, match="inf"):
        load_pool([tmp_path / "inf.safetensors"])


def test_empty_pool_and_duplicates(tmp_path, tiny_flux):
    with pytest.raises(FormatError, match="empty pool"):
        load_pool([])
    sd = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(sd, str(tmp_path / "copy.safetensors"))
    with pytest.raises(FormatError, match=r"a\.safetensors.*duplicate input"):
        load_pool([tmp_path / "a.safetensors", tmp_path / "a.safetensors"])
    with pytest.raises(FormatError, match=r"copy\.safetensors.*duplicate input \(same content"):
        load_pool([tmp_path / "a.safetensors", tmp_path / "copy.safetensors"])


def test_missing_path_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(FormatError, match="no such file"):
        load_task_vector(tmp_path / "nope.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FormatError, match="someone/some-lora.*Hub could not provide it"):
        load_task_vector("someone/some-lora")


def _fake_hub_cache(root, repo_id, files: dict):
    """A Hub cache folder as huggingface_hub lays it out (refs/main → snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(snap / name)
    return snap


def test_hub_ids_resolve_from_the_local_cache_offline(tmp_path, monkeypatch, tiny_flux, tiny_llm):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    flux_sd = random_flux_lora(tiny_flux.transformer, rank=4, seed=1)
    _fake_hub_cache(tmp_path / "hub", "someone/flux-style", {"style.safetensors": lambda p: save_file(flux_sd, str(p))})
    tv = load_task_vector("someone/flux-style/style.safetensors")
    assert tv.meta["family"] == "flux" and tv.name == "style" and tv.meta["input"] == "someone/flux-style/style.safetensors"
    src = _peft_folder(tmp_path / "src", random_llama_lora(tiny_llm[0], seed=1), r=4, lora_alpha=8)
    _fake_hub_cache(tmp_path / "hub", "someone/llm-adapter", {
        n: (lambda p, n=n: p.write_bytes((src / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")
    })
    tv = load_task_vector("someone/llm-adapter")
    assert tv.meta["format"] == "peft" and tv.name == "llm-adapter"
    assert tv.modules["model.layers.0.self_attn.q_proj"].scale == 2.0
