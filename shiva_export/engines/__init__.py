"""TensorRT / TensorRT-RTX engines: pre-flight checks, one builder for both backends, and manifests.

No backend is imported here: :func:`resolve_backend` imports ``tensorrt`` or ``tensorrt_rtx`` on use
and raises :class:`~shiva_export.errors.MissingDependencyError` with the pip line when it is missing.
"""

from shiva_export.engines.builder import (
    RTX_DEFAULT_AOT_TARGETS,
    Backend,
    BuildResult,
    build_engine,
    current_gpu,
    deserialize_check,
    resolve_backend,
)
from shiva_export.engines.manifest import (
    MANIFEST_SCHEMA_VERSION,
    EngineManifest,
    cache_key,
    manifest_path_for,
    read_manifest,
    verify_engine,
    write_manifest,
)
from shiva_export.engines.preflight import (
    BACKENDS,
    TOPK_MAX_K,
    Finding,
    PreflightReport,
    format_report,
    preflight,
)

__all__ = [
    "BACKENDS",
    "TOPK_MAX_K",
    "Finding",
    "PreflightReport",
    "preflight",
    "format_report",
    "Backend",
    "BuildResult",
    "RTX_DEFAULT_AOT_TARGETS",
    "resolve_backend",
    "build_engine",
    "deserialize_check",
    "current_gpu",
    "MANIFEST_SCHEMA_VERSION",
    "EngineManifest",
    "write_manifest",
    "read_manifest",
    "manifest_path_for",
    "cache_key",
    "verify_engine",
]
