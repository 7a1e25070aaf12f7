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
denoising loss when real latents are given (the adapter's objective: flow matching ``||v_s - (eps - x0)||^2``
for SD3/Flux, DDPM noise ``||eps_s - eps||^2`` for PixArt/DiT; logged as ``flow``), plus the EMA budget loss.

Curriculum (three stages, global step counter across them):

1. **Router warm-up**: the policy is bypassed; keep ratios come from stratified ratio sampling
   (:func:`~shiva_export.train.policy.stratified_ratios`); only the routers learn.
2. **Policy learning**: keep ratios ``policy(t, l)`` with logit noise ``N(0, 1)``; EMA budget loss.
3. **Joint tuning**: noise off; routers and policy together under the budget.

Timesteps are drawn stratified (Eq. 15). Samples whose keep ratio differs run through a routed block
as separate calls (``k`` is static per call); samples sharing a ratio run together.

Outputs in ``out_dir`` (:mod:`~shiva_export.train.outputs`): ``router.safetensors``, ``lut.json`` (the policy
on the sampler's timesteps), ``recipe.toml`` (the base recipe plus ``[router] weights/sha256`` and
``[schedule]`` with the LUT quantised into 1-4 static phases), and ``checkpoint.pt``
(:mod:`~shiva_export.train.checkpoint`, atomic, resumable). With DoRA also ``transformer/`` (the merged backbone), and the
recipe's ``[model]`` becomes ``source = "local"``, ``path = "transformer"`` with its ``sha256``.

Budget calibration (a choice, on by default): the EMA budget meets the target on average over the
*training* timestep distribution (uniform in ``[0, 1000)``), but a shifted flow-matching sampler spends
more steps at high ``t``. After training, ``b_anchor`` is shifted so the LUT's mean over the sampler's
timesteps equals the target exactly; the uncalibrated mean is reported as ``raw_mean_keep``.

Module map: :mod:`~shiva_export.train.config` (settings), :mod:`~shiva_export.train.student` (the route override,
the losses), :mod:`~shiva_export.train.checkpoint`, :mod:`~shiva_export.train.outputs`; this module is the loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shiva_export.errors import ConfigError
from shiva_export.logging import get_logger
from shiva_export.models import (
    InputSpec,
    adapter_for_architecture,
    check_image_size,
    get_adapter,
    load_transformer,
    num_image_tokens,
)
from shiva_export.prune.api import ShivaConfig, apply_shiva_, is_shiva_applied, remove_shiva_, set_route_override
from shiva_export.train import dora as _dora
from shiva_export.train.cached import make_data
from shiva_export.train.checkpoint import CHECKPOINT_NAME, Trainables, checkpoint_payload, resume_from, save_checkpoint
from shiva_export.train.config import STAGES, TrainConfig, resolve_recipe
from shiva_export.train.distributed import DistContext
from shiva_export.train.heldout import EarlyStopping, heldout_batch
from shiva_export.train.outputs import METRICS_NAME, Metrics, TrainResult, write_outputs
from shiva_export.train.policy import (
    EMABudget,
    KeepMeasure,
    RatioPolicy,
    calibrate_anchor,
    stratified_ratios,
    stratified_timesteps,
)
from shiva_export.train.ste import DifferentiableTopK, TemperatureSchedule
from shiva_export.train.student import (
    RouteState,
    distill_loss,
    forward_with_taps,
    heldout_loss,
    importance_loss,
    make_override,
    tap_hook,
)

__all__ = ["train"]

logger = get_logger(__name__)


class _Run:
    """The state of one training run, filled in by the setup steps of :func:`train` and advanced by the loop."""

    def __init__(self, rec, cfg: TrainConfig, dist, progress: Callable[[dict], None] | None):
        self.rec, self.cfg, self.dist = rec, cfg, dist
        self.say = (progress or (lambda ev: None)) if dist.is_main else (lambda ev: None)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.step, self.history = 0, []
        self.stopper = self.held = None

    def inputs_of(self, mb) -> dict[str, torch.Tensor]:
        """A (micro-)batch's forward arguments on the run's device, floats in the backbone dtype (not the timestep)."""
        return {
            k: (v.to(self.device, self.bdtype) if v.is_floating_point() and k != "timestep" else v.to(self.device))
            for k, v in mb.model_inputs().items()
        }


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
    cfg = config or TrainConfig()
    rec = resolve_recipe(recipe_or_model)
    context = adapter_for_architecture(rec.architecture).check_context(
        cfg.context or rec.prune.context
    )  # before loading the model
    cfg = replace(cfg, context=context)  # resolved: the checkpoint, training.json and the resume check record what ran
    run = _Run(rec, cfg, DistContext.from_env(cfg.device), progress)
    if run.dist.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    t_start = time.perf_counter()
    try:
        _load_backbone(run, weights, transformer, pipeline)
        _attach_student(run)
        _open_data(run)
        _make_optimizer(run)
        if cfg.resume:
            _resume(run)
        _train_steps(run)
        result = _finish(run)
        result.seconds = time.perf_counter() - t_start
        return result
    finally:
        if cfg.num_threads:
            torch.set_num_threads(old_threads)
        run.dist.close()


# ------------------------------------------------------------------------------------------------ setup
def _load_backbone(run: _Run, weights, transformer, pipeline) -> None:
    """The frozen backbone on the run's device (given, from a pipeline, or the recipe's), its geometry, and
    the switched-off DoRA adapters (``--dora``)."""
    cfg, rec = run.cfg, run.rec
    run.device = device = run.dist.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: torch sees no CUDA device here. Use --device cpu.")
    if pipeline is not None and transformer is None:
        transformer = getattr(pipeline, "transformer", None)
        if transformer is None:
            raise ConfigError(
                f"pipeline {type(pipeline).__name__} has no .transformer to train. Pass transformer= instead."
            )
    if transformer is None:
        transformer = load_transformer(recipe=rec, weights=weights, dtype=cfg.dtype)
    else:
        if get_adapter(transformer).NAME != rec.architecture:
            raise ConfigError(
                f"the given transformer is a {type(transformer).__name__}, but recipe {rec.name!r} is for {rec.architecture!r}. Pass the matching recipe."
            )
        if is_shiva_applied(transformer):
            raise ConfigError(
                "the given transformer already has Shiva applied; pass the plain diffusers transformer (remove_shiva_)."
            )
    run.transformer = transformer = transformer.to(device).eval()
    run.bdtype = next(transformer.parameters()).dtype
    run.h, run.w, run.text_len = rec.shapes.height, rec.shapes.width, rec.shapes.text_len
    check_image_size(transformer, run.h, run.w)
    run.adapter = get_adapter(transformer)
    run.n_layers = run.adapter.num_blocks(transformer)
    run.n_tokens = num_image_tokens(transformer, run.h, run.w)
    run.routed = rec.routed_blocks(run.n_layers)
    for p in transformer.parameters():
        p.requires_grad_(False)
    if (
        cfg.dora
    ):  # -- DoRA (stage 3): frozen, switched-off adapters from the start; teacher_mode is a no-op without them
        _dora.add_dora(transformer, r=cfg.dora_rank, alpha=cfg.dora_alpha, seed=cfg.seed)
        _dora.set_dora_enabled(transformer, False)


def _attach_student(run: _Run) -> None:
    """Routers (trainable), the ratio policy, the budget, the differentiable top-k and the route override."""
    cfg, rec, transformer = run.cfg, run.rec, run.transformer
    # context "keep": the routed blocks' attention processors are wrapped here, so the student's run_block
    # (the adapter's routed-block closure) hands them every token's keys and values, as at inference
    shiva_cfg = ShivaConfig.uniform(
        run.n_layers,
        1.0 - cfg.target_keep,
        run.routed,
        bottleneck=rec.router.bottleneck,
        group_size=rec.router.group_size,
        context=cfg.context,
    )
    run.bank = apply_shiva_(transformer, shiva_cfg, seed=rec.router.seed)
    run.bank.train()
    for p in run.bank.parameters():
        p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # reproducible policy init (nn.Linear draws from the global RNG)
        run.policy = RatioPolicy(
            run.n_layers,
            target=cfg.target_keep,
            logit_noise=True,
            logit_noise_std=cfg.logit_noise_std,
            min_keep=cfg.min_keep,
            max_logit=cfg.max_logit,
        )
    run.policy.to(run.device)
    run.measure = KeepMeasure.for_model(
        cfg.budget_measure,
        transformer,
        run.n_tokens,
        run.text_len,
        run.routed,
        rec.router.bottleneck,
        context=cfg.context,
    )
    run.budget = EMABudget(cfg.target_keep, beta=cfg.ema_beta, lam=cfg.lambda_budget, sync=False).to(run.device)
    run.topk = DifferentiableTopK(tau_rank=cfg.tau_rank[0], tau_sel=cfg.tau_sel[0], noise_std=cfg.score_noise_std)
    run.topk.train()
    run.temps = TemperatureSchedule(
        total_steps=cfg.total_steps,
        tau_rank_start=cfg.tau_rank[0],
        tau_rank_end=cfg.tau_rank[1],
        tau_sel_start=cfg.tau_sel[0],
        tau_sel_end=cfg.tau_sel[1],
    )
    taps = {b for b in range(run.n_layers - 1) if (b + 1) % cfg.tap_every == 0}
    run.state = RouteState(run.routed, run.topk, taps, estimator=cfg.estimator)
    run.state.checkpointing = bool(cfg.gradient_checkpointing)
    run.state.cfg = bool(cfg.cfg_pairs)
    set_route_override(transformer, make_override(run.state))
    blocks = run.adapter.blocks(transformer)
    run.hooks = [
        blocks[b].register_forward_hook(tap_hook(run.state, b, run.adapter)) for b in taps if b not in run.routed
    ]


def _open_data(run: _Run) -> None:
    """The training source, the held-out batch and stopper (``eval_every``), the sampling generator and this
    rank's rows of the global batch."""
    cfg = run.cfg
    run.data = make_data(cfg.data, run.transformer, run.h, run.w, run.text_len, seed=cfg.seed)
    if cfg.eval_every is not None:  # before any draw: with cached latents the held-out samples leave the training pool
        run.held = heldout_batch(cfg, run.data, run.transformer, run.h, run.w, run.text_len)
        run.stopper = EarlyStopping(cfg.patience, cfg.eval_min_delta)
    run.gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    run.my_rows = run.dist.rows(cfg.batch)
    if len(run.my_rows) % cfg.accumulate:
        raise ConfigError(
            f"--batch {cfg.batch} over {run.dist.world} process(es) gives {len(run.my_rows)} samples each, which do not split into "
            f"--accumulate {cfg.accumulate} micro-batches. Pass a batch that is a multiple of processes x accumulate."
        )
    run.micro = len(run.my_rows) // cfg.accumulate


def _make_optimizer(run: _Run) -> None:
    """AdamW with one param group per trained part (router, policy, and DoRA's, frozen until stage 3)."""
    cfg, bank, policy = run.cfg, run.bank, run.policy
    run.trainable = [*bank.parameters(), *policy.parameters()]
    run.opt = torch.optim.AdamW(
        [
            {"params": list(bank.parameters()), "lr": cfg.lr_router, "base_lr": cfg.lr_router, "name": "router"},
            {"params": list(policy.parameters()), "lr": cfg.lr_policy, "base_lr": cfg.lr_policy, "name": "policy"},
        ],
        weight_decay=cfg.weight_decay,
    )
    if cfg.dora:  # -- DoRA: own param group (frozen, so skipped by AdamW, until stage 3)
        run.opt.add_param_group(
            {
                "params": _dora.dora_parameters(run.transformer),
                "lr": cfg.lr_dora,
                "base_lr": cfg.lr_dora,
                "name": "dora",
            }
        )
        run.trainable += list(_dora.dora_parameters(run.transformer))
    run.parts = Trainables(bank, policy, run.budget, run.opt, run.transformer, cfg.dora)


def _resume(run: _Run) -> None:
    run.step, run.history = resume_from(run.ckpt_path, run.rec, run.cfg, run.parts, run.data, run.gen, run.stopper)
    logger.info("resumed from %s at step %d", run.ckpt_path, run.step)
    run.say(
        {
            "event": "resume",
            "step": run.step,
            "total": run.cfg.total_steps,
            "checkpoint": str(run.ckpt_path),
            "world": run.dist.world,
        }
    )


def _checkpoint(run: _Run) -> None:
    if run.dist.is_main:
        save_checkpoint(
            run.ckpt_path,
            checkpoint_payload(run.rec, run.cfg, run.step, run.parts, run.data, run.gen, run.history, run.stopper),
        )
        run.say({"event": "checkpoint", "step": run.step, "path": str(run.ckpt_path)})
    run.dist.barrier()


def _heldout(run: _Run, stage: int) -> float:
    """The student's quality loss on the fixed held-out batch: stage 1 at its stratified ratios, later stages at the policy's keeps."""
    batch, ratios, _ = run.held
    with torch.no_grad():
        keep = (
            ratios[:, None].expand(len(ratios), len(run.routed))
            if stage == 0
            else run.policy(batch.timestep[: len(ratios)].to(run.device), run.layer_ids, noise=False)
        )
    return heldout_loss(
        run.transformer, run.state, batch, keep.to(run.device), run.cfg, run.device, run.bdtype, max(1, run.micro)
    )


# ------------------------------------------------------------------------------------------------- loop
@dataclass
class _Keeps:
    """One step's global draws: timesteps and where the keep ratios come from (stratified/fixed, or the policy)."""

    t_all: torch.Tensor
    t_dev: torch.Tensor
    uniform: bool  # keeps not from the policy (stage 1, or stage 3 under --stage3-keep)
    fixed: torch.Tensor | None
    noise: torch.Tensor | None
    policy: RatioPolicy
    layer_ids: torch.Tensor

    def rows(self, idx: list[int]) -> torch.Tensor:
        """Keep ratios [len(idx), L] of global samples ``idx`` (a fresh graph per use: micro-batches backward separately)."""
        if self.uniform:
            return self.fixed[idx]
        z = self.policy.logits(self.t_dev[idx], self.layer_ids, noise=False)
        return self.policy.keep_of(z if self.noise is None else z + self.noise[idx])


def _train_steps(run: _Run) -> None:
    """The optimizer steps from ``run.step`` to ``stop_at_step`` (or the end), with checkpoints and held-out stopping."""
    cfg = run.cfg
    metrics = Metrics(run.out_dir / METRICS_NAME if run.dist.is_main else None, append=cfg.resume)
    timesteps = (
        run.adapter.sampler_timesteps(run.transformer.config, cfg.sampler_steps, run.n_tokens, cfg.sampler_shift)
        if cfg.timesteps is None
        else list(cfg.timesteps)
    )
    run.sampler_t = torch.tensor(timesteps)
    run.layer_ids = torch.tensor(run.routed, device=run.device)
    stop = cfg.total_steps if cfg.stop_at_step is None else min(cfg.total_steps, cfg.stop_at_step)
    clock = (time.perf_counter(), run.step)
    while run.step < stop:
        stage, s_in, s_len = cfg.stage_of(run.step)
        _begin_step(run, stage, s_in, s_len)
        keeps = _draw_keeps(run, stage)
        with torch.no_grad():
            keep_all = keeps.rows(list(range(cfg.batch)))  # [B, L], for the log
        batch = _draw(run.data, cfg, keeps.t_all, run.my_rows)
        run.opt.zero_grad(set_to_none=True)
        losses = _accumulate(run, batch, keeps, stage)
        budget = _optimizer_step(run, keeps, stage)
        run.step += 1
        h_loss, stop_stage = None, False
        if run.stopper is not None and ((s_in + 1) % cfg.eval_every == 0 or s_in + 1 == s_len):
            h_loss = _heldout(run, stage)
            stop_stage = run.stopper.observe(run.step, h_loss, run.parts.snapshot)
        row = _step_record(run, stage, losses, budget, keep_all, h_loss, clock, stop)
        run.history.append(row)
        metrics.write(row)
        run.say(row)
        _end_step(run, stage, s_in, s_len, stop_stage, stop)
    for hk in run.hooks:
        hk.remove()


def _begin_step(run: _Run, stage: int, s_in: int, s_len: int) -> None:
    """DoRA on in the joint stage, a new stage's held-out entry state, the lr warm-up and the temperatures."""
    cfg = run.cfg
    if cfg.dora:  # -- DoRA: adapters on and learning in the joint stage only (identity before it)
        _dora.set_dora_enabled(run.transformer, stage == 2)
        _dora.set_dora_trainable(run.transformer, stage == 2)
    if run.stopper is not None and run.stopper.stage != stage:  # a stage begins: its entry state is the first candidate
        run.stopper.start(stage)
        run.stopper.observe(run.step, _heldout(run, stage), run.parts.snapshot)
    warm = max(1, int(round(cfg.lr_warmup_frac * s_len)))
    f = min(1.0, (s_in + 1) / warm)
    for g in run.opt.param_groups:
        g["lr"] = g["base_lr"] * f
    run.temps.apply(run.topk, run.step)


def _draw_keeps(run: _Run, stage: int) -> _Keeps:
    """The global draws of one step (identical on every rank): stratified timesteps, then the stage's keep source."""
    cfg, gen, n_routed = run.cfg, run.gen, len(run.routed)
    t_all = stratified_timesteps(cfg.batch, generator=gen)
    uniform = stage == 0 or (stage == 2 and cfg.stage3_keep is not None)
    fixed = noise = None
    if stage == 0:
        groups = min(cfg.ratio_groups, cfg.batch)
        r = stratified_ratios(cfg.batch, groups, cfg.ratio_range[0], cfg.ratio_range[1], generator=gen)
        fixed = r[:, None].expand(cfg.batch, n_routed).to(run.device)
    elif uniform:  # --stage3-keep: the student at one keep everywhere; the policy is frozen
        fixed = torch.full((cfg.batch, n_routed), float(cfg.stage3_keep), device=run.device)
    else:
        run.policy.train()
        noise = (
            (torch.randn((cfg.batch, n_routed), generator=gen) * cfg.logit_noise_std).to(run.device)
            if stage == 1
            else None
        )
    return _Keeps(t_all, t_all.to(run.device), uniform, fixed, noise, run.policy, run.layer_ids)


def _draw(data, cfg: TrainConfig, t_all: torch.Tensor, my_rows: range):
    """This rank's rows of the global batch (all random numbers drawn for the global batch)."""
    batch = data.batch(cfg.batch, timesteps=t_all, caption_dropout=cfg.caption_dropout, cfg_pairs=cfg.cfg_pairs)
    return batch.rows(list(my_rows))


def _accumulate(run: _Run, batch, keeps: _Keeps, stage: int) -> tuple[dict[str, float], dict[str, bool]]:
    """Forward and backward of every micro-batch; returns the summed loss terms and which terms ran."""
    cfg = run.cfg
    sums = {"distill": 0.0, "flow": 0.0, "importance": 0.0, "dense": 0.0}
    has = {"flow": False, "importance": False, "dense": stage == 2 and cfg.dense_weight > 0}
    run.state.noise_key = (cfg.seed, run.step)
    for m in range(cfg.accumulate):
        _micro_step(run, batch, keeps, m * run.micro, (m + 1) * run.micro, sums, has)
    return sums, has


def _micro_step(
    run: _Run, batch, keeps: _Keeps, lo: int, hi: int, sums: dict[str, float], has: dict[str, bool]
) -> None:
    """Teacher (dense, no grad), student, the loss terms and their backward for rows ``lo .. hi - 1``."""
    cfg, state, transformer = run.cfg, run.state, run.transformer
    pairs = 2 if cfg.cfg_pairs else 1
    mb = batch.rows(list(range(lo, hi)))
    inputs = run.inputs_of(mb)
    keep = keeps.rows([run.my_rows[i] for i in range(lo, hi)])
    state.samples = torch.tensor([run.my_rows[i] for i in range(lo, hi)] * pairs)
    with torch.no_grad(), _dora.teacher_mode(transformer):  # DoRA: the teacher is the frozen base
        state.mode, state.record_importance, state.importance = "dense", cfg.importance_weight > 0, {}
        state.record_updates, state.updates = cfg.estimator == "output-gated", {}
        t_out, t_taps = forward_with_taps(transformer, state, inputs)
        state.record_importance = state.record_updates = False
    state.mode, state.generator = "student", run.gen
    state.keep = keep.repeat(pairs, 1)
    s_out, s_taps = forward_with_taps(transformer, state, inputs)
    distill = distill_loss(s_out, s_taps, t_out, t_taps)
    loss = cfg.distill_weight * distill
    sums["distill"] += float(distill.detach()) * (hi - lo)
    if mb.target is not None and cfg.flow_weight > 0:
        flow = F.mse_loss(
            run.adapter.training_prediction(transformer.config, s_out).float(), mb.target.to(run.device).float()
        )
        loss = loss + cfg.flow_weight * flow
        sums["flow"] += float(flow.detach()) * (hi - lo)
        has["flow"] = True
    if has["dense"]:  # the adapted model run dense stays the frozen dense teacher
        state.mode = "dense"
        d_out, d_taps = forward_with_taps(transformer, state, inputs)
        dense_term = distill_loss(d_out, d_taps, t_out, t_taps)
        loss = loss + cfg.dense_weight * dense_term
        sums["dense"] += float(dense_term.detach()) * (hi - lo)
    if cfg.importance_weight > 0:
        imp = importance_loss(state.scores, state.importance)
        loss = loss + cfg.importance_weight * imp
        sums["importance"] += float(imp.detach()) * (hi - lo)
        has["importance"] = True
    (loss * ((hi - lo) / cfg.batch)).backward()
    state.updates, state.importance = {}, {}


def _optimizer_step(
    run: _Run, keeps: _Keeps, stage: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
    """The budget term, the all-reduce and the optimizer step, then the hard-budget projection; returns
    ``(budget loss, budget measure, projection shift)``."""
    cfg, policy = run.cfg, run.policy
    b_loss = b_measure = projected = None
    if stage > 0 and not keeps.uniform:  # once per optimizer step, identical on every rank
        table = (
            policy(run.sampler_t.to(run.device), run.layer_ids, noise=False)
            if cfg.budget_timesteps == "sampler"
            else keeps.rows(list(range(cfg.batch)))
        )
        b_measure = run.measure(table)
        if cfg.budget == "ema":
            b_loss = run.budget(b_measure.reshape(1))
            (b_loss / run.dist.world).backward()
        else:
            run.budget.update(b_measure.detach())  # mu: logged only
    run.dist.all_reduce_grads_(run.trainable)
    run.opt.step()
    if stage > 0 and not keeps.uniform and cfg.budget == "project":
        # hard budget: after every policy update, shift b_anchor so the policy's measure over the deployment
        # sampler's timesteps is the target again (identical on every rank); the policy the next step uses,
        # and the one written at the end, is on budget
        with torch.no_grad():
            projected = calibrate_anchor(policy, run.sampler_t.tolist(), run.routed, cfg.target_keep, run.measure)[1]
    return b_loss, b_measure, projected


def _step_record(
    run: _Run,
    stage: int,
    losses,
    budget,
    keep_all: torch.Tensor,
    h_loss: float | None,
    clock: tuple[float, int],
    stop: int,
) -> dict[str, Any]:
    """The step's row of the history, ``metrics.jsonl`` and the progress callback (loss terms summed over ranks)."""
    cfg = run.cfg
    (sums, has), (b_loss, b_measure, projected) = losses, budget
    tot = run.dist.all_reduce_sum([sums["distill"], sums["flow"], sums["importance"], sums["dense"]])
    distill_v, flow_v, imp_v, dense_v = (v / cfg.batch for v in tot)
    loss_v = (
        cfg.distill_weight * distill_v
        + (cfg.flow_weight * flow_v if has["flow"] else 0.0)
        + (cfg.importance_weight * imp_v if has["importance"] else 0.0)
    )
    loss_v += cfg.dense_weight * dense_v if has["dense"] else 0.0
    if b_loss is not None:
        loss_v += float(b_loss.detach())
    elapsed = time.perf_counter() - clock[0]
    rate = (run.step - clock[1]) * cfg.batch / max(elapsed, 1e-9)
    return {
        "event": "step",
        "step": run.step,
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
        "mu": float(run.budget.mu),
        "tau_rank": run.topk.tau_rank,
        "tau_sel": run.topk.tau_sel,
        "samples_per_s": round(rate, 3),
        "eta_s": round((stop - run.step) * cfg.batch / max(rate, 1e-9), 1),
        "seconds": round(elapsed, 3),
        **({"heldout": h_loss} if h_loss is not None else {}),
    }


def _end_step(run: _Run, stage: int, s_in: int, s_len: int, stop_stage: bool, stop: int) -> None:
    """A stage that ends (early or at its budget) under held-out stopping continues from its best state;
    checkpoints at stage ends, every ``checkpoint_every`` steps and at the last step."""
    stopper = run.stopper
    if stopper is not None and (stop_stage or s_in + 1 == s_len):
        if stopper.snapshot is not None:  # None only when every evaluation of the stage was non-finite
            run.parts.restore(stopper.snapshot)
        if s_in + 1 < s_len:
            stopper.stops[stage] = run.step
            run.step += s_len - (s_in + 1)  # the global counter jumps to the next stage (its temperatures, lr warm-up)
        run.say({"event": "stage-end", "stage": STAGES[stage], "step": run.step, **stopper.summary(stage)})
        _checkpoint(run)
    elif run.step % run.cfg.checkpoint_every == 0 or run.step == stop:
        _checkpoint(run)


# ----------------------------------------------------------------------------------------------- finish
def _finish(run: _Run) -> TrainResult:
    """The result; when every step ran, the DoRA merge (``--dora``) and the outputs (rank 0)."""
    cfg, history = run.cfg, run.history
    result = TrainResult(
        out_dir=run.out_dir,
        finished=run.step >= cfg.total_steps,
        step=run.step,
        seconds=0.0,
        target_keep=cfg.target_keep,
        checkpoint_path=run.ckpt_path,
        history=history,
        context=cfg.context,
    )
    result.stages_run = [sum(1 for r in history if r["stage"] == name) for name in STAGES]
    if run.stopper is not None:
        result.heldout = {
            "source": run.held[2],
            "samples": cfg.eval_samples,
            "eval_every": cfg.eval_every,
            "patience": cfg.patience,
            "min_delta": cfg.eval_min_delta,
            "stages": {STAGES[i]: run.stopper.summary(i) for i in range(len(STAGES))},
        }
    if (
        result.finished and cfg.dora and run.dist.is_main
    ):  # -- DoRA: merge in fp32, save out_dir/transformer, bind the recipe to it
        remove_shiva_(run.transformer)
        result.dora = _dora.merge_and_save(
            run.transformer, run.out_dir, check_inputs=InputSpec(1, run.h, run.w, run.text_len, False)
        ).to_dict()
        run.say({"event": "dora-merged", **result.dora})
    if result.finished:
        if run.dist.is_main:
            write_outputs(
                result,
                run.rec,
                cfg,
                run.bank,
                run.policy,
                run.routed,
                run.n_tokens,
                run.n_layers,
                run.transformer,
                run.measure,
                context=cfg.context,
            )
            run.say(
                {"event": "done", "step": run.step, "recipe": str(result.recipe_path), "mean_keep": result.mean_keep}
            )
        run.dist.barrier()
    return result
