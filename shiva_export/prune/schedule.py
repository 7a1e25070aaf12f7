"""Keep schedules over the denoising loop: which static budget runs at which timestep.

A :class:`TimestepPhase` is one static graph: a per-block keep schedule that owns every denoising step
whose timestep ``t`` satisfies ``t_stop < t <= t_start`` (the last phase also owns ``t = 0``, the first
also owns anything above its ``t_start``). A fixed ``--ratio`` is the one-phase case ``(1000, 0]``.
Boundaries come from the recipe's ``[[schedule.phases]]`` as written: :func:`phases_from_recipe` never
re-derives them, it only checks that they tile the timestep axis without a gap or an overlap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shiva_export.errors import ConfigError, RecipeError

__all__ = [
    "TimestepPhase",
    "phase_index",
    "phases_from_recipe",
    "uniform_phase",
    "check_phases",
    "budget_label",
    "call_timestep",
]


def budget_label(ratio: float) -> str:
    """Name of a fixed-ratio budget (its engine folder and its one phase): ``ratio0.40`` (fraction pruned),
    with every digit the ratio needs.

    Two different ratios never share a name: 0.4 is ``ratio0.40`` and 0.404 ``ratio0.404``, 0.12 is
    ``ratio0.12`` and 0.125 ``ratio0.125`` (their per-block k differ). Ratios that give the same k in every
    block are one budget: callers deduplicate them before building (``engines.budgets.unique_budgets``).
    """
    r = float(ratio)
    short = f"{r:.2f}"
    if float(short) == r:
        return f"ratio{short}"
    return f"ratio{r:.10f}".rstrip("0")


def call_timestep(timestep) -> float:
    """The one timestep of a call (every batch entry must share it): what a phase schedule dispatches on."""
    import torch

    if timestep is None:
        raise ConfigError("a phase schedule needs the call's timestep; pass timestep=.")
    ts = torch.as_tensor(timestep).reshape(-1)
    if ts.numel() > 1 and not bool((ts == ts[0]).all()):
        raise ConfigError(
            f"a phase schedule needs one timestep per call; got {ts.tolist()}. Call the transformer once per denoising step."
        )
    return float(ts[0])


@dataclass(frozen=True)
class TimestepPhase:
    """One static keep schedule and the timesteps it owns.

    Args:
        name (str): Phase name (``early``, ``late``, ``ratio0.40``, ...).
        t_start (float): Upper timestep bound, inclusive.
        t_stop (float): Lower timestep bound, exclusive (``0`` = to the end of the loop).
        keep_ratios (tuple[float | None, ...]): One entry per block; ``None`` is a dense block.
    """

    name: str
    t_start: float
    t_stop: float
    keep_ratios: tuple[float | None, ...]

    def __post_init__(self):
        object.__setattr__(self, "keep_ratios", tuple(self.keep_ratios))
        if (
            not (math.isfinite(self.t_start) and math.isfinite(self.t_stop))
            or self.t_start < self.t_stop
            or self.t_stop < 0
        ):
            raise ConfigError(
                f"phase {self.name!r} has t_start {self.t_start} and t_stop {self.t_stop}; expected finite 0 <= t_stop <= t_start."
            )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "t_start": self.t_start,
            "t_stop": self.t_stop,
            "keep_ratios": list(self.keep_ratios),
        }


def check_phases(phases: Sequence[TimestepPhase], where: str = "schedule") -> tuple[TimestepPhase, ...]:
    """Validates that ``phases`` run in sampling order and tile the timestep axis (no gap, no overlap)."""
    phases = tuple(phases)
    if not phases:
        raise ConfigError(f"{where}: no phase given; give a --ratio or a recipe with [[schedule.phases]].")
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: phase names {names} repeat; give each phase its own name.")
    for a, b in zip(phases, phases[1:]):
        if a.t_stop != b.t_start:
            raise RecipeError(
                f"{where}: phase {a.name!r} stops at t = {a.t_stop} but phase {b.name!r} starts at t = {b.t_start}; "
                "consecutive phases must share their boundary (t_stop of one = t_start of the next)."
            )
    return phases


def phase_index(phases: Sequence[TimestepPhase], t: float) -> int:
    """Index of the phase that owns timestep ``t``: ``t_stop < t <= t_start``; the first phase also takes
    ``t > t_start`` and the last also ``t <= t_stop``."""
    for i, p in enumerate(phases):
        if t > p.t_stop:
            return i
    return len(phases) - 1


def uniform_phase(num_layers: int, ratio: float, routed_blocks: Sequence[int]) -> TimestepPhase:
    """The one-phase schedule of a fixed ``ratio`` (fraction of image tokens pruned)."""
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise ConfigError(
            f"--ratio {ratio!r} is out of range; expected 0 <= ratio < 1 (fraction of image tokens pruned; 0.4 keeps 60%)."
        )
    routed = set(routed_blocks)
    keep = tuple((1.0 - ratio) if i in routed else None for i in range(num_layers))
    return TimestepPhase(budget_label(ratio), 1000.0, 0.0, keep)


def phases_from_recipe(recipe, num_layers: int) -> tuple[TimestepPhase, ...]:
    """The recipe's learned ``[[schedule.phases]]`` with the boundaries exactly as recorded."""
    rows = recipe.schedule.phases if recipe.schedule else []
    if not rows:
        raise RecipeError(
            f"{recipe.source_path or recipe.name}: has no [[schedule.phases]]; train one with `shiva-export train`, or pass --ratio."
        )
    phases = [
        TimestepPhase(p.name, float(p.t_start), float(p.t_stop), tuple(recipe.phase_keep_ratios(i, num_layers)))
        for i, p in enumerate(rows)
    ]
    return check_phases(phases, str(recipe.source_path or recipe.name))
