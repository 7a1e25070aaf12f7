"""Analytic judge of shape scenes: reads colour, shape, size and position back from an image.

No network and no training: the background is the median of the image border, the foreground every pixel
whose largest channel difference to it exceeds :data:`FG_THRESHOLD`; then

- colour: the palette entry nearest to the foreground's mean RGB;
- shape: triangle when less than 40% of the shape lies above its bounding box's middle (an upward
  triangle has 25%); else square when its box corners are filled (corner boxes >= 58.5% or box fill >= 88.5%),
  else circle (geometry from the half-way boundary between the shape colour and the background). The class
  must then match its ideal template (a disk, an axis-aligned square or an upward equilateral triangle of
  the same area and centroid) with an intersection over union of at least :data:`TEMPLATE_IOU`; a region
  that does not (an ellipse, a diamond, a lumpy blob) is read as ``"blob"``, never as a circle;
- size: the bounding box's longer side (small <= 0.224 of the image side with jitter, big >= 0.253);
- position: the foreground centroid's quadrant.

A scene holds one shape: when the foreground has a second 8-connected component of at least
:data:`DISTRACTOR_AREA` of the image (a second shape, not a decoder halo), :func:`prompt_correct` marks every
attribute wrong.

:func:`features` is a 19-number description of an image in attribute groups (:data:`FEATURE_GROUPS`:
background and foreground colour, size, shape, position, and the decoder artefacts: colour spread, half-tone
share, background noise), used for the Fréchet distance (:func:`frechet_distance`, the FID analogue; the
standardised form that ``validate quality`` reports is :func:`shiva_export.shapes.metrics.fd_of`). The
judge's accuracy on real rendered scenes is measured by :func:`judge_accuracy` (and pinned by the tests).

numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shiva_export.errors import ShapeError
from shiva_export.shapes.data import COLORS, Scene, render

__all__ = [
    "FG_THRESHOLD",
    "TEMPLATE_IOU",
    "DISTRACTOR_AREA",
    "FEATURE_GROUPS",
    "FEATURE_NAMES",
    "analyze",
    "features",
    "frechet_distance",
    "judge_accuracy",
    "prompt_correct",
]

FG_THRESHOLD = 0.25
_HALF_TONE = 0.08
_MIN_PIXELS = 12
# Thresholds set on real renders *and* on their round trip through the shipped VAE (blurred corners, halos):
_TRIANGLE_TOP, _SQUARE_CORNER, _SQUARE_FILL = 0.4, 0.585, 0.885
_BIG_SIDE = 0.24
#: Least intersection over union with the ideal template of the class read. Fit on 300 real scenes
#: (``sample_scenes(300, 9000)``) and their round trip through the shipped VAE, whose lowest values are
#: 0.935 (circle), 0.869 (square), 0.801 (triangle: the VAE rounds small triangles' corners); an ellipse of
#: aspect 1.3 scores 0.84 against the disk, a diamond 0.83, three overlapping disks 0.85.
TEMPLATE_IOU = {"circle": 0.88, "square": 0.80, "triangle": 0.72}
#: A second 8-connected foreground component of at least this share of the image is a second shape: 120 px
#: at 128 px, over half the smallest real shape (a small triangle, ~218 px); the VAE's halos reach 71 px.
DISTRACTOR_AREA = 0.0073
#: The features by attribute group (the standardised Fréchet distance weighs each group alike).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "background": ("bg_r", "bg_g", "bg_b"),
    "colour": ("fg_r", "fg_g", "fg_b"),
    "size": ("area", "box_w", "box_h"),
    "shape": ("fill", "corner", "top"),
    "position": ("cx", "cy"),
    "artefacts": ("fg_std_r", "fg_std_g", "fg_std_b", "half_tone", "bg_noise"),
}
FEATURE_NAMES = tuple(n for group in FEATURE_GROUPS.values() for n in group)


def _as_hwc(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 3:
        raise ShapeError(f"expected an (H, W, 3) or (3, H, W) image, got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return np.clip(a, 0.0, 1.0)


def _parts(img):
    a = _as_hwc(img)
    h, w, _ = a.shape
    b = max(2, h // 32)
    border = np.concatenate(
        [a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)]
    )
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


def _component_sizes(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the 8-connected components of a boolean ``mask``, largest first.

    Label propagation: every pixel starts with its own index and takes the smallest label among its
    neighbours until nothing changes; a label is always a pixel of the same component, so looking up that
    pixel's label (pointer jumping) is valid and makes the loop converge in a few dozen rounds.
    """
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(lab, 1, constant_values=none)
        low = np.minimum.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
        new = np.append(np.where(mask, low, none).ravel(), none)
        new = new[new[:-1]].reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.sort(np.unique(lab[mask], return_counts=True)[1])[::-1]


def _geometry(a: np.ndarray, bg: np.ndarray, color: str) -> dict | None:
    """Box, fill, corner fill, top share, centroid and area of the half-way region of ``color`` (None: too small)."""
    fg = _half_max(a, bg, color)
    if fg.sum() < _MIN_PIXELS:
        return None
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    return {
        "mask": fg,
        "area": float(fg.mean()),
        "box_w": float(bw / w),
        "box_h": float(bh / h),
        "fill": float(fg.sum() / (bw * bh)),
        "corner": _corner_fill(fg, x0, x1, y0, y1),
        "top": float((ys < (y0 + y1) / 2).mean()),  # share above the box's middle: triangle ~0.25, others ~0.5
        "cx": float(xs.mean() + 0.5) / w,
        "cy": float(ys.mean() + 0.5) / h,
        "side": float(max(bw / w, bh / h)),
    }


def _template_iou(geo: dict, shape: str, supersample: int = 4) -> float:
    """IoU of the region with the ideal ``shape`` of the same area and centroid (the renderer's geometry).

    The template is rasterised (``supersample``^2 samples per pixel, inside when at least half are) only over
    the window that holds both, which keeps it to a millisecond.
    """
    fg = geo["mask"]
    h, w = fg.shape
    n = float(fg.sum())
    cx, cy = geo["cx"] * w, geo["cy"] * h
    side = np.sqrt(
        4 * n / np.sqrt(3)
    )  # the triangle's: side s, height s*sqrt(3)/2, centroid a third of the height above the base
    height = side * np.sqrt(3) / 2
    reach = {"circle": np.sqrt(n / np.pi), "square": np.sqrt(n) / 2, "triangle": 2 * height / 3}[shape]
    ys, xs = np.nonzero(fg)
    y0, y1 = int(max(0, min(ys.min(), cy - reach - 1))), int(min(h, max(ys.max() + 1, cy + reach + 2)))
    x0, x1 = int(max(0, min(xs.min(), cx - reach - 1))), int(min(w, max(xs.max() + 1, cx + reach + 2)))
    x, y = np.meshgrid(
        x0 + (np.arange((x1 - x0) * supersample) + 0.5) / supersample,
        y0 + (np.arange((y1 - y0) * supersample) + 0.5) / supersample,
    )
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= n / np.pi
    elif shape == "square":
        inside = (np.abs(x - cx) <= reach) & (np.abs(y - cy) <= reach)
    else:
        top = cy - reach
        inside = (y >= top) & (y <= top + height) & (np.abs(x - cx) <= (y - top) / height * side / 2)
    t = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3)) >= 0.5
    win = fg[y0:y1, x0:x1]  # holds the whole region
    return float((t & win).sum() / max(1, (t | win).sum()))


def analyze(img) -> dict:
    """Attributes of the one shape in ``img`` (float RGB in [0, 1], HWC or CHW).

    Returns:
        dict: ``color``, ``shape`` (``"blob"`` when the region matches no ideal shape), ``size``, ``position``
        (None when no foreground is found), ``distractor`` (a second foreground component of at least
        :data:`DISTRACTOR_AREA`), and the raw measurements ``area``, ``second`` (the second component's share
        of the image), ``fill``, ``corner``, ``top``, ``iou``, ``cx``, ``cy``, ``side``.
    """
    a, bg, diff, _ = _parts(img)
    fg = diff > FG_THRESHOLD
    out: dict = {
        "color": None,
        "shape": None,
        "size": None,
        "position": None,
        "distractor": False,
        "area": float(fg.mean()),
        "second": 0.0,
    }
    if fg.sum() < _MIN_PIXELS:
        return out
    sizes = _component_sizes(fg)
    out["second"] = float(sizes[1] / fg.size) if len(sizes) > 1 else 0.0
    out["distractor"] = out["second"] >= DISTRACTOR_AREA
    geo = _geometry(
        a, bg, _nearest(a[fg].mean(axis=0))
    )  # geometry from the half-way boundary between shape colour and background
    if geo is None:
        return out
    color = _nearest(a[geo["mask"]].mean(axis=0))
    if geo["top"] < _TRIANGLE_TOP:
        shape = "triangle"
    elif geo["corner"] >= _SQUARE_CORNER or geo["fill"] >= _SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    iou = _template_iou(geo, shape)
    size = "big" if geo["side"] >= _BIG_SIDE else "small"
    position = ("top" if geo["cy"] < 0.5 else "bottom") + " " + ("left" if geo["cx"] < 0.5 else "right")
    out.update(
        color=color, shape=shape if iou >= TEMPLATE_IOU[shape] else "blob", size=size, position=position, iou=iou
    )
    out.update({k: geo[k] for k in ("fill", "corner", "top", "cx", "cy", "side")})
    return out


def prompt_correct(img, attributes: Sequence[str]) -> dict[str, bool]:
    """Per attribute (color, shape, size, position) and ``all``: does ``img`` show what the prompt asked?

    An image with a second shape (:data:`DISTRACTOR_AREA`) shows more than the prompt asked: every attribute
    is wrong.
    """
    got = analyze(img)
    keys = ("color", "shape", "size", "position")
    res = {k: got[k] == v and not got["distractor"] for k, v in zip(keys, attributes)}
    res["all"] = all(res.values())
    return res


def features(img) -> np.ndarray:
    """The 19 numbers of :data:`FEATURE_NAMES` (float64), in the order of :data:`FEATURE_GROUPS`.

    Colour, size, shape and position are measured on the half-way region of the nearest palette colour (as
    the judge reads them, so a decoder's halo does not inflate the size); the artefacts are the colour spread
    inside that region, the share of half-tone pixels (between :data:`FG_THRESHOLD` and a faint 0.08 from
    the background) and the mean absolute deviation of the border from the background.
    """
    a, bg, diff, border = _parts(img)
    fg = diff > FG_THRESHOLD
    half = float(((diff > _HALF_TONE) & ~fg).mean())
    noise = float(np.abs(border - bg).mean())
    geo = _geometry(a, bg, _nearest(a[fg].mean(axis=0))) if fg.sum() >= _MIN_PIXELS else None
    if geo is None:  # no shape: the background's colour, nothing measured, the centre
        return np.array(
            [*bg, *bg, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, half, noise], dtype=np.float64
        )
    pix = a[geo["mask"]]
    geom = [geo[k] for k in ("area", "box_w", "box_h", "fill", "corner", "top", "cx", "cy")]
    return np.array([*bg, *pix.mean(axis=0), *geom, *pix.std(axis=0), half, noise], dtype=np.float64)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` (n, d) and ``b`` (m, d).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` with symmetric PSD square roots
    (numpy only). Both sets must have at least 2 rows. The raw distance weighs features by their variance;
    ``validate quality`` reports :func:`shiva_export.shapes.metrics.fd_of`, on standardised features.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ShapeError("frechet_distance needs at least 2 samples per set")
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
