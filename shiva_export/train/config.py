"""Settings of ``shiva-export train``: :class:`TrainConfig` (every option, checked on construction, before a
model is loaded) and the three curriculum stages it counts steps over (:data:`STAGES`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from shiva_export.errors import ConfigError
from shiva_export.prune.api import check_context
from shiva_export.recipe import Recipe, load_recipe
from shiva_export.train.dora import check_dora_settings
from shiva_export.train.heldout import EarlyStopping
from shiva_export.train.policy import KEEP_MEASURES, MAX_PHASES
from shiva_export.train.ste import ESTIMATORS

__all__ = ["TrainConfig", "STAGES", "resolve_recipe"]

STAGES = ("router-warmup", "policy", "joint")


@dataclass
class TrainConfig:
    """Settings of :func:`train`. Paper values where it gives them (lrs, beta, noise, start temperatures).

    Args:
        warmup_steps (int): Stage 1 (router warm-up) steps. Defaults to 120.
        policy_steps (int): Stage 2 (policy learning) steps. Defaults to 60.
        joint_steps (int): Stage 3 (joint tuning) steps. Defaults to 40.
        batch (int): Samples per step (= timestep strata). Defaults to 4.
        lr_router (float): AdamW lr of the routers. Defaults to 3e-4 (paper).
        lr_policy (float): AdamW lr of the ratio policy. Defaults to 1e-4 (paper).
        weight_decay (float): AdamW weight decay. Defaults to 0.0.
        lr_warmup_frac (float): Linear lr warm-up per stage, as a fraction of its steps (paper: 200
            steps). Defaults to 0.1.
        target_keep (float): Target mean keep ratio in (0, 1). Defaults to 0.6.
        lambda_budget (float): Weight of the EMA budget loss. Defaults to 1.0.
        ema_beta (float): EMA weight of the batch mean keep. Defaults to 0.2 (paper).
        distill_weight (float): Weight of the normalised feature distillation. Defaults to 1.0.
        flow_weight (float): Weight of the denoising loss on real latents (the adapter's objective: flow matching
            for SD3/Flux, DDPM noise for PixArt/DiT), logged as ``flow``. Defaults to 1.0.
        importance_weight (float): Weight of an auxiliary router loss that is NOT in the paper:
            ``1 - corr(router scores, teacher's per-token relative update norm)`` per routed block (the
            teacher's dense pass gives the update norms for free). It is ~100x the distillation loss in
            size, so any weight near 1 makes training "regress onto a heuristic"; 0 (the default) is the
            paper's objective. Defaults to 0.0.
        estimator (str): Gradient estimator of the routing: ``"output-gated"`` (the gate multiplies the
            block's update; the rejected tokens' update comes from the teacher's dense pass; measured to
            have the finite-difference sign of dL/dkeep, ``validate estimator``) or ``"residual"`` (the
            paper's Eq. 7/23 STE). Defaults to ``"output-gated"``.
        min_keep (float): Floor of every learned keep ratio (``RatioPolicy.min_keep``), in
            ``[0, target_keep)``. Defaults to 0.2.
        max_logit (float | None): Smooth bound of the policy logits (``RatioPolicy.max_logit``); None is the
            paper's unbounded logit. Defaults to 4.0.
        budget (str): ``"project"``: a hard budget; after every policy update ``b_anchor`` is shifted so
            the policy's measure over the deployment sampler's timesteps equals the target (the shift is
            logged as ``budget_shift``), so the policy
            learns where to spend a fixed budget (the distillation loss alone would ask for more tokens
            everywhere). ``"ema"``: the paper's soft EMA budget loss (Eqs. 12-13, weight
            ``lambda_budget``), which holds the target only when ``lambda_budget`` matches the scale of the
            loss's keep gradient. Defaults to ``"project"``.
        budget_timesteps (str): Where the budget measures the policy's mean keep: ``"sampler"`` (its LUT
            over the deployment sampler's timesteps, every step: what deployment runs) or ``"batch"`` (the
            batch's stratified training timesteps, the paper's). Defaults to ``"sampler"``.
        budget_measure (str): ``"tokens"`` (mean keep ratio) or ``"flops"`` (the uniform keep with equal
            FLOPs, :class:`~shiva_export.train.policy.KeepMeasure`). Defaults to ``"tokens"``.
        max_calibration_shift (float): The post-hoc ``b_anchor`` calibration warns when it moves the logit
            by more than this (the written schedule then differs from the trained one). Defaults to 0.2.
        device (str): Torch device of the backbone, routers and policy (``cpu``, ``cuda``). Defaults to ``cpu``.
        dtype (str): Backbone dtype (``fp32``, ``bf16``, ``fp16``); routers, policy, soft rank and losses
            stay fp32. Defaults to ``fp32``.
        gradient_checkpointing (bool): Recompute routed blocks in the backward instead of storing their
            activations. Defaults to False.
        accumulate (int): Micro-batches per optimizer step (per process); ``batch`` is the global batch
            (processes x accumulate x micro-batch). Defaults to 1.
        cfg_pairs (bool): Train on ``[uncond; cond]`` pairs that share the kept indices by max score, as
            CFG inference does (the batch doubles). Defaults to False.
        caption_dropout (float): Probability of replacing a sample's text with the null text. Defaults to 0.0.
        logit_noise_std (float): Policy logit noise sigma in stage 2. Defaults to 1.0 (paper).
        score_noise_std (float): Router score noise sigma of the surrogate. Defaults to 0.1.
        tau_rank (tuple[float, float]): Start/end of the rank temperature. Defaults to (0.2, 0.05).
        tau_sel (tuple[float, float]): Start/end of the selection temperature. Defaults to (0.1, 0.025).
        ratio_range (tuple[float, float]): Keep-ratio range of the stage-1 stratified sampling.
            Defaults to (0.3, 0.9).
        ratio_groups (int): Groups of the stratified ratio sampling (clamped to ``batch``). Defaults to 4.
        tap_every (int): Distil the hidden states after every ``tap_every``-th block. Defaults to 4.
        seed (int): Seed of data, sampling and noise. Defaults to 0.
        phases (int): Static phases of the quantised LUT, 1..4. Defaults to 2.
        sampler_steps (int): Steps of the pipeline's sampler the LUT is evaluated on (the adapter's
            ``sampler_timesteps``: SD3 flow-matching Euler, Flux with its resolution shift, PixArt/DiT
            DPM-Solver). Defaults to 28.
        sampler_shift (float): Timestep shift of the SD3/SD3.5 sampler (3.0); other architectures use their
            pipeline's own. Defaults to 3.0.
        timesteps (Sequence[float] | None): Explicit sampler timesteps (sampling order); overrides
            ``sampler_steps``/``sampler_shift``. Defaults to None.
        calibrate_budget (bool): Shift ``b_anchor`` so the LUT mean equals the target (module docstring).
            Defaults to True.
        data (PathLike | None): Folder of cached latents; None = synthetic inputs. Defaults to None.
        out_dir (PathLike): Output folder. Defaults to ``"shiva-train"``.
        resume (bool): Continue from ``out_dir/checkpoint.pt``. Defaults to False.
        checkpoint_every (int): Steps between checkpoints (also written at the end). Defaults to 50.
        stop_at_step (int | None): End this run after that global step with a checkpoint but no outputs
            (time-sliced training; resume later). Defaults to None.
        num_threads (int | None): ``torch.set_num_threads`` for the run. Defaults to None (unchanged).
        eval_every (int | None): Held-out stopping (:mod:`shiva_export.train.heldout`): evaluate the
            quality loss on a fixed held-out batch every that many steps of a stage (and when it begins),
            stop the stage after ``patience`` evaluations without an improvement, and restore the stage's best
            state at its end. None (the default) trains every stage for its full step count, as before.
        patience (int): Evaluations without an improvement before a stage stops. Defaults to 5.
        eval_min_delta (float): Relative improvement of the held-out loss that counts. Defaults to 1e-3.
        eval_samples (int): Size of the held-out batch (with cached latents: samples split off the training
            pool). Defaults to 32.
        dora (bool): DoRA adapters on the attention/FFN linears (:mod:`shiva_export.train.dora`), trained in
            stage 3 only; the teacher runs with them disabled; the merged transformer is saved to
            ``out_dir/transformer`` and the written recipe is bound to it by path and sha256. Defaults to False.
        dora_rank (int): DoRA rank. Defaults to 32.
        dora_alpha (float): DoRA ``lora_alpha``. Defaults to 32.
        lr_dora (float): AdamW lr of the DoRA adapters (own param group). Defaults to 1e-4.
        stage3_keep (float | None): Route the stage-3 student at this uniform keep in every routed block instead of
            the learned policy (which is then frozen: no policy or budget update in stage 3). None follows the
            policy (the paper). Defaults to None.
        dense_weight (float): With DoRA, weight of a stage-3 term that keeps the dense behaviour: the adapted model
            run dense (keep 1.0, no routing) distilled to the frozen dense teacher, the same normalised feature
            loss (one extra forward and backward per step). 0 is off (the paper). Defaults to 0.0.
        context (str | None): The routing's ``ShivaConfig.context`` the student trains with: ``"drop"`` or
            ``"keep"`` (rejected tokens still give keys and values, as at inference with that option; SD3/SD3.5).
            The ``"flops"`` budget measure counts its extra K/V, and the written recipe and router metadata
            record it. Defaults to None (the recipe's ``[prune] context``).
    """

    warmup_steps: int = 120
    policy_steps: int = 60
    joint_steps: int = 40
    batch: int = 4
    lr_router: float = 3e-4
    lr_policy: float = 1e-4
    weight_decay: float = 0.0
    lr_warmup_frac: float = 0.1
    target_keep: float = 0.6
    lambda_budget: float = 1.0
    ema_beta: float = 0.2
    distill_weight: float = 1.0
    flow_weight: float = 1.0
    importance_weight: float = 0.0
    estimator: str = "output-gated"
    min_keep: float = 0.2
    max_logit: float | None = 4.0
    budget: str = "project"
    budget_timesteps: str = "sampler"
    budget_measure: str = "tokens"
    max_calibration_shift: float = 0.2
    device: str = "cpu"
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    accumulate: int = 1
    cfg_pairs: bool = False
    caption_dropout: float = 0.0
    logit_noise_std: float = 1.0
    score_noise_std: float = 0.1
    tau_rank: tuple[float, float] = (0.2, 0.05)
    tau_sel: tuple[float, float] = (0.1, 0.025)
    ratio_range: tuple[float, float] = (0.3, 0.9)
    ratio_groups: int = 4
    tap_every: int = 4
    seed: int = 0
    phases: int = 2
    sampler_steps: int = 28
    sampler_shift: float = 3.0
    timesteps: Sequence[float] | None = None
    calibrate_budget: bool = True
    data: str | os.PathLike | None = None
    out_dir: str | os.PathLike = "shiva-train"
    resume: bool = False
    checkpoint_every: int = 50
    stop_at_step: int | None = None
    num_threads: int | None = None
    eval_every: int | None = None
    patience: int = 5
    eval_min_delta: float = 1e-3
    eval_samples: int = 32
    # -- DoRA (stage 3) --
    dora: bool = False
    dora_rank: int = 32
    dora_alpha: float = 32.0
    lr_dora: float = 1e-4
    stage3_keep: float | None = None
    dense_weight: float = 0.0
    context: str | None = None

    def __post_init__(self):
        self._check_counts_and_rates()
        self._check_choices()
        self._check_runtime()
        self._check_stage3()

    def _check_counts_and_rates(self) -> None:
        for name in ("warmup_steps", "policy_steps", "joint_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} is {v!r}; expected an int >= 0. Pass a step count per stage.")
        if self.total_steps < 1:
            raise ConfigError("all stage step counts are 0; expected at least one training step. Pass --steps N.")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"batch is {self.batch!r}; expected an int >= 1.")
        if not (isinstance(self.target_keep, (int, float)) and 0.0 < self.target_keep < 1.0):
            raise ConfigError(
                f"target keep is {self.target_keep!r}; expected 0 < target_keep < 1 (fraction of image tokens kept)."
            )
        for name in ("lr_router", "lr_policy"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} is {v!r}; expected a finite float > 0.")
        for name in (
            "lambda_budget",
            "distill_weight",
            "flow_weight",
            "importance_weight",
            "weight_decay",
            "logit_noise_std",
            "score_noise_std",
        ):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} is {v!r}; expected a finite float >= 0.")
        if not (isinstance(self.phases, int) and 1 <= self.phases <= MAX_PHASES):
            raise ConfigError(
                f"phases is {self.phases!r}; expected an int in 1..{MAX_PHASES}. Each phase is one static engine."
            )
        if not isinstance(self.tap_every, int) or self.tap_every < 1:
            raise ConfigError(f"tap_every is {self.tap_every!r}; expected an int >= 1 (paper: 4).")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every is {self.checkpoint_every!r}; expected an int >= 1.")
        lo, hi = self.ratio_range
        if not 0.0 < lo < hi <= 1.0:
            raise ConfigError(f"ratio_range is {self.ratio_range!r}; expected 0 < low < high <= 1 (keep ratios).")
        if self.timesteps is None and (not isinstance(self.sampler_steps, int) or self.sampler_steps < self.phases):
            raise ConfigError(f"sampler_steps is {self.sampler_steps!r}; expected an int >= phases ({self.phases}).")

    def _check_choices(self) -> None:
        if self.context is not None:
            check_context(self.context)

        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator {self.estimator!r} is unknown; choose one of {', '.join(ESTIMATORS)}.")
        if not (isinstance(self.min_keep, (int, float)) and 0.0 <= self.min_keep < self.target_keep):
            raise ConfigError(
                f"min_keep is {self.min_keep!r}; expected 0 <= min_keep < target_keep ({self.target_keep})."
            )
        if self.budget not in ("project", "ema"):
            raise ConfigError(
                f"budget {self.budget!r} is unknown; choose 'project' (hard, default) or 'ema' (the paper's soft loss)."
            )
        if self.budget_timesteps not in ("sampler", "batch"):
            raise ConfigError(f"budget_timesteps {self.budget_timesteps!r} is unknown; choose 'sampler' or 'batch'.")
        if self.budget_measure not in KEEP_MEASURES:
            raise ConfigError(
                f"budget_measure {self.budget_measure!r} is unknown; choose one of {', '.join(KEEP_MEASURES)}."
            )
        if not (isinstance(self.max_calibration_shift, (int, float)) and self.max_calibration_shift >= 0):
            raise ConfigError(
                f"max_calibration_shift is {self.max_calibration_shift!r}; expected a float >= 0 (logit units)."
            )
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(
                f"dtype {self.dtype!r} is unknown; choose fp32, bf16 or fp16 (the backbone's; routers stay fp32)."
            )

    def _check_runtime(self) -> None:
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ConfigError(
                f"accumulate is {self.accumulate!r}; expected an int >= 1 (micro-batches per optimizer step)."
            )
        if not (isinstance(self.caption_dropout, (int, float)) and 0.0 <= self.caption_dropout < 1.0):
            raise ConfigError(f"caption_dropout is {self.caption_dropout!r}; expected 0 <= p < 1 (paper: 0.1).")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device {self.device!r} is not a torch device; pass cpu, cuda or cuda:N.") from None
        if self.stop_at_step is not None and (not isinstance(self.stop_at_step, int) or self.stop_at_step < 1):
            raise ConfigError(f"stop_at_step is {self.stop_at_step!r}; expected an int >= 1 or None.")
        if self.eval_every is not None:
            if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 1:
                raise ConfigError(
                    f"eval_every is {self.eval_every!r}; expected an int >= 1 (steps between held-out evaluations) or None (off)."
                )
            if not isinstance(self.eval_samples, int) or self.eval_samples < 1:
                raise ConfigError(
                    f"eval_samples is {self.eval_samples!r}; expected an int >= 1 (size of the held-out batch)."
                )

            EarlyStopping(self.patience, self.eval_min_delta)  # checks patience and min_delta
        if self.dora:  # -- DoRA --
            check_dora_settings(self.dora_rank, self.dora_alpha, self.lr_dora, self.joint_steps)

    def _check_stage3(self) -> None:
        if self.stage3_keep is not None:
            if not (
                isinstance(self.stage3_keep, (int, float))
                and not isinstance(self.stage3_keep, bool)
                and 0.0 < self.stage3_keep <= 1.0
            ):
                raise ConfigError(
                    f"stage3_keep is {self.stage3_keep!r}; expected 0 < keep <= 1 (the uniform keep of the stage-3 student)."
                )
            if self.joint_steps < 1:
                raise ConfigError(
                    "--stage3-keep routes stage 3 (joint), which has 0 steps; pass 3 --steps values with a joint stage, or drop --stage3-keep."
                )
        if not (
            isinstance(self.dense_weight, (int, float)) and math.isfinite(self.dense_weight) and self.dense_weight >= 0
        ):
            raise ConfigError(f"dense_weight is {self.dense_weight!r}; expected a finite float >= 0.")
        if self.dense_weight > 0 and not self.dora:
            raise ConfigError(
                f"dense_weight {self.dense_weight:g} needs --dora: without adapters the dense student is the teacher, so the term is 0. Add --dora or drop --dense-weight."
            )

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.policy_steps + self.joint_steps

    def stage_of(self, step: int) -> tuple[int, int, int]:
        """``(stage index 0..2, step within the stage, stage length)`` of a 0-based global step."""
        lens = (self.warmup_steps, self.policy_steps, self.joint_steps)
        a = 0
        for i, n in enumerate(lens):
            if step < a + n:
                return i, step - a, n
            a += n
        return 2, step - (a - lens[2]), lens[2]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = None if self.data is None else str(self.data)
        d["out_dir"] = str(self.out_dir)
        d["timesteps"] = None if self.timesteps is None else [float(t) for t in self.timesteps]
        return d


def resolve_recipe(recipe_or_model):
    """A :class:`~shiva_export.recipe.Recipe` as is, else the recipe of a model name or path."""
    return recipe_or_model if isinstance(recipe_or_model, Recipe) else load_recipe(recipe_or_model)
