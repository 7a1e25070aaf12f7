"""``shiva-export onnx``: prune, export to ONNX, check ONNX Runtime parity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import JsonSummary, LoraScale, Quiet, RecipeFile, TransformerWeights
from shiva_export.cli._output import result_json, result_text, stages, warning

HELP = (
    "Prune a SD3/SD3.5 transformer with a static Shiva budget, export it to ONNX, and check parity against "
    "PyTorch in ONNX Runtime (CPU). --ratio is the FRACTION OF IMAGE TOKENS PRUNED per routed block "
    "(--ratio 0.4 keeps 60%)."
)
EPILOG = """Examples:

  shiva-export onnx --model sd35-tiny --ratio 0.4 --json

  shiva-export onnx --model sd35 --weights ./sd35m/transformer --ratio 0.4 --height 1024 --width 1024

  shiva-export onnx --model sd35-tiny --ratio 0.4 --lora style.safetensors --lora-scale 0.8

  shiva-export onnx --recipe my.toml --router router.safetensors --dtype fp16 --out out/model.onnx

Exit codes: 0 ok, 1 error, 2 bad option value, 3 parity failed, 4 missing dependency/hardware.
"""

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model name: sd35 (SD3.5-Medium), sd3, sd35-large, flux-dev, flux-schnell, or the offline sd35-tiny / sd3-tiny / sd3-mid / flux-tiny.",
    ),
]
Ratio = Annotated[
    float | None,
    typer.Option(
        "--ratio",
        "-r",
        help="Fraction of image tokens PRUNED in each routed block, in [0, 1): 0.4 keeps 60% (k = floor(N * 0.6)). Default: the recipe's first ratio.",
    ),
]
Router = Annotated[
    Path | None,
    typer.Option("--router", help="Router weights (.safetensors). Default: the recipe's, else a seeded random router."),
]
Height = Annotated[
    int | None, typer.Option("--height", help="Image height in pixels (multiple of 16). Default: recipe.")
]
Width = Annotated[int | None, typer.Option("--width", help="Image width in pixels (multiple of 16). Default: recipe.")]
Size = Annotated[
    list[str] | None,
    typer.Option(
        "--size",
        help="Resolution bucket WIDTHxHEIGHT, repeatable: one graph per size in engines/<model>/<W>x<H>/... Default: the recipe's [[buckets]], else one size.",
    ),
]
Batch = Annotated[
    int | None, typer.Option("--batch", help="Prompts per call; with --cfg the model batch is 2x. Default: recipe.")
]
TextLen = Annotated[int | None, typer.Option("--text-len", help="Text tokens (SD3: 333). Default: recipe.")]
Cfg = Annotated[
    bool | None,
    typer.Option("--cfg/--no-cfg", help="Batch holds uncond+cond halves that share kept tokens. Default: recipe."),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="fp32 or fp16 (bf16 is refused: ONNX has no bfloat16 Conv/Einsum; run bf16 with generate --backend torch).",
    ),
]
Opset = Annotated[
    int | None, typer.Option("--opset", help="ONNX opset 17..22 (default 20: newest TensorRT 10.x parses).")
]
DynamicBatch = Annotated[
    bool, typer.Option("--dynamic-batch", help="Export a symbolic batch axis (default: fixed shapes).")
]
Context = Annotated[
    str | None,
    typer.Option(
        "--context",
        help="keep | drop: whether rejected tokens still give keys and values in routed blocks (SD3/SD3.5; output folder ratio<r>-context-keep). Default: the recipe's [prune] context (drop).",
    ),
]
Phase = Annotated[
    str | None,
    typer.Option(
        "--phase",
        help="Export a learned phase (name or index) of the recipe's [[schedule.phases]] instead of a uniform --ratio.",
    ),
]
Out = Annotated[
    Path | None, typer.Option("--out", "-o", help="ONNX path. Default: engines/<model>/ratio<r>/<dtype>/model.onnx.")
]
DebugOutputs = Annotated[
    bool, typer.Option("--debug-outputs", help="Also output each routed block's kept indices (kept_indices.<block>).")
]
Validate = Annotated[
    bool, typer.Option("--validate/--no-validate", help="Check ONNX Runtime parity after export (exit 3 on failure).")
]
ParityCases = Annotated[int, typer.Option("--parity-cases", help="Seeded input cases for parity, 1..8.")]
Bounded = Annotated[
    bool | None,
    typer.Option(
        "--bounded/--eager",
        help="Bounded memory (trace with fake weights, write them one at a time; peak RSS below the bytes written) or eager "
        "loading of the whole model. Default: bounded wherever the weights can be read lazily (embedded models, safetensors folders).",
    ),
]
Lora = Annotated[
    list[Path] | None,
    typer.Option(
        "--lora",
        help="LoRA in the diffusers format (.safetensors, or the folder save_lora_weights wrote); repeatable. Fused at its --lora-scale before pruning and export; its sha256 and scale go into the metadata and cache keys.",
    ),
]
Controlnet = Annotated[
    str | None,
    typer.Option(
        "--controlnet",
        help="SD3/SD3.5 ControlNet (folder or cached hub id): the graph also takes its block residuals as inputs controlnet_block_<i> (for generate --controlnet --artifact).",
    ),
]


def onnx_command(
    model: Model = "sd35",
    ratio: Ratio = None,
    weights: TransformerWeights = None,
    recipe: RecipeFile = None,
    router: Router = None,
    height: Height = None,
    width: Width = None,
    size: Size = None,
    batch: Batch = None,
    text_len: TextLen = None,
    cfg: Cfg = None,
    dtype: Dtype = "fp32",
    opset: Opset = None,
    dynamic_batch: DynamicBatch = False,
    context: Context = None,
    phase: Phase = None,
    out: Out = None,
    debug_outputs: DebugOutputs = False,
    validate: Validate = True,
    parity_cases: ParityCases = 3,
    bounded: Bounded = None,
    lora: Lora = None,
    lora_scale: LoraScale = None,
    controlnet: Controlnet = None,
    json_out: JsonSummary = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.export.buckets import bucket_sizes
    from shiva_export.recipe import load_recipe

    if dtype not in ("fp32", "fp16", "bf16"):
        raise typer.BadParameter(f"{dtype!r} is not one of fp32, fp16, bf16.", param_hint="--dtype")
    if context not in (None, "keep", "drop"):
        raise typer.BadParameter(f"{context!r} is not one of keep, drop.", param_hint="--context")
    from shiva_export.checks import check_model_name, check_sizes
    from shiva_export.utils.io import check_regular_target, folder_lock

    check_model_name(model)
    if (
        out is not None and os.path.lexists(out) and not out.is_dir()
    ):  # a device, FIFO or socket at --out: refused before
        check_regular_target(out, "--out")  # minutes of export (a FIFO would hang it); folders get the writer's message
    check_sizes(batch=batch, text_len=text_len, height=height, width=width, dynamic_batch=dynamic_batch, cfg=cfg)
    from shiva_export.export.lora import resolve_loras
    from shiva_export.runtime.controlnet import controlnet_num_layers

    loras = resolve_loras(lora, lora_scale)  # before minutes of loading: a count mismatch or missing file is one line
    cn_layers = controlnet_num_layers(controlnet) if controlnet is not None else 0
    rec = load_recipe(recipe if recipe is not None else model)
    buckets = bucket_sizes(rec, size, height, width)
    if buckets is not None and len(buckets) > 1 and out is not None:
        raise typer.BadParameter(
            f"{len(buckets)} sizes make {len(buckets)} graphs, which cannot share one --out path; drop --out.",
            param_hint="--out",
        )
    results = []
    from shiva_export.export.pruned import export_pruned  # torch, diffusers: only once the options are known to be good

    lock_dir = out.parent if out is not None else Path("engines")  # two exports into one folder: the second is refused
    with folder_lock(lock_dir, "ONNX output folder"):
        for w_h in buckets or [None]:
            with stages(enabled=not (quiet or json_out)) as advance:
                results.append(
                    _export_one(
                        export_pruned,
                        rec,
                        w_h,
                        advance,
                        weights=weights,
                        ratio=ratio,
                        height=height,
                        width=width,
                        batch=batch,
                        text_len=text_len,
                        cfg=cfg,
                        dtype=dtype,
                        opset=opset,
                        out=out,
                        router=router,
                        dynamic_batch=dynamic_batch,
                        phase=phase,
                        debug_outputs=debug_outputs,
                        validate=validate,
                        parity_cases=parity_cases,
                        bounded=bounded,
                        context=context,
                        loras=loras,
                        controlnet_layers=cn_layers,
                    )
                )
    summaries = [res.to_dict() for res in results]
    if json_out:
        result_json(summaries[0] if len(summaries) == 1 else {"exports": summaries})
    else:
        result_text("\n\n".join(format_summary(s) for s in summaries))
    code = ExitCode.OK
    for res in results:
        if res.parity is not None:
            if res.parity.status == "skipped":
                warning(res.parity.summary_line())
            elif not res.parity.passed:
                code = ExitCode.VALIDATION_FAILED
    return code


def _export_one(export_pruned, rec, w_h, advance, **kw):
    """One export; a bucket's (width, height) overrides the size and puts the default path in its folder."""
    if w_h is not None:
        kw.update(width=w_h[0], height=w_h[1])
    return export_pruned(recipe=rec, bucket=w_h is not None, progress=advance, **kw)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_summary(s: dict) -> str:
    ks = sorted(set(s["k_per_block"].values())) or [s["num_image_tokens"]]
    k_desc = ", ".join(f"{b}:{k}" for b, k in s["k_per_block"].items())
    lines = [
        f"model        {s['model']}  ({s['recipe']})",
        f"budget       ratio {s['ratio']:g} pruned = keep {s['keep_ratio']:g}; N = {s['num_image_tokens']} image tokens; "
        f"k = {ks[0] if len(ks) == 1 else ks} ({len(s['k_per_block'])} routed blocks)"
        + (f"; context {s['context']} (rejected tokens give keys/values)" if s.get("context") == "keep" else ""),
        f"k per block  {k_desc or '(dense: no routed block)'}",
        "shapes       " + ", ".join(f"{k} {v}" for k, v in s["shapes"].items()) + f"  (cfg {s['cfg']})",
        f"onnx         {s['onnx']}  {_mb(s['onnx_bytes'])}"
        + (f" + external data {_mb(s['external_data_bytes'])}" if s["external_data"] else "")
        + f"  opset {s['opset']}, {s['dtype']}, {s['num_nodes']} nodes",
        "ops          " + ", ".join(f"{k} {v}" for k, v in s["op_counts"].items()),
        f"router       {s['router']['source']}  ({s['router']['num_routers']} routers, {s['router']['parameters']} params"
        + (f", sha256 {s['router']['tensor_sha256'][:12]})" if s["router"]["tensor_sha256"] else ")"),
        f"time         load {s['load_seconds']:.1f} s, export {s['export_seconds']:.1f} s",
    ]
    p = s.get("parity")
    if p:
        if p["status"] == "skipped":
            lines.append(f"parity       SKIPPED | {p['reason']}")
        else:
            for c in p["cases"]:
                o = c["output"]
                idx = min(c["index_agreement"].values()) if c["index_agreement"] else 1.0
                lines.append(
                    f"  seed {c['seed']} t={c['timestep'] if c['timestep'] is not None else 'rand'}: max_abs {o['max_abs']:.3g} "
                    f"mean_abs {o['mean_abs']:.3g} max_rel {o['max_rel']:.3g} cos {o['cosine']:.8f} kept-index overlap {idx:.1%}"
                )
            tag = "PASSED" if p["passed"] else "FAILED"
            worst = f"worst {p['worst_output']} max_abs={p['worst_max_abs']:.3g} cos={p['worst_cosine']:.8f}"
            lines.append(
                f"{tag} | parity vs PyTorch fp32 ({p['provider']}, {p['dtype']}) | {worst} | kept-index overlap {p['index_agreement']:.1%}"
                + ("" if p["passed"] else f" | {p['reason']}")
            )
    else:
        lines.append("parity       not run (--no-validate)")
    return "\n".join(lines)
