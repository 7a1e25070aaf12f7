"""ONNX Runtime sessions over exported graphs: one file, or a chain of segment files run as one.

:func:`ort_session` opens one graph on one provider and refuses a silent fallback to another.
:class:`ChainedSession` puts the one-session interface over an export or a cut export
(:mod:`shiva_export.export.segments`), optionally exposing each routed block's kept indices as extra outputs.
It lives on the export floor because the export's own parity check (:mod:`shiva_export.export.parity`) runs
it; the runtime (``OrtRunner``) and ``validate`` use it from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from shiva_export._imports import lazy_import
from shiva_export.errors import HardwareError
from shiva_export.export.onnx import read_shiva_metadata
from shiva_export.export.segments import is_segment_path, read_segments, run_chain
from shiva_export.models import OUTPUT_NAME

__all__ = ["PROVIDERS", "ort_session", "ChainedSession"]

ort = lazy_import("onnxruntime", purpose="ONNX Runtime sessions")

#: ``--provider`` name -> ONNX Runtime execution provider.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def ort_session(
    path: str | os.PathLike, provider: str = "cpu", disable_optimizations: bool = False, threads: int | None = None
):
    """An ONNX Runtime session on ``provider``; refuses a silent fallback to another provider.

    Args:
        threads (int): Pin ``intra_op_num_threads`` and run sequentially with one inter-op thread and no
            intra-op spinning (idle ORT threads would otherwise steal cores from interleaved timings).
            Defaults to None (ORT's own threading).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} unknown; choose one of {list(PROVIDERS)}")
    want = PROVIDERS[provider]
    if want not in ort.get_available_providers():
        raise HardwareError(
            f"ONNX Runtime provider {want} is not available (have {ort.get_available_providers()}). "
            "Install onnxruntime-gpu (and only it) on a CUDA machine, or use --provider cpu."
        )
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if disable_optimizations:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), sess_options=so, providers=[want])
    if sess.get_providers()[0] != want:
        raise HardwareError(
            f"ONNX Runtime fell back from {want} to {sess.get_providers()[0]}; refusing a silent fallback."
        )
    return sess


class _Arg:
    def __init__(self, name: str, type: str = "tensor(float)"):
        self.name, self.type = name, type


class ChainedSession:
    """ONNX Runtime behind the one-session interface (``get_inputs``, ``get_outputs``, ``run``) for an export or
    for a cut export (:mod:`shiva_export.export.segments`, given any of its segment files), whose segments run one
    after another, each in its own session. With ``index_outputs``, each graph also returns the kept indices of
    the blocks it routes (``index_tensors``: block -> output name); :meth:`close` removes the temporary graphs
    that adds."""

    def __init__(
        self, path: str | os.PathLike, provider: str = "cpu", threads: int | None = None, index_outputs: bool = False
    ):
        self.segments = read_segments(path) if is_segment_path(path) else None
        self._tmp: list[Path] = []
        self.sessions = []
        self.index_tensors: dict[int, str] = {}
        try:
            for graph in [s.path for s in self.segments] if self.segments else [Path(path)]:
                if index_outputs:
                    idx = _read_index_tensors(graph)
                    self.index_tensors.update(idx)
                    if idx:
                        graph = _with_index_outputs(graph, idx)
                        self._tmp.append(graph)
                self.sessions.append(ort_session(graph, provider, threads=threads))
        except BaseException:
            self.close()
            raise

    def get_inputs(self) -> list[Any]:
        if not self.segments:
            return self.sessions[0].get_inputs()
        types = {i.name: i.type for s in self.sessions for i in s.get_inputs()}
        return [_Arg(n, types.get(n, "tensor(float)")) for n in self.segments[0].source_inputs if n in types]

    def get_outputs(self) -> list[Any]:
        if not self.segments:
            return self.sessions[0].get_outputs()
        return [
            _Arg(o.name)
            for s in self.sessions
            for o in s.get_outputs()
            if o.name == OUTPUT_NAME or o.name in self.index_tensors.values()
        ]

    def get_providers(self) -> list[str]:
        return self.sessions[0].get_providers()

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.segments:
            return self.sessions[0].run(names, feed)

        def one(i: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            sess = self.sessions[i]
            out_names = [o.name for o in sess.get_outputs()]
            return dict(zip(out_names, sess.run(out_names, inputs)))

        env = run_chain([s.inputs for s in self.segments], one, feed)
        return [env[n] for n in (names or [OUTPUT_NAME])]

    def close(self) -> None:
        for p in self._tmp:
            p.unlink(missing_ok=True)
        self._tmp = []


def _with_index_outputs(onnx_path: Path, index_tensors: dict[int, str]) -> Path:
    """A copy of the graph (same folder, so external data resolves) with kept-index tensors as outputs."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    existing = {o.name for o in model.graph.output}
    for name in index_tensors.values():
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    tmp = onnx_path.parent / f".{onnx_path.stem}.parity-{os.getpid()}.onnx"
    onnx.save(model, str(tmp))
    return tmp


def _read_index_tensors(onnx_path: Path) -> dict[int, str]:
    return {int(k): v for k, v in read_shiva_metadata(onnx_path).get("kept_index_tensors", {}).items()}
