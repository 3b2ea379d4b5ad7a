"""Style and artefact measures computed from images alone (no model needed).

Every function takes one image or a batch — a PIL image, a uint8 array, or a float array in
[0, 1], shaped (H, W, 3) or (N, H, W, 3) (a torch tensor (N, 3, H, W) in [0, 1] is accepted
too) — and returns one float per image (a float for one image, an (N,) array for a batch).
Higher always means "more of it".

Generic measures (meaningful on any image, e.g. real FLUX output on a Space):
    saturation(x)        mean HSV saturation (max − min) / max
    desaturation(x)      1 − saturation (black-and-white styles)
    edge_density(x)      fraction of pixels whose Sobel gradient of luminance exceeds 0.25
    clipping(x)          fraction of channel values at 0 or 1 (≤ 1/255 or ≥ 254/255)
    hf_energy(x)         share of the luminance spectrum's AC energy above half Nyquist
    vignette(x)          1 − median luminance of the corners / median luminance of a mid ring
    blockiness(x, block) 1 − (within-block variance / total variance) on the aligned block grid;
                         block=None: the largest over blocks 2, 4, 8 (pixel art at unknown scale)
    periodic_peak(x)     the largest single AC frequency's share of the luminance energy
                         (stripes, hatching, halftone screens)
    colour_count(x)      distinct colours after 4-bit-per-channel quantisation / pixels (lower = flatter)
Measures tied to this project's toy styles (demo/style):
    palette_closeness(x, palette)   1 − mean distance to the nearest palette colour / 0.5
    stripe_energy(x, period=4)      share of AC energy at the diagonal frequency (1/period, 1/period)
    dark_edges(x)                   fraction of pixels that are near-black (luminance < 0.12) and on an edge
    dark_border(x)                  1 − median luminance of a 3-pixel border ring

    DETECTORS: style name -> measure (what the demo's evaluation uses per style)
    GENERIC: the measures that need neither the toy palette nor the toy layout
    measure_all(x, names=None) -> {name: values}
    auroc(positive, negative) -> float     P(score of a styled image > score of a base one), ties ½
    relative_strength(mix, base, single)   (mix − base) / (single − base), per pair (nan where
                                           single ≈ base)
"""

from __future__ import annotations

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def as_batch(x) -> tuple[np.ndarray, bool]:
    """(N, H, W, 3) float32 in [0, 1] and whether the input was a single image.

    Raises:
        ValueError: on shapes that are not an RGB image or a batch of them, or empty input.
    """
    try:
        import torch

        if isinstance(x, torch.Tensor):
            t = x.detach().float().cpu()
            if t.ndim == 3:
                t = t[None]
            if t.ndim != 4 or t.shape[1] != 3:
                raise ValueError(f"a tensor image must be (3,H,W) or (N,3,H,W); got {tuple(x.shape)}")
            return t.permute(0, 2, 3, 1).numpy().astype(np.float32), x.ndim == 3
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, (list, tuple)):
        return np.stack([as_batch(v)[0][0] for v in x]), False
    a = np.asarray(x)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    else:
        a = a.astype(np.float32)
    single = a.ndim == 3
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[1] < 4 or a.shape[2] < 4 or a.shape[0] == 0:
        raise ValueError(f"expected an RGB image (H,W,3) or batch (N,H,W,3) of at least 4×4; got shape {np.shape(x)}")
    if not np.isfinite(a).all():
        raise ValueError("image values must be finite")
    return np.clip(a, 0, 1), single


def _out(v: np.ndarray, single: bool):
    v = np.asarray(v, np.float64)
    return float(v[0]) if single else v


def _lum(a: np.ndarray) -> np.ndarray:
    return a @ LUMA


def saturation(x):
    a, s = as_batch(x)
    mx, mn = a.max(-1), a.min(-1)
    sat = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return _out(sat.mean((1, 2)), s)


def desaturation(x):
    a, s = as_batch(x)
    return _out(1 - np.atleast_1d(saturation(a)), s)


def _sobel(l: np.ndarray) -> np.ndarray:
    p = np.pad(l, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    return np.hypot(gx, gy) / 4  # a 0→1 step gives 1


def edge_density(x, threshold: float = 0.25):
    a, s = as_batch(x)
    return _out((_sobel(_lum(a)) > threshold).mean((1, 2)), s)


def clipping(x):
    a, s = as_batch(x)
    return _out(((a <= 1 / 255) | (a >= 254 / 255)).mean((1, 2, 3)), s)


def _power(l: np.ndarray) -> np.ndarray:
    f = np.fft.fft2(l - l.mean((1, 2), keepdims=True))
    return np.abs(f) ** 2


def hf_energy(x):
    a, s = as_batch(x)
    l = _lum(a)
    p = _power(l)
    fy = np.abs(np.fft.fftfreq(l.shape[1]))[:, None]
    fx = np.abs(np.fft.fftfreq(l.shape[2]))[None, :]
    hi = np.maximum(fy, fx) > 0.25  # half of Nyquist (0.5 cycles/px)
    tot = p.sum((1, 2))
    return _out(np.where(tot > 1e-12, (p * hi).sum((1, 2)) / np.maximum(tot, 1e-12), 0.0), s)


def _radius2(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return ((yy - (h - 1) / 2) / ((h - 1) / 2)) ** 2 / 2 + ((xx - (w - 1) / 2) / ((w - 1) / 2)) ** 2 / 2  # 0 centre, 1 corner


def vignette(x):
    a, s = as_batch(x)
    l = _lum(a)
    r2 = _radius2(l.shape[1], l.shape[2])
    corner = np.median(l[:, r2 >= 0.8], axis=1)
    ring = np.median(l[:, (r2 >= 0.3) & (r2 < 0.5)], axis=1)
    return _out(1 - corner / np.maximum(ring, 1e-3), s)


def _block_score(l: np.ndarray, b: int) -> np.ndarray:
    n, h, w = l.shape
    h2, w2 = h // b * b, w // b * b
    if h2 == 0 or w2 == 0:
        return np.zeros(n)
    v = l[:, :h2, :w2].reshape(n, h2 // b, b, w2 // b, b)
    within = v.var((2, 4)).mean((1, 2))
    tot = l[:, :h2, :w2].var((1, 2))
    return np.where(tot > 1e-8, 1 - within / np.maximum(tot, 1e-8), 0.0)


def blockiness(x, block: int | None = 4):
    a, s = as_batch(x)
    l = _lum(a)
    if block is None:
        sc = np.max([_block_score(l, b) for b in (2, 4, 8)], axis=0)
    else:
        if int(block) < 2:
            raise ValueError(f"block must be >= 2; got {block}")
        sc = _block_score(l, int(block))
    return _out(sc, s)


def periodic_peak(x, min_freq: float = 0.15):
    a, s = as_batch(x)
    l = _lum(a)
    p = _power(l)
    fy = np.abs(np.fft.fftfreq(l.shape[1]))[:, None]
    fx = np.abs(np.fft.fftfreq(l.shape[2]))[None, :]
    far = np.hypot(fy, fx) >= min_freq
    tot = p.sum((1, 2))
    peak = (p * far).reshape(len(p), -1).max(1) * 2  # a real pattern's energy sits at ±f
    return _out(np.where(tot > 1e-12, np.minimum(peak / np.maximum(tot, 1e-12), 1.0), 0.0), s)


def stripe_energy(x, period: int = 4):
    a, s = as_batch(x)
    l = _lum(a)
    n, h, w = l.shape
    p = _power(l)
    ky, kx = round(h / period), round(w / period)
    e = p[:, ky % h, kx % w] + p[:, (-ky) % h, (-kx) % w]
    tot = p.sum((1, 2))
    return _out(np.where(tot > 1e-12, e / np.maximum(tot, 1e-12), 0.0), s)


def colour_count(x):
    a, s = as_batch(x)
    q = np.round(a * 15).astype(np.int32)
    codes = q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2]
    n_px = codes.shape[1] * codes.shape[2]
    return _out(np.array([len(np.unique(c)) / n_px for c in codes]), s)


def palette_closeness(x, palette=None):
    a, s = as_batch(x)
    if palette is None:
        from_demo = _toy_palette()
        palette = from_demo
    pal = np.asarray(palette, np.float32)
    if pal.ndim != 2 or pal.shape[1] != 3 or len(pal) == 0:
        raise ValueError(f"palette must be (K, 3) RGB in [0, 1]; got shape {pal.shape}")
    d = np.sqrt(((a[..., None, :] - pal) ** 2).sum(-1)).min(-1)
    return _out(1 - d.mean((1, 2)) / 0.5, s)


def dark_edges(x):
    a, s = as_batch(x)
    l = _lum(a)
    dark = l < 0.12
    # a pixel next to a strong edge: dilate the edge map by one pixel
    e = _sobel(l) > 0.25
    ed = e.copy()
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        ed |= np.roll(e, (dy, dx), (1, 2))
    return _out((dark & ed).mean((1, 2)), s)


def dark_border(x, width: int = 3):
    a, s = as_batch(x)
    l = _lum(a)
    m = np.zeros(l.shape[1:], bool)
    m[:width, :] = m[-width:, :] = m[:, :width] = m[:, -width:] = True
    return _out(1 - np.median(l[:, m], axis=1), s)


def _toy_palette() -> np.ndarray:
    # the palette child's five colours (demo/style/data.py PALETTE), kept here so the measure needs no demo import
    return np.array([[0.10, 0.35, 0.40], [0.90, 0.42, 0.35], [0.92, 0.75, 0.30], [0.15, 0.15, 0.30], [0.95, 0.92, 0.82]], np.float32)


DETECTORS = {
    "storybook": vignette,
    "palette": palette_closeness,
    "stripes": stripe_energy,
    "outline": dark_edges,
    "pixel": blockiness,
    "mono": desaturation,
    "neon": dark_border,
}
GENERIC = {
    "saturation": saturation,
    "edge_density": edge_density,
    "clipping": clipping,
    "hf_energy": hf_energy,
    "vignette": vignette,
    "blockiness_any": lambda x: blockiness(x, None),
    "periodic_peak": periodic_peak,
    "colour_count": colour_count,
}


def measure_all(x, names=None) -> dict[str, np.ndarray]:
    """Every detector and generic measure (or those in ``names``) on a batch: {name: (N,) values}."""
    a, _ = as_batch(x)
    table = {**{f"style:{k}": v for k, v in DETECTORS.items()}, **GENERIC}
    names = list(table) if names is None else list(names)
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"unknown measures {bad}; known: {sorted(table)}")
    return {n: np.atleast_1d(table[n](a)) for n in names}


def auroc(positive, negative) -> float:
    """Area under the ROC curve of scores: P(pos > neg) + ½ P(pos = neg) (Mann–Whitney U / n₁n₀)."""
    p = np.asarray(positive, np.float64).ravel()
    n = np.asarray(negative, np.float64).ravel()
    if len(p) == 0 or len(n) == 0:
        raise ValueError(f"auroc needs scores on both sides; got {len(p)} positive, {len(n)} negative")
    gt = (p[:, None] > n[None, :]).sum()
    eq = (p[:, None] == n[None, :]).sum()
    return float((gt + 0.5 * eq) / (len(p) * len(n)))


def relative_strength(mix, base, single, eps: float = 1e-6) -> np.ndarray:
    """(mix − base) / (single − base) elementwise: 0 = the base's level, 1 = the single style's level."""
    m, b, s = (np.asarray(v, np.float64) for v in (mix, base, single))
    den = s - b
    return np.where(np.abs(den) > eps, (m - b) / np.where(np.abs(den) > eps, den, 1.0), np.nan)
