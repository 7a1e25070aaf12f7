"""``shiva-export validate parity|speed|suite|quality``."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import CfgScale, Quiet, Threads, TorchCpuThreads, TrainedRecipe
from shiva_export.cli._output import result_json, result_text, stages, warning

validate_app = typer.Typer(
    help=(
        "Prove parity (PyTorch vs ONNX Runtime vs engines) and measure speed (dense vs pruned vs the ideal FLOP "
        "ratio). --ratio is the FRACTION OF IMAGE TOKENS PRUNED per routed block (0.4 keeps 60%)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

# options several validate commands share
JsonReport = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
Weights = Annotated[Path | None, typer.Option("--weights", help="Local diffusers folder.")]
Height = Annotated[int | None, typer.Option("--height", help="Image height in pixels.")]
Width = Annotated[int | None, typer.Option("--width", help="Image width in pixels.")]

PARITY_EPILOG = """Examples:

  shiva-export validate parity --model sd35-tiny --ratio 0 --ratio 0.2 --ratio 0.4 --ratio 0.6

  shiva-export validate parity --onnx engines/sd35/ratio0.40/fp16/model.onnx --router router.safetensors --report parity.md

Ends with a greppable 'PASSED | ...' or 'FAILED | ...' line; exit 3 when a comparison fails.
"""


ParityModel = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model name (sd35, sd3, sd35-large, flux-dev, flux-schnell; offline: sd35-tiny, sd3-tiny, sd3-mid, flux-tiny).",
    ),
]
ParityRatio = Annotated[
    list[float] | None,
    typer.Option(
        "--ratio",
        "-r",
        help="Fraction of image tokens PRUNED per routed block (repeatable). Default: the recipe's ratios.",
    ),
]
ParityOnnx = Annotated[
    Path | None,
    typer.Option("--onnx", help="Validate this existing export (ratio, shapes and dtype from its metadata)."),
]
ParityRecipe = Annotated[Path | None, typer.Option("--recipe", help="Recipe TOML override.")]
ParityRouter = Annotated[Path | None, typer.Option("--router", help="Router safetensors for the PyTorch reference.")]
ParityDtype = Annotated[str, typer.Option("--dtype", help="Export dtype for fresh exports: fp32 | fp16 | bf16.")]
ParityBackend = Annotated[
    list[str] | None,
    typer.Option(
        "--backend",
        help="ort-cpu | ort-cuda | engine (repeatable). Default: ort-cpu, + ort-cuda when it really runs on CUDA, + engine with --engines-dir.",
    ),
]
ParityEnginesDir = Annotated[
    Path | None,
    typer.Option("--engines-dir", help="Root of `shiva-export trt` outputs, to compare engines too (needs a GPU)."),
]
ParityCases = Annotated[int, typer.Option("--cases", help="Seeded inputs per budget, 1..8 (includes t=1 and t=999).")]
ParityBatch = Annotated[int | None, typer.Option("--batch", help="Prompts per call.")]
ParityCfg = Annotated[bool | None, typer.Option("--cfg/--no-cfg", help="CFG batch (uncond+cond halves).")]
ParityReport = Annotated[Path | None, typer.Option("--report", help="Write a Markdown report here.")]


@validate_app.command(
    "parity",
    epilog=PARITY_EPILOG,
    help="Compare ONNX Runtime (and engines on a GPU) with the fp32 PyTorch pruned model through polygraphy: error stats, cosine, kept-index overlap per routed block. --ratio is the FRACTION OF IMAGE TOKENS PRUNED.",
)
def parity_command(
    model: ParityModel = "sd35",
    ratio: ParityRatio = None,
    onnx: ParityOnnx = None,
    weights: Weights = None,
    recipe: ParityRecipe = None,
    router: ParityRouter = None,
    dtype: ParityDtype = "fp32",
    backend: ParityBackend = None,
    engines_dir: ParityEnginesDir = None,
    cases: ParityCases = 4,
    height: Height = None,
    width: Width = None,
    batch: ParityBatch = None,
    cfg: ParityCfg = None,
    report: ParityReport = None,
    json_out: JsonReport = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.checks import check_model_name, check_parity_backends
    from shiva_export.errors import ConfigError
    from shiva_export.validate.compare import validate_parity

    check_model_name(model)
    check_parity_backends(backend, engines_dir)
    if onnx is not None and ratio:  # the graph's metadata decides its budget; the flag would be ignored
        raise ConfigError(
            f"--ratio {ratio[0]:g} contradicts --onnx {onnx}: an existing graph is validated at the ratio it was exported with; drop --ratio."
        )
    with stages(enabled=not (quiet or json_out)) as advance:
        rep = validate_parity(
            model=model,
            recipe=recipe,
            weights=weights,
            router=router,
            onnx=onnx,
            ratios=ratio,
            dtype=dtype,
            backends=backend,
            engines_dir=engines_dir,
            cases=cases,
            height=height,
            width=width,
            batch=batch,
            cfg=cfg,
            report_md=report,
            progress=advance,
        )
    for s in rep.skipped:
        warning(f"skipped: {s}")
    if json_out:
        result_json(rep.to_dict())
    else:
        result_text(rep.to_markdown().split("\n", 2)[2])
    return ExitCode.OK if rep.passed else ExitCode.VALIDATION_FAILED


SPEED_EPILOG = """Examples:

  shiva-export validate speed --model sd3-mid --ratio 0 --ratio 0.4 --ratio 0.6 --threads 2 --out-dir validate/reports/mid

  shiva-export validate speed --model sd35-shape --device cuda --backend torch --cfg

  shiva-export validate speed --e2e --model sd35-tiny --backend ort --ratio 0.4 --phases --steps 20 --out-dir bench/e2e

--e2e times whole diffusers pipelines (text encoders, denoising loop, VAE) per stage, dense vs pruned on the
same backend, with the end-to-end ideal that counts every non-transformer stage as unchanged.

Prints measured speedup next to the ideal FLOP speedup and efficiency = measured / ideal. Timings are
reported, never asserted; variants run interleaved (round-robin) and speedups are medians of paired ratios.
"""


SpeedModel = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Model name (sd3-mid for the benchmark, sd35-shape for the real SD3.5-M shape)."
    ),
]
SpeedRatio = Annotated[
    list[float] | None,
    typer.Option(
        "--ratio", "-r", help="Fraction of image tokens PRUNED per routed block (repeatable; 0 = routing at k = N)."
    ),
]
SpeedBackend = Annotated[list[str] | None, typer.Option("--backend", help="torch | ort (repeatable).")]
SpeedDevice = Annotated[str, typer.Option("--device", help="cpu | cuda (torch backends).")]
SpeedBatch = Annotated[int, typer.Option("--batch", help="Prompts per call.")]
SpeedCfg = Annotated[bool, typer.Option("--cfg/--no-cfg", help="CFG batch (doubles the model batch).")]
SpeedWarmup = Annotated[int, typer.Option("--warmup", help="Warm-up runs per variant.")]
SpeedRepeats = Annotated[int, typer.Option("--repeats", help="Interleaved rounds.")]
SpeedOutDir = Annotated[
    Path | None, typer.Option("--out-dir", help="Write speed.json, speed.md and speed.png here (e2e.* with --e2e).")
]
SpeedE2e = Annotated[
    bool,
    typer.Option(
        "--e2e",
        help="End to end: whole diffusers pipelines per stage (text encode, denoise loop, VAE), dense vs pruned.",
    ),
]
SpeedSteps = Annotated[int | None, typer.Option("--steps", help="--e2e: denoising steps (default: the recipe's).")]
SpeedPhases = Annotated[bool, typer.Option("--phases", help="--e2e: also time the recipe's learned phase schedule.")]
SpeedGuidance = Annotated[float | None, typer.Option("--guidance", help="--e2e: CFG scale (default: the recipe's).")]
SpeedPrompt = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        help="--e2e: the prompt of every run (DiT: a class label or id). Default: the model's example prompt.",
    ),
]
SpeedDtype = Annotated[
    str, typer.Option("--dtype", help="--e2e: fp32 | fp16 | bf16 (torch backbone dtype, or the graph dtype for ort).")
]
SpeedCompile = Annotated[
    bool, typer.Option("--compile", help="--e2e, torch backend: torch.compile (CUDA graphs on cuda).")
]


@validate_app.command(
    "speed",
    epilog=SPEED_EPILOG,
    help="Time dense vs pruned (torch eager on cpu/cuda, ONNX Runtime), interleaved, next to the ideal FLOP speedup and the router + top-k + gather + scatter overhead. --ratio is the FRACTION OF IMAGE TOKENS PRUNED.",
)
def speed_command(
    model: SpeedModel = "sd3-mid",
    ratio: SpeedRatio = None,
    backend: SpeedBackend = None,
    device: SpeedDevice = "cpu",
    height: Height = None,
    width: Width = None,
    batch: SpeedBatch = 1,
    cfg: SpeedCfg = False,
    warmup: SpeedWarmup = 3,
    repeats: SpeedRepeats = 15,
    threads: Threads = None,
    out_dir: SpeedOutDir = None,
    e2e: SpeedE2e = False,
    steps: SpeedSteps = None,
    phases: SpeedPhases = False,
    guidance: SpeedGuidance = None,
    prompt: SpeedPrompt = None,
    dtype: SpeedDtype = "fp32",
    compile_: SpeedCompile = False,
    json_out: JsonReport = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.checks import check_ignored, check_model_name, check_out_dir, check_sizes
    from shiva_export.utils.io import folder_lock
    from shiva_export.validate.speed import benchmark_speed

    check_model_name(model)
    check_sizes(batch=batch, height=height, width=width, cfg=cfg)
    check_out_dir(out_dir, "--out-dir")
    check_ignored(
        {
            "--steps": steps is not None,
            "--phases": phases,
            "--guidance": guidance is not None,
            "--prompt": prompt is not None,
            "--compile": compile_,
            "--dtype": dtype != "fp32",
        },
        "--e2e",
        e2e,
    )
    if e2e:
        from shiva_export.runtime.benchmark import benchmark_e2e

        run = functools.partial(
            benchmark_e2e,
            model=model,
            backends=backend or ("ort",),
            ratios=ratio if ratio is not None else (0.4,),
            phases=phases,
            steps=steps,
            guidance=guidance,
            prompt=prompt,
            warmup=warmup if warmup != 3 else 1,
            repeats=repeats if repeats != 15 else 5,
            threads=threads,
            device=device,
            dtype=dtype,
            compile=compile_,
            out_dir=out_dir,
        )
    else:
        run = functools.partial(
            benchmark_speed,
            model=model,
            ratios=ratio or (0.0, 0.4, 0.6),
            backends=backend or ("torch", "ort"),
            height=height,
            width=width,
            batch=batch,
            cfg=cfg,
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            out_dir=out_dir,
            device=device,
        )
    lock = (
        folder_lock(out_dir, "--out-dir") if out_dir is not None else contextlib.nullcontext()
    )  # one writer per folder
    with lock, stages(enabled=not (quiet or json_out)) as advance:
        rep = run(progress=advance)
    result_json(rep.to_dict()) if json_out else result_text(rep.to_markdown())
    return ExitCode.OK


SuiteName = Annotated[str, typer.Argument(help="Suite name in validate/ (cpu, mid, sd35m) or a .toml path.")]
SuiteOutDir = Annotated[
    Path | None, typer.Option("--out-dir", help="Report folder (default validate/reports/<suite>).")
]
SuiteJson = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]


@validate_app.command("suite")
def suite_command(
    name: SuiteName,
    out_dir: SuiteOutDir = None,
    json_out: SuiteJson = False,
    quiet: Quiet = False,
) -> int:
    """Run a declarative suite (validate/<name>.toml): parity cases can fail it (exit 3); speed cases only report."""
    from shiva_export.checks import check_out_dir
    from shiva_export.utils.io import folder_lock
    from shiva_export.validate.suite import run_suite

    check_out_dir(out_dir, "--out-dir")
    lock = (
        folder_lock(out_dir, "--out-dir") if out_dir is not None else contextlib.nullcontext()
    )  # one writer per report folder
    with lock, stages(enabled=not (quiet or json_out)) as advance:
        summary = run_suite(name, out_dir=out_dir, progress=advance)
    if json_out:
        result_json(summary)
    else:
        result_text(
            "\n".join(f"{r['case']}: {r['summary']}" for r in summary["results"]) + f"\nreports: {summary['out_dir']}"
        )
    return ExitCode.OK if summary["passed"] else ExitCode.VALIDATION_FAILED


QUALITY_EPILOG = """Examples:

  shiva-export validate quality --model sd35-shapes --out-dir validate/reports/quality

  shiva-export validate quality --model sd35-shapes --prompts 96 --seed 2 --seed 3 --seed 4 --out-dir validate/reports/quality96

  shiva-export validate quality --model sd35-shapes --prompts 4 --steps 4 --keep 0.6 --method shiva --method random --out-dir /tmp/q

Runs a fixed prompt set with fixed seeds through the pipeline for every method and keep budget and writes
quality.json (with every image's record), quality.md (the paper's Table 1 layout), pareto.png (quality vs
latency) and grid.png (one row per method and budget, one column per prompt). Metrics need no download: an
analytic judge reads colour, shape, size and position back from each image; the Fréchet distance uses its
features, standardised with the real reference. Accuracy carries a 95% bootstrap interval over the
prompts; a warning says when the best two methods at a budget are inside each other's noise.

Seeds: make choices (CFG, steps, checkpoints) on seed 1; the default reports on the held-out seeds 2 and 3
(24 prompts x 2 seeds, about 11 minutes on one thread). Ranking close methods needs more: --prompts 96 and
three seeds (40-60 minutes).
"""


QualityModel = Annotated[
    str, typer.Option("--model", "-m", help="A model with shape-caption ground truth (sd35-shapes).")
]
QualityRecipe = Annotated[
    Path | None, typer.Option("--recipe", help="Recipe TOML override (e.g. a `train --dora` recipe.toml).")
]
QualityWeights = Annotated[
    Path | None,
    typer.Option("--weights", help="Local diffusers transformer or pipeline folder (as generate --weights)."),
]
QualityMethod = Annotated[
    list[str] | None,
    typer.Option(
        "--method",
        help="dense | shiva | shiva-learned | random | l2norm | spatial-rotating | spatial-fixed (repeatable). Default: all but spatial-fixed.",
    ),
]
QualityKeep = Annotated[
    list[float] | None,
    typer.Option("--keep", help="FRACTION OF IMAGE TOKENS KEPT per routed block (repeatable). Default 0.8 0.6 0.4."),
]
QualityPrompts = Annotated[int, typer.Option("--prompts", help="Prompts of the fixed set, 1..96.")]
QualitySeed = Annotated[
    list[int] | None,
    typer.Option(
        "--seed", help="Seeds per prompt (repeatable, distinct). Default: the held-out 2 and 3 (seed 1 is for choices)."
    ),
]
QualitySteps = Annotated[int | None, typer.Option("--steps", help="Denoising steps (default: the recipe's).")]
QualityNRef = Annotated[int, typer.Option("--n-ref", help="Real scenes of the Fréchet reference set.")]
QualityVelocitySamples = Annotated[
    int, typer.Option("--velocity-samples", help="Real scenes of the velocity / foreground check.")
]
QualityLatencyRepeats = Annotated[
    int,
    typer.Option(
        "--latency-repeats", help="Interleaved timing rounds per configuration (0: time the generation calls)."
    ),
]
QualityOutDir = Annotated[
    Path, typer.Option("--out-dir", help="Write quality.json, quality.md, pareto.png and grid.png here.")
]


@validate_app.command(
    "quality",
    epilog=QUALITY_EPILOG,
    help="Quality at a budget (FD, prompt accuracy with 95% intervals, PSNR/MAD vs dense, latency, velocity error, foreground kept) for dense, Shiva (uniform, learned schedule), random, L2-norm and rotating spatial dither selection at keep 0.8/0.6/0.4. --keep is the FRACTION OF IMAGE TOKENS KEPT.",
)
def quality_command(
    model: QualityModel = "sd35-shapes",
    recipe: QualityRecipe = None,
    weights: QualityWeights = None,
    method: QualityMethod = None,
    keep: QualityKeep = None,
    prompts: QualityPrompts = 24,
    seed: QualitySeed = None,
    steps: QualitySteps = None,
    guidance: CfgScale = None,
    n_ref: QualityNRef = 256,
    velocity_samples: QualityVelocitySamples = 16,
    threads: TorchCpuThreads = 1,
    latency_repeats: QualityLatencyRepeats = 3,
    out_dir: QualityOutDir = Path("validate/reports/quality"),
    json_out: JsonReport = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.checks import check_model_name, check_number, check_out_dir
    from shiva_export.utils.io import folder_lock
    from shiva_export.validate.quality import SEEDS, json_safe, validate_quality

    check_model_name(model)
    check_out_dir(out_dir, "--out-dir")
    check_number(steps, "--steps", 1, example="14")
    check_number(guidance, "--guidance", 0, example="2.0")
    _check_judge(model, recipe)
    with folder_lock(out_dir, "--out-dir"), stages(enabled=not (quiet or json_out)) as advance:
        rep = validate_quality(
            model=model,
            recipe=recipe,
            weights=weights,
            methods=method,
            keeps=keep,
            prompts=prompts,
            seeds=seed or SEEDS,
            steps=steps,
            guidance=guidance,
            n_ref=n_ref,
            velocity_samples=velocity_samples,
            threads=threads,
            latency_repeats=latency_repeats,
            out_dir=out_dir,
            progress=advance,
        )
    if json_out:  # the Markdown carries the same lines
        for w in rep.warnings():
            warning(w)
    result_json(json_safe(rep.to_dict())) if json_out else result_text(rep.to_markdown() + f"\nreports: {out_dir}")
    return ExitCode.OK


def _check_judge(model: str, recipe: Path | None) -> None:
    """Quality is read back by the analytic judge: a model without one ([pipeline] judge) would report accuracies
    of nothing; refused before the pipeline is loaded."""
    from shiva_export.errors import ConfigError
    from shiva_export.recipe import load_recipe

    rec = load_recipe(recipe if recipe is not None else model)
    if rec.pipeline.judge != "shapes":
        raise ConfigError(
            f'--model {rec.name} has no judge ([pipeline] judge = "shapes" in its recipe), so validate quality has nothing to score; '
            "use --model sd35-shapes, or `validate frontier` for PSNR against dense."
        )


ESTIMATOR_EPILOG = """Examples:

  shiva-export validate estimator --model sd35-tiny
  shiva-export validate estimator --model sd35-shapes --data build/shapes/latents --router random --min-agreement 0.9 --beat-baseline

Per routed layer and keep level, the estimator's dL/dkeep is compared with central finite differences
of the real hard-routed distillation loss (one layer moved by +-delta): sign agreement, rank agreement
(Spearman across layers and keep levels) and magnitude error, each beside a constant estimator (the median
finite difference). Exit 3 when --min-agreement is given and the first --estimator's sign agreement is
below it, or when --beat-baseline is given and it does not beat the constant on rank agreement and
magnitude error (on a model where every finite difference is negative, a constant agrees in sign 100%)."""


EstimatorModel = Annotated[
    str, typer.Option("--model", "-m", help="Model name (sd35-tiny, sd35-shapes, flux-tiny, ...).")
]
EstimatorEstimator = Annotated[
    list[str] | None, typer.Option("--estimator", help="output-gated | residual (repeatable). Default: both.")
]
EstimatorKeep = Annotated[
    list[float] | None,
    typer.Option("--keep", help="FRACTION OF IMAGE TOKENS KEPT per routed block (repeatable). Default 0.4 0.6 0.8."),
]
EstimatorDelta = Annotated[float, typer.Option("--delta", help="Finite-difference step of the keep ratio.")]
EstimatorSamples = Annotated[int, typer.Option("--samples", help="Seeded samples (stratified timesteps).")]
EstimatorRouter = Annotated[
    str | None,
    typer.Option(
        "--router", help="'random' (untrained), a router .safetensors, or the recipe's trained router (default)."
    ),
]
EstimatorData = Annotated[
    Path | None, typer.Option("--data", help="Training data (as `train --data`); default synthetic inputs.")
]
EstimatorSeed = Annotated[int, typer.Option("--seed", help="Seed of the inputs.")]
EstimatorMinAgreement = Annotated[
    float | None,
    typer.Option("--min-agreement", help="Fail (exit 3) below this sign agreement of the first estimator, e.g. 0.9."),
]
EstimatorBeatBaseline = Annotated[
    bool,
    typer.Option(
        "--beat-baseline",
        help="Fail (exit 3) unless the first estimator beats a constant estimator on rank agreement and magnitude error.",
    ),
]
EstimatorReport = Annotated[
    Path | None, typer.Option("--report", help="Also write the Markdown report here (and .json beside it).")
]


@validate_app.command(
    "estimator",
    epilog=ESTIMATOR_EPILOG,
    help="Check the training estimators' gradient to the keep ratio (output-gated, the paper's residual STE) against finite differences of the real routed loss: sign agreement, rank agreement and magnitude error per layer and keep level, each beside a constant estimator.",
)
def estimator_command(
    model: EstimatorModel = "sd35-tiny",
    recipe: TrainedRecipe = None,
    estimator: EstimatorEstimator = None,
    keep: EstimatorKeep = None,
    delta: EstimatorDelta = 0.1,
    samples: EstimatorSamples = 8,
    router: EstimatorRouter = None,
    data: EstimatorData = None,
    weights: Weights = None,
    seed: EstimatorSeed = 0,
    threads: TorchCpuThreads = None,
    min_agreement: EstimatorMinAgreement = None,
    beat_baseline: EstimatorBeatBaseline = False,
    report: EstimatorReport = None,
    json_out: JsonReport = False,
    quiet: Quiet = False,
) -> int:
    import json

    import torch

    from shiva_export.cli._exit_codes import ExitCode
    from shiva_export.utils.io import atomic_write_text
    from shiva_export.validate.estimator import check_estimator

    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        from shiva_export.errors import ConfigError

        raise ConfigError(f"--min-agreement {min_agreement} is out of range; expected 0..1.")
    if report is not None:
        from shiva_export.utils.io import check_writable

        check_writable(report, "--report")
    if threads:
        torch.set_num_threads(threads)
    ests = estimator or ["output-gated", "residual"]
    with stages(enabled=not (quiet or json_out)) as advance:
        rep = check_estimator(
            recipe or model,
            estimators=ests,
            keeps=keep or (0.4, 0.6, 0.8),
            delta=delta,
            samples=samples,
            router=router,
            data=data,
            weights=weights,
            seed=seed,
            progress=advance,
        )
    if report is not None:
        atomic_write_text(report, rep.to_markdown())
        atomic_write_text(report.with_suffix(".json"), json.dumps(rep.to_dict(), indent=2) + "\n")
    result_json(rep.to_dict()) if json_out else result_text(rep.to_markdown())
    failed = False
    if min_agreement is not None and rep.agreement(ests[0]) < min_agreement:
        warning(f"{ests[0]} sign agreement {rep.agreement(ests[0]):.0%} is below --min-agreement {min_agreement:.0%}.")
        failed = True
    if beat_baseline and not rep.beats_baseline(ests[0]):
        b = rep.baseline(ests[0])
        warning(
            f"{ests[0]} does not beat a constant estimator: rank agreement {rep.rank_agreement(ests[0]):+.2f} (constant 0), magnitude error "
            f"{rep.magnitude_error(ests[0]):.2f} (constant {b['magnitude_error']:.2f})."
        )
        failed = True
    return ExitCode.VALIDATION_FAILED if failed else ExitCode.OK
