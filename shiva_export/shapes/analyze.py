"""Analytic judge of shape scenes: reads colour, shape, size and position back from an image.

No network and no training: the background is the median of the image border, the foreground every pixel
whose largest channel difference to it exceeds :data:`FG_THRESHOLD`; then

- colour: the palette entry nearest to the foreground's mean RGB;
- shape: triangle when less than 40% of the shape lies above its bounding box's middle (an upward
  triangle has 25%); else square when its box corners are filled (corner boxes >= 58.5% or box fill >= 88.5%),
  else circle (geometry from the half-way boundary between the shape colour and the background);
- size: the bounding box's longer side (small <= 0.224 of the image side with jitter, big >= 0.253);
- position: the foreground centroid's quadrant.

:func:`features` is a 17-number description of an image (background and foreground colour, colour spread,
area, fill, centroid, box, the share of half-tone pixels and the background noise), used for the
Fréchet distance (:func:`frechet_distance`, the FID analogue). The judge's accuracy on real rendered
scenes is measured by :func:`judge_accuracy` (and pinned by the tests).

numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shiva_export.shapes.data import COLORS, Scene, render

__all__ = ["FG_THRESHOLD", "analyze", "features", "frechet_distance", "judge_accuracy", "prompt_correct", "FEATURE_NAMES"]

FG_THRESHOLD = 0.25
_HALF_TONE = 0.08
_MIN_PIXELS = 12
# Thresholds set on real renders *and* on their round trip through the shipped VAE (blurred corners, halos):
_TRIANGLE_TOP, _SQUARE_CORNER, _SQUARE_FILL = 0.4, 0.585, 0.885
_BIG_SIDE = 0.24
FEATURE_NAMES = (
    "bg_r", "bg_g", "bg_b", "fg_r", "fg_g", "fg_b", "fg_std_r", "fg_std_g", "fg_std_b",
    "area", "fill", "cx", "cy", "box_w", "box_h", "half_tone", "bg_noise",
)


def _as_hwc(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"expected an (H, W, 3) or (3, H, W) image, got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return np.clip(a, 0.0, 1.0)


def _parts(img):
    a = _as_hwc(img)
    h, w, _ = a.shape
    b = max(2, h // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    diff = np.abs(a - bg).max(axis=-1)
    return a, bg, diff, border


def _nearest(rgb) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c]) - rgb) ** 2)))


def _half_max(a: np.ndarray, bg: np.ndarray, color: str) -> np.ndarray:
    """Pixels nearer the palette colour than the background: the shape's half-way boundary, robust to blur and halos."""
    c = np.asarray(COLORS[color])
    return ((a - c) ** 2).sum(-1) < ((a - bg) ** 2).sum(-1)


def _corner_fill(fg: np.ndarray, x0, x1, y0, y1) -> float:
    """Mean foreground share of the four corner boxes (a quarter of the box side each): square ~1, circle ~0.4."""
    xs = np.arange(fg.shape[1])
    ys = np.arange(fg.shape[0])
    qx, qy = (x1 - x0 + 1) / 4, (y1 - y0 + 1) / 4
    vals = []
    for xa, xb in ((x0, x0 + qx), (x1 + 1 - qx, x1 + 1)):
        for ya, yb in ((y0, y0 + qy), (y1 + 1 - qy, y1 + 1)):
            cx = (xs >= np.floor(xa)) & (xs < np.ceil(xb))
            cy = (ys >= np.floor(ya)) & (ys < np.ceil(yb))
            box = fg[np.ix_(cy, cx)]
            vals.append(float(box.mean()) if box.size else 0.0)
    return float(np.mean(vals))


def analyze(img) -> dict:
    """Attributes of the one shape in ``img`` (float RGB in [0, 1], HWC or CHW).

    Returns:
        dict: ``color``, ``shape``, ``size``, ``position`` (None when no foreground is found), and the raw
        measurements ``area``, ``fill``, ``cx``, ``cy``, ``side``.
    """
    a, bg, diff, _ = _parts(img)
    h, w, _ = a.shape
    fg = diff > FG_THRESHOLD
    out: dict = {"color": None, "shape": None, "size": None, "position": None, "area": float(fg.mean())}
    if fg.sum() < _MIN_PIXELS:
        return out
    color = _nearest(a[fg].mean(axis=0))
    fg = _half_max(a, bg, color)  # geometry from the half-way boundary between shape colour and background
    if fg.sum() < _MIN_PIXELS:
        return out
    ys, xs = np.nonzero(fg)
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    fill = float(fg.sum() / (bw * bh))
    cx, cy = float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h
    side = float(max(bw / w, bh / h))
    corner = _corner_fill(fg, x0, x1, y0, y1)
    top = float((ys < (y0 + y1) / 2).mean())  # share of the shape above its box's middle: triangle ~0.25, others ~0.5
    color = _nearest(a[fg].mean(axis=0))
    if top < _TRIANGLE_TOP:
        shape = "triangle"
    elif corner >= _SQUARE_CORNER or fill >= _SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    size = "big" if side >= _BIG_SIDE else "small"
    position = ("top" if cy < 0.5 else "bottom") + " " + ("left" if cx < 0.5 else "right")
    out.update(color=color, shape=shape, size=size, position=position, fill=fill, corner=corner, top=top, cx=cx, cy=cy, side=side)
    return out


def prompt_correct(img, attributes: Sequence[str]) -> dict[str, bool]:
    """Per attribute (color, shape, size, position) and ``all``: does ``img`` show what the prompt asked?"""
    got = analyze(img)
    keys = ("color", "shape", "size", "position")
    res = {k: got[k] == v for k, v in zip(keys, attributes)}
    res["all"] = all(res.values())
    return res


def features(img) -> np.ndarray:
    """The 17 numbers of :data:`FEATURE_NAMES` (float64)."""
    a, bg, diff, border = _parts(img)
    h, w, _ = a.shape
    fg = diff > FG_THRESHOLD
    n = int(fg.sum())
    if n >= _MIN_PIXELS:
        ys, xs = np.nonzero(fg)
        pix = a[fg]
        fm, fs = pix.mean(axis=0), pix.std(axis=0)
        bw, bh = (xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h
        fill = n / (bw * bh * w * h)
        cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    else:
        fm, fs = bg, np.zeros(3)
        bw = bh = fill = 0.0
        cx = cy = 0.5
    half = float(((diff > _HALF_TONE) & ~fg).mean())
    noise = float(np.abs(border - bg).mean())
    return np.array([*bg, *fm, *fs, n / (h * w), fill, cx, cy, bw, bh, half, noise], dtype=np.float64)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` (n, d) and ``b`` (m, d).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` with symmetric PSD square roots
    (numpy only). Both sets must have at least 2 rows.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _sqrtm_psd(sa)
    cross = _sqrtm_psd(ra @ sb @ ra)
    return float(max(0.0, np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.trace(cross)))


def judge_accuracy(scenes: Sequence[Scene], size: int | None = None) -> dict[str, float]:
    """Accuracy of :func:`analyze` on real rendered ``scenes``: per attribute and all four together."""
    hits = {"color": 0, "shape": 0, "size": 0, "position": 0, "all": 0}
    for s in scenes:
        img, _ = render(s) if size is None else render(s, size)
        for k, v in prompt_correct(img, s.attributes).items():
            hits[k] += int(v)
    n = max(1, len(scenes))
    return {k: v / n for k, v in hits.items()}


