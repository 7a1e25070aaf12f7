"""One call from a model name (or recipe/weights) to a pruned, exported and parity-checked ONNX.

:func:`export_pruned` is what ``shiva-export onnx`` runs; the CLI only parses flags and prints.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, OutputPathError, RouterError
from shiva_export.export import controlnet as cn
from shiva_export.export.buckets import bucket_name
from shiva_export.export.graph_cache import export_key_for, trace_cache_enabled
from shiva_export.export.lazy import fake_placeholders_, lazy_transformer, materialize_
from shiva_export.export.lora import fuse_loras_
from shiva_export.export.onnx import ExportResult, export_onnx, package_versions
from shiva_export.export.parity import ParityReport, check_parity
from shiva_export.logging import get_logger
from shiva_export.models import (
    InputSpec,
    adapter_for_architecture,
    check_image_size,
    load_transformer,
    make_inputs,
    num_blocks,
    num_image_tokens,
    router_dims,
    torch_dtype,
)
from shiva_export.prune.api import ShivaConfig, apply_shiva_, block_budgets
from shiva_export.prune.router import RouterBank, load_routers
from shiva_export.prune.schedule import budget_label
from shiva_export.recipe import Recipe, load_recipe, recipe_hash
from shiva_export.utils.io import canonical_json, check_writable, sha256_bytes

__all__ = [
    "export_pruned",
    "PrunedExport",
    "default_onnx_path",
    "budget_label",
    "budget_dir",
    "phase_dir",
    "model_config_hash",
    "router_tensor_hash",
    "resolve_router",
]

logger = get_logger(__name__)
_RETRACING = contextvars.ContextVar("shiva_export_retracing", default=False)  # export_pruned's one fresh trace


def default_onnx_path(
    model_name: str,
    ratio: float,
    dtype: str,
    root: str | os.PathLike = "engines",
    context: str = "drop",
    bucket: str | None = None,
) -> Path:
    """``<root>/<model>[/<W>x<H>]/ratio<r>[-context-keep]/<dtype>/model.onnx``: a context-keep graph never lands on a drop
    graph's path, and a resolution bucket (:mod:`shiva_export.export.buckets`) has its own folder."""
    return Path(root) / model_name / (bucket or "") / budget_dir(ratio, context) / dtype / "model.onnx"


def phase_dir(phase: str, context: str = "drop") -> str:
    """Folder name of a learned phase's graph: ``phase-<name>``, plus ``-context-keep`` for a context-keep graph."""
    return f"phase-{phase}" + ("" if context == "drop" else f"-context-{context}")


def budget_dir(ratio: float, context: str = "drop") -> str:
    """Folder name of a budget: :func:`budget_label`, plus ``-context-keep`` for a context-keep graph."""
    return budget_label(ratio) + ("" if context == "drop" else f"-context-{context}")


def _refuse_engine_onnx(path: Path) -> None:
    """The default ONNX path is inside an engine folder of `shiva-export trt`: never overwrite an engine's ONNX."""
    if (path.parent / "manifest.json").exists():
        raise OutputPathError(
            f"the default output {path} belongs to the engine built there ({path.parent / 'manifest.json'}); "
            "overwriting it would orphan that engine. Pass --out PATH, or rebuild the engine with `shiva-export trt`."
        )


def model_config_hash(transformer) -> str:
    cfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    return sha256_bytes(canonical_json(cfg).encode())


def router_tensor_hash(bank: RouterBank) -> str:
    """sha256 over the router tensors (sorted names + float32 bytes): identifies random routers too."""
    h = hashlib.sha256()
    for name, t in sorted(bank.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_router(
    recipe: Recipe, router_path: str | os.PathLike | None, rc
) -> tuple[RouterBank | None, dict[str, Any]]:
    """Router bank from ``--router``, else the recipe's trained weights, else None (seeded random)."""
    path = Path(router_path) if router_path else recipe.router_weights_path()
    if path is None:
        return None, {"source": f"random (seed {recipe.router.seed})", "file_sha256": None}
    bank, sha = load_routers(path, rc)
    if router_path is None and recipe.router.sha256 and recipe.router.sha256 != sha:
        raise RouterError(
            f"{recipe.source_path}: router.weights {path} has sha256 {sha[:12]}..., recipe expects {recipe.router.sha256[:12]}...; "
            "re-run training or fix router.sha256."
        )
    return bank, {"source": str(path), "file_sha256": sha}


@dataclass
class PrunedExport:
    """Result of :func:`export_pruned`."""

    recipe: Recipe
    ratio: float
    config: ShivaConfig
    spec: InputSpec
    num_image_tokens: int
    budgets: dict[int, int]
    export: ExportResult
    router: dict[str, Any]
    parity: ParityReport | None
    load_seconds: float
    dense: bool = False
    loras: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        ex = self.export
        interesting = (
            "TopK",
            "GatherElements",
            "GatherND",
            "ScatterElements",
            "ScatterND",
            "CumSum",
            "MatMul",
            "Softmax",
            "NonZero",
        )
        return {
            "model": self.recipe.name,
            "recipe": str(self.recipe.source_path),
            "recipe_sha256": recipe_hash(self.recipe),
            "ratio": self.ratio,
            "keep_ratio": 1.0 - self.ratio,
            "dense": self.dense,
            "context": None if self.dense else self.config.context,
            "num_image_tokens": self.num_image_tokens,
            "k_per_block": {str(b): k for b, k in self.budgets.items()},
            "shapes": ex.input_shapes,
            "output_shape": ex.output_shape,
            "cfg": self.spec.cfg,
            "dtype": ex.dtype,
            "opset": ex.opset,
            "dynamic_batch": ex.dynamic_batch,
            "onnx": str(ex.onnx_path),
            "onnx_sha256": ex.onnx_sha256,
            "onnx_bytes": ex.onnx_bytes,
            "external_data": str(ex.data_path) if ex.data_path else None,
            "external_data_bytes": ex.data_bytes,
            "op_counts": {op: ex.op_counts.get(op, 0) for op in interesting},
            "num_nodes": ex.num_nodes,
            "router": self.router,
            "loras": self.loras,
            "load_seconds": round(self.load_seconds, 3),
            "export_seconds": round(ex.export_seconds, 3),
            "trace_cached": ex.trace_cached,
            "parity": self.parity.to_dict() if self.parity is not None else None,
            "versions": package_versions(),
        }


def export_pruned(
    *,
    model: str | None = None,
    recipe: str | os.PathLike | Recipe | None = None,
    weights: str | os.PathLike | None = None,
    ratio: float | None = None,
    keep_ratios: list[float | None] | None = None,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    text_len: int | None = None,
    cfg: bool | None = None,
    dtype: str = "fp32",
    opset: int | None = None,
    out: str | os.PathLike | None = None,
    router: str | os.PathLike | None = None,
    dynamic_batch: bool = False,
    validate: bool = True,
    parity_cases: int = 3,
    dense: bool = False,
    phase: str | int | None = None,
    debug_outputs: bool = False,
    extra_metadata: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    bounded: bool | None = None,
    context: str | None = None,
    bucket: bool = False,
    loras=None,
    controlnet_layers: int = 0,
    trace_cache: bool = True,
) -> PrunedExport:
    """Loads, prunes, exports and (by default) checks ONNX Runtime parity.

    Args:
        model (str): Built-in model name (``sd35``, ``sd35-tiny``, ...). Defaults to ``sd35``.
        recipe (PathLike | Recipe): Recipe overriding the model's built-in one. Defaults to None.
        weights (PathLike): Local diffusers folder for the transformer weights. Defaults to None.
        ratio (float): Fraction of image tokens pruned in every routed block, in [0, 1). Defaults to the
            recipe's first ratio. Mutually exclusive with ``keep_ratios``.
        keep_ratios (list): Per-block keep schedule (``None`` = dense block). Defaults to None.
        height, width (int): Image size in pixels. Default to the recipe's shapes.
        batch (int): Prompts per call (CFG doubles the model batch). Defaults to the recipe's.
        text_len (int): Text tokens. Defaults to the recipe's.
        cfg (bool): Batch holds uncond/cond halves sharing kept indices. Defaults to the recipe's.
        dtype (str): ``fp32``, ``fp16`` or ``bf16``. Defaults to ``fp32``.
        opset (int): ONNX opset. Defaults to the recipe's (20).
        out (PathLike): ONNX path. Defaults to ``engines/<model>/ratio<r>/<dtype>/model.onnx``.
        router (PathLike): Router safetensors. Defaults to the recipe's, else a seeded random router.
        dynamic_batch (bool): Symbolic batch axis. Defaults to False.
        validate (bool): Run ONNX Runtime parity after export. Defaults to True.
        parity_cases (int): Seeded input cases for parity (1..8; case 2 uses t=1, case 3 t=999). Defaults to 3.
        phase (str | int): Export a learned phase's per-block schedule from the recipe's
            ``[[schedule.phases]]`` (name or index) instead of a uniform ratio. Defaults to None.
        dense (bool): Export the plain dense model (no router, no top-k): the reference engine. Needs
            ``ratio`` 0 or None. Defaults to False.
        debug_outputs (bool): Add ``kept_indices.<block>`` outputs to the graph. Defaults to False.
        extra_metadata (dict): More ``shiva.*`` metadata for the ONNX (e.g. the engine cache's export key).
        progress (Callable[[str], None]): Called with a stage name when each stage starts. Defaults to None.
        bounded (bool): Bounded-memory export (``shiva_export.export.lazy``): the model is traced with fake
            weights and each weight is made (seeded) or read (memory-mapped safetensors), cast, written and
            freed in turn, so peak memory stays below the bytes written instead of 4x; same graph and bytes.
            True requires it, False loads eagerly. Defaults to None: bounded wherever the weights can be read
            lazily (embedded models, diffusers folders with plain safetensors), eager otherwise.
        context (str): ``"drop"`` or ``"keep"`` (``ShivaConfig.context``: rejected tokens still give keys and values;
            SD3/SD3.5 only). Defaults to the recipe's ``[prune] context``.
        bucket (bool): The default ``out`` goes in the ``<width>x<height>`` folder of a resolution bucket. Defaults to False.
        loras (Sequence[LoraSpec]): LoRAs (:func:`shiva_export.export.lora.resolve_loras`) fused at their scales
            before pruning and export; recorded in ``shiva.loras``. Needs an eager load. Defaults to None.
        controlnet_layers (int): The graph also takes this many ControlNet block residuals
            (``controlnet_block_<i>``, SD3/SD3.5; :mod:`shiva_export.export.controlnet`). Defaults to 0.
        trace_cache (bool): Reuse the exporter's output for a graph already traced with the same key, after checking
            its content (:mod:`shiva_export.export.graph_cache`; ``SHIVA_ONNX_CACHE=0`` turns it off everywhere).
            Parity, when asked, still runs against the freshly loaded model. Defaults to True.
    """
    call = dict(locals())  # the arguments, for one fresh trace if a cached graph fails parity
    say = progress or (lambda stage: None)
    rec, context = _check_export_options(model, recipe, ratio, keep_ratios, phase, dense, context, dtype)
    spec = _input_spec(rec, batch, height, width, text_len, cfg)
    if not 1 <= parity_cases <= 8:
        raise ConfigError(f"parity_cases {parity_cases} is out of range; expected 1..8.")
    size_dir = bucket_name(spec.width, spec.height) if bucket else None
    out_path = _check_out(out, rec, phase, keep_ratios, dense, ratio, dtype, context, size_dir)
    _check_lora_controlnet(loras, controlnet_layers, dynamic_batch, bounded)
    trace_cache = trace_cache and trace_cache_enabled()  # a bad SHIVA_ONNX_CACHE is refused before anything loads

    say("load model")
    pm, export_model = _load_pruned(
        rec, spec, weights, bounded, loras, controlnet_layers, phase, ratio, keep_ratios, dense, context, router, dtype
    )
    if out_path is None:
        out_path = _default_out_path(rec, phase, pm.ratio_used, dtype, "drop" if dense else context, size_dir)
        _refuse_engine_onnx(out_path)
    lora_rows = [lo.to_dict() for lo in loras] if loras else None
    meta = _graph_metadata(rec, pm, phase, dense, spec, lora_rows, extra_metadata)
    say("export onnx")
    opset = opset if opset is not None else rec.export.opset
    key = _trace_key(rec, weights, router, pm, spec, dense, dtype, opset, dynamic_batch, loras) if trace_cache else None
    result = _export_graph(
        export_model, pm, rec, spec, out_path, dense, dtype, opset, dynamic_batch, meta, debug_outputs, key
    )
    if export_model is not pm.transformer:
        del export_model

    parity = None
    if validate:
        say("parity (onnxruntime cpu)")
        parity = _export_parity(
            result, pm.transformer, pm.lazy_weights, rec, spec, dtype, parity_cases, pm.n_tokens, pm.controlnet_layers
        )
    if parity is not None and parity.status == "failed" and result.trace_cached and not _RETRACING.get():
        logger.warning("the cached trace %s failed parity; removed, tracing afresh", result.trace_entry)
        shutil.rmtree(result.trace_entry, ignore_errors=True)
        token = _RETRACING.set(True)  # once: the fresh trace is stored in its place, and its parity stands
        try:
            return export_pruned(**call)
        finally:
            _RETRACING.reset(token)
    rows = (pm.ratio_used, pm.config, spec, pm.n_tokens, pm.budgets, result, pm.router_info, parity, pm.load_seconds)
    return PrunedExport(rec, *rows, dense, lora_rows)


@dataclass
class _Pruned:
    """The transformer of one export, loaded and pruned: what its graph is made from and checked against."""

    transformer: Any  # the reference in the loaded dtype (parity runs it)
    lazy_weights: Any  # makers of the real weights on the bounded-memory path, else None
    load_seconds: float
    config: ShivaConfig
    ratio_used: float
    budgets: dict[int, int]  # routed block -> k
    n_tokens: int
    router_info: dict[str, Any]
    controlnet_layers: int


def _load_pruned(
    rec: Recipe,
    spec: InputSpec,
    weights,
    bounded: bool | None,
    loras,
    controlnet_layers: int,
    phase,
    ratio,
    keep_ratios,
    dense: bool,
    context: str,
    router,
    dtype: str,
):
    """Loads the transformer (LoRAs fused) and prunes it with the budget asked for: (its state, the model to export:
    a copy in the export dtype, or the transformer itself)."""
    transformer, lazy_weights, load_seconds = _load_for_export(rec, weights, bounded, loras)
    check_image_size(transformer, spec.height, spec.width)
    n_layers = num_blocks(transformer)
    n_tokens = num_image_tokens(transformer, spec.height, spec.width)
    controlnet_layers = cn.check_controlnet_layers(transformer, controlnet_layers)
    routed = rec.routed_blocks(n_layers)
    if phase is not None:
        keep_ratios = rec.phase_keep_ratios(phase, n_layers)
    config, ratio_used = _prune_config(rec, n_layers, routed, ratio, keep_ratios, dense, spec.cfg, context)
    budgets = {} if dense else block_budgets(config, n_tokens)  # raises if a ratio leaves k = 0
    export_model, router_info = _prepare_models(transformer, rec, config, router, dtype, dense, lazy_weights)
    for m in {id(export_model): export_model, id(transformer): transformer}.values() if controlnet_layers else ():
        cn.add_residual_hook(
            m
        )  # controlnet_block_<i> kwargs -> block_controlnet_hidden_states (models local to this call)
    return _Pruned(
        transformer, lazy_weights, load_seconds, config, ratio_used, budgets, n_tokens, router_info, controlnet_layers
    ), export_model


def _export_graph(
    export_model,
    pm: _Pruned,
    rec: Recipe,
    spec: InputSpec,
    out_path: Path,
    dense: bool,
    dtype: str,
    opset,
    dynamic_batch: bool,
    meta: dict[str, Any],
    debug_outputs: bool,
    trace_key: dict[str, Any] | None,
) -> ExportResult:
    """The ONNX export of the pruned model (from its lazy weights on the bounded-memory path), ControlNet inputs included."""
    return export_onnx(
        export_model,
        out_path,
        spec,
        opset=opset,
        dtype=dtype,
        dynamic_batch=dynamic_batch,
        routed_blocks=None if dense else list(pm.config.routed_blocks),
        metadata=meta,
        debug_outputs=debug_outputs,
        weights=None if pm.lazy_weights is None else pm.lazy_weights.with_dtype(torch_dtype(dtype)),
        extra_inputs=cn.sample_inputs(
            export_model, spec.model_batch, pm.n_tokens, pm.controlnet_layers, dtype=torch_dtype(dtype)
        )
        or None,
        trace_key=trace_key,
    )


def _trace_key(rec: Recipe, weights, router, pm: _Pruned, spec: InputSpec, dense, dtype, opset, dynamic_batch, loras):
    """What determines this export's graph (:func:`~shiva_export.export.graph_cache.export_key_for` and the keep
    schedule), for the trace cache; None for hub-id weights, whose content is not known before loading."""
    key = export_key_for(
        rec,
        weights,
        router,
        pm.ratio_used,
        dense,
        spec.to_dict(),
        dtype,
        opset,
        dynamic_batch,
        "drop" if dense else pm.config.context,
        loras,
        pm.controlnet_layers,
    )
    if "hub" in key["weights"]:
        return None
    return key | {"keep_ratios": list(pm.config.keep_ratios), "routed_blocks": list(pm.config.routed_blocks)}


def _check_out(
    out, rec: Recipe, phase, keep_ratios, dense: bool, ratio, dtype: str, context: str, size_dir: str | None
) -> Path | None:
    """The given ``out`` path, checked writable; without one, refuses a default path that holds an engine's ONNX."""
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_writable(out_path, "ONNX output")  # fail before minutes of loading
    elif phase is None and keep_ratios is None:
        _refuse_engine_onnx(
            default_onnx_path(
                rec.name,
                0.0 if dense else (rec.prune.ratios[0] if ratio is None else ratio),
                dtype,
                context="drop" if dense else context,
                bucket=size_dir,
            )
        )
    return out_path


def _check_lora_controlnet(loras, controlnet_layers: int, dynamic_batch: bool, bounded: bool | None) -> None:
    """Refuses LoRA/ControlNet settings the export cannot honour, before anything loads."""
    if controlnet_layers and dynamic_batch:
        raise ConfigError("ControlNet residual inputs are exported with fixed shapes; drop --dynamic-batch.")
    if loras and bounded:
        raise ConfigError(
            "--lora is fused into the loaded weights, which a bounded-memory export never holds; drop --bounded (use --eager)."
        )


def _graph_metadata(rec, pm: _Pruned, phase, dense, spec, lora_rows, extra_metadata) -> dict[str, Any]:
    """The ``shiva.*`` metadata of a pruned graph: what it prunes, for which timesteps, with which router; the LoRAs fused
    into it, its ControlNet inputs and the caller's ``extra_metadata``."""
    config = pm.config
    n_layers = len(config.keep_ratios)
    return {
        "model": rec.name,
        "recipe_sha256": recipe_hash(rec),
        "model_config_sha256": model_config_hash(pm.transformer),
        "ratio": pm.ratio_used,
        **_phase_range(rec, phase),
        "dense": dense,
        "context": None if dense else config.context,
        "keep_ratios": [None] * n_layers if dense else list(config.keep_ratios),
        "k_per_block": {str(b): k for b, k in pm.budgets.items()},
        "num_image_tokens": pm.n_tokens,
        "router_sha256": pm.router_info["tensor_sha256"],
        "router_source": pm.router_info["source"],
        "cfg": spec.cfg,
        **({"loras": lora_rows} if lora_rows else {}),
        **({"controlnet_layers": pm.controlnet_layers} if pm.controlnet_layers else {}),
        **(extra_metadata or {}),
    }


def _check_export_options(model, recipe, ratio, keep_ratios, phase, dense, context, dtype):
    """Validates the flags before anything loads: returns the recipe and the checked context."""
    if recipe is None:
        rec = load_recipe(model or "sd35")
    elif isinstance(recipe, Recipe):
        rec = recipe
    else:
        rec = load_recipe(recipe)
    torch_dtype(dtype)  # validates the name early
    if dtype == "bf16":
        raise ConfigError(
            "--dtype bf16 cannot be exported: ONNX (opset <= 22) has no bfloat16 Conv or Einsum, which the patch embedding and "
            "unpatchify use, so the graph would be invalid. Export --dtype fp16 (TensorRT builds it strongly typed), or run bf16 "
            "in PyTorch with `shiva-export generate --backend torch --dtype bf16`."
        )
    if sum(x is not None for x in (ratio, keep_ratios, phase)) > 1:
        raise ConfigError("give one of --ratio, a keep schedule or --phase, not several.")
    if dense and (keep_ratios is not None or (ratio or 0.0) != 0.0):
        raise ConfigError(
            f"a dense export prunes nothing; got ratio {ratio}. Use ratio 0 (or omit it) with dense=True."
        )
    if ratio is not None and not (0.0 <= ratio < 1.0):
        raise ConfigError(
            f"--ratio {ratio} is out of range; expected 0 <= ratio < 1 (fraction of image tokens pruned; 0.4 keeps 60%)."
        )
    if dense and context == "keep":
        raise ConfigError("a dense export routes nothing, so --context keep has no effect; drop --context or --dense.")

    return rec, adapter_for_architecture(rec.architecture).check_context(
        rec.prune.context if context is None else context
    )


def _input_spec(rec: Recipe, batch, height, width, text_len, cfg) -> InputSpec:
    """The graph's static shapes: the recipe's, where not given."""
    return InputSpec(
        batch=batch if batch is not None else rec.shapes.batch,
        height=height if height is not None else rec.shapes.height,
        width=width if width is not None else rec.shapes.width,
        text_len=text_len if text_len is not None else rec.shapes.text_len,
        cfg=rec.shapes.cfg if cfg is None else cfg,
    )


def _load_for_export(rec: Recipe, weights, bounded: bool | None, loras=None):
    """The fp32 transformer, bounded (meta placeholders plus lazy weights) where possible, with ``loras`` fused (eager
    only: a bounded export never holds the weights): (transformer, lazy_weights, seconds)."""
    import time

    t0 = time.perf_counter()
    lazy_weights = None
    if bounded is not False and not loras:
        lazy = lazy_transformer(rec, weights)
        if lazy is None and bounded:
            raise ConfigError(
                f"bounded-memory export cannot read the weights of {rec.name!r} lazily (it needs an embedded model or a diffusers folder "
                "with diffusion_pytorch_model*.safetensors). Export it with --eager (bounded=False): the whole model is loaded."
            )
        if lazy is not None:
            transformer, lazy_weights = lazy
    if lazy_weights is None:
        transformer = load_transformer(recipe=rec, weights=weights, dtype="fp32")
    if loras:
        fuse_loras_(transformer, loras)  # before the dtype copy and routing: every copy carries the fused weights
    return transformer, lazy_weights, time.perf_counter() - t0


def _prune_config(
    rec: Recipe, n_layers: int, routed: list[int], ratio, keep_ratios, dense: bool, cfg: bool, context: str
) -> tuple[ShivaConfig, float]:
    """The ShivaConfig of a keep schedule or a uniform ratio, and the mean pruned fraction it stands for."""
    if keep_ratios is not None:
        config = ShivaConfig(
            tuple(keep_ratios),
            cfg=cfg,
            bottleneck=rec.router.bottleneck,
            group_size=rec.router.group_size,
            context=context,
        )
        if len(config.keep_ratios) != n_layers:
            raise ConfigError(
                f"keep schedule has {len(config.keep_ratios)} entries, the model has {n_layers} blocks; give one per block."
            )
        routed_keep = [r for r in config.keep_ratios if r is not None]
        return config, 1.0 - sum(routed_keep) / len(routed_keep)  # mean pruned fraction of the schedule
    ratio_used = 0.0 if dense else (rec.prune.ratios[0] if ratio is None else ratio)
    config = ShivaConfig.uniform(
        n_layers,
        ratio_used,
        routed,
        cfg=cfg,
        bottleneck=rec.router.bottleneck,
        group_size=rec.router.group_size,
        context=context,
    )
    return config, ratio_used


def _prepare_models(transformer, rec: Recipe, config: ShivaConfig, router, dtype: str, dense: bool, lazy_weights):
    """Applies Shiva to the fp32 reference and to the export-dtype copy: (export_model, router_info)."""
    rc = config.router_config(*router_dims(transformer))
    if dense:
        bank, router_info = None, {"source": "none (dense reference)", "file_sha256": None}
    else:
        bank, router_info = resolve_router(rec, router, rc)
    export_model = None
    if dtype != "fp32":
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # silence "modules that should be kept in float32: []"
        try:
            export_model = copy.deepcopy(transformer).to(torch_dtype(dtype))
        finally:
            dlogging.set_verbosity(level)
    if lazy_weights is not None:  # fake CPU tensors in place of the meta placeholders, before routers read the device
        fake_placeholders_(transformer, lazy_weights)
        if export_model is not None:
            fake_placeholders_(export_model, lazy_weights)
    if dense:
        router_info.update(tensor_sha256=None, num_routers=0, parameters=0)
    else:
        bank = apply_shiva_(transformer, config, routers=bank, seed=rec.router.seed)
        router_info.update(
            tensor_sha256=router_tensor_hash(bank), num_routers=rc.num_routers, parameters=bank.num_parameters()
        )
        if export_model is not None:
            apply_shiva_(export_model, config, routers=copy.deepcopy(bank))
    return (transformer if export_model is None else export_model), router_info


def _default_out_path(rec: Recipe, phase, ratio_used: float, dtype: str, ctx_used: str, size_dir: str | None) -> Path:
    """``engines/<model>[/<W>x<H>]/phase-<p>[-context-keep]/<dtype>/model.onnx`` for a phase, else :func:`default_onnx_path`."""
    if phase is not None:
        return Path("engines") / rec.name / (size_dir or "") / phase_dir(str(phase), ctx_used) / dtype / "model.onnx"
    return default_onnx_path(rec.name, ratio_used, dtype, context=ctx_used, bucket=size_dir)


def _phase_range(rec: Recipe, phase) -> dict[str, Any]:
    """The timestep range a graph serves: a learned phase's, else the whole trajectory."""
    if phase is None:
        return {"phase": None, "t_start": 1000.0, "t_stop": 0.0}
    ph_row = (
        rec.schedule.phases[[p.name for p in rec.schedule.phases].index(phase)]
        if not str(phase).isdigit()
        else rec.schedule.phases[int(phase)]
    )
    return {"phase": ph_row.name, "t_start": float(ph_row.t_start), "t_stop": float(ph_row.t_stop)}


def _export_parity(
    result: ExportResult,
    transformer,
    lazy_weights,
    rec: Recipe,
    spec: InputSpec,
    dtype: str,
    parity_cases: int,
    n_tokens: int = 0,
    controlnet_layers: int = 0,
) -> ParityReport:
    """ONNX Runtime against the fp32 PyTorch model on seeded cases (case 2 at t=1, case 3 at t=999), ControlNet
    residual inputs (seeded) included."""
    if lazy_weights is not None:  # the fp32 PyTorch reference needs real weights
        materialize_(transformer, lazy_weights)
    tol = rec.tolerance(dtype)
    timesteps = [None, 1.0, 999.0, None, 500.0, None, 0.0, None]
    cases = [
        (
            s,
            timesteps[s],
            make_inputs(transformer, spec, seed=s, timestep=timesteps[s])
            | cn.sample_inputs(transformer, spec.model_batch, n_tokens, controlnet_layers, seed=s),
        )
        for s in range(parity_cases)
    ]
    return check_parity(
        result.onnx_path,
        transformer,
        cases,
        atol=tol.atol,
        rtol=tol.rtol,
        min_cosine=tol.min_cosine,
        quantile=tol.quantile,
        min_index_agreement=tol.min_index_agreement,
        dtype=dtype,
        onnx_input_dtype=torch_dtype(dtype),
    )
