"""One engine builder for datacenter TensorRT and TensorRT-RTX.

Both backends share the same Python API, so :func:`build_engine` is written once against a
:class:`Backend` that carries the imported module. Engines are always built *strongly typed*:
reduced precision comes from the ONNX dtypes (export in fp16/bf16), never from ``FP16``/``BF16``
builder flags, which TensorRT 11 removed and which TensorRT-RTX never had.

The flow of :func:`build_engine`: resolve the backend; run :func:`~shiva_export.engines.preflight.preflight`
on the graph and stop with :class:`PreflightError` before any builder is created; parse *by path* so
external weights (``.onnx_data``) are found; configure workspace, optimization level, profile, compute
capability targets (TensorRT-RTX) and the timing cache; build, streaming the plan into its file (atomically)
where the backend can, so a multi-GB plan is never held in memory whole; optionally weight-stripped.

Behaviour of ``tensorrt_rtx`` 1.7.1.116 observed on a CPU-only machine (no CUDA driver):

* ``trt.Builder``, ``trt.Runtime`` and ``build_serialized_network`` work without a GPU (ahead-of-time
  build). With no targets set, ``config.num_compute_capabilities`` is 0 and the engine is portable to
  compute capability 8.0, 8.6, 8.9 and 12.0+ (NVIDIA docs); ``ComputeCapability.CURRENT`` fails without
  a GPU and ``SM75`` refuses fp32 GEMMs.
* Timing-cache calls emit a ``DeprecationWarning`` ("no-ops in TensorRT-RTX"). Serializing one still
  yields a small blob, but loading it back without a GPU fails ("Failed to deserialize timing cache",
  cudaError 35) and the build continues with an empty cache. The path contract is kept (load, save,
  report) and :attr:`BuildResult.timing_cache` says whether the loaded cache was accepted.
* TensorRT keeps *one* logger per process while any builder/runtime is alive; a second logger is
  ignored with a warning. This module therefore uses one long-lived capturing logger per backend module.
* Deserializing without a GPU: see :func:`deserialize_check`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from shiva_export._imports import INSTALL_HINTS, require
from shiva_export.engines.preflight import normalize_backend_name, preflight
from shiva_export.errors import ConfigError, EngineBuildError, HardwareError, MissingDependencyError, OutputPathError
from shiva_export.logging import get_logger
from shiva_export.utils.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_stream,
    check_writable,
    sha256_file,
    sweep_stale_temps,
)

__all__ = [
    "Backend",
    "BuildResult",
    "RTX_DEFAULT_AOT_TARGETS",
    "resolve_backend",
    "build_engine",
    "deserialize_check",
    "current_gpu",
]

logger = get_logger(__name__)

_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}

#: Compute capabilities a TensorRT-RTX engine runs on when no target is set ("+": and later).
RTX_DEFAULT_AOT_TARGETS: tuple[str, ...] = ("SM80", "SM86", "SM89", "SM120+")

_MAX_ERROR_CHARS = 1500

# Error lines caused by a missing/unusable CUDA device rather than by the plan itself.
_CUDA_ERROR = re.compile(r"cudaError \d+|CUDA GPU properties|CUDA initialization failure", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Backend resolution


@dataclass(frozen=True)
class Backend:
    """An imported TensorRT flavour.

    Attributes:
        name (str): ``"tensorrt"`` or ``"tensorrt-rtx"``.
        module_name (str): Import name, ``"tensorrt"`` or ``"tensorrt_rtx"``.
        version (str): ``module.__version__``.
        module (ModuleType): The imported module.
    """

    name: str
    module_name: str
    version: str
    module: ModuleType = field(repr=False, compare=False)

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"


def _load_backend(name: str) -> Backend:
    module_name = _MODULES[name]
    module = require(module_name, purpose=f"building {name} engines")
    return Backend(
        name=name, module_name=module_name, version=str(getattr(module, "__version__", "unknown")), module=module
    )


def resolve_backend(name: str | Backend = "auto") -> Backend:
    """Imports the TensorRT flavour to build with.

    Args:
        name (str | Backend): ``"auto"`` (``tensorrt`` when it imports, else ``tensorrt_rtx``),
            ``"tensorrt"`` or ``"tensorrt-rtx"``; a :class:`Backend` is returned as is. Defaults to ``"auto"``.

    Returns:
        Backend: The imported backend.

    Raises:
        ConfigError: Unknown backend name.
        MissingDependencyError: The module cannot be imported; the message holds the pip line.
    """
    if isinstance(name, Backend):
        return name
    if str(name).strip().lower() == "auto":
        failures: list[str] = []
        for candidate in ("tensorrt", "tensorrt-rtx"):
            try:
                return _load_backend(candidate)
            except MissingDependencyError as err:
                cause = err.__cause__ if err.__cause__ is not None else err
                failures.append(f"{_MODULES[candidate]}: {cause}")
        raise MissingDependencyError(
            f"No TensorRT backend can be imported ({'; '.join(failures)}). Need 'tensorrt' or 'tensorrt_rtx'. "
            f"Install one: {INSTALL_HINTS['tensorrt_rtx']} (builds without a GPU), or {INSTALL_HINTS['tensorrt']}."
        )
    return _load_backend(normalize_backend_name(name))


def current_gpu() -> dict[str, str] | None:
    """Name and compute capability of the current CUDA device as seen by ``torch.cuda``; None without one."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}
    except Exception as err:  # noqa: BLE001 - a broken CUDA setup means "no usable GPU" here
        logger.debug("torch.cuda query failed: %s", err)
        return None


# --------------------------------------------------------------------------------------------------
# Logger capture

_LOGGERS: dict[str, Any] = {}
_LOGGERS_LOCK = threading.Lock()


def _enum_name(value: Any) -> str:
    """``Severity.ERROR`` / ``DataType.FLOAT`` -> ``"ERROR"`` / ``"FLOAT"`` (pybind enums)."""
    name = getattr(value, "name", None) or str(value).rsplit(".", 1)[-1]
    return str(name).upper()


def _capture_logger(trt: ModuleType) -> Any:
    """The process-wide capturing ``ILogger`` for one backend module (created once, never freed)."""
    key = trt.__name__
    with _LOGGERS_LOCK:
        if key in _LOGGERS:
            return _LOGGERS[key]

        class _CaptureLogger(trt.ILogger):  # type: ignore[name-defined, misc]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self._sinks: list[list[tuple[str, str]]] = []
                self._lock = threading.Lock()

            def log(self, severity: Any, msg: str) -> None:
                sev = _enum_name(severity)
                if sev == "VERBOSE":
                    return
                # Errors and warnings reach the user through exceptions / results; the log is for debugging.
                logger.debug("[%s %s] %s", key, sev, msg)
                if sev in ("INTERNAL_ERROR", "ERROR", "WARNING"):
                    with self._lock:
                        sinks = list(self._sinks)
                    for records in sinks:
                        records.append((sev, msg))

            @contextlib.contextmanager
            def capture(self) -> Iterator[list[tuple[str, str]]]:
                """Collects (severity, message) of warnings and errors logged inside the block."""
                records: list[tuple[str, str]] = []
                with self._lock:
                    self._sinks.append(records)
                try:
                    yield records
                finally:
                    with self._lock:
                        self._sinks.remove(records)

        _LOGGERS[key] = _CaptureLogger()
        return _LOGGERS[key]


def _errors(records: list[tuple[str, str]]) -> list[str]:
    return [" ".join(msg.split()) for sev, msg in records if sev in ("INTERNAL_ERROR", "ERROR")]


def _join_errors(lines: list[str]) -> str:
    if not lines:
        return "(no error lines were captured; another TensorRT logger registered earlier in this process may have received them)"
    text = " | ".join(dict.fromkeys(lines))
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_engine` produced.

    Attributes:
        plan_path (Path): The serialized engine.
        sha256 (str): SHA-256 of the plan.
        size_bytes (int): Plan size.
        build_seconds (float): Time spent in ``build_serialized_network``.
        total_seconds (float): Parse + build + write.
        backend (str): ``"tensorrt"`` or ``"tensorrt-rtx"``.
        backend_version (str): Backend module version.
        onnx_path (Path): The parsed graph.
        gpu_name (str | None): CUDA device visible to ``torch.cuda`` at build time.
        compute_capability (str | None): Its compute capability, e.g. ``"8.9"``.
        aot_targets (tuple[str, ...] | None): TensorRT-RTX compute-capability targets (``"SM89"``; ``"+"``
            means "and later"); None on datacenter TensorRT.
        aot_targets_default (bool): The targets are TensorRT-RTX's defaults (none were set on the config).
        profile (dict | None): Optimization profile used, ``{name: [min, opt, max]}``.
        timing_cache (dict | None): ``{"path", "loaded_bytes", "accepted", "saved_bytes"}`` when a cache path was given.
        warnings (tuple[str, ...]): Warning lines the backend logged during parse and build.
        weights_stripped (bool): The plan holds no weights (``STRIP_PLAN``); refit it from ``onnx_path``.
    """

    plan_path: Path
    sha256: str
    size_bytes: int
    build_seconds: float
    total_seconds: float
    backend: str
    backend_version: str
    onnx_path: Path
    gpu_name: str | None = None
    compute_capability: str | None = None
    aot_targets: tuple[str, ...] | None = None
    aot_targets_default: bool = False
    profile: dict[str, list[list[int]]] | None = None
    timing_cache: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()
    weights_stripped: bool = False

    @property
    def target(self) -> dict[str, Any]:
        """GPU and/or AOT targets, in the shape :class:`~shiva_export.engines.manifest.EngineManifest` stores."""
        return {
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "aot_targets": list(self.aot_targets) if self.aot_targets is not None else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_path": str(self.plan_path),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "build_seconds": self.build_seconds,
            "total_seconds": self.total_seconds,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "onnx_path": str(self.onnx_path),
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "aot_targets": list(self.aot_targets) if self.aot_targets is not None else None,
            "aot_targets_default": self.aot_targets_default,
            "profile": self.profile,
            "timing_cache": self.timing_cache,
            "warnings": list(self.warnings),
            "weights_stripped": self.weights_stripped,
        }


def compute_capability(trt: ModuleType, value: Any) -> Any:
    """Maps 89 / "8.9" / "sm_89" / "SM89" / "current" / a ComputeCapability member to the enum member."""
    enum = trt.ComputeCapability
    if isinstance(value, enum):
        return value
    text = str(value).strip().upper().replace("_", "").replace("SM", "")
    if text == "CURRENT":
        name = "CURRENT"
    elif "." in text:
        major, _, minor = text.partition(".")
        name = f"SM{major}{minor}"
    else:
        name = f"SM{text}"
    member = getattr(enum, name, None)
    choices = [m for m in enum.__members__ if m != "NONE"]
    if member is None or name == "NONE":
        raise ConfigError(
            f"Unknown TensorRT-RTX compute capability target: {value!r}. Choose from {', '.join(choices)}. "
            "Pass e.g. compute_capabilities=['8.9', '12.0']."
        )
    return member


def _check_profile(network: Any, profile: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    """Validates ``profile`` against the parsed network's inputs; returns it as lists."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profile) - set(inputs))
    if unknown:
        raise ConfigError(
            f"Profile names inputs the graph does not have: {', '.join(unknown)}. Graph inputs: {', '.join(inputs)}. "
            "Fix the profile keys."
        )
    missing = sorted(n for n, shape in inputs.items() if any(d < 0 for d in shape) and n not in profile)
    if missing:
        raise ConfigError(
            f"Dynamic inputs have no profile entry: {', '.join(missing)}. Every input with a -1 dim needs (min, opt, max). "
            "Add them to profile=."
        )
    out: dict[str, list[list[int]]] = {}
    for name, triple in profile.items():
        shape = inputs[name]
        try:
            lo, opt, hi = ([int(d) for d in s] for s in triple)
        except (TypeError, ValueError):
            raise ConfigError(
                f"Profile for input '{name}' is {triple!r}. Expected (min, opt, max), each a sequence of ints. Fix the profile."
            ) from None
        if not len(lo) == len(opt) == len(hi) == len(shape):
            raise ConfigError(
                f"Profile for input '{name}' has ranks {len(lo)}/{len(opt)}/{len(hi)}, graph rank is {len(shape)} {list(shape)}. "
                "Give min, opt and max with one entry per dim."
            )
        for i, (a, b, c, d) in enumerate(zip(lo, opt, hi, shape)):
            if not 0 < a <= b <= c:
                raise ConfigError(
                    f"Profile for input '{name}' dim {i} is min={a}, opt={b}, max={c}. Need 0 < min <= opt <= max. Fix the profile."
                )
            if d >= 0 and not a == b == c == d:
                raise ConfigError(
                    f"Profile for input '{name}' dim {i} is ({a}, {b}, {c}) but the graph fixes it to {d}. "
                    f"Static dims must be {d} in min, opt and max. Fix the profile or export that dim as dynamic."
                )
        out[name] = [lo, opt, hi]
    return out


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    backend: str | Backend = "auto",
    workspace_bytes: int | None = None,
    timing_cache_path: str | os.PathLike | None = None,
    profile: Mapping[str, Sequence[Sequence[int]]] | None = None,
    builder_optimization_level: int | None = None,
    compute_capabilities: Sequence[Any] | None = None,
    skip_preflight: bool = False,
    strip_weights: bool = False,
    refit_any: bool = False,
) -> BuildResult:
    """Builds a strongly typed TensorRT / TensorRT-RTX engine from an ONNX file.

    Args:
        onnx_path (str | os.PathLike): The graph; parsed by path so external data next to it is found.
        plan_path (str | os.PathLike): Where the serialized engine goes (written atomically).
        backend (str | Backend): ``"auto"``, ``"tensorrt"``, ``"tensorrt-rtx"`` or a :class:`Backend`.
            Defaults to ``"auto"``.
        workspace_bytes (int | None): Workspace memory-pool limit; backend default when None.
        timing_cache_path (str | os.PathLike | None): Timing cache loaded before and saved (atomically)
            after the build, so builds share it. No effect on TensorRT-RTX engines (see module doc).
            Defaults to None.
        profile (Mapping | None): ``{input: (min, opt, max)}`` shapes for dynamic inputs. Defaults to None.
        builder_optimization_level (int | None): 0-5; backend default (3) when None.
        compute_capabilities (Sequence | None): TensorRT-RTX only: AOT targets such as ``["8.9", "12.0"]``
            or ``["current"]`` (needs a GPU). Defaults to None (portable: 8.0, 8.6, 8.9, 12.0+).
        skip_preflight (bool): Build even when the pre-flight reports findings (to see the backend's own
            error for a suspected false positive). Defaults to False.
        strip_weights (bool): Weight-stripped, refittable engine (``STRIP_PLAN``, refit mode
            ``REFIT_IDENTICAL``): the plan holds no weights and is refit from the same ONNX when loaded
            (:class:`~shiva_export.engines.runner.EngineRunner` does it). For models whose plan would not fit
            on disk twice. ``tensorrt_rtx`` 1.7.1 builds refittable engines only with a CUDA GPU present (its
            Myelin JIT needs the driver): without one this raises :class:`HardwareError`. Defaults to False.
        refit_any (bool): With ``strip_weights``: refit mode ``REFIT`` (any weights of the same graph) instead of
            ``REFIT_IDENTICAL``, so a LoRA change refits the engine (``shiva_export.engines.lora_refit``). Defaults to False.

    Returns:
        BuildResult: Plan path, sha256, size, timings, backend and target info.

    Raises:
        PreflightError: The graph holds a construct the backend will not build.
        EngineBuildError: The ONNX file is missing, the parser rejects it, or the builder fails; the
            message lists the parser / logger error lines.
        ConfigError: A setting or the profile is invalid.
        HardwareError: The builder cannot be created (datacenter TensorRT without a usable CUDA GPU).
        MissingDependencyError: The backend is not installed.
    """
    t_start = time.perf_counter()
    onnx_path, be, plan_path = _check_build_options(
        onnx_path, plan_path, backend, builder_optimization_level, workspace_bytes, compute_capabilities
    )
    trt = be.module
    if not skip_preflight:
        preflight(onnx_path, be.name, be.version, profile_given=profile is not None).raise_if_failed()

    gpu = current_gpu()
    if not be.is_rtx and gpu is None:
        # Not fatal by itself: torch may be a CPU build on a GPU machine. trt.Builder decides below.
        logger.warning("torch.cuda sees no GPU; datacenter TensorRT %s needs one to build engines", be.version)

    trt_logger = _capture_logger(trt)
    with trt_logger.capture() as records, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # tensorrt_rtx: timing-cache APIs are deprecated no-ops
        builder, network = _parse_network(be, trt_logger, records, onnx_path)
        config = builder.create_builder_config()
        profile_used = _configure_builder(
            trt,
            builder,
            network,
            config,
            workspace_bytes,
            builder_optimization_level,
            profile,
            strip_weights,
            refit_any,
        )
        aot_targets, aot_default = _configure_targets(be, config, compute_capabilities)
        tc_info = _load_timing_cache(be, config, timing_cache_path, trt_logger)

        logger.info("building %s engine from %s (%s %s)", plan_path.name, onnx_path, be.name, be.version)
        n_before_build = len(records)
        t_build = time.perf_counter()
        failed = False
        try:
            streamed = _build_to_file(trt, builder, network, config, plan_path)
        except _BuildFailed:
            streamed, failed = None, True
        host_mem = None if streamed or failed else builder.build_serialized_network(network, config)
        build_seconds = time.perf_counter() - t_build
        if failed or (not streamed and host_mem is None):
            _raise_build_failed(be, onnx_path, _errors(records[n_before_build:]), strip_weights and gpu is None)
        if tc_info is not None:
            _save_timing_cache(be, config, tc_info)
        warn_lines = tuple(" ".join(msg.split()) for sev, msg in records if sev == "WARNING")

    digest, size = streamed if streamed else _write_plan(plan_path, host_mem)
    total = time.perf_counter() - t_start
    logger.info("built %s: %.1f MB in %.2f s (%s %s)", plan_path, size / 1e6, build_seconds, be.name, be.version)
    return BuildResult(
        plan_path=plan_path,
        sha256=digest,
        size_bytes=size,
        build_seconds=build_seconds,
        total_seconds=total,
        backend=be.name,
        backend_version=be.version,
        onnx_path=onnx_path,
        gpu_name=gpu["name"] if gpu else None,
        compute_capability=gpu["compute_capability"] if gpu else None,
        aot_targets=aot_targets,
        aot_targets_default=aot_default,
        profile=profile_used,
        timing_cache=tc_info,
        warnings=warn_lines,
        weights_stripped=strip_weights,
    )


def _check_build_options(
    onnx_path, plan_path, backend, builder_optimization_level, workspace_bytes, compute_capabilities
) -> tuple[Path, Backend, Path]:
    """Validates the build settings before the builder exists: (onnx path, backend, writable plan path)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EngineBuildError(
            f"ONNX file for the engine build not found: {onnx_path}. Expected an existing .onnx file. Export the model first or fix the path."
        )
    be = resolve_backend(backend)
    plan_path = check_writable(plan_path, "engine plan")

    sweep_stale_temps(plan_path.parent)  # leftovers of a killed build in this folder
    if builder_optimization_level is not None and not (
        isinstance(builder_optimization_level, int) and 0 <= builder_optimization_level <= 5
    ):
        raise ConfigError(
            f"builder_optimization_level is {builder_optimization_level!r}. Valid range: 0-5. Pass an int in 0-5 or None."
        )
    if workspace_bytes is not None and (not isinstance(workspace_bytes, int) or workspace_bytes <= 0):
        raise ConfigError(
            f"workspace_bytes is {workspace_bytes!r}. Expected a positive int. Pass e.g. 8 << 30 for 8 GiB."
        )
    if compute_capabilities is not None and not be.is_rtx:
        raise ConfigError(
            f"compute_capabilities={list(compute_capabilities)!r} was given for backend {be.name}. It applies to tensorrt-rtx only. "
            "Drop it (datacenter TensorRT builds for the GPU it runs on)."
        )
    return onnx_path, be, plan_path


def _parse_network(be: Backend, trt_logger: Any, records: list, onnx_path: Path) -> tuple[Any, Any]:
    """The builder and the network parsed from the ONNX file (by path, so its external data is found)."""
    trt = be.module
    try:
        builder = trt.Builder(trt_logger)
    except TypeError as err:  # pybind: "factory function returned nullptr" when CUDA init fails
        raise HardwareError(
            f"{be.name} {be.version} could not create a builder: {err} ({_join_errors(_errors(records))}). "
            "Datacenter TensorRT needs a CUDA GPU and driver to build. Build on a GPU machine (check nvidia-smi), "
            "or use backend='tensorrt-rtx', which builds ahead of time without a GPU."
        ) from None
    network = builder.create_network(_network_flags(be))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path.resolve())):
        raise EngineBuildError(
            f"The {be.name} {be.version} ONNX parser rejected {onnx_path}: {_parser_errors(parser)}. "
            "Run shiva_export.engines.preflight() and fix the listed nodes, or re-export the model."
        )
    return builder, network


def _configure_builder(
    trt,
    builder,
    network,
    config,
    workspace_bytes,
    builder_optimization_level,
    profile,
    strip_weights,
    refit_any: bool = False,
) -> dict | None:
    """Workspace, optimization level, the optimization profile and weight stripping; returns the checked profile."""
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if builder_optimization_level is not None:
        config.builder_optimization_level = builder_optimization_level
    profile_used = None
    if profile is not None:
        profile_used = _check_profile(network, profile)
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_used.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    if strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        # REFIT_IDENTICAL (STRIP_PLAN's default, stated) promises the build-time weights; refit_any (a LoRA engine,
        # engines/lora_refit.py) takes any weights of the same graph, so a LoRA change refits instead of rebuilding.
        config.set_flag(trt.BuilderFlag.REFIT if refit_any else trt.BuilderFlag.REFIT_IDENTICAL)
    return profile_used


def _raise_build_failed(be: Backend, onnx_path: Path, errors: list[str], stripped_without_gpu: bool) -> None:
    """The builder returned nothing: a stripped build without a CUDA driver is a hardware limit, the rest a build error."""
    if stripped_without_gpu and any(_CUDA_ERROR.search(e) or "CUDA_SUCCESS" in e for e in errors):
        raise HardwareError(
            f"{be.name} {be.version} cannot build a weight-stripped (refittable) engine without a CUDA GPU: its refit path "
            "JIT-compiles the graph (Myelin), which needs a CUDA driver (cudaError 35 here). Build the full engine on this machine "
            "(drop --strip-weights), or build the stripped one on a machine with an RTX-class GPU."
        )
    raise EngineBuildError(
        f"The {be.name} {be.version} builder failed for {onnx_path}: {_join_errors(errors)}. "
        "Fix the graph construct named above (see preflight()), or rebuild with a supported opset/dtype."
    )


def _save_timing_cache(be: Backend, config: Any, tc_info: dict[str, Any]) -> None:
    """Writes the timing cache and its stamp (sha256, backend, version) atomically."""
    serialized = config.get_timing_cache().serialize()
    atomic_write_bytes(tc_info["path"], memoryview(serialized))

    atomic_write_json(
        _timing_cache_stamp(Path(tc_info["path"])),
        {
            "format": "shiva-timing-cache/1",
            "sha256": hashlib.sha256(memoryview(serialized)).hexdigest(),
            "backend": be.name,
            "version": be.version,
        },
    )
    tc_info["saved_bytes"] = serialized.nbytes


def _write_plan(plan_path: Path, host_mem: Any) -> tuple[str, int]:
    """Writes a serialized plan held in host memory: (sha256, bytes)."""
    view = memoryview(host_mem)
    atomic_write_bytes(plan_path, view)
    digest = hashlib.sha256(view).hexdigest()
    size = host_mem.nbytes
    del view
    return digest, size


def _build_to_file(trt: ModuleType, builder: Any, network: Any, config: Any, plan_path: Path) -> tuple[str, int] | None:
    """Builds with ``build_serialized_network_to_stream`` straight into the plan file (atomically, hashed
    on the way), so a multi-GB plan is never held in memory whole. ``(sha256, bytes)``; ``None`` when the
    backend has no stream API. A failed build leaves no file and raises :class:`_BuildFailed`."""
    if not hasattr(builder, "build_serialized_network_to_stream") or not hasattr(trt, "IStreamWriter"):
        return None

    digest = hashlib.sha256()
    size = 0

    with atomic_write_stream(plan_path) as f:

        class _Writer(trt.IStreamWriter):
            def __init__(self):
                trt.IStreamWriter.__init__(self)

            def write(self, data) -> int:
                nonlocal size
                view = memoryview(data)
                f.write(view)
                digest.update(view)
                size += view.nbytes
                return view.nbytes

        if not builder.build_serialized_network_to_stream(network, config, _Writer()):
            raise _BuildFailed()
    return digest.hexdigest(), size


class _BuildFailed(Exception):
    """``build_serialized_network_to_stream`` returned False (the logger holds the reason)."""


def _network_flags(be: Backend) -> int:
    if be.is_rtx:
        return 0  # TensorRT-RTX networks are always strongly typed
    flag = getattr(be.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        logger.warning(
            "TensorRT %s has no STRONGLY_TYPED network flag (needs >= 10.12); the network is weakly typed and "
            "layers may run in fp32 even for an fp16 ONNX",
            be.version,
        )
        return 0
    return 1 << int(flag)


def _parser_errors(parser: Any) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node_name() or (f"#{err.node()}" if err.node() >= 0 else "")
        op = err.node_operator()
        where = f"node '{node}' ({op}): " if (node or op) else ""
        lines.append(f"{where}{' '.join(str(err.desc()).split()).rstrip('.')}")
    return _join_errors(lines) if lines else "(the parser reported no error detail)"


def _configure_targets(
    be: Backend, config: Any, compute_capabilities: Sequence[Any] | None
) -> tuple[tuple[str, ...] | None, bool]:
    if not be.is_rtx:
        return None, False
    if compute_capabilities:
        members = [compute_capability(be.module, cc) for cc in compute_capabilities]
        config.num_compute_capabilities = len(members)
        for i, member in enumerate(members):
            if not config.set_compute_capability(member, i):
                raise ConfigError(
                    f"TensorRT-RTX refused compute capability target {member.name} at index {i}. "
                    "CURRENT must be the only target. Pass distinct SMxx targets or ['current'] alone."
                )
    n = getattr(config, "num_compute_capabilities", 0)
    if n:
        return tuple(config.get_compute_capability(i).name for i in range(n)), False
    return RTX_DEFAULT_AOT_TARGETS, True


def _timing_cache_stamp(path: Path) -> Path:
    return path.with_name(path.name + ".shiva.json")


def check_timing_cache_path(path: str | os.PathLike | None) -> Path | None:
    """Refuses a ``--timing-cache`` path that holds some other file: only a missing or empty file, or a
    timing cache this tool wrote (its sha256 recorded in ``<path>.shiva.json``), may be overwritten."""
    if path is None:
        return None
    import json

    p = check_writable(path, "timing cache")
    if not p.exists() or p.stat().st_size == 0:
        return p
    if not p.is_file():
        raise OutputPathError(f"--timing-cache {p} is not a regular file. Pass a file path for the timing cache.")
    stamp = _timing_cache_stamp(p)
    try:
        recorded = json.loads(stamp.read_text()).get("sha256") if stamp.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != sha256_file(p):
        raise OutputPathError(
            f"--timing-cache {p} already exists and is not a timing cache written by shiva-export (no matching {stamp.name}); "
            "it will not be overwritten. Pass a new path, or delete the file if it is yours to lose."
        )
    return p


def _load_timing_cache(
    be: Backend, config: Any, path: str | os.PathLike | None, trt_logger: Any
) -> dict[str, Any] | None:
    """Loads the timing cache at ``path`` (if any) into ``config``; returns the report dict or None."""
    if path is None:
        return None
    path = check_timing_cache_path(path)
    previous = path.read_bytes() if path.is_file() else b""
    # Loading a cache that does not match (another GPU, or no GPU on TensorRT-RTX) logs errors that do
    # not fail the build; they are recognised here and kept out of a later build-failure message.
    with trt_logger.capture() as records:
        cache = config.create_timing_cache(previous)
        set_ok = bool(config.set_timing_cache(cache, ignore_mismatch=False))
    rejected = any(
        "timing cache" in msg.lower() and ("fail" in msg.lower() or "not be used" in msg.lower()) for _, msg in records
    )
    accepted = bool(previous) and set_ok and not rejected
    if previous and not accepted:
        logger.info(
            "timing cache %s (%d bytes) was not accepted by %s %s; building with an empty one",
            path,
            len(previous),
            be.name,
            be.version,
        )
    if be.is_rtx:
        logger.debug("TensorRT-RTX treats timing caches as no-ops; %s is kept for API parity only", path)
    return {"path": str(path), "loaded_bytes": len(previous), "accepted": accepted, "saved_bytes": 0}


# --------------------------------------------------------------------------------------------------
# Deserialization check


def deserialize_check(plan_path: str | os.PathLike, backend: str | Backend = "auto") -> dict[str, Any]:
    """Tries to deserialize a plan with ``trt.Runtime`` and reports what happened; never runs it.

    Observed with ``tensorrt_rtx`` 1.7.1.116 on a CPU-only machine (no CUDA driver):

    * ``trt.Runtime(logger)`` is created fine, but ``deserialize_cuda_engine`` returns None for a good
      plan after logging ``cudaError 35: CUDA driver version is insufficient for CUDA runtime version``.
      An AOT-built engine therefore cannot be loaded, let alone run, without a GPU: on such a machine
      check the plan as a file (sha256 against its manifest, :func:`~shiva_export.engines.manifest.verify_engine`).
    * The plan's framing is still parsed before the CUDA failure: a truncated plan logs
      ``Serialization assertion plan.header.size == blobSize failed`` and a foreign file
      ``header.magicTag == kEXPECTED_MAGIC_TAG failed``; both are reported as a malformed plan. A
      flipped byte inside the plan is *not* detected (only the sha256 catches it).
    * ``Runtime.get_engine_validity`` (header only) needs the GPU's properties too: it returns
      ``(INVALID, 0)`` with no diagnostic for a good plan, ``MALFORMED_ENGINE`` only for a foreign file.
      It is reported under ``"header"`` as advisory.

    This function never fakes success: ``deserialized`` is True only when the backend returned an engine,
    and ``io`` is then read from that engine.

    Args:
        plan_path (str | os.PathLike): Serialized engine.
        backend (str | Backend): Backend that built it. Defaults to ``"auto"``.

    Returns:
        dict: ``{"deserialized": bool, "reason": str | None, "io": [(name, shape, dtype, mode)],
        "backend", "backend_version", "gpu", "plan_bytes", "header", "errors"}``. ``reason`` is None
        when deserialization succeeded.

    Raises:
        EngineBuildError: The plan file does not exist.
        MissingDependencyError: The backend is not installed.
    """
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise EngineBuildError(
            f"Engine plan not found: {plan_path}. Expected an existing .plan file. Build it first or fix the path."
        )
    be = resolve_backend(backend)
    trt = be.module
    with _mapped(plan_path) as data:
        return _deserialize_check(plan_path, be, trt, data)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[Any]:
    """The file's bytes, memory-mapped (a multi-GB plan is paged in by the backend, not copied first)."""
    import mmap

    if path.stat().st_size == 0:
        yield b""
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        yield mm


def _deserialize_check(plan_path: Path, be: Backend, trt: ModuleType, data: Any) -> dict[str, Any]:
    gpu = current_gpu()
    result: dict[str, Any] = {
        "deserialized": False,
        "reason": None,
        "io": [],
        "backend": be.name,
        "backend_version": be.version,
        "gpu": gpu,
        "plan_bytes": len(data),
        "header": None,
        "errors": [],
    }
    trt_logger = _capture_logger(trt)
    engine = None
    with trt_logger.capture() as records:
        try:
            runtime = trt.Runtime(trt_logger)
        except TypeError as err:
            result["errors"] = _errors(records)
            result["reason"] = f"trt.Runtime could not be created ({err}); a CUDA driver is needed for this backend"
            return result
        if hasattr(runtime, "get_engine_validity"):
            try:
                validity, diagnostics = runtime.get_engine_validity(data)
                bits = int(diagnostics)
                names = [
                    name for name, member in trt.EngineInvalidityDiagnostics.__members__.items() if bits & int(member)
                ]
                result["header"] = {"validity": _enum_name(validity), "diagnostics": names}
            except Exception as err:  # noqa: BLE001 - header check is advisory
                result["header"] = {"validity": "unknown", "diagnostics": [], "error": str(err)}
        try:
            engine = runtime.deserialize_cuda_engine(data)
        except Exception as err:  # noqa: BLE001 - report, never crash a check
            records.append(("ERROR", f"deserialize_cuda_engine raised {type(err).__name__}: {err}"))
            engine = None
    result["errors"] = _errors(records)

    if engine is None:
        errors = result["errors"]
        specific = [e for e in errors if not _CUDA_ERROR.search(e)]
        header = result["header"] or {}
        if "MALFORMED_ENGINE" in header.get("diagnostics", []) or any("Serialization" in e for e in specific):
            detail = specific[0] if specific else "header check: MALFORMED_ENGINE"
            result["reason"] = f"the plan is malformed, truncated or not a {be.name} {be.version} plan: {detail}"
        elif gpu is None:
            first = errors[0] if errors else "no error line was logged"
            result["reason"] = (
                f"no CUDA GPU is visible: {be.name} {be.version} builds engines without a GPU but needs a CUDA device "
                f"and driver to deserialize them ({first})"
            )
        else:
            first = (specific or errors or ["no error line was logged"])[0]
            detail = f"; header diagnostics: {', '.join(header['diagnostics'])}" if header.get("diagnostics") else ""
            result["reason"] = (
                f"deserialize_cuda_engine returned None on {gpu['name']} (cc {gpu['compute_capability']}){detail}: {first}"
            )
        logger.info("deserialize check of %s: not deserialized (%s)", plan_path, result["reason"])
        return result

    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io.append(
            (
                name,
                tuple(int(d) for d in engine.get_tensor_shape(name)),
                _enum_name(engine.get_tensor_dtype(name)),
                _enum_name(engine.get_tensor_mode(name)),
            )
        )
    result["deserialized"] = True
    result["io"] = io
    del engine
    return result
