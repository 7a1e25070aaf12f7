"""A LoRA change on a weight-stripped engine refits it instead of rebuilding it.

A LoRA fused at export changes weight values only: the graph (every node, shape and initializer name) is the
same, so a *fully* refittable engine (``--strip-weights`` with ``--lora``: ``STRIP_PLAN`` + ``BuilderFlag.REFIT``,
not ``REFIT_IDENTICAL``, which promises the build-time weights) serves every LoRA and scale. Such a plan holds no
weights at all: :class:`~shiva_export.engines.runner.EngineRunner` refits it from the ONNX named in the manifest's
``build_options.refit_weights`` (sha256-checked) each time it loads it. So when only the LoRAs of the export key
differ, the budget re-exports the ONNX (new fused weights), keeps the plan, and rewrites the manifest (new export
key, ONNX sha256 and ``refit_weights``): no TensorRT build. On a machine with a CUDA GPU the refit is also run once
right away (:func:`check_refit`), so a failing refit shows at build time; without one it runs when the engine is
first loaded.

What needs a GPU: building the stripped engine itself (TensorRT-RTX 1.7 builds refittable engines only with a CUDA
GPU present; TensorRT needs one anyway) and every refit (``trt.Refitter`` works on a deserialized CUDA engine).
The decision to refit, the re-export and the manifest run anywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from shiva_export.engines.manifest import EngineManifest, read_manifest, utc_now
from shiva_export.engines.runner import EngineRunner
from shiva_export.errors import ManifestError
from shiva_export.logging import get_logger
from shiva_export.utils.io import sha256_file

__all__ = ["FULL_REFIT", "check_refit", "refit_manifest", "refit_option", "refittable_manifest"]

logger = get_logger(__name__)

#: ``build_options["refit"]`` of a fully refittable (any weights) stripped engine.
FULL_REFIT = "any"


def refit_option(strip_weights: bool, loras) -> dict[str, str]:
    """The build option that makes LoRA changes refittable: only stripped engines built with LoRAs get it (a
    stripped engine without LoRAs keeps ``REFIT_IDENTICAL``, so adding a first LoRA rebuilds it once)."""
    return {"refit": FULL_REFIT} if strip_weights and loras else {}


def _without_loras(key: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (key or {}).items() if k != "loras"}


def refittable_manifest(
    manifest_path: Path, plan: Path, key: dict[str, Any], options: dict[str, Any], backend
) -> EngineManifest | None:
    """The manifest of the engine in this folder when it can take ``key`` by a refit: same backend and build
    options, fully refittable and weight-stripped, an export key equal to ``key`` except for the LoRAs, and the
    plan on disk still the one it describes. None otherwise (build as usual)."""
    if options.get("refit") != FULL_REFIT or not options.get("strip_weights"):
        return None
    if not manifest_path.is_file() or not plan.is_file():
        return None
    try:
        m = read_manifest(manifest_path)
    except ManifestError:
        return None
    built_with = {k: v for k, v in (m.build_options or {}).items() if k != "refit_weights"}
    if built_with != options or m.backend != backend.name or m.backend_version != backend.version:
        return None
    if _without_loras(m.export_key) != _without_loras(key) or (m.export_key or {}).get("loras") == key.get("loras"):
        return None
    if sha256_file(plan) != m.engine_sha256:
        return None
    return m


def refit_manifest(
    m: EngineManifest, key: dict[str, Any], onnx_sha256: str, refit_weights: dict[str, Any], router_sha256: str | None
) -> EngineManifest:
    """``m`` for the re-exported ONNX: new export key, ONNX sha256 and refit source; the plan (and its sha256) stays."""
    return dataclasses.replace(
        m,
        export_key=key,
        onnx_sha256=onnx_sha256,
        router_sha256=router_sha256,
        build_options={**(m.build_options or {}), "refit_weights": refit_weights},
        created_at=utc_now(),
    )


def check_refit(engine_dir: Path, backend: str) -> dict[str, Any]:
    """Refits the engine from its (new) ONNX once, on a CUDA GPU; reports why not without one."""
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        gpu = False
    if not gpu:
        return {
            "refit_checked": False,
            "reason": "no CUDA GPU here: the engine refits from the new ONNX when it is first loaded",
        }

    EngineRunner(engine_dir, backend=backend).activate()  # deserialize + refit (EngineBuildError on failure)
    return {"refit_checked": True, "reason": None}
