"""Chained engines: one engine per segment of a cut export (:mod:`shiva_export.export.segments`), for networks
whose build does not fit in host memory at once (TensorRT-RTX holds ~1.55x the weights while it builds).

A budget folder holds either one engine or one chain, never both:

    <budget>/<dtype>/model.plan + manifest.json                  one engine
    <budget>/<dtype>/segments.json + manifest.json               a chain: the chain's manifest names
    <budget>/<dtype>/seg<i>of<n>/{model.plan, manifest.json}     segments.json as its "plan" (its sha256)

``segments.json`` lists the segments in run order with each plan's sha256, inputs and outputs; each segment
folder is an ordinary engine with its own manifest, so every plan is verified by content before it is
loaded. :class:`~shiva_export.engines.runner.EngineRunner` runs a chain like one engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from shiva_export.engines.builder import Backend, BuildResult, build_engine, deserialize_check
from shiva_export.engines.manifest import EngineManifest, manifest_path_for, write_manifest
from shiva_export.errors import ConfigError, ManifestError
from shiva_export.export.onnx import load_onnx_graph
from shiva_export.export.segments import split_onnx
from shiva_export.logging import get_logger
from shiva_export.utils.io import atomic_write_json, safe_component, sha256_file

__all__ = ["CHAIN_FILE", "CHAIN_FORMAT", "build_chain", "read_chain", "chain_deserialize_check", "clear_other_layout"]

logger = get_logger(__name__)

CHAIN_FILE = "segments.json"
CHAIN_FORMAT = "shiva-engine-chain/1"
_SEG_DIR = "seg{i}of{n}"
_SEG_DIR_RE = re.compile(r"^seg\d+of\d+$")


def _graph_input_shapes(onnx_path: Path) -> dict[str, list[int]]:
    m = load_onnx_graph(onnx_path, "segment")
    shapes = {}
    for i in m.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
        if -1 in dims:
            raise ConfigError(
                f"segment {onnx_path.name} has a dynamic input {i.name!r} {dims}; chained engines need fixed shapes. "
                "Export without --dynamic-batch to build --segments."
            )
        shapes[i.name] = dims
    return shapes


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def clear_other_layout(folder: Path, keep: str, count: int = 0) -> None:
    """Removes what is not the engine just written from a budget folder: with ``keep="chain"``, a whole
    ``model.plan`` and segment folders of another count; with ``keep="plan"``, a chain. One budget, one engine."""
    if keep == "chain":
        (folder / "model.plan").unlink(missing_ok=True)
    else:
        (folder / CHAIN_FILE).unlink(missing_ok=True)
    named = {_SEG_DIR.format(i=i, n=count) for i in range(count)} if keep == "chain" else set()
    for p in folder.glob("seg*of*"):
        if p.name not in named and _SEG_DIR_RE.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def build_chain(
    onnx_path: str | os.PathLike,
    folder: str | os.PathLike,
    count: int,
    *,
    backend: Backend,
    manifest_fields: dict[str, Any],
    say: Callable[[str], None] = lambda s: None,
    **build_kwargs: Any,
) -> BuildResult:
    """Cuts ``onnx_path`` into ``count`` segments and builds one engine per segment, one after another (so the
    builder's peak is that of the largest segment), into ``folder/seg<i>of<count>/``; then writes
    ``folder/segments.json``. Returns the chain's :class:`BuildResult`: its ``plan_path`` is ``segments.json``
    and its ``sha256`` that file's, sizes and times are the segments' sums.

    Args:
        onnx_path (PathLike): A whole export (``shiva.block_scopes`` in its metadata), fixed shapes.
        folder (PathLike): The budget folder (the caller holds its lock).
        count (int): Segments, 2..16.
        backend (Backend): The resolved backend.
        manifest_fields (dict): The model facts every segment's manifest records (model_name, dtype, ratio, ...).
        say (Callable): Progress callback.
        **build_kwargs: Passed to :func:`~shiva_export.engines.builder.build_engine` (workspace, targets, ...).
    """
    if build_kwargs.get("strip_weights"):
        raise ConfigError("--segments and --strip-weights do not combine; choose one way to bound the build's memory.")
    if build_kwargs.get("profile"):
        raise ConfigError("--segments needs fixed shapes; export without --dynamic-batch.")
    onnx_path, folder = Path(onnx_path), Path(folder)

    graph_outputs = [o.name for o in load_onnx_graph(onnx_path, "--onnx").graph.output]
    say(f"cut {onnx_path.name} into {count} segments")
    segments = split_onnx(onnx_path, count)
    shapes = [_graph_input_shapes(s.path) for s in segments]
    rows, results = [], []
    for seg, seg_shapes in zip(segments, shapes):
        sub = folder / _SEG_DIR.format(i=seg.index, n=count)
        say(
            f"segment {seg.index + 1}/{count} (blocks {seg.blocks[0]}-{seg.blocks[1] - 1}, {_size(seg.weight_bytes)} of weights): build"
        )
        res = build_engine(seg.path, sub / "model.plan", backend=backend, **build_kwargs)
        check = deserialize_check(res.plan_path, backend)
        fields = dict(manifest_fields)
        fields["per_block_k"] = {
            b: k for b, k in (fields.get("per_block_k") or {}).items() if seg.blocks[0] <= int(b) < seg.blocks[1]
        }
        man = EngineManifest.from_build(
            res,
            input_shapes=seg_shapes,
            onnx_path=str(seg.path.resolve()),
            build_options={"segment": {k: v for k, v in seg.to_dict().items() if k != "path"}},
            deserialize={k: check.get(k) for k in ("deserialized", "reason")},
            **fields,
        )
        write_manifest(manifest_path_for(res.plan_path), man)
        results.append(res)
        rows.append(
            {
                "dir": sub.name,
                "plan_sha256": res.sha256,
                "plan_bytes": res.size_bytes,
                "build_seconds": round(res.build_seconds, 3),
                "blocks": list(seg.blocks),
                "weight_bytes": seg.weight_bytes,
                "inputs": list(seg.inputs),
                "outputs": list(seg.outputs),
                "onnx": seg.path.name,
            }
        )
    chain_path = folder / CHAIN_FILE
    atomic_write_json(
        chain_path,
        {
            "format": CHAIN_FORMAT,
            "count": count,
            "source_onnx": str(onnx_path.resolve()),
            "source_onnx_sha256": segments[0].source_onnx_sha256,
            "inputs": list(segments[0].source_inputs),
            "outputs": graph_outputs,
            "segments": rows,
        },
    )
    clear_other_layout(folder, "chain", count)
    first = results[0]
    return replace(
        first,
        plan_path=chain_path,
        sha256=sha256_file(chain_path),
        size_bytes=sum(r.size_bytes for r in results),
        build_seconds=sum(r.build_seconds for r in results),
        total_seconds=sum(r.total_seconds for r in results),
        onnx_path=onnx_path,
        warnings=tuple(w for r in results for w in r.warnings),
        profile=None,
    )


def read_chain(path: str | os.PathLike) -> dict[str, Any]:
    """``segments.json``, checked for shape: the format, a count equal to its rows, safe folder names, and
    segments that chain (every input is a graph input or an earlier segment's output)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"engine chain {p} not found; rebuild it with `shiva-export trt --segments N`.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(
            f"engine chain {p} is not readable JSON ({type(err).__name__}); rebuild it with `shiva-export trt --segments N`."
        ) from None
    try:
        if data.get("format") != CHAIN_FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {CHAIN_FORMAT}")
        rows = data["segments"]
        if not isinstance(rows, list) or len(rows) != int(data["count"]) or len(rows) < 2:
            raise ValueError("the segment list does not match the count")
        made = set(map(str, data["inputs"]))
        for i, r in enumerate(rows):
            if r["dir"] != _SEG_DIR.format(i=i, n=len(rows)):
                raise ValueError(f"segment {i} folder {r['dir']!r} is not {_SEG_DIR.format(i=i, n=len(rows))}")
            safe_component(r["dir"], "segment folder")
            missing = [x for x in r["inputs"] if x not in made]
            if missing:
                raise ValueError(f"segment {i} reads {missing[0]!r}, which no earlier segment makes")
            made |= set(map(str, r["outputs"]))
            str(r["plan_sha256"])
        if not all(o in made for o in data["outputs"]):
            raise ValueError("a graph output is made by no segment")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ManifestError(
            f"engine chain {p} is malformed ({err}); rebuild it with `shiva-export trt --segments N`."
        ) from None
    return data


def chain_deserialize_check(chain_path: Path, backend: Backend) -> dict[str, Any]:
    """:func:`~shiva_export.engines.builder.deserialize_check` of every segment; deserialized only if all are."""
    data = read_chain(chain_path)
    reason = None
    for r in data["segments"]:
        check = deserialize_check(chain_path.parent / r["dir"] / "model.plan", backend)
        if not check.get("deserialized"):
            reason = reason or f"{r['dir']}: {check.get('reason')}"
    return {"deserialized": reason is None, "reason": reason}
