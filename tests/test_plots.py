"""The figures say what they show (issue 15 point 6): the heat-map varies where the pool does,
says when every module has the same shared dimension, whole-number counts get whole-number ticks,
and the spectrum's "N above" is explained next to the shared dimension.

References are written from the definitions (METHOD.md): with exactly planted shared directions Z
(orthonormal, in every vector's column space), the shared part of ΔW_i is Z Zᵀ ΔW_i, so a module's
shared fraction is Σ_i ‖Z Zᵀ ΔW_i‖² / Σ_i ‖ΔW_i‖².
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devec_core import LowRank, TaskVector, decompose, plots
from devec_core.studio import describe

N, M, LAYERS = 24, 20, 4
LEAVES = ("mlp.up_proj", "self_attn.q_proj")


def _module(layer: int, leaf: str) -> str:
    return f"model.layers.{layer}.{leaf}"


def _planted_pool(k: int = 3, shared: int = 2, own: int = 2, seed: int = 0):
    """k vectors; every module's column space holds the same ``shared`` orthonormal directions Z
    (its own per module) plus ``own`` random ones per vector. The shared directions' weight grows
    with the layer, so the shared fraction varies across modules while the dimension does not."""
    g = torch.Generator().manual_seed(seed)
    mods = [_module(layer, leaf) for layer in range(LAYERS) for leaf in LEAVES]
    Z = {m: torch.linalg.qr(torch.randn(N, shared, generator=g, dtype=torch.float64))[0] for m in mods}
    vecs = []
    for i in range(k):
        parts = {}
        for j, m in enumerate(mods):
            w = 0.2 + 0.6 * j  # weight of the shared directions: grows module by module
            B = torch.cat([w * Z[m], torch.randn(N, own, generator=g, dtype=torch.float64)], 1)
            A = torch.randn(shared + own, M, generator=g, dtype=torch.float64)
            parts[m] = LowRank(B, A)
        vecs.append(TaskVector(f"v{i}", parts))
    return vecs, Z


def _fraction_from_definition(vecs, Z) -> dict[str, float]:
    out = {}
    for m, z in Z.items():
        deltas = [v.modules[m].dense(torch.float64) for v in vecs]
        out[m] = sum(float((z @ z.T @ d).pow(2).sum()) for d in deltas) / sum(float(d.pow(2).sum()) for d in deltas)
    return out


@pytest.fixture(scope="module")
def planted():
    vecs, Z = _planted_pool()
    return vecs, Z, decompose(vecs, tau=0.85, dtype="float64")


def _image(fig) -> np.ndarray:
    return np.asarray(fig.axes[0].images[0].get_array(), dtype=float)


def test_heat_map_shows_the_shared_fraction_which_varies(planted):
    vecs, Z, dec = planted
    assert set(dec.shared_dims().values()) == {2}  # the same dimension everywhere: a flat map before
    want = _fraction_from_definition(vecs, Z)
    got = plots.shared_fractions(dec)
    assert got.keys() == want.keys()
    for m in want:
        assert got[m] == pytest.approx(want[m], abs=1e-9), m
    fig = plots.shared_dims_figure(dec)
    img = _image(fig)
    assert img.shape == (len(LEAVES), LAYERS)  # rows = layer type, columns = block
    assert np.nanmax(img) - np.nanmin(img) > 0.3  # it varies: not a solid square
    for layer in range(LAYERS):
        for r, leaf in enumerate(LEAVES):
            assert img[r, layer] == pytest.approx(want[_module(layer, leaf)], abs=1e-9)
    assert "fraction" in fig.axes[1].get_ylabel()  # the colour bar names what it shows


def test_heat_map_says_when_every_module_has_the_same_dimension(planted):
    _, _, dec = planted
    title = plots.shared_dims_figure(dec).axes[0].get_title()
    assert "shared dimension 2 in every module" in title and "total 16" in title
    # the dimension view says it too
    fig = plots.shared_dims_figure(dec, value="dim")
    assert "shared dimension 2 in every module" in fig.axes[0].get_title()


def test_caption_names_the_range_when_dimensions_differ():
    assert plots.dims_caption({"a": 0, "b": 3, "c": 1}) == "shared dimension 0–3 (3 modules, total 4)"
    assert plots.dims_caption({"a": 8, "b": 8}) == "shared dimension 8 in every module (2 modules, total 16)"


@pytest.mark.parametrize("top", [1, 3, 8, 30])
def test_whole_number_counts_get_whole_number_ticks(top):
    """FLUX's colour bar had ticks at 0.5, 1.5, 2.5 for a count. Build a pool whose dimensions run
    0..top (shared directions planted in a growing number of modules) and read the colour bar."""
    g = torch.Generator().manual_seed(top)
    n = max(top + 2, 8)
    mods = {}
    for d in range(top + 1):
        mods[_module(d, "mlp.up_proj")] = d
    vecs = []
    Zs = {m: torch.linalg.qr(torch.randn(4 * n, n, generator=g, dtype=torch.float64))[0] for m in mods}
    for i in range(2):
        parts = {}
        for m, d in mods.items():
            B = torch.cat([Zs[m][:, :d], torch.randn(4 * n, 1, generator=g, dtype=torch.float64)], 1)  # + one own direction
            parts[m] = LowRank(B, torch.randn(B.shape[1], 2 * n, generator=g, dtype=torch.float64))
        vecs.append(TaskVector(f"v{i}", parts))
    dec = decompose(vecs, tau=0.85, dtype="float64")
    assert sorted(dec.shared_dims().values()) == list(range(top + 1))
    fig = plots.shared_dims_figure(dec, value="dim")
    cbar = fig.axes[1]
    ticks = [float(t) for t in cbar.get_yticks()]
    lo, hi = cbar.get_ylim()
    shown = [t for t in ticks if lo <= t <= hi]
    assert shown and all(t == int(t) for t in shown), ticks
    assert 0 in shown and min(shown) >= 0 and max(shown) <= top
    labels = [t.get_text() for t in cbar.get_yticklabels() if t.get_text()]
    assert all(lab.lstrip("−-").isdigit() for lab in labels), labels
    assert "shared dimension 0–" in fig.axes[0].get_title()


def test_bad_value_is_named(planted):
    with pytest.raises(ValueError, match="'energy'"):
        plots.shared_dims_figure(planted[2], value="energy")


def _isolate_pool(refs: int = 3, shared: int = 2, seed: int = 1):
    """A target sharing the same ``shared`` directions with each of ``refs`` references (the
    SmolLM2 preset's situation: 8 directions × 4 references → 6720 above vs 1680)."""
    g = torch.Generator().manual_seed(seed)
    mods = [_module(layer, "mlp.up_proj") for layer in range(3)]
    Z = {m: torch.linalg.qr(torch.randn(N, shared, generator=g, dtype=torch.float64))[0] for m in mods}
    vecs = []
    for i in range(refs + 1):
        parts = {m: LowRank(torch.cat([Z[m], torch.randn(N, 1, generator=g, dtype=torch.float64)], 1),
                            torch.randn(shared + 1, M, generator=g, dtype=torch.float64)) for m in mods}
        vecs.append(TaskVector("target" if i == 0 else f"ref{i}", parts))
    return vecs, len(mods)


def test_the_two_counts_are_explained_in_isolate_mode():
    refs, shared = 3, 2
    vecs, n_mod = _isolate_pool(refs, shared)
    dec = decompose(vecs, tau=0.85, mode="isolate", target="target", dtype="float64")
    # from the definition: each (target, reference) pair sees the same `shared` directions; the
    # union removed from the target has dimension `shared` per module
    assert sum(dec.shared_dims().values()) == shared * n_mod
    above, note = plots.count_note(dec)
    assert above == refs * shared * n_mod
    assert f"{above} eigenvalues above τ" in note and f"total shared dimension {shared * n_mod}" in note
    assert "pair" in note
    spec = plots.spectrum_figure(dec)
    texts = " ".join(t.get_text() for t in spec.axes[0].texts)
    assert f"{above} above" in texts and f"shared dim {shared * n_mod}" in texts and "per pair" in texts
    md = describe(dec).markdown
    assert f"total shared dimension {shared * n_mod}, summed over modules" in md and f"{above} eigenvalues above τ" in md  # the report says how they relate
    # the heat-map takes the target's own fraction (the references keep everything)
    fr = plots.shared_fractions(dec)
    for m in fr:
        d = vecs[0].modules[m].dense(torch.float64)
        U = dec.component("unique", "target")[m].dense(torch.float64)
        assert fr[m] == pytest.approx(float((d - U).pow(2).sum() / d.pow(2).sum()), abs=1e-9)


def test_joint_mode_counts_agree_and_the_report_adds_nothing(planted):
    _, _, dec = planted
    above, note = plots.count_note(dec)
    assert above == sum(dec.shared_dims().values()) == 16
    assert "=" in note
    texts = " ".join(t.get_text() for t in plots.spectrum_figure(dec).axes[0].texts)
    assert "per pair" not in texts
    assert "eigenvalues above τ" not in describe(dec).markdown


def test_pairwise_mode_counts_each_ordered_pair():
    refs, shared = 2, 2
    vecs, n_mod = _isolate_pool(refs, shared)  # 3 vectors sharing the same 2 directions per module
    dec = decompose(vecs, tau=0.85, mode="pairwise", dtype="float64")
    above, note = plots.count_note(dec)
    assert above == 3 * 2 * shared * n_mod  # 6 ordered pairs, each sees the 2 directions
    assert "ordered pair" in note and str(sum(dec.shared_dims().values())) in note
    fig = plots.shared_dims_figure(dec)
    assert "shared dimension 2 in every module" in fig.axes[0].get_title()


# --- the page's heat-map: an inline SVG whose cells name their module on hover -------------------

SVG = "{http://www.w3.org/2000/svg}"


def _cells(svg: str) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)  # well-formed XML (names escaped)
    out = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "devec-cell":
            tip = g.find(f"{SVG}text[@class='devec-tip']")
            out[g.get("data-module")] = {"title": g.find(f"{SVG}title").text, "tip": "".join(tip.itertext()),
                                         "fill": g.find(f"{SVG}rect").get("fill")}
    return root, out


def _luminance(hex_colour: str) -> float:
    r, g, b = (int(hex_colour[k:k + 2], 16) for k in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_svg_heat_map_cells_name_module_dimension_and_fraction(planted):
    vecs, Z, dec = planted
    want = _fraction_from_definition(vecs, Z)
    root, cells = _cells(plots.shared_dims_svg(dec))
    assert set(cells) == set(want)  # one hoverable cell per module
    for m, c in cells.items():
        for text in (c["title"], c["tip"]):  # the browser's tooltip and the readout line
            assert m in text and "shared dim 2" in text and f"shared fraction {want[m]:.3f}" in text and "in 3 of 3 vectors" in text
    # the colour follows the fraction (magma_r: more shared = darker)
    by_fraction = sorted(want, key=want.get)
    lum = [_luminance(cells[m]["fill"]) for m in by_fraction]
    assert lum == sorted(lum, reverse=True) and lum[0] - lum[-1] > 50
    texts = " ".join("".join(t.itertext()) for t in root.iter(f"{SVG}text"))
    assert "shared dimension 2 in every module" in texts and "total 16" in texts and "τ = 0.85" in texts


def test_svg_heat_map_escapes_module_names_and_names_a_bad_value(planted):
    g = torch.Generator().manual_seed(3)
    odd = ['blocks.0.a<b>&"c"', "blocks.1.x'y"]
    Zs = {m: torch.linalg.qr(torch.randn(N, 2, generator=g, dtype=torch.float64))[0] for m in odd}
    vecs = [TaskVector(f"v{i}", {m: LowRank(torch.cat([Zs[m], torch.randn(N, 1, generator=g, dtype=torch.float64)], 1),
                                            torch.randn(3, M, generator=g, dtype=torch.float64)) for m in odd}) for i in range(2)]
    dec = decompose(vecs, tau=0.85, dtype="float64")
    _, cells = _cells(plots.shared_dims_svg(dec))
    assert set(cells) == set(odd) and all(m in cells[m]["title"] for m in odd)
    with pytest.raises(ValueError, match="'energy'"):
        plots.shared_dims_svg(planted[2], value="energy")


def test_svg_dimension_view_and_isolate_fraction():
    vecs, n_mod = _isolate_pool(3, 2)
    dec = decompose(vecs, tau=0.85, mode="isolate", target="target", dtype="float64")
    _, cells = _cells(plots.shared_dims_svg(dec, value="dim"))
    assert len(cells) == n_mod and all("of the target's" in c["title"] and "in 4 of 4 vectors" in c["title"] for c in cells.values())
    assert all(c["fill"].startswith("#") and len(c["fill"]) == 7 for c in cells.values())
