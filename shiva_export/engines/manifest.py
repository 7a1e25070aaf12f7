"""Engine manifests: what an engine was built from, and whether it can be used here.

A TensorRT plan is tied to the backend version and, by default, to the GPU architecture (TensorRT-RTX:
to a set of ahead-of-time compute-capability targets). The plan file does not say what model, recipe,
router or ONNX it came from, so every engine gets a ``<plan>.manifest.json`` next to it:

* :func:`cache_key` is the subset of the manifest that decides whether a rebuild can be skipped
  (all input hashes, backend + version, the target, shapes and dtype);
* :func:`verify_engine` refuses a plan whose bytes, backend version or GPU do not match.

Files are written atomically (:func:`~shiva_export.utils.io.atomic_write_json`) and read strictly:
a missing field, an unknown field, a wrong type or a newer schema raises :class:`ManifestError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shiva_export._version import __version__
from shiva_export.engines.preflight import normalize_backend_name
from shiva_export.errors import ManifestError
from shiva_export.logging import get_logger
from shiva_export.utils.io import atomic_write_text, canonical_json, sha256_bytes, sha256_file

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "EngineManifest",
    "manifest_path_for",
    "write_manifest",
    "read_manifest",
    "manifest_self_hash",
    "cache_key",
    "verify_engine",
]

logger = get_logger(__name__)

MANIFEST_SCHEMA_VERSION = 1

_REQUIRED = (
    "model_name",
    "model_config_hash",
    "onnx_sha256",
    "engine_sha256",
    "backend",
    "backend_version",
    "input_shapes",
    "dtype",
)


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass
class EngineManifest:
    """Provenance of one engine plan.

    Attributes:
        model_name (str): Model / recipe name, e.g. ``"sd3"``.
        model_config_hash (str): Hash of the transformer config.
        onnx_sha256 (str): SHA-256 of the ONNX file the engine was parsed from.
        engine_sha256 (str): SHA-256 of the plan.
        backend (str): ``"tensorrt"`` or ``"tensorrt-rtx"``.
        backend_version (str): Backend module version.
        input_shapes (dict[str, list[int]]): Static input shapes (or the profile's opt shapes).
        dtype (str): Model dtype, e.g. ``"fp16"``.
        recipe_sha256 (str | None): Recipe hash.
        router_sha256 (str | None): Router weights hash.
        gpu_name (str | None): GPU the engine was built on (None for a CPU-only AOT build).
        compute_capability (str | None): That GPU's compute capability, e.g. ``"8.9"``.
        aot_targets (list[str] | None): TensorRT-RTX targets, e.g. ``["SM89"]``; ``"SM120+"`` means 12.0 and later.
        ratio (float | None): Pruned fraction of image tokens in routed blocks.
        keep_ratio (float | None): ``1 - ratio``.
        per_block_k (dict[str, int]): Tokens kept per routed block (keys are block indices as strings).
        build_seconds (float | None): Builder time.
        dense (bool): The engine is the dense reference (no router, no top-k).
        onnx_path (str | None): The ONNX the engine was built from (relative to the manifest when beside it).
        export_key (dict | None): Everything that determined the ONNX before it was exported (recipe,
            weights fingerprint, router, ratio, shapes, dtype, opset, tool versions): with an equal key,
            neither the export nor the build is repeated.
        build_options (dict | None): Builder settings (profile, workspace, optimization level, AOT targets).
        deserialize (dict | None): Result of the post-build deserialization check (see builder.deserialize_check).
        shiva_export_version (str): Package version that wrote the manifest.
        created_at (str): ISO-8601 UTC timestamp.
        schema_version (int): Manifest schema version.
    """

    model_name: str
    model_config_hash: str
    onnx_sha256: str
    engine_sha256: str
    backend: str
    backend_version: str
    input_shapes: dict[str, list[int]]
    dtype: str
    recipe_sha256: str | None = None
    router_sha256: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    aot_targets: list[str] | None = None
    ratio: float | None = None
    keep_ratio: float | None = None
    per_block_k: dict[str, int] = field(default_factory=dict)
    build_seconds: float | None = None
    dense: bool = False
    onnx_path: str | None = None
    export_key: dict[str, Any] | None = None
    build_options: dict[str, Any] | None = None
    deserialize: dict[str, Any] | None = None
    shiva_export_version: str = __version__
    created_at: str = field(default_factory=utc_now)
    schema_version: int = MANIFEST_SCHEMA_VERSION
    #: sha256 of the manifest's other fields (canonical JSON), written by :func:`write_manifest` and checked by
    #: :func:`read_manifest` before any field is trusted: an edited ratio, per-block k or input shape is caught.
    self_sha256: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.input_shapes = {str(k): [int(d) for d in v] for k, v in self.input_shapes.items()}
        self.per_block_k = {str(k): int(v) for k, v in (self.per_block_k or {}).items()}
        if self.aot_targets is not None:
            self.aot_targets = [str(t) for t in self.aot_targets]

    @classmethod
    def from_build(cls, result: Any, *, onnx_sha256: str | None = None, **fields_: Any) -> EngineManifest:
        """Manifest for a :class:`~shiva_export.engines.builder.BuildResult` plus the model facts.

        Args:
            result (BuildResult): The build.
            onnx_sha256 (str | None): Hash of the ONNX file; computed from ``result.onnx_path`` when None.
            **fields_: The remaining manifest fields (``model_name``, ``model_config_hash``, ``input_shapes``,
                ``dtype``, ...).
        """
        return cls(
            onnx_sha256=onnx_sha256 or sha256_file(result.onnx_path),
            engine_sha256=result.sha256,
            backend=result.backend,
            backend_version=result.backend_version,
            gpu_name=result.gpu_name,
            compute_capability=result.compute_capability,
            aot_targets=list(result.aot_targets) if result.aot_targets is not None else None,
            build_seconds=round(result.build_seconds, 3),
            **fields_,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> EngineManifest:
        """Strict construction from a parsed JSON object.

        Raises:
            ManifestError: Not an object, newer schema, missing / unknown fields, or wrong types.
        """
        if not isinstance(data, dict):
            raise ManifestError(
                f"Engine manifest {where} is a JSON {type(data).__name__}. Expected a JSON object. Rebuild the engine to rewrite it."
            )
        version = data.get("schema_version", MANIFEST_SCHEMA_VERSION)
        if not isinstance(version, int) or not 1 <= version <= MANIFEST_SCHEMA_VERSION:
            raise ManifestError(
                f"Engine manifest {where} has schema_version {version!r}. Supported: 1-{MANIFEST_SCHEMA_VERSION}. "
                "Upgrade shiva-export or rebuild the engine."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(
                f"Engine manifest {where} has unknown field(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}. Rebuild the engine to rewrite it."
            )
        missing = [k for k in _REQUIRED if data.get(k) is None]
        if missing:
            raise ManifestError(
                f"Engine manifest {where} lacks required field(s): {', '.join(missing)}. All of {', '.join(_REQUIRED)} are required. Rebuild the engine to rewrite it."
            )
        _check_types(data, where)
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ManifestError(
                f"Engine manifest {where} is malformed: {err}. Expected the fields written by write_manifest(). Rebuild the engine."
            ) from None

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> EngineManifest:
        """Parses :meth:`to_json` output.

        Raises:
            ManifestError: Invalid JSON or invalid content.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(
                f"Engine manifest {where} is not valid JSON: {err}. Expected the file written by write_manifest(). Rebuild the engine."
            ) from None
        return cls.from_dict(data, where)


_STR_FIELDS = (
    "model_name",
    "model_config_hash",
    "onnx_sha256",
    "engine_sha256",
    "backend",
    "backend_version",
    "dtype",
    "shiva_export_version",
    "created_at",
)
_OPT_STR_FIELDS = ("recipe_sha256", "router_sha256", "gpu_name", "compute_capability", "self_sha256")
_OPT_NUM_FIELDS = ("ratio", "keep_ratio", "build_seconds")


def _check_types(data: dict[str, Any], where: str) -> None:
    def bad(name: str, expected: str) -> ManifestError:
        return ManifestError(
            f"Engine manifest {where} field {name} is {data[name]!r}. Expected {expected}. Rebuild the engine to rewrite it."
        )

    for name in _STR_FIELDS:
        if name in data and not isinstance(data[name], str):
            raise bad(name, "a string")
    for name in _OPT_STR_FIELDS:
        if data.get(name) is not None and not isinstance(data[name], str):
            raise bad(name, "a string or null")
    for name in _OPT_NUM_FIELDS:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(name, "a number or null")
    shapes = data["input_shapes"]
    if not isinstance(shapes, dict) or not all(
        isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v) for v in shapes.values()
    ):
        raise bad("input_shapes", "an object of {input: [int, ...]}")
    ks = data.get("per_block_k", {})
    if not isinstance(ks, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ks.values()):
        raise bad("per_block_k", "an object of {block: int}")
    targets = data.get("aot_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise bad("aot_targets", "a list of strings or null")


def manifest_path_for(plan_path: str | os.PathLike) -> Path:
    """Conventional manifest location: ``manifest.json`` beside the plan
    (``engines/<model>/<budget>/<dtype>/{model.plan, manifest.json}``)."""
    return Path(plan_path).with_name("manifest.json")


def manifest_self_hash(data: dict[str, Any]) -> str:
    """sha256 of a manifest's fields other than ``self_sha256`` (canonical JSON)."""
    return sha256_bytes(canonical_json({k: v for k, v in data.items() if k != "self_sha256"}).encode())


def write_manifest(path: str | os.PathLike, manifest: EngineManifest) -> Path:
    """Writes ``manifest`` to ``path`` atomically, sealed with its self-hash, and returns the path."""
    data = manifest.to_dict()
    data["self_sha256"] = manifest_self_hash(data)
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_self_hash(data: Any, where: str) -> None:
    """The first check of a manifest read from disk: its fields are the ones written (schema checks come after)."""
    if not isinstance(data, dict):
        return  # from_dict names the wrong type
    version = data.get("schema_version", MANIFEST_SCHEMA_VERSION)
    if not isinstance(version, int) or not 1 <= version <= MANIFEST_SCHEMA_VERSION:
        return  # from_dict names the schema
    want = data.get("self_sha256")
    if not isinstance(want, str):
        raise ManifestError(
            f"Engine manifest {where} has no self_sha256, so edits to it cannot be detected. Rebuild the engine to rewrite it."
        )
    if manifest_self_hash(data) != want:
        raise ManifestError(
            f"Engine manifest {where} was edited after it was written (its fields no longer match its self_sha256 {want[:12]}...). "
            "Rebuild the engine (`shiva-export trt --force`) instead of editing its manifest."
        )


def read_manifest(path: str | os.PathLike) -> EngineManifest:
    """Reads and validates a manifest.

    Raises:
        ManifestError: Missing, unreadable or malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"Engine manifest not found: {path}. Expected a manifest next to the plan. Rebuild the engine to write one."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"Cannot read engine manifest {path}: {err}. Expected a UTF-8 JSON file. Rebuild the engine."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # from_json names the JSON error
    _check_self_hash(data, str(path))
    return EngineManifest.from_json(text, where=str(path))


def _target(manifest: EngineManifest) -> dict[str, Any]:
    if manifest.aot_targets is not None:
        return {"aot_targets": sorted(manifest.aot_targets)}
    return {"compute_capability": manifest.compute_capability}


def cache_key(manifest: EngineManifest) -> dict[str, Any]:
    """The inputs that decide whether an existing engine can be reused instead of rebuilt.

    Two manifests with equal cache keys describe engines built from the same model, config, recipe,
    router and ONNX bytes, with the same backend version, for the same target, shapes and dtype.
    Build timings, timestamps, the GPU's marketing name and the engine hash are not part of it.
    """
    return {
        "model_name": manifest.model_name,
        "model_config_hash": manifest.model_config_hash,
        "recipe_sha256": manifest.recipe_sha256,
        "router_sha256": manifest.router_sha256,
        "onnx_sha256": manifest.onnx_sha256,
        "backend": manifest.backend,
        "backend_version": manifest.backend_version,
        "target": _target(manifest),
        "input_shapes": {k: list(v) for k, v in sorted(manifest.input_shapes.items())},
        "dtype": manifest.dtype,
        "export_key": manifest.export_key,
        "build_options": manifest.build_options,
    }


def _normalize_cc(value: Any) -> str | None:
    """``"8.9"``, ``"sm_89"``, ``"SM89"``, ``89``, ``(8, 9)`` -> ``"8.9"``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().upper().replace("_", "").replace("SM", "").rstrip("+")
    if "." in text:
        major, _, minor = text.partition(".")
        return f"{int(major)}.{int(minor)}"
    if text.isdigit() and len(text) >= 2:
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise ManifestError(
        f"Compute capability {value!r} cannot be read. Expected e.g. '8.9', 'sm_89' or (8, 9). Pass the GPU's compute capability."
    )


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor)


def _gpu_fields(gpu: Any) -> tuple[str | None, str | None]:
    if gpu is None:
        return None, None
    if isinstance(gpu, dict):
        return gpu.get("name"), _normalize_cc(gpu.get("compute_capability"))
    return None, _normalize_cc(gpu)


def verify_engine(
    plan_path: str | os.PathLike,
    manifest: EngineManifest,
    backend_version: str | None,
    gpu: dict[str, Any] | str | tuple[int, int] | None,
    *,
    backend: str | None = None,
) -> None:
    """Refuses an engine whose bytes, backend version or GPU do not match its manifest.

    Args:
        plan_path (str | os.PathLike): The plan to check.
        manifest (EngineManifest): Its manifest.
        backend_version (str | None): Version of the backend that will load it; None skips the check
            (e.g. on a CPU-only machine without the backend).
        gpu (dict | str | tuple | None): The GPU that will run it: ``{"name", "compute_capability"}``
            (as :func:`~shiva_export.engines.builder.current_gpu` returns), a compute capability
            (``"8.9"``, ``"sm_89"``, ``(8, 9)``), or None to skip the GPU check (no GPU here).
        backend (str | None): Backend that will load it; checked against the manifest when given.

    Raises:
        ManifestError: The plan is missing, its sha256 differs, or the backend / version / GPU does not
            match. A matching compute capability with a different GPU name is accepted with a warning.
    """
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise ManifestError(
            f"Engine plan not found: {plan_path}. Expected the plan named by the manifest. Rebuild the engine."
        )
    digest = sha256_file(plan_path)
    if digest != manifest.engine_sha256:
        raise ManifestError(
            f"Engine {plan_path} does not match its manifest: sha256 {digest[:16]}... != {manifest.engine_sha256[:16]}... "
            "The plan must be byte-identical to the one built. Rebuild the engine (the file was modified, truncated or replaced)."
        )
    if backend is not None:
        if normalize_backend_name(backend) != manifest.backend:
            raise ManifestError(
                f"Engine {plan_path} was built with {manifest.backend}, not {backend}. Plans load only in the backend that built them. "
                f"Use {manifest.backend} or rebuild."
            )
    if backend_version is not None and str(backend_version) != manifest.backend_version:
        raise ManifestError(
            f"Engine {plan_path} was built with {manifest.backend} {manifest.backend_version}, this runtime is {backend_version}. "
            "Plans are tied to the exact backend version. Rebuild the engine with this version."
        )
    name, cc = _gpu_fields(gpu)
    if cc is None:
        return
    if manifest.aot_targets is not None:
        _check_aot_target(plan_path, manifest, cc)
        return
    if manifest.compute_capability is None:
        return
    built_cc = _normalize_cc(manifest.compute_capability)
    if cc != built_cc:
        raise ManifestError(
            f"Engine {plan_path} was built for compute capability {built_cc} ({manifest.gpu_name}), this GPU is {cc} ({name or 'unknown'}). "
            "TensorRT engines run only on the architecture they were built for. Rebuild the engine on this GPU."
        )
    if name and manifest.gpu_name and name != manifest.gpu_name:
        logger.warning(
            "engine %s was built on %s and will run on %s (same compute capability %s); performance may differ",
            plan_path,
            manifest.gpu_name,
            name,
            cc,
        )


def _check_aot_target(plan_path: Path, manifest: EngineManifest, cc: str) -> None:
    want = _cc_tuple(cc)
    for target in manifest.aot_targets or []:
        if target.upper() == "CURRENT":
            built = _normalize_cc(manifest.compute_capability) if manifest.compute_capability else None
            if built is not None and _cc_tuple(built) == want:
                return
            continue
        got = _cc_tuple(_normalize_cc(target))
        if got == want or (target.endswith("+") and want >= got):
            return
    raise ManifestError(
        f"Engine {plan_path} targets compute capabilities {', '.join(manifest.aot_targets or [])}, this GPU is {cc}. "
        f"{manifest.backend} engines run only on their targets. Rebuild with compute_capabilities=['{cc}'] if {manifest.backend} supports it."
    )
