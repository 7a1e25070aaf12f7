"""Wall-clock speed of the dense vs the Shiva-pruned transformer, next to the FLOP model's ideal.

:func:`benchmark_speed` times one transformer forward (one denoising step) of

* the **dense** model: the plain diffusers ``SD3Transformer2DModel`` (no Shiva applied, no router), and
* the **pruned** model at each ratio: uniform keep ``1 - ratio`` in the recipe's routed blocks (block 0
  always dense), with the recipe's router (trained weights, else its seeded random router),

on the same inputs, shapes and dtype (fp32), in

* ``torch``: PyTorch eager under ``torch.inference_mode()`` (CPU, or CUDA with ``device="cuda"``), and
* ``ort``: ONNX Runtime ``CPUExecutionProvider``. Each variant is exported once into a temporary folder:
  the pruned ones with :func:`~shiva_export.export.pruned.export_pruned` (``validate=False``), the dense
  one with :func:`~shiva_export.export.onnx.export_onnx` on the model without Shiva.

Benchmark hygiene (``feasibility.md`` section 6: back-to-back runs drifted by up to 25 % on a shared
2-core box): every round runs **every variant once**, in an order rotated by one each round, after
``warmup`` untimed rounds. The speedup of a variant is the **median of the per-round ratios**
``dense / pruned`` of the same backend, so slow drifts of the machine cancel. ORT sessions run with
``intra_op_num_threads = threads``, one inter-op thread, sequential execution and intra-op spinning
**off** (a spinning ORT pool would steal the cores from the next PyTorch run in the rotation).

Overhead of routing: the selection path alone (router -> :func:`~shiva_export.prune.topk.select_topk` ->
gather -> scatter, for every routed block, on the block inputs recorded from a real pruned forward) is
timed as its own variant in the same rounds, in PyTorch and, as a selection-only ONNX graph, in ONNX
Runtime. Its median as a share of the pruned forward's median is the ``overhead %``.

Ideal speedups come from :mod:`shiva_export.validate.flops` for the same configuration (model batch,
image and text tokens, keep schedule, router width); ``efficiency = measured / ideal``.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shiva_export._imports import lazy_import, require
from shiva_export.errors import ConfigError, HardwareError, ShivaInternalError
from shiva_export.export.onnx import export_onnx, package_versions, quiet_exporter
from shiva_export.export.ort import ort_session
from shiva_export.export.pruned import export_pruned, resolve_router, router_tensor_hash
from shiva_export.logging import get_logger
from shiva_export.models import (
    InputSpec,
    check_image_size,
    get_adapter,
    input_names,
    load_transformer,
    make_inputs,
    num_blocks,
    num_image_tokens,
    router_dims,
)
from shiva_export.prune.api import (
    ShivaConfig,
    apply_shiva_,
    block_budgets,
    is_shiva_applied,
    record_selection,
    remove_shiva_,
)
from shiva_export.prune.router import RouterBank
from shiva_export.prune.topk import gather_tokens, scatter_tokens, select_topk
from shiva_export.recipe import load_recipe
from shiva_export.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable
from shiva_export.utils.machine import loadavg as _loadavg
from shiva_export.utils.machine import machine_info as _machine
from shiva_export.validate.flops import count_model_flops, ideal_speedup

__all__ = ["SpeedRow", "SpeedReport", "benchmark_speed", "BACKENDS"]

logger = get_logger(__name__)
ort = lazy_import("onnxruntime", purpose="ONNX Runtime speed benchmarks")

BACKENDS = ("torch", "ort")
_DEVICES = ("cpu", "cuda")
_ORT_OPSET = 20


@dataclass
class SpeedRow:
    """Timings of one variant on one backend.

    Args:
        backend (str): ``torch`` or ``ort``.
        variant (str): ``dense`` or ``ratio0.40``.
        ratio (float | None): Fraction of image tokens pruned per routed block; None for dense.
        keep (float): ``1 - ratio`` (1.0 for dense).
        k (int | None): Tokens each routed block keeps; None for dense.
        times_ms (list[float]): Per-round forward times in ms, in round order.
        median_ms (float): Median forward time.
        p90_ms (float): 90th percentile forward time.
        speedup (float): Median over rounds of ``dense / this`` (same backend, same round); 1.0 for dense.
        ideal_speedup (float): FLOP ratio dense / this (:func:`~shiva_export.validate.flops.ideal_speedup`).
        efficiency (float | None): ``speedup / ideal_speedup``; None for dense.
        flops (int): FLOPs of one forward of this variant.
        overhead_ms (float | None): Median time of the selection path alone (router + top-k + gather +
            scatter of every routed block); None for dense or when not measured.
        overhead_pct (float | None): ``100 * overhead_ms / median_ms``.
    """

    backend: str
    variant: str
    ratio: float | None
    keep: float
    k: int | None
    times_ms: list[float]
    median_ms: float
    p90_ms: float
    speedup: float
    ideal_speedup: float
    efficiency: float | None
    flops: int
    overhead_ms: float | None = None
    overhead_pct: float | None = None
    overhead_times_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SpeedReport:
    """Result of :func:`benchmark_speed`; ``to_dict`` is what ``speed.json`` holds."""

    model: str
    device: str
    dtype: str
    spec: dict[str, Any]
    model_config: dict[str, Any]
    num_layers: int
    model_batch: int
    num_image_tokens: int
    text_len: int
    routed_blocks: list[int]
    warmup: int
    repeats: int
    threads: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, str]
    rows: list[SpeedRow]
    flops: dict[str, Any]
    timings: dict[str, Any]
    notes: list[str]
    command: str
    architecture: str = "sd3"

    def row(self, backend: str, ratio: float | None) -> SpeedRow:
        """The row of ``backend`` at ``ratio`` (None = dense)."""
        for r in self.rows:
            if r.backend == backend and r.ratio == ratio:
                return r
        raise KeyError(f"no row for backend {backend!r} at ratio {ratio!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "rows"}
        d["rows"] = [r.to_dict() for r in self.rows]
        d["method"] = {
            "timing": "interleaved round-robin: every round runs every variant once, order rotated by one per round",
            "speedup": "median over rounds of dense_ms / pruned_ms (same backend, same round)",
            "ideal_speedup": "FLOP ratio from shiva_export.validate.flops (2 FLOPs per multiply-add, matrix products only)",
            "efficiency": "speedup / ideal_speedup",
            "overhead": "median of the selection path alone (router + top-k + gather + scatter, all routed blocks) / median pruned forward",
        }
        return d

    def table_markdown(self) -> str:
        """The result table alone (one row per backend x variant)."""
        lines = [
            "| backend | ratio | keep | k | median ms | p90 ms | measured speedup | ideal speedup | efficiency | overhead % |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            ratio = "dense" if r.ratio is None else f"{r.ratio:.2f}"
            k = "—" if r.k is None else str(r.k)
            eff = "—" if r.efficiency is None else f"{100 * r.efficiency:.0f} %"
            ovh = "—" if r.overhead_pct is None else f"{r.overhead_pct:.1f}"
            lines.append(
                f"| {r.backend} | {ratio} | {r.keep:.2f} | {k} | {r.median_ms:.1f} | {r.p90_ms:.1f} | "
                f"{r.speedup:.2f}x | {r.ideal_speedup:.2f}x | {eff} | {ovh} |"
            )
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """A short Markdown report: setup, the table, notes."""
        s = self.spec
        th = self.threads
        head = [
            f"### Speed: {self.model}, {s['height']}x{s['width']} px, batch {s['batch']}{' (CFG, model batch ' + str(self.model_batch) + ')' if s['cfg'] else ''}",
            "",
            f"- shapes: {self.num_image_tokens} image tokens + {self.text_len} text tokens, {self.dtype}, torch on {self.device}, ORT CPUExecutionProvider",
            f"- routed blocks: {self.routed_blocks[0]}..{self.routed_blocks[-1]} ({len(self.routed_blocks)} of {self.num_layers}), block 0 dense, uniform keep per variant",
            f"- threads: torch {th['torch_intra_op']} (inter-op {th['torch_inter_op']}), ORT intra-op {th.get('ort_intra_op', '—')} "
            f"(inter-op {th.get('ort_inter_op', '—')}, sequential, spinning off); {self.machine['logical_cpus']} logical CPUs",
            f"- CPU: {self.machine['cpu_model']} (family {self.machine.get('cpu_family')}, model {self.machine.get('cpu_model_number')}, "
            f"{', '.join(self.machine.get('cpu_simd') or []) or 'SIMD flags unknown'}); 1-min load average {self.machine['loadavg_start']} before the run, {self.machine['loadavg_end']} at the end (includes this benchmark)",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
            f"- {self.warmup} warm-up rounds, {self.repeats} timed rounds, interleaved round-robin; speedup = median of per-round paired ratios",
            "",
        ]
        return "\n".join(head) + "\n" + self.table_markdown() + "\n" + "".join(f"- {n}\n" for n in self.notes)


# --------------------------------------------------------------------------------------------------


class _SelectionPath(nn.Module):
    """Router + top-k + gather + scatter of every routed block, on given block inputs (no block compute)."""

    def __init__(self, bank: nn.Module, budgets: dict[int, int], cfg: bool, selection: str):
        super().__init__()
        self.bank = bank
        self.blocks = list(budgets)
        self.budgets = dict(budgets)
        self.cfg = cfg
        self.selection = selection

    def forward(
        self, hidden: tuple[torch.Tensor, ...], temb: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        outs = []
        for b, x in zip(self.blocks, hidden):
            scores = self.bank(b, x, temb, pooled)
            idx = select_topk(scores, self.budgets[b], cfg=self.cfg, selection=self.selection)
            kept = gather_tokens(x, idx)
            outs.append(scatter_tokens(x, idx, kept))  # same shape and cost as scattering the block output
        return tuple(outs)


@dataclass
class _Variant:
    key: str
    run: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _check_args(ratios, backends, warmup, repeats, threads, device) -> tuple[list[float], list[str]]:
    ratios = list(ratios)
    if not ratios:
        raise ConfigError("ratios is empty. Give at least one ratio in [0, 1). Pass e.g. ratios=[0.0, 0.4, 0.6].")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ConfigError(
                f"ratio {r!r} is out of range. Expected 0 <= ratio < 1 (fraction of image tokens pruned). Fix ratios."
            )
    if len(set(ratios)) != len(ratios):
        raise ConfigError(f"ratios {ratios} holds duplicates. Each ratio must appear once. Remove the duplicates.")
    backends = list(backends)
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad or len(set(backends)) != len(backends):
        raise ConfigError(
            f"backends {backends} is invalid. Choose one or more of {list(BACKENDS)}, each once. Fix backends."
        )
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup {warmup!r} is invalid. Expected an integer >= 0. Pass e.g. warmup=3.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats {repeats!r} is invalid. Expected an integer >= 1. Pass e.g. repeats=15.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(
            f"threads {threads!r} is invalid. Expected an integer >= 1 or None (keep torch's setting). Pass e.g. threads=2."
        )
    if device not in _DEVICES:
        raise ConfigError(f"device {device!r} is unknown. Choose one of {list(_DEVICES)}. Pass device='cpu'.")
    if device == "cuda" and not torch.cuda.is_available():
        raise HardwareError(
            "device 'cuda' was requested but torch sees no CUDA GPU. A CUDA build and a GPU are needed. Use device='cpu'."
        )
    return [float(r) for r in ratios], backends


def _command(model, ratios, backends, height, width, batch, cfg, warmup, repeats, threads, device) -> str:
    args = [f"model={model!r}", f"ratios={ratios!r}", f"backends={backends!r}"]
    if height is not None:
        args.append(f"height={height}")
    if width is not None:
        args.append(f"width={width}")
    args += [f"batch={batch}", f"cfg={cfg}", f"warmup={warmup}", f"repeats={repeats}", f"threads={threads}"]
    if device != "cpu":
        args.append(f"device={device!r}")
    return f"benchmark_speed({', '.join(args)})"


def benchmark_speed(
    model: str = "sd3-mid",
    ratios: Sequence[float] = (0.0, 0.4, 0.6),
    backends: Sequence[str] = ("torch", "ort"),
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    cfg: bool = False,
    warmup: int = 3,
    repeats: int = 15,
    threads: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> SpeedReport:
    """Times the dense and the pruned transformer (interleaved), next to the FLOP model's ideal speedup.

    Args:
        model (str): Built-in model name (recipe), e.g. ``sd3-mid`` or ``sd3-tiny``. Defaults to ``sd3-mid``.
        ratios (Sequence[float]): Fractions of image tokens pruned in every routed block, each in [0, 1);
            0.0 routes every token through the full top-k path (pure routing overhead). Defaults to
            (0.0, 0.4, 0.6).
        backends (Sequence[str]): ``torch`` (eager) and/or ``ort`` (ONNX Runtime CPU). Defaults to both.
        height (int): Image height in pixels. Defaults to the recipe's.
        width (int): Image width in pixels. Defaults to the recipe's.
        batch (int): Prompts per call. Defaults to 1.
        cfg (bool): Batch holds uncond/cond halves (model batch ``2 * batch``). Defaults to False.
        warmup (int): Untimed rounds before timing. Defaults to 3.
        repeats (int): Timed rounds (each runs every variant once). Defaults to 15.
        threads (int): Threads for torch (``torch.set_num_threads``, restored afterwards) and ORT
            (``intra_op_num_threads``). Defaults to None: torch's current setting, used for ORT too.
        out_dir (PathLike): Folder for ``speed.json``, ``speed.md`` and ``speed.png`` (written
            atomically). Defaults to None (nothing written).
        progress (Callable[[str], None]): Called with a stage name when each stage starts. Defaults to None.
        device (str): Device of the torch backend, ``cpu`` or ``cuda``; ORT always runs on CPU. Defaults to ``cpu``.

    Returns:
        SpeedReport: Per backend and variant: median/p90 ms, paired speedup, ideal speedup, efficiency,
        routing overhead; plus threads, CPU model and versions.

    Example:
        >>> rep = benchmark_speed("sd3-tiny", ratios=[0.4], warmup=1, repeats=3, threads=2)  # doctest: +SKIP
        >>> rep.row("ort", 0.4).speedup  # doctest: +SKIP
        1.31
    """
    say = progress or (lambda stage: None)
    ratios_l, backends_l = _check_args(ratios, backends, warmup, repeats, threads, device)
    load_start = _loadavg()  # before this process adds its own load
    if load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        logger.warning(
            "load average %.2f on %s CPUs before the benchmark: other processes will add noise",
            load_start,
            os.cpu_count(),
        )
    rec = load_recipe(model)
    spec = InputSpec(
        batch=batch,
        height=height if height is not None else rec.shapes.height,
        width=width if width is not None else rec.shapes.width,
        text_len=rec.shapes.text_len,
        cfg=bool(cfg),
    )
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        check_writable(out_path / "speed.json", "--out-dir")  # before minutes of timing
    command = _command(model, ratios_l, backends_l, height, width, batch, cfg, warmup, repeats, threads, device)

    old_threads = torch.get_num_threads()
    n_threads = threads if threads is not None else old_threads
    torch.set_num_threads(n_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="shiva-speed-") as tmp:
            report = _run(
                rec, spec, ratios_l, backends_l, warmup, repeats, n_threads, device, Path(tmp), say, command, load_start
            )
    finally:
        torch.set_num_threads(old_threads)

    if out_path is not None:
        say("write report")
        _write_outputs(report, out_path)
    return report


class _Bench:
    """The model, keep schedules, router, FLOP model and inputs one benchmark times, and its timings."""

    def __init__(self, rec, spec: InputSpec, ratios: list[float], say):
        self.rec, self.spec, self.ratios = rec, spec, ratios
        self.timings: dict[str, Any] = {}
        say("load model")
        t0 = time.perf_counter()
        self.transformer = transformer = load_transformer(recipe=rec, dtype="fp32")
        self.timings["load_seconds"] = round(time.perf_counter() - t0, 3)
        check_image_size(transformer, spec.height, spec.width)
        self.n_layers = num_blocks(transformer)
        self.n_tokens = num_image_tokens(transformer, spec.height, spec.width)
        self.routed = rec.routed_blocks(self.n_layers)
        self.configs = {
            r: ShivaConfig.uniform(
                self.n_layers,
                r,
                self.routed,
                cfg=spec.cfg,
                bottleneck=rec.router.bottleneck,
                group_size=rec.router.group_size,
            )
            for r in ratios
        }
        self.budgets = {
            r: block_budgets(c, self.n_tokens) for r, c in self.configs.items()
        }  # raises if a ratio leaves k = 0
        self._router()
        self._flops()
        self.inputs = make_inputs(transformer, spec, seed=0)

    def _router(self) -> None:
        rec = self.rec
        rc = self.configs[self.ratios[0]].router_config(*router_dims(self.transformer))
        bank, self.router_info = resolve_router(rec, None, rc)
        if bank is None:  # the recipe's seeded random router, exactly as apply_shiva_/export_pruned build it
            bank = RouterBank(rc)
            bank.reset_parameters(rec.router.seed)
        self.bank = bank
        self.router_info.update(
            tensor_sha256=router_tensor_hash(bank), num_routers=rc.num_routers, parameters=bank.num_parameters()
        )

    def _flops(self) -> None:
        """The ideal: analytic FLOPs of the dense and every pruned configuration."""
        t, spec = self.transformer, self.spec
        fl_kwargs = dict(batch=spec.model_batch, bottleneck=self.rec.router.bottleneck)
        self.dense_flops = count_model_flops(t, t.config, self.n_tokens, spec.text_len, None, **fl_kwargs)
        self.pruned_flops = {
            r: count_model_flops(t, t.config, self.n_tokens, spec.text_len, self.configs[r].keep_ratios, **fl_kwargs)
            for r in self.ratios
        }
        self.ideal = {r: ideal_speedup(self.dense_flops, f) for r, f in self.pruned_flops.items()}


def _run(
    rec, spec: InputSpec, ratios, backends, warmup, repeats, threads, device, tmp: Path, say, command, load_start
) -> SpeedReport:
    bench = _Bench(rec, spec, ratios, say)
    variants: list[_Variant] = []
    if "ort" in backends:  # done first: export_onnx needs the model without Shiva
        variants += _ort_variants(bench, tmp, threads, say)
    torch_variants, selection = _torch_variants(bench, torch.device(device), say)
    if "torch" in backends:
        variants += torch_variants
    notes: list[str] = []
    if "ort" in backends:
        variants += _ort_selection_variants(bench, selection, tmp, threads, torch.device(device), notes, say)
    times = _round_robin(bench, variants, warmup, repeats, say)
    if is_shiva_applied(bench.transformer):
        remove_shiva_(bench.transformer)
    rows = _rows(bench, backends, times)
    return _report(bench, rows, backends, warmup, repeats, threads, device, notes, command, load_start)


def _ort_variants(bench: _Bench, tmp: Path, threads, say) -> list[_Variant]:
    """The dense and pruned ONNX exports (checked to use the benchmark's budgets and router) as ORT sessions."""
    rec, spec, timings = bench.rec, bench.spec, bench.timings
    say("export onnx (dense)")
    t0 = time.perf_counter()
    export_onnx(bench.transformer, tmp / "dense.onnx", spec, opset=rec.export.opset, routed_blocks=None)
    timings["export_seconds"] = {"dense": round(time.perf_counter() - t0, 3)}
    for r in bench.ratios:
        say(f"export onnx (ratio {r:.2f})")
        t0 = time.perf_counter()
        res = export_pruned(
            recipe=rec,
            ratio=r,
            height=spec.height,
            width=spec.width,
            batch=spec.batch,
            text_len=spec.text_len,
            cfg=spec.cfg,
            dtype="fp32",
            validate=False,
            out=tmp / f"ratio{r:.2f}.onnx",
        )
        timings["export_seconds"][f"ratio{r:.2f}"] = round(time.perf_counter() - t0, 3)
        if res.budgets != bench.budgets[r]:
            raise ShivaInternalError(f"export budgets {res.budgets} differ from the benchmark's {bench.budgets[r]}")
        if res.router["tensor_sha256"] != bench.router_info["tensor_sha256"]:
            raise ShivaInternalError("the exported router differs from the benchmark's torch router")
    say("onnxruntime sessions")
    t0 = time.perf_counter()
    sessions = {"dense": ort_session(tmp / "dense.onnx", threads=threads)}
    for r in bench.ratios:
        sessions[f"ratio{r:.2f}"] = ort_session(tmp / f"ratio{r:.2f}.onnx", threads=threads)
    timings["ort_session_seconds"] = round(time.perf_counter() - t0, 3)
    feeds = {n: bench.inputs[n].numpy() for n in input_names(bench.transformer)}
    return [_Variant(f"ort/{name}", lambda s=sess: s.run(None, feeds)) for name, sess in sessions.items()]


def _torch_variants(bench: _Bench, tdev: torch.device, say) -> tuple[list[_Variant], tuple]:
    """The torch dense, pruned and selection-path variants, and the selection path's recorded inputs
    ``(block inputs per ratio, temb, pooled)``."""
    transformer, configs, bank = bench.transformer, bench.configs, bench.bank
    transformer.to(tdev)
    tin = {k: v.to(tdev) for k, v in bench.inputs.items()}
    sync = torch.cuda.synchronize if tdev.type == "cuda" else (lambda: None)

    current: list[float | None] = [None]  # the ratio the torch model is set up for (None = plain dense)

    def set_variant(ratio: float | None) -> None:
        # Outside the timed region: swap the keep schedule (apply/remove are cheap and share the weights).
        if ratio == current[0]:
            return
        if is_shiva_applied(transformer):
            remove_shiva_(transformer)
        if ratio is not None:
            apply_shiva_(transformer, configs[ratio], routers=bank)
        current[0] = ratio

    def forward() -> None:
        with torch.inference_mode():
            transformer(**tin)
        sync()

    # Record every routed block's input from a real pruned forward, for the selection-path timing.
    say("record routed-block inputs")
    block_inputs: dict[float, tuple[torch.Tensor, ...]] = {}
    for r in bench.ratios:
        set_variant(r)
        with torch.inference_mode(), record_selection(transformer, hidden_states=True) as recs:
            transformer(**tin)
        block_inputs[r] = tuple(x["hidden_in"] for x in recs)
    temb, pooled = recs[0]["temb"], recs[0]["pooled"]  # the router context of this call, as the adapter captures it
    sel_modules = {
        r: _SelectionPath(bank, bench.budgets[r], bench.spec.cfg, configs[r].selection).eval() for r in bench.ratios
    }

    variants = [_Variant("torch/dense", forward, lambda: set_variant(None))]
    for r in bench.ratios:
        variants.append(_Variant(f"torch/ratio{r:.2f}", forward, lambda r=r: set_variant(r)))

        def sel(r=r) -> None:
            with torch.inference_mode():
                sel_modules[r](block_inputs[r], temb, pooled)
            sync()

        variants.append(_Variant(f"torch-selection/ratio{r:.2f}", sel))
    return variants, (block_inputs, temb, pooled)


def _ort_selection_variants(
    bench: _Bench, selection: tuple, tmp: Path, threads, tdev: torch.device, notes: list[str], say
) -> list[_Variant]:
    """The selection path as a selection-only ONNX graph per ratio in ORT; none (and a note) if one fails to export."""
    block_inputs, temb, pooled = selection
    say("export selection-only onnx")
    cpu_inputs = {r: tuple(x.cpu() for x in block_inputs[r]) for r in bench.ratios}
    temb_c, pooled_c = temb.cpu(), pooled.cpu()
    variants: list[_Variant] = []
    ok = True
    for r in bench.ratios:
        path = tmp / f"selection{r:.2f}.onnx"
        try:
            mod = _SelectionPath(bench.bank, bench.budgets[r], bench.spec.cfg, bench.configs[r].selection).cpu().eval()
            with torch.no_grad(), quiet_exporter():
                torch.onnx.export(
                    mod, (cpu_inputs[r], temb_c, pooled_c), str(path), dynamo=True, opset_version=_ORT_OPSET
                )
            sess = ort_session(path, threads=threads)
            names = [i.name for i in sess.get_inputs()]
            arrays = [x.numpy() for x in cpu_inputs[r]] + [temb_c.numpy(), pooled_c.numpy()]
            if len(names) != len(arrays):
                raise ValueError(f"selection graph has {len(names)} inputs, expected {len(arrays)}")
        except Exception as err:  # noqa: BLE001 - exporter failures come in many types
            logger.warning(
                "selection-only ONNX export failed (%s); ORT overhead not measured",
                (str(err).splitlines() or [""])[0][:200],
            )
            ok = False
            break
        sel_feed = dict(zip(names, arrays))
        variants.append(_Variant(f"ort-selection/ratio{r:.2f}", lambda s=sess, f=sel_feed: s.run(None, f)))
    bench.bank.to(tdev)
    if not ok:
        notes.append("ORT routing overhead not measured: the selection-only graph failed to export (see the log).")
        return []
    return variants


def _round_robin(bench: _Bench, variants: list[_Variant], warmup: int, repeats: int, say) -> dict[str, list[float]]:
    """Every variant once per round, the order rotated by one each round; times (ms) of the rounds after ``warmup``."""
    times: dict[str, list[float]] = {v.key: [] for v in variants}
    t_bench = time.perf_counter()
    for rnd in range(warmup + repeats):
        say(
            f"{'warm-up' if rnd < warmup else 'round'} {rnd + 1 if rnd < warmup else rnd - warmup + 1}/{warmup if rnd < warmup else repeats}"
        )
        shift = rnd % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.prepare()
            t0 = time.perf_counter()
            v.run()
            dt = (time.perf_counter() - t0) * 1e3
            if rnd >= warmup:
                times[v.key].append(dt)
    bench.timings["benchmark_seconds"] = round(time.perf_counter() - t_bench, 3)
    return times


def _rows(bench: _Bench, backends, times: dict[str, list[float]]) -> list[SpeedRow]:
    """Per backend: the dense row, then one row per ratio (speedup = median of per-round ratios, overhead)."""
    rows: list[SpeedRow] = []
    for backend in backends:
        dense_t = times[f"{backend}/dense"]
        rows.append(
            SpeedRow(
                backend=backend,
                variant="dense",
                ratio=None,
                keep=1.0,
                k=None,
                times_ms=dense_t,
                median_ms=float(np.median(dense_t)),
                p90_ms=_pct(dense_t, 90),
                speedup=1.0,
                ideal_speedup=1.0,
                efficiency=None,
                flops=bench.dense_flops.total,
            )
        )
        for r in bench.ratios:
            key = f"ratio{r:.2f}"
            t = times[f"{backend}/{key}"]
            med = float(np.median(t))
            speedup = float(np.median([d / p for d, p in zip(dense_t, t)]))
            sel_t = times.get(f"{backend}-selection/{key}", [])
            ovh = float(np.median(sel_t)) if sel_t else None
            rows.append(
                SpeedRow(
                    backend=backend,
                    variant=key,
                    ratio=r,
                    keep=1.0 - r,
                    k=min(bench.budgets[r].values()),
                    times_ms=t,
                    median_ms=med,
                    p90_ms=_pct(t, 90),
                    speedup=speedup,
                    ideal_speedup=bench.ideal[r],
                    efficiency=speedup / bench.ideal[r],
                    flops=bench.pruned_flops[r].total,
                    overhead_ms=ovh,
                    overhead_pct=None if ovh is None else 100.0 * ovh / med,
                    overhead_times_ms=sel_t,
                )
            )
    return rows


def _report_notes(backends, device: str) -> list[str]:
    notes = [
        "Selection-path overhead = router scoring of all N tokens + top-k (bounded lowering) + gather + scatter "
        "for every routed block, run alone on the block inputs recorded from a pruned forward; it is an estimate "
        "(inside the full graph the backend may fuse or schedule it differently).",
        "ratio 0.00 routes every token through router + top-k + gather + scatter (k = N): its speedup below 1 is the "
        "measured routing overhead.",
        "Ideal speedup: FLOP ratio from shiva_export.validate.flops (2 FLOPs per multiply-add, matrix products only, "
        "router included).",
    ]
    if device == "cpu" and "ort" in backends and "torch" in backends:
        notes.append(
            "torch and ORT variants run in the same process and the same rounds; ORT intra-op spinning is off so its pool does not compete with torch."
        )
    return notes


def _report(
    bench: _Bench,
    rows: list[SpeedRow],
    backends,
    warmup,
    repeats,
    threads,
    device,
    notes: list[str],
    command,
    load_start,
) -> SpeedReport:
    spec, ratios, transformer = bench.spec, bench.ratios, bench.transformer
    threads_info: dict[str, Any] = {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
    }
    if "ort" in backends:
        threads_info.update(
            ort_intra_op=threads, ort_inter_op=1, ort_execution_mode="sequential", ort_allow_spinning=False
        )
    versions = package_versions()
    versions["numpy"] = np.__version__
    flops_info = {
        "dense": bench.dense_flops.to_dict(),
        "pruned": {f"{r:.2f}": bench.pruned_flops[r].to_dict() for r in ratios},
        "ideal_speedup": {f"{r:.2f}": bench.ideal[r] for r in ratios},
    }
    k_per_block = {f"{r:.2f}": {str(b): k for b, k in bench.budgets[r].items()} for r in ratios}
    return SpeedReport(
        model=bench.rec.name,
        device=device,
        dtype="fp32",
        spec=spec.to_dict(),
        model_config={
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dict(transformer.config).items()
            if not k.startswith("_")
        },
        architecture=get_adapter(transformer).NAME,
        num_layers=bench.n_layers,
        model_batch=spec.model_batch,
        num_image_tokens=bench.n_tokens,
        text_len=spec.text_len,
        routed_blocks=list(bench.routed),
        warmup=warmup,
        repeats=repeats,
        threads=threads_info,
        machine=_machine(load_start),
        versions=versions,
        rows=rows,
        flops=flops_info,
        timings=bench.timings | {"router": bench.router_info, "k_per_block": k_per_block},
        notes=notes + _report_notes(backends, device),
        command=command,
    )


def _plot_png(report: SpeedReport) -> bytes:
    require("matplotlib", purpose="the speed plot (speed.png)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ratios = sorted({r.ratio for r in report.rows if r.ratio is not None})
    grid = np.linspace(0.0, max(ratios), 41) if max(ratios) > 0 else np.array([0.0])
    colors = {"torch": "tab:blue", "ort": "tab:orange"}
    bottleneck = report.flops["dense"]["bottleneck"]
    routed = set(report.routed_blocks)
    for backend in dict.fromkeys(r.backend for r in report.rows):
        color = colors.get(backend, None)
        dense = report.row(backend, None)
        rows = [report.row(backend, r) for r in ratios]
        xs = [r.ratio for r in rows]
        med = [r.median_ms for r in rows]
        up = [max(r.p90_ms - r.median_ms, 0.0) for r in rows]
        ax.errorbar(
            xs,
            med,
            yerr=[[0.0] * len(up), up],
            marker="o",
            color=color,
            capsize=3,
            label=f"{backend} pruned (median, p90)",
        )
        ax.axhline(dense.median_ms, color=color, linestyle="--", linewidth=1, label=f"{backend} dense")
        # ideal: dense latency / FLOP speedup, on a fine grid of uniform ratios
        ideal_ms = []
        for g in grid:
            keeps = [1.0 - float(g) if i in routed else None for i in range(report.num_layers)]
            pruned = count_model_flops(
                report.architecture,
                report.model_config,
                report.num_image_tokens,
                report.text_len,
                keeps,
                batch=report.model_batch,
                bottleneck=bottleneck,
            )
            ideal_ms.append(dense.median_ms * pruned.total / dense.flops)
        ax.plot(
            grid, ideal_ms, color=color, linestyle=":", linewidth=1.5, label=f"{backend} ideal (dense / FLOP ratio)"
        )
    s = report.spec
    ax.set_xlabel("pruning ratio (fraction of image tokens dropped per routed block)")
    ax.set_ylabel("latency per forward [ms]")
    ax.set_title(
        f"{report.model} {s['height']}x{s['width']}, model batch {report.model_batch}, {report.threads['torch_intra_op']} threads"
    )
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _write_outputs(report: SpeedReport, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _plot_png(report)
    atomic_write_bytes(out_dir / "speed.png", png)
    atomic_write_text(out_dir / "speed.md", report.to_markdown())
    atomic_write_json(out_dir / "speed.json", report.to_dict())  # last: the file that makes the set look complete
    logger.info("speed report written to %s", out_dir)
