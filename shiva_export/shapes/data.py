"""Procedural scenes: one coloured shape on a plain, lightly tinted background, with a caption and a mask.

Why this and not ``sklearn.datasets.load_digits``: digits are 8x8 px (64 pixels, a 4-token latent after an
8x VAE), have no background to prune, no caption vocabulary the embedded tokenizers know as words, and
only 1797 samples. Scenes are unlimited, deterministic from a seed, come at any size (128 px -> a 16 x 16
latent -> 256 image tokens with patch 1), and carry a ground-truth foreground mask, so a router's choice can
be scored against the truth. Every attribute is in the caption ("a small red circle top left"), so
prompt accuracy is decidable by image analysis alone.

numpy only; everything is a pure function of its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shiva_export.errors import ConfigError

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "IMAGE_SIZE",
    "Scene",
    "all_scenes",
    "sample_scenes",
    "render",
    "render_batch",
    "caption",
    "parse_caption",
    "token_mask",
]

IMAGE_SIZE = 128
#: RGB in [0, 1]; saturated and far from the light backgrounds and from each other.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.20, 0.85),
    "yellow": (0.95, 0.80, 0.05),
}
SHAPES = ("circle", "square", "triangle")
#: Radius of the circumscribed circle, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.10, "big": 0.18}
#: Centre of each position, as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
_JITTER = 0.04  # centre jitter (fraction of the side)
_SIZE_JITTER = 0.12  # relative radius jitter


@dataclass(frozen=True)
class Scene:
    """One scene: the four captioned attributes plus the uncaptioned jitter (centre, radius, background)."""

    color: str
    shape: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    dr: float = 0.0
    background: tuple[float, float, float] = (0.85, 0.85, 0.85)

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.color, self.shape, self.size, self.position)


def caption(scene: Scene) -> str:
    """``"a small red circle top left"``."""
    return f"a {scene.size} {scene.color} {scene.shape} {scene.position}"


def parse_caption(text: str) -> tuple[str, str, str, str]:
    """(color, shape, size, position) of a caption written by :func:`caption`."""
    words = text.strip().split()
    if len(words) != 6 or words[0] != "a":
        raise ConfigError(
            f"Not a shapes caption: {text!r}. Expected 'a <size> <color> <shape> <top|bottom> <left|right>'."
        )
    size, color, shape, pos = words[1], words[2], words[3], " ".join(words[4:])
    if size not in SIZES or color not in COLORS or shape not in SHAPES or pos not in POSITIONS:
        raise ConfigError(
            f"Not a shapes caption: {text!r}. Sizes {list(SIZES)}, colours {list(COLORS)}, shapes {list(SHAPES)}, positions {list(POSITIONS)}."
        )
    return color, shape, size, pos


def all_scenes() -> list[Scene]:
    """Every attribute combination once, without jitter (a fixed, ordered prompt set)."""
    return [Scene(c, s, z, p) for c in COLORS for s in SHAPES for z in SIZES for p in POSITIONS]


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes with uniformly drawn attributes and jitter, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tone = rng.uniform(0.78, 0.92)
        tint = rng.uniform(-0.03, 0.03, size=3)
        out.append(
            Scene(
                color=list(COLORS)[rng.integers(len(COLORS))],
                shape=SHAPES[rng.integers(len(SHAPES))],
                size=list(SIZES)[rng.integers(len(SIZES))],
                position=list(POSITIONS)[rng.integers(len(POSITIONS))],
                dx=float(rng.uniform(-_JITTER, _JITTER)),
                dy=float(rng.uniform(-_JITTER, _JITTER)),
                dr=float(rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)),
                background=tuple(float(v) for v in np.clip(tone + tint, 0.0, 1.0)),
            )
        )
    return out


def _shape_mask(scene: Scene, size: int, supersample: int = 4) -> np.ndarray:
    """Soft coverage in [0, 1] (``supersample``^2 samples per pixel), shape (size, size)."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.dx, cy + scene.dy
    r = SIZES[scene.size] * (1.0 + scene.dr)
    if scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif scene.shape == "square":
        h = r * 0.8  # half side: area close to the circle's (0.64 * 4 = 2.56 vs pi)
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    else:  # upward equilateral triangle inscribed in the circle of radius r (bounding box a bit larger)
        rr = r * 1.15
        top, base = cy - rr, cy + rr * 0.5
        half_w = (y - top) / (base - top) * rr * np.sqrt(3) / 2
        inside = (y >= top) & (y <= base) & (np.abs(x - cx) <= half_w)
    cov = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return cov.astype(np.float32)


def render(scene: Scene, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (size, size, 3) in [0, 1], foreground mask float32 (size, size) in [0, 1])."""
    cov = _shape_mask(scene, size)
    bg = np.asarray(scene.background, np.float32)
    fg = np.asarray(COLORS[scene.color], np.float32)
    img = bg[None, None, :] * (1.0 - cov[..., None]) + fg[None, None, :] * cov[..., None]
    return img.astype(np.float32), cov


def render_batch(scenes: list[Scene], size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, size, size) in [-1, 1], masks (n, size, size) in [0, 1]), float32."""
    imgs, masks = zip(*(render(s, size) for s in scenes)) if scenes else ((), ())
    x = np.stack(imgs).transpose(0, 3, 1, 2) * 2.0 - 1.0 if imgs else np.zeros((0, 3, size, size), np.float32)
    m = np.stack(masks) if masks else np.zeros((0, size, size), np.float32)
    return x.astype(np.float32), m.astype(np.float32)


def token_mask(mask: np.ndarray, grid: int) -> np.ndarray:
    """Per-token foreground share: a (..., size, size) mask averaged to (..., grid * grid), row-major."""
    size = mask.shape[-1]
    c = size // grid
    lead = mask.shape[:-2]
    t = mask.reshape(*lead, grid, c, grid, c).mean(axis=(-3, -1))
    return t.reshape(*lead, grid * grid)
