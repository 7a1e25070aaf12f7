"""``shiva-export generate``: text to image through a diffusers pipeline whose transformer is Shiva-pruned."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import (
    ArtifactRoot,
    LoraScale,
    PipelineBackend,
    PipelineRouter,
    PromptFile,
    Provider,
    Quiet,
    Threads,
)
from shiva_export.cli._output import err_console, result_json, result_text, stages

HELP = (
    "Generate images with the real diffusers pipeline of the model (StableDiffusion3Pipeline, FluxPipeline, "
    "PixArtSigmaPipeline or DiTPipeline: text encoders, denoising loop, VAE) whose transformer is "
    "Shiva-pruned and runs from PyTorch, ONNX Runtime or a TensorRT engine. For DiT, --prompt is a class label or id. Learned phase schedules switch graphs "
    "per step. Writes one PNG per prompt and generate.json (prompt, seed, artifacts and their sha256, per-stage "
    "timings); --compare-dense adds the dense image of the same seed, a dense | pruned grid and PSNR. "
    "--ratio is the FRACTION OF IMAGE TOKENS PRUNED per routed block (0.4 keeps 60%)."
)
EPILOG = """Examples:

  shiva-export generate --model sd35-tiny --prompt "a red cube" --backend ort --ratio 0.4 --compare-dense --out out/

  shiva-export generate --model sd35-tiny --phases --backend ort --prompts prompts.txt --out out/

  shiva-export generate --model sd35 --weights ./sd3.5-medium --backend torch --ratio 0.4 --steps 28 --prompt "a cat" --out out/

  shiva-export generate --model flux-tiny --prompt "a red cube" --backend ort --ratio 0.4 --compare-dense --out out/

  shiva-export generate --model sd35-tiny --prompt "a red cube" --backend ort --lora style.safetensors --lora-scale 0.8 --out out/

  shiva-export generate --model sd35-tiny --prompt "a red cube" --backend ort --controlnet ./cn --control-image edges.png --out out/

  shiva-export generate --model dit-tiny --prompt cat --prompt 207 --backend ort --ratio 0.4 --out out/

Static graphs (ort, trt) fix batch, size, text length and CFG: a call that does not fit exits 2 with the export
command that does. Exit codes: 0 ok, 1 error, 2 bad option value, 4 missing dependency/hardware.
"""


Prompt = Annotated[
    list[str] | None,
    typer.Option(
        "--prompt",
        "-p",
        help="Prompt (repeatable): one image each, seeds --seed, --seed+1, ... DiT: a class label or class id.",
    ),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder for PNGs, generate.json and grid.png.")]
Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model: offline sd35-tiny / sd3-tiny / sd3-mid / flux-tiny / pixart-tiny / dit-tiny, or sd35, sd3, sd35-large, flux-dev, flux-schnell, pixart-sigma, dit-xl-2-256 (need --weights offline).",
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        help="Local diffusers PIPELINE folder (model_index.json, text encoders, VAE, transformer), or a TRANSFORMER folder run in the model's own pipeline.",
    ),
]
RecipeToml = Annotated[
    Path | None, typer.Option("--recipe", help="Recipe TOML (router, schedule, shapes) overriding the model's.")
]
Ratio = Annotated[
    float | None,
    typer.Option(
        "--ratio",
        "-r",
        help="Fraction of image tokens PRUNED per routed block, in [0, 1): 0.4 keeps 60%. Default: the recipe's first ratio.",
    ),
]
Context = Annotated[
    str | None,
    typer.Option(
        "--context",
        help="keep | drop: whether rejected tokens still give keys and values in routed blocks (SD3/SD3.5). Default: the recipe's [prune] context (drop).",
    ),
]
Phases = Annotated[
    bool,
    typer.Option(
        "--phases",
        help="Run the recipe's learned [[schedule.phases]]: one static graph per phase, switched at the recorded timestep boundaries.",
    ),
]
Artifact = Annotated[
    list[Path] | None,
    typer.Option(
        "--artifact", help="Run this ONNX (ort) or engine folder (trt) instead of exporting; repeat once per phase."
    ),
]
NegativePrompt = Annotated[
    str | None,
    typer.Option(
        "--negative-prompt", help="Negative prompt for classifier-free guidance (SD3, PixArt; Flux and DiT refuse it)."
    ),
]
Steps = Annotated[int | None, typer.Option("--steps", help="Denoising steps. Default: the recipe's (28 for SD3.5).")]
Guidance = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        help="CFG scale; <= 1 turns CFG off (needs a --no-cfg export). Flux: the guidance embedding (no CFG batch). Default: the recipe's.",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the first image.")]
Height = Annotated[
    int | None, typer.Option("--height", help="Image height in pixels. Default: the recipe's export shape.")
]
Width = Annotated[
    int | None, typer.Option("--width", help="Image width in pixels. Default: the recipe's export shape.")
]
CompareDense = Annotated[
    bool,
    typer.Option(
        "--compare-dense",
        help="Also run the dense model (same backend, same seed): grid, PSNR, mean abs difference, speedups.",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="ort/trt: graph dtype fp32 | fp16; torch: pipeline dtype fp32 | fp16 | bf16 (routers stay fp32).",
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="cpu | cuda: where the pipeline runs (torch backend, text encoders, VAE).")
]
Lora = Annotated[
    list[Path] | None,
    typer.Option(
        "--lora",
        help="LoRA in the diffusers format (.safetensors, or the folder save_lora_weights wrote); repeatable. torch: loaded unfused at its --lora-scale; ort/trt: fused into the exported graph; its sha256 and scale go into the metadata and cache keys.",
    ),
]
Controlnet = Annotated[
    str | None,
    typer.Option(
        "--controlnet",
        help="SD3/SD3.5 ControlNet (SD3ControlNetModel folder, or a cached hub id): runs StableDiffusion3ControlNetPipeline with the pruned transformer; ort/trt graphs take its block residuals as inputs.",
    ),
]
ControlImage = Annotated[
    Path | None,
    typer.Option("--control-image", help="Control image for --controlnet (PNG, JPEG), resized to the generation size."),
]
ControlScale = Annotated[float, typer.Option("--control-scale", help="controlnet_conditioning_scale of --controlnet.")]
JsonRecord = Annotated[bool, typer.Option("--json", help="Print the run record as one JSON object on stdout.")]
Ray = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Map the prompts over Ray Data actors (one pipeline each; resumable: finished images are skipped on rerun). Needs shiva-export[serve].",
    ),
]
Replicas = Annotated[int, typer.Option("--replicas", help="With --ray: actors (pipelines) running at once.")]


def generate_command(
    prompt: Prompt = None,
    prompts_file: PromptFile = None,
    out: Out = Path("out"),
    model: Model = "sd35-tiny",
    weights: Weights = None,
    recipe: RecipeToml = None,
    ratio: Ratio = None,
    context: Context = None,
    phases: Phases = False,
    backend: PipelineBackend = "torch",
    artifact: Artifact = None,
    router: PipelineRouter = None,
    negative_prompt: NegativePrompt = None,
    steps: Steps = None,
    guidance: Guidance = None,
    seed: Seed = 0,
    height: Height = None,
    width: Width = None,
    compare_dense: CompareDense = False,
    dtype: Dtype = "fp32",
    device: Device = "cpu",
    provider: Provider = "cpu",
    threads: Threads = None,
    artifact_root: ArtifactRoot = Path("engines"),
    lora: Lora = None,
    lora_scale: LoraScale = None,
    controlnet: Controlnet = None,
    control_image: ControlImage = None,
    control_scale: ControlScale = 1.0,
    json_out: JsonRecord = False,
    quiet: Quiet = False,
    ray: Ray = False,
    replicas: Replicas = 1,
) -> int:
    args = GenerateArgs(
        prompt=prompt,
        prompts_file=prompts_file,
        out=out,
        model=model,
        weights=weights,
        recipe=recipe,
        ratio=ratio,
        context=context,
        phases=phases,
        backend=backend,
        artifact=artifact,
        router=router,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        height=height,
        width=width,
        compare_dense=compare_dense,
        dtype=dtype,
        device=device,
        provider=provider,
        threads=threads,
        artifact_root=artifact_root,
        lora=lora,
        lora_scale=lora_scale,
        controlnet=controlnet,
        control_image=control_image,
        control_scale=control_scale,
        json_out=json_out,
        quiet=quiet,
        ray=ray,
        replicas=replicas,
    )
    return _generate(args)


@dataclass(frozen=True)
class GenerateArgs:
    """The options of one ``generate`` call as parsed, handed from the command to its checks and runs."""

    prompt: list[str] | None
    prompts_file: Path | None
    out: Path
    model: str
    weights: Path | None
    recipe: Path | None
    ratio: float | None
    context: str | None
    phases: bool
    backend: str
    artifact: list[Path] | None
    router: Path | None
    negative_prompt: str | None
    steps: int | None
    guidance: float | None
    seed: int
    height: int | None
    width: int | None
    compare_dense: bool
    dtype: str
    device: str
    provider: str
    threads: int | None
    artifact_root: Path
    lora: list[Path] | None
    lora_scale: list[float] | None
    controlnet: str | None
    control_image: Path | None
    control_scale: float
    json_out: bool
    quiet: bool
    ray: bool
    replicas: int

    @property
    def show(self) -> bool:
        """Progress on stderr (not with --quiet or --json)."""
        return not (self.quiet or self.json_out)


def _generate(a: GenerateArgs) -> int:
    """Every option is checked (values, prompts, contradictions, output folder) before Ray starts or a model loads."""
    _check_choices(a)
    texts = _read_prompts(a.prompt, a.prompts_file)
    check_generate_flags(
        model=a.model,
        backend=a.backend,
        artifact=a.artifact,
        ratio=a.ratio,
        phases=a.phases,
        provider=a.provider,
        seed=a.seed,
        count=len(texts),
        height=a.height,
        width=a.width,
        out=a.out,
        device=a.device,
    )
    if a.threads is not None:
        if a.threads < 1:
            raise typer.BadParameter(f"{a.threads} must be >= 1.", param_hint="--threads")
        import torch

        torch.set_num_threads(a.threads)

    if a.ray and (a.lora or a.controlnet is not None):
        raise typer.BadParameter(
            "--lora and --controlnet do not reach the Ray actors yet; run them without --ray.", param_hint="--ray"
        )
    if a.ray:
        return _generate_ray(texts, a)
    if a.replicas != 1:
        raise typer.BadParameter("--replicas needs --ray (one process runs one pipeline).", param_hint="--replicas")
    return _generate_local(texts, a)


def _check_choices(a: GenerateArgs) -> None:
    """The options that take one of a few words."""
    if a.backend not in ("torch", "ort", "trt"):
        raise typer.BadParameter(f"{a.backend!r} is not one of torch, ort, trt.", param_hint="--backend")
    if a.dtype not in ("fp32", "fp16", "bf16") or (a.dtype == "bf16" and a.backend != "torch"):
        raise typer.BadParameter(
            f"{a.dtype!r} is not one of fp32, fp16{', bf16' if a.backend == 'torch' else ''} (bf16 graphs cannot run on ONNX Runtime CPU; use --backend torch for bf16).",
            param_hint="--dtype",
        )
    if a.device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{a.device!r} is not one of cpu, cuda.", param_hint="--device")
    if a.context not in (None, "keep", "drop"):
        raise typer.BadParameter(f"{a.context!r} is not one of keep, drop.", param_hint="--context")
    if a.provider not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{a.provider!r} is not one of cpu, cuda.", param_hint="--provider")


def _read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    """--prompt texts, then the lines of --prompts (blank lines and # comments skipped); at least one."""
    texts = list(prompt or [])
    if prompts_file is not None:
        try:
            raw = prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise typer.BadParameter(
                f"cannot read {prompts_file} as UTF-8 text ({err.__class__.__name__}).", param_hint="--prompts"
            ) from None
        texts += [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not texts and prompts_file is not None:
        raise typer.BadParameter(
            f"{prompts_file} holds no prompt (only blank or # lines); write one prompt per line.",
            param_hint="--prompts",
        )
    if not texts:
        raise typer.BadParameter("give at least one --prompt TEXT or --prompts FILE.", param_hint="--prompt")
    return texts


def _generate_local(texts: list[str], a: GenerateArgs) -> int:
    """One pipeline in this process, with a progress bar per image (and per dense image)."""
    from shiva_export.export.lora import resolve_loras
    from shiva_export.runtime.generate import generate
    from shiva_export.utils.io import folder_lock

    loras = resolve_loras(a.lora, a.lora_scale)
    progress_bar, step = _step_progress(a.show)
    # a second run into this folder is refused
    with folder_lock(a.out, "--out folder"), stages(enabled=a.show) as advance:
        if progress_bar is not None:
            progress_bar.start()
        try:
            rec = generate(
                model=a.model,
                prompts=texts,
                out_dir=a.out,
                backend=a.backend,
                ratio=a.ratio,
                phases=a.phases,
                recipe=a.recipe,
                weights=a.weights,
                router=a.router,
                artifacts=a.artifact,
                negative_prompt=a.negative_prompt,
                steps=a.steps,
                guidance=a.guidance,
                seed=a.seed,
                height=a.height,
                width=a.width,
                compare_dense=a.compare_dense,
                dtype=a.dtype,
                provider=a.provider,
                threads=a.threads,
                device=a.device,
                artifact_root=a.artifact_root,
                progress=advance,
                step_progress=step,
                context=a.context,
                loras=loras,
                controlnet=a.controlnet,
                control_image=a.control_image,
                control_scale=a.control_scale,
            )
        finally:
            if progress_bar is not None:
                progress_bar.stop()
    if a.json_out:
        result_json(rec)
    else:
        result_text(format_record(rec))
    return ExitCode.OK


def _step_progress(show: bool):
    """A Rich bar per denoising run and the ``step_progress(label, i, n)`` that drives it; (None, None) when hidden."""
    if not show:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress_bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def step(label: str, i: int, n: int) -> None:
        if label not in tasks:
            tasks[label] = progress_bar.add_task(label[:60], total=n)
        progress_bar.update(tasks[label], completed=i)

    return progress_bar, step


def _generate_ray(texts: list[str], a: GenerateArgs) -> int:
    """``generate --ray``: the same files as the single-process run, from Ray Data actors, with one progress bar."""
    from shiva_export.serve import require_ray
    from shiva_export.serve.data import generate_ray

    require_ray("generate --ray")
    bar = None
    if a.show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("images"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        )
        bar.start()
        task = bar.add_task("images", total=len(texts))
    from shiva_export.utils.io import folder_lock

    try:
        with folder_lock(a.out, "--out folder"):  # as the single-process run: a second run into this folder is refused
            rec = generate_ray(
                prompts=texts,
                out_dir=a.out,
                model=a.model,
                weights=a.weights,
                recipe=a.recipe,
                ratio=a.ratio,
                context=a.context,
                phases=a.phases,
                backend=a.backend,
                artifacts=a.artifact,
                router=a.router,
                negative_prompt=a.negative_prompt,
                steps=a.steps,
                guidance=a.guidance,
                seed=a.seed,
                height=a.height,
                width=a.width,
                compare_dense=a.compare_dense,
                dtype=a.dtype,
                device=a.device,
                provider=a.provider,
                threads=a.threads,
                artifact_root=a.artifact_root,
                replicas=a.replicas,
                progress=(lambda d, n: bar.update(task, completed=d)) if bar else None,
            )
    finally:
        if bar is not None:
            bar.stop()
    if a.json_out:
        result_json(rec)
    else:
        result_text(format_record(rec))
    return ExitCode.OK


def check_generate_flags(
    *, model, backend, artifact, ratio, phases, provider, seed, count, height, width, out, device
) -> None:
    """Contradictory or impossible flags, refused in one line before any model is loaded or any file written."""
    from shiva_export.checks import (
        check_cuda_device,
        check_gpu,
        check_model_name,
        check_ort_provider,
        check_out_dir,
        check_seed,
        check_side,
    )
    from shiva_export.errors import ConfigError

    check_model_name(model)
    if artifact and backend == "torch":
        raise ConfigError(
            "--backend torch runs the PyTorch transformer and ignores --artifact (an ONNX or engine); pass --backend ort/trt with --artifact, or drop --artifact."
        )
    check_seed(seed, count)
    check_side(height, "--height")
    check_side(width, "--width")
    check_out_dir(out, "--out")
    check_cuda_device(device)
    check_ort_provider(provider, backend)
    if backend == "trt" and not artifact:  # given engines are verified by content first (the runner), then the GPU
        check_gpu("--backend trt", "engines run on a GPU; they would be exported and built first")
    for a in artifact or []:
        if ratio is not None or phases:
            _check_artifact_budget(a, backend, ratio, phases)


def _check_artifact_budget(a: Path, backend: str, ratio: float | None, phases: bool) -> None:
    """--ratio / --phases must describe the --artifact given (it decides the budget; the flags would be ignored)."""
    from shiva_export.errors import ConfigError

    if backend == "trt":
        from shiva_export.engines.manifest import manifest_path_for, read_manifest
        from shiva_export.engines.runner import find_plan

        man = read_manifest(manifest_path_for(find_plan(a)))
        got, phase = man.ratio, None
    else:
        from shiva_export.export.onnx import read_shiva_metadata

        meta = read_shiva_metadata(a, what="--artifact")
        got, phase = meta.get("ratio"), meta.get("phase")
    uniform = not phase or str(phase).startswith(
        "ratio"
    )  # uniform graphs carry no phase, or the one-phase name ratio<r>
    if phases and uniform:
        raise ConfigError(
            f"--phases runs the recipe's learned phases, but --artifact {a} is one uniform graph (ratio {got}); drop --phases, or pass one --artifact per learned phase (shiva-export onnx --phase P)."
        )
    if ratio is not None and (got is None or abs(float(got) - ratio) > 1e-6 or not uniform):
        raise ConfigError(
            f"--ratio {ratio} contradicts --artifact {a}, which was exported with ratio {got}{f' (phase {phase})' if phase else ''}; drop --ratio (the artifact decides) or export --ratio {ratio}."
        )


def format_record(r: dict) -> str:
    lines = [
        f"model      {r['model']}  backend {r['backend']}  budget {r['budget']}  steps {r['steps']}  guidance {r['guidance']}  {r['width']}x{r['height']}"
    ]
    for a in r["pipeline"]["artifacts"]:
        sha = a.get("engine_sha256") or a.get("onnx_sha256") or ""
        lines.append(
            f"artifact   {a.get('phase')}: {a.get('engine') or a.get('onnx')} ({a.get('status')}, sha256 {sha[:12]})"
        )
    for im in r["images"]:
        t = im["timings_ms"]
        line = (
            f"image      {im['png']}  seed {im['seed']}  total {t['total']:.1f} ms (text {t['text_encode']:.1f}, loop {t['denoise_loop']:.1f}, "
            f"transformer {t['transformer']['total']:.1f}, vae {t['vae_decode']:.1f})"
        )
        if im.get("phase_steps"):
            line += "  phases " + ", ".join(f"{k} x{v}" for k, v in im["phase_steps"].items())
        lines.append(line)
        d = im.get("dense")
        if d:
            ps = (
                "identical"
                if d["identical"]
                else (f"PSNR {d['psnr_db']:.2f} dB" if d["psnr_db"] is not None else "PSNR inf")
            )
            lines.append(
                f"  vs dense {ps}, mean abs {d['mean_abs_diff']:.4f}; speedup transformer {d['transformer_speedup']:.2f}x, end to end {d['e2e_speedup']:.2f}x"
            )
    if r.get("grid"):
        lines.append(f"grid       {r['grid']}")
    lines.append(f"record     {r['record']}")
    return "\n".join(lines)
