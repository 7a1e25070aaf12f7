"""``shiva-export train``: distil Shiva routers and a keep-ratio schedule from the dense model."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import Quiet, RecipeFile, TorchThreads, TransformerWeights
from shiva_export.cli._output import result_json, result_text
from shiva_export.errors import ConfigError

HELP = (
    "Train Shiva routers and the adaptive keep-ratio policy by distillation from the frozen dense model "
    "(router warm-up, policy learning, joint tuning), then write router.safetensors, lut.json and a recipe.toml "
    "whose [[schedule.phases]] each export as one static engine (`shiva-export onnx --recipe R --phase P`). "
    "--target-keep is the mean FRACTION OF IMAGE TOKENS KEPT; --ratio is the FRACTION OF IMAGE TOKENS PRUNED "
    "(= 1 - target keep); give one of them."
)
EPILOG = """Examples:

  shiva-export train --model sd35-tiny --target-keep 0.6 --out-dir runs/sd35-tiny

  shiva-export train --model sd35-tiny --ratio 0.4 --steps 300 --steps 150 --steps 100 --phases 2

  shiva-export train --model sd35 --weights ./sd35m/transformer --data ./latents --out-dir runs/sd35 --resume

  shiva-export train --model sd35-tiny --steps 300 --steps 2000 --steps 1000 --eval-every 25 --patience 6

  shiva-export train --model sd35-tiny --context keep         # rejected tokens still give keys/values (SD3/SD3.5)

  shiva-export train --model sd35-tiny --paper-only            # the paper's estimator and budget as published

  shiva-export train --model sd35-tiny --dora --dora-rank 32 --lr-dora 1e-4 --out-dir runs/sd35-tiny-dora

  shiva-export train --model sd35-tiny --dora --stage3-keep 0.6 --dense-weight 1 --out-dir runs/sd35-tiny-dora-u

  torchrun --nproc_per_node 2 -m shiva_export train --model sd35-tiny --batch 8 --out-dir runs/ddp

--data is a train-data output (sharded safetensors + manifest) or a folder of one-sample .safetensors files
(latents [C,H,W], prompt_embeds [T,J], pooled [P]); without it the inputs are seeded synthetic tensors
(distillation only). --dora also tunes DoRA adapters in stage 3 and saves the merged transformer to
OUT_DIR/transformer/; the written recipe loads only those weights (path + sha256). Under torchrun, --batch is
the global batch (gloo on CPU, NCCL on CUDA); rank 0 writes checkpoint, metrics.jsonl and outputs.
Exit codes: 0 ok, 1 error, 2 bad option value, 4 peft missing (--dora).
"""


Model = Annotated[
    str, typer.Option("--model", "-m", help="Model name (sd35-tiny, flux-tiny, pixart-tiny, dit-tiny, sd35, ...).")
]
Data = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Folder of cached latents + text embeddings (.safetensors). Default: synthetic inputs."
    ),
]
TargetKeep = Annotated[
    float | None,
    typer.Option("--target-keep", help="Target mean FRACTION OF IMAGE TOKENS KEPT, in (0, 1). Default 0.6."),
]
Ratio = Annotated[
    float | None,
    typer.Option(
        "--ratio",
        "-r",
        help="FRACTION OF IMAGE TOKENS PRUNED (= 1 - target keep), in (0, 1). Exclusive with --target-keep.",
    ),
]
Steps = Annotated[
    list[int] | None,
    typer.Option(
        "--steps", help="Steps per stage: give 3 (warm-up, policy, joint) or 1 (split 50/30/20). Default 120 60 40."
    ),
]
Batch = Annotated[int, typer.Option("--batch", help="Samples per step (= stratified timestep bins).")]
Phases = Annotated[int, typer.Option("--phases", help="Static phases of the learned schedule, 1..4 (one engine each).")]
SamplerSteps = Annotated[
    int, typer.Option("--sampler-steps", help="Steps of the flow-matching sampler the LUT is evaluated on.")
]
SamplerShift = Annotated[
    float | None,
    typer.Option(
        "--sampler-shift", help="Timestep shift of that sampler. Default: the recipe's [pipeline] scheduler_shift."
    ),
]
LrRouter = Annotated[float, typer.Option("--lr-router", help="AdamW lr of the routers (paper 3e-4).")]
LrPolicy = Annotated[float, typer.Option("--lr-policy", help="AdamW lr of the ratio policy (paper 1e-4).")]
Dora = Annotated[
    bool,
    typer.Option(
        "--dora",
        help="Stage 3 also tunes DoRA adapters on the attention/FFN linears; saves the merged transformer and binds the recipe to it by sha256 (needs peft).",
    ),
]
DoraRank = Annotated[int, typer.Option("--dora-rank", help="DoRA rank (alpha = rank).")]
LrDora = Annotated[float, typer.Option("--lr-dora", help="AdamW lr of the DoRA adapters.")]
Stage3Keep = Annotated[
    float | None,
    typer.Option(
        "--stage3-keep",
        help="Stage 3 routes the student at this uniform FRACTION OF IMAGE TOKENS KEPT in every routed block, not the learned policy (frozen in stage 3).",
    ),
]
DenseWeight = Annotated[
    float,
    typer.Option(
        "--dense-weight",
        help="--dora: weight of a stage-3 term distilling the adapted model run dense (keep 1.0) to the frozen teacher, so the merged backbone stays good dense. 0 = off.",
    ),
]
OutDir = Annotated[
    Path,
    typer.Option("--out-dir", "-o", help="Output folder (router.safetensors, lut.json, recipe.toml, checkpoint.pt)."),
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT_DIR/checkpoint.pt.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of data, sampling and noise.")]
Estimator = Annotated[
    str,
    typer.Option(
        "--estimator",
        help="Gradient estimator: output-gated (default; measured right in sign) | residual (the paper's STE).",
    ),
]
ImportanceWeight = Annotated[
    float,
    typer.Option(
        "--importance-weight",
        help="Weight of the importance-correlation auxiliary (not in the paper; ~100x the distillation loss in size). 0 = off.",
    ),
]
MinKeep = Annotated[float, typer.Option("--min-keep", help="Floor of every learned keep ratio (no layer collapses).")]
MaxLogit = Annotated[
    float | None,
    typer.Option(
        "--max-logit", help="Smooth bound of the policy logits (m tanh(z/m)); stops saturated logits from drifting."
    ),
]
Budget = Annotated[
    str,
    typer.Option(
        "--budget",
        help="project (hard: the policy's sampler-LUT mean is the target every step) | ema (the paper's soft EMA loss, weight --lambda-budget).",
    ),
]
LambdaBudget = Annotated[float, typer.Option("--lambda-budget", help="Weight of the EMA budget loss (--budget ema).")]
BudgetTimesteps = Annotated[
    str,
    typer.Option(
        "--budget-timesteps", help="sampler (the LUT over the deployment sampler's timesteps) | batch (the paper's)."
    ),
]
BudgetMeasure = Annotated[
    str, typer.Option("--budget-measure", help="tokens (mean keep) | flops (the uniform keep with the same FLOPs).")
]
Context = Annotated[
    str | None,
    typer.Option(
        "--context",
        help="keep | drop: whether rejected tokens still give keys and values in the routed blocks the student trains (SD3/SD3.5; as `generate --context`). Default: the recipe's [prune] context (drop).",
    ),
]
PaperOnly = Annotated[
    bool,
    typer.Option(
        "--paper-only",
        help="The paper's objective as published: residual STE, no importance auxiliary, no keep floor, the soft EMA budget on the batch's timesteps.",
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="cpu | cuda | cuda:N (under torchrun each rank takes its local GPU).")
]
Dtype = Annotated[
    str, typer.Option("--dtype", help="Backbone dtype: fp32 | bf16 | fp16 (routers, policy and losses stay fp32).")
]
GradientCheckpointing = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Recompute routed blocks in the backward (less memory).")
]
Accumulate = Annotated[
    int,
    typer.Option("--accumulate", help="Micro-batches per optimizer step per process (--batch is the global batch)."),
]
CfgPairs = Annotated[
    bool,
    typer.Option(
        "--cfg-pairs", help="Train on [uncond; cond] pairs sharing kept indices by max score, as CFG inference."
    ),
]
CaptionDropout = Annotated[
    float, typer.Option("--caption-dropout", help="Probability of the null text per sample (paper 0.1).")
]
EvalEvery = Annotated[
    int | None,
    typer.Option(
        "--eval-every",
        help="Held-out stopping: evaluate a fixed held-out batch every N steps of a stage; stop the stage after --patience evaluations without improvement; keep each stage's best state. Default: off (full stage budgets).",
    ),
]
Patience = Annotated[
    int | None,
    typer.Option(
        "--patience",
        help="Held-out evaluations without improvement before a stage stops (needs --eval-every). Default 5.",
    ),
]
EvalMinDelta = Annotated[
    float | None,
    typer.Option(
        "--eval-min-delta", help="Relative held-out improvement that counts (needs --eval-every). Default 1e-3."
    ),
]
EvalSamples = Annotated[
    int | None,
    typer.Option(
        "--eval-samples",
        help="Held-out batch size; with a folder of cached latents they are split off the training pool (needs --eval-every). Default 32.",
    ),
]
JsonResult = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]


def train_command(
    ctx: typer.Context,
    model: Model = "sd35-tiny",
    recipe: RecipeFile = None,
    weights: TransformerWeights = None,
    data: Data = None,
    target_keep: TargetKeep = None,
    ratio: Ratio = None,
    steps: Steps = None,
    batch: Batch = 4,
    phases: Phases = 2,
    sampler_steps: SamplerSteps = 28,
    sampler_shift: SamplerShift = None,
    lr_router: LrRouter = 3e-4,
    lr_policy: LrPolicy = 1e-4,
    dora: Dora = False,
    dora_rank: DoraRank = 32,
    lr_dora: LrDora = 1e-4,
    stage3_keep: Stage3Keep = None,
    dense_weight: DenseWeight = 0.0,
    out_dir: OutDir = Path("shiva-train"),
    resume: Resume = False,
    seed: Seed = 0,
    threads: TorchThreads = None,
    estimator: Estimator = "output-gated",
    importance_weight: ImportanceWeight = 0.0,
    min_keep: MinKeep = 0.2,
    max_logit: MaxLogit = 4.0,
    budget: Budget = "project",
    lambda_budget: LambdaBudget = 1.0,
    budget_timesteps: BudgetTimesteps = "sampler",
    budget_measure: BudgetMeasure = "tokens",
    context: Context = None,
    paper_only: PaperOnly = False,
    device: Device = "cpu",
    dtype: Dtype = "fp32",
    gradient_checkpointing: GradientCheckpointing = False,
    accumulate: Accumulate = 1,
    cfg_pairs: CfgPairs = False,
    caption_dropout: CaptionDropout = 0.0,
    eval_every: EvalEvery = None,
    patience: Patience = None,
    eval_min_delta: EvalMinDelta = None,
    eval_samples: EvalSamples = None,
    json_out: JsonResult = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.train import TrainConfig

    if context not in (None, "keep", "drop"):
        raise typer.BadParameter(f"{context!r} is not one of keep, drop.", param_hint="--context")
    target_keep = _target_keep(target_keep, ratio, min_keep, max_logit, paper_only)
    stage_steps = _stage_steps(steps)
    held = _held_out_options(eval_every, patience, eval_min_delta, eval_samples)
    _check_values(model, seed, device, out_dir, threads)
    _check_flag_pairs(ctx, dora, paper_only, budget)
    if sampler_shift is not None and not (math.isfinite(sampler_shift) and sampler_shift > 0):
        raise ConfigError(
            f"--sampler-shift {sampler_shift} is invalid; expected a finite number > 0 (the sampler's timestep shift, e.g. 3.0)."
        )
    rec = _checked_recipe(model, recipe, data, context)
    if paper_only:
        estimator, importance_weight, min_keep, budget, budget_timesteps = "residual", 0.0, 0.0, "ema", "batch"
        max_logit = None
    cfg = _config(
        ctx,
        TrainConfig,
        max_logit=max_logit,
        budget=budget,
        lambda_budget=lambda_budget,
        estimator=estimator,
        importance_weight=importance_weight,
        min_keep=min_keep,
        budget_timesteps=budget_timesteps,
        budget_measure=budget_measure,
        context=context,
        device=device,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        accumulate=accumulate,
        cfg_pairs=cfg_pairs,
        caption_dropout=caption_dropout,
        sampler_shift=float(rec.pipeline.scheduler_shift if sampler_shift is None else sampler_shift),
        warmup_steps=stage_steps[0],
        policy_steps=stage_steps[1],
        joint_steps=stage_steps[2],
        batch=batch,
        lr_router=lr_router,
        lr_policy=lr_policy,
        dora=dora,
        dora_rank=dora_rank,
        dora_alpha=float(dora_rank),
        lr_dora=lr_dora,
        stage3_keep=stage3_keep,
        dense_weight=dense_weight,
        target_keep=target_keep,
        seed=seed,
        phases=phases,
        sampler_steps=sampler_steps,
        data=data,
        out_dir=out_dir,
        resume=resume,
        num_threads=threads,
        **held,
    )
    return _run(rec, cfg, weights=weights, out_dir=out_dir, show=not (quiet or json_out), json_out=json_out)


def _check_values(model: str, seed: int, device: str, out_dir: Path, threads: int | None) -> None:
    """The options checked on their own, before any recipe or model is read."""
    from shiva_export.checks import check_cuda_device, check_model_name, check_out_dir, check_seed

    check_model_name(model)
    check_seed(seed)
    check_cuda_device(device)
    check_out_dir(out_dir, "--out-dir")
    if threads is not None and threads < 1:
        raise ConfigError(
            f"--threads {threads} is out of range; expected 1 or more CPU threads (omit it for torch's default)."
        )


def _check_flag_pairs(ctx: typer.Context, dora: bool, paper_only: bool, budget: str) -> None:
    """Options given on the command line that another option ignores (--dora-rank without --dora) or overrides
    (--estimator with --paper-only) are refused; their defaults are not."""
    from shiva_export.checks import check_ignored, check_overridden

    def given(name: str) -> bool:  # set on the command line, not a default
        src = ctx.get_parameter_source(name)
        return src is not None and src.name == "COMMANDLINE"

    check_ignored(
        {"--dora-rank": given("dora_rank"), "--lr-dora": given("lr_dora"), "--dense-weight": given("dense_weight")},
        "--dora",
        dora,
    )
    check_overridden(
        "--paper-only",
        paper_only,
        {
            f"--{n.replace('_', '-')}": given(n)
            for n in ("estimator", "importance_weight", "min_keep", "budget", "budget_timesteps")
        },
        "sets the estimator, importance weight, keep floor and budget to the paper's",
    )
    check_ignored(
        {"--lambda-budget": given("lambda_budget")}, "--budget ema (or --paper-only)", budget == "ema" or paper_only
    )


def _checked_recipe(model: str, recipe: Path | None, data: Path | None, context: str | None):
    """The recipe, with --data and --context checked against it (before the model is loaded)."""
    from shiva_export.checks import check_train_data
    from shiva_export.recipe import load_recipe

    rec = load_recipe(recipe) if recipe is not None else load_recipe(model)
    check_train_data(data, rec.name, rec.source_path)
    if context is not None:
        from shiva_export.models import adapter_for_architecture

        adapter_for_architecture(rec.architecture).check_context(context)
    return rec


def _run(rec, cfg, *, weights: Path | None, out_dir: Path, show: bool, json_out: bool) -> int:
    """Trains; under torchrun rank 0 holds the --out-dir lock and reports."""
    from shiva_export.train import train
    from shiva_export.utils.io import folder_lock

    progress = _progress_printer(cfg.total_steps, show=show)
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    # a second run into this folder is refused
    with folder_lock(out_dir, "--out-dir") if rank0 else contextlib.nullcontext():
        res = train(rec, cfg, progress=progress, weights=weights)
    if not rank0:
        return ExitCode.OK  # torchrun: rank 0 reports
    summary = res.to_dict()
    if json_out:
        result_json(summary)
    else:
        result_text(format_summary(summary))
    return ExitCode.OK


def _config(ctx: typer.Context, cls, **kw):
    """``cls(**kw)``; a refusal that names a field (``sampler_steps is 0``) names the option the user typed instead."""
    try:
        return cls(**kw)
    except ConfigError as err:
        options = {p.name: p.opts[0] for p in ctx.command.params if getattr(p, "opts", None)}
        field = str(err).split(" ", 1)[0]
        if field in options:
            raise ConfigError(options[field] + str(err)[len(field) :]) from None
        raise


def _target_keep(target_keep, ratio, min_keep, max_logit, paper_only: bool) -> float:
    """The target keep from --target-keep or --ratio (exclusive), with the keep floor and logit bound checked."""
    if target_keep is not None and ratio is not None:
        raise ConfigError(
            f"--target-keep {target_keep} and --ratio {ratio} were both given; expected one (ratio = 1 - target keep). Drop one of them."
        )
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ConfigError(
                f"--ratio {ratio} is out of range; expected 0 < ratio < 1 (fraction of image tokens pruned; 0.4 keeps 60%)."
            )
        target_keep = 1.0 - ratio
    if target_keep is not None and not 0.0 < target_keep < 1.0:  # NaN fails too
        raise ConfigError(
            f"--target-keep {target_keep} is out of range; expected 0 < target keep < 1 (fraction of image tokens kept; 0.6 keeps 60%)."
        )
    target_keep = 0.6 if target_keep is None else target_keep
    if not paper_only and not 0.0 <= min_keep < target_keep:  # --paper-only sets the floor to 0
        raise ConfigError(
            f"--min-keep {min_keep} is out of range; expected 0 <= --min-keep < the target keep ({target_keep:g})."
        )
    if max_logit is not None and not max_logit > 0:
        raise ConfigError(
            f"--max-logit {max_logit} is out of range; expected a number > 0 (the smooth bound of the policy logits; default 4)."
        )
    return target_keep


def _stage_steps(steps: list[int] | None) -> tuple[int, int, int]:
    """--steps: none (120, 60, 40), one total (split 50/30/20) or three per-stage counts."""
    if steps is None:
        return (120, 60, 40)
    for n in steps:
        if n < 0:
            raise ConfigError(
                f"--steps {n} is out of range; expected a step count >= 0 (one total, or warm-up, policy and joint)."
            )
    if len(steps) == 3:
        return tuple(steps)
    if len(steps) == 1:
        n = steps[0]
        a, b = int(round(0.5 * n)), int(round(0.3 * n))
        return (a, b, n - a - b)
    raise ConfigError(f"--steps was given {len(steps)} times; expected 1 (total) or 3 (warm-up, policy, joint) values.")


def _held_out_options(eval_every, patience, eval_min_delta, eval_samples) -> dict:
    """The held-out stopping options as TrainConfig fields; its knobs without --eval-every are refused."""
    held_opts = {"--patience": patience, "--eval-min-delta": eval_min_delta, "--eval-samples": eval_samples}
    given = [k for k, v in held_opts.items() if v is not None]
    if eval_every is None and given:
        raise ConfigError(
            f"{', '.join(given)} configure held-out stopping, which is off without --eval-every; expected --eval-every N with them. Add --eval-every or drop them."
        )
    if eval_every is not None and eval_every < 1:
        raise ConfigError(
            f"--eval-every {eval_every} is out of range; expected a step count >= 1 (omit it to train the full stage budgets)."
        )
    held = {"eval_every": eval_every}
    for key, v in (("patience", patience), ("eval_min_delta", eval_min_delta), ("eval_samples", eval_samples)):
        if v is not None:
            held[key] = v
    return held


def _progress_printer(total_steps: int, *, show: bool):
    """The training progress on stderr: about 20 step lines, every held-out evaluation, stage ends and resumes."""
    every = max(1, total_steps // 20)

    def progress(ev: dict) -> None:
        if not show:
            return
        kind = ev["event"]
        if kind == "step" and (
            ev["step"] % every == 0 or ev["step"] == 1 or ev["step"] == ev["total"] or "heldout" in ev
        ):
            print(
                f"[{ev['seconds']:7.1f}s] step {ev['step']}/{ev['total']} {ev['stage']:<13} loss {ev['loss']:.5f} "
                f"distill {ev['distill']:.5f} mean keep {ev['mean_keep']:.3f} (ema {ev['mu']:.3f})"
                + (f" held-out {ev['heldout']:.5f}" if "heldout" in ev else ""),
                file=sys.stderr,
                flush=True,
            )
        elif kind == "stage-end":
            why = f"stopped early at step {ev['stopped_at']}" if ev["stopped_at"] is not None else "ran its budget"
            print(
                f"stage {ev['stage']} {why}; best held-out loss {ev['best_loss']:.5f} at step {ev['best_step']} (restored)",
                file=sys.stderr,
                flush=True,
            )
        elif kind == "resume":
            print(f"resumed at step {ev['step']}/{ev['total']} from {ev['checkpoint']}", file=sys.stderr, flush=True)

    return progress


def format_summary(s: dict) -> str:
    if not s["finished"]:
        return f"stopped at step {s['step']} (checkpoint {s['checkpoint_path']}); run again with --resume to finish."
    lines = [
        f"out dir      {s['out_dir']}",
        f"router       {s['router_path']}  sha256 {s['router_sha256'][:12]}",
        f"recipe       {s['recipe_path']}"
        + (f"  (context {s['context']}: rejected tokens give keys/values)" if s.get("context") == "keep" else ""),
        *(
            [
                f"transformer  {s['dora']['path']}  sha256 {s['dora']['sha256'][:12]} (DoRA merged; merge error rel {s['dora']['rel_error']:.2g})"
            ]
            if s.get("dora")
            else []
        ),
        f"steps        {s['step']} in {s['seconds']:.1f} s"
        + (f" (run per stage {'/'.join(map(str, s['stages_run']))}; held-out stopping)" if s.get("heldout") else ""),
        f"mean keep    {s['mean_keep']:.4f} (target {s['target_keep']:g}; before calibration {s['raw_mean_keep']:.4f}; "
        f"quantised k/N {s['quantized_mean_keep']:.4f}; calibration shift {s.get('calibration_shift') or 0.0:+.3f} logit)",
        "keep LUT     t      " + " ".join(f"b{b:<5d}" for b in s["layers"]),
    ]
    for t, row in zip(s["timesteps"], s["lut"]):
        lines.append(f"             {t:6.1f} " + " ".join(f"{v:.3f} " for v in row))
    for p in s["phases"]:
        lines.append(f"phase {p['name']:<7} t {p['t_start']:.1f} -> {p['t_stop']:.1f}: k {p['k']}")
    return "\n".join(lines)
