"""Parity of an exported ONNX against the PyTorch pruned model, in ONNX Runtime.

The export's own check (``export_pruned(validate=True)``), so it lives on the export floor; ``validate``
reuses its statistics. The reference is the PyTorch model with the same router and budget (float32 unless given otherwise).
Besides the output, the kept-index set of every routed block is compared: an index mismatch means
the deployed model *selected different tokens* (e.g. ties or fp16 scores), which is a different failure
from numeric drift. The kept-index tensors are located at export time (``shiva.kept_index_tensors`` in
the ONNX metadata) and exposed as extra outputs of a temporary copy of the graph; the exported file is
never modified.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shiva_export.export.ort import PROVIDERS, ChainedSession
from shiva_export.logging import get_logger
from shiva_export.models import OUTPUT_NAME, get_adapter
from shiva_export.prune.api import is_shiva_applied, record_selection, set_route_override
from shiva_export.prune.topk import gather_tokens, scatter_tokens

__all__ = ["OutputStats", "CaseResult", "ParityReport", "check_parity", "compare_arrays", "row_overlap"]

logger = get_logger(__name__)


@dataclass
class OutputStats:
    """Error statistics of one output against its reference."""

    name: str
    max_abs: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    cosine: float
    atol: float
    rtol: float
    min_cosine: float
    quantile: float
    within_fraction: float
    passed: bool

    def line(self) -> str:
        mark = "ok" if self.passed else "MISMATCH"
        return (
            f"{self.name}: {mark} max_abs={self.max_abs:.3g} mean_abs={self.mean_abs:.3g} p99_abs={self.p99_abs:.3g} "
            f"max_rel={self.max_rel:.3g} cos={self.cosine:.8f} (atol={self.atol:g} rtol={self.rtol:g} min_cos={self.min_cosine})"
        )


def compare_arrays(
    name: str, ref: np.ndarray, test: np.ndarray, atol: float, rtol: float, min_cosine: float, quantile: float = 1.0
) -> OutputStats:
    """``|test - ref| <= atol + rtol * |ref|`` for at least a ``quantile`` fraction of elements (1.0 =
    every element), no NaN/Inf, and cosine similarity >= ``min_cosine``."""
    ref64 = np.asarray(ref, dtype=np.float64).ravel()
    test64 = np.asarray(test, dtype=np.float64).ravel()
    if ref64.shape != test64.shape:
        raise ValueError(f"{name}: shape {np.shape(test)} differs from reference {np.shape(ref)}")
    diff = np.abs(test64 - ref64)
    rel = diff / np.maximum(np.abs(ref64), 1e-6)
    denom = np.linalg.norm(ref64) * np.linalg.norm(test64)
    cos = float(np.dot(ref64, test64) / denom) if denom > 0 else float(np.array_equal(ref64, test64))
    finite = bool(np.isfinite(test64).all())
    ok = diff <= atol + rtol * np.abs(ref64)
    within_fraction = float(ok.mean()) if ok.size else 1.0
    within = bool(ok.all()) if quantile >= 1.0 else within_fraction >= quantile
    return OutputStats(
        name=name,
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        median_abs=float(np.median(diff)) if diff.size else 0.0,
        p99_abs=float(np.quantile(diff, 0.99)) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mean_rel=float(rel.mean()) if rel.size else 0.0,
        cosine=cos,
        atol=atol,
        rtol=rtol,
        min_cosine=min_cosine,
        quantile=quantile,
        within_fraction=within_fraction,
        passed=finite and within and cos >= min_cosine,
    )


@dataclass
class CaseResult:
    """One seeded input case."""

    seed: int
    timestep: float | None
    output: OutputStats
    index_agreement: dict[int, float]  # block -> mean over batch rows of |kept_torch & kept_onnx| / k (1.0 = identical)
    exact_rows: dict[int, float]  # block -> fraction of batch rows whose kept sets are identical
    near_ties: int = (
        0  # kept tokens that differ only by a router-score tie at the k-th place (output compared tie-resolved)
    )

    @property
    def min_index_agreement(self) -> float:
        if self.near_ties:
            return 1.0  # every difference is a tie at the budget boundary, resolved in the output comparison
        return min(self.index_agreement.values()) if self.index_agreement else 1.0


@dataclass
class ParityReport:
    """Parity of one ONNX file against PyTorch over several seeded inputs."""

    onnx_path: str
    provider: str
    dtype: str
    min_index_agreement_required: float
    cases: list[CaseResult] = field(default_factory=list)
    status: str = "passed"  # passed | failed | skipped
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    @property
    def worst(self) -> OutputStats | None:
        if not self.cases:
            return None
        return max((c.output for c in self.cases), key=lambda s: (not s.passed, s.max_abs))

    @property
    def index_agreement(self) -> float:
        return min((c.min_index_agreement for c in self.cases), default=1.0)

    def summary_line(self) -> str:
        if self.status == "skipped":
            return f"SKIPPED | {self.reason}"
        w = self.worst
        stats = f"max_abs={w.max_abs:.3g} cos={w.cosine:.8f} kept-index overlap={self.index_agreement:.1%}" if w else ""
        if w and self.near_ties:
            stats += f" ({self.near_ties} boundary score tie(s) kept differently; output compared on the backend's selection)"
        if self.passed:
            return f"PASSED | {OUTPUT_NAME} matched PyTorch on {len(self.cases)} inputs ({self.provider}, {self.dtype}) | {stats}"
        return f"FAILED | {self.reason} | {stats}"

    @property
    def near_ties(self) -> int:
        return sum(c.near_ties for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["index_agreement"] = self.index_agreement
        d["worst_output"] = self.worst.name if self.worst else None
        d["worst_max_abs"] = self.worst.max_abs if self.worst else None
        d["worst_cosine"] = self.worst.cosine if self.worst else None
        for c in d["cases"]:
            c["index_agreement"] = {str(k): v for k, v in c["index_agreement"].items()}
            c["exact_rows"] = {str(k): v for k, v in c["exact_rows"].items()}
        return d


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def row_overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean |A & B| / k over rows, fraction of rows with identical sets)."""
    if a.shape != b.shape:
        return 0.0, 0.0
    k = a.shape[1]
    overlap = [len(np.intersect1d(a[i], b[i], assume_unique=True)) / k for i in range(a.shape[0])]
    return (float(np.mean(overlap)), float(np.mean([o == 1.0 for o in overlap]))) if overlap else (1.0, 1.0)


#: Two router scores within this (relative to the row's largest magnitude) are a tie: which of them the
#: k-th place keeps is float round-off, not a bug (fp32 scores of ORT and PyTorch differ by ~1e-7 relative).
TIE_RTOL = 1e-5


def _near_ties(rec: list[dict], backend_idx: dict[int, np.ndarray]) -> int:
    """Tokens kept by exactly one side in the first routed block where the two differ, if every one is a
    router-score tie at the budget boundary; 0 when any is not a tie (a real mismatch). Later blocks see
    other hidden states once one tie went the other way, so only the first difference can be judged; the
    caller then compares outputs with PyTorch run on the backend's selection in every block. CFG pairs rank
    on the max of both halves' scores, as the selection does."""
    for r in sorted(rec, key=lambda r: r["block"]):
        other = backend_idx.get(r["block"])
        if other is None:
            continue
        mine = r["indices"].cpu().numpy()
        if np.array_equal(np.sort(mine, axis=1), np.sort(other, axis=1)):
            continue
        scores = r["scores"].float().cpu().numpy()
        half = mine.shape[0] // 2
        if half and mine.shape[0] % 2 == 0 and np.array_equal(mine[:half], mine[half:]):  # CFG-shared selection
            scores = np.concatenate([np.maximum(scores[:half], scores[half:])] * 2)
        n_ties = 0
        for row in range(mine.shape[0]):
            diff = np.setxor1d(mine[row], other[row])
            if diff.size == 0:
                continue
            srow = scores[row]
            kth = np.sort(srow[mine[row]])[0]  # the reference's k-th (smallest kept) score
            tol = TIE_RTOL * max(1.0, float(np.abs(srow).max()))
            if np.any(np.abs(srow[diff] - kth) > tol):
                return 0
            n_ties += int(diff.size) // 2
        return n_ties
    return 0


def _reference_with_indices(reference: nn.Module, inputs: dict, backend_idx: dict[int, np.ndarray]) -> torch.Tensor:
    """The reference's output with every routed block keeping the backend's tokens (tie-resolved)."""

    def forced(index, hidden_states, temb, pooled, run_block, shared, routers):
        idx = torch.as_tensor(backend_idx[index], dtype=torch.long, device=hidden_states.device)
        extra, kept = run_block(gather_tokens(hidden_states, idx), idx)
        return extra, scatter_tokens(hidden_states, idx, kept)

    set_route_override(reference, forced)
    try:
        with torch.no_grad():
            return reference(**inputs).sample
    finally:
        set_route_override(reference, None)


def check_parity(
    onnx_path: str | os.PathLike,
    reference: nn.Module,
    cases: list[tuple[int, float | None, dict[str, torch.Tensor]]],
    *,
    atol: float,
    rtol: float,
    min_cosine: float,
    quantile: float = 1.0,
    min_index_agreement: float = 1.0,
    dtype: str = "fp32",
    provider: str = "cpu",
    onnx_input_dtype: torch.dtype | None = None,
) -> ParityReport:
    """Runs the ONNX in ONNX Runtime and compares it with ``reference`` on each case.

    Args:
        onnx_path (PathLike): Exported model.
        reference (nn.Module): The PyTorch pruned model (Shiva applied), usually float32.
        cases (list): ``(seed, timestep, inputs)`` triples; inputs in the reference's dtype.
        atol (float), rtol (float), min_cosine (float): Output thresholds (from the recipe).
        quantile (float): Fraction of elements that must be within tolerance (1.0 = all). Defaults to 1.0.
        min_index_agreement (float): Minimum kept-index overlap ``|A & B| / k`` in every routed block
            (1.0 = identical kept sets). Defaults to 1.0.
        dtype (str): Export dtype, for the report. Defaults to ``fp32``.
        provider (str): ``cpu`` or ``cuda``. Defaults to ``cpu``.
        onnx_input_dtype (torch.dtype): dtype the ONNX expects for float inputs (timestep stays fp32).
            Defaults to the reference inputs' dtype.
    """
    onnx_path = Path(onnx_path)
    report = ParityReport(str(onnx_path), PROVIDERS.get(provider, provider), dtype, min_index_agreement)
    if dtype == "bf16" and provider == "cpu":
        report.status = "skipped"
        report.reason = (
            "ONNX Runtime's CPU provider has no bfloat16 kernels (e.g. Conv); validate bf16 exports on a GPU backend"
        )
        return report
    sess = ChainedSession(onnx_path, provider, index_outputs=True)  # a segment file runs its whole chain
    index_tensors = sess.index_tensors
    try:
        float_names = set(get_adapter(reference).float_inputs(reference.config))
        out_names = [o.name for o in sess.get_outputs()]
        for seed, timestep, inputs in cases:
            if is_shiva_applied(reference):
                with torch.no_grad(), record_selection(reference) as rec:
                    ref_out = reference(**inputs).sample
            else:  # dense reference: nothing is selected
                rec = []
                with torch.no_grad():
                    ref_out = reference(**inputs).sample
            feed = {}
            for name in (i.name for i in sess.get_inputs()):  # the graph's inputs; the rest are baked in
                t = inputs[name]
                if (name in float_names or name.startswith("controlnet_block_")) and onnx_input_dtype is not None:
                    t = t.to(onnx_input_dtype)
                feed[name] = _to_numpy(t)
            outs = dict(zip(out_names, sess.run(out_names, feed)))
            agree, exact = {}, {}
            for r in rec:
                name = index_tensors.get(r["block"])
                if name is not None and name in outs:
                    agree[r["block"]], exact[r["block"]] = row_overlap(r["indices"].cpu().numpy(), outs[name])
            ties = 0
            if rec and any(v < 1.0 for v in agree.values()):
                ties = _near_ties(
                    rec,
                    {r["block"]: outs[index_tensors[r["block"]]] for r in rec if index_tensors.get(r["block"]) in outs},
                )
                if ties:  # only boundary ties differ: compare against PyTorch run on the backend's selection
                    ref_out = _reference_with_indices(reference, inputs, {b: outs[index_tensors[b]] for b in agree})
            stats = compare_arrays(OUTPUT_NAME, _to_numpy(ref_out), outs[OUTPUT_NAME], atol, rtol, min_cosine, quantile)
            report.cases.append(CaseResult(seed, timestep, stats, agree, exact, ties))
    finally:
        sess.close()

    bad_out = [c for c in report.cases if not c.output.passed]
    bad_idx = report.index_agreement < min_index_agreement
    if bad_out or bad_idx:
        report.status = "failed"
        parts = []
        if bad_out:
            w = report.worst
            parts.append(
                f"worst output {w.name!r} (seed {next(c.seed for c in report.cases if c.output is w)}): "
                f"max_abs {w.max_abs:.3g}, {w.within_fraction:.2%} of elements within atol {w.atol:g} + rtol {w.rtol:g}*|ref| "
                f"(need {w.quantile:.0%}), cos {w.cosine:.6f} (need {w.min_cosine})"
            )
        if bad_idx:
            worst_case = min(report.cases, key=lambda c: c.min_index_agreement)
            blk = min(worst_case.index_agreement, key=worst_case.index_agreement.get)
            parts.append(
                f"kept-index overlap {report.index_agreement:.1%} < {min_index_agreement:.0%} (block {blk}, seed {worst_case.seed})"
            )
        report.reason = "; ".join(parts)
    return report
