"""devec_core.studio.share: settings that restore a page (URL query, JSON, PNG text chunk), and
messages without server paths. References written from the definitions, not the code."""

import pytest

from devec_core.studio import clean_message, share

FULL = {
    "tab": "llm", "preset": "smollm2-offline", "mode": "isolate", "target": "toxic", "references": ["polite", "bullets"],
    "tau": 0.7, "vanilla": {"toxic": -0.25, "polite": 0.5}, "unique": {"toxic": -0.25, "polite": -0.3}, "off": ["bullets"],
    "shared": 1.0, "left": "TIES", "density": 0.5, "prompt": "Name a colour & a fruit? 100% = yes", "seed": 11,
    "max_new_tokens": 32, "temperature": 0.7, "top_p": 0.95,
}


def test_query_round_trip_keeps_every_field():
    q = share.to_query(FULL)
    assert q.startswith("tab=llm&preset=smollm2-offline")
    assert share.from_query(q) == FULL
    assert share.from_query("?" + q) == FULL  # as location.search gives it


def test_json_round_trip_and_custom_pools_are_refused():
    assert share.from_json(share.to_json(FULL)) == FULL
    with pytest.raises(share.SettingsError, match="uploaded pool"):
        share.from_json(share.to_json({**{k: v for k, v in FULL.items() if k != "preset"}, "pool": "custom"}))
    with pytest.raises(share.SettingsError, match="line 1"):
        share.from_json("{not json")
    with pytest.raises(share.SettingsError, match="object"):
        share.from_json("[1, 2]")


def test_a_plain_visit_has_no_settings_and_bad_values_are_named():
    assert share.from_query({}) is None
    assert share.from_query("tab=llm") is None
    with pytest.raises(share.SettingsError, match="tau.*'abc'"):
        share.from_query("preset=p&tau=abc")
    with pytest.raises(share.SettingsError, match="finite"):
        share.from_query("preset=p&tau=nan")
    with pytest.raises(share.SettingsError, match="tab.*'gpu'"):
        share.from_query("preset=p&tab=gpu")
    with pytest.raises(share.SettingsError, match="name:value.*'toxic'"):
        share.from_query("preset=p&van=toxic")


def test_names_with_colons_keep_them():
    s = share.from_query(share.to_query({"tab": "flux", "preset": "p", "tau": 0.85, "vanilla": {"a:b": 1.0}}))
    assert s["vanilla"] == {"a:b": 1.0}


def test_png_carries_its_settings(tmp_path):
    from PIL import Image

    p = share.png_with_settings(Image.new("RGB", (8, 8), "red"), FULL, tmp_path / "x.png")
    assert share.settings_from_png(p) == FULL
    assert not list(tmp_path.glob("*.part"))  # nothing half-written left behind
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(share.SettingsError, match="plain.png"):
        share.settings_from_png(tmp_path / "plain.png")


def test_label_names_tau_mode_lambdas_and_seed_and_skips_vectors_switched_off():
    lab = share.label(FULL)
    assert "τ 0.70" in lab and "isolate" in lab and "toxic -0.25/-0.25" in lab and "polite 0.5/-0.3" in lab and "seed 11" in lab
    assert "bullets" not in lab


@pytest.mark.parametrize("msg, want", [
    ("could not read '/tmp/gradio/8f3a9c/x.safetensors' as a LoRA", "could not read 'x.safetensors' as a LoRA"),
    ("bad file C:\\Users\\me\\AppData\\y.zip", "bad file y.zip"),
    ("τ must be in (0, 1]; got 1.5 (and/or 0)", "τ must be in (0, 1]; got 1.5 (and/or 0)"),
    ("owner/repo is not on the Hub", "owner/repo is not on the Hub"),  # a Hub id is not a server path
])
def test_messages_lose_server_paths(msg, want):
    assert clean_message(msg) == want
