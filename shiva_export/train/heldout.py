"""Held-out stopping of the training stages (``shiva-export train --eval-every N --patience P``).

A small **fixed** held-out batch is built once per run (:func:`heldout_batch`): with a folder of cached
latents (:class:`~shiva_export.train.cached.LatentFolder`) its last ``n`` samples are split off and never
drawn for training; with synthetic inputs or a sharded ``train-data`` folder it is ``n`` draws of a source
seeded apart from the training stream (held-out noise, timesteps and, for synthetic inputs, content).
Its timesteps are stratified over ``[0, 1000)`` like the training batches, and its stage-1 keep ratios
are stratified over the warm-up's ratio range, all fixed for the run.

Every ``eval_every`` steps of a stage, and once when the stage begins, the loop measures the quality part
of the objective on it (distillation + flow matching, no noise anywhere, the student's hard top-k at the
policy's keep ratios). :class:`EarlyStopping` keeps the best state of the stage and stops the stage when
the loss has not improved by more than ``min_delta`` (relative) for ``patience`` evaluations; at the end
of every stage, stopped or not, the best state of that stage is restored, so the next stage (and the
written router and schedule) start from it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from shiva_export.errors import ConfigError
from shiva_export.train.cached import LatentFolder, make_data
from shiva_export.train.policy import stratified_ratios, stratified_timesteps

__all__ = ["EarlyStopping", "heldout_batch", "EVAL_SEED_OFFSET"]

#: Added to the run's seed for everything held-out (the split's noise, its timesteps and ratios).
EVAL_SEED_OFFSET = 0x5EED


class EarlyStopping:
    """Per-stage best-state tracking and the patience rule.

    Args:
        patience (int): Evaluations without an improvement after which the stage stops (>= 1).
        min_delta (float): Relative improvement that counts: ``loss < best * (1 - min_delta)``. >= 0.
    """

    def __init__(self, patience: int, min_delta: float):
        if not isinstance(patience, int) or patience < 1:
            raise ConfigError(
                f"patience is {patience!r}; expected an int >= 1 (held-out evaluations without improvement)."
            )
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and 0.0 <= min_delta < 1.0):
            raise ConfigError(f"eval_min_delta is {min_delta!r}; expected 0 <= min_delta < 1 (relative improvement).")
        self.patience, self.min_delta = patience, float(min_delta)
        self.stage = -1
        self.best, self.best_step, self.bad = math.inf, -1, 0
        self.snapshot: dict[str, Any] | None = None
        self.curve: list[dict[str, Any]] = []  # every evaluation of the run: stage, step, loss
        self.stops: dict[int, int] = {}  # stage -> the step at which it stopped early

    def start(self, stage: int) -> None:
        """Forgets the previous stage's best (each stage optimises its own objective)."""
        self.stage, self.best, self.best_step, self.bad, self.snapshot = stage, math.inf, -1, 0, None

    def observe(self, step: int, loss: float, snapshot) -> bool:
        """Records one evaluation; ``snapshot()`` is called (and kept) when it is the stage's best.
        Returns True when the stage should stop."""
        improved = loss < self.best * (1.0 - self.min_delta) if math.isfinite(self.best) else math.isfinite(loss)
        self.curve.append({"stage": self.stage, "step": int(step), "loss": float(loss), "best": bool(improved)})
        if improved:
            self.best, self.best_step, self.bad = float(loss), int(step), 0
            self.snapshot = copy.deepcopy(snapshot())
        else:
            self.bad += 1
        return self.bad >= self.patience

    def summary(self, stage: int) -> dict[str, Any]:
        """``{"evals", "best_step", "best_loss", "stopped_at"}`` of one stage (from the curve)."""
        rows = [r for r in self.curve if r["stage"] == stage]
        best = [r for r in rows if r["best"]]
        return {
            "evals": [{"step": r["step"], "loss": r["loss"]} for r in rows],
            "best_step": best[-1]["step"] if best else None,
            "best_loss": best[-1]["loss"] if best else None,
            "stopped_at": self.stops.get(stage),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "best": self.best,
            "best_step": self.best_step,
            "bad": self.bad,
            "snapshot": self.snapshot,
            "curve": list(self.curve),
            "stops": {str(k): v for k, v in self.stops.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage, self.best, self.best_step, self.bad = (
            int(state["stage"]),
            float(state["best"]),
            int(state["best_step"]),
            int(state["bad"]),
        )
        self.snapshot, self.curve = state["snapshot"], list(state["curve"])
        self.stops = {int(k): int(v) for k, v in state["stops"].items()}


def heldout_batch(cfg, data, transformer, height: int, width: int, text_len: int):
    """``(batch, stage-1 keep ratios [n], source)``: the run's fixed held-out batch (module docstring).

    With a :class:`~shiva_export.train.cached.LatentFolder` the held-out samples are removed from ``data``."""
    n, seed = cfg.eval_samples, cfg.seed + EVAL_SEED_OFFSET
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = stratified_timesteps(n, generator=g)
    ratios = stratified_ratios(n, min(cfg.ratio_groups, n), cfg.ratio_range[0], cfg.ratio_range[1], generator=g)
    if isinstance(data, LatentFolder):
        held = data.split_off(n, seed=seed)
        return held.every(t, cfg_pairs=cfg.cfg_pairs), ratios, f"the last {n} of the cached samples (split off)"
    src = make_data(cfg.data, transformer, height, width, text_len, seed=seed)
    kind = "synthetic" if cfg.data is None else "cached"
    return (
        src.batch(n, t, cfg_pairs=cfg.cfg_pairs),
        ratios,
        f"{n} {kind} samples drawn with seed {seed} (held-out noise)",
    )
