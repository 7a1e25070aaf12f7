"""Runs a built engine on a CUDA GPU: loads it (after checking its manifest), binds torch CUDA tensors,
and executes with ``execute_async_v3`` on the current torch stream.

On a machine without a CUDA GPU the runner refuses with :class:`HardwareError` (CLI exit code 4) before
touching the plan: TensorRT and TensorRT-RTX cannot deserialize an engine without a CUDA device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shiva_export.engines.builder import Backend, current_gpu, resolve_backend
from shiva_export.engines.chain import CHAIN_FILE, read_chain
from shiva_export.engines.manifest import EngineManifest, manifest_path_for, read_manifest, verify_engine
from shiva_export.errors import EngineBuildError, HardwareError, ManifestError, MissingDependencyError, ShapeError
from shiva_export.export.segments import run_chain
from shiva_export.logging import get_logger
from shiva_export.utils.io import sha256_file_cached

__all__ = ["EngineRunner", "find_plan"]

logger = get_logger(__name__)


def find_plan(path: str | os.PathLike) -> Path:
    """A plan file, or what an engine folder holds: its ``model.plan``, or the ``segments.json`` of a chain of
    segment engines (:mod:`shiva_export.engines.chain`)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.plan" if (p / "model.plan").is_file() or not (p / CHAIN_FILE).is_file() else p / CHAIN_FILE
    if not p.is_file():
        raise EngineBuildError(
            f"Engine not found: {p}. Pass a .plan file or an engines/<model>/<budget>/<dtype>/ folder built by `shiva-export trt`."
        )
    return p


def _installed_version(backend: str) -> str | None:
    """The installed version of ``backend``, or None when it is not installed (the GPU check then refuses, exit 4)."""
    try:
        return resolve_backend(backend).version
    except MissingDependencyError:
        return None


class EngineRunner:
    """Context manager that runs one engine.

    Args:
        plan (PathLike): ``model.plan`` or its folder; ``manifest.json`` must sit beside it.
        backend (str): Backend name; defaults to the manifest's.

    Example:
        >>> with EngineRunner("engines/sd35/ratio0.40/fp16") as run:
        ...     out = run.infer({"hidden_states": hs, ...})["sample"]   # torch CUDA tensors
    """

    def __init__(self, plan: str | os.PathLike, backend: str | None = None):
        self.plan_path = find_plan(plan)
        self.chain: dict[str, Any] | None = read_chain(self.plan_path) if self.plan_path.name == CHAIN_FILE else None
        self.manifest: EngineManifest = read_manifest(manifest_path_for(self.plan_path))
        self._backend_name = backend or self.manifest.backend
        self.backend: Backend | None = None
        self.engine: Any = None
        self.context: Any = None
        self.inference_time: float | None = None
        #: a chain's segment engines, in run order (:mod:`shiva_export.engines.chain`)
        self.parts: list[EngineRunner] = [
            EngineRunner(self.plan_path.parent / r["dir"] / "model.plan", backend=backend)
            for r in (self.chain or {}).get("segments", [])
        ]

    def __enter__(self) -> EngineRunner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def verify(self) -> None:
        """Checks the plan's sha256, backend and (when the backend is installed) its version against the manifest;
        needs no GPU (run before looking for one)."""
        verify_engine(
            self.plan_path, self.manifest, _installed_version(self._backend_name), None, backend=self._backend_name
        )
        for part in self.parts:
            part.verify()
        self._check_rows()

    def _check_rows(self) -> None:
        """Each segment's manifest names the plan the chain was built with (the plans' own sha256 are checked by
        their runners)."""
        for part, row in zip(self.parts, (self.chain or {}).get("segments", [])):
            if part.manifest.engine_sha256 != row["plan_sha256"]:
                raise ManifestError(
                    f"segment engine {part.plan_path} is not the one chain {self.plan_path} was built with (sha256 differs); "
                    "rebuild the chain with `shiva-export trt --segments N`."
                )

    def activate(self) -> None:
        import torch

        if self.parts:
            self.verify()  # every plan by content, before any GPU is looked for
            if not torch.cuda.is_available():
                raise HardwareError(
                    f"Running engine chain {self.plan_path} needs a CUDA GPU, and torch sees none. Run it on a GPU machine."
                )
            for part in self.parts:
                part.activate()
            return
        self.verify()
        if not torch.cuda.is_available():
            raise HardwareError(
                f"Running engine {self.plan_path} needs a CUDA GPU, and torch sees none. "
                "Run it on a GPU machine (engines were built ahead of time and can be copied there)."
            )
        self.backend = resolve_backend(self._backend_name)
        gpu = current_gpu()
        verify_engine(self.plan_path, self.manifest, self.backend.version, gpu, backend=self.backend.name)
        trt = self.backend.module
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())  # stripped plans are small
        if self.engine is None:
            raise EngineBuildError(
                f"{self.backend.name} could not deserialize {self.plan_path} on {gpu}. Rebuild it on/for this GPU."
            )
        if (self.manifest.build_options or {}).get("strip_weights"):
            self._refit(trt)
        self.context = self.engine.create_execution_context()
        self._names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def refit_source(self) -> Path:
        """The ONNX a weight-stripped engine is refit from, checked against the manifest (same graph and
        weights as at build time: the engine was built ``REFIT_IDENTICAL``)."""
        rec = (self.manifest.build_options or {}).get("refit_weights") or {}
        onnx = Path(self.manifest.onnx_path or "model.onnx")
        if not onnx.is_absolute():
            onnx = self.plan_path.parent / onnx
        checks = [(onnx, rec.get("onnx_sha256"))]
        if rec.get("data"):
            checks.append((onnx.parent / rec["data"], rec.get("data_sha256")))
        for path, want in checks:
            if not path.is_file():
                raise EngineBuildError(
                    f"weight-stripped engine {self.plan_path} needs {path} to refit its weights, and it is missing. Keep the ONNX beside the engine, or rebuild without --strip-weights."
                )
            if want and sha256_file_cached(path) != want:
                raise EngineBuildError(
                    f"{path} changed since weight-stripped engine {self.plan_path} was built (sha256 differs from its manifest); refitting other weights is undefined. Rebuild the engine."
                )
        return onnx

    def _refit(self, trt: Any) -> None:
        onnx = self.refit_source()
        log = trt.Logger(trt.Logger.WARNING)
        refitter = trt.Refitter(self.engine, log)
        parser_refitter = trt.OnnxParserRefitter(refitter, log)
        if not parser_refitter.refit_from_file(str(onnx)):
            errors = (
                "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
                or "no parser error recorded"
            )
            raise EngineBuildError(f"refitting {self.plan_path} from {onnx} failed: {errors}. Rebuild the engine.")
        if not refitter.refit_cuda_engine():
            raise EngineBuildError(
                f"refit_cuda_engine failed for {self.plan_path} (weights from {onnx}). Rebuild the engine."
            )
        logger.info("refit %s from %s", self.plan_path, onnx)

    def deactivate(self) -> None:
        for part in self.parts:
            part.deactivate()
        self.context = None
        self.engine = None

    def _torch_dtype(self, trt_dtype: Any):
        import torch

        trt = self.backend.module
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
        }
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[trt_dtype]

    def infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Runs the engine on CUDA tensors; returns every output as a CUDA tensor."""
        import time

        import torch

        if self.parts:
            return self._infer_chain(feed)
        if self.context is None:
            raise EngineBuildError("EngineRunner.infer called before activate(); use it as a context manager.")
        trt = self.backend.module
        outputs: dict[str, torch.Tensor] = {}
        stream = torch.cuda.current_stream()
        for name in self._names:
            mode = self.engine.get_tensor_mode(name)
            if mode == trt.TensorIOMode.INPUT:
                if name not in feed:
                    raise ShapeError(
                        f"engine input {name!r} missing from the feed; inputs are {[n for n in self._names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]}."
                    )
                t = feed[name]
                want = self._torch_dtype(self.engine.get_tensor_dtype(name))
                if not t.is_cuda or t.dtype != want:
                    t = t.to(device="cuda", dtype=want)
                t = t.contiguous()
                feed[name] = t
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
        for name in self._names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(self.context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self._torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
                self.context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
        t0 = time.perf_counter()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError(f"execute_async_v3 failed for {self.plan_path}.")
        stream.synchronize()
        self.inference_time = time.perf_counter() - t0
        return outputs

    def _infer_chain(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Runs the segment engines in order; each reads the graph inputs and earlier segments' outputs."""
        env = run_chain(
            [r["inputs"] for r in self.chain["segments"]], lambda i, tensors: self.parts[i].infer(tensors), feed
        )
        self.inference_time = sum(part.inference_time or 0.0 for part in self.parts)
        return {k: env[k] for k in self.chain["outputs"]}
