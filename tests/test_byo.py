"""Bring your own task vectors: uploads with their metadata, DoRA and full checkpoints against the
tab's loaded base model, dense deltas cut to factors as they are read, resized vocabularies,
safe zips. References come from PEFT's own merge (``merge_and_unload``) and from full SVDs."""

import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devec_core import studio
from devec_core.formats import (
    FormatError,
    ModuleWeights,
    cut_dense,
    extract_zip,
    load_pool,
    load_task_vector,
    zip_vectors,
)
from devec_core.mix import vanilla
from devec_core.studio import StudioError
from devec_core.taskvec import LowRank, TaskVector
from tests.tiny_models import dora_folder, random_llama_lora, tiny_llama
from tests.tiny_models import peft_folder as _peft_folder

PEFT = "base_model.model."


def _zip(folder):
    return shutil.make_archive(str(folder), "zip", root_dir=folder)


@pytest.fixture
def tiny_base():
    """A private tiny Llama registered as the Studio's loaded base model "tiny-base" (removed after)."""
    from devec_core.backends.llm import LLMBackend

    model, tok = tiny_llama(seed=0)
    be = LLMBackend(model, tok)
    studio._BACKENDS[("llm", "tiny-base")] = be
    yield be
    studio._BACKENDS.pop(("llm", "tiny-base"), None)


def _vanilla_weights(be, vectors, coef=1.0):
    """The base model's weights after fusing Σ coef·ΔW_i of ``vectors`` (the app's vanilla mix)."""
    from devec_core.mix import VectorPool

    pool = VectorPool(vectors)
    be.apply(vanilla(pool, {v.name: coef for v in vectors}))
    out = {n: p.detach().clone() for n, p in be.model.named_parameters()}
    be.restore()
    return out


def _assert_weights_equal(got, want, names=None, atol=1e-5):
    for n in names or want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


# --- PEFT metadata: alpha must come with the adapter -----------------------------------------


def test_lone_peft_file_without_alpha_is_refused_with_how_to_supply_it(tmp_path, tiny_llm):
    sd = random_llama_lora(tiny_llm[0], rank=4, seed=1)
    save_file(sd, str(tmp_path / "lone.safetensors"))
    with pytest.raises(FormatError, match=r"lone\.safetensors.*adapter_config\.json.*\.zip.*--config.*--alpha"):
        load_task_vector(tmp_path / "lone.safetensors")
    # alpha given: scale alpha / r; config given: PEFT's own rules (rsLoRA here)
    assert load_task_vector(tmp_path / "lone.safetensors", alpha=8).modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    tv = load_task_vector(tmp_path / "lone.safetensors", config={"r": 4, "lora_alpha": 8, "use_rslora": True})
    assert tv.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / math.sqrt(4))
    # a PEFT folder that lost its config: refused the same way
    (tmp_path / "noconf").mkdir()
    shutil.copy(tmp_path / "lone.safetensors", tmp_path / "noconf" / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="adapter_config.json"):
        load_task_vector(tmp_path / "noconf")
    with pytest.raises(FormatError, match="adapter_config.json"):
        load_pool([tmp_path / "noconf"])


def test_broken_adapter_config_is_an_error_naming_the_file(tmp_path, tiny_llm):
    folder = _peft_folder(tmp_path / "a", random_llama_lora(tiny_llm[0], rank=4, seed=1), r=4, lora_alpha=8)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"a/adapter_config\.json.*not a readable"):
        load_task_vector(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": "eight"}))
    with pytest.raises(FormatError, match=r"adapter_config\.json.*lora_alpha must be a number"):
        load_task_vector(folder)


def test_cli_alpha_and_config_for_peft_inputs_without_config(tmp_path, tiny_llm, capsys, monkeypatch):
    from devec_core.cli import main

    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    for s in (1, 2):
        d = tmp_path / f"ad{s}"
        d.mkdir()
        save_file(random_llama_lora(tiny_llm[0], rank=4, seed=s), str(d / "adapter_model.safetensors"))
    args = ["decompose", str(tmp_path / "ad1"), str(tmp_path / "ad2"), "--quiet", "--no-cache", "--out"]
    assert main(args + [str(tmp_path / "o0")]) == 1
    err = capsys.readouterr().err
    assert "ad1" in err and "--alpha" in err and "--config" in err and not (tmp_path / "o0").exists()
    assert main(args + [str(tmp_path / "o1"), "--alpha", "8"]) == 0
    (tmp_path / "cfg.json").write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    assert main(args + [str(tmp_path / "o2"), "--config", str(tmp_path / "cfg.json")]) == 0
    # the scale is in the exported B (alpha = r): alpha 8 vs 2 → factor 4 between the two exports
    from safetensors.torch import load_file

    b1 = load_file(str(tmp_path / "o1" / "unique-ad1" / "adapter_model.safetensors"))
    b2 = load_file(str(tmp_path / "o2" / "unique-ad1" / "adapter_model.safetensors"))
    k = next(k for k in b1 if k.endswith("lora_B.weight"))
    torch.testing.assert_close(b1[k].double().abs().sum() / b2[k].double().abs().sum(), torch.tensor(4.0, dtype=torch.float64))


# --- zips --------------------------------------------------------------------------------------


def _evil_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            if isinstance(name, zipfile.ZipInfo):
                z.writestr(name, data)
            else:
                z.writestr(name, data)
    return path


@pytest.mark.parametrize(
    "member,why",
    [
        ("../escape.safetensors", "unsafe member name"),
        ("/abs/escape.safetensors", "unsafe member name"),
        ("a/../../escape.json", "unsafe member name"),
        ("weights.bin", "pickled"),
        ("nested\\..\\x.json", "unsafe member name"),
    ],
)
def test_zip_refuses_unsafe_members_and_writes_nothing_outside(tmp_path, member, why):
    z = _evil_zip(tmp_path / "evil.zip", [("ok.json", b"{}"), (member, b"x" * 10)])
    dest = tmp_path / "out" / "dest"
    with pytest.raises(FormatError, match=rf"evil\.zip.*{why}"):
        extract_zip(z, dest)
    assert not (tmp_path / "escape.safetensors").exists() and not (tmp_path / "out" / "escape.safetensors").exists()
    assert not dest.exists()  # checked before anything is written


def test_zip_refuses_links_bombs_and_too_many_members(tmp_path):
    link = zipfile.ZipInfo("link.safetensors")
    link.external_attr = (0o120777 << 16)  # a symlink entry
    z = _evil_zip(tmp_path / "l.zip", [(link, b"/etc/passwd")])
    with pytest.raises(FormatError, match="link or special file"):
        extract_zip(z, tmp_path / "d1")
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.safetensors", b"\0" * (3 * 2**20))  # 3 MB that compress to a few KB
    assert (tmp_path / "bomb.zip").stat().st_size < 2**16
    with pytest.raises(FormatError, match="over the limit"):
        extract_zip(tmp_path / "bomb.zip", tmp_path / "d2", max_bytes=2**20)
    z = _evil_zip(tmp_path / "many.zip", [(f"f{i}.json", b"{}") for i in range(12)])
    with pytest.raises(FormatError, match="more than the limit of 10"):
        extract_zip(z, tmp_path / "d3", max_members=10)
    (tmp_path / "junk.zip").write_bytes(os.urandom(100))
    with pytest.raises(FormatError, match="not a readable zip"):
        extract_zip(tmp_path / "junk.zip", tmp_path / "d4")


def test_zip_of_one_folder_and_of_several(tmp_path, tiny_llm):
    a = _peft_folder(tmp_path / "src" / "alpha", random_llama_lora(tiny_llm[0], rank=4, seed=1), r=4, lora_alpha=8)
    _peft_folder(tmp_path / "src" / "beta", random_llama_lora(tiny_llm[0], rank=4, seed=2), r=4, lora_alpha=4)
    (tmp_path / "src" / "README.md").write_text("ignored")
    one = shutil.make_archive(str(tmp_path / "one"), "zip", root_dir=tmp_path / "src", base_dir="alpha")
    assert [n for n, _ in zip_vectors(Path(one))] == ["alpha"]  # named by the folder inside
    tv = load_task_vector(one)
    ref = load_task_vector(a)
    assert tv.modules["model.layers.0.self_attn.q_proj"].scale == ref.modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    both = shutil.make_archive(str(tmp_path / "both"), "zip", root_dir=tmp_path / "src")
    assert sorted(n for n, _ in zip_vectors(Path(both))) == ["alpha", "beta"]
    with pytest.raises(FormatError, match="holds 2 task vectors"):
        load_task_vector(both)


# --- the app's pool: PEFT folder, zipped export, config beside the file -------------------------


def test_zipped_peft_folder_and_config_upload_go_into_the_pool_with_peft_scale(tmp_path, tiny_base):
    from peft import PeftModel

    be = tiny_base
    base = {n: p.detach().clone() for n, p in be.model.named_parameters()}
    sd = random_llama_lora(be.model, rank=4, seed=5)
    folder = _peft_folder(tmp_path / "mine", sd, r=4, lora_alpha=12)
    # PEFT's own merge is the reference
    model2, _ = tiny_llama(seed=0)
    merged = PeftModel.from_pretrained(model2, str(folder)).merge_and_unload()
    want = {n: p.detach() for n, p in merged.named_parameters()}
    # a zip of the folder
    vecs = studio.custom_vectors([_zip(folder)], [], base="tiny-base")
    _assert_weights_equal(_vanilla_weights(be, vecs), want)
    # the two files uploaded together (Gradio puts each in its own temp folder)
    (tmp_path / "u1").mkdir(), (tmp_path / "u2").mkdir()
    shutil.copy(folder / "adapter_model.safetensors", tmp_path / "u1" / "adapter_model.safetensors")
    shutil.copy(folder / "adapter_config.json", tmp_path / "u2" / "adapter_config.json")
    vecs2 = studio.custom_vectors([str(tmp_path / "u1" / "adapter_model.safetensors"), str(tmp_path / "u2" / "adapter_config.json")], [],
                                  base="tiny-base")
    _assert_weights_equal(_vanilla_weights(be, vecs2), want)
    # the weights file alone: refused with how to supply the alpha
    with pytest.raises(StudioError, match="adapter_config.json.*zip"):
        studio.custom_vectors([str(tmp_path / "u1" / "adapter_model.safetensors")], [], base="tiny-base")
    with pytest.raises(StudioError, match="without a .safetensors"):
        studio.custom_vectors([str(tmp_path / "u2" / "adapter_config.json")], [], base="tiny-base")
    assert all(torch.equal(p, base[n]) for n, p in be.model.named_parameters())


def test_the_studios_own_export_zip_round_trips(tmp_path, tiny_base):
    be = tiny_base
    folders = [_peft_folder(tmp_path / f"v{s}", random_llama_lora(be.model, rank=4, seed=s), r=4, lora_alpha=8) for s in (1, 2)]
    s, dec = studio.open_custom("llm", "tiny-base", [_zip(f) for f in folders], [], mode="isolate", tau=0.5)
    zipped = studio.export_parts(s, tmp_path / "export")[0]
    assert str(zipped).endswith(".zip")
    back = studio.custom_vectors([str(zipped)], [], base="tiny-base")
    by = {v.name: v for v in back}
    assert set(by) == {f"unique-{s.target}", f"shared-{s.target}"}
    for kind in ("unique", "shared"):
        part = dec.component(kind, s.target)
        got = by[f"{kind}-{s.target}"].modules
        for mod, d in part.items():
            if mod in got:
                torch.testing.assert_close(got[mod].dense(), d.dense(), atol=1e-5, rtol=1e-4)
            else:
                assert d.sq_norm() < 1e-12  # a zero part is not exported
    assert s.source[0] == "custom" and len(back) == 2


# --- DoRA and full checkpoints against the tab's loaded base --------------------------------------


def _dora_folder(tmp_path, model):
    return dora_folder(model, tmp_path / "dora")


def test_dora_upload_uses_the_loaded_base_and_matches_peft_merge(tmp_path, tiny_base, monkeypatch):
    be = tiny_base
    folder, want = _dora_folder(tmp_path, tiny_llama(seed=0)[0])
    monkeypatch.setattr(studio.uploads, "DENSE_ENERGY", 1.0)  # lossless cut: compare with PEFT exactly
    # no second copy of the base: loading a model or reading base files would fail here
    monkeypatch.setattr("devec_core.models.load_causal_lm", lambda *a, **k: pytest.fail("a second base model was loaded"))
    reads = []
    orig_get = ModuleWeights.get
    monkeypatch.setattr(ModuleWeights, "get", lambda self, key: (reads.append(key), orig_get(self, key))[1])
    # a mix is fused into the shared model for another user's generation: the base must still be W0
    other = load_task_vector(_peft_folder(tmp_path / "other", random_llama_lora(be.model, rank=4, seed=9), r=4, lora_alpha=8))
    from devec_core.mix import VectorPool

    be.apply(vanilla(VectorPool([other]), {"other": 1.0}))
    vecs = studio.custom_vectors([_zip(folder)], [], base="tiny-base")
    be.restore()
    v = vecs[0]
    assert v.meta["dora"] and all(isinstance(d, LowRank) for d in v.modules.values())  # cut to factors as read
    assert sorted(reads) == sorted(m + ".weight" for m in v.modules)  # one read per module
    _assert_weights_equal(_vanilla_weights(be, vecs), want)


def test_dora_default_cut_keeps_the_energy_it_promises(tmp_path, tiny_base):
    be = tiny_base
    folder, want = _dora_folder(tmp_path, tiny_llama(seed=0)[0])
    base = {n: p.detach().clone() for n, p in be.model.named_parameters()}
    v = studio.custom_vectors([_zip(folder)], [], base="tiny-base")[0]
    assert studio.DENSE_ENERGY == 0.9
    for mod, d in v.modules.items():
        full = want[mod + ".weight"] - base[mod + ".weight"]
        resid = (full - d.dense()).pow(2).sum() / full.pow(2).sum()
        assert resid <= 0.1 + 1e-4 and d.rank <= studio.DENSE_RANK


def _llama_checkpoint(folder, seed_perturb, vocab_extra=0):
    model, _ = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(seed_perturb)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layers.0" in n or "norm" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if vocab_extra:
        model.resize_token_embeddings(model.config.vocab_size + vocab_extra)
    model.save_pretrained(str(folder), safe_serialization=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_full_checkpoint_upload_equals_the_fine_tune(tmp_path, tiny_base, monkeypatch):
    be = tiny_base
    want = _llama_checkpoint(tmp_path / "ft", 3)
    monkeypatch.setattr(studio.uploads, "DENSE_ENERGY", 1.0)
    vecs = studio.custom_vectors([_zip(tmp_path / "ft")], [], base="tiny-base")
    v = vecs[0]
    assert v.meta["format"] == "checkpoint" and all(isinstance(d, LowRank) for d in v.modules.values())
    assert "model.layers.1.self_attn.q_proj" not in v.modules  # unchanged: no delta
    _assert_weights_equal(_vanilla_weights(be, vecs), want)


def test_resized_vocabulary_is_reported_and_skipped_not_fatal(tmp_path, tiny_base):
    _llama_checkpoint(tmp_path / "base", 0, 0)
    _llama_checkpoint(tmp_path / "ft", 4, vocab_extra=16)
    vecs = load_pool([tmp_path / "ft"], base=tmp_path / "base", compress=(8, 0.9))
    sk = {d["parameter"]: d for d in vecs[0].meta["skipped"]}
    assert "model.embed_tokens.weight" in sk and tuple(sk["model.embed_tokens.weight"]["shape"])[0] == tuple(
        sk["model.embed_tokens.weight"]["base_shape"])[0] + 16
    assert "model.layers.0.self_attn.q_proj" in vecs[0].modules
    # the app says so on the page
    (tmp_path / "z").mkdir()
    shutil.copytree(tmp_path / "ft", tmp_path / "z" / "code-ft")
    s, _ = studio.open_custom("llm", "tiny-base", [_zip(tmp_path / "z")], [])
    assert any("skipped" in n and "embed_tokens" in n for n in s.notes)
    assert "skipped" in studio.session_markdown(s)
    # a checkpoint of another model altogether (every matrix a different shape) is still an error
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=259))
    other.save_pretrained(str(tmp_path / "other"), safe_serialization=True)
    with pytest.raises(FormatError, match="differ in shape.*different base model"):
        load_pool([tmp_path / "other"], base=tmp_path / "base")


# --- the cut: randomized SVD against a full SVD -------------------------------------------------


def _planted(n, m, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64))[0]
    return U, (U * torch.tensor(spectrum, dtype=torch.float64)) @ V.mT


def test_cut_dense_equals_the_truncated_svd_rule():
    # spectrum: 30 strong directions then a long flat tail
    spec = [10.0 / (1 + 0.1 * i) for i in range(30)] + [0.05] * 170
    U, W = _planted(600, 300, spec)
    S = torch.tensor(spec, dtype=torch.float64)
    e = torch.cumsum(S**2, 0) / (S**2).sum()
    for energy in (0.5, 0.9, 0.99):
        k_ref = int((e < energy).sum()) + 1  # the fewest leading directions holding `energy`
        lr = cut_dense(W, energy=energy, start=4)  # start small: the sketch must grow to reach it
        assert lr.rank == k_ref
        kept = 1 - float((W - lr.dense()).pow(2).sum() / W.pow(2).sum())
        assert kept >= float(e[k_ref - 1]) - 1e-3  # within 1e-3 of the best rank-k energy (Eckart–Young)
    # where the spectrum has a gap at the cut, the subspace itself is the truncated SVD's
    _, Wg = _planted(600, 300, [5.0 - 0.05 * i for i in range(20)] + [0.5 - 0.002 * i for i in range(180)], seed=1)
    Ug = torch.linalg.svd(Wg, full_matrices=False)[0][:, :20]
    lr = cut_dense(Wg, rank=20, energy=None)
    cos = torch.linalg.svdvals(Ug.mT @ torch.linalg.qr(lr.B)[0])
    assert lr.rank == 20 and math.degrees(math.acos(min(1.0, float(cos.min())))) < 1.0
    assert cut_dense(W, rank=7, energy=0.99).rank == 7
    assert cut_dense(W, rank=None, energy=None).rank == 200  # numerical rank
    assert cut_dense(torch.zeros(5, 4)) is None
    a, b = cut_dense(W.float(), rank=20), cut_dense(W.float(), rank=20)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)  # seeded: same delta, same factors (same content hash)
    with pytest.raises(ValueError, match="energy"):
        cut_dense(W, energy=1.5)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cut_dense(W)


def test_studio_holds_the_papers_pool():
    assert studio.MAX_VECTORS >= 12


def test_llama2_preset_names_the_papers_pool_and_sub_pools():
    from devec_core.presets import get_preset

    p = get_preset("llama2-toxicity")
    names = [v.name for v in p.vectors]
    assert len(names) == 10 and len(names) + 1 <= studio.MAX_VECTORS  # + the user's toxic target
    assert {"chat", "chat-uncensored", "dolphin", "odia", "emma500", "ultrachat", "ultrafeedback", "physics", "asclepius",
            "roman-empire"} == set(names)
    assert set(p.subpools) == {"LLaMA-Chat", "All-LLaMA-Chats", "Narrow", "Small Instruct", "Instruct EMMA", "All-Models"}
    assert p.subpools["Small Instruct"] == ["odia", "dolphin", "chat", "chat-uncensored"]
    assert set(p.subpools["All-Models"]) == set(names)
    assert any(not v.confirmed for v in p.vectors) and all(v.note for v in p.vectors)  # what could not be confirmed is said


def test_text_encoder_modules_are_named_on_the_page():
    v = TaskVector("style", {"transformer_blocks.0.attn.to_q": LowRank(torch.ones(4, 1), torch.ones(1, 4)),
                             "text_encoder.encoder.layers.0.self_attn.q_proj": LowRank(torch.ones(4, 1), torch.ones(1, 4))})
    assert any("text-encoder" in n and "style" in n for n in studio.skipped_notes([v]))


def test_a_preset_of_hub_checkpoints_streams_them_together_cut_as_read(tmp_path, monkeypatch):
    """The llama2-toxicity path at toy scale: Hub ids of full fine-tunes (resolved here to local
    folders) are loaded together against the preset's base, cut to factors, the vocabulary-resized
    one reported and skipped."""
    from devec_core import formats
    from devec_core.presets import Preset

    _llama_checkpoint(tmp_path / "base", 0)
    _llama_checkpoint(tmp_path / "ft1", 1)
    _llama_checkpoint(tmp_path / "ft2", 2, vocab_extra=16)
    real = formats.resolve_source
    fake = lambda s, **kw: tmp_path / s.split("/")[1] if str(s).startswith("hub/") else real(s, **kw)  # noqa: E731
    for where in (formats, formats.checkpoint):  # the Studio's look-up and the base reader's
        monkeypatch.setattr(where, "resolve_source", fake)
    monkeypatch.setattr(studio.pools, "hub_reachable", lambda *a, **k: True)  # the "Hub" above answers
    preset = Preset.model_validate({
        "id": "toy-llama", "title": "t", "backend": "llm", "base": {"id": "hub/base"}, "mode": "isolate", "user_slot": True,
        "vectors": [{"name": "a", "source": "hub/ft1", "role": "reference"}, {"name": "b", "source": "hub/ft2", "role": "reference"}],
    })
    reads = []
    orig = formats.CheckpointReader.get
    monkeypatch.setattr(formats.CheckpointReader, "get", lambda self, k: (reads.append((str(self.path), k)), orig(self, k))[1])
    vecs = studio.preset_vectors(preset)
    assert [v.name for v in vecs] == ["a", "b"] and all(isinstance(d, LowRank) for v in vecs for d in v.modules.values())
    base_reads = [k for p, k in reads if p.endswith("base")]
    assert len(base_reads) == len(set(base_reads))  # the base is read once for both fine-tunes
    assert [d["parameter"] for d in vecs[1].meta["skipped"]] == ["model.embed_tokens.weight", "lm_head.weight"] or \
        {d["parameter"] for d in vecs[1].meta["skipped"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert max(d.rank for v in vecs for d in v.modules.values()) <= studio.DENSE_RANK
