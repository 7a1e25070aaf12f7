"""Router + ratio-policy distillation (paper Sec. 3): ``shiva-export train``.

One transformer serves as both networks. The **teacher** is the frozen backbone run exactly dense: the
route override calls every routed block on all tokens (the same call the unrouted path makes), under
``no_grad``. The **student** is the same backbone with the route override routing each block through
:class:`~shiva_export.train.ste.DifferentiableTopK` + :func:`~shiva_export.train.ste.route_with_ste`, so
the forward is the exported hard top-k and gradients reach the routers and the keep ratios. The
backbone is frozen; with ``dora=True`` stage 3 also trains DoRA adapters on its attention/FFN linears
(:mod:`shiva_export.train.dora`; the teacher runs with them disabled).

Losses: normalised feature distillation ``mean_l ||LN(h_s^l) - LN(h_t^l)||^2`` over the hidden states
after every ``tap_every``-th block and the output (paper: every 4 blocks plus the output), plus the
flow-matching loss ``||v_s - (eps - x0)||^2`` when real latents are given, plus the EMA budget loss.

Curriculum (three stages, global step counter across them):

1. **Router warm-up**: the policy is bypassed; keep ratios come from stratified ratio sampling
   (:func:`~shiva_export.train.policy.stratified_ratios`); only the routers learn.
2. **Policy learning**: keep ratios ``policy(t, l)`` with logit noise ``N(0, 1)``; EMA budget loss.
3. **Joint tuning**: noise off; routers and policy together under the budget.

Timesteps are drawn stratified (Eq. 15). Samples whose keep ratio differs run through a routed block
as separate calls (``k`` is static per call); samples sharing a ratio run together.

Outputs in ``out_dir``: ``router.safetensors`` (:func:`~shiva_export.prune.router.save_routers`),
``lut.json`` (the policy on the sampler's timesteps), ``recipe.toml`` (the base recipe plus
``[router] weights/sha256`` and ``[schedule]`` with the LUT quantised into 1-4 static phases), and
``checkpoint.pt`` (atomic, resumable). With DoRA also ``transformer/`` (the merged backbone), and the
recipe's ``[model]`` becomes ``source = "local"``, ``path = "transformer"`` with its ``sha256``.

Budget calibration (a choice, on by default): the EMA budget meets the target on average over the
*training* timestep distribution (uniform in ``[0, 1000)``), but a shifted flow-matching sampler spends
more steps at high ``t``. After training, ``b_anchor`` is shifted so the LUT's mean over the sampler's
timesteps equals the target exactly; the uncalibrated mean is reported as ``raw_mean_keep``.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shiva_export.errors import ConfigError, RecipeError
from shiva_export.logging import get_logger
from shiva_export.prune.topk import gather_tokens, scatter_tokens, select_topk, static_k
from shiva_export.train.data import make_data
from shiva_export.train.policy import MAX_PHASES, EMABudget, KeepMeasure, RatioPolicy, quantize_lut, stratified_ratios, stratified_timesteps
from shiva_export.train.ste import DifferentiableTopK, TemperatureSchedule, route_with_ste

__all__ = [
    "TrainConfig",
    "TrainResult",
    "RouterEvaluation",
    "train",
    "evaluate_router",
    "sampler_timesteps",
    "phase_bounds",
    "phase_names",
    "dumps_toml",
    "STAGES",
]

logger = get_logger(__name__)

STAGES = ("router-warmup", "policy", "joint")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
_CKPT_FORMAT = "shiva-train-checkpoint/1"


# ----------------------------------------------------------------------------------------------- config
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
        flow_weight (float): Weight of the flow-matching loss (real latents only). Defaults to 1.0.
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
        for name in ("warmup_steps", "policy_steps", "joint_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} is {v!r}; expected an int >= 0. Pass a step count per stage.")
        if self.total_steps < 1:
            raise ConfigError("all stage step counts are 0; expected at least one training step. Pass --steps N.")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"batch is {self.batch!r}; expected an int >= 1.")
        if not (isinstance(self.target_keep, (int, float)) and 0.0 < self.target_keep < 1.0):
            raise ConfigError(f"target keep is {self.target_keep!r}; expected 0 < target_keep < 1 (fraction of image tokens kept).")
        for name in ("lr_router", "lr_policy"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} is {v!r}; expected a finite float > 0.")
        for name in ("lambda_budget", "distill_weight", "flow_weight", "importance_weight", "weight_decay", "logit_noise_std", "score_noise_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} is {v!r}; expected a finite float >= 0.")
        if not (isinstance(self.phases, int) and 1 <= self.phases <= MAX_PHASES):
            raise ConfigError(f"phases is {self.phases!r}; expected an int in 1..{MAX_PHASES}. Each phase is one static engine.")
        if not isinstance(self.tap_every, int) or self.tap_every < 1:
            raise ConfigError(f"tap_every is {self.tap_every!r}; expected an int >= 1 (paper: 4).")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every is {self.checkpoint_every!r}; expected an int >= 1.")
        lo, hi = self.ratio_range
        if not 0.0 < lo < hi <= 1.0:
            raise ConfigError(f"ratio_range is {self.ratio_range!r}; expected 0 < low < high <= 1 (keep ratios).")
        if self.timesteps is None and (not isinstance(self.sampler_steps, int) or self.sampler_steps < self.phases):
            raise ConfigError(f"sampler_steps is {self.sampler_steps!r}; expected an int >= phases ({self.phases}).")
        from shiva_export.prune.api import check_context
        from shiva_export.train.policy import KEEP_MEASURES
        from shiva_export.train.ste import ESTIMATORS

        if self.context is not None:
            check_context(self.context)

        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator {self.estimator!r} is unknown; choose one of {', '.join(ESTIMATORS)}.")
        if not (isinstance(self.min_keep, (int, float)) and 0.0 <= self.min_keep < self.target_keep):
            raise ConfigError(f"min_keep is {self.min_keep!r}; expected 0 <= min_keep < target_keep ({self.target_keep}).")
        if self.budget not in ("project", "ema"):
            raise ConfigError(f"budget {self.budget!r} is unknown; choose 'project' (hard, default) or 'ema' (the paper's soft loss).")
        if self.budget_timesteps not in ("sampler", "batch"):
            raise ConfigError(f"budget_timesteps {self.budget_timesteps!r} is unknown; choose 'sampler' or 'batch'.")
        if self.budget_measure not in KEEP_MEASURES:
            raise ConfigError(f"budget_measure {self.budget_measure!r} is unknown; choose one of {', '.join(KEEP_MEASURES)}.")
        if not (isinstance(self.max_calibration_shift, (int, float)) and self.max_calibration_shift >= 0):
            raise ConfigError(f"max_calibration_shift is {self.max_calibration_shift!r}; expected a float >= 0 (logit units).")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype {self.dtype!r} is unknown; choose fp32, bf16 or fp16 (the backbone's; routers stay fp32).")
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ConfigError(f"accumulate is {self.accumulate!r}; expected an int >= 1 (micro-batches per optimizer step).")
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
                raise ConfigError(f"eval_every is {self.eval_every!r}; expected an int >= 1 (steps between held-out evaluations) or None (off).")
            if not isinstance(self.eval_samples, int) or self.eval_samples < 1:
                raise ConfigError(f"eval_samples is {self.eval_samples!r}; expected an int >= 1 (size of the held-out batch).")
            from shiva_export.train.heldout import EarlyStopping

            EarlyStopping(self.patience, self.eval_min_delta)  # checks patience and min_delta
        if self.dora:  # -- DoRA --
            from shiva_export.train.dora import check_dora_settings

            check_dora_settings(self.dora_rank, self.dora_alpha, self.lr_dora, self.joint_steps)
        self._check_stage3()

    def _check_stage3(self) -> None:
        if self.stage3_keep is not None:
            if not (isinstance(self.stage3_keep, (int, float)) and not isinstance(self.stage3_keep, bool) and 0.0 < self.stage3_keep <= 1.0):
                raise ConfigError(f"stage3_keep is {self.stage3_keep!r}; expected 0 < keep <= 1 (the uniform keep of the stage-3 student).")
            if self.joint_steps < 1:
                raise ConfigError("--stage3-keep routes stage 3 (joint), which has 0 steps; pass 3 --steps values with a joint stage, or drop --stage3-keep.")
        if not (isinstance(self.dense_weight, (int, float)) and math.isfinite(self.dense_weight) and self.dense_weight >= 0):
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


# ----------------------------------------------------------------------------------------------- helpers
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
    return {1: ["all"], 2: ["early", "late"], 3: ["early", "mid", "late"], 4: ["early", "mid-early", "mid-late", "late"]}[n]


def _resolve_recipe(recipe_or_model):
    from shiva_export.recipe import Recipe, load_recipe

    return recipe_or_model if isinstance(recipe_or_model, Recipe) else load_recipe(recipe_or_model)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],))


class _RouteState:
    """Mutable state read by the route override during one forward."""

    def __init__(self, routed: list[int], topk: DifferentiableTopK, taps: set[int], estimator: str = "output-gated"):
        self.mode = "dense"  # dense | student | hard | l2
        self.col = {b: i for i, b in enumerate(routed)}
        self.topk = topk
        self.estimator = estimator
        self.keep: torch.Tensor | None = None  # [B, L] (student) or a float (hard / l2)
        self.generator: torch.Generator | None = None
        self.tap_blocks = taps
        self.taps: dict[int, torch.Tensor] = {}
        self.record_importance = False
        self.importance: dict[int, torch.Tensor] = {}  # dense pass: per-token relative update norm [B, N]
        self.record_updates = False
        self.updates: dict[int, torch.Tensor] = {}  # dense pass: the teacher's update f(x) - x [B, N, D] (output-gated)
        self.scores: dict[int, torch.Tensor] = {}  # student pass: router scores [B, N]
        self.cfg = False  # the batch is [uncond; cond] pairs (row i and i + B/2 share kept indices)
        self.samples: torch.Tensor | None = None  # [B] global sample id of each row (score noise per sample)
        self.noise_key: tuple[int, int] | None = None  # (seed, step): score noise derived per sample and block
        self.checkpointing = False


def _make_override(state: _RouteState):
    """The route override of one training run (protocol: ``prune.api.set_route_override``): dense teacher,
    student (differentiable top-k + an estimator), or hard routing with the trained router (``hard``) or
    ``||x||`` (``l2``)."""

    def override(index_block, hidden_states, temb, pooled, run_block, shared, routers):
        mode = state.mode
        if mode == "dense":
            ehs, out = run_block(hidden_states, None)
            if state.record_importance:
                state.importance[index_block] = (out - hidden_states).float().norm(dim=-1) / hidden_states.float().norm(dim=-1).clamp_min(1e-6)
            if state.record_updates and index_block in state.col:
                state.updates[index_block] = (out - hidden_states).detach()
        elif mode in ("hard", "l2"):
            n = int(hidden_states.shape[1])
            k = static_k(n, float(state.keep))
            if mode == "l2":
                scores = hidden_states.float().norm(dim=-1)
            else:
                scores = routers(index_block, hidden_states, temb, pooled)
            if shared and scores.shape[0] > 1:
                idx = select_topk(scores.amax(dim=0, keepdim=True), k).expand(scores.shape[0], k)
            else:
                idx = select_topk(scores, k, cfg=state.cfg)
            ehs, kept = run_block(gather_tokens(hidden_states, idx), idx)
            out = scatter_tokens(hidden_states, idx, kept)
        else:
            ehs, out = _student_block(state, index_block, hidden_states, temb, pooled, run_block, shared, routers)
        if index_block in state.tap_blocks:
            state.taps[index_block] = out
        return ehs, out

    return override


def _shared_selection(sel, rows: int):
    """One selection (made on the rows' max scores) expanded to ``rows`` rows (blocks whose per-token side
    inputs have no batch axis, e.g. Flux RoPE, need one index set per call)."""
    from shiva_export.train.ste import Selection

    if rows == 1:
        return sel
    ex = lambda t: t.expand(rows, *t.shape[1:])  # noqa: E731
    return Selection(ex(sel.indices), ex(sel.rejected), ex(sel.pi), ex(sel.pi_sel), ex(sel.pi_rej), sel.k, sel.k_soft)


def _score_noise(state: _RouteState, ids: list[int], block: int, n: int):
    if state.noise_key is None or state.samples is None or not state.topk.training or state.topk.noise_std <= 0:
        return None
    from shiva_export.train.distributed import sample_noise

    seed, step = state.noise_key
    return sample_noise(seed, step, [int(state.samples[i]) for i in ids], block, n)


def _student_block(state, index_block, hs, temb, pooled, run_block, shared, routers):
    from shiva_export.train.ste import route_output_gated

    scores = routers(index_block, hs, temb, pooled)  # [B, N] fp32
    state.scores[index_block] = scores
    keep = state.keep[:, state.col[index_block]]  # [B]
    values = keep.detach().tolist()
    b = int(hs.shape[0])
    groups: dict[float, list[int]] = {}
    if state.cfg:  # pairs (i, i + B/2) share one keep and one selection; a group lists its uncond rows, then its cond rows
        half = b // 2
        for i in range(half):
            groups.setdefault(values[i], []).append(i)
        groups = {v: ids + [i + half for i in ids] for v, ids in groups.items()}
    else:
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
    n = int(hs.shape[1])
    outs_h, outs_e, order = [], [], []
    for ids in groups.values():
        ix = torch.as_tensor(ids, dtype=torch.long, device=hs.device)
        rows = None if len(ids) == b else ix
        sub = (lambda t: t) if rows is None else (lambda t: t.index_select(0, ix))
        s = sub(scores)
        if shared and len(ids) > 1:
            noise = _score_noise(state, ids[:1], index_block, n)
            sel = _shared_selection(state.topk.select(s.amax(dim=0, keepdim=True), keep[ids[0]], generator=state.generator, noise=noise), len(ids))
        else:
            noise = _score_noise(state, ids[len(ids) // 2 :] if state.cfg else ids, index_block, n)
            sel = state.topk.select(s, keep[ids[0]], cfg=state.cfg, generator=state.generator, noise=noise)
        holder: list = []

        def fn(kept, _sel=sel, _rows=rows):
            if state.checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                e, o = checkpoint(lambda x: run_block(x, _sel.indices, _rows), kept, use_reentrant=False)
            else:
                e, o = run_block(kept, _sel.indices, _rows)
            holder.append(e)
            return o

        if state.estimator == "output-gated":
            outs_h.append(route_output_gated(sub(hs), sel, fn, sub(state.updates[index_block])))
        else:
            outs_h.append(route_with_ste(sub(hs), sel, fn))
        outs_e.append(holder[0])
        order.extend(ids)
    if len(outs_h) == 1 and order == list(range(b)):
        return outs_e[0], outs_h[0]
    inv = torch.argsort(torch.as_tensor(order, dtype=torch.long, device=hs.device))
    out = torch.cat(outs_h, 0).index_select(0, inv)
    e_out = None if outs_e[0] is None else torch.cat(outs_e, 0).index_select(0, inv)
    return e_out, out


def _forward(transformer, state: _RouteState, inputs: dict) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    state.taps, state.scores = {}, {}
    out = transformer(**inputs).sample
    return out, dict(state.taps)


def _heldout_loss(transformer, state: _RouteState, batch, keep: torch.Tensor, cfg: TrainConfig, device, bdtype, chunk: int) -> float:
    """Mean quality loss (weighted distillation + flow matching) of the student on a fixed batch: no grad,
    no score noise, no draw from any training RNG (the training stream is the same with and without it)."""
    from shiva_export.train import dora as _dora

    pairs = 2 if batch.cfg else 1
    n = len(batch) // pairs
    was = state.topk.training
    state.topk.eval()
    state.noise_key = None
    total = 0.0
    try:
        with torch.no_grad():
            for lo in range(0, n, chunk):
                ids = list(range(lo, min(n, lo + chunk)))
                mb = batch.rows(ids)
                inputs = {k: (v.to(device, bdtype) if v.is_floating_point() and k != "timestep" else v.to(device)) for k, v in mb.model_inputs().items()}
                with _dora.teacher_mode(transformer):
                    state.mode, state.record_updates, state.updates = "dense", cfg.estimator == "output-gated", {}
                    t_out, t_taps = _forward(transformer, state, inputs)
                    state.record_updates = False
                state.mode, state.keep = "student", keep[ids].repeat(pairs, 1)
                s_out, s_taps = _forward(transformer, state, inputs)
                loss = cfg.distill_weight * float(_distill_loss(s_out, s_taps, t_out, t_taps))
                if mb.target is not None and cfg.flow_weight > 0:
                    loss += cfg.flow_weight * float(F.mse_loss(s_out.float(), mb.target.to(device).float()))
                total += loss * len(ids)
    finally:
        state.topk.train(was)
        state.updates = {}
    return total / n


def _distill_loss(s_out, s_taps, t_out, t_taps) -> torch.Tensor:
    terms = [F.mse_loss(_layer_norm(s_taps[b]), _layer_norm(t_taps[b])) for b in sorted(t_taps)]
    # per-token features: [B, C, H, W] outputs (SD3, PixArt, DiT) -> [B, HW, C]; [B, N, C] (Flux) as is
    so = s_out.flatten(2).transpose(1, 2) if s_out.dim() == 4 else s_out
    to = t_out.flatten(2).transpose(1, 2) if t_out.dim() == 4 else t_out
    terms.append(F.mse_loss(_layer_norm(so), _layer_norm(to)))
    return torch.stack(terms).mean()


def _importance_loss(scores: dict[int, torch.Tensor], importance: dict[int, torch.Tensor]) -> torch.Tensor:
    """``mean_l (1 - corr(s^l, imp^l))``: per-sample Pearson correlation of router scores with the teacher's
    per-token relative update norm ``||f(x_i) - x_i|| / ||x_i||`` at the same block."""
    terms = []
    for b, s in scores.items():
        imp = importance[b]
        s = s - s.mean(dim=1, keepdim=True)
        i = imp - imp.mean(dim=1, keepdim=True)
        corr = (s * i).sum(1) / (s.norm(dim=1) * i.norm(dim=1)).clamp_min(1e-8)
        terms.append(1.0 - corr.mean())
    return torch.stack(terms).mean()


def _calibrate_anchor(policy: RatioPolicy, timesteps: list[float], layers: list[int], target: float, measure: KeepMeasure | None = None) -> tuple[float, float]:
    """Shifts ``b_anchor`` so the LUT's budget measure equals ``target``; returns (raw measure, shift)."""
    measure = measure or KeepMeasure("tokens")
    t, ids = torch.tensor(timesteps), torch.tensor(layers)

    def at(shift: float) -> float:
        return float(measure(policy.keep_of(policy.logits(t, ids, noise=False, anchor_shift=shift).double().cpu())))

    with torch.no_grad():
        raw = at(0.0)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if at(mid) < target:
                lo = mid
            else:
                hi = mid
        delta = 0.5 * (lo + hi)
        policy.b_anchor.add_(delta)
    return raw, delta


# ------------------------------------------------------------------------------------------------ TOML
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
                if any(x is not None and not isinstance(x, dict) and not is_table_array(x) for x in v.values()) or not v:
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


# ------------------------------------------------------------------------------------------- checkpoint
def _save_checkpoint(path: Path, payload: dict) -> None:
    from shiva_export.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--resume found no checkpoint: {path}. Run without --resume first, or pass the --out-dir of the interrupted run.")
    try:
        # weights_only: tensors, dicts, lists and numbers only; a pickled object in the file is refused, never run.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "pickle protocol" notes on a foreign file: the error below says it
            ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ConfigError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}. Delete it and train from scratch.") from None
    if not isinstance(ck, dict) or ck.get("format") != _CKPT_FORMAT:
        raise ConfigError(f"{path} is not a shiva training checkpoint (format {ck.get('format') if isinstance(ck, dict) else None!r}). Use another --out-dir.")
    return ck


# ------------------------------------------------------------------------------------------------ train
def train(
    recipe_or_model,
    config: TrainConfig | None = None,
    progress: Callable[[dict], None] | None = None,
    weights: str | os.PathLike | None = None,
    *,
    transformer: torch.nn.Module | None = None,
    pipeline: Any = None,
) -> TrainResult:
    """Trains the routers and the ratio policy of a recipe's model by distillation from the dense model.

    Under ``torchrun --nproc_per_node N`` the same call trains data-parallel (gloo on CPU, NCCL on CUDA;
    ``shiva_export.train.distributed``): ``config.batch`` is the global batch, every rank computes its rows,
    gradients are all-reduced, and rank 0 writes checkpoints, metrics and outputs.

    Args:
        recipe_or_model (str | PathLike | Recipe): Model name (``"sd35-tiny"``), recipe path or Recipe.
        config (TrainConfig): Settings. Defaults to ``TrainConfig()``.
        progress (Callable[[dict], None]): Called after every step with ``{"event": "step", "step",
            "total", "stage", "loss", "distill", "flow", "budget", "importance", "mean_keep", "keep", "mu",
            "samples_per_s", "eta_s", "seconds"}``, and with ``{"event": "resume" | "checkpoint" | "done", ...}``
            (rank 0 only). Defaults to None.
        weights (PathLike): Local diffusers folder of the backbone weights. Defaults to None.
        transformer (nn.Module): An already-loaded transformer of the recipe's architecture (used as is,
            moved to ``config.device``; its parameters are frozen). Defaults to None (load the recipe's).
        pipeline: An already-loaded diffusers pipeline; its ``.transformer`` is trained. Defaults to None.

    Returns:
        TrainResult: Paths, LUT, phases and the step history.

    Raises:
        ConfigError: Bad settings, an unreadable checkpoint or data folder.
        RecipeError: The recipe's routed range does not fit the model.
    """
    from shiva_export.models import check_image_size, get_adapter, load_transformer, num_image_tokens
    from shiva_export.prune.api import ShivaConfig, apply_shiva_, is_shiva_applied, set_route_override
    from shiva_export.train.distributed import DistContext

    from shiva_export.models import adapter_for_architecture

    cfg = config or TrainConfig()
    rec = _resolve_recipe(recipe_or_model)
    context = adapter_for_architecture(rec.architecture).check_context(cfg.context or rec.prune.context)  # before loading the model
    cfg = replace(cfg, context=context)  # resolved: the checkpoint, training.json and the resume check record what ran
    dist = DistContext.from_env(cfg.device)
    say = (progress or (lambda ev: None)) if dist.is_main else (lambda ev: None)
    out_dir = Path(cfg.out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    t_start = time.perf_counter()
    try:
        device = dist.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: torch sees no CUDA device here. Use --device cpu.")
        if pipeline is not None and transformer is None:
            transformer = getattr(pipeline, "transformer", None)
            if transformer is None:
                raise ConfigError(f"pipeline {type(pipeline).__name__} has no .transformer to train. Pass transformer= instead.")
        if transformer is None:
            transformer = load_transformer(recipe=rec, weights=weights, dtype=cfg.dtype)
        else:
            if get_adapter(transformer).NAME != rec.architecture:
                raise ConfigError(f"the given transformer is a {type(transformer).__name__}, but recipe {rec.name!r} is for {rec.architecture!r}. Pass the matching recipe.")
            if is_shiva_applied(transformer):
                raise ConfigError("the given transformer already has Shiva applied; pass the plain diffusers transformer (remove_shiva_).")
        transformer = transformer.to(device).eval()
        bdtype = next(transformer.parameters()).dtype
        h, w, text_len = rec.shapes.height, rec.shapes.width, rec.shapes.text_len
        check_image_size(transformer, h, w)
        adapter = get_adapter(transformer)
        n_layers = adapter.num_blocks(transformer)
        n_tokens = num_image_tokens(transformer, h, w)
        routed = rec.routed_blocks(n_layers)
        for p in transformer.parameters():
            p.requires_grad_(False)
        # -- DoRA (stage 3): frozen, switched-off adapters from the start; teacher_mode is a no-op without them
        from shiva_export.train import dora as _dora

        if cfg.dora:
            _dora.add_dora(transformer, r=cfg.dora_rank, alpha=cfg.dora_alpha, seed=cfg.seed)
            _dora.set_dora_enabled(transformer, False)
        # -- end DoRA
        # context "keep": the routed blocks' attention processors are wrapped here, so the student's run_block
        # (the adapter's routed-block closure) hands them every token's keys and values, as at inference
        shiva_cfg = ShivaConfig.uniform(n_layers, 1.0 - cfg.target_keep, routed, bottleneck=rec.router.bottleneck, group_size=rec.router.group_size,
                                        context=context)
        bank = apply_shiva_(transformer, shiva_cfg, seed=rec.router.seed)
        bank.train()
        for p in bank.parameters():
            p.requires_grad_(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # reproducible policy init (nn.Linear draws from the global RNG)
            policy = RatioPolicy(n_layers, target=cfg.target_keep, logit_noise=True, logit_noise_std=cfg.logit_noise_std, min_keep=cfg.min_keep, max_logit=cfg.max_logit)
        policy.to(device)
        measure = KeepMeasure.for_model(cfg.budget_measure, transformer, n_tokens, text_len, routed, rec.router.bottleneck, context=context)
        budget = EMABudget(cfg.target_keep, beta=cfg.ema_beta, lam=cfg.lambda_budget, sync=False).to(device)
        topk = DifferentiableTopK(tau_rank=cfg.tau_rank[0], tau_sel=cfg.tau_sel[0], noise_std=cfg.score_noise_std)
        topk.train()
        temps = TemperatureSchedule(
            total_steps=cfg.total_steps, tau_rank_start=cfg.tau_rank[0], tau_rank_end=cfg.tau_rank[1], tau_sel_start=cfg.tau_sel[0], tau_sel_end=cfg.tau_sel[1]
        )
        taps = {b for b in range(n_layers - 1) if (b + 1) % cfg.tap_every == 0}
        state = _RouteState(routed, topk, taps, estimator=cfg.estimator)
        state.checkpointing = bool(cfg.gradient_checkpointing)
        state.cfg = bool(cfg.cfg_pairs)
        set_route_override(transformer, _make_override(state))
        blocks = adapter.blocks(transformer)
        hooks = [blocks[b].register_forward_hook(_tap_hook(state, b, adapter)) for b in taps if b not in routed]

        data = make_data(cfg.data, transformer, h, w, text_len, seed=cfg.seed)
        stopper = held = None
        if cfg.eval_every is not None:  # before any draw: with cached latents the held-out samples leave the training pool
            from shiva_export.train.heldout import EarlyStopping, heldout_batch

            held = heldout_batch(cfg, data, transformer, h, w, text_len)
            stopper = EarlyStopping(cfg.patience, cfg.eval_min_delta)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        my_rows = dist.rows(cfg.batch)
        if len(my_rows) % cfg.accumulate:
            raise ConfigError(
                f"--batch {cfg.batch} over {dist.world} process(es) gives {len(my_rows)} samples each, which do not split into "
                f"--accumulate {cfg.accumulate} micro-batches. Pass a batch that is a multiple of processes x accumulate."
            )
        micro = len(my_rows) // cfg.accumulate
        trainable = [*bank.parameters(), *policy.parameters()]
        opt = torch.optim.AdamW(
            [
                {"params": list(bank.parameters()), "lr": cfg.lr_router, "base_lr": cfg.lr_router, "name": "router"},
                {"params": list(policy.parameters()), "lr": cfg.lr_policy, "base_lr": cfg.lr_policy, "name": "policy"},
            ],
            weight_decay=cfg.weight_decay,
        )
        if cfg.dora:  # -- DoRA: own param group (frozen, so skipped by AdamW, until stage 3)
            opt.add_param_group({"params": _dora.dora_parameters(transformer), "lr": cfg.lr_dora, "base_lr": cfg.lr_dora, "name": "dora"})
            trainable += list(_dora.dora_parameters(transformer))
        step, history = 0, []
        if cfg.resume:
            ck = _load_checkpoint(ckpt_path)
            _check_compatible(ck, rec, cfg, ckpt_path)
            _dora.load_checkpoint_state(transformer, ck, cfg.dora, ckpt_path)  # -- DoRA: adapters (refuses a --dora mismatch)
            bank.load_state_dict(ck["routers"])
            policy.load_state_dict(ck["policy"])
            budget.load_state_dict(ck["budget"])
            opt.load_state_dict(ck["optimizer"])
            lrs = {"router": cfg.lr_router, "policy": cfg.lr_policy, "dora": cfg.lr_dora}
            for g in opt.param_groups:  # this run's learning rates, not the checkpoint's (load_state_dict restores those)
                g["base_lr"] = lrs[g["name"]]
            data.load_state_dict(ck["data"])
            gen.set_state(ck["generator"])
            step, history = int(ck["step"]), list(ck.get("history", []))
            if stopper is not None and "heldout" in ck:
                stopper.load_state_dict(ck["heldout"])
            logger.info("resumed from %s at step %d", ckpt_path, step)
            say({"event": "resume", "step": step, "total": cfg.total_steps, "checkpoint": str(ckpt_path), "world": dist.world})

        def checkpoint() -> None:
            if dist.is_main:
                _save_checkpoint(
                    ckpt_path,
                    {
                        "format": _CKPT_FORMAT,
                        "model": rec.name,
                        "config": cfg.to_dict(),
                        "step": step,
                        "routers": bank.state_dict(),
                        "policy": policy.state_dict(),
                        "budget": budget.state_dict(),
                        "optimizer": opt.state_dict(),
                        "data": data.state_dict(),
                        "generator": gen.get_state(),
                        "history": history,
                        **({"dora": _dora.adapter_state_dict(transformer)} if cfg.dora else {}),  # -- DoRA
                        **({"heldout": stopper.state_dict()} if stopper is not None else {}),
                    },
                )
                say({"event": "checkpoint", "step": step, "path": str(ckpt_path)})
            dist.barrier()

        def snapshot() -> dict:
            """The trainable state (copied by the stopper when it is a stage's best)."""
            snap = {"routers": bank.state_dict(), "policy": policy.state_dict(), "budget": budget.state_dict(), "optimizer": opt.state_dict()}
            return {**snap, "dora": _dora.adapter_state_dict(transformer)} if cfg.dora else snap  # -- DoRA

        def restore(snap: dict) -> None:
            bank.load_state_dict(snap["routers"])
            policy.load_state_dict(snap["policy"])
            budget.load_state_dict(snap["budget"])
            opt.load_state_dict(snap["optimizer"])
            if cfg.dora:  # -- DoRA
                _dora.load_adapter_state_dict(transformer, snap["dora"])

        def heldout_loss(stage: int) -> float:
            batch, ratios, _ = held
            with torch.no_grad():
                keep = ratios[:, None].expand(len(ratios), len(routed)) if stage == 0 else policy(batch.timestep[: len(ratios)].to(device), layer_ids, noise=False)
            return _heldout_loss(transformer, state, batch, keep.to(device), cfg, device, bdtype, max(1, micro))

        metrics = _Metrics(out_dir / METRICS_NAME if dist.is_main else None, append=cfg.resume)
        sampler_t = torch.tensor(adapter.sampler_timesteps(transformer.config, cfg.sampler_steps, n_tokens, cfg.sampler_shift) if cfg.timesteps is None else list(cfg.timesteps))
        layer_ids = torch.tensor(routed, device=device)
        stop = cfg.total_steps if cfg.stop_at_step is None else min(cfg.total_steps, cfg.stop_at_step)
        run_t0, step0 = time.perf_counter(), step
        pairs = 2 if cfg.cfg_pairs else 1
        while step < stop:
            stage, s_in, s_len = cfg.stage_of(step)
            if cfg.dora:  # -- DoRA: adapters on and learning in the joint stage only (identity before it)
                _dora.set_dora_enabled(transformer, stage == 2)
                _dora.set_dora_trainable(transformer, stage == 2)
            if stopper is not None and stopper.stage != stage:  # a stage begins: its entry state is the first candidate
                stopper.start(stage)
                stopper.observe(step, heldout_loss(stage), snapshot)
            warm = max(1, int(round(cfg.lr_warmup_frac * s_len)))
            f = min(1.0, (s_in + 1) / warm)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            temps.apply(topk, step)
            # -- global draws (identical on every rank): timesteps, keep ratios, data
            t_all = stratified_timesteps(cfg.batch, generator=gen)
            t_dev = t_all.to(device)
            uniform = stage == 0 or (stage == 2 and cfg.stage3_keep is not None)  # keeps not from the policy
            if stage == 0:
                groups = min(cfg.ratio_groups, cfg.batch)
                r = stratified_ratios(cfg.batch, groups, cfg.ratio_range[0], cfg.ratio_range[1], generator=gen)
                fixed = r[:, None].expand(cfg.batch, len(routed)).to(device)
                noise = None
            elif uniform:  # --stage3-keep: the student at one keep everywhere; the policy is frozen
                fixed = torch.full((cfg.batch, len(routed)), float(cfg.stage3_keep), device=device)
                noise = None
            else:
                policy.train()
                noise = (torch.randn((cfg.batch, len(routed)), generator=gen) * cfg.logit_noise_std).to(device) if stage == 1 else None

            def keep_rows(idx: list[int]) -> torch.Tensor:
                """Keep ratios [len(idx), L] of global samples ``idx`` (a fresh graph per use: micro-batches backward separately)."""
                if uniform:
                    return fixed[idx]
                z = policy.logits(t_dev[idx], layer_ids, noise=False)
                return policy.keep_of(z if noise is None else z + noise[idx])

            with torch.no_grad():
                keep_all = keep_rows(list(range(cfg.batch)))  # [B, L], for the log
            batch = _draw(data, cfg, t_all, my_rows)
            opt.zero_grad(set_to_none=True)
            sums = {"distill": 0.0, "flow": 0.0, "importance": 0.0, "dense": 0.0}
            has = {"flow": False, "importance": False, "dense": stage == 2 and cfg.dense_weight > 0}
            state.noise_key = (cfg.seed, step)
            for m in range(cfg.accumulate):
                lo, hi = m * micro, (m + 1) * micro
                mb = batch.rows(list(range(lo, hi)))
                inputs = {k: (v.to(device, bdtype) if v.is_floating_point() and k != "timestep" else v.to(device)) for k, v in mb.model_inputs().items()}
                keep = keep_rows([my_rows[i] for i in range(lo, hi)])
                state.samples = torch.tensor([my_rows[i] for i in range(lo, hi)] * pairs)
                with torch.no_grad(), _dora.teacher_mode(transformer):  # DoRA: the teacher is the frozen base
                    state.mode, state.record_importance, state.importance = "dense", cfg.importance_weight > 0, {}
                    state.record_updates, state.updates = cfg.estimator == "output-gated", {}
                    t_out, t_taps = _forward(transformer, state, inputs)
                    state.record_importance = state.record_updates = False
                state.mode, state.generator = "student", gen
                state.keep = keep.repeat(pairs, 1)
                s_out, s_taps = _forward(transformer, state, inputs)
                distill = _distill_loss(s_out, s_taps, t_out, t_taps)
                loss = cfg.distill_weight * distill
                sums["distill"] += float(distill.detach()) * (hi - lo)
                if mb.target is not None and cfg.flow_weight > 0:
                    flow = F.mse_loss(s_out.float(), mb.target.to(device).float())
                    loss = loss + cfg.flow_weight * flow
                    sums["flow"] += float(flow.detach()) * (hi - lo)
                    has["flow"] = True
                if has["dense"]:  # the adapted model run dense stays the frozen dense teacher
                    state.mode = "dense"
                    d_out, d_taps = _forward(transformer, state, inputs)
                    dense_term = _distill_loss(d_out, d_taps, t_out, t_taps)
                    loss = loss + cfg.dense_weight * dense_term
                    sums["dense"] += float(dense_term.detach()) * (hi - lo)
                if cfg.importance_weight > 0:
                    imp = _importance_loss(state.scores, state.importance)
                    loss = loss + cfg.importance_weight * imp
                    sums["importance"] += float(imp.detach()) * (hi - lo)
                    has["importance"] = True
                (loss * ((hi - lo) / cfg.batch)).backward()
                state.updates, state.importance = {}, {}
            b_loss, b_measure = None, None
            if stage > 0 and not uniform:  # once per optimizer step, identical on every rank
                table = policy(sampler_t.to(device), layer_ids, noise=False) if cfg.budget_timesteps == "sampler" else keep_rows(list(range(cfg.batch)))
                b_measure = measure(table)
                if cfg.budget == "ema":
                    b_loss = budget(b_measure.reshape(1))
                    (b_loss / dist.world).backward()
                else:
                    budget.update(b_measure.detach())  # mu: logged only
            dist.all_reduce_grads_(trainable)
            opt.step()
            projected = None
            if stage > 0 and not uniform and cfg.budget == "project":
                # hard budget: after every policy update, shift b_anchor so the policy's measure over the deployment
                # sampler's timesteps is the target again (identical on every rank); the policy the next step uses,
                # and the one written at the end, is on budget
                with torch.no_grad():
                    projected = _calibrate_anchor(policy, sampler_t.tolist(), routed, cfg.target_keep, measure)[1]
            step += 1
            h_loss, stop_stage = None, False
            if stopper is not None and ((s_in + 1) % cfg.eval_every == 0 or s_in + 1 == s_len):
                h_loss = heldout_loss(stage)
                stop_stage = stopper.observe(step, h_loss, snapshot)
            tot = dist.all_reduce_sum([sums["distill"], sums["flow"], sums["importance"], sums["dense"]])
            distill_v, flow_v, imp_v, dense_v = (v / cfg.batch for v in tot)
            loss_v = cfg.distill_weight * distill_v + (cfg.flow_weight * flow_v if has["flow"] else 0.0) + (cfg.importance_weight * imp_v if has["importance"] else 0.0)
            loss_v += cfg.dense_weight * dense_v if has["dense"] else 0.0
            if b_loss is not None:
                loss_v += float(b_loss.detach())
            elapsed = time.perf_counter() - run_t0
            rate = (step - step0) * cfg.batch / max(elapsed, 1e-9)
            rec_step = {
                "event": "step",
                "step": step,
                "total": cfg.total_steps,
                "stage": STAGES[stage],
                "loss": loss_v,
                "distill": distill_v,
                "flow": flow_v if has["flow"] else None,
                "budget": None if b_loss is None else float(b_loss.detach()),
                "importance": imp_v if has["importance"] else None,
                "dense": dense_v if has["dense"] else None,
                "mean_keep": float(keep_all.detach().mean()),
                "budget_keep": None if b_measure is None else float(b_measure.detach()),
                "budget_shift": projected,
                "keep": [round(float(v), 4) for v in keep_all.detach().float().mean(0).tolist()],
                "mu": float(budget.mu),
                "tau_rank": topk.tau_rank,
                "tau_sel": topk.tau_sel,
                "samples_per_s": round(rate, 3),
                "eta_s": round((stop - step) * cfg.batch / max(rate, 1e-9), 1),
                "seconds": round(elapsed, 3),
                **({"heldout": h_loss} if h_loss is not None else {}),
            }
            history.append(rec_step)
            metrics.write(rec_step)
            say(rec_step)
            if stopper is not None and (stop_stage or s_in + 1 == s_len):
                # the stage ends (early or at its budget): continue from, and write, its best state
                if stopper.snapshot is not None:  # None only when every evaluation of the stage was non-finite
                    restore(stopper.snapshot)
                if s_in + 1 < s_len:
                    stopper.stops[stage] = step
                    step += s_len - (s_in + 1)  # the global counter jumps to the next stage (its temperatures, lr warm-up)
                say({"event": "stage-end", "stage": STAGES[stage], "step": step, **stopper.summary(stage)})
                checkpoint()
            elif step % cfg.checkpoint_every == 0 or step == stop:
                checkpoint()
        for hk in hooks:
            hk.remove()

        result = TrainResult(out_dir=out_dir, finished=step >= cfg.total_steps, step=step, seconds=0.0, target_keep=cfg.target_keep, checkpoint_path=ckpt_path, history=history,
                             context=context)
        result.stages_run = [sum(1 for r in history if r["stage"] == name) for name in STAGES]
        if stopper is not None:
            result.heldout = {"source": held[2], "samples": cfg.eval_samples, "eval_every": cfg.eval_every, "patience": cfg.patience,
                              "min_delta": cfg.eval_min_delta, "stages": {STAGES[i]: stopper.summary(i) for i in range(len(STAGES))}}
        if result.finished and cfg.dora and dist.is_main:  # -- DoRA: merge in fp32, save out_dir/transformer, bind the recipe to it
            from shiva_export.models import InputSpec
            from shiva_export.prune.api import remove_shiva_

            remove_shiva_(transformer)
            result.dora = _dora.merge_and_save(transformer, out_dir, check_inputs=InputSpec(1, h, w, text_len, False)).to_dict()
            say({"event": "dora-merged", **result.dora})
        if result.finished:
            if dist.is_main:
                _write_outputs(result, rec, cfg, bank, policy, routed, n_tokens, n_layers, transformer, measure, context=context)
                say({"event": "done", "step": step, "recipe": str(result.recipe_path), "mean_keep": result.mean_keep})
            dist.barrier()
        result.seconds = time.perf_counter() - t_start
        return result
    finally:
        if cfg.num_threads:
            torch.set_num_threads(old_threads)
        dist.close()


def _draw(data, cfg: TrainConfig, t_all: torch.Tensor, my_rows: range):
    """This rank's rows of the global batch (all random numbers drawn for the global batch)."""
    batch = data.batch(cfg.batch, timesteps=t_all, caption_dropout=cfg.caption_dropout, cfg_pairs=cfg.cfg_pairs)
    return batch.rows(list(my_rows))


class _Metrics:
    """Rank 0's ``metrics.jsonl``: one JSON object per optimizer step (appended on resume)."""

    def __init__(self, path: Path | None, append: bool):
        self.path = path
        if path is not None:
            from shiva_export.utils.io import check_regular_target

            check_regular_target(path, "metrics file")  # appended to with open(): never a FIFO or device
        if path is not None and not append:
            path.write_text("")

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        import json

        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "event"}, sort_keys=True) + "\n")


def _tap_hook(state: _RouteState, b: int, adapter):
    def hook(module, args, output):
        if state.mode in ("dense", "student", "hard", "l2"):
            state.taps[b] = adapter.block_image_output(output)

    return hook


def _check_compatible(ck: dict, rec, cfg: TrainConfig, path: Path) -> None:
    old = ck.get("config", {})
    if ck.get("model") != rec.name:
        raise ConfigError(f"checkpoint {path} was trained for model {ck.get('model')!r}, not {rec.name!r}. Use another --out-dir.")
    keys = ("target_keep", "batch", "seed", "tap_every", "estimator", "min_keep", "max_logit", "cfg_pairs", "caption_dropout", "budget", "budget_timesteps", "budget_measure", "eval_every", "context")
    before = {"context": "drop"}  # settings added later: what checkpoints written before them ran with
    for key in keys + (("eval_samples",) if cfg.eval_every is not None else ()):  # the held-out split changes the training pool
        was = old.get(key, before.get(key))
        if was != getattr(cfg, key):
            raise ConfigError(
                f"checkpoint {path} has {key} = {was!r}, this run {getattr(cfg, key)!r}; expected the same value. "
                "Resume with the original settings or use another --out-dir."
            )
    if int(ck["step"]) > cfg.total_steps:
        raise ConfigError(f"checkpoint {path} is at step {ck['step']}, beyond this run's {cfg.total_steps} total steps. Pass more --steps.")


def _write_outputs(result: TrainResult, rec, cfg: TrainConfig, bank, policy: RatioPolicy, routed: list[int], n_tokens: int, n_layers: int, transformer, measure=None,
                   context: str = "drop") -> None:
    from shiva_export.models import get_adapter
    from shiva_export.prune.router import save_routers
    from shiva_export.recipe import load_recipe
    from shiva_export.utils.io import atomic_write_json, atomic_write_text

    out_dir = result.out_dir
    if cfg.timesteps is not None:
        timesteps = [float(t) for t in cfg.timesteps]
    else:  # the architecture's own pipeline sampler (SD3: flow-matching Euler with cfg.sampler_shift)
        timesteps = get_adapter(transformer).sampler_timesteps(transformer.config, cfg.sampler_steps, n_tokens, cfg.sampler_shift)
    if len(timesteps) < cfg.phases:
        raise ConfigError(f"sampler has {len(timesteps)} timesteps; expected at least phases = {cfg.phases}. Pass more timesteps or fewer --phases.")
    policy.eval()
    measure = measure or KeepMeasure("tokens")
    raw_mean = float(policy.lut(timesteps, routed).double().mean())
    raw_measure = float(measure(policy.lut(timesteps, routed).double()))
    shift = 0.0
    if cfg.calibrate_budget:
        raw_measure, shift = _calibrate_anchor(policy, timesteps, routed, cfg.target_keep, measure)
        if abs(shift) > cfg.max_calibration_shift:
            logger.warning(
                "budget calibration moved the policy logit by %+.3f (limit %.2f): the written schedule differs from the trained one. "
                "Train longer or with budget_timesteps='sampler'.", shift, cfg.max_calibration_shift,
            )
    lut = policy.lut(timesteps, routed)  # [steps, L]
    phases = quantize_lut(lut, n_tokens, cfg.phases, layers=routed)
    names = phase_names(cfg.phases)

    router_path = out_dir / "router.safetensors"
    sha = save_routers(
        bank,
        router_path,
        extra={"model": rec.name, "target_keep": cfg.target_keep, "steps": sum(result.stages_run) if result.heldout else result.step,
               "stages": result.stages_run if result.heldout else [cfg.warmup_steps, cfg.policy_steps, cfg.joint_steps], "seed": cfg.seed,
               **({"context": context} if context != "drop" else {})},  # drop: metadata (and so the sha) as before the option
    )
    phase_rows = []
    for name, ph in zip(names, phases):
        per_block = ph.to_keep_ratios(n_layers)
        phase_rows.append(
            {
                "name": name,
                "t_start": phase_bounds(timesteps, ph.start, ph.stop)[0],
                "t_stop": phase_bounds(timesteps, ph.start, ph.stop)[1],
                "keep_ratios": [float(per_block[b]) for b in routed],
                "k": [int(k) for k in ph.k],
            }
        )
    lut_rows = [[round(float(v), 6) for v in row] for row in lut.tolist()]
    q_mean = sum(sum(p.k) * (p.stop - p.start) for p in phases) / (n_tokens * len(timesteps) * len(routed))
    atomic_write_json(
        out_dir / "lut.json",
        {
            "model": rec.name,
            "target_keep": cfg.target_keep,
            "timesteps": timesteps,
            "layers": routed,
            "keep": lut_rows,
            "raw_mean_keep": raw_mean,
            "budget_measure": measure.mode,
            "context": context,
            "raw_budget_keep": raw_measure,
            "calibration_shift": shift,
            "min_keep": cfg.min_keep,
            "estimator": cfg.estimator,
            "mean_keep": float(lut.double().mean()),
            "quantized_mean_keep": q_mean,
            "num_image_tokens": n_tokens,
            "phases": [dict(p.to_dict(), name=n) for n, p in zip(names, phases)],
        },
    )
    content = rec.content_dict()
    content["description"] = (content.get("description") or rec.name) + f" + learned Shiva router/schedule (target keep {cfg.target_keep:g})"
    content["router"] = dict(content["router"], weights=router_path.name, sha256=sha)
    prune = {k: v for k, v in content["prune"].items() if k != "context"}
    content["prune"] = prune if context == "drop" else dict(prune, context=context)  # the routing the router was trained with
    content["schedule"] = {"target_keep": cfg.target_keep, "timesteps": timesteps, "lut": lut_rows, "phases": phase_rows}
    if rec.model.source == "local" and rec.model.path and rec.source_path is not None and not Path(rec.model.path).is_absolute():
        # the written recipe lives in out_dir: keep the base recipe's local weights folder reachable from there
        base, out = (rec.source_path.parent / rec.model.path).resolve(), out_dir.resolve()
        near = os.path.commonpath([base, out]) != os.path.abspath(os.sep)
        content["model"] = dict(content["model"], path=os.path.relpath(base, out) if near else str(base))
    if result.dora is not None:  # -- DoRA: router and schedule bound to the merged weights (path + sha256), never the base
        content["model"] = {"source": "local", "path": Path(result.dora["path"]).name, "sha256": result.dora["sha256"]}
        content["description"] += f" + DoRA r={cfg.dora_rank} merged into {Path(result.dora['path']).name}/"
    budgets = f"{cfg.warmup_steps}/{cfg.policy_steps}/{cfg.joint_steps}"
    if result.heldout:
        run = "/".join(str(n) for n in result.stages_run)
        steps_text = (f"{sum(result.stages_run)} steps (stages {run} of budgets {budgets}: held-out stopping every {cfg.eval_every} steps, "
                      f"patience {cfg.patience}, best state of each stage kept; curve in training.json)")
        atomic_write_json(out_dir / "training.json", {"model": rec.name, "config": cfg.to_dict(), "stages_run": result.stages_run, "heldout": result.heldout,
                                                      "sampler_steps": len(timesteps), "phases": [
                                                          {"name": r["name"], "keep_ratios": r["keep_ratios"]} for r in phase_rows]})
    else:
        steps_text = f"{result.step} steps (stages {budgets})"
    header = (
        f"# Written by `shiva-export train` from {rec.source_path or rec.name}: {steps_text}, seed {cfg.seed}, "
        f"{'cached latents' if cfg.data else 'synthetic inputs'}.\n"
    )
    recipe_path = out_dir / "recipe.toml"
    atomic_write_text(recipe_path, header + dumps_toml(content))
    try:
        check = load_recipe(recipe_path)
    except RecipeError as err:
        raise RecipeError(f"written recipe failed validation: {err}") from None
    check.phase_keep_ratios(0, n_layers)  # model-aware check of the phase widths
    result.router_path, result.router_sha256, result.recipe_path, result.lut_path = router_path, sha, recipe_path, out_dir / "lut.json"
    result.timesteps, result.layers, result.lut = timesteps, list(routed), lut_rows
    result.mean_keep, result.raw_mean_keep, result.quantized_mean_keep = float(lut.double().mean()), raw_mean, q_mean
    result.calibration_shift = shift
    result.phases = phase_rows


# --------------------------------------------------------------------------------------------- evaluate
@dataclass
class RouterEvaluation:
    """Relative output error ``||y - y_dense|| / ||y_dense||`` (mean over held-out seeds) per router.

    Attributes:
        keep (float): Uniform keep ratio of every routed block.
        errors (dict[str, float]): ``trained``, ``random`` (untrained, recipe seed) and ``l2`` (score ``||x_i||``).
        per_seed (dict[str, list[float]]): The same per held-out seed.
        seeds (list[int]): Held-out input seeds.
        lut_mean_keep (float | None): Mean of the recipe's learned LUT (None without a schedule).
        target_keep (float | None): The schedule's target.
    """

    keep: float
    errors: dict[str, float]
    per_seed: dict[str, list[float]]
    seeds: list[int]
    lut_mean_keep: float | None = None
    target_keep: float | None = None

    @property
    def ratio_vs_random(self) -> float:
        return self.errors["trained"] / self.errors["random"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio_vs_random"] = self.ratio_vs_random
        return d


def evaluate_router(
    recipe_or_model,
    router: str | os.PathLike | Any | None = None,
    keep: float = 0.6,
    seeds: Sequence[int] = tuple(range(1000, 1008)),
    weights: str | os.PathLike | None = None,
) -> RouterEvaluation:
    """Compares trained, untrained and L2-norm routing against the dense model on held-out seeds.

    Args:
        recipe_or_model (str | PathLike | Recipe): Recipe (e.g. the trained ``recipe.toml``) or model name.
        router (PathLike | RouterBank | None): Trained router weights. Defaults to the recipe's ``[router] weights``.
        keep (float): Keep ratio of every routed block. Defaults to 0.6.
        seeds (Sequence[int]): Held-out input seeds (one sample each, random timestep). Defaults to 1000..1007.
        weights (PathLike): Local diffusers folder of the backbone. Defaults to None.

    Raises:
        RouterError: No trained router is given and the recipe has none.
    """
    from shiva_export.errors import RouterError
    from shiva_export.models import InputSpec, load_transformer, make_inputs, num_blocks, router_dims
    from shiva_export.prune.api import ShivaConfig, apply_shiva_, remove_shiva_, set_route_override
    from shiva_export.prune.router import RouterBank, load_routers

    rec = _resolve_recipe(recipe_or_model)
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
        raise ConfigError(f"keep is {keep!r}; expected 0 < keep <= 1 (fraction of image tokens kept).")
    transformer = load_transformer(recipe=rec, weights=weights, dtype="fp32")
    n_layers = num_blocks(transformer)
    routed = rec.routed_blocks(n_layers)
    scfg = ShivaConfig.uniform(n_layers, 1.0 - keep, routed, bottleneck=rec.router.bottleneck, group_size=rec.router.group_size,
                               context=rec.prune.context)  # the routing the recipe deploys
    rc = scfg.router_config(*router_dims(transformer))
    if isinstance(router, RouterBank):
        trained = router
    else:
        path = Path(router) if router is not None else rec.router_weights_path()
        if path is None:
            raise RouterError(f"{rec.name}: no trained router to evaluate; the recipe has no [router] weights. Pass router=PATH.")
        trained, _ = load_routers(path, rc)
    spec = InputSpec(batch=1, height=rec.shapes.height, width=rec.shapes.width, text_len=rec.shapes.text_len, cfg=False)
    cases = [make_inputs(transformer, spec, seed=s) for s in seeds]
    with torch.no_grad():
        dense = [transformer(**x).sample for x in cases]

        def run(bank, mode: str) -> list[float]:
            apply_shiva_(transformer, scfg, routers=bank, seed=rec.router.seed)
            try:
                if mode == "l2":
                    st = _RouteState(routed, DifferentiableTopK(), set())
                    st.mode, st.keep = "l2", keep
                    set_route_override(transformer, _make_override(st))
                errs = []
                for x, ref in zip(cases, dense):
                    y = transformer(**x).sample
                    errs.append(float((y - ref).norm() / ref.norm()))
                return errs
            finally:
                remove_shiva_(transformer)

        per = {"trained": run(trained.eval(), "hard"), "random": run(None, "hard"), "l2": run(None, "l2")}
    errors = {k: sum(v) / len(v) for k, v in per.items()}
    lut_mean = None
    if rec.schedule is not None and rec.schedule.lut:
        flat = [v for row in rec.schedule.lut for v in row]
        lut_mean = sum(flat) / len(flat)
    return RouterEvaluation(
        keep=float(keep),
        errors=errors,
        per_seed=per,
        seeds=list(seeds),
        lut_mean_keep=lut_mean,
        target_keep=rec.schedule.target_keep if rec.schedule is not None else None,
    )
