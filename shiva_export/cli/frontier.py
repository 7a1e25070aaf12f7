"""``shiva-export validate frontier``: every acceleration family on one compute axis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import CfgScale, Quiet, TorchCpuThreads, TrainedRecipe
from shiva_export.cli._output import result_json, result_text, stages

HELP = (
    "Which acceleration to deploy: dense at fewer steps, diffusers' caches (FirstBlockCache, TaylorSeer, MagCache), Shiva "
    "(uniform, learned) and their stacks, on the same prompts and seeds, against transformer FLOPs actually executed and "
    "latency; paired tests (McNemar, bootstrap) mark what is significant. --keep is the FRACTION OF IMAGE TOKENS KEPT."
)
EPILOG = """Examples:

  shiva-export validate frontier --model sd35-shapes --prompts 96 --seed 2 --seed 3 --seed 4 --out-dir validate/reports/frontier

  shiva-export validate frontier --model sd35-tiny --prompts 4 --out-dir /tmp/frontier      (PSNR and SSIM vs dense)

Writes frontier.md (best configuration per compute level and family, every row with its CI), frontier.png
(quality vs FLOPs and vs latency, one line per family and the overall frontier) and frontier.json (`rows`: family,
config, steps, flops_per_image, latency_ms, accuracy, fd, psnr, ssim, frontier). With a judge (sd35-shapes) the
primary quality is prompt accuracy; otherwise PSNR against the dense reference at the recipe's steps.
"""


Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Any model with a pipeline (sd35-shapes has the judge; sd35-tiny, flux-tiny, pixart-tiny, ...).",
    ),
]
Weights = Annotated[Path | None, typer.Option("--weights", help="Local diffusers pipeline folder.")]
Prompts = Annotated[int, typer.Option("--prompts", help="Prompts of the fixed caption order, 1..96.")]
Seed = Annotated[
    list[int] | None,
    typer.Option("--seed", help="Seeds per prompt (repeatable); tests pair over (prompt, seed). Default 0."),
]
Steps = Annotated[int | None, typer.Option("--steps", help="The reference's sampler steps (default: the recipe's).")]
DenseSteps = Annotated[
    list[int] | None,
    typer.Option("--dense-steps", help="Step grid of the dense family (repeatable). Default: fractions of --steps."),
]
Keep = Annotated[
    list[float] | None,
    typer.Option(
        "--keep", help="FRACTION OF IMAGE TOKENS KEPT of the uniform Shiva rows (repeatable). Default 0.8 0.6 0.4."
    ),
]
Family = Annotated[
    list[str] | None, typer.Option("--family", help="dense | cache | shiva | stack (repeatable). Default: all.")
]
Ort = Annotated[
    bool, typer.Option("--ort/--no-ort", help="Include the ONNX Runtime stack row (exports one graph on first use).")
]
LatencyRepeats = Annotated[
    int, typer.Option("--latency-repeats", help="Interleaved timing rounds (0: the median of the generation calls).")
]
OutDir = Annotated[Path, typer.Option("--out-dir", help="Write frontier.json, frontier.md and frontier.png here.")]
ArtifactRoot = Annotated[
    Path, typer.Option("--artifact-root", help="Cache folder of the ONNX Runtime row's exported graph (as generate).")
]
JsonRows = Annotated[bool, typer.Option("--json", help="Print one JSON object with `rows` on stdout.")]


def frontier_command(
    model: Model = "sd35-shapes",
    recipe: TrainedRecipe = None,
    weights: Weights = None,
    prompts: Prompts = 24,
    seed: Seed = None,
    steps: Steps = None,
    dense_steps: DenseSteps = None,
    keep: Keep = None,
    family: Family = None,
    ort: Ort = True,
    guidance: CfgScale = None,
    threads: TorchCpuThreads = 1,
    latency_repeats: LatencyRepeats = 3,
    out_dir: OutDir = Path("validate/reports/frontier"),
    artifact_root: ArtifactRoot = Path("engines"),
    json_out: JsonRows = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.checks import check_model_name, check_number, check_out_dir
    from shiva_export.utils.io import folder_lock
    from shiva_export.validate.frontier import validate_frontier
    from shiva_export.validate.quality import json_safe

    check_model_name(model)
    check_out_dir(out_dir, "--out-dir")
    check_number(steps, "--steps", 1, example="14")
    check_number(guidance, "--guidance", 0, example="2.0")
    for n in dense_steps or []:
        check_number(n, "--dense-steps", 1, example="8")
    with (
        folder_lock(out_dir, "--out-dir"),
        stages(enabled=not (quiet or json_out)) as advance,
    ):  # one writer per report folder
        rep = validate_frontier(
            model=model,
            recipe=recipe,
            weights=weights,
            prompts=prompts,
            seeds=seed or (0,),
            steps=steps,
            guidance=guidance,
            dense_steps=dense_steps,
            keeps=keep,
            families=family,
            ort=ort,
            threads=threads,
            latency_repeats=latency_repeats,
            out_dir=out_dir,
            artifact_root=artifact_root,
            progress=advance,
        )
    result_json(json_safe(rep.to_dict())) if json_out else result_text(rep.to_markdown() + f"\nreports: {out_dir}")
    return ExitCode.OK
