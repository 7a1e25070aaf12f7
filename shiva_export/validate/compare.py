"""Three-way parity: PyTorch reference vs ONNX Runtime (CPU; CUDA when really in use) vs TensorRT engines.

Runs go through polygraphy's ``Comparator.run`` with custom runners: :class:`TorchRunner` (the fp32 pruned
PyTorch model, which also emits each routed block's kept indices as ``kept_indices.<block>``),
an ONNX Runtime runner over a temporary copy of the export whose kept-index tensors are graph outputs, and
an engine runner (built engine + manifest, CUDA only). Accuracy is judged with polygraphy compare functions
and the recipe's per-dtype tolerances: ``SimpleCompareFunc`` on ``sample`` (elementwise, or the recipe's
quantile) and ``DistanceMetricsCompareFunc`` (cosine); kept-index agreement is the overlap
``|A & B| / k`` per routed block. Each comparison also records max/mean/median/p99 abs and rel error and
cosine similarity. The report ends with a greppable ``PASSED | ...`` or ``FAILED | ...`` line.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shiva_export._imports import require
from shiva_export.engines.chain import CHAIN_FILE
from shiva_export.engines.runner import EngineRunner
from shiva_export.errors import ConfigError, HardwareError
from shiva_export.export.onnx import read_shiva_metadata
from shiva_export.export.ort import ChainedSession
from shiva_export.export.parity import compare_arrays, row_overlap
from shiva_export.export.pruned import budget_dir, budget_label, export_pruned, resolve_router
from shiva_export.logging import get_logger
from shiva_export.models import (
    OUTPUT_NAME,
    InputSpec,
    get_adapter,
    input_names,
    load_transformer,
    make_inputs,
    num_blocks,
    router_dims,
)
from shiva_export.prune.api import ShivaConfig, apply_shiva_, is_shiva_applied, record_selection
from shiva_export.recipe import Recipe, load_recipe
from shiva_export.utils.io import atomic_write_text, check_writable

__all__ = ["ComparisonResult", "ParitySuiteReport", "validate_parity", "DEFAULT_TIMESTEPS"]

logger = get_logger(__name__)
INDEX_PREFIX = "kept_indices."
#: seeded cases: random t, then the extremes of the schedule, then the middle
DEFAULT_TIMESTEPS = (None, 1.0, 999.0, 500.0, None, 0.0, None, 250.0)


@contextlib.contextmanager
def _quiet_polygraphy():
    """polygraphy's logger prints to stdout: keep stdout for results and log its chatter at debug level."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        G_LOGGER.module_severity = old
        if buf.getvalue():
            logger.debug("polygraphy:\n%s", buf.getvalue())


def _runner_classes():
    """Defined on first use: polygraphy is an optional dependency, never imported at module top level."""
    require("polygraphy", purpose="parity validation")
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        """The PyTorch reference; emits ``sample`` and ``kept_indices.<block>``."""

        def __init__(self, model, shapes, name="torch-fp32", extras=None, dtypes=None):
            super().__init__(name=name)
            self.model, self.shapes = model, shapes
            self.dtypes = dtypes or {}  # graph input -> numpy dtype (int64 masks / class labels)
            self.extras = extras or {}  # static forward arguments the graph bakes in (Flux position ids)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for n in self.shapes:
                meta.add(n, dtype=self.dtypes.get(n, np.float32), shape=self.shapes[n])
            return meta

        def infer_impl(self, feed_dict):
            import time

            x = {k: torch.as_tensor(np.asarray(v)) for k, v in feed_dict.items()} | self.extras
            t0 = time.perf_counter()
            with torch.no_grad():
                if is_shiva_applied(self.model):
                    with record_selection(self.model) as rec:
                        out = self.model(**x).sample
                else:
                    rec, out = [], self.model(**x).sample
            self.inference_time = time.perf_counter() - t0
            res = {OUTPUT_NAME: out.float().numpy()}
            res.update({f"{INDEX_PREFIX}{r['block']}": r["indices"].numpy() for r in rec})
            return res

    class OrtRunner(BaseRunner):
        """ONNX Runtime on one provider (no silent fallback); renames kept-index tensors."""

        def __init__(self, path, provider, input_dtype, shapes, name, float_names=None):
            super().__init__(name=name)
            self.float_names = set(float_names if float_names is not None else (n for n in shapes if n != "timestep"))
            self.path, self.provider, self.input_dtype = path, provider, input_dtype
            self.shapes = shapes

        def activate_impl(self):
            self.sess = ChainedSession(self.path, self.provider, index_outputs=True)  # a segment file: its whole chain
            self.index_tensors = self.sess.index_tensors
            self.out_names = [o.name for o in self.sess.get_outputs()]
            self.rename = {v: f"{INDEX_PREFIX}{k}" for k, v in self.index_tensors.items()}

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for i in self.sess.get_inputs():
                meta.add(i.name, dtype=np.int64 if i.type == "tensor(int64)" else np.float32, shape=self.shapes[i.name])
            return meta

        def infer_impl(self, feed_dict):
            import time

            def cast(k, v):
                v = np.asarray(v)
                if k in self.float_names:
                    return v.astype(self.input_dtype)
                return (
                    v.astype(np.float32) if v.dtype.kind == "f" else v
                )  # timestep fp32; int64 masks/labels as they are

            feed = {k: cast(k, v) for k, v in feed_dict.items()}
            t0 = time.perf_counter()
            outs = self.sess.run(self.out_names, feed)
            self.inference_time = time.perf_counter() - t0
            return {
                self.rename.get(n, n): (o.astype(np.float32) if o.dtype in (np.float16,) else o)
                for n, o in zip(self.out_names, outs)
            }

        def deactivate_impl(self):
            self.sess.close()
            del self.sess

    class EngineParityRunner(BaseRunner):
        """A built TensorRT / TensorRT-RTX engine via :class:`~shiva_export.engines.runner.EngineRunner`."""

        def __init__(self, engine_dir, name):
            super().__init__(name=name)
            self.engine_dir = engine_dir

        def activate_impl(self):
            self.runner = EngineRunner(self.engine_dir)
            self.runner.activate()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for n, s in self.runner.manifest.input_shapes.items():
                meta.add(n, dtype=np.float32, shape=s)
            return meta

        def infer_impl(self, feed_dict):
            feed = {k: torch.as_tensor(np.asarray(v)).cuda() for k, v in feed_dict.items()}
            outs = self.runner.infer(feed)
            self.inference_time = self.runner.inference_time
            return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in outs.items()}

        def deactivate_impl(self):
            self.runner.deactivate()

    return TorchRunner, OrtRunner, EngineParityRunner


@dataclass
class ComparisonResult:
    """One (budget, backend) comparison against the PyTorch reference over every case."""

    ratio: float
    backend: str
    dtype: str
    cases: int
    max_abs: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    min_cosine: float
    min_index_overlap: float | None
    exact_index_rows: float | None
    polygraphy_simple: bool
    polygraphy_cosine: bool
    tolerance: dict[str, float]
    passed: bool
    reason: str = ""
    worst_block: int | None = None


@dataclass
class ParitySuiteReport:
    """All comparisons of one ``validate parity`` call."""

    model: str
    dtype: str
    comparisons: list[ComparisonResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def summary_line(self) -> str:
        if not self.comparisons:
            return "FAILED | no comparison ran" + (f" ({'; '.join(self.skipped)})" if self.skipped else "")
        worst = max(self.comparisons, key=lambda c: (not c.passed, c.max_abs))
        n = len(self.comparisons)
        if self.passed:
            return (
                f"PASSED | {n} comparisons ({self.model}, {self.dtype}) matched PyTorch | worst: ratio {worst.ratio:g} "
                f"{worst.backend} max_abs={worst.max_abs:.3g} cos={worst.min_cosine:.8f} index_overlap="
                + (f"{worst.min_index_overlap:.1%}" if worst.min_index_overlap is not None else "n/a")
            )
        bad = [c for c in self.comparisons if not c.passed]
        return f"FAILED | {len(bad)}/{n} comparisons | ratio {worst.ratio:g} {worst.backend}: {worst.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "passed": self.passed,
            "summary": self.summary_line(),
            "comparisons": [asdict(c) for c in self.comparisons],
            "skipped": self.skipped,
        }

    def to_markdown(self) -> str:
        lines = [
            f"# Parity report: {self.model} ({self.dtype})",
            "",
            "| ratio | backend | cases | max abs | mean abs | median abs | p99 abs | max rel | min cosine | kept-index overlap | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.comparisons:
            ov = f"{c.min_index_overlap:.1%}" if c.min_index_overlap is not None else "n/a"
            lines.append(
                f"| {c.ratio:g} | {c.backend} | {c.cases} | {c.max_abs:.3g} | {c.mean_abs:.3g} | {c.median_abs:.3g} | {c.p99_abs:.3g} "
                f"| {c.max_rel:.3g} | {c.min_cosine:.8f} | {ov} | {'PASSED' if c.passed else 'FAILED: ' + c.reason} |"
            )
        if self.skipped:
            lines += ["", "Skipped:", *[f"- {s}" for s in self.skipped]]
        lines += ["", self.summary_line(), ""]
        return "\n".join(lines)


def _ort_cuda_usable() -> bool:
    try:
        ort = require("onnxruntime")
    except Exception:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def validate_parity(
    *,
    model: str | None = None,
    recipe: str | os.PathLike | Recipe | None = None,
    weights: str | os.PathLike | None = None,
    router: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    ratios: list[float] | None = None,
    dtype: str = "fp32",
    backends: list[str] | None = None,
    engines_dir: str | os.PathLike | None = None,
    cases: int = 4,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    cfg: bool | None = None,
    report_md: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParitySuiteReport:
    """Compares ONNX Runtime (and engines where runnable) with the fp32 PyTorch pruned model.

    Args:
        model (str): Built-in model name. Defaults to ``sd35``.
        recipe (PathLike | Recipe): Recipe override. Defaults to None.
        weights (PathLike): Local diffusers folder. Defaults to None.
        router (PathLike): Router safetensors for the *reference*. An ``--onnx`` exported with another router fails.
        onnx (PathLike): Validate this existing export (its metadata gives ratio, shapes and dtype) instead of exporting.
        ratios (list[float]): Fractions of image tokens pruned (fresh exports). Defaults to the recipe's.
        dtype (str): Export dtype for fresh exports. Defaults to ``fp32``.
        backends (list[str]): Any of ``ort-cpu``, ``ort-cuda``, ``engine``. Defaults to ``ort-cpu`` plus
            ``ort-cuda`` when onnxruntime-gpu really runs on CUDA, plus ``engine`` when ``engines_dir`` holds
            the budget's engine and a GPU is present.
        engines_dir (PathLike): Root of ``shiva-export trt`` outputs. Defaults to None.
        cases (int): Seeded inputs per budget (1..8), with the schedule's extreme timesteps. Defaults to 4.
        height, width, batch, cfg: Shapes (default: the recipe's).
        report_md (PathLike): Write a Markdown report here. Defaults to None.
        progress (Callable[[str], None]): Stage callback. Defaults to None.
    """

    say = progress or (lambda s: None)
    require("polygraphy", purpose="parity validation")  # typed error + pip line when missing
    runner_classes = _runner_classes()
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe if recipe is not None else (model or "sd35"))
    if not 1 <= cases <= 8:
        raise ConfigError(f"--cases {cases} is out of range; expected 1..8.")
    wanted = (
        list(backends)
        if backends
        else ["ort-cpu"] + (["ort-cuda"] if _ort_cuda_usable() else []) + (["engine"] if engines_dir else [])
    )
    for b in wanted:
        if b not in ("ort-cpu", "ort-cuda", "engine"):
            raise ConfigError(f"backend {b!r} is unknown; choose from ort-cpu, ort-cuda, engine.")
    report = ParitySuiteReport(rec.name, dtype)
    if report_md:
        check_writable(report_md, "--report")  # before minutes of exports
    tmp = Path(tempfile.mkdtemp(prefix="shiva-parity-"))
    try:
        jobs: list[tuple[float, Path, dict]] = []
        if onnx is not None:
            meta = read_shiva_metadata(Path(onnx), require=True, what="--onnx")
            if meta.get("model") not in (None, rec.name):  # before any reference is built from the wrong recipe
                raise ConfigError(
                    f"--onnx {onnx} is a graph of model {meta.get('model')!r}, and --model is {rec.name!r}; pass --model {meta.get('model')} (or that model's --recipe)."
                )
            jobs.append((float(meta.get("ratio", 0.0)), Path(onnx), meta))
        else:
            for r in ratios or rec.prune.ratios:
                say(f"ratio {r:g}: export onnx")
                ex = export_pruned(
                    recipe=rec,
                    weights=weights,
                    router=router,
                    ratio=r,
                    dtype=dtype,
                    height=height,
                    width=width,
                    batch=batch,
                    cfg=cfg,
                    out=tmp / budget_label(r) / "model.onnx",
                    validate=False,
                )
                jobs.append((r, ex.export.onnx_path, read_shiva_metadata(ex.export.onnx_path)))
        base = load_transformer(recipe=rec, weights=weights, dtype="fp32")
        for ratio, path, meta in jobs:
            _parity_job(report, runner_classes, rec, base, router, ratio, path, meta, wanted, engines_dir, cases, say)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if report_md:
        atomic_write_text(report_md, report.to_markdown())
    return report


def _parity_job(
    report: ParitySuiteReport,
    runner_classes,
    rec,
    base,
    router,
    ratio: float,
    path: Path,
    meta: dict,
    wanted: list[str],
    engines_dir,
    cases: int,
    say,
) -> None:
    """One export against the fp32 torch reference at its budget, on ``cases`` seeded inputs, every wanted backend."""
    TorchRunner = runner_classes[0]  # noqa: N806
    spec = InputSpec(**meta["input_spec"])
    ex_dtype = meta.get("dtype", "fp32")
    tol = rec.tolerance(ex_dtype)
    ref = _parity_reference(rec, base, router, ratio, meta, spec)
    feeds, graph_inputs, extras = [], set(input_names(base)), {}
    for s in range(cases):
        x = make_inputs(base, spec, seed=s, timestep=DEFAULT_TIMESTEPS[s])
        feeds.append({k: v.numpy() for k, v in x.items() if k in graph_inputs})
        extras = {k: v for k, v in x.items() if k not in graph_inputs}
    shapes = {k: tuple(v) for k, v in spec.shapes(base).items()}
    runners = [TorchRunner(ref, shapes, extras=extras, dtypes={k: v.dtype for k, v in feeds[0].items()})]
    runners += _backend_runners(
        report, runner_classes, rec, base, ratio, path, meta, ex_dtype, shapes, wanted, engines_dir
    )
    say(f"ratio {ratio:g}: run {', '.join(r.name for r in runners)} on {cases} inputs")
    try:
        _compare_runners(report, runners, feeds, ratio, ex_dtype, tol)
    except HardwareError as err:
        report.skipped.append(f"ratio {ratio:g}: {err}")


def _parity_reference(rec, base, router, ratio: float, meta: dict, spec: InputSpec):
    """The fp32 torch model the export is judged against: ``base`` itself (dense), or a copy routed at the export's keep ratios."""

    if meta.get("dense") or not meta.get("k_per_block"):
        return base
    n_layers = num_blocks(base)
    kr = meta.get("keep_ratios") or ShivaConfig.uniform(n_layers, ratio, rec.routed_blocks(n_layers)).keep_ratios
    config = ShivaConfig(
        tuple(kr),
        cfg=spec.cfg,
        bottleneck=rec.router.bottleneck,
        group_size=rec.router.group_size,
        context=meta.get("context") or "drop",
    )  # exports before the option dropped
    rc = config.router_config(*router_dims(base))
    bank, _ = resolve_router(rec, router, rc)
    import copy

    ref = copy.deepcopy(base)
    apply_shiva_(ref, config, routers=bank, seed=rec.router.seed)
    return ref


def _backend_runners(
    report: ParitySuiteReport,
    runner_classes,
    rec,
    base,
    ratio: float,
    path: Path,
    meta: dict,
    ex_dtype: str,
    shapes,
    wanted: list[str],
    engines_dir,
) -> list:
    """The ORT and engine runners of one export; a backend that cannot run it is a line in ``report.skipped``."""

    _, OrtRunner, EngineParityRunner = runner_classes  # noqa: N806
    np_dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}[ex_dtype]
    runners = []
    for b in wanted:
        if b in ("ort-cpu", "ort-cuda"):
            if ex_dtype == "bf16":
                report.skipped.append(f"ratio {ratio:g} {b}: ONNX Runtime has no bfloat16 kernels for this graph")
                continue
            runners.append(
                OrtRunner(
                    path,
                    b.split("-")[1],
                    np_dtype,
                    shapes,
                    name=f"onnxrt-{b.split('-')[1]}",
                    float_names=get_adapter(base).float_inputs(base.config),
                )
            )
        elif b == "engine":
            bdir = budget_dir(ratio, "keep" if meta.get("context") == "keep" else "drop")
            edir = Path(engines_dir) / rec.name / bdir / ex_dtype if engines_dir else None
            if edir is None or not ((edir / "model.plan").is_file() or (edir / CHAIN_FILE).is_file()):
                report.skipped.append(f"ratio {ratio:g} engine: no engine at {edir}; build it with `shiva-export trt`")
            elif not torch.cuda.is_available():
                report.skipped.append(f"ratio {ratio:g} engine: {edir} exists but no CUDA GPU is visible to run it")
            else:
                runners.append(EngineParityRunner(edir, name="engine"))
    return runners


def _compare_runners(
    report: ParitySuiteReport, runners: list, feeds: list[dict], ratio: float, ex_dtype: str, tol
) -> None:
    """polygraphy: every runner on the feeds; each compared with the torch reference (runner 0) elementwise and by cosine."""
    from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc, SimpleCompareFunc

    with _quiet_polygraphy():
        results = Comparator.run(runners, data_loader=feeds)
        for i in range(1, len(runners)):
            cmp = [(0, i)]
            only_sample = _only(OUTPUT_NAME)
            f_simple = SimpleCompareFunc(
                atol={OUTPUT_NAME: tol.atol},
                rtol={OUTPUT_NAME: tol.rtol},
                check_error_stat="elemwise" if tol.quantile >= 1.0 else "quantile",
                error_quantile=tol.quantile,
                find_output_func=only_sample,
            )
            ok_simple = bool(Comparator.compare_accuracy(results, compare_func=f_simple, comparisons=cmp))
            f_cos = CosineSimilarityCompareFunc(
                cosine_similarity_threshold={OUTPUT_NAME: tol.min_cosine}, find_output_func=only_sample
            )
            ok_cos = bool(Comparator.compare_accuracy(results, compare_func=f_cos, comparisons=cmp))
            report.comparisons.append(
                _summarize(ratio, runners[i].name, ex_dtype, results, 0, i, tol, ok_simple, ok_cos)
            )


def _only(name: str):
    """polygraphy find_output_func that compares only ``name`` (index outputs are judged by overlap)."""

    def find(output_name, index, iter_result, base_iter_result=None):
        return [output_name] if output_name == name else []

    return find


def _summarize(ratio, backend, dtype, results, i_ref, i_test, tol, ok_simple, ok_cos) -> ComparisonResult:
    ref_runs = results[i_ref][1]
    test_runs = results[i_test][1]
    stats, overlaps, exacts, per_block = [], [], [], {}
    for ra, rb in zip(ref_runs, test_runs):
        stats.append(
            compare_arrays(
                OUTPUT_NAME, ra[OUTPUT_NAME], rb[OUTPUT_NAME], tol.atol, tol.rtol, tol.min_cosine, tol.quantile
            )
        )
        for name in ra.keys():
            if name.startswith(INDEX_PREFIX) and name in rb.keys():
                ov, ex = row_overlap(np.asarray(ra[name]), np.asarray(rb[name]))
                overlaps.append(ov)
                exacts.append(ex)
                blk = int(name[len(INDEX_PREFIX) :])
                per_block[blk] = min(per_block.get(blk, 1.0), ov)
    min_ov = min(overlaps) if overlaps else None
    ok_idx = min_ov is None or min_ov >= tol.min_index_agreement
    ok_ours = all(s.passed for s in stats)
    passed = ok_simple and ok_cos and ok_idx and ok_ours
    w = max(stats, key=lambda s: s.max_abs)
    reasons = []
    if not (ok_simple and ok_ours):
        reasons.append(
            f"{OUTPUT_NAME} max_abs {w.max_abs:.3g}, {min(s.within_fraction for s in stats):.2%} within atol {tol.atol:g} + rtol {tol.rtol:g}*|ref| (need {tol.quantile:.0%})"
        )
    if not ok_cos:
        reasons.append(f"{OUTPUT_NAME} cosine {min(s.cosine for s in stats):.6f} < {tol.min_cosine}")
    worst_block = min(per_block, key=per_block.get) if per_block else None
    if not ok_idx:
        reasons.append(f"kept-index overlap {min_ov:.1%} < {tol.min_index_agreement:.0%} (block {worst_block})")
    return ComparisonResult(
        ratio=ratio,
        backend=backend,
        dtype=dtype,
        cases=len(stats),
        max_abs=max(s.max_abs for s in stats),
        mean_abs=float(np.mean([s.mean_abs for s in stats])),
        median_abs=float(np.median([s.median_abs for s in stats])),
        p99_abs=max(s.p99_abs for s in stats),
        max_rel=max(s.max_rel for s in stats),
        mean_rel=float(np.mean([s.mean_rel for s in stats])),
        min_cosine=min(s.cosine for s in stats),
        min_index_overlap=min_ov,
        exact_index_rows=min(exacts) if exacts else None,
        polygraphy_simple=ok_simple,
        polygraphy_cosine=ok_cos,
        tolerance={
            "atol": tol.atol,
            "rtol": tol.rtol,
            "quantile": tol.quantile,
            "min_cosine": tol.min_cosine,
            "min_index_overlap": tol.min_index_agreement,
        },
        passed=passed,
        reason="; ".join(reasons),
        worst_block=worst_block,
    )
