"""``validate estimator``: does the training estimator's dL/dkeep point where the real routed loss goes?

Per routed layer ``l`` and keep level ``q`` (every routed layer at ``q``), the estimator's gradient of the
distillation loss with respect to layer ``l``'s keep ratio (summed over the batch) is compared with the
central finite difference of the **real, hard-routed** loss, ``(L(q_l + d) - L(q_l - d)) / 2d``, on the
same inputs, router and teacher. The forward of the student equals hard routing bit for bit, so the finite
difference is exactly the loss deployment would see. Reported per case: both values, sign agreement and
the magnitude ratio ``|estimator| / |finite difference|``; per estimator, over the cases whose finite
difference is not flat:

- **sign agreement**: the share of cases with the finite difference's sign;
- **rank agreement**: Spearman's rank correlation of estimate and finite difference across layers and keep
  levels (does the estimator know which layer's tokens matter most?);
- **magnitude error**: ``mean |estimate - fd| / mean |fd|``.

Each is set beside a **constant baseline**, the estimator replaced by the median finite difference (the
constant with the least absolute error): on a model where more tokens always lower the loss every finite
difference is negative, and a constant negative value agrees in sign 100% of the time. An estimator
:meth:`~EstimatorReport.beats_baseline` when its rank agreement is above the constant's (0: a constant ranks
nothing) and its magnitude error below the constant's; ``--beat-baseline`` gates on it.

The training review found the paper's residual STE wrong in sign on most SD3.5 layers (more tokens always
lower the loss, the estimator says otherwise); the output-gated estimator was right in sign in 30 of 30
cases, which on that model a constant negative value matches, hence the rank and magnitude measures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from shiva_export.errors import ConfigError
from shiva_export.logging import get_logger
from shiva_export.models import get_adapter, load_transformer, num_blocks, router_dims
from shiva_export.prune.api import ShivaConfig, apply_shiva_, set_route_override
from shiva_export.prune.router import load_routers
from shiva_export.recipe import Recipe, load_recipe
from shiva_export.train.cached import make_data
from shiva_export.train.policy import stratified_timesteps
from shiva_export.train.ste import ESTIMATORS, DifferentiableTopK
from shiva_export.train.student import RouteState, distill_loss, forward_with_taps, make_override, tap_hook

__all__ = ["EstimatorCase", "EstimatorReport", "check_estimator"]

logger = get_logger(__name__)

#: A finite difference smaller than this (relative to the loss) counts as flat: no sign to agree with.
FLAT_REL = 1e-6


@dataclass
class EstimatorCase:
    estimator: str
    keep: float
    layer: int
    grad: float
    finite_difference: float
    agree: bool | None  # None: flat finite difference

    @property
    def ratio(self) -> float:
        return abs(self.grad) / abs(self.finite_difference) if self.finite_difference else math.inf


@dataclass
class EstimatorReport:
    model: str
    router: str
    keeps: list[float]
    delta: float
    samples: int
    cases: list[EstimatorCase] = field(default_factory=list)
    loss: float = 0.0

    def agreement(self, estimator: str) -> float:
        c = [x for x in self.cases if x.estimator == estimator and x.agree is not None]
        return sum(x.agree for x in c) / len(c) if c else math.nan

    def median_ratio(self, estimator: str) -> float:
        r = sorted(x.ratio for x in self.cases if x.estimator == estimator and x.agree is not None)
        return r[len(r) // 2] if r else math.nan

    def _pairs(self, estimator: str) -> tuple[list[float], list[float]]:
        c = [x for x in self.cases if x.estimator == estimator and x.agree is not None]
        return [x.grad for x in c], [x.finite_difference for x in c]

    def rank_agreement(self, estimator: str) -> float:
        """Spearman correlation of estimate and finite difference over the non-flat cases (0 when either is constant)."""
        g, f = self._pairs(estimator)
        return _spearman(g, f) if len(g) >= 2 else math.nan

    def magnitude_error(self, estimator: str) -> float:
        """``mean |estimate - fd| / mean |fd|`` over the non-flat cases."""
        g, f = self._pairs(estimator)
        return _relative_error(g, f)

    def baseline(self, estimator: str) -> dict[str, float]:
        """The same three measures for the estimator replaced by the median finite difference of its cases."""
        _, f = self._pairs(estimator)
        if not f:
            return {
                "value": math.nan,
                "sign_agreement": math.nan,
                "rank_agreement": math.nan,
                "magnitude_error": math.nan,
            }
        c = sorted(f)[len(f) // 2] if len(f) % 2 else (sorted(f)[len(f) // 2 - 1] + sorted(f)[len(f) // 2]) / 2
        sign = sum(c != 0 and math.copysign(1, c) == math.copysign(1, v) for v in f) / len(f)
        return {
            "value": c,
            "sign_agreement": sign,
            "rank_agreement": 0.0,
            "magnitude_error": _relative_error([c] * len(f), f),
        }

    def beats_baseline(self, estimator: str) -> bool:
        """Rank agreement above the constant's (0) and magnitude error below the constant's."""
        base = self.baseline(estimator)
        rank, err = self.rank_agreement(estimator), self.magnitude_error(estimator)
        return bool(rank > base["rank_agreement"] and err < base["magnitude_error"])

    @property
    def estimators(self) -> list[str]:
        return list(dict.fromkeys(c.estimator for c in self.cases))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cases"] = [dict(asdict(c), ratio=c.ratio) for c in self.cases]
        d["summary"] = {
            e: {
                "sign_agreement": self.agreement(e),
                "median_magnitude_ratio": self.median_ratio(e),
                "rank_agreement": self.rank_agreement(e),
                "magnitude_error": self.magnitude_error(e),
                "constant_baseline": self.baseline(e),
                "beats_baseline": self.beats_baseline(e),
            }
            for e in self.estimators
        }
        return d

    def to_markdown(self) -> str:
        lines = [
            f"# Estimator check: {self.model} (router: {self.router})",
            "",
            f"{self.samples} samples, stratified timesteps; keep levels {', '.join(f'{k:g}' for k in self.keeps)}; "
            f"finite differences at +-{self.delta:g} of the hard-routed distillation loss ({self.loss:.5g} at the first level).",
            "",
            "Beside each measure, in brackets, the same for a constant estimator (the median finite difference).",
            "",
            "| estimator | sign agreement | rank agreement (Spearman) | magnitude error | median abs(est) / abs(fd) | beats constant | cases |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for e in self.estimators:
            n = sum(1 for c in self.cases if c.estimator == e and c.agree is not None)
            b = self.baseline(e)
            lines.append(
                f"| {e} | {self.agreement(e):.0%} ({b['sign_agreement']:.0%}) | {self.rank_agreement(e):+.2f} (+0.00) | "
                f"{self.magnitude_error(e):.2f} ({b['magnitude_error']:.2f}) | {self.median_ratio(e):.2f} | "
                f"{'yes' if self.beats_baseline(e) else 'NO'} | {n} |"
            )
        fds = [c.finite_difference for c in self.cases if c.agree is not None]
        if fds and (all(v < 0 for v in fds) or all(v > 0 for v in fds)):
            lines += [
                "",
                "Every finite difference has the same sign, so sign agreement cannot tell an estimator from a constant; "
                "rank agreement and magnitude error can.",
            ]
        lines += [
            "",
            "| estimator | keep | layer | dL/dkeep (est.) | finite difference | sign |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for c in self.cases:
            mark = "flat" if c.agree is None else ("ok" if c.agree else "WRONG")
            lines.append(
                f"| {c.estimator} | {c.keep:g} | {c.layer} | {c.grad:+.3e} | {c.finite_difference:+.3e} | {mark} |"
            )
        return "\n".join(lines) + "\n"


def _ranks(v: list[float]) -> list[float]:
    """Ranks from 0, ties sharing their mean rank."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2
        i = j + 1
    return r


def _spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks; 0 when either side is constant (it ranks nothing)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def _relative_error(est: list[float], fd: list[float]) -> float:
    scale = sum(abs(v) for v in fd)
    return sum(abs(e - f) for e, f in zip(est, fd)) / scale if scale > 0 else math.nan


def check_estimator(
    recipe_or_model,
    *,
    estimators: Sequence[str] = ("output-gated", "residual"),
    keeps: Sequence[float] = (0.4, 0.6, 0.8),
    delta: float = 0.1,
    samples: int = 8,
    router: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> EstimatorReport:
    """Compares each estimator's dL/dkeep with finite differences of the real routed loss.

    Args:
        recipe_or_model: Model name, recipe path or Recipe.
        estimators: ``output-gated`` and/or ``residual``.
        keeps: Keep levels (every routed layer at the level; one layer moved at a time).
        delta: Finite-difference step of the keep ratio.
        samples: Batch of seeded samples (stratified timesteps).
        router: ``"random"`` (the recipe's seeded untrained router), a router safetensors path, or None
            (the recipe's trained router if it has one, else random).
        data: Training data (``--data`` of ``train``); None = synthetic inputs.
        weights: Local diffusers folder of the backbone.
        seed: Seed of the inputs.
    """
    say = progress or (lambda s: None)
    _check_estimator_args(estimators, keeps, delta, samples)
    rec = recipe_or_model if isinstance(recipe_or_model, Recipe) else load_recipe(recipe_or_model)
    say("load model")
    transformer, routed, label = _routed_model(rec, weights, router)
    h, w, t_len = rec.shapes.height, rec.shapes.width, rec.shapes.text_len
    src = make_data(data, transformer, h, w, t_len, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch = src.batch(samples, timesteps=stratified_timesteps(samples, generator=g))
    inputs = batch.model_inputs()
    state, hooks = _route_with_taps(transformer, routed)
    try:
        say("teacher (dense)")
        with torch.no_grad():
            state.mode, state.record_updates, state.updates = "dense", True, {}
            t_out, t_taps = forward_with_taps(transformer, state, inputs)
            state.record_updates = False
            updates = dict(state.updates)

        def loss_at(keep: torch.Tensor, estimator: str) -> torch.Tensor:
            state.mode, state.estimator, state.keep, state.updates = "student", estimator, keep, updates
            s_out, s_taps = forward_with_taps(transformer, state, inputs)
            return distill_loss(s_out, s_taps, t_out, t_taps)

        report = EstimatorReport(
            model=rec.name, router=label, keeps=[float(k) for k in keeps], delta=float(delta), samples=samples
        )
        for qi, q in enumerate(keeps):
            _keep_level(report, loss_at, routed, qi, float(q), estimators, delta, samples, say)
        return report
    finally:
        for hk in hooks:
            hk.remove()


def _check_estimator_args(estimators, keeps, delta: float, samples: int) -> None:
    for e in estimators:
        if e not in ESTIMATORS:
            raise ConfigError(f"estimator {e!r} is unknown; choose from {', '.join(ESTIMATORS)}.")
    if not (0 < delta < 0.5):
        raise ConfigError(f"--delta {delta} is out of range; expected 0 < delta < 0.5 (keep-ratio units).")
    for q in keeps:
        if not (delta < q and q + delta <= 1.0):
            raise ConfigError(f"keep level {q} does not allow +-{delta}: expected {delta} < keep <= {1 - delta:g}.")
    if not isinstance(samples, int) or not 1 <= samples <= 256:
        raise ConfigError(f"--samples {samples} is out of range; expected 1..256.")


def _routed_model(rec, weights, router):
    """The frozen backbone with Shiva applied (the given, the recipe's trained, or the seeded random router):
    ``(transformer, routed blocks, router label)``."""
    transformer = load_transformer(recipe=rec, weights=weights, dtype="fp32")
    for p in transformer.parameters():
        p.requires_grad_(False)
    n_layers = num_blocks(transformer)
    routed = rec.routed_blocks(n_layers)
    scfg = ShivaConfig.uniform(
        n_layers, 0.4, routed, bottleneck=rec.router.bottleneck, group_size=rec.router.group_size
    )
    rc = scfg.router_config(*router_dims(transformer))
    bank, label = None, "random (recipe seed)"
    if router is not None and str(router) != "random":
        bank, _ = load_routers(router, rc)
        label = str(router)
    elif router is None and rec.router_weights_path() is not None:
        bank, _ = load_routers(rec.router_weights_path(), rc)
        label = f"trained ({rec.router.weights})"
    apply_shiva_(transformer, scfg, routers=bank, seed=rec.router.seed)
    return transformer, routed, label


def _route_with_taps(transformer, routed: list[int]):
    """The training route override (no score noise) with taps every 4 blocks: ``(state, tap hooks)``."""
    topk = DifferentiableTopK(noise_std=0.0)
    topk.eval()
    adapter = get_adapter(transformer)
    blocks = adapter.blocks(transformer)
    taps = {b for b in range(len(blocks) - 1) if (b + 1) % 4 == 0}
    state = RouteState(routed, topk, taps)
    set_route_override(transformer, make_override(state))
    hooks = [blocks[b].register_forward_hook(tap_hook(state, b, adapter)) for b in taps if b not in routed]
    return state, hooks


def _keep_level(
    report: EstimatorReport, loss_at, routed: list[int], qi: int, q: float, estimators, delta: float, samples: int, say
) -> None:
    """At keep ``q`` everywhere: the central finite difference per routed layer, then each estimator's gradient against it."""
    L = len(routed)
    say(f"keep {q:g}: finite differences ({2 * L} routed losses)")
    fds = []
    with torch.no_grad():
        base = torch.full((samples, L), q)
        if qi == 0:
            report.loss = float(loss_at(base, estimators[0]))
        for j in range(L):
            up, dn = base.clone(), base.clone()
            up[:, j] += delta
            dn[:, j] -= delta
            fds.append((float(loss_at(up, estimators[0])) - float(loss_at(dn, estimators[0]))) / (2 * delta))
    for e in estimators:
        say(f"keep {q:g}: {e} gradient")
        keep = torch.full((samples, L), q, requires_grad=True)
        loss = loss_at(keep, e)
        (grad,) = torch.autograd.grad(loss, keep)
        gl = grad.sum(0).tolist()
        for j, b in enumerate(routed):
            fd = fds[j]
            flat = abs(fd) * delta <= FLAT_REL * max(report.loss, 1e-12)
            agree = None if flat else (math.copysign(1, gl[j]) == math.copysign(1, fd) and gl[j] != 0)
            report.cases.append(EstimatorCase(e, float(q), int(b), float(gl[j]), float(fd), agree))
