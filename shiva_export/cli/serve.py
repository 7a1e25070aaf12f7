"""``shiva-export serve``: the pruned pipeline behind HTTP on Ray Serve (replicas, batching, autoscaling, health)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import ArtifactRoot, PipelineBackend, PipelineRouter, Provider, Quiet, RecipeFile
from shiva_export.cli._output import err_console, result_text

HELP = (
    "Serve text-to-image over HTTP on Ray Serve: each replica loads the Shiva pipeline once through the same "
    "load_pipeline as generate (same artifacts, caches, sha256 checks). POST /generate {prompt, seed, steps, guidance, "
    "height, width} answers {image_png_base64, record}; GET /healthz is 200 once every replica is ready. Concurrent "
    "requests of one shape are batched up to --max-batch (static graphs: the batch-1 graph generate runs plus a "
    "batch-B graph). A request served alone returns generate's PNG byte for byte. Ctrl-C drains in-flight requests. "
    "Needs pip install 'shiva-export[serve]'."
)
EPILOG = """Examples:

  shiva-export serve --model sd35-tiny --backend ort --ratio 0.4 --replicas 2

  curl -s 127.0.0.1:8000/generate -d '{"prompt": "a red cube", "seed": 3}' | jq .record.image

  shiva-export serve --model sd35-tiny --backend ort --ratio 0.4 --autoscale 1:4 --dump-config serve.yaml && serve deploy serve.yaml

Exit codes: 0 stopped cleanly, 2 bad option value (checked before Ray starts; a port in use too), 4 Ray not installed.
"""


Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Model, as in generate (sd35-tiny, flux-tiny, ..., or a hub model with --weights)."
    ),
]
Ratio = Annotated[
    float | None,
    typer.Option(
        "--ratio",
        "-r",
        help="Fraction of image tokens PRUNED per routed block, in [0, 1). Default: the recipe's first ratio.",
    ),
]
Phases = Annotated[
    bool, typer.Option("--phases", help="Run the recipe's learned phase schedule (one graph per phase).")
]
Artifact = Annotated[
    list[Path] | None,
    typer.Option(
        "--artifact",
        help="Run this ONNX (ort) or engine folder (trt); repeat once per phase. Batch-1 graphs: one request per call.",
    ),
]
Weights = Annotated[Path | None, typer.Option("--weights", help="Local diffusers pipeline (or transformer) folder.")]
Context = Annotated[str | None, typer.Option("--context", help="keep | drop (SD3/SD3.5). Default: the recipe's.")]
Replicas = Annotated[int, typer.Option("--replicas", help="Replicas (each loads the pipeline once).")]
Autoscale = Annotated[
    str | None,
    typer.Option("--autoscale", help="MIN:MAX replicas, scaled by Ray on ongoing requests (instead of --replicas)."),
]
MaxBatch = Annotated[
    int | None,
    typer.Option(
        "--max-batch",
        help="Requests per pipeline call at most (static graphs: the batch of the second graph). Default 4; 1 with --artifact.",
    ),
]
BatchWaitMs = Annotated[float, typer.Option("--batch-wait-ms", help="How long a replica waits to fill a batch.")]
Host = Annotated[str, typer.Option("--host", help="Address the HTTP proxy listens on.")]
Port = Annotated[int, typer.Option("--port", help="HTTP port.")]
Dtype = Annotated[str, typer.Option("--dtype", help="ort/trt: graph dtype fp32 | fp16; torch: fp32 | fp16 | bf16.")]
Device = Annotated[str, typer.Option("--device", help="cpu | cuda: where each replica's pipeline runs.")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads per replica (torch and ONNX Runtime).")]
NumCpus = Annotated[float, typer.Option("--num-cpus", help="CPUs Ray reserves per replica.")]
NumGpus = Annotated[float, typer.Option("--num-gpus", help="GPUs Ray reserves per replica (fractions share one).")]
MaxBodyBytes = Annotated[int, typer.Option("--max-body-bytes", help="Largest request body accepted (413 above).")]
RequestTimeout = Annotated[
    float,
    typer.Option("--request-timeout", help="Seconds before Ray's proxy gives up on a request; also the drain limit."),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        help="Port of Ray's Prometheus metrics (Ray Serve's and ours) on this node, when serve starts the local Ray cluster.",
    ),
]
DumpConfig = Annotated[
    Path | None,
    typer.Option(
        "--dump-config", help="Write Ray's serve config YAML (for `serve deploy`) to FILE and exit; nothing starts."
    ),
]


def serve_command(
    model: Model = "sd35-tiny",
    backend: PipelineBackend = "torch",
    ratio: Ratio = None,
    phases: Phases = False,
    artifact: Artifact = None,
    recipe: RecipeFile = None,
    weights: Weights = None,
    router: PipelineRouter = None,
    context: Context = None,
    replicas: Replicas = 1,
    autoscale: Autoscale = None,
    max_batch: MaxBatch = None,
    batch_wait_ms: BatchWaitMs = 20.0,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    dtype: Dtype = "fp32",
    device: Device = "cpu",
    provider: Provider = "cpu",
    threads: Threads = None,
    num_cpus: NumCpus = 1.0,
    num_gpus: NumGpus = 0.0,
    max_body_bytes: MaxBodyBytes = 65536,
    request_timeout: RequestTimeout = 300.0,
    artifact_root: ArtifactRoot = Path("engines"),
    metrics_port: MetricsPort = None,
    dump_config: DumpConfig = None,
    quiet: Quiet = False,
) -> int:
    from shiva_export.serve.options import ServeOptions, check_port_free, parse_autoscale

    if autoscale is not None and replicas != 1:
        raise typer.BadParameter("give --replicas N or --autoscale MIN:MAX, not both.", param_hint="--autoscale")
    if dump_config is None and 1 <= port <= 65535:
        check_port_free(host, port)
    if metrics_port is not None and not 1 <= metrics_port <= 65535:
        raise typer.BadParameter(
            f"{metrics_port} is not a port in 1..65535.", param_hint="--metrics-port"
        )  # first: a second app on a busy port is refused before any model code loads
    opts = ServeOptions(
        model=model,
        recipe=_s(recipe),
        weights=_s(weights),
        router=_s(router),
        backend=backend,
        ratio=ratio,
        phases=phases,
        artifacts=[str(a) for a in artifact or []],
        context=context,
        dtype=dtype,
        device=device,
        provider=provider,
        threads=threads,
        artifact_root=str(artifact_root),
        replicas=replicas,
        autoscale=parse_autoscale(autoscale) if autoscale else None,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        host=host,
        port=port,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_body_bytes=max_body_bytes,
        request_timeout_s=request_timeout,
    ).validate()
    from shiva_export.serve import require_ray

    require_ray("shiva-export serve")  # exit 4 with the install line, before anything starts
    if dump_config is not None:
        from shiva_export.serve.server import dump_config as write

        result_text(f"serve config {write(opts, dump_config)}  (serve deploy {dump_config})")
        return ExitCode.OK
    from shiva_export.serve.server import serve_forever

    say = (lambda m: None) if quiet else (lambda m: err_console.print(f"[serve] {m}", markup=False, highlight=False))
    serve_forever(opts, say=say, metrics_port=metrics_port)
    return ExitCode.OK


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)
