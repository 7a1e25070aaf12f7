"""Outputs of ``shiva-export train``: what :func:`~shiva_export.train.loop.train` returns (:class:`TrainResult`)
and writes into ``out_dir``: ``router.safetensors``, ``lut.json`` (the policy on the sampler's timesteps),
``recipe.toml`` (the base recipe plus ``[router] weights/sha256`` and ``[schedule]`` with the LUT quantised
into 1-4 static phases; :func:`dumps_toml`), ``training.json`` (held-out stopping) and ``metrics.jsonl``
(one row per step).

Budget calibration (a choice, on by default): after training, ``b_anchor`` is shifted so the LUT's mean
over the sampler's timesteps equals the target exactly; the uncalibrated mean is reported as ``raw_mean_keep``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError, RecipeError
from shiva_export.logging import get_logger
from shiva_export.models import get_adapter
from shiva_export.prune.router import save_routers
from shiva_export.recipe import load_recipe
from shiva_export.train.policy import KeepMeasure, PhaseSchedule, RatioPolicy, calibrate_anchor, quantize_lut
from shiva_export.utils.io import atomic_write_json, atomic_write_text, check_regular_target

__all__ = [
    "TrainResult",
    "sampler_timesteps",
    "phase_bounds",
    "phase_names",
    "dumps_toml",
    "write_outputs",
    "Metrics",
    "METRICS_NAME",
]

logger = get_logger(__name__)

METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainResult:
    """What :func:`train` wrote and measured.

    Attributes:
        out_dir (Path): Output folder.
        finished (bool): False when the run ended at ``stop_at_step`` (checkpoint only, no outputs).
        step (int): Global steps done.
        seconds (float): Wall time of this run.
        router_path, recipe_path, lut_path (Path | None): Outputs (None when not finished).
        router_sha256 (str | None): sha256 of ``router.safetensors``.
        timesteps (list[float]): Sampler timesteps of the LUT.
        layers (list[int]): Routed block of each LUT column.
        lut (list[list[float]]): ``keep[step][routed block]``.
        mean_keep (float | None): LUT mean after calibration.
        raw_mean_keep (float | None): LUT mean before calibration.
        quantized_mean_keep (float | None): Step-weighted mean ``k / N`` of the phases.
        calibration_shift (float | None): Logit shift of the post-hoc budget calibration.
        phases (list[dict]): The phases as written to the recipe.
        history (list[dict]): One record per step (loss terms, mean keep, stage; ``heldout`` at evaluations).
        stages_run (list[int]): Optimizer steps run per stage (less than its budget when it stopped early).
        heldout (dict | None): With ``eval_every``: the held-out source and, per stage, every evaluation
            ``{"step", "loss"}``, the best step and loss, and the step it stopped at (None: ran its budget).
        context (str): The routing's ``ShivaConfig.context`` the student trained with.
    """

    out_dir: Path
    finished: bool
    step: int
    seconds: float
    target_keep: float
    router_path: Path | None = None
    router_sha256: str | None = None
    recipe_path: Path | None = None
    lut_path: Path | None = None
    checkpoint_path: Path | None = None
    timesteps: list[float] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    lut: list[list[float]] = field(default_factory=list)
    mean_keep: float | None = None
    raw_mean_keep: float | None = None
    quantized_mean_keep: float | None = None
    calibration_shift: float | None = None
    phases: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    dora: dict | None = None  # -- DoRA: merge_and_save's result (path, sha256, merge error) --
    stages_run: list[int] = field(default_factory=list)
    heldout: dict | None = None
    context: str = "drop"

    def to_dict(self, history: bool = False) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        if not history:
            d["history"] = self.history[-1:] if self.history else []
        return d


def sampler_timesteps(steps: int = 28, shift: float = 3.0) -> list[float]:
    """Timesteps of the flow-matching Euler sampler, in sampling order (descending).

    They are diffusers' own: ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``, the
    schedule ``StableDiffusion3Pipeline`` runs (float32, as the pipeline feeds them to the transformer). So
    a learned schedule is evaluated, and its phases are cut, on exactly the timesteps deployment uses.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"sampler steps is {steps!r}; expected an int >= 1.")
    if not (isinstance(shift, (int, float)) and shift > 0):
        raise ConfigError(f"sampler shift is {shift!r}; expected a float > 0 (SD3: 3.0).")
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))
    sched.set_timesteps(steps)
    return [float(v) for v in sched.timesteps]


def phase_bounds(timesteps: Sequence[float], start: int, stop: int) -> tuple[float, float]:
    """``(t_start, t_stop)`` of the phase that owns sampler steps ``start .. stop - 1``.

    A phase owns every timestep ``t`` with ``t_stop < t <= t_start`` (the last phase also owns 0). Inner
    boundaries are the **midpoint** between the last timestep of one phase and the first of the next, so a
    sampler whose timesteps differ slightly from the training sampler's (another step count, float32
    rounding) still files each step where the schedule was learned. The first phase starts at 1000 and
    the last ends at 0, so every timestep of every step count has an owner.
    """
    t_start = 1000.0 if start == 0 else 0.5 * (float(timesteps[start - 1]) + float(timesteps[start]))
    t_stop = 0.0 if stop >= len(timesteps) else 0.5 * (float(timesteps[stop - 1]) + float(timesteps[stop]))
    return t_start, t_stop


def phase_names(n: int) -> list[str]:
    """Names of ``n`` phases in sampling order."""
    return {
        1: ["all"],
        2: ["early", "late"],
        3: ["early", "mid", "late"],
        4: ["early", "mid-early", "mid-late", "late"],
    }[n]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"cannot write {v!r} to TOML; expected a finite float.")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise ConfigError(f"cannot write a {type(v).__name__} to TOML; expected bool, int, float, str, list or dict.")


def _toml_key(k: str) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def dumps_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for recipe data (tables, arrays of tables, scalars, arrays; ``None`` dropped)."""
    lines: list[str] = []

    def is_table_array(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def emit(prefix: str, d: dict) -> None:
        scalars = [(k, v) for k, v in d.items() if v is not None and not isinstance(v, dict) and not is_table_array(v)]
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            if isinstance(v, dict):
                if (
                    any(x is not None and not isinstance(x, dict) and not is_table_array(x) for x in v.values())
                    or not v
                ):
                    lines.append("")
                    lines.append(f"[{name}]")
                emit(name, v)
            elif is_table_array(v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{name}]]")
                    emit(name, item)

    emit("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


class Metrics:
    """Rank 0's ``metrics.jsonl``: one JSON object per optimizer step (appended on resume)."""

    def __init__(self, path: Path | None, append: bool):
        self.path = path
        if path is not None:
            check_regular_target(path, "metrics file")  # appended to with open(): never a FIFO or device
        if path is not None and not append:
            path.write_text("")

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        import json

        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "event"}, sort_keys=True) + "\n")


@dataclass
class _Schedule:
    """The learned policy as written: its LUT on the sampler's timesteps and the static phases cut from it."""

    timesteps: list[float]
    lut: torch.Tensor  # [steps, routed blocks]
    raw_mean: float
    raw_measure: float
    shift: float
    phases: list[PhaseSchedule]
    names: list[str]

    @property
    def lut_rows(self) -> list[list[float]]:
        return [[round(float(v), 6) for v in row] for row in self.lut.tolist()]

    def quantized_mean(self, n_tokens: int, routed: list[int]) -> float:
        """Step-weighted mean ``k / N`` of the phases."""
        return sum(sum(p.k) * (p.stop - p.start) for p in self.phases) / (n_tokens * len(self.timesteps) * len(routed))

    def phase_rows(self, routed: list[int], n_layers: int) -> list[dict[str, Any]]:
        """The phases as the recipe's ``[[schedule.phases]]`` rows."""
        rows = []
        for name, ph in zip(self.names, self.phases):
            per_block = ph.to_keep_ratios(n_layers)
            t_start, t_stop = phase_bounds(self.timesteps, ph.start, ph.stop)
            rows.append(
                {
                    "name": name,
                    "t_start": t_start,
                    "t_stop": t_stop,
                    "keep_ratios": [float(per_block[b]) for b in routed],
                    "k": [int(k) for k in ph.k],
                }
            )
        return rows


def _lut_timesteps(cfg, transformer, n_tokens: int) -> list[float]:
    if cfg.timesteps is not None:
        timesteps = [float(t) for t in cfg.timesteps]
    else:  # the architecture's own pipeline sampler (SD3: flow-matching Euler with cfg.sampler_shift)
        timesteps = get_adapter(transformer).sampler_timesteps(
            transformer.config, cfg.sampler_steps, n_tokens, cfg.sampler_shift
        )
    if len(timesteps) < cfg.phases:
        raise ConfigError(
            f"sampler has {len(timesteps)} timesteps; expected at least phases = {cfg.phases}. Pass more timesteps or fewer --phases."
        )
    return timesteps


def _schedule(
    cfg, policy: RatioPolicy, timesteps: list[float], routed: list[int], n_tokens: int, measure: KeepMeasure
) -> _Schedule:
    """Calibrates the policy's anchor (``cfg.calibrate_budget``), then tabulates and quantises it."""
    policy.eval()
    raw_mean = float(policy.lut(timesteps, routed).double().mean())
    raw_measure = float(measure(policy.lut(timesteps, routed).double()))
    shift = 0.0
    if cfg.calibrate_budget:
        raw_measure, shift = calibrate_anchor(policy, timesteps, routed, cfg.target_keep, measure)
        if abs(shift) > cfg.max_calibration_shift:
            logger.warning(
                "budget calibration moved the policy logit by %+.3f (limit %.2f): the written schedule differs from the trained one. "
                "Train longer or with budget_timesteps='sampler'.",
                shift,
                cfg.max_calibration_shift,
            )
    lut = policy.lut(timesteps, routed)  # [steps, L]
    phases = quantize_lut(lut, n_tokens, cfg.phases, layers=routed)
    return _Schedule(timesteps, lut, raw_mean, raw_measure, shift, phases, phase_names(cfg.phases))


def _save_router(result: TrainResult, rec, cfg, bank, path: Path, context: str) -> str:
    return save_routers(
        bank,
        path,
        extra={
            "model": rec.name,
            "target_keep": cfg.target_keep,
            "steps": sum(result.stages_run) if result.heldout else result.step,
            "stages": result.stages_run if result.heldout else [cfg.warmup_steps, cfg.policy_steps, cfg.joint_steps],
            "seed": cfg.seed,
            **({"context": context} if context != "drop" else {}),
        },  # drop: metadata (and so the sha) as before the option
    )


def _write_lut_json(
    path: Path, rec, cfg, sched: _Schedule, routed: list[int], n_tokens: int, measure: KeepMeasure, context: str
) -> None:
    atomic_write_json(
        path,
        {
            "model": rec.name,
            "target_keep": cfg.target_keep,
            "timesteps": sched.timesteps,
            "layers": routed,
            "keep": sched.lut_rows,
            "raw_mean_keep": sched.raw_mean,
            "budget_measure": measure.mode,
            "context": context,
            "raw_budget_keep": sched.raw_measure,
            "calibration_shift": sched.shift,
            "min_keep": cfg.min_keep,
            "estimator": cfg.estimator,
            "mean_keep": float(sched.lut.double().mean()),
            "quantized_mean_keep": sched.quantized_mean(n_tokens, routed),
            "num_image_tokens": n_tokens,
            "phases": [dict(p.to_dict(), name=n) for n, p in zip(sched.names, sched.phases)],
        },
    )


def _recipe_content(
    result: TrainResult, rec, cfg, router: tuple[Path, str], sched: _Schedule, phase_rows: list[dict], context: str
) -> dict[str, Any]:
    """The base recipe plus the trained router, its routing context and the schedule (bound to the DoRA weights)."""
    content = rec.content_dict()
    content["description"] = (
        content.get("description") or rec.name
    ) + f" + learned Shiva router/schedule (target keep {cfg.target_keep:g})"
    content["router"] = dict(content["router"], weights=router[0].name, sha256=router[1])
    prune = {k: v for k, v in content["prune"].items() if k != "context"}
    content["prune"] = (
        prune if context == "drop" else dict(prune, context=context)
    )  # the routing the router was trained with
    content["schedule"] = {
        "target_keep": cfg.target_keep,
        "timesteps": sched.timesteps,
        "lut": sched.lut_rows,
        "phases": phase_rows,
    }
    out_dir = result.out_dir
    if (
        rec.model.source == "local"
        and rec.model.path
        and rec.source_path is not None
        and not Path(rec.model.path).is_absolute()
    ):
        # the written recipe lives in out_dir: keep the base recipe's local weights folder reachable from there
        base, out = (rec.source_path.parent / rec.model.path).resolve(), out_dir.resolve()
        near = os.path.commonpath([base, out]) != os.path.abspath(os.sep)
        content["model"] = dict(content["model"], path=os.path.relpath(base, out) if near else str(base))
    if (
        result.dora is not None
    ):  # -- DoRA: router and schedule bound to the merged weights (path + sha256), never the base
        content["model"] = {"source": "local", "path": Path(result.dora["path"]).name, "sha256": result.dora["sha256"]}
        content["description"] += f" + DoRA r={cfg.dora_rank} merged into {Path(result.dora['path']).name}/"
    return content


def _steps_text(result: TrainResult, rec, cfg, timesteps: list[float], phase_rows: list[dict]) -> str:
    """How many steps ran, for the recipe's header; with held-out stopping also writes ``training.json``."""
    budgets = f"{cfg.warmup_steps}/{cfg.policy_steps}/{cfg.joint_steps}"
    if not result.heldout:
        return f"{result.step} steps (stages {budgets})"
    run = "/".join(str(n) for n in result.stages_run)
    atomic_write_json(
        result.out_dir / "training.json",
        {
            "model": rec.name,
            "config": cfg.to_dict(),
            "stages_run": result.stages_run,
            "heldout": result.heldout,
            "sampler_steps": len(timesteps),
            "phases": [{"name": r["name"], "keep_ratios": r["keep_ratios"]} for r in phase_rows],
        },
    )
    return (
        f"{sum(result.stages_run)} steps (stages {run} of budgets {budgets}: held-out stopping every {cfg.eval_every} steps, "
        f"patience {cfg.patience}, best state of each stage kept; curve in training.json)"
    )


def _write_recipe(path: Path, rec, cfg, content: dict[str, Any], steps_text: str, n_layers: int) -> None:
    """Writes ``recipe.toml`` and reads it back through the recipe checks (a written recipe that fails is an error)."""
    header = (
        f"# Written by `shiva-export train` from {rec.source_path or rec.name}: {steps_text}, seed {cfg.seed}, "
        f"{'cached latents' if cfg.data else 'synthetic inputs'}.\n"
    )
    atomic_write_text(path, header + dumps_toml(content))
    try:
        check = load_recipe(path)
    except RecipeError as err:
        raise RecipeError(f"written recipe failed validation: {err}") from None
    check.phase_keep_ratios(0, n_layers)  # model-aware check of the phase widths


def write_outputs(
    result: TrainResult,
    rec,
    cfg,
    bank,
    policy: RatioPolicy,
    routed: list[int],
    n_tokens: int,
    n_layers: int,
    transformer,
    measure=None,
    context: str = "drop",
) -> None:
    """Writes the router, ``lut.json`` and ``recipe.toml`` of a finished run into ``result.out_dir`` and fills ``result``."""
    out_dir = result.out_dir
    measure = measure or KeepMeasure("tokens")
    sched = _schedule(cfg, policy, _lut_timesteps(cfg, transformer, n_tokens), routed, n_tokens, measure)
    router_path = out_dir / "router.safetensors"
    sha = _save_router(result, rec, cfg, bank, router_path, context)
    phase_rows = sched.phase_rows(routed, n_layers)
    _write_lut_json(out_dir / "lut.json", rec, cfg, sched, routed, n_tokens, measure, context)
    content = _recipe_content(result, rec, cfg, (router_path, sha), sched, phase_rows, context)
    recipe_path = out_dir / "recipe.toml"
    _write_recipe(recipe_path, rec, cfg, content, _steps_text(result, rec, cfg, sched.timesteps, phase_rows), n_layers)
    result.router_path, result.router_sha256, result.recipe_path, result.lut_path = (
        router_path,
        sha,
        recipe_path,
        out_dir / "lut.json",
    )
    result.timesteps, result.layers, result.lut = sched.timesteps, list(routed), sched.lut_rows
    result.mean_keep, result.raw_mean_keep = float(sched.lut.double().mean()), sched.raw_mean
    result.quantized_mean_keep = sched.quantized_mean(n_tokens, routed)
    result.calibration_shift = sched.shift
    result.phases = phase_rows
