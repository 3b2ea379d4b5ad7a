"""Hub presets fail fast, with one line, when the Hub cannot be reached (issue 15 item 2)."""

import pytest

from devec_core import studio
from devec_core.studio import StudioError, pools


def test_hub_preset_offline_fails_at_once_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no connection attempted: the answer is "unreachable"
    assert not pools.hub_reachable()
    called = []
    monkeypatch.setattr(pools, "_load_spec_vector", lambda *a, **k: called.append(a))  # must not be reached
    with pytest.raises(StudioError, match="Hub cannot be reached.*offline preset") as e:
        studio.open_preset("flux-schnell-styles")
    assert "\n" not in str(e.value) and not called


def test_offline_presets_never_ask_for_the_hub(monkeypatch):
    monkeypatch.setattr(pools, "hub_reachable", lambda *a, **k: pytest.fail("an offline preset asked for the Hub"))
    session, _ = studio.open_preset("flux-synthetic-offline")
    assert session.names
