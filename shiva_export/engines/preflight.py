"""Pre-flight: list every construct in an ONNX graph that a TensorRT backend will not build.

A TensorRT build of a full SD3 transformer takes minutes and fails with one cryptic line at a time
(a parser assertion, a Myelin check). :func:`preflight` reads the graph once, without the weights
(``load_external_data=False``), and reports *all* known blockers up front, each naming the node, the
op, the problem and the fix. It needs only ``onnx``; no backend is imported.

What is checked (sources: TensorRT's ``NvInfer.h`` TopK limit, the onnx-tensorrt operator table and
parser changelog, and builds observed with TensorRT-RTX 1.7.1.116):

* ``TopK`` with ``K > 3840`` (both backends refuse it at build time), a ``K`` that is not a constant
  or initializer (its value cannot be checked and older parsers refuse it), and ``sorted=0`` (the
  parser requires ``sorted=1``).
* Ops with data-dependent output shapes or control flow: ``NonZero``, ``Unique``, ``Loop``, ``If``,
  ``NonMaxSuppression``, ``Compress``.
* ``ScatterElements`` / ``ScatterND`` with ``reduction`` other than ``none``.
* Opset-23 ``Attention`` (parser support from TensorRT 10.14; TensorRT-RTX refuses it in fp32 because
  no dedicated kernel exists) and ``RMSNormalization`` (parser support from TensorRT 10.15).
* Ops from custom domains that are not model-local functions (they need a registered plugin).
* Graph inputs with dynamic (non-static) dims when no optimization profile is given.

Not checked: anything that needs the weights or a builder (numerics, tactic availability, memory).
A clean report means "no *known* blocker", not "will build".
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, PreflightError
from shiva_export.export.onnx import load_onnx_graph
from shiva_export.logging import get_logger

__all__ = [
    "BACKENDS",
    "TOPK_MAX_K",
    "Finding",
    "PreflightReport",
    "preflight",
    "format_report",
    "normalize_backend_name",
]

logger = get_logger(__name__)

#: Backends the pre-flight knows, by their canonical names.
BACKENDS: tuple[str, ...] = ("tensorrt", "tensorrt-rtx")

#: Largest ``K`` a TensorRT ``TopK`` layer accepts (NvInfer.h, 10.x-11.1; also TensorRT-RTX 1.7).
TOPK_MAX_K = 3840

#: Ops whose output shape depends on data, or that add control flow TensorRT cannot build statically.
_DATA_DEPENDENT: dict[str, str] = {
    "NonZero": "use static top-k selection (TopK sorted=1 + GatherElements/ScatterElements, see shiva_export.prune.topk) "
    "instead of boolean masks, nonzero() or masked_select()",
    "Unique": "remove torch.unique() from the exported code path; TensorRT has no Unique importer",
    "Loop": "unroll the loop at export time (Python loop over a static count) or constant-fold the graph",
    "If": "remove data-dependent Python branches from forward() (or constant-fold: polygraphy surgeon sanitize --fold-constants)",
    "NonMaxSuppression": "move NMS out of the engine (post-process on the host) or use TensorRT's EfficientNMS plugin",
    "Compress": "replace boolean compression with a static index selection (TopK + GatherElements)",
}

#: (op, first tensorrt version that parses it)
_TRT_MIN_VERSION: dict[str, tuple[int, int]] = {"Attention": (10, 14), "RMSNormalization": (10, 15)}

_STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}

# onnx.TensorProto.FLOAT: the dtype in which tensorrt-rtx refuses opset-23 Attention.
_FLOAT32 = 1


@dataclass(frozen=True)
class Finding:
    """One construct the backend will not build.

    Attributes:
        node (str): Node name (``<op>#<index> -> <first output>`` for unnamed nodes) or ``input '<name>'``.
        op (str): ONNX op type (``domain::Op`` for non-default domains), or ``graph input``.
        problem (str): What is wrong, with the offending value and the valid range.
        fix (str): What to change.
        code (str): Stable short identifier, e.g. ``topk-k-too-large``.
    """

    node: str
    op: str
    problem: str
    fix: str
    code: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "problem": self.problem, "fix": self.fix, "code": self.code}

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.problem}. Fix: {self.fix}."


@dataclass
class PreflightReport:
    """Result of :func:`preflight`.

    Attributes:
        backend (str): ``"tensorrt"`` or ``"tensorrt-rtx"``.
        backend_version (str | None): Version the checks assumed; None when unknown.
        opset (int | None): Default-domain opset of the model.
        findings (list[Finding]): Every blocker found, in graph order (inputs first).
        op_counts (dict[str, int]): Node count per op type, subgraphs and local function bodies included.
        source (str | None): The ONNX path when one was given.
    """

    backend: str
    backend_version: str | None
    opset: int | None
    findings: list[Finding] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    source: str | None = None

    @property
    def ok(self) -> bool:
        """True when no finding was reported."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "backend_version": self.backend_version,
            "opset": self.opset,
            "source": self.source,
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
            "op_counts": dict(self.op_counts),
        }

    def raise_if_failed(self) -> None:
        """Raises :class:`PreflightError` naming the first finding and the count of the others.

        Raises:
            PreflightError: There is at least one finding.
        """
        if self.ok:
            return
        first = self.findings[0]
        others = len(self.findings) - 1
        backend = self.backend + (f" {self.backend_version}" if self.backend_version else "")
        tail = f" {others} other finding(s); see preflight()/format_report() for the full list." if others else ""
        raise PreflightError(
            f"{backend} will not build node '{first.node}' ({first.op}): {first.problem}. Fix: {first.fix}.{tail}"
        )


def normalize_backend_name(name: str) -> str:
    """Canonical backend name (``tensorrt_rtx`` and ``trt-rtx`` are accepted for ``tensorrt-rtx``).

    Raises:
        ConfigError: ``name`` is not a known backend.
    """
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"tensorrt": "tensorrt", "trt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx", "trt-rtx": "tensorrt-rtx"}
    if key not in aliases:
        raise ConfigError(
            f"Unknown TensorRT backend: {name!r}. Choose one of {', '.join(BACKENDS)}. Pass a supported backend name."
        )
    return aliases[key]


def _parse_version(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    parts: list[int] = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


class _Graph:
    """Name lookups over one (sub)graph, chained to its enclosing scope."""

    def __init__(self, graph: Any, parent: _Graph | None, base_dir: Path | None):
        self.graph = graph
        self.parent = parent
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in getattr(graph, "initializer", ())}  # FunctionProto has none
        self.constants: dict[str, Any] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                self.constants[node.output[0]] = node

    def lookup_constant(self, name: str) -> tuple[bool, Any]:
        """(found, numpy value or None when the value cannot be read) for a constant tensor ``name``."""
        scope: _Graph | None = self
        while scope is not None:
            if name in scope.initializers:
                return True, scope._tensor_value(scope.initializers[name])
            if name in scope.constants:
                return True, scope._constant_value(scope.constants[name])
            scope = scope.parent
        return False, None

    def _tensor_value(self, tensor: Any) -> Any:
        from onnx import external_data_helper, numpy_helper

        try:
            if external_data_helper.uses_external_data(tensor):
                if self.base_dir is None:
                    return None
                tensor_copy = type(tensor)()
                tensor_copy.CopyFrom(tensor)
                external_data_helper.load_external_data_for_tensor(tensor_copy, str(self.base_dir))
                return numpy_helper.to_array(tensor_copy)
            return numpy_helper.to_array(tensor)
        except Exception as err:  # noqa: BLE001 - an unreadable constant is reported, not fatal
            logger.debug("cannot read constant %s: %s", tensor.name, err)
            return None

    def _constant_value(self, node: Any) -> Any:
        import numpy as np

        for attr in node.attribute:
            if attr.name == "value":
                return self._tensor_value(attr.t)
            if attr.name == "value_int":
                return np.asarray(attr.i)
            if attr.name == "value_ints":
                return np.asarray(list(attr.ints))
        return None


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _node_label(node: Any, index: int, prefix: str) -> str:
    if node.name:
        return f"{prefix}{node.name}"
    out = node.output[0] if node.output else "?"
    return f"{prefix}{node.op_type}#{index} -> {out}"


def _op_label(node: Any) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _walk(scope: _Graph, prefix: str = "") -> Iterator[tuple[_Graph, Any, str]]:
    """Yields (scope, node, label) for every node, descending into subgraph attributes."""
    from onnx import AttributeProto

    for index, node in enumerate(scope.graph.node):
        label = _node_label(node, index, prefix)
        yield scope, node, label
        for attr in node.attribute:
            subgraphs = (
                [attr.g]
                if attr.type == AttributeProto.GRAPH
                else list(attr.graphs)
                if attr.type == AttributeProto.GRAPHS
                else []
            )
            for sub in subgraphs:
                yield from _walk(_Graph(sub, scope, scope.base_dir), prefix=f"{label}/{attr.name}/")


def _elem_types(model: Any) -> dict[str, int]:
    """Tensor name -> ONNX elem_type, from the graph's declarations and (if needed) shape inference."""
    types: dict[str, int] = {}

    def collect(graph: Any) -> None:
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in graph.initializer:
            types[t.name] = t.data_type

    collect(model.graph)
    return types


def _infer_types(model: Any) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception as err:  # noqa: BLE001 - best effort only; missing types are reported as unknown
        logger.debug("shape inference failed during preflight: %s", err)
        return {}
    return _elem_types(inferred)


def _dtype_name(elem_type: int | None) -> str:
    if not elem_type:
        return "unknown"
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type).lower()


def _load(onnx_path_or_model: Any) -> tuple[Any, str | None, Path | None]:
    import onnx

    if isinstance(onnx_path_or_model, onnx.ModelProto):
        return onnx_path_or_model, None, None
    if not isinstance(onnx_path_or_model, (str, os.PathLike)):
        raise ConfigError(
            f"preflight() input has type {type(onnx_path_or_model).__name__}. Expected an .onnx path or an onnx.ModelProto. "
            "Pass the exported model path."
        )

    path = Path(onnx_path_or_model)
    model = load_onnx_graph(path, "ONNX file for preflight")
    return model, str(path), path.parent


def preflight(
    onnx_path_or_model: str | os.PathLike | Any,
    backend: str,
    backend_version: str | None = None,
    profile_given: bool = False,
) -> PreflightReport:
    """Lists every construct in an ONNX graph that ``backend`` will not build.

    The model is read without external weights (``load_external_data=False``); small constants stored
    externally (rare) are read from the model's folder when a path is given.

    Args:
        onnx_path_or_model (str | os.PathLike | onnx.ModelProto): The exported graph.
        backend (str): ``"tensorrt"`` or ``"tensorrt-rtx"``.
        backend_version (str | None): Backend version, e.g. ``"10.13.3.9"``; version-dependent ops
            (opset-23 ``Attention``/``RMSNormalization`` on ``tensorrt``) are reported when None
            because support cannot be confirmed. Defaults to None.
        profile_given (bool): An optimization profile will be supplied, so dynamic input dims are
            allowed. Defaults to False.

    Returns:
        PreflightReport: ``ok`` when nothing was found; call ``raise_if_failed()`` to turn findings
        into a :class:`PreflightError`.

    Raises:
        ConfigError: Unknown backend, or the path is missing / not an ONNX file.
    """
    backend = normalize_backend_name(backend)
    model, source, base_dir = _load(onnx_path_or_model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    version = _parse_version(backend_version)
    local_function_domains = {f.domain for f in model.functions}

    findings: list[Finding] = []
    counts: Counter[str] = Counter()
    types: dict[str, int] | None = None
    inferred = False

    findings.extend(_check_inputs(model, profile_given))

    root = _Graph(model.graph, None, base_dir)
    scopes = [_walk(root)]
    for fn in model.functions:  # model-local functions (dynamo exports may keep some): check their bodies once
        scopes.append(_walk(_Graph(fn, None, base_dir), prefix=f"function {fn.domain}::{fn.name}/"))
    for scope, node, label in (item for walker in scopes for item in walker):
        op = _op_label(node)
        counts[op] += 1
        if node.domain not in _STANDARD_DOMAINS:
            if node.domain not in local_function_domains:
                findings.append(
                    Finding(
                        label,
                        op,
                        f"op from custom domain '{node.domain}' has no TensorRT importer",
                        "export with standard ONNX ops only, or register a TensorRT plugin for it",
                        "custom-domain-op",
                    )
                )
            continue
        kind = node.op_type
        if kind == "TopK":
            findings.extend(_check_topk(scope, node, label))
        elif kind in _DATA_DEPENDENT:
            findings.append(
                Finding(
                    label,
                    op,
                    f"{kind} has a data-dependent output shape or control flow; TensorRT needs static shapes",
                    _DATA_DEPENDENT[kind],
                    f"data-dependent-{kind.lower()}",
                )
            )
        elif kind in ("ScatterElements", "ScatterND"):
            reduction = _attr(node, "reduction", b"none")
            reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
            if reduction != "none":
                findings.append(
                    Finding(
                        label,
                        op,
                        f"{kind} reduction='{reduction}' is not supported; only reduction='none' is",
                        "scatter with unique indices and reduction='none' (torch.scatter without reduce=, index_copy); "
                        "static top-k indices are unique",
                        "scatter-reduction",
                    )
                )
        elif kind in _TRT_MIN_VERSION:
            elem_type = None
            if backend == "tensorrt-rtx" and kind == "Attention" and node.input:
                if types is None:
                    types = _elem_types(model)
                if node.input[0] not in types and not inferred:
                    types, inferred = {**_infer_types(model), **types}, True
                elem_type = types.get(node.input[0])
            finding = _check_opset23(backend, version, backend_version, node, label, op, elem_type)
            if finding is not None:
                findings.append(finding)

    report = PreflightReport(
        backend=backend,
        backend_version=backend_version,
        opset=opset,
        findings=findings,
        op_counts=dict(sorted(counts.items())),
        source=source,
    )
    logger.debug("preflight %s on %s: %d finding(s)", backend, source or "<model>", len(findings))
    return report


def _check_inputs(model: Any, profile_given: bool) -> list[Finding]:
    if profile_given:
        return []
    init_names = {t.name for t in model.graph.initializer}
    found = []
    for vi in model.graph.input:
        if vi.name in init_names:
            continue  # IR < 4 lists initializers as inputs
        tt = vi.type.tensor_type
        label = f"input '{vi.name}'"
        if not tt.HasField("shape"):
            found.append(
                Finding(
                    label,
                    "graph input",
                    "input has no declared shape (rank unknown)",
                    "export with static input shapes, or pass profile={name: (min, opt, max)}",
                    "dynamic-input",
                )
            )
            continue
        dims = []
        dynamic = False
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(str(d.dim_value))
            else:
                dynamic = True
                dims.append(d.dim_param or "?")
        if dynamic:
            found.append(
                Finding(
                    label,
                    "graph input",
                    f"input has dynamic shape [{', '.join(dims)}] and no optimization profile was given; every dim must be a positive integer",
                    f"pass profile={{'{vi.name}': (min, opt, max)}} to the builder, or export with static shapes",
                    "dynamic-input",
                )
            )
    return found


def _check_topk(scope: _Graph, node: Any, label: str) -> list[Finding]:
    import numpy as np

    op = _op_label(node)
    found = []
    if _attr(node, "sorted", 1) == 0:
        found.append(
            Finding(
                label,
                op,
                "TopK sorted=0 is not supported; sorted must be 1",
                "export torch.topk(..., sorted=True) (sort the indices afterwards if order matters)",
                "topk-unsorted",
            )
        )
    k_value: int | None = None
    if len(node.input) >= 2 and node.input[1]:
        found_const, value = scope.lookup_constant(node.input[1])
        if not found_const:
            found.append(
                Finding(
                    label,
                    op,
                    f"TopK K comes from tensor '{node.input[1]}', which is not a constant or initializer, so K <= {TOPK_MAX_K} cannot be checked",
                    "make k a Python int at export time, or constant-fold the graph (polygraphy surgeon sanitize --fold-constants)",
                    "topk-k-not-constant",
                )
            )
        elif value is None or np.asarray(value).size != 1:
            found.append(
                Finding(
                    label,
                    op,
                    f"TopK K constant '{node.input[1]}' cannot be read as a single integer",
                    "store K as a 1-element int64 initializer (re-export with a Python int k)",
                    "topk-k-not-constant",
                )
            )
        else:
            k_value = int(np.asarray(value).reshape(-1)[0])
    else:
        k_attr = _attr(node, "k")  # opset < 10
        if k_attr is not None:
            k_value = int(k_attr)
    if k_value is not None and k_value > TOPK_MAX_K:
        found.append(
            Finding(
                label,
                op,
                f"TopK K = {k_value} exceeds the TensorRT maximum; K must be <= {TOPK_MAX_K}",
                f"lower the keep budget so k <= {TOPK_MAX_K} (keep ratio <= {TOPK_MAX_K}/N), or select the N-k tokens to drop "
                "with a TopK of the lowest scores (complement trick)",
                "topk-k-too-large",
            )
        )
    return found


def _check_opset23(
    backend: str,
    version: tuple[int, ...] | None,
    version_text: str | None,
    node: Any,
    label: str,
    op: str,
    elem_type: int | None,
) -> Finding | None:
    kind = node.op_type
    if backend == "tensorrt":
        need = _TRT_MIN_VERSION[kind]
        need_text = ".".join(map(str, need))
        if version is None:
            return Finding(
                label,
                op,
                f"opset-23 {kind} needs tensorrt >= {need_text} and the backend version is unknown",
                f"pass backend_version, or export at opset <= 22 so {kind} is decomposed into basic ops",
                f"{kind.lower()}-version",
            )
        if version[:2] < need:
            return Finding(
                label,
                op,
                f"opset-23 {kind} needs tensorrt >= {need_text}, got {version_text}",
                f"upgrade TensorRT to >= {need_text}, or export at opset <= 22 so {kind} is decomposed into basic ops",
                f"{kind.lower()}-version",
            )
        return None
    # tensorrt-rtx: RMSNormalization builds (observed on 1.7.1.116); Attention builds in fp16/bf16 only.
    if kind != "Attention":
        return None
    if elem_type is not None and elem_type != _FLOAT32:
        return None
    dtype = _dtype_name(elem_type)
    return Finding(
        label,
        op,
        f"opset-23 Attention with {dtype} inputs is refused by tensorrt-rtx (no dedicated fp32 attention kernel); "
        "only fp16/bf16 Attention builds",
        "export at opset <= 22 for fp32 (attention is then built from MatMul/Softmax), or export in fp16/bf16",
        "attention-fp32-rtx",
    )


def format_report(report: PreflightReport) -> str:
    """Human-readable multi-line rendering of a :class:`PreflightReport`."""
    backend = report.backend + (f" {report.backend_version}" if report.backend_version else "")
    where = f" on {report.source}" if report.source else ""
    status = "OK" if report.ok else f"FAILED ({len(report.findings)} finding(s))"
    lines = [f"Preflight for {backend}{where} (opset {report.opset}): {status}"]
    for i, f in enumerate(report.findings, 1):
        lines.append(f"  {i}. {f.node} [{f.op}]")
        lines.append(f"       problem: {f.problem}")
        lines.append(f"       fix:     {f.fix}")
    total = sum(report.op_counts.values())
    top = ", ".join(f"{op} x{n}" for op, n in sorted(report.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
    lines.append(f"  {total} node(s): {top}" if total else "  0 nodes")
    return "\n".join(lines)
