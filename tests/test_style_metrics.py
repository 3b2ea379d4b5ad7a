"""Style detectors and artefact measures on synthetic images with known answers (from the definitions)."""

import numpy as np
import pytest

from devec_core import style_metrics as M

N = 32


def flat(v, n=N):
    return np.full((n, n, 3), v, np.float32)


def yx(n=N):
    return np.mgrid[0:n, 0:n].astype(np.float32)


def test_saturation_and_desaturation():
    red = np.zeros((8, 8, 3), np.float32)
    red[..., 0] = 1
    assert M.saturation(red) == pytest.approx(1.0)
    assert M.saturation(flat(0.5, 8)) == pytest.approx(0.0)
    half = flat(0.5, 8)
    half[:, :4] = red[:, :4]
    assert M.saturation(half) == pytest.approx(0.5)
    assert M.desaturation(half) == pytest.approx(0.5)
    assert M.saturation(flat(0.0, 8)) == 0.0  # black: no division by zero


def test_clipping_counts_channel_values_at_the_ends():
    assert M.clipping(flat(0.5)) == 0.0
    a = flat(0.5)
    a[: N // 2] = 0.0
    assert M.clipping(a) == pytest.approx(0.5)
    a = flat(0.5)
    a[..., 0] = 1.0  # one channel of three
    assert M.clipping(a) == pytest.approx(1 / 3)
    assert M.clipping((a * 255).round().astype(np.uint8)) == pytest.approx(1 / 3)


def test_edge_density_of_a_step():
    assert M.edge_density(flat(0.3)) == 0.0
    a = flat(0.0, 16)
    a[:, 8:] = 1.0
    # the Sobel response is nonzero on the two columns next to the step only
    assert M.edge_density(a) == pytest.approx(2 / 16)
    weak = flat(0.0, 16)
    weak[:, 8:] = 0.1  # below the 0.25 threshold
    assert M.edge_density(weak) == 0.0


def test_hf_energy_separates_checkerboard_from_smooth():
    y, x = yx()
    cb = ((y + x) % 2)[..., None].repeat(3, -1)
    assert M.hf_energy(cb) == pytest.approx(1.0)
    smooth = (0.5 + 0.5 * np.sin(2 * np.pi * x / 16))[..., None].repeat(3, -1)
    assert M.hf_energy(smooth) == pytest.approx(0.0, abs=1e-9)
    assert M.hf_energy(flat(0.7)) == 0.0


def test_stripe_energy_is_specific_to_diagonal_period_4():
    y, x = yx()
    diag = ((((y + x) % 4) < 2) * 0.6 + 0.2)[..., None].repeat(3, -1)
    horiz = (((y % 4) < 2) * 0.6 + 0.2)[..., None].repeat(3, -1)
    anti = ((((y - x) % 4) < 2) * 0.6 + 0.2)[..., None].repeat(3, -1)
    rng = np.random.default_rng(0)
    noise = rng.random((N, N, 3)).astype(np.float32)
    assert M.stripe_energy(diag) > 0.8  # a square wave keeps 8/π² ≈ 0.81 of its energy in the fundamental
    assert M.stripe_energy(horiz) == pytest.approx(0.0, abs=1e-9)
    assert M.stripe_energy(anti) == pytest.approx(0.0, abs=1e-9)  # the other diagonal
    assert M.stripe_energy(noise) < 0.05
    # the generic peak finds all three patterns
    for p in (diag, horiz, anti):
        assert M.periodic_peak(p) > 0.8
    gradient = (x / N)[..., None].repeat(3, -1)
    assert M.periodic_peak(gradient) < 0.05


def test_blockiness():
    rng = np.random.default_rng(1)
    blocks = np.kron(rng.random((N // 4, N // 4)), np.ones((4, 4)))[..., None].repeat(3, -1)
    assert M.blockiness(blocks, 4) == pytest.approx(1.0)
    assert M.blockiness(blocks, 2) == pytest.approx(1.0)  # 2×2 cells nest in 4×4 blocks
    noise = rng.random((N, N, 3))
    assert M.blockiness(noise, 4) < 0.2  # iid pixels: within ≈ 15/16 of the total
    shifted = np.roll(blocks, 2, axis=1)  # off the grid: no longer constant per block
    assert M.blockiness(shifted, 4) < 0.9
    assert M.blockiness(noise, None) < 0.6
    assert M.blockiness(flat(0.4), 4) == 0.0
    with pytest.raises(ValueError, match="block"):
        M.blockiness(noise, 1)


def test_vignette():
    assert M.vignette(flat(0.8)) == pytest.approx(0.0)
    y, x = yx()
    r2 = ((y - 15.5) / 15.5) ** 2 / 2 + ((x - 15.5) / 15.5) ** 2 / 2
    v = flat(0.8) * (1 - 0.5 * r2)[..., None]
    val = M.vignette(v)
    # corners r² ≥ 0.8 (median ≈ 0.87), ring 0.3..0.5 (median ≈ 0.4): 1 − (1−0.435)/(1−0.2) ≈ 0.29
    assert 0.2 < val < 0.4
    brighter_corners = flat(0.8) * (1 + 0.2 * r2)[..., None]
    assert M.vignette(np.clip(brighter_corners, 0, 1)) < 0


def test_palette_closeness():
    pal = np.array([[1, 0, 0], [0, 0, 1]], np.float32)
    a = np.zeros((8, 8, 3), np.float32)
    a[:, :4] = pal[0]
    a[:, 4:] = pal[1]
    assert M.palette_closeness(a, pal) == pytest.approx(1.0)
    g = flat(0.5, 8)  # distance to either colour: sqrt(0.25·3) ≈ 0.866 → 1 − 0.866/0.5 < 0
    assert M.palette_closeness(g, pal) == pytest.approx(1 - np.sqrt(0.75) / 0.5, abs=1e-5)
    with pytest.raises(ValueError, match="palette"):
        M.palette_closeness(a, [1, 0, 0])


def test_dark_edges_and_dark_border():
    white = flat(1.0)
    ring = white.copy()
    ring[8:24, 8:24] = 0.0
    ring[10:22, 10:22] = 1.0  # a 2-px black square outline
    assert M.dark_edges(ring) > 0.05
    assert M.dark_edges(white) == 0.0
    assert M.dark_edges(flat(0.0)) == 0.0  # black but no edge
    assert M.dark_border(white) == pytest.approx(0.0)
    framed = white.copy()
    framed[:3] = framed[-3:] = 0
    framed[:, :3] = framed[:, -3:] = 0
    assert M.dark_border(framed) == pytest.approx(1.0)


def test_colour_count():
    assert M.colour_count(flat(0.5, 8)) == pytest.approx(1 / 64)
    rng = np.random.default_rng(2)
    assert M.colour_count(rng.random((8, 8, 3))) > 0.9


def test_batches_and_input_types_agree():
    import torch
    from PIL import Image

    rng = np.random.default_rng(3)
    b = (rng.random((3, 16, 16, 3)) * 255).round().astype(np.uint8)
    batch = M.measure_all(b)
    for name, vals in batch.items():
        assert vals.shape == (3,), name
        one = M.measure_all(b[1])[name]
        assert one[0] == pytest.approx(vals[1]), name
    pil = M.saturation(Image.fromarray(b[0]))
    t = M.saturation(torch.from_numpy(b[0]).permute(2, 0, 1).float() / 255)
    assert pil == pytest.approx(t) == pytest.approx(batch["saturation"][0])


@pytest.mark.parametrize("bad", [np.zeros((8, 8)), np.zeros((8, 8, 4)), np.zeros((0, 8, 8, 3)), np.zeros((2, 2, 3))])
def test_bad_shapes_are_named(bad):
    with pytest.raises(ValueError, match="shape"):
        M.saturation(bad)


def test_non_finite_and_unknown_names():
    a = flat(0.5)
    a[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        M.edge_density(a)
    with pytest.raises(ValueError, match="nope"):
        M.measure_all(flat(0.5), ["nope"])


def test_auroc_definition():
    assert M.auroc([2, 3], [0, 1]) == 1.0
    assert M.auroc([0, 1], [2, 3]) == 0.0
    assert M.auroc([1, 1], [1, 1]) == 0.5
    # hand count: pairs (pos, neg): (1,0)>, (1,2)<, (3,0)>, (3,2)> → 3/4
    assert M.auroc([1, 3], [0, 2]) == 0.75
    rng = np.random.default_rng(4)
    p, n = rng.normal(1, 1, 50), rng.normal(0, 1, 40)
    # the definition, pair by pair
    ref = sum((a > b) + 0.5 * (a == b) for a in p for b in n) / (len(p) * len(n))
    assert M.auroc(p, n) == pytest.approx(ref)
    assert M.auroc(np.r_[p, 0.5], np.r_[n, 0.5]) == pytest.approx(
        sum((a > b) + 0.5 * (a == b) for a in np.r_[p, 0.5] for b in np.r_[n, 0.5]) / (51 * 41)
    )
    with pytest.raises(ValueError, match="both sides"):
        M.auroc([], [1.0])


def test_relative_strength():
    r = M.relative_strength([0.5, 2.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    assert r[0] == pytest.approx(0.5)
    assert r[1] == pytest.approx(2.0)  # above the single style: overcooked
    assert np.isnan(r[2])  # single == base: undefined


def test_detectors_separate_the_toy_styles_from_plain_scenes():
    """Each style's own detector ranks the procedural styled images above plain ones (AUROC > 0.95)."""
    from demo.style import data as D

    im, mk, _ = D.scenes(60, seed=99)
    for style, det in M.DETECTORS.items():
        y = D.styled(style, im, mk)
        assert M.auroc(det(y), det(im)) > 0.95, style
