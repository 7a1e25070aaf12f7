"""Per-image judgments, the standardised Fréchet distance and the intervals that ``validate quality`` reports.

- :func:`judge_images`: per image, what the analytic judge read, whether each attribute matches the prompt,
  and the :func:`~shiva_export.shapes.analyze.features` vector (the per-image record of ``quality.json``);
- :func:`fd_of`: the Fréchet distance of feature rows to a real reference set after standardising both
  with the reference's statistics (:func:`standardize`), so colour, which has most of the raw variance, no
  longer drowns shape, size and position;
- :func:`seed_band`: mean and min..max of per-seed FDs (how far the same generator moves between seeds);
- :func:`bootstrap_ci`: a percentile interval of any statistic under resampling of prompts (every seed of a
  resampled prompt comes along), used for accuracy, FD and paired differences between methods.

numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.shapes.analyze import FEATURE_GROUPS, FEATURE_NAMES, analyze, features, frechet_distance

__all__ = ["FD_GROUPS", "judge_images", "standardize", "fd_of", "seed_band", "bootstrap_ci"]

#: The attribute groups the standardised FD compares. The decoder artefacts (colour spread, half-tone share,
#: background noise) are left out: clean renders have none, so the real set gives them no scale (zero
#: variance), and standardising by it would let any decoded image's faint halo outweigh every attribute.
FD_GROUPS = ("background", "colour", "size", "shape", "position")
#: Smallest scale of a feature (features are in [0, 1] units): a prompt set of one colour has zero colour
#: variance, which must not divide by zero.
_MIN_SCALE = 1e-3
_KEYS = ("color", "shape", "size", "position")


def judge_images(images: Sequence, scenes: Sequence) -> list[dict]:
    """Per image (float RGB in [0, 1], HWC or CHW) and its prompt's scene (anything with ``attributes``).

    Returns:
        list[dict]: one record per image: ``correct`` (bool per attribute and ``all``, as
        :func:`~shiva_export.shapes.analyze.prompt_correct`), ``read`` (the attributes the judge read, and
        ``distractor``) and ``features`` (the 19 floats of
        :data:`~shiva_export.shapes.analyze.FEATURE_NAMES`).
    """
    if len(images) != len(scenes):
        raise ShapeError(f"judge_images got {len(images)} images for {len(scenes)} scenes; give one scene per image.")
    out = []
    for img, scene in zip(images, scenes):
        got = analyze(img)
        correct = {k: bool(got[k] == v and not got["distractor"]) for k, v in zip(_KEYS, scene.attributes)}
        correct["all"] = all(correct.values())
        read = {k: got[k] for k in _KEYS} | {"distractor": bool(got["distractor"])}
        out.append({"correct": correct, "read": read, "features": [float(v) for v in features(img)]})
    return out


def _columns() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the FD features in :data:`FEATURE_NAMES` and the weight of each (1 / sqrt(group size))."""
    idx, wts = [], []
    for g in FD_GROUPS:
        names = FEATURE_GROUPS[g]
        idx += [FEATURE_NAMES.index(n) for n in names]
        wts += [1.0 / np.sqrt(len(names))] * len(names)
    return np.asarray(idx), np.asarray(wts)


def standardize(feats, ref) -> np.ndarray:
    """``feats`` (n, 19) in the reference's units: the :data:`FD_GROUPS` columns, z-scored with the mean and
    standard deviation of ``ref`` (m, 19), each divided by the square root of its group's size.

    On ``ref`` itself every group then has total variance 1, so each attribute group carries the same weight
    in the distance whatever its raw spread (raw colour channels vary ~0.3, backgrounds ~0.04).
    """
    feats, ref = np.atleast_2d(np.asarray(feats, np.float64)), np.atleast_2d(np.asarray(ref, np.float64))
    for name, a in (("features", feats), ("reference", ref)):
        if a.shape[-1] != len(FEATURE_NAMES):
            raise ShapeError(f"{name} have {a.shape[-1]} columns; expected the {len(FEATURE_NAMES)} of FEATURE_NAMES.")
    idx, wts = _columns()
    mu, sd = ref[:, idx].mean(0), np.maximum(ref[:, idx].std(0), _MIN_SCALE)
    return (feats[:, idx] - mu) / sd * wts


def fd_of(feats, ref) -> float:
    """Fréchet distance of feature rows ``feats`` (n, 19) to the real reference rows ``ref`` (m, 19), both
    :func:`standardize`-d with the reference's statistics (n, m >= 2)."""
    return frechet_distance(standardize(feats, ref), standardize(ref, ref))


def seed_band(fd_by_seed: Mapping[int, float]) -> dict:
    """``{"mean", "min", "max", "n"}`` of per-seed FDs: the spread of one generator between seeds, which a
    difference between methods must exceed to mean anything."""
    vals = [float(v) for v in fd_by_seed.values()]
    if not vals:
        raise ConfigError("seed_band needs at least one seed's FD.")
    return {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals), "n": len(vals)}


def bootstrap_ci(
    n_prompts: int, stat: Callable[[np.ndarray], float], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of ``stat(prompt_indices)`` over ``n_boot`` resamples of the prompts with replacement.

    ``stat`` gets an index array of length ``n_prompts`` (repeats allowed) and returns the statistic of those
    prompts with all their seeds, e.g. ``lambda i: correct[i].mean()`` for a (prompts, seeds) array. The same
    ``seed`` draws the same resamples for every method, so differences of two statistics are paired.
    """
    if n_prompts < 1 or n_boot < 1 or not 0.0 < level < 1.0:
        raise ConfigError(
            f"bootstrap_ci needs n_prompts >= 1, n_boot >= 1 and 0 < level < 1; got {n_prompts}, {n_boot}, {level}."
        )
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n_prompts, n_prompts)) for _ in range(n_boot)], dtype=np.float64)
    lo, hi = np.nanpercentile(vals, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
