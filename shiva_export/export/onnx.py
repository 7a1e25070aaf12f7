"""ONNX export of a Shiva-pruned diffusers transformer (any adapter) with static per-block budgets.

Input names, their order, sample inputs, export-only rewrites (Flux: RoPE baked as constants) and custom
translations (PixArt: the squeeze fix) come from the model's adapter (``shiva_export.models``).

Exporter choice (on evidence, ``feasibility.md`` and ``tensorrt-rtx.md``):

- **torch.onnx dynamo exporter at opset 20.** It keeps TopK's ``K`` a constant initializer (TensorRT's
  parser needs that), lowers ``torch.gather``/``scatter`` to single ``GatherElements``/``ScatterElements``
  nodes, gives ~2x fewer nodes than the TorchScript exporter, and decomposes RMSNorm (SD3.5 qk-norm),
  which the TorchScript exporter cannot export at opset 20 (pytorch/pytorch#159249).
- **Opset <= 22, never 23.** Opset 23 emits the ONNX ``Attention`` op, which TensorRT-RTX 1.7 refuses
  in fp32 ("not supported by a dedicated kernel") and TensorRT parses only from 10.14; opset 20 is the
  newest that TensorRT 10.x documents for its parser, so it is the default.
- **Fixed shapes by default**; an optional dynamic batch axis (``batch_size``) is traced with at least two
  prompts per CFG half, because torch.export specializes size-1 dims.
- **External data only above 2 GB** (protobuf limit); small models stay a single file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shiva_export._version import __version__
from shiva_export.errors import ConfigError, ExportError, ShivaInternalError
from shiva_export.logging import get_logger
from shiva_export.models import InputSpec, get_adapter

if TYPE_CHECKING:
    from shiva_export.export.lazy import LazyWeights
from shiva_export.export import graph_cache
from shiva_export.export.lazy import resolve_stand_ins_, standing_in, stream_initializers_
from shiva_export.utils.io import (
    check_writable,
    commit_files,
    onnx_record_path,
    sha256_file,
    sweep_stale_temps,
    temp_prefix,
    write_onnx_record,
)

__all__ = [
    "export_onnx",
    "ExportResult",
    "onnx_summary",
    "kept_index_tensors",
    "read_shiva_metadata",
    "load_onnx_graph",
    "package_versions",
    "SUMMARY_OPS",
    "META_PREFIX",
    "block_scopes",
]

logger = get_logger(__name__)

DEFAULT_OPSET = 20
_MAX_OPSET = 22
_PROTOBUF_LIMIT = 2 * 1024**3
META_PREFIX = "shiva."
#: op types reported in the export summary (the pruning path first).
SUMMARY_OPS = (
    "TopK",
    "GatherElements",
    "GatherND",
    "Gather",
    "ScatterElements",
    "ScatterND",
    "CumSum",
    "MatMul",
    "Gemm",
    "Softmax",
    "LayerNormalization",
    "Conv",
    "NonZero",
)
_FORBIDDEN_OPS = ("NonZero", "Unique", "Loop", "If", "Compress", "NonMaxSuppression")


@contextlib.contextmanager
def quiet_exporter():
    """The dynamo exporter prints progress to stdout and warns about torchvision: keep stdout clean
    for ``--json`` and route the chatter to this module's debug log."""
    buf = io.StringIO()
    noisy = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo", "torch.export")
    ]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(noisy, levels):
            lg.setLevel(lv)
        if buf.getvalue():
            logger.debug("exporter output:\n%s", buf.getvalue())


class _ExportWrapper(nn.Module):
    """Positional-argument, tensor-returning view of the transformer for the exporter: graph inputs in the
    adapter's order; static forward arguments (``extras``, e.g. Flux position ids) are closed over."""

    def __init__(self, transformer: nn.Module, names: tuple[str, ...], extras: dict[str, torch.Tensor]):
        super().__init__()
        self.transformer = transformer
        self.names = tuple(names)
        self.extras = extras

    def forward(self, *args):
        return self.transformer(**dict(zip(self.names, args)), **self.extras, return_dict=False)[0]


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    onnx_path: Path
    data_path: Path | None
    onnx_sha256: str
    data_sha256: str | None
    onnx_bytes: int
    data_bytes: int
    opset: int
    dtype: str
    dynamic_batch: bool
    export_seconds: float
    input_shapes: dict[str, list]
    output_shape: list
    op_counts: dict[str, int]
    num_nodes: int
    kept_index_tensors: dict[int, str]
    metadata: dict[str, str] = field(default_factory=dict)
    trace_cached: bool = False  # the exporter's output came from the trace cache (export.graph_cache)
    trace_entry: str | None = None  # that cache entry's folder

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["onnx_path"] = str(self.onnx_path)
        d["data_path"] = str(self.data_path) if self.data_path else None
        d["kept_index_tensors"] = {str(k): v for k, v in self.kept_index_tensors.items()}
        return d


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"shiva-export": __version__}
    for pkg in ("torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def onnx_summary(model) -> tuple[dict[str, int], int]:
    """(op counts of :data:`SUMMARY_OPS` plus every other op type, total nodes) of a ModelProto."""
    counts = Counter(n.op_type for n in model.graph.node)
    for f in model.functions:
        counts.update(n.op_type for n in f.node)
    return dict(sorted(counts.items())), sum(counts.values())


def load_onnx_graph(path: str | os.PathLike, what: str = "ONNX"):
    """Loads an ONNX graph (never its external weights), refusing a missing, empty, truncated or
    non-ONNX file with one :class:`~shiva_export.errors.ConfigError` line naming ``what`` and the fix."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{what} {p} does not exist or is not a file. Pass an .onnx file written by `shiva-export onnx`."
        )
    if p.stat().st_size == 0:
        raise ConfigError(f"{what} {p} is empty (0 bytes). Re-export it with `shiva-export onnx`.")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises many types for a damaged file
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(
            f"{what} {p} is not a readable ONNX model ({reason}). Re-export it with `shiva-export onnx`."
        ) from None
    if not model.graph.node or not model.graph.output:
        raise ConfigError(
            f"{what} {p} holds no graph (truncated or not an ONNX model). Re-export it with `shiva-export onnx`."
        )
    return model


def read_shiva_metadata(path: str | os.PathLike, *, require: bool = False, what: str = "ONNX") -> dict[str, Any]:
    """The ``shiva.*`` metadata :func:`export_onnx` wrote, prefix stripped and values JSON-decoded
    (plain strings stay strings). Reads the graph only, never the external weights. With ``require``, an
    ONNX this tool did not write (no ``shiva.model`` / ``shiva.input_spec``) is refused."""
    model = load_onnx_graph(path, what)
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX) :]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[len(META_PREFIX) :]] = p.value
    if require and ("model" not in out or not isinstance(out.get("input_spec"), dict)):
        raise ConfigError(
            f"{what} {path} carries no shiva.* metadata, so it was not written by `shiva-export onnx`; export the model with it."
        )
    return out


_PASS_THROUGH = {"Expand", "Unsqueeze", "Cast", "Reshape", "Identity", "Squeeze"}


def kept_index_tensors(model, routed_blocks: list[int]) -> dict[int, str]:
    """Names of the per-block kept-index tensors ``[B, k]`` in an exported graph.

    Found structurally: each routed block gathers its image tokens with one ``GatherElements`` (or
    ``GatherND``) whose index input is the (expanded) kept-index tensor. Walking back through
    shape-only ops gives that tensor; blocks appear in topological order.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    found: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("GatherElements", "GatherND"):
            continue
        name = node.input[1]
        while name in producers and producers[name].op_type in _PASS_THROUGH:
            name = producers[name].input[0]
        found.append(name)
    if len(found) != len(routed_blocks):
        raise ExportError(
            f"found {len(found)} token gathers in the exported graph but {len(routed_blocks)} routed blocks; "
            "the export does not have the expected static top-k structure. Please report this with --debug output."
        )
    return dict(zip(routed_blocks, found))


def _add_index_outputs(model, index_tensors: dict[int, str], spec: InputSpec, dynamic_batch: bool) -> dict[int, str]:
    """Adds ``kept_indices.<block>`` graph outputs (Identity of each kept-index tensor)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in inferred.graph.value_info:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    out = {}
    for block, name in index_tensors.items():
        new = f"kept_indices.{block}"
        shape = shapes.get(name) or ["batch_size" if dynamic_batch else spec.model_batch, f"k_{block}"]
        model.graph.node.append(
            onnx.helper.make_node("Identity", [name], [new], name=f"shiva_debug_kept_indices_{block}")
        )
        model.graph.output.append(onnx.helper.make_tensor_value_info(new, onnx.TensorProto.INT64, shape))
        out[block] = new
    return out


def block_scopes(transformer: nn.Module) -> list[str]:
    """The exporter's name scope (``pkg.torch.onnx.name_scopes``) of each routable block, in flat-index order:
    what lets a graph be cut at block boundaries (:mod:`shiva_export.export.segments`) without knowing the
    architecture."""
    names = {id(m): n for n, m in transformer.named_modules()}
    return [f"transformer.{names[id(b)]}" for b in get_adapter(transformer).blocks(transformer)]


def _check_contract(model) -> None:
    """The static-shape contract: TopK present with sorted=1, no data-dependent-shape ops."""
    bad = [n for n in model.graph.node if n.op_type in _FORBIDDEN_OPS]
    if bad:
        raise ExportError(
            f"exported graph holds data-dependent op {bad[0].op_type} (node {bad[0].name}); static top-k must not. Please report this."
        )
    topks = [n for n in model.graph.node if n.op_type == "TopK"]
    if not topks:
        raise ExportError("exported graph has no TopK node although blocks are routed. Please report this.")
    for n in topks:
        sorted_attr = next((a.i for a in n.attribute if a.name == "sorted"), 1)
        if sorted_attr != 1:
            raise ExportError(f"TopK node {n.name} has sorted=0; TensorRT needs sorted=1. Please report this.")


def _export_streamed(
    wrapper, args, dest: Path, weights: LazyWeights, opset: int, names, adapter, dynamic_shapes, external: bool
) -> None:
    """``torch.onnx.export(dynamo=True)`` of a transformer holding fake placeholders, in the exporter's own
    order (capture, version conversion, optimize, rename inputs/outputs, save), with the optimizer run
    here over stand-ins so that it folds what it folds on real weights (``Transpose``) without their data,
    and the save streaming each weight from ``weights``."""
    from torch.onnx._internal._lazy_import import onnxscript_apis
    from torch.onnx._internal.exporter import _ir_passes

    program = torch.onnx.export(
        wrapper,
        args,
        None,
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        custom_translation_table=adapter.onnx_translations() or None,
        optimize=False,
        verbose=False,
    )
    model = program.model
    stream_initializers_(model, weights, prefix="transformer.")
    with standing_in():
        program.model = onnxscript_apis.optimize(model)
    resolve_stand_ins_(program.model)
    _ir_passes.rename_inputs(program.model, list(names))
    _ir_passes.rename_outputs(program.model, [adapter.OUTPUT_NAME])
    program.save(str(dest), external_data=external)


def export_onnx(
    transformer: nn.Module,
    out: str | os.PathLike,
    spec: InputSpec,
    *,
    opset: int | None = None,
    dtype: str = "fp32",
    dynamic_batch: bool = False,
    routed_blocks: list[int] | None = None,
    metadata: dict[str, Any] | None = None,
    check: bool = True,
    debug_outputs: bool = False,
    weights: LazyWeights | None = None,
    extra_inputs: dict[str, torch.Tensor] | None = None,
    trace_key: dict[str, Any] | None = None,
) -> ExportResult:
    """Exports a (Shiva-applied) transformer to ONNX, atomically.

    Args:
        transformer (nn.Module): A diffusers transformer with an adapter, usually with :func:`apply_shiva_` applied,
            already in the export dtype.
        out (PathLike): Destination ``.onnx`` path. External data, when needed, goes to ``<out>.data``.
        spec (InputSpec): Static input shapes.
        opset (int): ONNX opset, 17..22. Defaults to 20 (see module docstring).
        dtype (str): Name recorded for the export (``fp32``/``fp16``/``bf16``). Defaults to ``fp32``.
        dynamic_batch (bool): Make axis 0 of every input/output symbolic (``batch_size``). Defaults to False.
        routed_blocks (list[int]): Routed blocks, to locate kept-index tensors. Defaults to None (dense).
        metadata (dict): Extra ``metadata_props`` (values JSON-encoded unless str), prefixed ``shiva.``.
        check (bool): Run ``onnx.checker.check_model`` by path (works above 2 GB). Defaults to True.
        debug_outputs (bool): Also output each routed block's kept indices as ``kept_indices.<block>``
            (int64 ``[B, k]``), for index-level parity on any backend. Defaults to False.
        weights (LazyWeights): Makers of the transformer's placeholder (fake) tensors, already in the
            export dtype: the bounded-memory path (``shiva_export.export.lazy``). The exporter traces the
            placeholders, and each weight is made, written to the external-data file and freed in turn; the
            graph and bytes equal the eager path's. Defaults to None (the transformer holds real weights).
        extra_inputs (dict): More graph inputs after the adapter's, ``{name: sample tensor}``, passed to the
            transformer as keyword arguments (ControlNet residuals: ``shiva_export.export.controlnet``). Defaults to None.
        trace_key (dict): What determines this transformer's graph beyond the trace inputs (the export key of
            :func:`shiva_export.export.graph_cache.export_key_for` and the keep schedule): the exporter's output is then
            reused from, or stored in, the trace cache (:mod:`shiva_export.export.graph_cache`). Defaults to None (traced).

    Returns:
        ExportResult: paths, hashes, sizes, op counts and the located kept-index tensors.
    """
    import onnx

    opset = DEFAULT_OPSET if opset is None else opset
    if not 17 <= opset <= _MAX_OPSET:
        raise ConfigError(
            f"--opset {opset} is out of range; expected 17..{_MAX_OPSET}. Opset 23 emits the ONNX Attention op, which "
            "TensorRT-RTX refuses in fp32 and TensorRT parses only from 10.14; use the default 20."
        )
    dest = check_writable(Path(out), "ONNX output")
    torch_dtype = next(transformer.parameters()).dtype
    trace_spec = spec
    if dynamic_batch and spec.batch < 2:
        # torch.export specializes size-1 dims: trace with two prompts so the batch axis stays symbolic.
        trace_spec = InputSpec(2, spec.height, spec.width, spec.text_len, spec.cfg)
    adapter = get_adapter(transformer)
    names = adapter.input_names(transformer.config) + tuple(extra_inputs or ())
    inputs = adapter.make_inputs(transformer.config, trace_spec, seed=0, dtype=torch_dtype) | dict(extra_inputs or {})
    external = _param_bytes(transformer) > _PROTOBUF_LIMIT - (64 << 20)

    sweep_stale_temps(dest.parent)  # leftovers of a killed export in this folder
    tmp_dir = Path(tempfile.mkdtemp(prefix=temp_prefix("export-"), dir=dest.parent))
    tmp_onnx = tmp_dir / dest.name
    cache = _trace_cache(trace_key, transformer, names, inputs, opset, spec, dynamic_batch, external, weights, dest)
    t0 = time.perf_counter()
    try:
        cached = _trace_or_fetch(
            cache, transformer, adapter, names, inputs, tmp_onnx, opset, spec, dynamic_batch, external, weights
        )
        export_seconds = time.perf_counter() - t0
        model = onnx.load(str(tmp_onnx), load_external_data=False)
        index_tensors = _index_tensors(model, routed_blocks, debug_outputs, spec, dynamic_batch)
        meta = {
            "exporter": "torch.onnx dynamo",
            "block_scopes": block_scopes(transformer),
            "opset": opset,
            "dtype": dtype,
            "dynamic_batch": dynamic_batch,
            "input_spec": spec.to_dict(),
            "kept_index_tensors": {str(k): v for k, v in index_tensors.items()},
            "versions": package_versions(),
            **(metadata or {}),
        }
        str_meta = _stamp_and_check(model, tmp_onnx, meta, check)
        _commit_graph(tmp_onnx, dest)
        if cache is not None:
            cache.commit()  # only a trace whose export committed is kept
    finally:
        if cache is not None:
            cache.discard()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    result = _export_result(
        transformer,
        adapter,
        dest,
        external,
        spec,
        trace_spec,
        opset,
        dtype,
        dynamic_batch,
        export_seconds,
        index_tensors,
        str_meta,
        extra_inputs,
    )
    result.trace_cached = cached
    result.trace_entry = str(cache.entry) if cached else None
    return result


def _trace_or_fetch(
    cache, transformer, adapter, names, inputs, tmp_onnx: Path, opset, spec, dynamic_batch, external, weights
) -> bool:
    """Writes the exporter's output to ``tmp_onnx`` (external data beside it): copied from the trace cache when it
    holds this key (True), else traced and staged for the cache (False)."""
    if cache is not None and cache.fetch(tmp_onnx):
        return True
    _trace_to_onnx(
        transformer,
        adapter,
        names,
        inputs,
        tmp_onnx,
        opset,
        _dynamic_shapes(names, spec, dynamic_batch),
        external,
        weights,
    )
    if cache is not None:
        cache.stage(tmp_onnx, [p for p in tmp_onnx.parent.iterdir() if p.name != tmp_onnx.name])
    return False


def _commit_graph(tmp_onnx: Path, dest: Path) -> None:
    """Records the finished graph's and its external data's sha256 and moves them into place, the .onnx last."""
    tmp_dir = tmp_onnx.parent
    data_files = [p for p in tmp_dir.iterdir() if p.name != dest.name]
    record = write_onnx_record(
        tmp_onnx, data_files, tmp_dir / onnx_record_path(dest).name
    )  # reuse is checked against it
    moves = [(p, dest.parent / p.name) for p in data_files] + [(record, dest.parent / record.name), (tmp_onnx, dest)]
    commit_files(moves)  # data first, the .onnx (what looks complete) last


def _trace_cache(trace_key, transformer, names, inputs, opset, spec, dynamic_batch, external, weights, dest):
    """The trace cache entry of this export (:mod:`shiva_export.export.graph_cache`): ``trace_key`` plus every input
    of the trace; None without a key or with ``SHIVA_ONNX_CACHE=0``."""
    if trace_key is None or not graph_cache.trace_cache_enabled():
        return None
    trace = {
        "inputs": [[n, list(inputs[n].shape), str(inputs[n].dtype)] for n in names],
        "static_kwargs": sorted([k, list(v.shape), str(v.dtype)] for k, v in inputs.items() if k not in names),
        "model_dtype": str(next(transformer.parameters()).dtype),
        "opset": opset,
        "dynamic_batch": dynamic_batch,
        "cfg": spec.cfg,
        "external_data": dest.name + ".data" if external else None,  # its location is written into the graph
        "lazy_weights": weights is not None,
        "source_sha256": graph_cache.source_digest(),
        "versions": package_versions(),
    }
    return graph_cache.GraphCache({"export": trace_key, "trace": trace}, (trace["external_data"],) if external else ())


def _index_tensors(
    model, routed_blocks: list[int] | None, debug_outputs: bool, spec: InputSpec, dynamic_batch: bool
) -> dict:
    """The kept-index tensor of each routed block (the graph's routing contract checked first), also made graph
    outputs with ``debug_outputs``; none for a dense graph."""
    if not routed_blocks:
        return {}
    _check_contract(model)
    index_tensors = kept_index_tensors(model, routed_blocks)
    if debug_outputs:
        index_tensors = _add_index_outputs(model, index_tensors, spec, dynamic_batch)
    return index_tensors


def _dynamic_shapes(names: tuple[str, ...], spec: InputSpec, dynamic_batch: bool):
    """torch.export dynamic shapes: a symbolic axis 0 on every input (even, as two halves, under CFG), else None."""
    if not dynamic_batch:
        return None
    if spec.cfg:
        half = torch.export.Dim("half_batch", min=1, max=1024)
        axis = 2 * half
    else:
        axis = torch.export.Dim("batch_size", min=1, max=2048)
    return (tuple({0: axis} for _ in names),)


def _trace_to_onnx(
    transformer, adapter, names, inputs, tmp_onnx: Path, opset: int, dynamic_shapes, external: bool, weights
) -> None:
    """Runs the dynamo exporter (streamed when the weights are lazy); its failures become one-line ExportErrors."""
    args = tuple(inputs[n] for n in names)
    extras = {k: v for k, v in inputs.items() if k not in names}
    wrapper = _ExportWrapper(transformer, names, extras).eval()
    try:
        with torch.no_grad(), quiet_exporter(), adapter.export_context(transformer, inputs):
            if weights is not None:
                _export_streamed(wrapper, args, tmp_onnx, weights, opset, names, adapter, dynamic_shapes, external)
            else:
                torch.onnx.export(
                    wrapper,
                    args,
                    str(tmp_onnx),
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(names),
                    output_names=[adapter.OUTPUT_NAME],
                    dynamic_shapes=dynamic_shapes,
                    custom_translation_table=adapter.onnx_translations() or None,
                    external_data=external,
                    verbose=False,
                )
    except ShivaInternalError:
        raise
    except Exception as err:  # exporter failures come as many types
        first = str(err).strip().splitlines()[0][:300]
        raise ExportError(
            f"torch.onnx.export (dynamo, opset {opset}) failed: {first}. Re-run with --debug for the full trace."
        ) from err


def _stamp_and_check(model, tmp_onnx: Path, meta: dict[str, Any], check: bool) -> dict[str, str]:
    """Writes the ``shiva.*`` metadata into the graph (external data untouched) and runs the checker by path."""
    import onnx

    str_meta = {META_PREFIX + k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in meta.items()}
    del model.metadata_props[:]
    for k, v in str_meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "shiva-export"
    model.producer_version = __version__
    onnx.save(model, str(tmp_onnx))  # graph only: external data references are kept as they are
    if check:
        try:
            onnx.checker.check_model(str(tmp_onnx), full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(
                f"onnx.checker rejected the export: {str(err).splitlines()[0]}. Please report this."
            ) from None
    return str_meta


def _export_result(
    transformer,
    adapter,
    dest: Path,
    external: bool,
    spec: InputSpec,
    trace_spec: InputSpec,
    opset: int,
    dtype: str,
    dynamic_batch: bool,
    export_seconds: float,
    index_tensors: dict[int, str],
    str_meta: dict[str, str],
    extra_inputs: dict[str, torch.Tensor] | None = None,
) -> ExportResult:
    """Removes a stale external-data file and describes the committed graph."""
    import onnx

    data_path = dest.parent / (dest.name + ".data") if external else None
    if not external:
        stale = dest.parent / (dest.name + ".data")
        if stale.exists():
            stale.unlink()
    out_shape = list(adapter.output_shape(transformer.config, trace_spec))
    if dynamic_batch:
        out_shape[0] = "batch_size"
    shapes = {k: list(v) for k, v in spec.shapes(transformer).items()}
    shapes.update(
        {k: list(v.shape) for k, v in (extra_inputs or {}).items()}
    )  # extra graph inputs (ControlNet residuals)
    if dynamic_batch:
        for v in shapes.values():
            v[0] = "batch_size"
    op_counts, num_nodes = onnx_summary(onnx.load(str(dest), load_external_data=False))
    return ExportResult(
        onnx_path=dest,
        data_path=data_path if data_path and data_path.exists() else None,
        onnx_sha256=sha256_file(dest),
        data_sha256=sha256_file(data_path) if data_path and data_path.exists() else None,
        onnx_bytes=dest.stat().st_size,
        data_bytes=data_path.stat().st_size if data_path and data_path.exists() else 0,
        opset=opset,
        dtype=dtype,
        dynamic_batch=dynamic_batch,
        export_seconds=export_seconds,
        input_shapes=shapes,
        output_shape=out_shape,
        op_counts=op_counts,
        num_nodes=num_nodes,
        kept_index_tensors=index_tensors,
        metadata=str_meta,
    )
