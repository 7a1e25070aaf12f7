"""``shiva-export generate``: text to image through a diffusers pipeline whose transformer is Shiva-pruned."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
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


def generate_command(
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Prompt (repeatable): one image each, seeds --seed, --seed+1, ... DiT: a class label or class id.")] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="Text file with one prompt per line (blank lines and # comments skipped).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for PNGs, generate.json and grid.png.")] = Path("out"),
    model: Annotated[str, typer.Option("--model", "-m", help="Model: offline sd35-tiny / sd3-tiny / sd3-mid / flux-tiny / pixart-tiny / dit-tiny, or sd35, sd3, sd35-large, flux-dev, flux-schnell, pixart-sigma, dit-xl-2-256 (need --weights offline).")] = "sd35-tiny",
    weights: Annotated[Path | None, typer.Option("--weights", help="Local diffusers PIPELINE folder (model_index.json, text encoders, VAE, transformer), or a TRANSFORMER folder run in the model's own pipeline.")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe TOML (router, schedule, shapes) overriding the model's.")] = None,
    ratio: Annotated[float | None, typer.Option("--ratio", "-r", help="Fraction of image tokens PRUNED per routed block, in [0, 1): 0.4 keeps 60%. Default: the recipe's first ratio.")] = None,
    context: Annotated[str | None, typer.Option("--context", help="keep | drop: whether rejected tokens still give keys and values in routed blocks (SD3/SD3.5). Default: the recipe's [prune] context (drop).")] = None,
    phases: Annotated[bool, typer.Option("--phases", help="Run the recipe's learned [[schedule.phases]]: one static graph per phase, switched at the recorded timestep boundaries.")] = False,
    backend: Annotated[str, typer.Option("--backend", "-b", help="torch | ort | trt.")] = "torch",
    artifact: Annotated[list[Path] | None, typer.Option("--artifact", help="Run this ONNX (ort) or engine folder (trt) instead of exporting; repeat once per phase.")] = None,
    router: Annotated[Path | None, typer.Option("--router", help="Router safetensors. Default: the recipe's.")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="Negative prompt for classifier-free guidance (SD3, PixArt; Flux and DiT refuse it).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps. Default: the recipe's (28 for SD3.5).")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="CFG scale; <= 1 turns CFG off (needs a --no-cfg export). Flux: the guidance embedding (no CFG batch). Default: the recipe's.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first image.")] = 0,
    height: Annotated[int | None, typer.Option("--height", help="Image height in pixels. Default: the recipe's export shape.")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Image width in pixels. Default: the recipe's export shape.")] = None,
    compare_dense: Annotated[bool, typer.Option("--compare-dense", help="Also run the dense model (same backend, same seed): grid, PSNR, mean abs difference, speedups.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="ort/trt: graph dtype fp32 | fp16; torch: pipeline dtype fp32 | fp16 | bf16 (routers stay fp32).")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda: where the pipeline runs (torch backend, text encoders, VAE).")] = "cpu",
    provider: Annotated[str, typer.Option("--provider", help="ONNX Runtime provider: cpu | cuda (needs onnxruntime-gpu).")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch and ONNX Runtime.")] = None,
    artifact_root: Annotated[Path, typer.Option("--artifact-root", help="Cache folder of exported graphs / engines.")] = Path("engines"),
    lora: Annotated[list[Path] | None, typer.Option("--lora", help="LoRA in the diffusers format (.safetensors, or the folder save_lora_weights wrote); repeatable. torch: loaded unfused at its --lora-scale; ort/trt: fused into the exported graph; its sha256 and scale go into the metadata and cache keys.")] = None,
    lora_scale: Annotated[list[float] | None, typer.Option("--lora-scale", help="Scale of each --lora, in order (one per --lora; default 1.0 each).")] = None,
    controlnet: Annotated[str | None, typer.Option("--controlnet", help="SD3/SD3.5 ControlNet (SD3ControlNetModel folder, or a cached hub id): runs StableDiffusion3ControlNetPipeline with the pruned transformer; ort/trt graphs take its block residuals as inputs.")] = None,
    control_image: Annotated[Path | None, typer.Option("--control-image", help="Control image for --controlnet (PNG, JPEG), resized to the generation size.")] = None,
    control_scale: Annotated[float, typer.Option("--control-scale", help="controlnet_conditioning_scale of --controlnet.")] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run record as one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Map the prompts over Ray Data actors (one pipeline each; resumable: finished images are skipped on rerun). Needs shiva-export[serve].")] = False,
    replicas: Annotated[int, typer.Option("--replicas", help="With --ray: actors (pipelines) running at once.")] = 1,
) -> int:
    if backend not in ("torch", "ort", "trt"):
        raise typer.BadParameter(f"{backend!r} is not one of torch, ort, trt.", param_hint="--backend")
    if dtype not in ("fp32", "fp16", "bf16") or (dtype == "bf16" and backend != "torch"):
        raise typer.BadParameter(
            f"{dtype!r} is not one of fp32, fp16{', bf16' if backend == 'torch' else ''} (bf16 graphs cannot run on ONNX Runtime CPU; use --backend torch for bf16).",
            param_hint="--dtype",
        )
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{device!r} is not one of cpu, cuda.", param_hint="--device")
    if context not in (None, "keep", "drop"):
        raise typer.BadParameter(f"{context!r} is not one of keep, drop.", param_hint="--context")
    if provider not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{provider!r} is not one of cpu, cuda.", param_hint="--provider")
    texts = list(prompt or [])
    if prompts_file is not None:
        try:
            raw = prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise typer.BadParameter(f"cannot read {prompts_file} as UTF-8 text ({err.__class__.__name__}).", param_hint="--prompts") from None
        texts += [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not texts and prompts_file is not None:
        raise typer.BadParameter(f"{prompts_file} holds no prompt (only blank or # lines); write one prompt per line.", param_hint="--prompts")
    if not texts:
        raise typer.BadParameter("give at least one --prompt TEXT or --prompts FILE.", param_hint="--prompt")
    check_generate_flags(model=model, backend=backend, artifact=artifact, ratio=ratio, phases=phases, provider=provider, seed=seed,
                         count=len(texts), height=height, width=width, out=out, device=device)
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"{threads} must be >= 1.", param_hint="--threads")
        import torch

        torch.set_num_threads(threads)

    if ray and (lora or controlnet is not None):
        raise typer.BadParameter("--lora and --controlnet do not reach the Ray actors yet; run them without --ray.", param_hint="--ray")
    if ray:
        return _generate_ray(texts, out=out, model=model, weights=weights, recipe=recipe, ratio=ratio, context=context, phases=phases, backend=backend,
                             artifact=artifact, router=router, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                             height=height, width=width, compare_dense=compare_dense, dtype=dtype, device=device, provider=provider,
                             threads=threads, artifact_root=artifact_root, json_out=json_out, show=not (quiet or json_out), replicas=replicas)
    if replicas != 1:
        raise typer.BadParameter("--replicas needs --ray (one process runs one pipeline).", param_hint="--replicas")
    from shiva_export.export.lora import resolve_loras
    from shiva_export.runtime.generate import generate
    from shiva_export.utils.io import folder_lock

    loras = resolve_loras(lora, lora_scale)

    show = not (quiet or json_out)
    progress_bar = None
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress_bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console, transient=False)
    tasks: dict[str, int] = {}

    def step(label: str, i: int, n: int) -> None:
        if progress_bar is None:
            return
        if label not in tasks:
            tasks[label] = progress_bar.add_task(label[:60], total=n)
        progress_bar.update(tasks[label], completed=i)

    with folder_lock(out, "--out folder"), stages(enabled=show) as advance:  # a second run into this folder is refused
        if progress_bar is not None:
            progress_bar.start()
        try:
            rec = generate(
                model=model, prompts=texts, out_dir=out, backend=backend, ratio=ratio, phases=phases, recipe=recipe, weights=weights,
                router=router, artifacts=artifact, negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                height=height, width=width, compare_dense=compare_dense, dtype=dtype, provider=provider, threads=threads, device=device,
                artifact_root=artifact_root, progress=advance, step_progress=step if show else None, context=context,
                loras=loras, controlnet=controlnet, control_image=control_image, control_scale=control_scale,
            )
        finally:
            if progress_bar is not None:
                progress_bar.stop()
    if json_out:
        result_json(rec)
    else:
        result_text(format_record(rec))
    return ExitCode.OK


def _generate_ray(texts: list[str], *, json_out: bool, show: bool, **kw) -> int:
    """``generate --ray``: the same files as the single-process run, from Ray Data actors, with one progress bar."""
    from shiva_export.serve import require_ray
    from shiva_export.serve.data import generate_ray

    require_ray("generate --ray")
    bar = None
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console, transient=False)
        bar.start()
        task = bar.add_task("images", total=len(texts))
    from shiva_export.utils.io import folder_lock

    out = kw.pop("out")
    try:
        with folder_lock(out, "--out folder"):  # as the single-process run: a second run into this folder is refused
            rec = generate_ray(prompts=texts, out_dir=out, artifacts=kw.pop("artifact"), **kw,
                               progress=(lambda d, n: bar.update(task, completed=d)) if bar else None)
    finally:
        if bar is not None:
            bar.stop()
    if json_out:
        result_json(rec)
    else:
        result_text(format_record(rec))
    return ExitCode.OK


def check_generate_flags(*, model, backend, artifact, ratio, phases, provider, seed, count, height, width, out, device) -> None:
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
        raise ConfigError("--backend torch runs the PyTorch transformer and ignores --artifact (an ONNX or engine); pass --backend ort/trt with --artifact, or drop --artifact.")
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
    uniform = not phase or str(phase).startswith("ratio")  # uniform graphs carry no phase, or the one-phase name ratio<r>
    if phases and uniform:
        raise ConfigError(f"--phases runs the recipe's learned phases, but --artifact {a} is one uniform graph (ratio {got}); drop --phases, or pass one --artifact per learned phase (shiva-export onnx --phase P).")
    if ratio is not None and (got is None or abs(float(got) - ratio) > 1e-6 or not uniform):
        raise ConfigError(f"--ratio {ratio} contradicts --artifact {a}, which was exported with ratio {got}{f' (phase {phase})' if phase else ''}; drop --ratio (the artifact decides) or export --ratio {ratio}.")


def format_record(r: dict) -> str:
    lines = [f"model      {r['model']}  backend {r['backend']}  budget {r['budget']}  steps {r['steps']}  guidance {r['guidance']}  {r['width']}x{r['height']}"]
    for a in r["pipeline"]["artifacts"]:
        sha = a.get("engine_sha256") or a.get("onnx_sha256") or ""
        lines.append(f"artifact   {a.get('phase')}: {a.get('engine') or a.get('onnx')} ({a.get('status')}, sha256 {sha[:12]})")
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
            ps = "identical" if d["identical"] else (f"PSNR {d['psnr_db']:.2f} dB" if d["psnr_db"] is not None else "PSNR inf")
            lines.append(
                f"  vs dense {ps}, mean abs {d['mean_abs_diff']:.4f}; speedup transformer {d['transformer_speedup']:.2f}x, end to end {d['e2e_speedup']:.2f}x"
            )
    if r.get("grid"):
        lines.append(f"grid       {r['grid']}")
    lines.append(f"record     {r['record']}")
    return "\n".join(lines)
