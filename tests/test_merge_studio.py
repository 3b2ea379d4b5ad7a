"""devec_core.merge.studio_mix: the Studio's left-side methods, per-pair shared coefficients and
"Download this mix" (one exact LoRA that reproduces what the Studio fuses)."""

import copy

import pytest
import torch

from devec_core import decompose
from devec_core.export import read_devec_metadata
from devec_core.merge import merge
from devec_core.merge.studio_mix import left_mix, pair_terms, write_mix
from devec_core.mix import Mix, WeightEditor
from tests.tiny_models import PEFT_PREFIX, lora_to_taskvector, random_llama_lora, tiny_llama


@pytest.fixture(scope="module")
def pool():
    model, _ = tiny_llama(0)
    sds = [random_llama_lora(model, rank=4, seed=s) for s in (1, 2, 3)]
    for k in sds[0]:  # plant a shared direction between the first two
        if k.endswith("lora_B.weight"):
            sds[1][k][:, 0] = sds[0][k][:, 0]
    vecs = [lora_to_taskvector(sd, n, PEFT_PREFIX) for sd, n in zip(sds, ("a", "b", "c"))]
    for v in vecs:
        v.meta.update(format="peft", family="llm")
    return model, decompose(vecs, tau=0.85, mode="pairwise")


def _fused(model, mix):
    ed = WeightEditor(model)
    ed.apply(mix)
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    ed.restore()
    return out


def test_left_mix_ties_fuses_the_ties_merge_and_is_cached(pool):
    model, dec = pool
    w = {"a": 1.0, "b": 0.5, "c": 0.0}
    m1 = left_mix(dec, "k", w, "ties", density=0.3)
    assert m1.source is left_mix(dec, "k", w, "ties", density=0.3).source  # same settings: cached
    assert m1.source is not left_mix(dec, "k", {**w, "b": 0.6}, "ties", density=0.3).source
    ref = merge(dec.vectors[:2], "ties", [1.0, 0.5], density=0.3)  # c at λ = 0 takes no part
    base = dict(model.named_parameters())
    got = _fused(model, m1)
    for mod, d in ref.modules.items():
        torch.testing.assert_close(got[mod + ".weight"] - base[mod + ".weight"].detach(), d.W, atol=1e-6, rtol=1e-5)
    van = left_mix(dec, "k", w, "task_arithmetic")
    assert van.label == "vanilla" and {str(c) for c, _ in van.terms} == {"delta:a", "delta:b"}
    with pytest.raises(ValueError, match="left-side method"):
        left_mix(dec, "k", w, "slerp")


def test_pair_terms_per_pair_with_fallback(pool):
    _, dec = pool
    terms = pair_terms(dec, 0.5, {"a+b": 2.0, "b+c": 0.0})
    assert terms == [("pair_shared", "a+b", 2.0), ("pair_shared", "a+c", 0.5)]
    with pytest.raises(ValueError, match="unknown pair"):
        pair_terms(dec, 0.5, {"b+a": 1.0})


def test_download_this_mix_reproduces_the_fused_devec_mix(pool, tmp_path):
    from peft import PeftModel

    model, dec = pool
    mix = Mix(dec, (("unique", "a", 1.0), ("unique", "b", -0.5), *pair_terms(dec, 0.3, {"a+b": 1.5})), "devec")
    settings = {"mode": "pairwise", "tau": 0.85, "pairs": {"a+b": 1.5}, "unique": {"a": 1.0, "b": -0.5}}
    path = write_mix(mix, tmp_path / "mix", "peft", settings)
    assert read_devec_metadata(path)["mix"]["pairs"] == {"a+b": 1.5}
    want = _fused(model, mix)
    got = dict(PeftModel.from_pretrained(copy.deepcopy(model), str(path)).merge_and_unload().named_parameters())
    for n, p in want.items():
        torch.testing.assert_close(got[n].detach(), p, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        write_mix(Mix(dec, (), "devec"), tmp_path / "e", "peft", {})


def test_studio_pairwise_sliders_left_method_and_download(pool, tmp_path, monkeypatch):
    """The Studio's two mixes with per-pair λ and TIES on the left; "Download this mix" writes both,
    each reproducing the fused weights, settings in the metadata."""
    from peft import PeftModel

    from devec_core import studio
    from devec_core.studio import Coefficients

    monkeypatch.setenv("DEVEC_CACHE_DIR", str(tmp_path / "cache"))
    model, dec = pool
    s, sdec = studio.open_vectors(dec.vectors, "llm", "tiny", mode="pairwise")
    c = Coefficients({"a": 1.0, "b": 0.5, "c": 0.0}, {"a": 1.0, "b": 0.5, "c": 0.0}, 0.2, pairs={"a+b": 1.5}, left="ties", density=0.4)
    left, right = studio.build_mixes(sdec, c, s.pool_key)
    assert left.label == "ties"
    assert [(str(comp), lam) for comp, lam in right.terms if comp.kind == "pair_shared"] == [
        ("pair_shared:a+b", 1.5), ("pair_shared:a+c", 0.2), ("pair_shared:b+c", 0.2)]
    files = studio.download_mix(s, c, tmp_path / "dl")
    assert files[0].suffix == ".zip"
    folder = files[0].with_suffix("")
    sides = sorted(p.name for p in folder.iterdir())
    assert sides == ["devec", "left-TIES"]
    for side, mix in (("devec", right), ("left-TIES", left)):
        meta = read_devec_metadata(folder / side)["mix"]
        assert meta["pairs"] == {"a+b": 1.5} and meta["left_method"] == "ties" and meta["side"] == side
        want = _fused(model, mix)
        got = dict(PeftModel.from_pretrained(copy.deepcopy(model), str(folder / side)).merge_and_unload().named_parameters())
        for n, p in want.items():
            torch.testing.assert_close(got[n].detach(), p, atol=1e-5, rtol=1e-5)
    with pytest.raises(studio.StudioError, match="unknown pair"):
        studio.build_mixes(sdec, Coefficients(c.vanilla, c.unique, 0.0, pairs={"c+a": 1.0}), s.pool_key)


@pytest.mark.slow
def test_app_download_this_mix_with_pair_sliders_and_ties(tmp_path):
    """Through the app's API (offline synthetic FLUX preset): pairwise mode shows one slider per
    pair; "Download this mix" with TIES on the left and unlinked pair λ's writes both sides,
    carrying the settings."""
    from gradio_client import Client

    from devec_core import studio
    from tests.conftest import launched_app

    n = studio.MAX_VECTORS
    with launched_app(tmp_path / "cache") as url:
        client = Client(url, verbose=False)
        out = client.predict(studio.default_preset("flux"), api_name="/flux_preset")
        out = client.predict("pairwise", None, [], 0.85, api_name="/flux_mode")
        names = [x for x in studio.get_preset(studio.default_preset("flux")).names]
        pairs = [f"{a}+{b}" for i, a in enumerate(names) for b in names[i + 1 :]]
        labels = [x.get("label") for x in out if isinstance(x, dict) and "· shared λ" in str(x.get("label", ""))]
        assert labels[: len(pairs)] == [f"{p} · shared λ" for p in pairs]
        coefs = [1.0] * len(names) + [0.0] * (n - len(names))
        pair_vals = [0.5 + 0.1 * i for i in range(len(pairs))] + [0.0] * (n * (n - 1) // 2 - len(pairs))
        named = {"tau": 0.85, "shared": 0.2, "left": "TIES", "density": 0.3, "link": False}
        for i, c in enumerate(coefs):  # the app's named API parameters (app.wire): one per slider
            named.update({f"vans_{i}": c, f"unis_{i}": c, f"ons_{i}": True, f"links_{i}": False})
        named.update({f"pair_sliders_{i}": v for i, v in enumerate(pair_vals)})
        files = client.predict(**named, api_name="/flux_download")
    paths = [f if isinstance(f, str) else f.get("path", f) for f in files]
    assert str(paths[0]).endswith(".zip") and len(paths) == 3
    meta = read_devec_metadata(next(p for p in paths if str(p).endswith("devec.safetensors")))["mix"]
    assert meta["left_method"] == "ties" and meta["density"] == 0.3 and meta["mode"] == "pairwise"
    assert meta["pairs"] == {p: pytest.approx(v) for p, v in zip(pairs, pair_vals)}


def test_zerogpu_packing_one_source_per_side_fuses_the_same(pool):
    """On ZeroGPU each side is packed on its own (a TIES left side has its own source): the
    packed mixes fuse exactly like the originals."""
    from devec_core import hosting

    model, dec = pool
    left = left_mix(dec, "k", {"a": 1.0, "b": 0.5, "c": 0.2}, "dare_ties", density=0.5)
    right = Mix(dec, (("unique", "a", 1.0), *pair_terms(dec, 0.3, {"a+b": 1.5})), "devec")
    for mix in (left, right):
        packed = hosting.pack_mixes([mix])[0]
        assert packed.source is not mix.source
        want, got = _fused(model, mix), _fused(model, packed)
        for n in want:
            assert torch.equal(want[n], got[n])
