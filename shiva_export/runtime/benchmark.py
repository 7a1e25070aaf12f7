"""End-to-end speed: dense vs Shiva pipelines (any architecture with a pipeline), interleaved, per stage, next to the FLOP ideal.

:func:`benchmark_e2e` is what ``shiva-export validate speed --e2e`` runs. Every variant (dense and each
budget, per backend) is a full diffusers pipeline run with the same prompt and seed; variants run
round-robin so drift on a shared machine hits all of them alike, and each stage's median over the rounds
is reported: text encoding, the denoising loop (transformer total and median per step, loop overhead),
VAE decode and post-processing.

Speedups are against the dense pipeline of the same backend: ``e2e = total_dense / total_pruned`` and
``transformer = transformer_dense / transformer_pruned``. The ideal transformer speedup is the FLOP ratio
over the steps actually run (the adapter's ``count_flops``, each step on the phase that ran it); the ideal end to end counts every non-transformer stage as unchanged (Amdahl):
``total_dense / (non_transformer_dense + transformer_dense / ideal_transformer)``. Efficiency is
measured / ideal.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, HardwareError
from shiva_export.logging import get_logger
from shiva_export.models import adapter_for_architecture
from shiva_export.prune.api import is_shiva_applied, set_shiva_config_, shiva_config
from shiva_export.runtime.generate import run_pipeline
from shiva_export.runtime.pipeline import config_obj, generation_recipe, load_pipeline
from shiva_export.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable
from shiva_export.utils.machine import loadavg, machine_info
from shiva_export.utils.plots import figure_png, pyplot

__all__ = ["E2EVariant", "E2EReport", "benchmark_e2e"]

logger = get_logger(__name__)

_STAGES = ("text_encode", "transformer", "loop_overhead", "vae_decode", "postprocess")


def _load(v) -> str:
    return "unavailable" if v is None else f"{v:.2f}"


@dataclass
class E2EVariant:
    backend: str
    budget: str  # "dense", "ratio 0.40", "phases early/late"
    runs: list[dict[str, Any]] = field(default_factory=list)  # StageTimes.to_dict() per round
    phase_steps: dict[str, int] = field(default_factory=dict)
    flops: float | None = None  # transformer FLOPs over the whole loop
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        vals = [r["transformer"]["total"] if key == "transformer" else r[key] for r in self.runs]
        return float(statistics.median(vals))

    def per_step(self) -> float:
        return float(statistics.median(r["transformer"]["per_step_median"] for r in self.runs))


@dataclass
class E2EReport:
    model: str
    steps: int
    guidance: float
    height: int
    width: int
    warmup: int
    repeats: int
    device: str
    dtype: str
    compile: bool
    variants: list[E2EVariant]
    machine: dict[str, Any]
    command: str

    def _dense(self, backend: str) -> E2EVariant:
        return next(v for v in self.variants if v.backend == backend and v.budget == "dense")

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for v in self.variants:
            d = self._dense(v.backend)
            row = {
                "backend": v.backend,
                "budget": v.budget,
                **{s: round(v.median(s), 3) for s in ("total", *_STAGES, "denoise_loop")},
                "transformer_per_step": round(v.per_step(), 3),
                "phase_steps": v.phase_steps,
            }
            tr = d.median("transformer") / v.median("transformer")
            e2e = d.median("total") / v.median("total")
            ideal_tr = (d.flops / v.flops) if (d.flops and v.flops) else None
            ideal_e2e = None
            if ideal_tr:
                ideal_e2e = d.median("total") / (
                    (d.median("total") - d.median("transformer")) + d.median("transformer") / ideal_tr
                )
            row.update(
                transformer_speedup=round(tr, 4),
                e2e_speedup=round(e2e, 4),
                ideal_transformer=round(ideal_tr, 4) if ideal_tr else None,
                ideal_e2e=round(ideal_e2e, 4) if ideal_e2e else None,
                transformer_efficiency=round(tr / ideal_tr, 4) if ideal_tr else None,
                e2e_efficiency=round(e2e / ideal_e2e, 4) if ideal_e2e else None,
                transformer_share=round(v.median("transformer") / v.median("total"), 4),
                tflops=round(v.flops / 1e12, 6) if v.flops else None,
            )
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "steps": self.steps,
            "guidance": self.guidance,
            "height": self.height,
            "width": self.width,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "device": self.device,
            "dtype": self.dtype,
            "compile": self.compile,
            "machine": self.machine,
            "command": self.command,
            "rows": self.rows(),
            "variants": [
                {
                    "backend": v.backend,
                    "budget": v.budget,
                    "phase_steps": v.phase_steps,
                    "artifacts": v.artifacts,
                    "runs": v.runs,
                }
                for v in self.variants
            ],
        }

    def table_markdown(self) -> str:
        head = (
            "| backend | budget | total ms | text enc | denoise loop | transformer (per step) | loop overhead | VAE decode | "
            "transformer speedup (ideal, eff.) | e2e speedup (ideal, eff.) |"
        )
        lines = [head, "|" + "---|" * 10]
        for r in self.rows():

            def f(x, ideal, eff):
                return f"{x:.2f}x" + (f" ({ideal:.2f}x, {eff:.0%})" if ideal else "")

            lines.append(
                f"| {r['backend']} | {r['budget']} | {r['total']:.1f} | {r['text_encode']:.1f} | {r['denoise_loop']:.1f} | "
                f"{r['transformer']:.1f} ({r['transformer_per_step']:.2f}) | {r['loop_overhead']:.1f} | {r['vae_decode']:.1f} | "
                f"{f(r['transformer_speedup'], r['ideal_transformer'], r['transformer_efficiency'])} | "
                f"{f(r['e2e_speedup'], r['ideal_e2e'], r['e2e_efficiency'])} |"
            )
        return "\n".join(lines)

    def to_markdown(self) -> str:
        m = self.machine
        return "\n".join(
            [
                f"# End-to-end speed: {self.model}, {self.width}x{self.height}, {self.steps} steps, guidance {self.guidance}",
                "",
                f"Device {self.device}, {self.dtype}{', torch.compile' if self.compile else ''}; {self.warmup} warm-up + {self.repeats} interleaved "
                f"rounds, medians (ms). Machine: {m.get('cpu_model') or m.get('cpu', '?')}, {m.get('threads', '?')} threads, 1-min load average "
                f"{_load(m.get('loadavg_start', m.get('load_start')))} -> {_load(m.get('loadavg_end', m.get('load_end')))}.",
                "Speedups vs the dense pipeline of the same backend; ideal = FLOP ratio (transformer) and Amdahl with every other stage unchanged (e2e).",
                "",
                self.table_markdown(),
                "",
                f"Reproduce: `{self.command}`",
                "",
            ]
        )


def _flops_of(
    adapter,
    config: dict[str, Any],
    n_tokens: int,
    text_len: int,
    model_batch: int,
    phases,
    phase_steps: dict[str, int],
    bottleneck: int,
    context: str = "drop",
) -> float:
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if not phases:
        return float(adapter.count_flops(cfg, n_tokens, text_len, None, batch=model_batch).total) * sum(
            phase_steps.values() or [0]
        )
    total = 0.0
    by_name = {p.name: p for p in phases}
    for name, steps in phase_steps.items():
        p = by_name[name]
        total += steps * float(
            adapter.count_flops(
                cfg, n_tokens, text_len, p.keep_ratios, batch=model_batch, bottleneck=bottleneck, context=context
            ).total
        )
    return total


def benchmark_e2e(
    *,
    model: str = "sd35-tiny",
    recipe=None,
    weights=None,
    backends: Sequence[str] = ("ort",),
    ratios: Sequence[float] = (0.4,),
    phases: bool = False,
    steps: int | None = None,
    guidance: float | None = None,
    prompt: str | None = None,
    seed: int = 0,
    warmup: int = 1,
    repeats: int = 5,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    compile: bool = False,
    artifact_root: str | os.PathLike = "engines",
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> E2EReport:
    """Times dense and Shiva pipelines end to end, interleaved; writes ``e2e.{json,md,png}`` to ``out_dir``."""
    import torch

    say = progress or (lambda m: None)
    rec = generation_recipe(model, recipe)

    adapter = adapter_for_architecture(rec.architecture)
    prompt = adapter.EXAMPLE_PROMPT if prompt is None else prompt
    steps = rec.pipeline.steps if steps is None else steps
    guidance = rec.pipeline.guidance if guidance is None else guidance
    _check_e2e_options(backends, ratios, phases, steps, warmup, repeats, device, dtype, compile)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_writable(out / "e2e.json", "--out-dir")
    if threads is not None:
        torch.set_num_threads(threads)
    load_start = loadavg()

    load = dict(
        recipe=rec,
        weights=weights,
        cfg=adapter.uses_cfg(guidance),
        dtype=dtype,
        threads=threads,
        device=device,
        artifact_root=artifact_root,
    )
    variants = _load_variants(backends, ratios, phases, load, compile, say)
    for i in range(warmup):
        for v, pipe in variants:
            say(f"warm-up {i + 1}/{warmup}: {v.backend} {v.budget}")
            run_pipeline(pipe, prompt, steps=steps, guidance=guidance, seed=seed)
    for i in range(repeats):
        for v, pipe in variants:
            say(f"round {i + 1}/{repeats}: {v.backend} {v.budget}")
            res = run_pipeline(pipe, prompt, steps=steps, guidance=guidance, seed=seed)
            v.runs.append(res.times.to_dict())
            v.phase_steps = {k: d["steps"] for k, d in res.times.per_phase().items()} or {
                "dense": len(res.times.transformer)
            }
    _count_flops(variants, adapter, rec, guidance)
    cmd = (
        f"shiva-export validate speed --e2e --model {rec.name} "
        + " ".join(f"--backend {b}" for b in backends)
        + " "
        + " ".join(f"--ratio {r}" for r in ratios)
        + (" --phases" if phases else "")
        + f" --steps {steps} --warmup {warmup} --repeats {repeats}"
        + (f" --threads {threads}" if threads else "")
        + (f" --device {device}" if device != "cpu" else "")
        + (f" --dtype {dtype}" if dtype != "fp32" else "")
        + (" --compile" if compile else "")
    )
    machine = machine_info(load_start)
    machine["threads"] = torch.get_num_threads()
    any_pipe = variants[0][1]
    report = E2EReport(
        rec.name,
        steps,
        guidance,
        any_pipe.shiva.height,
        any_pipe.shiva.width,
        warmup,
        repeats,
        device,
        dtype,
        compile,
        [v for v, _ in variants],
        machine,
        cmd,
    )
    if out is not None:
        atomic_write_json(out / "e2e.json", report.to_dict())
        atomic_write_text(out / "e2e.md", report.to_markdown())
        atomic_write_bytes(out / "e2e.png", _plot_png(report))
    return report


def _check_e2e_options(
    backends, ratios, phases: bool, steps, warmup: int, repeats: int, device: str, dtype: str, compile: bool
) -> None:
    """Every option of an end-to-end run, before any pipeline loads."""
    for b in backends:
        if b not in ("torch", "ort", "trt"):
            raise ConfigError(f"--backend {b!r} is unknown for --e2e; choose torch, ort or trt.")
    if not ratios and not phases:
        raise ConfigError("give at least one --ratio, or --phases, to compare with dense.")
    for r in ratios:
        if not (0.0 <= r < 1.0):
            raise ConfigError(
                f"--ratio {r} is out of range; expected 0 <= ratio < 1 (fraction of image tokens pruned)."
            )
    if not isinstance(steps, int) or steps < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(
            f"steps {steps}, warmup {warmup}, repeats {repeats}: expected steps >= 1, warmup >= 0, repeats >= 1."
        )
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is unknown; choose cpu or cuda.")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HardwareError(
                "--device cuda needs a CUDA GPU, and torch sees none. Run on a GPU machine or use --device cpu."
            )
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--dtype {dtype!r} is unknown; choose fp32, fp16 or bf16.")
    if compile and any(b != "torch" for b in backends):
        raise ConfigError("--compile applies to the torch backend only; pass --backend torch.")
    if compile and phases:
        raise ConfigError(
            "--compile needs one static budget per graph; use --ratio (phases dispatch on the timestep in Python)."
        )


def _load_variants(
    backends, ratios, phases: bool, load: dict[str, Any], compile: bool, say
) -> list[tuple[E2EVariant, Any]]:
    """One pipeline per backend and budget (dense, each ratio, the learned phases), each with ``load_pipeline(**load)``."""
    budgets: list[tuple[str, dict[str, Any]]] = [("dense", {"dense": True})]
    budgets += [(f"ratio {r:.2f}", {"ratio": r}) for r in ratios]
    if phases:
        budgets.append(("phases", {"phases": True}))
    variants: list[tuple[E2EVariant, Any]] = []
    for b in backends:
        for label, kw in budgets:
            say(f"load {b} {label}")
            provider = "cuda" if load["device"] == "cuda" and b == "ort" else "cpu"
            pipe = load_pipeline(backend=b, provider=provider, **load, **kw)
            if compile:
                _compile(pipe)
            name = label if label != "phases" else "phases " + "/".join(p.name for p in pipe.shiva.phases)
            variants.append((E2EVariant(b, name, artifacts=pipe.shiva.artifacts), pipe))
    return variants


def _count_flops(variants: list[tuple[E2EVariant, Any]], adapter, rec, guidance: float) -> None:
    """FLOPs of the transformer over the loop, each step on the phase that ran it."""
    any_pipe = variants[0][1]
    config = dict(any_pipe.transformer.config)
    n_tokens = adapter.num_image_tokens(config_obj(config), any_pipe.shiva.height, any_pipe.shiva.width)
    model_batch = 2 if adapter.uses_cfg(guidance) else 1
    for v, pipe in variants:
        ph = () if pipe.shiva.dense else pipe.shiva.phases
        v.flops = _flops_of(
            adapter,
            config,
            n_tokens,
            pipe.shiva.text_len,
            model_batch,
            ph,
            v.phase_steps,
            rec.router.bottleneck,
            pipe.shiva.context or "drop",
        )


def _compile(pipe) -> None:
    """torch.compile with CUDA graphs ('reduce-overhead'): static shapes are the point of a static budget."""
    import torch

    t = pipe.transformer
    if is_shiva_applied(t):
        set_shiva_config_(
            t, shiva_config(t).with_keep_ratios(pipe.shiva.phases[0].keep_ratios)
        )  # fixed graph, no per-call dispatch
    t.forward = torch.compile(
        t.forward,
        mode="reduce-overhead" if str(pipe._execution_device).startswith("cuda") else "default",
        fullgraph=False,
    )


def _plot_png(report: E2EReport) -> bytes:
    plt = pyplot()

    rows = report.rows()
    labels = [f"{r['backend']}\n{r['budget']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.2))
    bottom = [0.0] * len(rows)
    colors = {
        "text_encode": "#8da0cb",
        "transformer": "#fc8d62",
        "loop_overhead": "#ffd92f",
        "vae_decode": "#66c2a5",
        "postprocess": "#b3b3b3",
    }
    for s in _STAGES:
        vals = [r[s] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=s.replace("_", " "), color=colors[s])
        bottom = [a + b for a, b in zip(bottom, vals)]
    for x, r in enumerate(rows):
        tag = f"{r['e2e_speedup']:.2f}x" + (
            f"\n(ideal {r['ideal_e2e']:.2f}x)" if r["ideal_e2e"] and r["budget"] != "dense" else ""
        )
        ax.text(x, bottom[x], tag, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("median ms per image")
    ax.set_title(
        f"{report.model} {report.width}x{report.height}, {report.steps} steps: end to end by stage", fontsize=10
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, max(bottom) * 1.25)
    return figure_png(fig)
