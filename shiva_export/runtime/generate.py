"""Text (or class) to image with a Shiva pipeline: images, per-stage timings, and the comparison with dense.

:func:`run_pipeline` runs one prompt through a (Shiva or dense) diffusers pipeline of any supported
architecture and times its stages. The call's arguments come from the adapter
(``ModelAdapter.pipeline_call``: text for SD3 / Flux / PixArt, a class label or id for DiT) and step progress
from hooks on ``pipe.transformer``, so no pipeline-specific callback API is used. Stages: text encoding
(``pipe.encode_prompt``, absent for DiT), the denoising loop (transformer calls timed one by one, the rest
is loop overhead: scheduler, CFG arithmetic, copies), VAE decode and post-processing. On CUDA every
boundary synchronizes. :func:`generate` is what ``shiva-export generate`` runs: it writes one PNG per
image, ``generate.json`` (prompt, seed, steps, recipe, router, artifact sha256, per-stage timings) and,
with ``compare_dense``, the dense image of the same seed, a ``dense | pruned`` grid and PSNR / mean abs
difference per image.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiva_export._version import __version__
from shiva_export.errors import ConfigError
from shiva_export.export.onnx import package_versions
from shiva_export.logging import get_logger
from shiva_export.models import adapter_for_architecture, get_adapter
from shiva_export.prune.api import is_shiva_applied, phase_trace
from shiva_export.runtime.controlnet import ControlRun, check_controlnet_options
from shiva_export.runtime.pipeline import generation_recipe, load_pipeline
from shiva_export.utils.io import atomic_write_bytes, atomic_write_json, check_writable

__all__ = ["StageTimes", "RunResult", "run_pipeline", "generate", "psnr", "check_pipeline_call", "image_grid"]

logger = get_logger(__name__)


@dataclass
class StageTimes:
    """Milliseconds per stage of one pipeline call."""

    text_encode: float = 0.0
    denoise_loop: float = 0.0
    transformer: list[float] = field(default_factory=list)
    vae_decode: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0
    phase_trace: list[str] = field(default_factory=list)

    @property
    def transformer_total(self) -> float:
        return float(sum(self.transformer))

    @property
    def loop_overhead(self) -> float:
        return self.denoise_loop - self.transformer_total

    @property
    def non_transformer(self) -> float:
        return self.total - self.transformer_total

    def per_phase(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, ms in zip(self.phase_trace, self.transformer):
            d = out.setdefault(name, {"steps": 0, "ms": 0.0})
            d["steps"] += 1
            d["ms"] += ms
        return out

    def to_dict(self) -> dict[str, Any]:
        ts = sorted(self.transformer)
        med = ts[len(ts) // 2] if ts else 0.0
        return {
            "text_encode": round(self.text_encode, 3),
            "denoise_loop": round(self.denoise_loop, 3),
            "transformer": {
                "total": round(self.transformer_total, 3),
                "calls": len(ts),
                "per_step_median": round(med, 3),
                "per_phase": {k: {"steps": v["steps"], "ms": round(v["ms"], 3)} for k, v in self.per_phase().items()},
            },
            "loop_overhead": round(self.loop_overhead, 3),
            "vae_decode": round(self.vae_decode, 3),
            "postprocess": round(self.postprocess, 3),
            "total": round(self.total, 3),
        }


@dataclass
class RunResult:
    image: Any  # float numpy [H, W, 3] in [0, 1]
    latents: Any  # torch tensor of the final latents (before VAE)
    times: StageTimes


def sync_device(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def instrument(pipe, times: StageTimes, store: dict, on_step: Callable[[int], None] | None = None):
    """Wraps ``encode_prompt`` (when the pipeline has one: DiT has no text) and ``vae.decode``, and hooks the
    transformer, for the duration of one call. ``on_step(i)`` runs after the i-th transformer call (one per
    denoising step in every supported pipeline), so no pipeline-specific callback API is needed."""
    dev = pipe._execution_device
    clock = time.perf_counter
    orig_encode = getattr(pipe, "encode_prompt", None)
    orig_decode = pipe.vae.decode
    marks: dict[str, float] = {}

    def encode_prompt(*a, **k):
        sync_device(dev)
        t0 = clock()
        out = orig_encode(*a, **k)
        sync_device(dev)
        marks["enc_end"] = clock()
        times.text_encode += (marks["enc_end"] - t0) * 1e3
        return out

    def decode(z, *a, **k):
        store["latents"] = z.detach().clone()
        sync_device(dev)
        marks["dec_start"] = clock()
        out = orig_decode(z, *a, **k)
        sync_device(dev)
        marks["dec_end"] = clock()
        times.vae_decode += (marks["dec_end"] - marks["dec_start"]) * 1e3
        return out

    call_start: list[float] = []

    def pre(module, args, kwargs):
        sync_device(dev)
        call_start.append(clock())

    def post(module, args, kwargs, output):
        sync_device(dev)
        times.transformer.append((clock() - call_start.pop()) * 1e3)
        if on_step is not None:
            on_step(len(times.transformer) - 1)

    h1 = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(post, with_kwargs=True)
    if orig_encode is not None:
        pipe.encode_prompt = encode_prompt
    pipe.vae.decode = decode
    try:
        yield marks
    finally:
        h1.remove()
        h2.remove()
        if orig_encode is not None:
            del pipe.encode_prompt
        del pipe.vae.decode


def trace_of(pipe) -> list[str]:
    t = pipe.transformer
    if hasattr(t, "trace") and isinstance(t.trace, list):
        out = list(t.trace)
        t.trace.clear()
        return out

    if is_shiva_applied(t):
        return phase_trace(t, clear=True)
    return []


def pipeline_adapter(pipe):
    info = getattr(pipe, "shiva", None)
    if info is not None:
        return get_adapter(info.recipe.architecture)
    t = pipe.transformer
    return getattr(t, "_adapter", None) or get_adapter(t)


def check_pipeline_call(
    pipe, *, batch: int, height: int, width: int, guidance: float, max_sequence_length: int | None
) -> None:
    """Shape contract, before the first step: what the pipeline will feed vs what the graphs were built for."""
    t = pipe.transformer
    adapter = pipeline_adapter(pipe)
    cfg = adapter.uses_cfg(guidance)
    text_len = adapter.pipeline_text_len(pipe, max_sequence_length)
    if hasattr(t, "check_call"):
        t.check_call(batch * (2 if cfg else 1), height, width, text_len, cfg, where="generate")


def run_pipeline(
    pipe,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    steps: int = 28,
    guidance: float = 4.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    on_step: Callable[[int], None] | None = None,
    extra_call: dict[str, Any] | None = None,
) -> RunResult:
    """One prompt through ``pipe`` with stage timings (see :class:`StageTimes`).

    The call's keyword arguments come from the architecture adapter (``ModelAdapter.pipeline_call``): a text
    prompt for SD3 / Flux / PixArt, a class label or id for DiT; ``extra_call`` adds pipeline arguments (ControlNet's
    ``control_image`` and ``controlnet_conditioning_scale``).
    """
    import torch

    info = getattr(pipe, "shiva", None)
    adapter = pipeline_adapter(pipe)
    h = height or (info.height if info else None)
    w = width or (info.width if info else None)
    max_seq = info.max_sequence_length if info else adapter.max_sequence_length(pipe, 256)
    check_pipeline_call(pipe, batch=1, height=h, width=w, guidance=guidance, max_sequence_length=max_seq)
    times = StageTimes()
    store: dict[str, Any] = {}
    trace_of(pipe)  # drop calls made before this run

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    kwargs = adapter.pipeline_call(
        pipe,
        prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        height=h,
        width=w,
        max_sequence_length=max_seq,
        generator=gen,
    ) | dict(extra_call or {})
    if extra_call:  # StableDiffusion3ControlNetPipeline samples the control image's VAE posterior from the global RNG
        torch.manual_seed(int(seed))
    out = timed_call(pipe, kwargs, times, store, on_step)
    return RunResult(out.images[0], store.get("latents"), times)


def generate_record(
    *,
    model: str,
    backend: str,
    budget: str,
    steps: int,
    guidance: float,
    cfg: bool,
    height: int,
    width: int,
    device: str,
    torch_threads: int,
    pipeline: dict,
    controlnet: dict | None,
    images: list,
    grid: str | None,
) -> dict[str, Any]:
    """``generate.json``'s fields, in one place for every writer (one process, Ray Data): a new field is a
    required argument here, so no writer can drift from the others."""
    return {
        "tool": f"shiva-export {__version__}",
        "model": model,
        "backend": backend,
        "budget": budget,
        "steps": steps,
        "guidance": guidance,
        "cfg": cfg,
        "height": height,
        "width": width,
        "device": device,
        "torch_threads": torch_threads,
        "pipeline": pipeline,
        "controlnet": controlnet,
        "images": images,
        "grid": grid,
        "versions": package_versions(),
    }


def timed_call(pipe, kwargs: dict[str, Any], times: StageTimes, store: dict, on_step=None):
    """``pipe(**kwargs, output_type="np")`` with the stage timings and phase trace filled into ``times``."""
    import torch

    dev = pipe._execution_device
    with instrument(pipe, times, store, on_step) as marks, torch.inference_mode():
        sync_device(dev)
        t0 = time.perf_counter()
        out = pipe(**kwargs, output_type="np")
        sync_device(dev)
        t1 = time.perf_counter()
    times.total = (t1 - t0) * 1e3
    times.denoise_loop = (marks["dec_start"] - marks.get("enc_end", t0)) * 1e3
    times.postprocess = (t1 - marks["dec_end"]) * 1e3
    times.phase_trace = trace_of(pipe)
    return out


def psnr(a, b) -> float:
    """PSNR in dB of two float images in [0, 1] (``inf`` when identical)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a, b) -> float:
    """Structural similarity (Wang et al. 2004) of two float images ``[H, W, 3]`` in [0, 1]: the standard
    11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per channel on the valid region and
    averaged; 1.0 when identical."""
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(a, dtype=np.float64)).permute(2, 0, 1).unsqueeze(1)
    y = torch.as_tensor(np.asarray(b, dtype=np.float64)).permute(2, 0, 1).unsqueeze(1)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5.0) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, w)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def to_pil(img):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.clip(np.asarray(img), 0.0, 1.0) * 255.0).round().astype("uint8"))


def _write_png(path, image):
    """Writes a PIL image as PNG atomically; returns the image."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return image


def image_grid(
    rows: Sequence[Sequence[Any]],
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    pad: int = 4,
):
    """A PIL grid of PIL images (rows of equal length), with optional column and row labels."""
    from PIL import Image, ImageDraw

    rows = [list(r) for r in rows]
    cw = max(im.width for r in rows for im in r)
    ch = max(im.height for r in rows for im in r)
    top = 14 if labels else 0
    left = 0
    if row_labels:
        left = min(240, 7 * max(len(s) for s in row_labels) + 8)
    ncol = max(len(r) for r in rows)
    W = left + ncol * (cw + pad) + pad
    H = top + len(rows) * (ch + pad) + pad
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, lab in enumerate(labels or []):
        draw.text((left + pad + j * (cw + pad), 1), lab, fill=(0, 0, 0))
    for i, r in enumerate(rows):
        y = top + pad + i * (ch + pad)
        if row_labels:
            draw.text((2, y + ch // 2 - 6), row_labels[i][: left // 7], fill=(0, 0, 0))
        for j, im in enumerate(r):
            grid.paste(im.convert("RGB"), (left + pad + j * (cw + pad), y))
    return grid


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "prompt"


def generate(
    *,
    model: str | None = None,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    backend: str = "torch",
    ratio: float | None = None,
    phases: bool = False,
    recipe=None,
    weights=None,
    router=None,
    artifacts=None,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    compare_dense: bool = False,
    dtype: str = "fp32",
    provider: str = "cpu",
    threads: int | None = None,
    device: str = "cpu",
    artifact_root: str | os.PathLike = "engines",
    progress: Callable[[str], None] | None = None,
    step_progress: Callable[[str, int, int], None] | None = None,
    context: str | None = None,
    loras=None,
    controlnet: str | os.PathLike | None = None,
    control_image: str | os.PathLike | None = None,
    control_scale: float = 1.0,
) -> dict[str, Any]:
    """Generates one image per prompt (seed ``seed + i``) and writes PNGs, ``generate.json`` and the grid.
    ``context`` (``"drop"`` / ``"keep"``, default the recipe's) and ``loras`` are :func:`load_pipeline`'s; ``controlnet``
    (folder or cached hub id of an ``SD3ControlNetModel``) with ``control_image`` and ``control_scale`` runs diffusers'
    ``StableDiffusion3ControlNetPipeline`` (dense comparison included) around the pruned transformer.

    Returns the record written to ``generate.json``.
    """
    import torch

    prompts = [p for p in prompts]
    rec, steps, guidance = _check_generate_options(model, recipe, prompts, steps, guidance, context)

    check_controlnet_options(rec.architecture, controlnet, control_image, control_scale)
    control = ControlRun(controlnet, control_image, control_scale) if controlnet is not None else None
    out = Path(out_dir)
    check_writable(out / "generate.json", "--out folder")
    say = progress or (lambda m: None)

    cfg = adapter_for_architecture(rec.architecture).uses_cfg(guidance)
    common = dict(
        recipe=rec,
        weights=weights,
        height=height,
        width=width,
        batch=1,
        cfg=cfg,
        dtype=dtype,
        provider=provider,
        threads=threads,
        device=device,
        artifact_root=artifact_root,
        progress=say,
        loras=loras,
        controlnet_layers=control.layers if control is not None and backend != "torch" else 0,
    )
    pipe = load_pipeline(
        backend=backend, ratio=ratio, phases=phases, router=router, artifacts=artifacts, context=context, **common
    )
    info = pipe.shiva
    dense_pipe = None
    if compare_dense:
        say("load dense pipeline")
        dense_pipe = load_pipeline(backend=backend, dense=True, **common)
    h = info.height if height is None else height
    w = info.width if width is None else width
    control_call = {}  # ControlNet's control_image and conditioning scale
    if control is not None:
        pipe, dense_pipe = control.wrap(pipe), (control.wrap(dense_pipe) if dense_pipe is not None else None)
        control_call = control.call_kwargs(h, w)
    for pp in (pipe, dense_pipe):  # the static-shape contract, before the first step
        if pp is not None:
            check_pipeline_call(
                pp, batch=1, height=h, width=w, guidance=guidance, max_sequence_length=pp.shiva.max_sequence_length
            )

    call = dict(
        negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=h, width=w, extra_call=control_call
    )
    if dense_pipe is not None:
        _warm_up((pipe, dense_pipe), prompts[0], seed, call, say)
    images = []
    for i, prompt in enumerate(prompts):
        say(f"generate {i + 1}/{len(prompts)}")
        images.append(
            _generate_one(pipe, dense_pipe, prompt, seed + i, out / f"{i:03d}-{slug(prompt)}", call, step_progress)
        )

    grid_path = _write_grid(images, out, f"shiva ({backend}, {budget_desc(info)})") if compare_dense else None
    record = generate_record(
        model=info.model,
        backend=backend,
        budget=budget_desc(info),
        steps=steps,
        guidance=guidance,
        cfg=cfg,
        height=h,
        width=w,
        device=str(pipe._execution_device),
        torch_threads=torch.get_num_threads(),
        pipeline=info.to_dict(),
        controlnet=control.to_dict() if control is not None else None,
        images=images,
        grid=str(grid_path) if grid_path else None,
    )
    atomic_write_json(out / "generate.json", record)
    record["record"] = str(out / "generate.json")
    return record


def _warm_up(pipes, prompt: str, seed: int, call: dict[str, Any], say) -> None:
    """One step each, so the first timed call of neither pipeline pays session/allocator start-up."""
    say("warm up")
    for pp in pipes:
        run_pipeline(pp, prompt, seed=seed, **dict(call, steps=1))


def _write_grid(images: list[dict[str, Any]], out: Path, label: str) -> Path:
    """``grid.png``: dense | pruned, one row per prompt (the images leave their entries)."""
    rows = [e.pop("_pil") for e in images]
    grid = image_grid(rows, labels=["dense", label], row_labels=[e["prompt"] for e in images])
    grid_path = out / "grid.png"
    _write_png(grid_path, grid)
    return grid_path


def _check_generate_options(model, recipe, prompts: list, steps, guidance, context):
    """Validates prompts, steps, guidance and context before any output is made: (recipe, steps, guidance)."""
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ConfigError(
            "no prompt given (or an empty one); pass --prompt TEXT (repeatable) or --prompts FILE with one prompt per line."
        )
    rec = generation_recipe(model, recipe)
    steps = rec.pipeline.steps if steps is None else steps
    guidance = rec.pipeline.guidance if guidance is None else guidance
    if not isinstance(steps, int) or steps < 1 or steps > 1000:
        raise ConfigError(f"--steps {steps} is out of range; expected 1..1000.")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"--guidance {guidance} is invalid; expected a finite number >= 0 (<= 1 turns CFG off).")
    if context is not None:
        adapter_for_architecture(rec.architecture).check_context(context)  # before the output folder is made
    return rec, steps, guidance


def _generate_one(
    pipe, dense_pipe, prompt: str, seed: int, stem: Path, call: dict[str, Any], step_progress
) -> dict[str, Any]:
    """One prompt through the pipeline (and the dense one): writes ``<stem>.png`` (and ``<stem>.dense.png``), returns its entry."""
    steps = call["steps"]
    tick = (lambda j, _p=prompt: step_progress(_p, j + 1, steps)) if step_progress else None
    res = run_pipeline(pipe, prompt, seed=seed, on_step=tick, **call)
    png = stem.parent / f"{stem.name}.png"
    entry: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": call["negative_prompt"],
        "seed": seed,
        "png": str(png),
        "timings_ms": res.times.to_dict(),
        "phase_trace": "".join(n[0].upper() for n in res.times.phase_trace),
        "phase_steps": {k: v["steps"] for k, v in res.times.per_phase().items()},
    }
    pil = _write_png(png, to_pil(res.image))
    if dense_pipe is not None:
        dtick = (lambda j, _p=prompt: step_progress(f"dense: {_p}", j + 1, steps)) if step_progress else None
        dres = run_pipeline(dense_pipe, prompt, seed=seed, on_step=dtick, **call)
        dpng = stem.parent / f"{stem.name}.dense.png"
        dpil = _write_png(dpng, to_pil(dres.image))
        entry["dense"] = _dense_comparison(res, dres, dpng)
        entry["_pil"] = (dpil, pil)
    return entry


def _dense_comparison(res, dres, dpng: Path) -> dict[str, Any]:
    """How far the pruned image is from the dense one, and the speed-ups."""
    import numpy as np

    p = psnr(res.image, dres.image)
    return {
        "png": str(dpng),
        "timings_ms": dres.times.to_dict(),
        "psnr_db": None if math.isinf(p) else round(p, 3),
        "identical": bool(np.array_equal(res.image, dres.image)),
        "mean_abs_diff": float(np.mean(np.abs(np.asarray(res.image, np.float64) - np.asarray(dres.image, np.float64)))),
        "latent_max_abs": float((res.latents.float() - dres.latents.float()).abs().max())
        if res.latents is not None
        else None,
        "transformer_speedup": round(dres.times.transformer_total / max(res.times.transformer_total, 1e-9), 4),
        "e2e_speedup": round(dres.times.total / max(res.times.total, 1e-9), 4),
    }


def budget_desc(info) -> str:
    if info.dense:
        return "dense"
    ctx = "" if info.context in (None, "drop") else f", context {info.context}"
    if len(info.phases) == 1 and info.phases[0].name.startswith("ratio"):
        return f"ratio {info.phases[0].name[5:]}{ctx}"
    return "phases " + "/".join(p.name for p in info.phases) + ctx
