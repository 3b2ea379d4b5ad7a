"""The offline style presets end to end: the tiny FLUX-architecture model, its LoRA pool, real images.

Uses the committed assets (assets/style_flux, built by ``python demo/style/build.py``).
"""

import numpy as np
import pytest

from devec_core import studio, toy_flux


@pytest.fixture(scope="module")
def family():
    return studio.open_preset("style-flux-offline")


def test_style_preset_is_the_default_offline_flux_preset():
    assert studio.default_preset("flux") == "style-flux-offline"


def test_family_pool_opens_with_references_and_shares_the_parent(family):
    session, dec = family
    assert session.base == studio.TOY_BASE and not session.synthetic
    assert session.names == ["palette", "stripes", "outline"]
    assert studio.flux_can_generate(session) is None  # offline, no GPU needed
    # single-style reference images are inline in the pool description
    assert session.description.count("<img") == 1 + len(session.names)
    rep = studio.describe(dec)
    # each file is parent ⊕ child: the parent's rank-8 directions lie in all three
    assert not rep.nothing_shared and rep.shared_energy > 0.05
    assert "τ = 0.85" in rep.markdown


def test_generate_renders_two_different_scored_strips(family):
    session, _ = family
    c = studio.default_coefficients(session)
    assert c.vanilla == {"palette": 1.0, "stripes": 1.0, "outline": 0.0} and c.shared == 1.0
    r = studio.generate_flux(session, c, "a red house", seed=0)
    w = toy_flux.RES * toy_flux.SHOW_SCALE
    for im in (r.vanilla, r.devec):
        assert im.size == (studio.TOY_SEEDS * w + (studio.TOY_SEEDS - 1) * 4, w)
    a, b = np.asarray(r.vanilla, np.float32), np.asarray(r.devec, np.float32)
    assert np.abs(a - b).mean() > 1.0  # the parent counted twice vs once: visibly different
    for sc in (r.vanilla_scores, r.devec_scores):
        assert {"style:palette", "style:stripes", "style:outline", "content", "clipped"} <= set(sc)
        assert 0.0 <= sc["content"] <= 1.0 and 0.0 <= sc["clipped"] <= 1.0
    md = studio.scores_markdown(r.vanilla_scores)
    assert "palette **" in md and "×" in md and "content **" in md
    # same seed and coefficients: the same pixels again (per-image generators)
    r2 = studio.generate_flux(session, c, "a red house", seed=0)
    assert np.array_equal(np.asarray(r2.devec), b.astype(np.uint8))
    # the base (all coefficients 0) is the same on both sides
    zero = studio.Coefficients({n: 0.0 for n in session.names}, {n: 0.0 for n in session.names}, 0.0)
    z = studio.generate_flux(session, zero, "a red house", seed=0)
    assert np.array_equal(np.asarray(z.vanilla), np.asarray(z.devec))


def test_independent_pool_devec_equals_vanilla_when_nothing_is_shared():
    session, dec = studio.open_preset("style-flux-independent")
    rep = studio.describe(dec)
    c = studio.default_coefficients(session)
    r = studio.generate_flux(session, c, "a yellow star", seed=1)
    same = np.array_equal(np.asarray(r.vanilla), np.asarray(r.devec))
    if rep.nothing_shared:
        assert same, "nothing shared: the DeVec mix is the vanilla mix"
        assert "DeVec equals vanilla" in rep.markdown


def test_missing_model_is_a_clear_message(monkeypatch, tmp_path, family):
    session, _ = family
    monkeypatch.setattr(studio.toy, "TOY_DIR", tmp_path)
    why = studio.flux_can_generate(session)
    assert why and "demo/style/build.py" in why
