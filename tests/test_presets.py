"""Every preset file loads and validates; the schema refuses typos and bad values."""

from pathlib import Path

import pytest

from devec_core.presets import PRESET_DIR, Preset, get_preset, list_presets, load_preset

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_file_loads(path):
    p = load_preset(path)
    assert isinstance(p, Preset)
    assert p.vectors and len(set(p.names)) == len(p.names)
    if p.offline and not p.synthetic:  # offline presets must not need the Hub
        for v in p.vectors:
            if v.source.startswith("demo:"):  # a child of a demo pool: its manifest and adapter folder
                folder, _, child = v.source.removeprefix("demo:").rpartition("/")
                assert (ROOT / folder / "pool.json").is_file(), f"{p.id}: {folder}/pool.json missing"
                assert (ROOT / folder / child).is_dir(), f"{p.id}: {v.source} missing"
            else:
                assert (ROOT / v.source).exists(), f"{p.id}: {v.source} missing"
    if p.recipe:
        assert p.recipe.startswith("recipes/")


def test_each_backend_has_an_offline_preset():
    for backend in ("llm", "flux"):
        assert any(p.offline for p in list_presets(backend=backend)), backend


def test_offline_llm_preset_is_the_toxicity_demo():
    p = get_preset("smollm2-offline")
    assert p.offline and p.base.id == "smollm2" and p.mode == "isolate" and p.target == "toxic"
    assert all(v.source.startswith("demo:assets/smollm2_demo/") for v in p.vectors)
    assert p.coefficients is not None and p.coefficients.shared == 1.0 and "toxicity" in p.scores and "title" in p.scores
    assert p.prompts


def test_real_presets_mark_unconfirmed_sources():
    flux = get_preset("flux-schnell-styles")
    assert flux.base.id == "black-forest-labs/FLUX.1-schnell" and flux.base.needs_gpu
    assert len(flux.vectors) == 5 and all(v.weight_name for v in flux.vectors)
    assert any(not v.confirmed for v in flux.vectors)  # honest about what could not be checked
    llama = get_preset("llama2-toxicity")
    assert llama.user_slot and llama.mode == "isolate" and llama.base.id == "meta-llama/Llama-2-7b-hf"


def _write(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    return f


GOOD = """
id: ok
title: t
backend: llm
base: {id: smollm2}
vectors: [{name: a, source: x}]
"""


def test_schema_rejects_typos_and_bad_values(tmp_path):
    assert load_preset(_write(tmp_path, GOOD)).id == "ok"
    with pytest.raises(ValueError, match="p.yaml"):
        load_preset(_write(tmp_path, GOOD + "tua: 0.5\n"))  # unknown key
    with pytest.raises(ValueError, match="tau"):
        load_preset(_write(tmp_path, GOOD + "tau: 0\n"))
    with pytest.raises(ValueError, match="target"):
        load_preset(_write(tmp_path, GOOD + "mode: isolate\n"))
    with pytest.raises(ValueError, match="duplicate"):
        load_preset(_write(tmp_path, GOOD.replace("[{name: a, source: x}]", "[{name: a, source: x}, {name: a, source: y}]")))
    with pytest.raises(ValueError, match="not in the pool"):
        load_preset(_write(tmp_path, GOOD + "coefficients: {vanilla: {b: 1.0}}\n"))
    with pytest.raises(ValueError, match="scores"):
        load_preset(_write(tmp_path, GOOD + "scores: [toxcity]\n"))
    with pytest.raises(ValueError, match="mapping"):
        load_preset(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ValueError, match="Unknown preset"):
        get_preset("nope")
