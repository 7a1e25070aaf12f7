"""One engine per budget: export (or reuse) the ONNX, pre-flight it, build, check, write the manifest.

Layout: ``<out_dir>/<model>/ratio<r>/<dtype>/{model.onnx, model.plan, manifest.json}``. Ratio 0 is the
dense reference engine (the plain model: no router, no top-k). A budget is skipped when its manifest's
export key (recipe, weights fingerprint, router, ratio, shapes, dtype, opset, tool versions), build
options and backend/target all match and the ONNX and plan on disk still hash to what the manifest says;
``force=True`` rebuilds. The plan is written atomically by the builder and the manifest atomically
after it, so an interrupted build never leaves a manifest describing a missing or partial plan.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiva_export.engines.builder import (
    Backend,
    build_engine,
    check_timing_cache_path,
    deserialize_check,
    resolve_backend,
)
from shiva_export.engines.chain import CHAIN_FILE, build_chain, chain_deserialize_check, clear_other_layout, read_chain
from shiva_export.engines.lora_refit import check_refit, refit_manifest, refit_option, refittable_manifest
from shiva_export.engines.manifest import EngineManifest, manifest_path_for, read_manifest, write_manifest
from shiva_export.errors import ConfigError, ManifestError, ParityError
from shiva_export.export.buckets import bucket_name, bucket_sizes
from shiva_export.export.graph_cache import export_key_for
from shiva_export.export.onnx import load_onnx_graph, read_shiva_metadata
from shiva_export.export.pruned import budget_dir, export_pruned, phase_dir
from shiva_export.export.segments import MAX_SEGMENTS
from shiva_export.logging import get_logger
from shiva_export.models import adapter_for_architecture
from shiva_export.prune.topk import static_k
from shiva_export.recipe import Recipe, load_recipe
from shiva_export.utils.io import folder_lock, inside, safe_component, sha256_file, sha256_file_cached

__all__ = ["EngineBuild", "build_engines", "unique_budgets"]

logger = get_logger(__name__)


def unique_budgets(
    recipe: Recipe, ratios: list[float], height: int, width: int, weights: str | os.PathLike | None = None
) -> tuple[list[float], dict[float, float]]:
    """Drops ratios whose per-block k equal those of a smaller ratio (same budget, one engine) at this size.

    The image-token count N comes from the architecture's adapter (Flux packs 2x2 latents, SD3 patches 2x2), read
    from the transformer config without loading weights; where no config is at hand (a hub model not in the cache)
    nothing is merged and the export says what is missing.

    Returns the ratios to build (ascending) and ``{dropped ratio: the ratio it duplicates}``.
    """
    n = image_tokens(recipe, height, width, weights)
    if n is None:
        return sorted(set(ratios)), {}
    keep, same, seen = [], {}, {}
    for r in sorted(set(ratios)):
        k = ("dense",) if r == 0.0 else static_k(n, 1.0 - r)
        if k in seen:
            same[r] = seen[k]
            continue
        seen[k] = r
        keep.append(r)
    return keep, same


def image_tokens(recipe: Recipe, height: int, width: int, weights: str | os.PathLike | None = None) -> int | None:
    """Image tokens of the recipe's transformer at ``height`` x ``width``, from its adapter and config (no weights loaded);
    None where the config cannot be read here."""
    from types import SimpleNamespace

    adapter = adapter_for_architecture(recipe.architecture)
    config = _config_dict(recipe, weights, adapter)
    if config is None:
        return None
    return adapter.num_image_tokens(
        SimpleNamespace(**{k: v for k, v in config.items() if not k.startswith("_")}), height, width
    )


def _config_dict(recipe: Recipe, weights, adapter) -> dict[str, Any] | None:
    """The transformer config: the embedded one, a local folder's config.json, or the hub cache's; None if unreadable."""
    import json

    if weights is None and recipe.model.source == "local":
        weights = recipe.local_model_path()
    if weights is None and recipe.model.source == "embedded":
        return dict(recipe.model.config or {})
    if weights is not None:
        root = Path(weights).expanduser()
        for cand in (root / "config.json", root / "transformer" / "config.json"):
            if cand.is_file():
                try:
                    return json.loads(cand.read_text())
                except (OSError, ValueError):
                    return None
        return None
    try:
        return dict(
            adapter.model_class().load_config(
                recipe.model.repo_id, subfolder=recipe.model.subfolder, local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - not in the cache (or unreadable): the export reports it
        return None


@dataclass
class EngineBuild:
    """One budget's outcome."""

    ratio: float
    dense: bool
    status: str  # built | cached | refit | failed
    out_dir: Path
    plan_path: Path | None = None
    onnx_path: Path | None = None
    manifest_path: Path | None = None
    per_block_k: dict[str, int] = field(default_factory=dict)
    build_seconds: float | None = None
    export_seconds: float | None = None
    engine_bytes: int | None = None
    parity: str | None = None
    deserialize: dict[str, Any] | None = None
    error: str | None = None
    phase: str | None = None  # a learned phase's name (``trt --phases``); ratio is then its mean pruned fraction
    bucket: str | None = None  # ``<width>x<height>`` of a resolution bucket, None for the size-free layout

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "bucket": self.bucket,
            "ratio": self.ratio,
            "keep_ratio": 1.0 - self.ratio,
            "dense": self.dense,
            "status": self.status,
            "out_dir": str(self.out_dir),
            "plan": str(self.plan_path) if self.plan_path else None,
            "onnx": str(self.onnx_path) if self.onnx_path else None,
            "manifest": str(self.manifest_path) if self.manifest_path else None,
            "per_block_k": self.per_block_k,
            "build_seconds": self.build_seconds,
            "export_seconds": self.export_seconds,
            "engine_mb": round(self.engine_bytes / 1e6, 3) if self.engine_bytes else None,
            "parity": self.parity,
            "deserialize": self.deserialize,
            "error": self.error,
        }


def _cached(
    manifest_path: Path, plan: Path, onnx_path: Path, key: dict[str, Any], options: dict[str, Any], be: Backend
) -> EngineManifest | None:
    if not manifest_path.is_file() or not plan.is_file() or not onnx_path.is_file():
        return None
    try:
        m = read_manifest(manifest_path)
    except ManifestError as err:
        logger.warning("ignoring unreadable manifest %s: %s", manifest_path, err)
        return None
    built_with = {
        k: v for k, v in (m.build_options or {}).items() if k != "refit_weights"
    }  # refit_weights: a record, not a setting
    if m.export_key != key or built_with != options or m.backend != be.name or m.backend_version != be.version:
        return None
    if sha256_file(plan) != m.engine_sha256 or sha256_file(onnx_path) != m.onnx_sha256:
        return None
    if plan.name == CHAIN_FILE:  # every segment plan must still be the one the chain was built with
        try:
            rows = read_chain(plan)["segments"]
        except ManifestError:
            return None
        for row in rows:
            part = plan.parent / row["dir"] / "model.plan"
            if not part.is_file() or sha256_file(part) != row["plan_sha256"]:
                return None
    return m


def _engine_bytes(plan: Path) -> int:
    """A plan's size, or the sum of a chain's segment plans."""
    if plan.name != CHAIN_FILE:
        return plan.stat().st_size
    return sum((plan.parent / r["dir"] / "model.plan").stat().st_size for r in read_chain(plan)["segments"])


def build_engines(
    *,
    model: str | None = None,
    recipe: str | os.PathLike | Recipe | None = None,
    weights: str | os.PathLike | None = None,
    router: str | os.PathLike | None = None,
    ratios: list[float] | None = None,
    dense: bool = True,
    onnx: str | os.PathLike | None = None,
    backend: str = "auto",
    dtype: str = "fp32",
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    text_len: int | None = None,
    cfg: bool | None = None,
    opset: int | None = None,
    dynamic_batch: bool = False,
    batch_range: tuple[int, int, int] | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace_bytes: int | None = None,
    optimization_level: int | None = None,
    aot_targets: list[str] | None = None,
    strip_weights: bool = False,
    segments: int | None = None,
    out_dir: str | os.PathLike = "engines",
    force: bool = False,
    validate: bool = True,
    progress: Callable[[str], None] | None = None,
    context: str | None = None,
    sizes: list[str] | None = None,
    phases: bool | Sequence[str] = False,
    loras=None,
    controlnet_layers: int = 0,
) -> list[EngineBuild]:
    """Builds one engine per budget (and the dense reference) with a shared timing cache.

    Args:
        model (str): Built-in model name. Defaults to ``sd35``.
        recipe (PathLike | Recipe): Recipe overriding the built-in one. Defaults to None.
        weights (PathLike): Local diffusers folder. Defaults to None.
        router (PathLike): Router safetensors. Defaults to the recipe's, else seeded random.
        ratios (list[float]): Fractions of image tokens pruned, each in [0, 1); 0 means the dense
            reference. Defaults to the recipe's ratios.
        dense (bool): Also build the dense reference (ratio 0). Defaults to True.
        onnx (PathLike): Build this existing export instead of exporting (one engine). Defaults to None.
        backend (str): ``auto``, ``tensorrt`` or ``tensorrt-rtx``. Defaults to ``auto``.
        dtype (str): Export dtype; engines are strongly typed, so precision comes from the ONNX. Defaults to ``fp32``.
        height, width, batch, text_len, cfg: Shapes (default: the recipe's).
        opset (int): ONNX opset. Defaults to the recipe's.
        dynamic_batch (bool): Export a symbolic batch and build with an optimization profile. Defaults to False.
        batch_range (tuple): (min, opt, max) prompts for the profile when ``dynamic_batch``. Defaults to (1, batch, 4*batch).
        timing_cache (PathLike): Timing cache shared by all budgets of this call. Defaults to None.
        workspace_bytes (int): Builder workspace limit. Defaults to the backend's.
        optimization_level (int): Builder optimization level 0-5. Defaults to the backend's (3).
        aot_targets (list[str]): TensorRT-RTX AOT compute capabilities (e.g. ``["8.9"]``). Defaults to RTX's portable set.
        strip_weights (bool): Weight-stripped, refittable engines (``STRIP_PLAN``): the plan holds no weights and
            is refit from its ONNX when loaded; for models too large to hold the plan. Defaults to False.
        segments (int): Build each budget as a chain of this many segment engines, cut at block boundaries with
            equal weight bytes (:mod:`shiva_export.engines.chain`): the builder's peak memory is that of one
            segment. Fixed shapes only. Defaults to None: reuse the budget's cached engine or chain, and build one
            engine when neither is cached.
        out_dir (PathLike): Root folder. Defaults to ``engines``.
        force (bool): Rebuild even when the cache matches. Defaults to False.
        validate (bool): ONNX Runtime parity after each new export. Defaults to True.
        progress (Callable[[str], None]): Stage callback. Defaults to None.
        context (str): ``"drop"`` or ``"keep"`` for the pruned budgets (``ShivaConfig.context``); their folders get a
            ``-context-keep`` suffix. Defaults to the recipe's ``[prune] context``.
        sizes (list[str]): Resolution buckets ``WIDTHxHEIGHT``: every budget is built once per size, in
            ``<out_dir>/<model>/<W>x<H>/``. Defaults to the recipe's ``[[buckets]]``, else one size (``height``/``width``
            or ``[shapes]``) without a size folder.
        phases (bool | list[str]): Build the recipe's learned ``[[schedule.phases]]`` (all, or these names) instead of
            ratios: one engine per phase in ``phase-<name>/<dtype>/``, the layout ``generate --backend trt --phases``
            reads. Defaults to False.
        loras (Sequence[LoraSpec]): LoRAs fused at their scales before export (``shiva_export.export.lora``); in the
            export key, so a changed file or scale rebuilds (or, for ``strip_weights`` engines, refits). Defaults to None.
        controlnet_layers (int): Engines that also take this many ControlNet block residuals (SD3). Defaults to 0.
    """
    say = progress or (lambda stage: None)
    _check_engine_options(timing_cache, dtype, onnx, segments, dynamic_batch, strip_weights, controlnet_layers)
    if onnx is not None and (sizes or phases):
        raise ConfigError(
            "--onnx builds that one graph at its own size and budget; drop --size/--phases, or drop --onnx to export them."
        )
    be = resolve_backend(backend)  # a missing module fails here, before any export (exit code 4)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe if recipe is not None else (model or "sd35"))
    adapter = adapter_for_architecture(rec.architecture)
    context = adapter.check_context(rec.prune.context if context is None else context)
    if onnx is not None:
        return [
            _build_existing(
                Path(onnx),
                be,
                rec,
                out_dir,
                timing_cache,
                workspace_bytes,
                optimization_level,
                aot_targets,
                batch_range,
                say,
                strip_weights,
                segments or 1,
            )
        ]
    buckets = bucket_sizes(rec, sizes, height, width)
    phase_rows = _phase_rows(rec, phases, ratios)
    todo = [] if phase_rows else _budget_ratios(rec, ratios, dense)
    opset_used = opset if opset is not None else rec.export.opset
    options = _build_options(
        dynamic_batch, batch_range, workspace_bytes, optimization_level, aot_targets, strip_weights, segments, loras
    )
    settings = _Settings(
        rec, weights, router, dtype, opset_used, dynamic_batch, options, be, force, validate, timing_cache,
        workspace_bytes, optimization_level, aot_targets, batch_range, say, segments is None, loras, controlnet_layers,
    )  # fmt: skip
    results: list[EngineBuild] = []
    for w_h in buckets or [None]:
        bucket = bucket_name(*w_h) if w_h else None
        h_w = (w_h[1], w_h[0]) if w_h else (height or rec.shapes.height, width or rec.shapes.width)
        shapes_spec = _shapes_spec(rec, *h_w, batch, text_len, cfg)
        root = Path(out_dir) / rec.name / (bucket or "")
        for job in phase_rows or _deduplicated(rec, todo, shapes_spec, weights, bucket, say):
            ctx = "drop" if job == 0.0 else context  # the dense reference routes nothing
            d = root / (budget_dir(job, ctx) if isinstance(job, (int, float)) else phase_dir(job.name, ctx)) / dtype
            with folder_lock(d, "engine folder"):
                b = _build_budget(job, d, shapes_spec, ctx, settings)
            b.bucket = bucket
            results.append(b)
    return results


def _shapes_spec(rec: Recipe, height: int, width: int, batch, text_len, cfg) -> dict[str, Any]:
    """The export key's shapes of one size: the recipe's where not given."""
    return {
        "height": height,
        "width": width,
        "batch": batch or rec.shapes.batch,
        "text_len": text_len or rec.shapes.text_len,
        "cfg": rec.shapes.cfg if cfg is None else cfg,
    }


@dataclass(frozen=True)
class _Settings:
    """What every budget of one :func:`build_engines` call shares."""

    rec: Recipe
    weights: Any
    router: Any
    dtype: str
    opset: int
    dynamic_batch: bool
    options: dict[str, Any]  # the manifest's build options
    be: Backend
    force: bool
    validate: bool
    timing_cache: Any
    workspace_bytes: int | None
    optimization_level: int | None
    aot_targets: list[str] | None
    batch_range: tuple[int, int, int] | None
    say: Callable[[str], None]
    any_layout: bool  # no --segments: a cached chain is reused as readily as a cached engine
    loras: Any
    controlnet_layers: int


def _build_options(
    dynamic_batch, batch_range, workspace_bytes, optimization_level, aot_targets, strip_weights, segments, loras=None
) -> dict[str, Any]:
    """The builder settings a cached engine must match (recorded in its manifest)."""
    options = {
        "dynamic_batch": dynamic_batch,
        "batch_range": list(batch_range) if batch_range else None,
        "workspace_bytes": workspace_bytes,
        "optimization_level": optimization_level,
        "aot_targets": list(aot_targets) if aot_targets else None,
        "strip_weights": strip_weights,
        **refit_option(strip_weights, loras),  # LoRA engines that are stripped refit on a LoRA change
    }
    if (segments or 1) > 1:
        options["segments"] = segments
    return options


def _deduplicated(
    rec: Recipe, todo: list[float], shapes_spec: dict[str, Any], weights, bucket: str | None, say
) -> list[float]:
    """The ratios of one size that give distinct k per block (N, and so k, differs per bucket)."""
    kept, same = unique_budgets(rec, todo, shapes_spec["height"], shapes_spec["width"], weights)
    where = f" at {bucket}" if bucket else ""
    for r, first in same.items():
        say(f"ratio {r:g} keeps the same k per block as ratio {first:g}{where}: one budget, built once")
    return kept


def _phase_rows(rec: Recipe, phases: bool | Sequence[str], ratios: list[float] | None) -> list:
    """The recipe's ``[[schedule.phases]]`` rows to build (all, or the named ones); [] without ``phases``."""
    if not phases:
        return []
    if ratios:
        raise ConfigError("give --ratio or --phases, not both (a learned schedule brings its own keep ratios).")
    rows = list(rec.schedule.phases) if rec.schedule else []
    if not rows:
        raise ConfigError(
            f"recipe {rec.name!r} has no [[schedule.phases]]; train a schedule with `shiva-export train`, or build --ratio engines."
        )
    if phases is True:
        return rows
    names = [r.name for r in rows]
    missing = [p for p in phases if p not in names]
    if missing:
        raise ConfigError(f"phase {missing[0]!r} is not in recipe {rec.name!r}; choose from {', '.join(names)}.")
    return [r for r in rows if r.name in phases]


def _check_engine_options(
    timing_cache, dtype: str, onnx, segments, dynamic_batch: bool, strip_weights: bool, controlnet_layers: int = 0
) -> None:
    """Refuses bad or contradictory settings before the backend loads and before minutes of export."""
    check_timing_cache_path(timing_cache)  # before minutes of export: never overwrite a file that is not a timing cache
    if dtype == "bf16" and onnx is None:
        raise ConfigError(
            "--dtype bf16 cannot be exported: ONNX (opset <= 22) has no bfloat16 Conv or Einsum, which the patch embedding and "
            "unpatchify use. Build --dtype fp16 (engines are strongly typed, so the ONNX dtype is the engine's)."
        )

    if segments is not None and (not isinstance(segments, int) or not 1 <= segments <= MAX_SEGMENTS):
        raise ConfigError(f"--segments {segments!r} is out of range; expected 1..{MAX_SEGMENTS} (1 = one engine).")
    if (segments or 1) > 1 and (dynamic_batch or strip_weights):
        raise ConfigError(
            f"--segments {segments} needs fixed shapes and full plans; drop {'--dynamic-batch' if dynamic_batch else '--strip-weights'}."
        )
    if (segments or 1) > 1 and controlnet_layers:
        raise ConfigError(
            f"--segments {segments} cuts the graph at block boundaries, and the ControlNet residual inputs are not cut with it; drop --segments or --controlnet."
        )


def _budget_ratios(rec: Recipe, ratios: list[float] | None, dense: bool) -> list[float]:
    """The ratios to build, ascending: the given ones (else the recipe's), with the dense reference 0 added or removed."""
    todo = list(ratios) if ratios else list(rec.prune.ratios)
    for r in todo:
        if not 0.0 <= r < 1.0:
            raise ConfigError(
                f"--ratio {r} is out of range; expected 0 <= ratio < 1 (fraction of image tokens pruned; 0 = dense reference)."
            )
    if dense and 0.0 not in todo:
        todo = [0.0, *todo]
    if not dense:
        todo = [r for r in todo if r != 0.0]
    if not todo:
        raise ConfigError("nothing to build: give at least one --ratio above 0, or drop --no-dense.")
    return sorted(set(todo))


def _build_budget(job, d: Path, shapes_spec: dict[str, Any], context: str, s: _Settings) -> EngineBuild:
    """One budget folder (the caller holds its lock): ``job`` is a ratio (0 = the dense reference) or a learned phase's
    ``[[schedule.phases]]`` row. With ``s.any_layout`` (no --segments given), a cached chain is reused as readily as a
    cached engine."""
    phase = None if isinstance(job, (int, float)) else job
    r = None if phase is not None else float(job)
    is_dense = r == 0.0
    segments = int(s.options.get("segments", 1))
    onnx_path, plan = d / "model.onnx", d / ("model.plan" if segments == 1 else CHAIN_FILE)
    mpath = manifest_path_for(plan)
    key = export_key_for(
        s.rec, s.weights, s.router, r, is_dense, shapes_spec, s.dtype, s.opset, s.dynamic_batch, context, s.loras,
        s.controlnet_layers,
    )  # fmt: skip
    if phase is not None:  # the phase's own schedule and timestep range decide its graph
        key["phase"] = phase.model_dump(mode="json")
    label = ("dense" if is_dense else f"phase {phase.name}" if phase else f"ratio {r:g}") + (
        "" if context == "drop" else f" (context {context})"
    )
    if not s.force:
        cached = _cached_build(d, plan, onnx_path, mpath, key, s.options, s.be, s.any_layout and segments == 1)
        if cached is not None:
            s.say(f"{label}: cached ({cached.plan_path})")
            cached.phase, cached.ratio = (phase.name, cached.ratio) if phase else (None, r)
            return cached

    to_refit = None if s.force else refittable_manifest(mpath, plan, key, s.options, s.be)
    s.say(
        f"{label}: export onnx"
        + (" (LoRA changed: the weight-stripped engine is refit, not rebuilt)" if to_refit else "")
    )
    ex = _export_budget(s, phase, r, is_dense, shapes_spec, onnx_path, key, context, label)
    if to_refit is not None:
        return _refit_budget(
            to_refit, ex.ratio, is_dense, d, plan, onnx_path, mpath, key, ex, s.be, phase.name if phase else None
        )
    return _build_and_record(s, ex, d, onnx_path, plan, mpath, key, segments, is_dense, label, phase)


def _export_budget(s: _Settings, phase, r, is_dense: bool, shapes_spec, onnx_path: Path, key, context: str, label: str):
    """The budget's ONNX, its export key in the metadata; a failed ONNX Runtime parity stops it before any build."""
    ex = export_pruned(
        recipe=s.rec,
        weights=s.weights,
        router=s.router,
        **({"phase": phase.name} if phase else {"ratio": r, "dense": is_dense}),
        height=shapes_spec["height"],
        width=shapes_spec["width"],
        batch=shapes_spec["batch"],
        text_len=shapes_spec["text_len"],
        cfg=shapes_spec["cfg"],
        dtype=s.dtype,
        opset=s.opset,
        out=onnx_path,
        dynamic_batch=s.dynamic_batch,
        validate=s.validate,
        extra_metadata={"export_key": key},
        context=None if is_dense else context,
        loras=s.loras,
        controlnet_layers=s.controlnet_layers,
    )
    if ex.parity is not None and ex.parity.status == "failed":
        raise ParityError(
            f"{label}: ONNX Runtime parity failed before the engine build: {ex.parity.reason}", report=ex.parity
        )
    return ex


def _build_and_record(
    s: _Settings, ex, d: Path, onnx_path: Path, plan: Path, mpath: Path, key, segments: int, is_dense, label, phase
) -> EngineBuild:
    """Pre-flights and builds the exported budget, then writes its manifest (after the plan)."""
    profile = _profile(ex.export.input_shapes, ex.spec, s.batch_range) if s.dynamic_batch else None
    s.say(f"{label}: preflight + build ({s.be.name} {s.be.version})")
    exd = ex.to_dict()
    fields = dict(
        model_name=s.rec.name,
        model_config_hash=ex.export.metadata["shiva.model_config_sha256"],
        dtype=s.dtype,
        recipe_sha256=exd["recipe_sha256"],
        router_sha256=ex.router.get("tensor_sha256"),
        ratio=ex.ratio,
        keep_ratio=1.0 - ex.ratio,
        per_block_k={str(b): k for b, k in ex.budgets.items()},
        dense=is_dense,
        export_key=key,
    )
    options = s.options
    res, check = _build_plan(
        onnx_path,
        d,
        s.be,
        segments,
        fields,
        s.say,
        workspace_bytes=s.workspace_bytes,
        timing_cache_path=s.timing_cache,
        profile=profile,
        builder_optimization_level=s.optimization_level,
        compute_capabilities=s.aot_targets,
        strip_weights=bool(options.get("strip_weights")),
        **({"refit_any": True} if options.get("refit") else {}),
    )
    if res.weights_stripped:  # the refit at load must see these exact weights (REFIT_IDENTICAL)
        options = {**options, "refit_weights": _refit_weights(onnx_path, ex.export.data_sha256)}
    manifest = EngineManifest.from_build(
        res,
        onnx_sha256=ex.export.onnx_sha256,
        # static shapes, or the profile's opt batch in place of the symbolic batch axis
        input_shapes={
            k: [ex.spec.model_batch if isinstance(x, str) else int(x) for x in v]
            for k, v in ex.export.input_shapes.items()
        },
        onnx_path=onnx_path.name,
        build_options=options,
        deserialize={k: check.get(k) for k in ("deserialized", "reason")},
        **fields,
    )
    write_manifest(mpath, manifest)
    return EngineBuild(
        ex.ratio,
        is_dense,
        "built",
        d,
        plan,
        onnx_path,
        mpath,
        manifest.per_block_k,
        res.build_seconds,
        ex.export.export_seconds,
        res.size_bytes,
        ex.parity.summary_line() if ex.parity is not None else None,
        manifest.deserialize,
        phase=phase.name if phase else None,
    )


def _refit_budget(m, r, is_dense, d, plan, onnx_path, mpath, key, ex, be, phase: str | None = None) -> EngineBuild:
    """The plan stays; the manifest now names the re-exported ONNX as its refit source (``engines/lora_refit.py``)."""
    manifest = refit_manifest(
        m, key, ex.export.onnx_sha256, _refit_weights(onnx_path, ex.export.data_sha256), ex.router.get("tensor_sha256")
    )
    write_manifest(mpath, manifest)
    try:
        check = check_refit(d, be.name)
    except Exception:  # any refit failure: the old manifest no longer matches the new ONNX, so the next run rebuilds
        write_manifest(mpath, m)
        raise
    return EngineBuild(
        r,
        is_dense,
        "refit",
        d,
        plan,
        onnx_path,
        mpath,
        manifest.per_block_k,
        None,
        ex.export.export_seconds,
        _engine_bytes(plan),
        ex.parity.summary_line() if ex.parity is not None else None,
        {**(manifest.deserialize or {}), **check},
        phase=phase,
    )


def _cached_build(
    d: Path,
    plan: Path,
    onnx_path: Path,
    mpath: Path,
    key: dict[str, Any],
    options: dict[str, Any],
    be: Backend,
    chain_too: bool,
) -> EngineBuild | None:
    """The folder's engine (or, with ``chain_too``, its segment chain) when its manifest matches this build; else None."""
    tries = [(plan, options)]
    if chain_too and (d / CHAIN_FILE).is_file():
        try:
            n = int((read_manifest(mpath).build_options or {}).get("segments", 0))
        except (ManifestError, TypeError, ValueError):
            n = 0
        if n > 1:
            tries.insert(0, (d / CHAIN_FILE, {**options, "segments": n}))
    for cand, opts in tries:
        m = _cached(mpath, cand, onnx_path, key, opts, be)
        if m is not None:
            return EngineBuild(
                m.ratio,
                bool(m.dense),
                "cached",
                d,
                cand,
                onnx_path,
                mpath,
                m.per_block_k,
                m.build_seconds,
                None,
                _engine_bytes(cand),
                None,
                m.deserialize,
            )
    return None


def _build_plan(
    onnx_path: Path, d: Path, be: Backend, segments: int, fields: dict[str, Any], say, **build_kwargs
) -> tuple[Any, dict[str, Any]]:
    """One engine (``d/model.plan``) or, with ``segments`` > 1, a chain of segment engines (``d/segments.json``);
    with the post-build deserialization check."""
    if segments > 1:
        res = build_chain(onnx_path, d, segments, backend=be, manifest_fields=fields, say=say, **build_kwargs)
        return res, chain_deserialize_check(res.plan_path, be)
    res = build_engine(onnx_path, d / "model.plan", backend=be, **build_kwargs)
    clear_other_layout(d, "plan")
    return res, deserialize_check(res.plan_path, be)


def _profile(input_shapes: dict[str, list], spec, batch_range) -> dict[str, tuple[list[int], list[int], list[int]]]:
    per_prompt = 2 if spec.cfg else 1
    lo, opt, hi = batch_range or (1, spec.batch, max(4 * spec.batch, 2))
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"batch profile {lo}/{opt}/{hi} is invalid; expected 1 <= min <= opt <= max (prompts).")
    prof = {}
    for name, shape in input_shapes.items():
        rest = [int(x) for x in shape[1:]]
        prof[name] = tuple([b * per_prompt, *rest] for b in (lo, opt, hi))
    return prof


def _refit_weights(onnx_path: Path, data_sha256: str | None = None) -> dict[str, Any]:
    """What a weight-stripped engine must be refit from: the ONNX and its external-data file (name, sha256)."""
    data = onnx_path.parent / (onnx_path.name + ".data")
    if not data.is_file():
        return {"onnx_sha256": sha256_file_cached(onnx_path), "data": None, "data_sha256": None}
    return {
        "onnx_sha256": sha256_file_cached(onnx_path),
        "data": data.name,
        "data_sha256": data_sha256 or sha256_file_cached(data),
    }


def _build_existing(
    onnx_path: Path,
    be: Backend,
    rec: Recipe,
    out_dir,
    timing_cache,
    workspace_bytes,
    optimization_level,
    aot_targets,
    batch_range,
    say,
    strip_weights: bool = False,
    segments: int = 1,
) -> EngineBuild:
    """``--onnx``: build an existing export; its shiva.* metadata fills the manifest."""
    m = load_onnx_graph(onnx_path, "--onnx")
    meta = read_shiva_metadata(onnx_path)

    def get(k, default=None):
        v = meta.get(k)
        return default if v is None else v

    if "model" not in meta or "input_spec" not in meta:
        raise ConfigError(
            f"--onnx {onnx_path} carries no shiva.* metadata, so it was not written by `shiva-export onnx`; "
            "export the model with `shiva-export onnx` (or `trt --model`) instead of passing a foreign ONNX."
        )

    try:
        ratio = float(get("ratio", 0.0))
    except (TypeError, ValueError):
        raise ConfigError(
            f"--onnx {onnx_path}: shiva.ratio {meta.get('ratio')!r} is not a number; re-export it with `shiva-export onnx`."
        ) from None
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(
            f"--onnx {onnx_path}: shiva.ratio {ratio} is out of range [0, 1); re-export it with `shiva-export onnx`."
        )
    dtype = get("dtype", "fp32")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(
            f"--onnx {onnx_path}: shiva.dtype {dtype!r} is not fp32, fp16 or bf16; re-export it with `shiva-export onnx`."
        )
    model_name = safe_component(get("model", rec.name), f"--onnx {onnx_path}: shiva.model")
    ctx = "keep" if get("context") == "keep" else "drop"
    d = inside(out_dir, Path(out_dir) / model_name / budget_dir(ratio, ctx) / dtype, "engine folder")
    shapes = {}
    dynamic = False
    for i in m.graph.input:
        dims = [x.dim_value if x.HasField("dim_value") else -1 for x in i.type.tensor_type.shape.dim]
        dynamic |= -1 in dims
        shapes[i.name] = dims
    profile = None
    if dynamic:
        lo, opt, hi = batch_range or (1, 1, 4)
        profile = {n: tuple([b if x == -1 else x for x in s] for b in (lo, opt, hi)) for n, s in shapes.items()}
    say(f"ratio {ratio:g}: preflight + build ({be.name} {be.version}) from {onnx_path}")
    fields = dict(
        model_name=model_name,
        model_config_hash=get("model_config_sha256", "unknown"),
        dtype=dtype,
        recipe_sha256=get("recipe_sha256"),
        router_sha256=get("router_sha256"),
        ratio=ratio,
        keep_ratio=1.0 - ratio,
        per_block_k={str(k): int(v) for k, v in (get("k_per_block", {}) or {}).items()},
        dense=bool(get("dense", False)),
        export_key=get("export_key"),
    )
    with folder_lock(d, "engine folder"):
        res, check = _build_plan(
            onnx_path,
            d,
            be,
            segments,
            fields,
            say,
            workspace_bytes=workspace_bytes,
            timing_cache_path=timing_cache,
            profile=profile,
            builder_optimization_level=optimization_level,
            compute_capabilities=aot_targets,
            strip_weights=strip_weights,
        )
        plan = res.plan_path
        build_options = {
            "onnx": str(onnx_path.resolve()),
            "profile": {k: [list(x) for x in v] for k, v in profile.items()} if profile else None,
            "strip_weights": strip_weights,
        }
        if segments > 1:
            build_options["segments"] = segments
        if res.weights_stripped:
            build_options["refit_weights"] = _refit_weights(onnx_path)
        manifest = EngineManifest.from_build(
            res,
            input_shapes={k: [max(x, 1) for x in v] for k, v in shapes.items()},
            onnx_path=str(onnx_path.resolve()),
            build_options=build_options,
            deserialize={k: check.get(k) for k in ("deserialized", "reason")},
            **fields,
        )
        mpath = write_manifest(manifest_path_for(plan), manifest)
    return EngineBuild(
        ratio,
        manifest.dense,
        "built",
        d,
        plan,
        onnx_path,
        mpath,
        manifest.per_block_k,
        res.build_seconds,
        None,
        res.size_bytes,
        None,
        manifest.deserialize,
    )
