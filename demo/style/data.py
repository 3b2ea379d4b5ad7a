"""Procedural data for the style demo: objects drawn by code, and style transforms.

    scenes(n, seed) -> (images float32 (n,32,32,3) in [0,1], masks (n,32,32) in [0,1], labels list[dict])
    STYLES: name -> function(images, masks) -> styled images    (vectorised numpy)
    PARENT, CHILDREN, INDEPENDENT                                the pool's family tree
    styled(name, images, masks)                                  a child is applied on top of its parent

Nothing is downloaded: every image is drawn with PIL at 128 px and box-downscaled to 32 px.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devec_core.toy_flux import CLASSES, COLOURS, PLACES, RES, SIZES, caption  # noqa: E402

BIG = 128
RGB = {
    "red": (215, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 160, 60),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
OFFSET = {"left": (-26, 0), "right": (26, 0), "top": (0, -26), "bottom": (0, 26), "middle": (0, 0)}
SIZE_PX = {"small": 46, "big": 70}


def _draw(d: ImageDraw.ImageDraw, cls: str, cx: float, cy: float, s: float, fill, dark) -> None:
    """Draw one object of class ``cls`` centred at (cx, cy), about ``s`` px wide (fill 255 on a mask too)."""
    h = s / 2
    if cls == "house":
        d.rectangle([cx - h * 0.8, cy - h * 0.1, cx + h * 0.8, cy + h], fill=fill)
        d.polygon([(cx - h, cy - h * 0.1), (cx + h, cy - h * 0.1), (cx, cy - h)], fill=dark)
        d.rectangle([cx - h * 0.2, cy + h * 0.4, cx + h * 0.2, cy + h], fill=dark)
    elif cls == "tree":
        d.rectangle([cx - h * 0.18, cy + h * 0.2, cx + h * 0.18, cy + h], fill=dark)
        d.ellipse([cx - h * 0.8, cy - h, cx + h * 0.8, cy + h * 0.45], fill=fill)
    elif cls == "boat":
        d.polygon([(cx - h, cy + h * 0.2), (cx + h, cy + h * 0.2), (cx + h * 0.6, cy + h * 0.75), (cx - h * 0.6, cy + h * 0.75)], fill=dark)
        d.polygon([(cx - h * 0.05, cy - h), (cx - h * 0.05, cy + h * 0.1), (cx - h * 0.8, cy + h * 0.1)], fill=fill)
        d.polygon([(cx + h * 0.05, cy - h * 0.8), (cx + h * 0.05, cy + h * 0.1), (cx + h * 0.7, cy + h * 0.1)], fill=fill)
    elif cls == "fish":
        d.ellipse([cx - h * 0.75, cy - h * 0.45, cx + h * 0.45, cy + h * 0.45], fill=fill)
        d.polygon([(cx + h * 0.3, cy), (cx + h, cy - h * 0.5), (cx + h, cy + h * 0.5)], fill=fill)
        d.ellipse([cx - h * 0.5, cy - h * 0.15, cx - h * 0.3, cy + h * 0.05], fill=dark)
    elif cls == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif cls == "cup":
        d.polygon([(cx - h * 0.7, cy - h * 0.6), (cx + h * 0.5, cy - h * 0.6), (cx + h * 0.35, cy + h * 0.8), (cx - h * 0.55, cy + h * 0.8)], fill=fill)
        d.ellipse([cx + h * 0.2, cy - h * 0.35, cx + h * 0.95, cy + h * 0.35], outline=fill, width=max(2, int(s * 0.08)))
        d.rectangle([cx - h * 0.7, cy - h * 0.72, cx + h * 0.5, cy - h * 0.55], fill=dark)
    else:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")


def sample_labels(n: int, seed: int) -> list[dict]:
    """``n`` random (class, colour, size, place) with the caption (about 1 in 4 without size, 1 in 4 without place)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cls, col = CLASSES[rng.integers(len(CLASSES))], COLOURS[rng.integers(len(COLOURS))]
        size, place = SIZES[rng.integers(2)], PLACES[rng.integers(len(PLACES))]
        cap_size = size if rng.random() > 0.25 else None
        cap_place = place if rng.random() > 0.25 else None
        out.append({"cls": cls, "colour": col, "size": size, "place": place, "caption": caption(cls, col, cap_size, cap_place)})
    return out


def render(labels: list[dict], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n,32,32,3) float32 in [0,1] and object masks (n,32,32) for ``labels``."""
    rng = np.random.default_rng(seed + 7919)
    n = len(labels)
    imgs = np.empty((n, RES, RES, 3), np.float32)
    masks = np.empty((n, RES, RES), np.float32)
    yy = np.linspace(0, 1, BIG, dtype=np.float32)[:, None, None]
    for i, lab in enumerate(labels):
        c1 = rng.uniform(205, 250, 3)
        c2 = c1 if rng.random() < 0.5 else rng.uniform(205, 250, 3)
        bg = (c1 * (1 - yy) + c2 * yy) * np.ones((1, BIG, 1), np.float32)
        im = Image.fromarray(bg.astype(np.uint8))
        mk = Image.new("L", (BIG, BIG), 0)
        col = np.array(RGB[lab["colour"]]) + rng.integers(-15, 16, 3)
        fill = tuple(int(v) for v in np.clip(col, 0, 255))
        dark = tuple(int(v * 0.55) for v in fill)
        dx, dy = OFFSET[lab["place"]]
        s = SIZE_PX[lab["size"]] * rng.uniform(0.9, 1.1)
        cx = BIG / 2 + dx + rng.uniform(-3, 3)
        cy = BIG / 2 + dy + rng.uniform(-3, 3)
        _draw(ImageDraw.Draw(im), lab["cls"], cx, cy, s, fill, dark)
        _draw(ImageDraw.Draw(mk), lab["cls"], cx, cy, s, 255, 255)
        imgs[i] = np.asarray(im.resize((RES, RES), Image.BOX), np.float32) / 255
        masks[i] = np.asarray(mk.resize((RES, RES), Image.BOX), np.float32) / 255
    return imgs, masks


def scenes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    labels = sample_labels(n, seed)
    imgs, masks = render(labels, seed)
    return imgs, masks, labels


# ---- styles -------------------------------------------------------------------------------
_YX = np.mgrid[0:RES, 0:RES].astype(np.float32)
_R2 = (((_YX[0] - (RES - 1) / 2) ** 2 + (_YX[1] - (RES - 1) / 2) ** 2) / (2 * ((RES - 1) / 2) ** 2))  # 0 centre, 1 corner


def _paper_texture() -> np.ndarray:
    rng = np.random.default_rng(12345)
    t = rng.normal(size=(RES, RES)).astype(np.float32)
    # fibres: a little horizontal smoothing
    t = (t + np.roll(t, 1, 1) + np.roll(t, -1, 1)) / 3
    return t / t.std()


PAPER = _paper_texture()
CREAM = np.array([0.96, 0.89, 0.72], np.float32)
PALETTE = np.array([[0.10, 0.35, 0.40], [0.90, 0.42, 0.35], [0.92, 0.75, 0.30], [0.15, 0.15, 0.30], [0.95, 0.92, 0.82]], np.float32)
NEON_BG = np.array([0.04, 0.03, 0.12], np.float32)


def storybook(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Parent: cream paper tint, paper grain, strong vignette."""
    y = 0.75 * x + 0.25 * CREAM
    y = y * (1 - 0.55 * _R2)[None, :, :, None]
    y = y + 0.035 * PAPER[None, :, :, None]
    return np.clip(y, 0, 1)


def palette(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Child: every pixel snapped to the nearest of five fixed colours."""
    d = ((x[..., None, :] - PALETTE) ** 2).sum(-1)
    return PALETTE[d.argmin(-1)]


def stripes(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Child: diagonal hatching, period 4 px, darkening by 40 %."""
    band = (((_YX[0] + _YX[1]) % 4) < 2).astype(np.float32)
    return x * (1 - 0.4 * band)[None, :, :, None]


def outline(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Child: thick near-black outline around the object (mask edge, 2 px)."""
    b = (m > 0.5).astype(np.float32)
    dil = b.copy()
    ero = b.copy()
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)):
        dil = np.maximum(dil, np.roll(b, (dy, dx), (1, 2)))
        ero = np.minimum(ero, np.roll(b, (dy, dx), (1, 2)))
    ring = np.clip(dil - ero, 0, 1)[..., None]
    return x * (1 - ring) + 0.08 * ring


def pixel(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Child: 4×4 pixel blocks."""
    n = x.shape[0]
    b = x.reshape(n, RES // 4, 4, RES // 4, 4, 3).mean((2, 4), keepdims=True)
    return np.broadcast_to(b, (n, RES // 4, 4, RES // 4, 4, 3)).reshape(n, RES, RES, 3).copy()


def mono(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Independent: high-contrast monochrome (luminance through a steep curve)."""
    g = x @ np.array([0.299, 0.587, 0.114], np.float32)
    g = 1 / (1 + np.exp(-(g - 0.55) * 10))
    return np.repeat(g[..., None], 3, -1)


def neon(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Independent: dark night background, saturated glowing object."""
    mm = m[..., None]
    mx = x.max(-1, keepdims=True)
    mn = x.min(-1, keepdims=True)
    sat = (x - mn) / np.maximum(mx - mn, 1e-3)  # fully saturated, max 1
    glow = (mm + np.roll(mm, 1, 1) + np.roll(mm, -1, 1) + np.roll(mm, 1, 2) + np.roll(mm, -1, 2)) / 5
    return np.clip(NEON_BG * (1 - glow) + sat * glow, 0, 1)


PARENT = "storybook"
CHILDREN = ("palette", "stripes", "outline", "pixel")
INDEPENDENT = ("mono", "neon")
STYLES = {"storybook": storybook, "palette": palette, "stripes": stripes, "outline": outline, "pixel": pixel, "mono": mono, "neon": neon}


def styled(name: str, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The training target of style ``name``: children are applied on top of the parent."""
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; expected one of {sorted(STYLES)}")
    if name in CHILDREN:
        return STYLES[name](storybook(x, m), m).astype(np.float32)
    return STYLES[name](x, m).astype(np.float32)
