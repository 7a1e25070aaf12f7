"""``shiva-export validate parity|speed|suite``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._output import result_json, result_text, stages, warning

validate_app = typer.Typer(
    help=(
        "Prove parity (PyTorch vs ONNX Runtime vs engines) and measure speed (dense vs pruned vs the ideal FLOP "
        "ratio). --ratio is the FRACTION OF IMAGE TOKENS PRUNED per routed block (0.4 keeps 60%)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

PARITY_EPILOG = """Examples:

  shiva-export validate parity --model sd35-tiny --ratio 0 --ratio 0.2 --ratio 0.4 --ratio 0.6

  shiva-export validate parity --onnx engines/sd35/ratio0.40/fp16/model.onnx --router router.safetensors --report parity.md

Ends with a greppable 'PASSED | ...' or 'FAILED | ...' line; exit 3 when a comparison fails.
"""


@validate_app.command("parity", epilog=PARITY_EPILOG)
def parity_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (sd35, sd3, sd35-large, sd35-tiny, sd3-tiny, sd3-mid).")] = "sd35",
    ratio: Annotated[list[float] | None, typer.Option("--ratio", "-r", help="Fraction of image tokens PRUNED per routed block (repeatable). Default: the recipe's ratios.")] = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="Validate this existing export (ratio, shapes and dtype from its metadata).")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local diffusers folder.")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe TOML override.")] = None,
    router: Annotated[Path | None, typer.Option("--router", help="Router safetensors for the PyTorch reference.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Export dtype for fresh exports: fp32 | fp16 | bf16.")] = "fp32",
    backend: Annotated[list[str] | None, typer.Option("--backend", help="ort-cpu | ort-cuda | engine (repeatable). Default: ort-cpu, + ort-cuda when it really runs on CUDA, + engine with --engines-dir.")] = None,
    engines_dir: Annotated[Path | None, typer.Option("--engines-dir", help="Root of `shiva-export trt` outputs, to compare engines too (needs a GPU).")] = None,
    cases: Annotated[int, typer.Option("--cases", help="Seeded inputs per budget, 1..8 (includes t=1 and t=999).")] = 4,
    height: Annotated[int | None, typer.Option("--height", help="Image height in pixels.")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Image width in pixels.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Prompts per call.")] = None,
    cfg: Annotated[bool | None, typer.Option("--cfg/--no-cfg", help="CFG batch (uncond+cond halves).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write a Markdown report here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> int:
    from shiva_export.validate.compare import validate_parity

    with stages(enabled=not (quiet or json_out)) as advance:
        rep = validate_parity(
            model=model, recipe=recipe, weights=weights, router=router, onnx=onnx, ratios=ratio, dtype=dtype, backends=backend,
            engines_dir=engines_dir, cases=cases, height=height, width=width, batch=batch, cfg=cfg, report_md=report, progress=advance,
        )
    for s in rep.skipped:
        warning(f"skipped: {s}")
    if json_out:
        result_json(rep.to_dict())
    else:
        result_text(rep.to_markdown().split("\n", 2)[2])
    return ExitCode.OK if rep.passed else ExitCode.VALIDATION_FAILED
