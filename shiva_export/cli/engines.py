"""``shiva-export trt`` (engines per budget), ``inspect`` (TensorRT pre-flight) and ``run`` (run an engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import JsonSummary, LoraScale, Quiet, RecipeFile
from shiva_export.cli._output import result_json, result_text, stages

TRT_HELP = (
    "Build one TensorRT / TensorRT-RTX engine per budget (plus the dense reference, ratio 0) with manifests "
    "and a cache. --ratio is the FRACTION OF IMAGE TOKENS PRUNED per routed block (repeatable; 0.4 keeps 60%)."
)
TRT_EPILOG = """Examples:

  shiva-export trt --model sd35-tiny --ratio 0.2 --ratio 0.4 --ratio 0.6 --backend tensorrt-rtx

  shiva-export trt --model sd35 --weights ./sd35m --ratio 0.4 --dtype fp16 --timing-cache tc.cache

  shiva-export trt --onnx engines/sd35/ratio0.40/fp16/model.onnx --backend tensorrt

  shiva-export trt --onnx xl/model.onnx --backend tensorrt-rtx --segments 2   # 8 B on a 24 GB machine

  shiva-export trt --model sd35-tiny --size 256x256 --size 256x192 --phases --backend tensorrt-rtx

Engines go to <out-dir>/<model>/ratio<r>/<dtype>/{model.onnx, model.plan, manifest.json} (with --size, in
<out-dir>/<model>/<W>x<H>/ratio<r>/...; with --phases, phase-<name>/ in place of ratio<r>/); with --segments N,
segments.json + manifest.json there and one engine per segment in seg<i>of<N>/ (the segment ONNX files, which
reference the export's weights, go beside the export). A budget whose
inputs all hash the same as its manifest is skipped (--force rebuilds). A missing backend module exits 4.
"""
INSPECT_HELP = "Pre-flight an ONNX for TensorRT: list every construct the backend will not build (node, problem, fix)."
RUN_HELP = "Run a built engine on seeded inputs on a CUDA GPU and print output statistics (exit 4 without a GPU)."


TrtModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model name (sd35, sd3, sd35-large, flux-dev, flux-schnell; offline: sd35-tiny, sd3-tiny, sd3-mid, flux-tiny). Default: sd35, or the --onnx graph's.",
    ),
]
TrtRatio = Annotated[
    list[float] | None,
    typer.Option(
        "--ratio",
        "-r",
        help="Fraction of image tokens PRUNED per routed block, in [0, 1); repeat for several engines. 0 = dense reference. Default: the recipe's ratios.",
    ),
]
TrtOnnx = Annotated[
    Path | None,
    typer.Option("--onnx", help="Build this existing export (from `shiva-export onnx`) instead of exporting."),
]
TrtWeights = Annotated[
    Path | None, typer.Option("--weights", help="Local diffusers folder with the transformer weights.")
]
TrtRouter = Annotated[Path | None, typer.Option("--router", help="Router weights (.safetensors).")]
TrtBackend = Annotated[str, typer.Option("--backend", help="auto | tensorrt | tensorrt-rtx (auto prefers tensorrt).")]
TrtDtype = Annotated[
    str, typer.Option("--dtype", help="fp32 | fp16 | bf16: the ONNX dtype; engines are strongly typed.")
]
TrtHeight = Annotated[int | None, typer.Option("--height", help="Image height in pixels (multiple of 16).")]
TrtWidth = Annotated[int | None, typer.Option("--width", help="Image width in pixels (multiple of 16).")]
TrtSize = Annotated[
    list[str] | None,
    typer.Option(
        "--size",
        help="Resolution bucket WIDTHxHEIGHT, repeatable: every engine once per size, in <out-dir>/<model>/<W>x<H>/. Default: the recipe's [[buckets]], else one size.",
    ),
]
TrtPhases = Annotated[
    bool,
    typer.Option(
        "--phases",
        help="One engine per learned phase of the recipe's [[schedule.phases]] (phase-<name>/<dtype>/), the layout `generate --backend trt --phases` reads; instead of --ratio.",
    ),
]
TrtBatch = Annotated[int | None, typer.Option("--batch", help="Prompts per call (CFG doubles the model batch).")]
TrtCfg = Annotated[
    bool | None, typer.Option("--cfg/--no-cfg", help="Batch holds uncond+cond halves sharing kept tokens.")
]
TrtDynamicBatch = Annotated[
    bool,
    typer.Option("--dynamic-batch", help="Symbolic batch with an optimization profile (see --batch-min/--batch-max)."),
]
TrtBatchMin = Annotated[
    int | None, typer.Option("--batch-min", help="Profile min prompts (with --dynamic-batch; default 1).")
]
TrtBatchMax = Annotated[int | None, typer.Option("--batch-max", help="Profile max prompts (default 4 x --batch).")]
TrtTimingCache = Annotated[
    Path | None, typer.Option("--timing-cache", help="Timing cache file shared by every budget of this command.")
]
TrtWorkspace = Annotated[int | None, typer.Option("--workspace", help="Builder workspace limit in MiB.")]
TrtOptLevel = Annotated[int | None, typer.Option("--opt-level", help="Builder optimization level 0-5 (default 3).")]
TrtAotTarget = Annotated[
    list[str] | None,
    typer.Option("--aot-target", help="TensorRT-RTX compute capability to build for (repeatable, e.g. 8.9)."),
]
TrtStripWeights = Annotated[
    bool,
    typer.Option(
        "--strip-weights",
        help="Weight-stripped, refittable engine (STRIP_PLAN): the plan holds no weights and is refit from its ONNX when loaded. For 8-12 B models.",
    ),
]
TrtSegments = Annotated[
    int | None,
    typer.Option(
        "--segments",
        help="Build each budget as a chain of N segment engines cut at block boundaries (equal weight bytes): the builder's peak "
        "memory is one segment's. For 8-12 B models on small machines. Fixed shapes only. Default: reuse the cached engine or "
        "chain, else one engine.",
    ),
]
TrtOutDir = Annotated[Path, typer.Option("--out-dir", help="Root folder for engines.")]
TrtNoDense = Annotated[bool, typer.Option("--no-dense", help="Skip the dense reference engine (ratio 0).")]
TrtForce = Annotated[bool, typer.Option("--force", help="Rebuild even when the cache matches.")]
TrtValidate = Annotated[
    bool, typer.Option("--validate/--no-validate", help="ORT parity after each new export (exit 3 on failure).")
]
TrtLora = Annotated[
    list[Path] | None,
    typer.Option(
        "--lora",
        help="LoRA in the diffusers format (.safetensors, or the folder save_lora_weights wrote); repeatable. Fused at its --lora-scale before pruning and export (with --strip-weights a change refits the engine instead of rebuilding it); its sha256 and scale go into the metadata and cache keys.",
    ),
]
TrtControlnet = Annotated[
    str | None,
    typer.Option(
        "--controlnet",
        help="SD3/SD3.5 ControlNet (folder or cached hub id): the graph also takes its block residuals as inputs controlnet_block_<i> (for generate --backend trt --controlnet --artifact).",
    ),
]


def trt_command(
    model: TrtModel = None,
    ratio: TrtRatio = None,
    onnx: TrtOnnx = None,
    weights: TrtWeights = None,
    recipe: RecipeFile = None,
    router: TrtRouter = None,
    backend: TrtBackend = "auto",
    dtype: TrtDtype = "fp32",
    height: TrtHeight = None,
    width: TrtWidth = None,
    size: TrtSize = None,
    phases: TrtPhases = False,
    batch: TrtBatch = None,
    cfg: TrtCfg = None,
    dynamic_batch: TrtDynamicBatch = False,
    batch_min: TrtBatchMin = None,
    batch_max: TrtBatchMax = None,
    timing_cache: TrtTimingCache = None,
    workspace: TrtWorkspace = None,
    opt_level: TrtOptLevel = None,
    aot_target: TrtAotTarget = None,
    strip_weights: TrtStripWeights = False,
    segments: TrtSegments = None,
    out_dir: TrtOutDir = Path("engines"),
    no_dense: TrtNoDense = False,
    force: TrtForce = False,
    validate: TrtValidate = True,
    lora: TrtLora = None,
    lora_scale: LoraScale = None,
    controlnet: TrtControlnet = None,
    json_out: JsonSummary = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.export.lora import resolve_loras
    from shiva_export.runtime.controlnet import controlnet_num_layers

    if dtype not in ("fp32", "fp16", "bf16"):
        raise typer.BadParameter(f"{dtype!r} is not one of fp32, fp16, bf16.", param_hint="--dtype")
    check_trt_flags(
        model=model,
        onnx=onnx,
        ratio=ratio,
        workspace=workspace,
        opt_level=opt_level,
        aot_target=aot_target,
        dynamic_batch=dynamic_batch,
        batch_min=batch_min,
        batch_max=batch_max,
        batch=batch,
        height=height,
        width=width,
        cfg=cfg,
        out_dir=out_dir,
    )
    if (lora or controlnet is not None) and onnx is not None:
        raise typer.BadParameter(
            "--lora and --controlnet act at export; an existing --onnx is built as it is. Export it with `onnx --lora/--controlnet`.",
            param_hint="--onnx",
        )
    loras = resolve_loras(lora, lora_scale)  # before any export: a count mismatch or missing file is one line
    cn_layers = controlnet_num_layers(controlnet) if controlnet is not None else 0
    from shiva_export.engines.budgets import build_engines  # torch, onnx: only once the options are known to be good

    b = batch or 1
    batch_range = (batch_min or 1, b, batch_max or max(4 * b, 2)) if dynamic_batch else None
    with stages(enabled=not (quiet or json_out)) as advance:
        results = build_engines(
            model=model,
            recipe=recipe,
            weights=weights,
            router=router,
            ratios=ratio,
            dense=not no_dense,
            onnx=onnx,
            backend=backend,
            dtype=dtype,
            height=height,
            width=width,
            batch=batch,
            cfg=cfg,
            dynamic_batch=dynamic_batch,
            batch_range=batch_range,
            timing_cache=timing_cache,
            workspace_bytes=workspace * (1 << 20) if workspace else None,
            optimization_level=opt_level,
            aot_targets=aot_target,
            strip_weights=strip_weights,
            segments=segments,
            out_dir=out_dir,
            force=force,
            validate=validate,
            progress=advance,
            sizes=size,
            phases=phases,
            loras=loras,
            controlnet_layers=cn_layers,
        )
    rows = [r.to_dict() for r in results]
    if json_out:
        result_json({"engines": rows})
    else:
        result_text(_table(rows))
    return ExitCode.OK


def _check_aot_targets(targets) -> None:
    """A well-formed --aot-target that TensorRT-RTX has no target for (99.9) is refused before the export, when
    tensorrt_rtx is installed to ask (without it the build reports its own missing package)."""
    if not targets:
        return
    try:
        import tensorrt_rtx
    except ImportError:
        return
    from shiva_export.engines.builder import compute_capability
    from shiva_export.errors import ConfigError

    for t in targets:
        try:
            compute_capability(tensorrt_rtx, t)
        except ConfigError as err:
            raise ConfigError(f"--aot-target {t}: {err}") from None


def check_trt_flags(
    *,
    model,
    onnx,
    ratio,
    workspace,
    opt_level,
    aot_target,
    dynamic_batch,
    batch_min,
    batch_max,
    batch,
    height,
    width,
    cfg,
    out_dir,
) -> None:
    """Every trt option, before any export or backend import (each used to be refused only after the dense export)."""
    from shiva_export.checks import check_build_options, check_model_name, check_out_dir, check_sizes
    from shiva_export.errors import ConfigError
    from shiva_export.export.onnx import read_shiva_metadata

    check_model_name(model)
    check_build_options(
        workspace_mib=workspace,
        opt_level=opt_level,
        aot_targets=aot_target,
        dynamic_batch=dynamic_batch,
        batch_min=batch_min,
        batch_max=batch_max,
        batch=batch,
    )
    check_sizes(batch=batch, height=height, width=width, dynamic_batch=dynamic_batch, cfg=cfg)
    check_out_dir(out_dir, "--out-dir")
    _check_aot_targets(aot_target)
    if onnx is None:
        return
    if ratio:
        raise ConfigError(
            f"--onnx {onnx} is built as exported, so --ratio {', '.join(map(str, ratio))} would be ignored; drop --ratio (or drop --onnx to export that ratio)."
        )
    got = read_shiva_metadata(onnx, what="--onnx").get("model")
    if got is not None:
        from shiva_export.utils.io import safe_component

        safe_component(got, f"--onnx {onnx}: shiva.model")  # it names the output folder
    if model is not None and got is not None and got != model:
        raise ConfigError(
            f"--model {model} but --onnx {onnx} is a graph of model {got!r}; drop --model (the graph decides) or pass --model {got}."
        )


def _table(rows: list[dict]) -> str:
    head = f"{'budget':<22} {'k per block':<24} {'build s':>8} {'engine MB':>10} {'status':<7} runnable here"
    lines = [head, "-" * len(head)]
    for r in rows:
        ks = sorted(set(r["per_block_k"].values()))
        kdesc = "dense" if r["dense"] else (str(ks[0]) if len(ks) == 1 else ",".join(map(str, ks)))
        budget = (
            "dense (r=0)"
            if r["dense"]
            else f"phase {r['phase']}"
            if r.get("phase")
            else f"r={r['ratio']:g} keep={r['keep_ratio']:g}"
        )
        budget = f"{r['bucket']} {budget}" if r.get("bucket") else budget
        bs = f"{r['build_seconds']:.2f}" if r["build_seconds"] is not None else "-"
        mb = f"{r['engine_mb']:.2f}" if r["engine_mb"] is not None else "-"
        de = r.get("deserialize") or {}
        runnable = "yes" if de.get("deserialized") else ("no GPU: plan + manifest checked" if de else "-")
        lines.append(f"{budget:<22} {kdesc:<24} {bs:>8} {mb:>10} {r['status']:<7} {runnable}")
        lines.append(f"  {r['plan']}")
    return "\n".join(lines)


InspectOnnxPath = Annotated[Path, typer.Argument(help="ONNX model to check.")]
InspectBackend = Annotated[str, typer.Option("--backend", help="tensorrt | tensorrt-rtx.")]
InspectBackendVersion = Annotated[
    str | None,
    typer.Option("--backend-version", help="Backend version to check against (default: installed one, else unknown)."),
]
InspectProfile = Annotated[
    bool, typer.Option("--profile-given", help="Treat dynamic inputs as covered by an optimization profile.")
]
InspectJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]


def inspect_command(
    onnx_path: InspectOnnxPath,
    backend: InspectBackend = "tensorrt",
    backend_version: InspectBackendVersion = None,
    profile: InspectProfile = False,
    json_out: InspectJson = False,
) -> int:
    from shiva_export.engines.preflight import format_report, preflight

    if not onnx_path.is_file():
        raise typer.BadParameter(f"{onnx_path} does not exist.", param_hint="ONNX_PATH")
    import re

    if backend_version is not None and not re.fullmatch(r"\d+(\.\d+){0,3}", backend_version.strip()):
        raise typer.BadParameter(
            f"{backend_version!r} is not a version; expected digits and dots, e.g. 10.13.3 or 1.2.0.",
            param_hint="--backend-version",
        )
    version = backend_version
    if version is None:
        try:
            from shiva_export.engines.builder import resolve_backend

            version = resolve_backend(backend).version
        except Exception:  # backend not installed: check against the conservative rules
            version = None
    from shiva_export.checks import check_onnx_external_data

    check_onnx_external_data(onnx_path)
    report = preflight(onnx_path, backend, backend_version=version, profile_given=profile)
    if json_out:
        result_json(report.to_dict())
    else:
        result_text(format_report(report))
    return ExitCode.OK if report.ok else ExitCode.ERROR


RunEngine = Annotated[Path, typer.Argument(help="model.plan or an engines/<model>/<budget>/<dtype>/ folder.")]
RunSeed = Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")]
RunIterations = Annotated[int, typer.Option("--iterations", help="Timed runs after 3 warm-ups.")]
RunJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def run_command(
    engine: RunEngine,
    seed: RunSeed = 0,
    iterations: RunIterations = 10,
    json_out: RunJson = False,
) -> int:
    import statistics

    from shiva_export.checks import check_seed

    check_seed(seed)
    if iterations < 1:
        raise typer.BadParameter(f"{iterations} must be >= 1.", param_hint="--iterations")
    import torch

    from shiva_export.engines.runner import EngineRunner

    with EngineRunner(engine) as runner:
        g = torch.Generator(device="cpu").manual_seed(seed)
        feed = {}
        for name, shape in runner.manifest.input_shapes.items():
            t = torch.rand(shape, generator=g) * 1000.0 if name == "timestep" else torch.randn(shape, generator=g)
            feed[name] = t
        times = []
        for i in range(3 + iterations):
            outs = runner.infer(dict(feed))
            if i >= 3:
                times.append(runner.inference_time * 1e3)
        res = {
            "engine": str(runner.plan_path),
            "gpu": torch.cuda.get_device_name(),
            "median_ms": statistics.median(times),
            "outputs": {
                k: {"shape": list(v.shape), "mean": float(v.float().mean()), "std": float(v.float().std())}
                for k, v in outs.items()
            },
        }
    result_json(res) if json_out else result_text(
        f"{res['engine']} on {res['gpu']}: median {res['median_ms']:.3f} ms; outputs {res['outputs']}"
    )
    return ExitCode.OK
