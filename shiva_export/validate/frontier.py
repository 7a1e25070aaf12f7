"""``shiva-export validate frontier``: which acceleration should a user deploy, at which compute?

A user who wants a faster DiT does not choose between token-selection methods; they choose between Shiva and
what they would do instead: **fewer sampler steps**, one of **diffusers' caches** (FirstBlockCache,
TaylorSeer, MagCache), or **a stack** of them. This tool runs every family on the same prompts and seeds and
puts them on one compute axis.

Families (rows):

- ``dense``: the unpruned model at a grid of step counts (the recipe's steps are the reference);
- ``cache``: diffusers' own cache hooks on the dense model, at the recipe's steps
  (:mod:`shiva_export.runtime.caches`);
- ``shiva``: uniform keep budgets and the recipe's learned schedule, at the recipe's steps;
- ``stack``: Shiva with fewer steps, Shiva with a cache (torch), Shiva with fewer steps on ONNX Runtime.

Axes of each row:

- **compute**: transformer FLOPs *actually executed* per image, summed over the calls and blocks that really
  ran (a cache's skipped blocks are not counted, its probe block is); beside it the median latency per
  image over interleaved rounds (every configuration once per round);
- **quality**: PSNR and SSIM against the dense reference (recipe steps, same prompt and seed) for every model;
  with a judge (``[pipeline] judge = "shapes"``, the trained ``sd35-shapes``) also prompt accuracy and the
  Fréchet distance of the judge's features to real scenes.

Statistics: every comparison is paired over (prompt, seed). Accuracy differences use the exact McNemar test,
FD and PSNR differences a paired bootstrap CI (:mod:`shiva_export.validate.stats`). A row is on the
**frontier** when no other row with lower or equal FLOPs is *significantly* better on the primary quality
(prompt accuracy with a judge, else PSNR). For each compute level the report names the best configuration of
each family and overall, and whether the others are significantly worse than it.

Writes ``frontier.json``, ``frontier.md`` and ``frontier.png`` (quality against FLOPs and against latency,
one line per family and the overall frontier).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shiva_export._version import __version__
from shiva_export.errors import ConfigError
from shiva_export.models import adapter_for_architecture, get_adapter
from shiva_export.prune.api import set_shiva_phases_
from shiva_export.prune.schedule import phases_from_recipe, uniform_phase
from shiva_export.recipe import recipe_hash
from shiva_export.runtime.caches import DEFAULT_GRID, count_executed_blocks, disable_cache, enable_cache, executed_flops
from shiva_export.runtime.generate import psnr, run_pipeline, ssim
from shiva_export.runtime.pipeline import config_obj, generation_recipe, load_pipeline
from shiva_export.shapes.analyze import features
from shiva_export.shapes.data import caption, render
from shiva_export.shapes.metrics import fd_of, judge_images
from shiva_export.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable
from shiva_export.utils.plots import figure_png, pyplot
from shiva_export.validate.quality import json_safe, noise_seed, prompt_scenes, real_like
from shiva_export.validate.stats import ALPHA, mcnemar_exact, paired_bootstrap, paired_bootstrap_mean, wilson_interval

__all__ = [
    "FAMILIES",
    "FrontierConfig",
    "FrontierReport",
    "default_configs",
    "validate_frontier",
    "frontier_flags",
    "LEVELS",
]

FAMILIES = ("dense", "cache", "shiva", "stack")
#: Compute levels of the summary table, as fractions of the dense reference's executed FLOPs.
LEVELS = (0.3, 0.45, 0.6, 0.75, 0.9, 1.0)
#: PSNR of identical images, for statistics (a finite stand-in for +inf dB).
PSNR_CAP = 100.0
_DENSE_STEP_FACTORS = (1.0, 0.8, 0.6, 0.45, 0.3)
_SHIVA_KEEPS = (0.8, 0.6, 0.4)
_SHORT = {
    "threshold": "thr",
    "cache_interval": "every",
    "disable_cache_before_step": "from",
    "num_inference_steps": "steps",
}


@dataclasses.dataclass(frozen=True)
class FrontierConfig:
    """One row: how the pipeline runs.

    Args:
        family (str): ``dense``, ``cache``, ``shiva`` or ``stack``.
        steps (int): Sampler steps.
        keep (float | None): Uniform keep ratio of the routed blocks; None: dense (or ``learned``).
        learned (bool): Run the recipe's learned phase schedule.
        cache (tuple | None): ``(kind, ((name, value), ...))`` of a diffusers cache, or None.
        backend (str): ``torch`` or ``ort``.
        context (str): ``drop`` (rejected tokens leave the block) or ``keep`` (they still give keys and values).
    """

    family: str
    steps: int
    keep: float | None = None
    learned: bool = False
    cache: tuple[str, tuple[tuple[str, Any], ...]] | None = None
    backend: str = "torch"
    context: str = "drop"

    @property
    def pruned(self) -> bool:
        return self.keep is not None or self.learned

    @property
    def label(self) -> str:
        parts = []
        if self.learned:
            parts.append("shiva learned")
        elif self.keep is not None:
            parts.append(f"shiva keep {self.keep:.2f}")
        if self.context == "keep":
            parts.append("context kept")
        if self.cache is not None:
            kind, settings = self.cache
            parts.append(kind + " " + " ".join(f"{_SHORT.get(k, k)} {v}" for k, v in settings))
        if not parts:
            parts.append("dense")
        parts.append(f"{self.steps} steps")
        if self.backend != "torch":
            parts.append(self.backend)
        return " + ".join(parts)


def default_configs(
    steps: int,
    *,
    learned: bool,
    dense_steps: Sequence[int] | None = None,
    keeps: Sequence[float] | None = None,
    cache_grid: Sequence[tuple[str, dict]] | None = None,
    ort: bool = True,
    context_keep: bool = False,
) -> list[FrontierConfig]:
    """The default rows around a reference of ``steps`` sampler steps (the first row is the reference).

    ``cache_grid`` defaults to :data:`shiva_export.runtime.caches.DEFAULT_GRID` (settings that span the compute
    range on the shapes model); the stacks use fewer steps (0.6x), the budget nearest keep 0.6, and the first cache.
    """
    if cache_grid is None:
        cache_grid = DEFAULT_GRID
    caches = [(kind, tuple(sorted(settings.items()))) for kind, settings in cache_grid]
    few = max(2, round(steps * 0.6))
    grid = sorted(
        {int(s) for s in (dense_steps or [max(2, round(steps * f)) for f in _DENSE_STEP_FACTORS])} | {steps},
        reverse=True,
    )
    rows = [FrontierConfig("dense", steps)] + [FrontierConfig("dense", s) for s in grid if s != steps]
    rows += [FrontierConfig("cache", steps, cache=c) for c in caches]
    keeps = [float(k) for k in (keeps or _SHIVA_KEEPS)]
    rows += [FrontierConfig("shiva", steps, keep=k) for k in keeps]
    mid = min(keeps, key=lambda k: abs(k - 0.6))
    if context_keep:  # where the adapter implements it: rejected tokens still give keys and values
        rows += [
            FrontierConfig("shiva", steps, keep=k, context="keep") for k in sorted({mid, max(keeps)}, reverse=True)
        ]
        rows.append(FrontierConfig("stack", few, keep=mid, context="keep"))
    rows += [FrontierConfig("stack", few, keep=k) for k in sorted({max(keeps), mid}, reverse=True)]
    if learned:
        rows += [FrontierConfig("shiva", steps, learned=True), FrontierConfig("stack", few, learned=True)]
    firsts: dict[str, Any] = {}
    for c in caches:  # the mildest setting of the first two kinds (the grid lists each kind mildest first)
        firsts.setdefault(c[0], c)
    rows += [FrontierConfig("stack", steps, keep=mid, cache=c) for c in list(firsts.values())[:2]]
    if ort:
        rows.append(FrontierConfig("stack", few, keep=mid, backend="ort"))
    return rows


def _check_configs(configs: Sequence[FrontierConfig]) -> None:
    for c in configs:
        if c.family not in FAMILIES:
            raise ConfigError(f"frontier family {c.family!r} is unknown; choose from {', '.join(FAMILIES)}.")
        if c.steps < 1:
            raise ConfigError(f"--steps {c.steps} is out of range; expected >= 1 sampler step.")
        if c.keep is not None and not 0.0 < c.keep <= 1.0:
            raise ConfigError(
                f"--keep {c.keep} is out of range; expected 0 < keep <= 1 (fraction of image tokens kept)."
            )
        if c.backend == "ort" and c.cache is not None:
            raise ConfigError(
                f"{c.label}: diffusers caches hook torch modules; an ONNX Runtime graph has none. Use the torch backend for caches."
            )
        if c.context not in ("drop", "keep"):
            raise ConfigError(f"context {c.context!r} is unknown; choose drop or keep.")
        if c.backend not in ("torch", "ort"):
            raise ConfigError(f"--backend {c.backend!r} is not measured by the frontier; choose torch or ort.")


# --------------------------------------------------------------------------------------------- running
class _Runner:
    """Loads each pipeline once (dense torch, pruned torch, pruned ONNX Runtime) and runs rows on them.

    A row's FLOPs are counted from what executed: on torch, the blocks that really ran in each transformer
    call (:class:`shiva_export.runtime.caches.count_executed_blocks`) at that call's keep ratios; on ONNX Runtime,
    where the static graph always runs whole, the graph of each call's phase.
    """

    def __init__(self, rec, weights, artifact_root, say: Callable[[str], None]):
        self.rec, self.weights, self.root, self.say = rec, weights, artifact_root, say
        self._pipes: dict[str, Any] = {}

    def pipe(self, cfg: FrontierConfig):
        key = "dense" if not cfg.pruned else f"pruned-{cfg.backend}-{cfg.context}"
        if key not in self._pipes:
            self.say(f"load {key} pipeline")
            if key == "dense":
                self._pipes[key] = load_pipeline(self.rec.name, recipe=self.rec, weights=self.weights, dense=True)
            else:
                self._pipes[key] = load_pipeline(
                    self.rec.name,
                    recipe=self.rec,
                    weights=self.weights,
                    backend=cfg.backend,
                    ratio=round(1.0 - (cfg.keep or 0.6), 6),
                    phases=cfg.learned and cfg.backend != "torch",
                    context=cfg.context,
                    artifact_root=self.root,
                    progress=self.say,
                )
        return self._pipes[key]

    def activate(self, cfg: FrontierConfig):
        """Puts the row's routing and cache on its pipeline; returns the pipeline."""
        pipe = self.pipe(cfg)
        if cfg.pruned and cfg.backend == "torch":
            set_shiva_phases_(pipe.transformer, _phases_of(self.rec, pipe.transformer, cfg), auto_cfg=True)
        if cfg.cache is not None:
            settings = dict(cfg.cache[1])
            if cfg.cache[0] == "magcache":
                settings.setdefault("num_inference_steps", cfg.steps)  # its ratios are per step of this run
            enable_cache(pipe, cfg.cache[0], **settings)
        return pipe

    def deactivate(self, cfg: FrontierConfig) -> None:
        if cfg.cache is not None:
            disable_cache(self.pipe(cfg))

    def run(self, cfg: FrontierConfig, pipe, text: str, seed: int, guidance: float):
        """One image: ``(image, executed transformer FLOPs, latency ms)``."""
        if cfg.backend == "torch":
            with count_executed_blocks(pipe) as records:
                res = run_pipeline(pipe, text, steps=cfg.steps, guidance=guidance, seed=seed)
            flops = float(executed_flops(records, pipe).total)
        else:
            res = run_pipeline(pipe, text, steps=cfg.steps, guidance=guidance, seed=seed)
            flops = _graph_flops(pipe, res.times.phase_trace, guidance)
        return res.image, flops, res.times.total


def _phases_of(rec, transformer, cfg: FrontierConfig):
    n = get_adapter(transformer).num_blocks(transformer)
    if cfg.learned:
        return phases_from_recipe(rec, n)
    return (uniform_phase(n, round(1.0 - cfg.keep, 6), rec.routed_blocks(n)),)


def _flop_count(pipe, keep_ratios, guidance: float):
    info = pipe.shiva
    adapter = get_adapter(info.recipe.architecture)
    config = dict(pipe.transformer.config)
    n_tokens = adapter.num_image_tokens(config_obj(config), info.height, info.width)
    batch = 2 if adapter.BATCHED_CFG and adapter.uses_cfg(guidance) else 1
    context = (info.context or "drop") if keep_ratios is not None else "drop"
    return adapter.count_flops(
        config,
        n_tokens,
        info.text_len,
        keep_ratios,
        batch=batch,
        bottleneck=info.recipe.router.bottleneck,
        context=context,
    )


def _graph_flops(pipe, trace: Sequence[str], guidance: float) -> float:
    """A static graph runs whole: each call costs its phase's full count."""
    by = {p.name: p for p in pipe.shiva.phases}
    memo: dict[str, float] = {}
    total = 0.0
    for name in trace:
        if name not in memo:
            memo[name] = float(_flop_count(pipe, by[name].keep_ratios if name in by else None, guidance).total)
        total += memo[name]
    return total


# --------------------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class _Measured:
    """Per-image results of one row, in (prompt, seed) order."""

    cfg: FrontierConfig
    images: list = dataclasses.field(default_factory=list)
    flops: list[float] = dataclasses.field(default_factory=list)
    latency: list[float] = dataclasses.field(default_factory=list)
    psnr: list[float] = dataclasses.field(default_factory=list)
    ssim: list[float] = dataclasses.field(default_factory=list)
    correct: list[bool] = dataclasses.field(default_factory=list)
    attributes: list[dict] = dataclasses.field(default_factory=list)
    features: list = dataclasses.field(default_factory=list)


class _Judge:
    """The analytic shapes judge (``[pipeline] judge = "shapes"``): correctness per attribute and the
    features of the Fréchet distance, against real scenes of the same captions."""

    def __init__(self, scenes, n_ref: int):
        import numpy as np

        self.scenes = scenes
        self.ref = np.stack([features(render(s)[0]) for s in real_like(scenes, n_ref, seed=1000)])

    def judge(self, img, scene) -> tuple[dict, Any]:
        rec = judge_images([img], [scene])[0]
        return rec["correct"], rec["features"]

    def fd(self, feats: Sequence) -> float:
        """Fréchet distance of standardised features (every attribute group weighs the same) to the real set."""
        return fd_of(feats, self.ref) if len(feats) >= 2 else math.nan


def _image_metrics(m: _Measured, ref: _Measured | None) -> None:
    if ref is None:  # the reference itself
        m.psnr = [PSNR_CAP] * len(m.images)
        m.ssim = [1.0] * len(m.images)
        return
    m.psnr = [min(PSNR_CAP, psnr(a, b)) for a, b in zip(m.images, ref.images)]
    m.ssim = [ssim(a, b) for a, b in zip(m.images, ref.images)]


def _prompts(rec, n: int):
    """``n`` prompts: shape captions (the judge's scenes) or, for a class-conditional model, class ids."""
    scenes = prompt_scenes(n)
    adapter = adapter_for_architecture(rec.architecture)
    texts = [caption(s) for s in scenes] if adapter.TEXT_PROMPTS else [str(i) for i in range(n)]
    return scenes, texts


def _generate(
    runner: _Runner, configs, texts, seeds, guidance: float, judge: _Judge | None, scenes, say
) -> list[_Measured]:
    """Every row on every (prompt, seed); per-image results in the same order for every row. Each image has
    its own noise (:func:`~shiva_export.validate.quality.noise_seed`): one noise shared by every prompt of a
    seed makes the seeds, not the methods, what moves the metrics."""
    out = []
    for i, cfg in enumerate(configs):
        say(f"generate {cfg.label} ({i + 1}/{len(configs)})")
        pipe = runner.activate(cfg)
        m = _Measured(cfg)
        try:
            for p_i, text in enumerate(texts):
                for seed in seeds:
                    img, flops, ms = runner.run(cfg, pipe, text, noise_seed(seed, p_i), guidance)
                    m.images.append(img)
                    m.flops.append(flops)
                    m.latency.append(ms)
                    if judge is not None:
                        c, f = judge.judge(img, scenes[p_i])
                        m.correct.append(bool(c["all"]))
                        m.attributes.append({k: bool(v) for k, v in c.items()})
                        m.features.append(f)
        finally:
            runner.deactivate(cfg)
        out.append(m)
    return out


def _interleaved_latency(
    runner: _Runner, measured: list[_Measured], text: str, seed: int, guidance: float, rounds: int, say
) -> list[float]:
    """Median ms per image of each row over ``rounds`` round-robin passes (one image per row per pass), so a
    busy machine slows every row alike; with 0 rounds, the median of the generation calls."""
    timed: list[list[float]] = [[] for _ in measured]
    for r in range(rounds):
        say(f"latency round {r + 1}/{rounds}")
        for i, m in enumerate(measured):
            pipe = runner.activate(m.cfg)
            try:
                timed[i].append(runner.run(m.cfg, pipe, text, seed, guidance)[2])  # latency only: any noise
            finally:
                runner.deactivate(m.cfg)
    return [statistics.median(t) if t else statistics.median(m.latency) for t, m in zip(timed, measured)]


# --------------------------------------------------------------------------------------------- statistics
def frontier_flags(flops: Sequence[float], better: Callable[[int, int], bool], rel_tol: float = 1e-9) -> list[bool]:
    """Row ``r`` is on the frontier when no other row ``o`` with ``flops[o] <= flops[r]`` is significantly
    better (``better(o, r)``)."""
    flags = []
    for r, fr in enumerate(flops):
        cheaper = [o for o, fo in enumerate(flops) if o != r and fo <= fr * (1 + rel_tol)]
        flags.append(not any(better(o, r) for o in cheaper))
    return flags


class _Stats:
    """Paired comparisons on the primary quality (accuracy with a judge, else PSNR), memoised."""

    def __init__(self, measured: list[_Measured], judged: bool):
        self.m, self.judged = measured, judged
        self._memo: dict[tuple[int, int], Any] = {}

    def compare(self, a: int, b: int):
        if (a, b) not in self._memo:
            x, y = self.m[a], self.m[b]
            self._memo[(a, b)] = (
                mcnemar_exact(x.correct, y.correct) if self.judged else paired_bootstrap_mean(x.psnr, y.psnr)
            )
        return self._memo[(a, b)]

    def better(self, a: int, b: int) -> bool:
        c = self.compare(a, b)
        return c.significant and c.diff > 0

    def quality(self, i: int) -> float:
        m = self.m[i]
        return sum(m.correct) / len(m.correct) if self.judged else statistics.mean(m.psnr)


def _fd_vs_reference(judge: _Judge, m: _Measured, ref: _Measured):
    return paired_bootstrap(m.features, ref.features, judge.fd, n_boot=300)


def _row(
    i: int, m: _Measured, st: _Stats, judge: _Judge | None, latency: float, frontier: bool, seeds
) -> dict[str, Any]:
    c = m.cfg
    row: dict[str, Any] = {
        "family": c.family,
        "config": c.label,
        "steps": c.steps,
        "keep": c.keep,
        "learned": c.learned,
        "backend": c.backend,
        "context": c.context,
        "cache": None if c.cache is None else {"kind": c.cache[0], **dict(c.cache[1])},
        "flops_per_image": statistics.mean(m.flops),
        "latency_ms": latency,
        "accuracy": None,
        "accuracy_ci": None,
        "fd": None,
        "psnr": None if i == 0 else statistics.mean(m.psnr),
        "psnr_ci": None if i == 0 else list(_mean_ci(m.psnr)),
        "ssim": statistics.mean(m.ssim),
        "frontier": frontier,
        "n_images": len(m.images),
    }
    if judge is not None:
        k = sum(m.correct)
        row["accuracy"], row["accuracy_ci"] = k / len(m.correct), list(wilson_interval(k, len(m.correct)))
        row["fd"] = judge.fd(m.features)
        n = len(seeds)
        row["accuracy_by_seed"] = {str(s): statistics.mean(m.correct[j::n]) for j, s in enumerate(seeds)}
        row["correct"] = [int(x) for x in m.correct]  # per (prompt, seed), for paired tests from the JSON
    if i > 0 and judge is not None:  # PSNR is measured against the reference: no test against it
        row["vs_reference"] = st.compare(i, 0).to_dict()
        row["fd_vs_reference"] = _fd_vs_reference(judge, m, st.m[0]).to_dict()
    row["psnr_per_image"] = [round(v, 3) for v in m.psnr]
    return row


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """95% bootstrap CI of a mean (the pairing partner is zero)."""
    c = paired_bootstrap_mean(list(values), [0.0] * len(values))
    return c.low, c.high


def _levels(rows: list[dict], st: _Stats) -> list[dict[str, Any]]:
    """For each compute level: the best row of each family within it, the best overall, and whether each
    family's best is significantly worse than the overall best."""
    ref = rows[0]["flops_per_image"]
    out = []
    for level in LEVELS:
        ok = [i for i, r in enumerate(rows) if r["flops_per_image"] <= level * ref * (1 + 1e-9)]
        if not ok:
            continue
        best = max(ok, key=lambda i: (st.quality(i), -rows[i]["flops_per_image"]))
        fam = {}
        for f in FAMILIES:
            cand = [i for i in ok if rows[i]["family"] == f]
            if cand:
                b = max(cand, key=lambda i: (st.quality(i), -rows[i]["flops_per_image"]))
                fam[f] = {
                    "row": b,
                    "config": rows[b]["config"],
                    "quality": st.quality(b),
                    "worse_than_best": b != best and st.better(best, b),
                }
        out.append(
            {
                "level": level,
                "max_flops": level * ref,
                "best": best,
                "best_config": rows[best]["config"],
                "families": fam,
            }
        )
    return out


# --------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class FrontierReport:
    model: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]]
    levels: list[dict[str, Any]]
    prompts: list[str]
    out_dir: str | None = None

    @property
    def judged(self) -> bool:
        return self.rows[0]["accuracy"] is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "rows": self.rows,
            "levels": self.levels,
            "prompts": self.prompts,
            "out_dir": self.out_dir,
        }

    def conclusion(self) -> list[str]:
        """One line per compute level: which family is best, and which are significantly worse."""
        lines = []
        for lv in self.levels:
            best = self.rows[lv["best"]]
            worse = [f for f, v in lv["families"].items() if v["worse_than_best"]]
            tied = [f for f, v in lv["families"].items() if not v["worse_than_best"] and f != best["family"]]
            lines.append(
                f"- <= {lv['level']:.0%} of the reference FLOPs: best **{best['config']}** ({best['family']}); "
                f"significantly worse: {', '.join(worse) or 'none'}; not significantly different: {', '.join(tied) or 'none'}."
            )
        return lines

    def to_markdown(self) -> str:
        s = self.settings
        q = "prompt accuracy (exact McNemar)" if self.judged else "PSNR vs the reference (paired bootstrap)"
        lines = (
            [
                f"# Equal-compute frontier: {self.model}",
                "",
                f"{len(self.prompts)} prompts x seeds {s['seeds']} = {self.rows[0]['n_images']} paired images per row; reference: dense, "
                f"{s['steps']} steps, CFG {s['guidance']}. FLOPs: transformer FLOPs actually executed per image. Primary quality: {q}; "
                f"a row is on the frontier (*) when no row with lower or equal FLOPs is significantly better (alpha {s['alpha']}, "
                "no multiple-comparison correction). "
                + (
                    "Beside each accuracy: its test against the reference; 'n.s.': not significant."
                    if self.judged
                    else f"PSNR and SSIM are measured against the reference (identical images count as {PSNR_CAP:.0f} dB in the tests)."
                ),
                "",
                "## Best per compute level",
                "",
            ]
            + self.conclusion()
            + ["", "## Rows", "", _table(self.rows, self.judged)]
        )
        return "\n".join(lines) + "\n"


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _sig(row: dict, key: str) -> str:
    c = row.get(key)
    if not c:
        return ""
    if c["p"] is not None:
        return f" (p={c['p']:.3g}{'' if c['significant'] else ', n.s.'})"
    return f" [{c['low']:+.3f}, {c['high']:+.3f}]{'' if c['significant'] else ' n.s.'}"


def _table(rows: list[dict], judged: bool) -> str:
    ref = rows[0]["flops_per_image"]
    head = "| * | family | configuration | GFLOPs | vs ref | latency (ms) |"
    head += " accuracy (95% CI) | FD | PSNR (dB) | SSIM |" if judged else " PSNR (dB, 95% CI) | SSIM |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [
            "*" if r["frontier"] else "",
            r["family"],
            r["config"],
            f"{r['flops_per_image'] / 1e9:.2f}",
            f"{r['flops_per_image'] / ref:.2f}x",
            f"{r['latency_ms']:.0f}",
        ]
        if judged:
            lo, hi = r["accuracy_ci"]
            cells.append(f"{r['accuracy']:.1%} ({lo:.0%}-{hi:.0%}){_sig(r, 'vs_reference')}")
            cells.append(_fmt(r["fd"], ".3f") + _sig(r, "fd_vs_reference"))
            cells += ["reference" if r["psnr"] is None else f"{r['psnr']:.1f}", _fmt(r["ssim"], ".3f")]
        else:
            ci = r["psnr_ci"]
            cells += [
                "reference" if r["psnr"] is None else f"{r['psnr']:.1f} ({ci[0]:.1f}-{ci[1]:.1f})",
                _fmt(r["ssim"], ".3f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_COLORS = {"dense": "black", "cache": "#1f77b4", "shiva": "#d62728", "stack": "#ff7f0e"}


def _plot_png(report: FrontierReport) -> bytes:
    plt = pyplot()

    key, name = ("accuracy", "prompt accuracy ↑") if report.judged else ("psnr", "PSNR vs reference (dB) ↑")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, xkey, xname in (
        (axes[0], "flops_per_image", "executed transformer GFLOPs per image"),
        (axes[1], "latency_ms", "median latency per image (ms)"),
    ):
        scale = 1e9 if xkey == "flops_per_image" else 1.0
        for fam in FAMILIES:
            pts = sorted((r[xkey] / scale, r[key]) for r in report.rows if r["family"] == fam and r[key] is not None)
            if pts:
                ax.plot(*zip(*_running_best(pts)), "-", color=_COLORS[fam], alpha=0.6)
                ax.scatter(*zip(*pts), color=_COLORS[fam], s=28, label=fam)
        if xkey == "flops_per_image":
            front = sorted((r[xkey] / scale, r[key]) for r in report.rows if r["frontier"] and r[key] is not None)
            label = "frontier (no cheaper row significantly better)"
        else:  # latency is measured, not tested: the plain Pareto line of all rows
            front = _running_best(sorted((r[xkey], r[key]) for r in report.rows if r[key] is not None))
            label = "best so far (by latency)"
        if front:
            ax.plot(*zip(*front), "--", color="#999999", lw=1.2, label=label)
        ax.set_xlabel(xname)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report.model}: quality vs compute, {report.rows[0]['n_images']} paired images per row", fontsize=10)
    return figure_png(fig)


def _running_best(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The family's own Pareto line: each point that beats every cheaper point of the family."""
    out, best = [], -math.inf
    for x, y in pts:
        if y > best:
            out.append((x, y))
            best = y
    return out


def _write(report: FrontierReport, out: Path) -> None:
    import time

    report.out_dir = str(out)
    atomic_write_text(out / "frontier.md", report.to_markdown())
    atomic_write_bytes(out / "frontier.png", _plot_png(report))
    atomic_write_json(out / "frontier.json", json_safe(report.to_dict()) | {"generated_unix": int(time.time())})


def _provenance(rec, runner: _Runner) -> dict[str, Any]:
    """What made the report: the recipe (content hash), the router of the pruned pipelines, the packages."""
    import diffusers

    routers = {
        k: p.shiva.router for k, p in runner._pipes.items() if k != "dense" and getattr(p, "shiva", None) is not None
    }
    return {
        "recipe": str(rec.source_path or rec.name),
        "recipe_sha256": recipe_hash(rec),
        "routers": routers,
        "diffusers": diffusers.__version__,
        "shiva_export": __version__,
    }


# --------------------------------------------------------------------------------------------- entry point
def _check_options(
    prompts: int, seeds: Sequence[int], latency_repeats: int, threads: int | None, families: Sequence[str] | None
) -> None:
    if not seeds:
        raise ConfigError("--seed needs at least one value.")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**40:
            raise ConfigError(
                f"--seed {s!r} is out of range; expected an integer in 0..2**40-1 (image noise seed = 1000 x seed + prompt)."
            )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seed values repeat ({list(seeds)}); paired tests need distinct seeds.")
    if not 1 <= prompts <= 96:
        raise ConfigError(f"--prompts {prompts} is out of range; choose 1..96 (every shape caption once).")
    if latency_repeats < 0:
        raise ConfigError(f"--latency-repeats {latency_repeats} is negative; expected >= 0.")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} is out of range; expected >= 1.")
    for f in families or ():
        if f not in FAMILIES:
            raise ConfigError(f"--family {f!r} is unknown; choose from {', '.join(FAMILIES)}.")


def validate_frontier(
    *,
    model: str = "sd35-shapes",
    recipe=None,
    weights=None,
    prompts: int = 24,
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    guidance: float | None = None,
    dense_steps: Sequence[int] | None = None,
    keeps: Sequence[float] | None = None,
    families: Sequence[str] | None = None,
    ort: bool = True,
    configs: Sequence[FrontierConfig] | None = None,
    n_ref: int = 256,
    threads: int | None = 1,
    latency_repeats: int = 3,
    out_dir: str | Path | None = None,
    artifact_root: str | Path = "engines",
    progress: Callable[[str], None] | None = None,
) -> FrontierReport:
    """Runs every family on the same prompts and seeds and writes the frontier (see the module docstring).

    Args:
        model (str): Any model with a pipeline; ``sd35-shapes`` adds the judge's accuracy and FD.
        prompts (int): How many prompts of the fixed caption order (1..96). Defaults to 24.
        seeds (list[int]): Seeds of every prompt; the tests pair over (prompt, seed). Defaults to (0,).
        steps (int): The reference's sampler steps. Defaults to the recipe's.
        dense_steps (list[int]): The ``dense`` family's step grid. Defaults to fractions of ``steps``.
        keeps (list[float]): Uniform keep budgets of the ``shiva`` family. Defaults to 0.8, 0.6, 0.4.
        families (list[str]): Keep only these families (the reference row always runs). Defaults to all.
        ort (bool): Include the ONNX Runtime stack (exports one graph on first use). Defaults to True.
        configs (list[FrontierConfig]): Explicit rows (the first is the reference); overrides the grid.
        latency_repeats (int): Interleaved timing rounds. Defaults to 3.
        out_dir (PathLike): Where to write frontier.{json,md,png}. Defaults to None.
        artifact_root (PathLike): Where the ONNX Runtime row's graph is cached (as ``generate``). Defaults to ``engines``.
    """
    _check_options(prompts, list(seeds), latency_repeats, threads, families)
    if out_dir is not None:
        check_writable(Path(out_dir) / "frontier.json", "frontier report")
    rec = generation_recipe(model, recipe)
    steps = int(steps or rec.pipeline.steps)
    guidance = float(rec.pipeline.guidance if guidance is None else guidance)
    learned = rec.schedule is not None and bool(rec.schedule.phases)

    context_keep = "keep" in adapter_for_architecture(rec.architecture).CONTEXT_MODES
    rows_cfg = (
        list(configs)
        if configs
        else default_configs(
            steps, learned=learned, dense_steps=dense_steps, keeps=keeps, ort=ort, context_keep=context_keep
        )
    )
    if families:
        rows_cfg = rows_cfg[:1] + [c for c in rows_cfg[1:] if c.family in families]
    _check_configs(rows_cfg)
    return _measure(
        rec,
        weights,
        rows_cfg,
        prompts,
        list(seeds),
        steps,
        guidance,
        n_ref,
        threads,
        latency_repeats,
        out_dir,
        progress,
        artifact_root,
    )


def _measure(
    rec,
    weights,
    rows_cfg,
    prompts,
    seeds,
    steps,
    guidance,
    n_ref,
    threads,
    latency_repeats,
    out_dir,
    progress,
    artifact_root,
) -> FrontierReport:
    import torch

    say = progress or (lambda m: None)
    if threads:
        torch.set_num_threads(int(threads))
    judged = rec.pipeline.judge == "shapes"
    scenes, texts = _prompts(rec, prompts)
    judge = _Judge(scenes, n_ref) if judged else None
    runner = _Runner(rec, weights, artifact_root, say)
    measured = _generate(runner, rows_cfg, texts, seeds, guidance, judge, scenes, say)
    for i, m in enumerate(measured):
        _image_metrics(m, None if i == 0 else measured[0])
    latency = _interleaved_latency(runner, measured, texts[0], seeds[0], guidance, latency_repeats, say)
    st = _Stats(measured, judged)
    flags = frontier_flags([statistics.mean(m.flops) for m in measured], st.better)
    rows = [_row(i, m, st, judge, latency[i], flags[i], seeds) for i, m in enumerate(measured)]
    settings = {
        "steps": steps,
        "guidance": guidance,
        "seeds": seeds,
        "prompts": prompts,
        "alpha": ALPHA,
        "threads": threads,
        "latency_repeats": latency_repeats,
        "judge": rec.pipeline.judge,
        "n_ref": n_ref,
        "torch": torch.__version__,
        "primary_quality": "accuracy" if judged else "psnr",
        **_provenance(rec, runner),
    }
    report = FrontierReport(model=rec.name, settings=settings, rows=rows, levels=_levels(rows, st), prompts=texts)
    if out_dir is not None:
        _write(report, Path(out_dir))
    return report
