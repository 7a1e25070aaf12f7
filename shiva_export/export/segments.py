"""Cutting an exported graph into chained segments at block boundaries, for engines too large to build at once.

TensorRT-RTX's builder holds about 1.55x the weights of a network in host memory (a copy of every weight, then
the serialized plan; ``docs/benchmarks.md`` §5), so an 8 B transformer in fp16 (16.3 GB) does not build on a
24 GB machine. Cut into ``count`` segments, each engine holds about ``1/count`` of the weights, and the
segments run one after another, each taking what it needs from the graph inputs and the earlier segments'
outputs.

The cut is a pure graph operation on the export (:func:`split_onnx`), so the segments are the same nodes and
the same weights as the whole graph: each segment file references the export's own ``.data`` file by offset
(no weight is copied or rewritten) and the chain computes what the whole graph computes. Where a node goes:

- every node carries the exporter's module scope (``pkg.torch.onnx.name_scopes``); the export records each
  routable block's scope in flat-index order (``shiva.block_scopes``);
- a node belongs to the segment of the first block that needs it: the lowest block, among the node itself
  and everything downstream of it, decides (the patch / time / text embedders go with block 0, a block's
  router and top-k with that block, the output head with the last segment);
- cuts fall between blocks, placed so that the segments hold about equal weight bytes;
- input-free ``Constant`` nodes are copied into every segment that reads them.

What crosses a cut (the hidden states, the text stream, ``temb``) becomes an output of the segment that makes
it and an input of each later segment that reads it. The architecture does not matter: nothing here knows
SD3 from Flux.
"""

from __future__ import annotations

import ast
import bisect
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, OutputPathError, ShapeError
from shiva_export.export.onnx import META_PREFIX, load_onnx_graph, read_shiva_metadata
from shiva_export.logging import get_logger
from shiva_export.utils.io import commit_files, sha256_file, sweep_stale_temps, temp_prefix

__all__ = [
    "Segment",
    "split_onnx",
    "segment_path",
    "read_segments",
    "is_segment_path",
    "run_chain",
    "plan_cuts",
    "SEGMENT_META",
    "MAX_SEGMENTS",
]

logger = get_logger(__name__)

SEGMENT_META = "segment"  # shiva.segment in each segment's metadata
CUTTER_VERSION = 2  # bumped when the placement of nodes changes: segment files cut by another version are cut again
MAX_SEGMENTS = 16
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_SEG_NAME = re.compile(r"^(?P<stem>.+)\.seg(?P<i>\d+)of(?P<n>\d+)\.onnx$")


@dataclass(frozen=True)
class Segment:
    """One segment file of a cut export."""

    index: int
    count: int
    path: Path
    blocks: tuple[int, int]  # [first, stop) of the flat block index
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int
    source_onnx_sha256: str
    source_inputs: tuple[str, ...] = ()  # the whole graph's inputs (what the chain is fed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "count": self.count,
            "path": str(self.path),
            "blocks": list(self.blocks),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "weight_bytes": self.weight_bytes,
            "source_onnx_sha256": self.source_onnx_sha256,
            "source_inputs": list(self.source_inputs),
        }


def segment_path(onnx_path: str | os.PathLike, index: int, count: int) -> Path:
    """``<folder>/<stem>.seg<index>of<count>.onnx``, beside the export (its ``.data`` is referenced by name)."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}.seg{index}of{count}.onnx")


def _tensor_bytes(t) -> int:
    import onnx

    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0


def _block_index(node, scope_to_block: dict[str, int]) -> int | None:
    for p in node.metadata_props:
        if p.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
            if not isinstance(scopes, list):
                return None
            for s in scopes:
                if isinstance(s, str) and s in scope_to_block:
                    return scope_to_block[s]
            return None
    return None


def _min_block_downstream(model, blocks: list[int | None]) -> list[float]:
    """For each node, the lowest block index among the node and all nodes downstream of it (inf: none, the head)."""
    nodes = model.graph.node
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(i)
    inf = float("inf")
    m: list[float] = [inf] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):  # nodes are in topological order
        v = inf if blocks[i] is None else blocks[i]
        for out in nodes[i].output:
            for c in consumers.get(out, ()):
                if m[c] < v:
                    v = m[c]
        m[i] = v
    return m


def _assign(nodes, blocks: list[int | None], lowest: list[float], cuts: list[int], is_const: list[bool]) -> list[int]:
    """The segment of each node. A node can go anywhere from the segment of its latest producer to that of
    the first block that needs it; it goes late (with the block it feeds: a router and its top-k go with
    their block) unless it reads a block's own output that nothing later reads (the scatter of a block's kept
    tokens back into the hidden states goes with that block), so that a cut carries the whole hidden states
    once and not a block's output, its indices and the states it scatters into."""

    def seg(b: float) -> int:
        return len(cuts) if b == float("inf") else bisect.bisect_right(cuts, b)

    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    srcs = [[producer[x] for x in n.input if x in producer and not is_const[producer[x]]] for n in nodes]
    earliest = [0] * len(nodes)
    for i in range(len(nodes)):
        e = seg(blocks[i]) if blocks[i] is not None else 0
        earliest[i] = max([e, *(earliest[p] for p in srcs[i])])
    out = [seg(b) for b in lowest]
    readers: dict[int, list[int]] = {}
    for i, ps in enumerate(srcs):
        for p in ps:
            readers.setdefault(p, []).append(i)

    def only_here(p: int, i: int) -> bool:  # would p's output cross the cut only because node i reads it?
        return all(out[c] <= earliest[i] for c in readers.get(p, ()) if c != i)

    for i in range(len(nodes)):
        if (
            blocks[i] is None
            and earliest[i] < out[i]
            and any(blocks[p] is not None and seg(blocks[p]) == earliest[i] and only_here(p, i) for p in srcs[i])
        ):
            out[i] = earliest[i]
    for i in range(len(nodes)):  # no node before its producers
        out[i] = max([out[i], *(out[p] for p in srcs[i])])
    return out


def plan_cuts(weight_per_block: list[int], head_bytes: int, count: int) -> list[int]:
    """Block indices where segments 1..count-1 start, placed so that the segments hold about equal weight bytes
    (``weight_per_block[b]``: bytes of block ``b``, embedders included in block 0; ``head_bytes``: the output head)."""
    n = len(weight_per_block)
    if not 2 <= count <= min(n, MAX_SEGMENTS):
        raise ConfigError(
            f"--segments {count} is out of range for a graph of {n} blocks; expected 2..{min(n, MAX_SEGMENTS)} (1 builds one engine: leave --segments out)."
        )
    total = sum(weight_per_block) + head_bytes
    cum, cuts = 0, []
    for b, w in enumerate(weight_per_block):
        cum += w
        target = total * (len(cuts) + 1) / count
        # start the next segment after block b when that brings the running total closer to the target
        if len(cuts) < count - 1 and b + 1 < n and abs(cum - target) <= abs(cum + weight_per_block[b + 1] - target):
            cuts.append(b + 1)
    while len(cuts) < count - 1:  # very uneven blocks: fill from the end
        cuts.append(max(set(range(1, n)) - set(cuts)))
        cuts.sort()
    return sorted(cuts)


def _value_infos(model) -> dict[str, Any]:
    import onnx

    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for v in inferred.graph.value_info:
            infos.setdefault(v.name, v)
    except Exception as err:  # noqa: BLE001 - inference is best effort; the exporter writes value_info too
        logger.debug("shape inference failed: %s", err)
    return infos


def split_onnx(onnx_path: str | os.PathLike, count: int, *, cuts: list[int] | None = None) -> list[Segment]:
    """Cuts an export into ``count`` chained segment files beside it (``<stem>.seg<i>of<count>.onnx``).

    Reads and writes graphs only: every weight stays in the export's ``.data`` file, which each segment
    references by offset. Segment files already there that were cut from the same export (same graph sha256,
    same cuts) are kept. Each segment carries the export's ``shiva.*`` metadata plus ``shiva.segment``
    (index, count, blocks, inputs, outputs, the source's sha256).

    Args:
        onnx_path (PathLike): An export written by ``shiva-export onnx`` (``shiva.block_scopes`` in its metadata).
        count (int): Segments, 2..16 and at most the number of blocks.
        cuts (list[int]): Blocks where segments 1.. start. Defaults to an equal split of weight bytes.

    Returns:
        list[Segment]: The segments, in run order.
    """
    src = Path(onnx_path)
    model = load_onnx_graph(src, "--onnx")
    if not os.access(src.parent, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"the segment graphs are written beside the export (they reference its weights file by name), and {src.parent} is not writable; "
            "copy the .onnx and its .onnx.data to a writable folder."
        )
    meta, scopes, kept = _cut_metadata(src, model)
    scope_to_block = {s: i for i, s in enumerate(scopes)}
    nodes = list(model.graph.node)
    blocks = [_block_index(n, scope_to_block) for n in nodes]
    if not any(b is not None for b in blocks):
        raise ConfigError(
            f"{src}: no node carries a block scope (pkg.torch.onnx.name_scopes); re-export it with `shiva-export onnx`."
        )
    inits = {t.name: t for t in model.graph.initializer}
    lowest = _min_block_downstream(model, blocks)
    n_blocks = len(scopes)
    if cuts is None:
        cuts = plan_cuts(*_block_weights(nodes, inits, lowest, n_blocks), count)
    else:
        cuts = sorted(int(c) for c in cuts)
        if len(cuts) != count - 1 or len(set(cuts)) != len(cuts) or not all(0 < c < n_blocks for c in cuts):
            raise ConfigError(
                f"cuts {cuts} do not split {n_blocks} blocks into {count} segments; give {count - 1} distinct blocks in 1..{n_blocks - 1}."
            )
    is_const = [n.op_type == "Constant" and not any(n.input) for n in nodes]
    seg_of = _assign(nodes, blocks, lowest, cuts, is_const)

    source_sha = sha256_file(src)
    paths = [segment_path(src, i, count) for i in range(count)]
    existing = _existing(paths, source_sha, cuts)
    if existing is not None:
        logger.info("segments of %s already cut (%s)", src, ", ".join(p.name for p in paths))
        return existing

    cut = _CutGraph(
        src,
        model,
        nodes,
        inits,
        is_const,
        seg_of,
        _value_infos(model),
        [0, *cuts, n_blocks],
        cuts,
        meta,
        kept,
        source_sha,
    )
    lost = [
        o for o in cut.graph_outputs if o not in {o for i, n in enumerate(nodes) if not is_const[i] for o in n.output}
    ]
    if lost:
        raise ConfigError(
            f"{src}: graph output {lost[0]!r} is made by no node that a segment runs (a constant or a pass-through); it cannot be cut. Please report this."
        )
    built = [_segment_model(cut, s, count, paths[s]) for s in range(count)]
    segments = [info for info, _ in built]
    _write_segments(src, segments, [proto for _, proto in built])
    logger.info("cut %s into %d segments at blocks %s", src, count, cuts)
    return segments


def _cut_metadata(src: Path, model) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """The export's metadata, its block scopes and its kept-index tensors; refuses a segment or an export without scopes."""
    meta = {p.key: p.value for p in model.metadata_props}
    if META_PREFIX + "segment" in meta:
        raise ConfigError(
            f"{src} is already a segment of a cut export; pass the whole export (the .onnx without .segNofM)."
        )
    try:
        scopes = json.loads(meta[META_PREFIX + "block_scopes"])
        assert isinstance(scopes, list) and all(isinstance(s, str) for s in scopes) and scopes
    except (KeyError, json.JSONDecodeError, AssertionError):
        raise ConfigError(
            f"{src} does not record its blocks' scopes (shiva.block_scopes), so it cannot be cut into segments; "
            "re-export it with this version of `shiva-export onnx`."
        ) from None
    try:
        kept = json.loads(meta.get(META_PREFIX + "kept_index_tensors", "{}"))
        assert isinstance(kept, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in kept.items())
    except (json.JSONDecodeError, AssertionError):
        raise ConfigError(
            f"{src}: shiva.kept_index_tensors is not a map of block to tensor name; re-export it with `shiva-export onnx`."
        ) from None
    return meta, scopes, kept


def _block_weights(nodes, inits: dict[str, Any], lowest: list[float], n_blocks: int) -> tuple[list[int], int]:
    """Weight bytes per block and of the head: each initializer counted once, at the lowest block of the nodes that read it."""
    weight = [0] * n_blocks
    head = 0
    owner: dict[str, float] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x in inits:
                owner[x] = min(owner.get(x, float("inf")), lowest[i])
    for name, b in owner.items():
        if b == float("inf"):
            head += _tensor_bytes(inits[name])
        else:
            weight[int(b)] += _tensor_bytes(inits[name])
    return weight, head


class _CutGraph:
    """What every segment of one cut reads: the export's nodes and where each goes, its tensors' types, its metadata."""

    def __init__(self, src, model, nodes, inits, is_const, seg_of, infos, bounds, cuts, meta, kept, source_sha):
        self.src, self.model, self.nodes, self.inits, self.is_const, self.seg_of = (
            src,
            model,
            nodes,
            inits,
            is_const,
            seg_of,
        )
        self.infos, self.bounds, self.cuts, self.meta, self.kept, self.source_sha = (
            infos,
            bounds,
            cuts,
            meta,
            kept,
            source_sha,
        )
        self.producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        self.graph_inputs = [v.name for v in model.graph.input]
        self.graph_outputs = [v.name for v in model.graph.output]
        # which segments read each tensor (constants are copied, so they never cross)
        self.readers: dict[str, set[int]] = {}
        for i, n in enumerate(nodes):
            if is_const[i]:
                continue
            for x in n.input:
                if x:
                    self.readers.setdefault(x, set()).add(seg_of[i])


def _segment_io(cut: _CutGraph, s: int) -> tuple[list[int], list[int], set[str], list[str], list[str]]:
    """Segment ``s``'s own nodes, the constants it copies, the tensors it makes, and its inputs and outputs."""
    nodes = cut.nodes
    own = [i for i in range(len(nodes)) if cut.seg_of[i] == s and not cut.is_const[i]]
    made = {o for i in own for o in nodes[i].output}
    consts = sorted(
        {cut.producer[x] for i in own for x in nodes[i].input if x in cut.producer and cut.is_const[cut.producer[x]]}
    )
    made |= {o for i in consts for o in nodes[i].output}
    needed: list[str] = []
    for i in own:
        for x in nodes[i].input:
            if x and x not in made and x not in cut.inits and x not in needed:
                needed.append(x)
    ins = [x for x in cut.graph_inputs if x in needed] + [x for x in needed if x not in cut.graph_inputs]
    outs = [
        x
        for x in (o for i in own for o in nodes[i].output)
        if x in cut.graph_outputs or any(r > s for r in cut.readers.get(x, ()))
    ]
    missing = [x for x in ins + outs if x not in cut.infos]
    if missing:
        raise ConfigError(
            f"{cut.src}: no type/shape known for tensor {missing[0]!r} at the cut before block {cut.bounds[s]}; re-export it with `shiva-export onnx`."
        )
    return own, consts, made, ins, outs


def _segment_model(cut: _CutGraph, s: int, count: int, path: Path):
    """Segment ``s`` as a graph-only ModelProto (weights referenced in the export's data file) and its description."""
    import onnx

    own, consts, made, ins, outs = _segment_io(cut, s)
    nodes, model = cut.nodes, cut.model
    used_inits = []
    seen = set()
    for i in consts + own:
        for x in nodes[i].input:
            if x in cut.inits and x not in seen:
                seen.add(x)
                used_inits.append(cut.inits[x])
    keep = sorted(set(consts) | set(own))
    graph = onnx.helper.make_graph(
        [nodes[i] for i in keep],
        f"{model.graph.name}_seg{s}of{count}",
        [cut.infos[x] for x in ins],
        [cut.infos[x] for x in outs],
        initializer=used_inits,
        value_info=[v for k, v in cut.infos.items() if k in made and k not in outs],
    )
    seg_model = onnx.helper.make_model(
        graph,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
    )
    seg_model.functions.extend(model.functions)
    info = Segment(
        s,
        count,
        path,
        (cut.bounds[s], cut.bounds[s + 1]),
        tuple(ins),
        tuple(outs),
        sum(_tensor_bytes(t) for t in used_inits),
        cut.source_sha,
        tuple(cut.graph_inputs),
    )
    seg_meta = dict(cut.meta)
    seg_meta[META_PREFIX + "kept_index_tensors"] = json.dumps(
        {k: v for k, v in cut.kept.items() if v in made}, sort_keys=True
    )
    seg_meta[META_PREFIX + SEGMENT_META] = json.dumps(
        {**info.to_dict(), "path": info.path.name, "cuts": cut.cuts, "cutter": CUTTER_VERSION}, sort_keys=True
    )
    for k, v in seg_meta.items():
        seg_model.metadata_props.add(key=k, value=v)
    return info, seg_model


def _write_segments(src: Path, segments: list[Segment], protos: list) -> None:
    """Saves, checks and commits every segment file, or none."""
    import onnx

    sweep_stale_temps(src.parent)
    # temp files beside the export (not in a subfolder), so that the checker resolves the external data
    tmps = [src.parent / f"{temp_prefix('segment.')}{info.path.name}" for info in segments]
    try:
        for info, proto, tmp in zip(segments, protos, tmps):
            onnx.save(proto, str(tmp))  # graph only: external-data references stay as they are
            try:
                onnx.checker.check_model(str(tmp), full_check=False)
            except onnx.checker.ValidationError as err:
                raise ConfigError(
                    f"segment {info.index} of {src} is not a valid graph: {str(err).splitlines()[0]}. Please report this."
                ) from None
        commit_files([(t, info.path) for t, info in zip(tmps, segments)])
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)


def _existing(paths: list[Path], source_sha: str, cuts: list[int]) -> list[Segment] | None:
    if not all(p.is_file() for p in paths):
        return None
    try:
        found = read_segments(paths[0])
    except ConfigError:
        return None
    if [s.path for s in found] != paths or any(s.source_onnx_sha256 != source_sha for s in found):
        return None
    if [s.blocks[0] for s in found[1:]] != cuts:
        return None

    if (read_shiva_metadata(paths[0]).get(SEGMENT_META) or {}).get("cutter") != CUTTER_VERSION:
        return None
    return found


def read_segments(path: str | os.PathLike) -> list[Segment]:
    """All segments of the cut export that ``path`` (any one segment file) belongs to, in run order; each is
    checked to come from the same export, with the same count, and to chain (every input is a graph input or
    an earlier segment's output)."""
    p = Path(path)
    m = _SEG_NAME.match(p.name)
    if not m:
        raise ConfigError(
            f"{p} is not a segment file (<stem>.seg<i>of<n>.onnx); cut an export with `shiva-export trt --segments N`."
        )
    count, index = int(m.group("n")), int(m.group("i"))
    if not 2 <= count <= MAX_SEGMENTS or index >= count:
        raise ConfigError(
            f"{p.name} names segment {index} of {count}; a cut export has 2..{MAX_SEGMENTS} segments numbered from 0. Pass a file cut by `shiva-export trt --segments N`."
        )
    out: list[Segment] = []
    for i in range(count):
        q = segment_path(p.with_name(m.group("stem") + ".onnx"), i, count)
        meta = read_shiva_metadata(q, require=True, what="segment")
        d = meta.get(SEGMENT_META)
        try:
            seg = Segment(
                int(d["index"]),
                int(d["count"]),
                q,
                (int(d["blocks"][0]), int(d["blocks"][1])),
                tuple(map(str, d["inputs"])),
                tuple(map(str, d["outputs"])),
                int(d["weight_bytes"]),
                str(d["source_onnx_sha256"]),
                tuple(map(str, d["source_inputs"])),
            )
        except (TypeError, KeyError, ValueError, IndexError):
            raise ConfigError(
                f"segment {q} carries no valid shiva.segment metadata; cut the export again with `shiva-export trt --segments {count}`."
            ) from None
        if seg.index != i or seg.count != count:
            raise ConfigError(
                f"segment {q} says it is {seg.index} of {seg.count}, not {i} of {count}; cut the export again."
            )
        if out and seg.source_onnx_sha256 != out[0].source_onnx_sha256:
            raise ConfigError(
                f"segment {q} was cut from another export than {out[0].path} (source sha256 differs); cut the export again."
            )
        out.append(seg)
    made = set(out[0].source_inputs)
    for seg in out:
        bad = [x for x in seg.inputs if x not in made]
        if bad:
            raise ConfigError(
                f"segment {seg.path} reads {bad[0]!r}, which neither the graph's inputs nor an earlier segment make; cut the export again."
            )
        made |= set(seg.outputs)
    return out


def is_segment_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a segment file (``<stem>.seg<i>of<n>.onnx``)."""
    return bool(_SEG_NAME.match(Path(path).name))


def run_chain(
    inputs: list[Sequence[str]], run_one: Callable[[int, dict[str, Any]], dict[str, Any]], feed: dict[str, Any]
) -> dict[str, Any]:
    """Runs a chain of segments in order on ``feed`` (the whole graph's inputs), whatever runs them (ONNX Runtime
    sessions, engines): ``inputs[i]`` names what segment ``i`` reads, ``run_one(i, tensors)`` runs it and returns
    its outputs by name. Returns every tensor the chain made, the graph's outputs included."""
    env = dict(feed)
    for i, names in enumerate(inputs):
        missing = [x for x in names if x not in env]
        if missing:
            raise ShapeError(
                f"segment {i} of the chain needs {missing[0]!r}, which the feed and the earlier segments do not hold."
            )
        env.update(run_one(i, {x: env[x] for x in names}))
    return env
