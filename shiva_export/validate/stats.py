"""Paired statistics for comparing two generation configurations on the same prompts and seeds.

Every comparison here is *paired*: image ``i`` of configuration A and image ``i`` of configuration B share the
prompt and the seed, so per-prompt difficulty cancels out.

- :func:`mcnemar_exact`: two-sided exact McNemar test of two paired binary outcomes (judge correct / wrong).
  Under H0 the discordant pairs split 50/50, so the p-value is a binomial tail on ``b + c`` trials.
- :func:`paired_bootstrap`: percentile bootstrap CI of ``stat(A[idx]) - stat(B[idx])`` over resampled pairs,
  for any statistic of a set of images (mean PSNR, or a Fréchet distance that is only defined on a set).
- :func:`wilson_interval`: the 95% score interval of one proportion (accuracy of one row).

A difference is *significant* here when its test rejects at ``alpha`` (default 0.05): McNemar's p < alpha, or a
bootstrap CI (1 - alpha) that excludes zero. Nothing is corrected for multiple comparisons; the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shiva_export.errors import ConfigError

__all__ = ["ALPHA", "Comparison", "mcnemar_exact", "paired_bootstrap", "paired_bootstrap_mean", "wilson_interval"]

#: Significance level of every test in the frontier report.
ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """A paired difference ``A - B`` with its interval and test.

    Args:
        diff (float): The observed difference of the statistic (A minus B).
        low, high (float): Its (1 - alpha) interval (bootstrap), or NaN for McNemar.
        p (float): The test's p-value (NaN for a bootstrap CI).
        significant (bool): The test rejects "no difference" at alpha.
        detail (str): What was tested (for the report).
    """

    diff: float
    low: float
    high: float
    p: float
    significant: bool
    detail: str

    def to_dict(self) -> dict:
        return {
            "diff": _num(self.diff),
            "low": _num(self.low),
            "high": _num(self.high),
            "p": _num(self.p),
            "significant": self.significant,
            "detail": self.detail,
        }


def _num(v: float):
    return None if v is None or not math.isfinite(v) else float(v)


def _paired(a: Sequence, b: Sequence, what: str) -> int:
    if len(a) != len(b):
        raise ConfigError(
            f"{what}: paired samples differ in length ({len(a)} vs {len(b)}); compare configurations run on the same prompts and seeds."
        )
    if not a:
        raise ConfigError(f"{what}: no paired samples; run at least one prompt.")
    return len(a)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool], alpha: float = ALPHA) -> Comparison:
    """Exact two-sided McNemar test of paired binary outcomes; ``diff`` is accuracy(A) - accuracy(B).

    ``b_only`` pairs are right only for A, ``c_only`` right only for B; p = min(1, 2 * P[X <= min] ) with
    X ~ Binomial(b_only + c_only, 1/2).
    """
    n = _paired(a, b, "McNemar")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    m = a_only + b_only
    if m == 0:
        p = 1.0
    else:
        tail = sum(math.comb(m, i) for i in range(min(a_only, b_only) + 1)) / 2.0**m
        p = min(1.0, 2.0 * tail)
    diff = (sum(map(bool, a)) - sum(map(bool, b))) / n
    return Comparison(
        diff, math.nan, math.nan, p, p < alpha, f"McNemar exact: {a_only} right only for A, {b_only} only for B, n={n}"
    )


def paired_bootstrap(
    a: Sequence, b: Sequence, stat: Callable[[list], float], *, n_boot: int = 1000, alpha: float = ALPHA, seed: int = 0
) -> Comparison:
    """Percentile bootstrap CI of ``stat(A) - stat(B)``, resampling the pairs (same indices for A and B).

    Args:
        a, b (Sequence): Per-image values of A and B in the same order (numbers, or feature vectors).
        stat (Callable[[list], float]): The statistic of a list of per-image values (e.g. the mean, or a
            Fréchet distance to a fixed reference).
        n_boot (int): Resamples. Defaults to 1000.
        seed (int): Seed of the resampling (the report is reproducible). Defaults to 0.
    """
    import numpy as np

    n = _paired(a, b, "paired bootstrap")
    if n_boot < 10:
        raise ConfigError(f"n_boot {n_boot} is too small for a percentile interval; use >= 10 (1000 is the default).")
    rng = np.random.default_rng(seed)
    diff = float(stat(list(a)) - stat(list(b)))
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        draws.append(float(stat([a[i] for i in idx]) - stat([b[i] for i in idx])))
    finite = [d for d in draws if math.isfinite(d)]
    if not finite:
        return Comparison(diff, math.nan, math.nan, math.nan, False, f"paired bootstrap: no finite resample (n={n})")
    low, high = (float(v) for v in np.quantile(finite, [alpha / 2, 1 - alpha / 2]))
    sig = low > 0 or high < 0
    return Comparison(
        diff, low, high, math.nan, sig, f"paired bootstrap {1 - alpha:.0%} CI over {n} pairs, {n_boot} resamples"
    )


def paired_bootstrap_mean(
    a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, alpha: float = ALPHA, seed: int = 0
) -> Comparison:
    """:func:`paired_bootstrap` of the mean difference, vectorised (one index matrix for every resample)."""
    import numpy as np

    n = _paired(a, b, "paired bootstrap")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    means = d[idx].mean(axis=1)
    low, high = (float(v) for v in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    return Comparison(
        float(d.mean()),
        low,
        high,
        math.nan,
        low > 0 or high < 0,
        f"paired bootstrap {1 - alpha:.0%} CI of the mean difference over {n} pairs, {n_boot} resamples",
    )


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); ``(nan, nan)`` for ``n = 0``."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)
