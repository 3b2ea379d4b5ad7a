"""devec_core.export: exported unique/shared parts load in diffusers and PEFT and equal the engine's parts."""

import pytest
import torch
from safetensors.torch import save_file

from devec_core import METHOD_VERSION, decompose
from devec_core.export import export_decomposition, read_devec_metadata, to_lowrank
from devec_core.formats import load_pool
from devec_core.taskvec import Dense, LowRank
from tests.tiny_models import LLAMA_TARGETS, random_llama_lora, shared_flux_pair, tiny_flux_pipeline, tiny_llama


def _dense(d):
    return d.dense(torch.float32)


def test_flux_export_loads_in_diffusers_and_equals_parts(tmp_path):
    pipe = tiny_flux_pipeline(seed=0)  # private copy: we fuse into it
    vecs = load_pool(shared_flux_pair(pipe.transformer, tmp_path))
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


def test_unique_stems_never_collide():
    from devec_core.export import safe_filename, unique_stems

    assert safe_filename("x y") == safe_filename("x_y") == "x_y"  # lossy: unique_stems settles it
    assert safe_filename(".") == safe_filename("..") == "vector"
    assert len(safe_filename("é" * 300).encode()) <= 120
    stems = unique_stems(["u-x_y", "u-x_y", "u-X_Y", "u-x_y-2"], exact=[False, True, True, True])
    assert stems[1] == "u-x_y" and stems[3] == "u-x_y-2"  # exact names keep theirs
    assert len({s.casefold() for s in stems}) == 4


def _tiny_pool(names):
    from devec_core import TaskVector

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(8, 1, generator=g)
    return [TaskVector(n, {"m": LowRank(torch.cat([shared, torch.randn(8, 2, generator=g)], 1), torch.randn(3, 6, generator=g))})
            for n in names]


@pytest.mark.parametrize("names", [["x y", "x_y"], [".", ".."], ["a", "A"]])
def test_export_names_are_unique_and_recorded(tmp_path, names):
    from devec_core.export import write_parts

    dec = decompose(_tiny_pool(names), tau=0.85)
    parts = write_parts(dec, tmp_path)
    uniques = [p for p in parts if p.component == "unique"]
    assert [p.vector for p in uniques] == names
    assert len({p.path.name.lower() for p in parts}) == len(parts) == 3
    for p in uniques:
        assert read_devec_metadata(p.path)["vector"] == p.vector
        got = load_file_pairs(p.path)
        torch.testing.assert_close(got["m"], dec.component("unique", p.vector)["m"].dense(), atol=1e-6, rtol=1e-5)
    assert any("renamed" in p.record() for p in parts)


def load_file_pairs(path):
    from safetensors.torch import load_file

    sd = load_file(str(path))
    return {k[len("transformer."):-len(".lora_A.weight")]: sd[k.replace("lora_A", "lora_B")] @ sd[k] for k in sd if "lora_A" in k}


def test_pairs_are_addressed_by_names_not_by_a_joined_string(tmp_path):
    from devec_core.export import write_parts

    from devec_core import TaskVector

    names = ["a", "b+c", "a+b", "c"]
    pairs_idx = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(16, 6, generator=g)  # one direction per pair: every pair's part differs
    pool = [TaskVector(n, {"m": LowRank(torch.cat([dirs[:, [k for k, pr in enumerate(pairs_idx) if i in pr]],
                                                   torch.randn(16, 1, generator=g)], 1), torch.randn(4, 6, generator=g))})
            for i, n in enumerate(names)]
    dec = decompose(pool, tau=0.85, mode="pairwise")
    with pytest.raises(ValueError, match="ambiguous"):
        dec.component("pair_shared", "a+b+c")
    pairs = [p for p in write_parts(dec, tmp_path) if p.component == "pair_shared"]
    assert sorted(p.pair for p in pairs) == sorted((a, b) for i, a in enumerate(names) for b in names[i + 1 :])
    assert len({p.path.name for p in pairs}) == 6
    parts = [dec.component("pair_shared", p.pair)["m"].dense() for p in pairs]
    assert all(not torch.allclose(x, y, atol=1e-3) for i, x in enumerate(parts) for y in parts[i + 1 :])
    for p in pairs:
        assert read_devec_metadata(p.path)["pair"] == list(p.pair)
        want = dec.component("pair_shared", p.pair)["m"].dense()
        torch.testing.assert_close(load_file_pairs(p.path).get("m", torch.zeros_like(want)), want, atol=1e-6, rtol=1e-5)
    assert dec.component("pair_shared", ("c", "a"))["m"].dense().equal(dec.component("pair_shared", ("a", "c"))["m"].dense())
