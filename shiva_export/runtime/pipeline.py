"""One call from a model name (or a diffusers pipeline) to a Shiva-pruned diffusers pipeline.

:func:`load_pipeline` returns the real diffusers pipeline of the model's architecture (the adapter's
``PIPELINE_CLASS``: ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtSigmaPipeline``, ``DiTPipeline``)
whose ``transformer`` is, per backend:

- ``torch``: the diffusers transformer itself with :func:`~shiva_export.prune.api.apply_shiva_` (trained
  router from the recipe) and a timestep phase schedule (:func:`~shiva_export.prune.api.set_shiva_phases_`);
- ``ort``: a :class:`~shiva_export.runtime.modules.ShivaArtifactTransformer` over ONNX Runtime sessions of
  the exported graphs (one per phase), exported on first use and cached by content key;
- ``trt``: the same module over TensorRT engines (sha256 and manifest checked before loading).

The torch transformer weights are never loaded for ``ort``/``trt`` pipelines: the module is built from
``<ModelClass>.load_config`` and handed to ``from_pretrained(folder, transformer=module)`` (never assigned
afterwards: diffusers would keep the default size of a transformer-less pipeline).
:func:`shiva_pipeline` prunes a pipeline the user already loaded (torch).

This module is architecture-generic: the adapter says which pipeline class to load, how many blocks a config
has, the image-size rules, whether CFG is batched (``BATCHED_CFG``), the ``max_sequence_length`` that gives
the graph's text length, and any pipeline check (SD3: the CLIP tokenizer length).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiva_export.checks import check_finite
from shiva_export.engines.budgets import build_engines
from shiva_export.engines.manifest import manifest_path_for, read_manifest
from shiva_export.engines.runner import find_plan
from shiva_export.errors import (
    ConfigError,
    EngineBuildError,
    HardwareError,
    ModelNotFoundError,
    ParityError,
    RecipeError,
    WeightsError,
)
from shiva_export.export.buckets import pick_bucket
from shiva_export.export.graph_cache import export_key_for, trace_cache_enabled
from shiva_export.export.lora import load_loras_, lora_provenance
from shiva_export.export.onnx import read_shiva_metadata
from shiva_export.export.pruned import export_pruned, resolve_router, router_tensor_hash
from shiva_export.logging import get_logger
from shiva_export.models import InputSpec, adapter_for_architecture, get_adapter, load_transformer, router_dims
from shiva_export.models.base import check_weights_sha256
from shiva_export.prune.api import ShivaConfig, apply_shiva_, set_shiva_phases_
from shiva_export.prune.schedule import TimestepPhase, phases_from_recipe, uniform_phase
from shiva_export.recipe import Recipe, load_recipe, recipe_hash
from shiva_export.runtime.embedded import ensure_embedded_pipeline, saved_none_components
from shiva_export.runtime.modules import ArtifactPhase, OrtRunner, TrtRunner
from shiva_export.utils.io import canonical_json, inside, safe_component, sha256_bytes, sha256_file, verify_onnx_record

__all__ = [
    "BACKENDS",
    "ShivaPipelineInfo",
    "load_pipeline",
    "shiva_pipeline",
    "load_diffusers_pipeline",
    "resolve_phases",
    "quiet_libraries",
]

logger = get_logger(__name__)

BACKENDS = ("torch", "ort", "trt")


@contextlib.contextmanager
def quiet_libraries(debug: bool = False):
    """Keeps diffusers' and transformers' warnings and progress bars off the terminal (unless ``debug``)."""
    if debug or os.environ.get("SHIVA_DEBUG") == "1":
        yield
        return
    import warnings

    from diffusers.utils import logging as dlog

    saved = [dlog.get_verbosity()]
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        saved.append(tlog.get_verbosity())
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency of the pipeline extra
        tlog = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(saved[0])
        dlog.enable_progress_bar()
        if tlog is not None:
            tlog.set_verbosity(saved[1])
            tlog.enable_progress_bar()


@dataclass
class ShivaPipelineInfo:
    """What a Shiva pipeline runs (attached to the pipeline as ``pipe.shiva``)."""

    model: str
    backend: str
    recipe: Recipe
    phases: tuple[TimestepPhase, ...]
    dense: bool
    pipeline_source: str
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    router: dict[str, Any] = field(default_factory=dict)
    max_sequence_length: int | None = 256
    text_len: int = 333
    height: int = 1024
    width: int = 1024
    batch: int = 1
    cfg: bool = True
    dtype: str = "fp32"
    context: str | None = "drop"  # the routing's ShivaConfig.context; None for a dense pipeline
    loras: list[dict[str, Any]] = field(default_factory=list)  # LoraSpec.to_dict() of each LoRA (fused or not)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "dense": self.dense,
            "context": self.context,
            "recipe": str(self.recipe.source_path),
            "recipe_sha256": recipe_hash(self.recipe),
            "pipeline": self.pipeline_source,
            "phases": [p.to_dict() for p in self.phases],
            "router": self.router,
            "artifacts": self.artifacts,
            "shapes": {
                "height": self.height,
                "width": self.width,
                "text_len": self.text_len,
                "batch": self.batch,
                "cfg": self.cfg,
            },
            "max_sequence_length": self.max_sequence_length,
            "dtype": self.dtype,
            "loras": self.loras,
        }


# --------------------------------------------------------------------------------------------- loading
def _is_pipeline_folder(p: Path) -> bool:
    return (p / "model_index.json").is_file()


def _is_transformer_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and not _is_pipeline_folder(p)


def _transformer_folder(rec: Recipe, weights: str | os.PathLike | None) -> Path | None:
    """The transformer folder a pipeline runs in place of its own ``transformer/``: ``weights`` when it is one,
    else a ``source = "local"`` recipe's transformer folder (``train --dora``'s merged ``transformer/``); None when
    the pipeline's own transformer runs."""
    if weights is not None:
        p = Path(weights).expanduser()
        return p if _is_transformer_folder(p) else None
    if rec.model.source == "local" and rec.model.path:
        p = rec.local_model_path()  # a bound folder that is missing fails here, in one line
        return p if _is_transformer_folder(p) else None
    return None


def _components_location(rec: Recipe) -> tuple[str, bool]:
    """(folder or repo id, is_local) of the pipeline whose text encoders, VAE and scheduler run a transformer folder:
    the recipe's own pipeline, or, for a recipe bound to a transformer folder (``train --dora`` keeps the base model's
    name), the pipeline of the built-in model of that name."""
    if _transformer_folder(rec, None) is None:
        return pipeline_location(rec, None)

    try:
        base = load_recipe(rec.name)
    except (RecipeError, ModelNotFoundError):  # not a built-in model name
        base = None
    if base is None or base.architecture != rec.architecture or _transformer_folder(base, None) is not None:
        raise WeightsError(
            f"{rec.source_path or rec.name}: [model] path is a transformer folder and no built-in {rec.architecture} model named {rec.name!r} "
            "supplies the rest of the pipeline; pass --weights a pipeline folder whose transformer/ holds exactly these weights."
        )
    return pipeline_location(base, None)


def pipeline_location(rec: Recipe, weights: str | os.PathLike | None) -> tuple[str, bool]:
    """(folder or repo id, is_local) of the diffusers pipeline (with a transformer folder: of its other components)."""
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_dir():
            raise WeightsError(
                f"--weights {p} is not a folder. Pass a diffusers pipeline folder (model_index.json) or transformer folder (config.json)."
            )
        if _is_transformer_folder(
            p
        ):  # the transformer comes from p (sha256-checked by load_transformer), the rest from the model
            return _components_location(rec)
        if not _is_pipeline_folder(p):
            raise WeightsError(
                f"--weights {p} has neither model_index.json nor config.json, so it is not a diffusers pipeline or transformer folder; "
                "pass the folder written by the pipeline's (or transformer's) save_pretrained."
            )
        if rec.model.sha256:  # a recipe bound to its weights (train --dora): the pipeline's transformer must be those
            check_weights_sha256(p / "transformer", rec)
        return str(p), True
    if rec.model.source == "local":
        if _transformer_folder(rec, None) is not None:
            return _components_location(rec)
        folder = rec.local_pipeline_path()
        if rec.model.sha256:  # bound by sha256 (train --dora): the pipeline folder's transformer must be those weights
            check_weights_sha256(Path(folder) / "transformer", rec)
        return str(folder), True
    if rec.model.source == "embedded":
        return str(ensure_embedded_pipeline(rec)), True
    repo = rec.pipeline_repo_id()
    if not repo:
        raise ConfigError(
            f"{rec.source_path}: no pipeline repo id (pipeline.repo_id or model.repo_id); pass --weights PATH."
        )
    return repo, False


def _adapter_of(rec: Recipe):
    return adapter_for_architecture(rec.architecture)


def pipeline_from_pretrained(location: str, is_local: bool, rec: Recipe, **kwargs):
    adapter = _adapter_of(rec)
    with quiet_libraries():  # importing a pipeline makes transformers log about torchvision image processors
        pipe_cls = adapter.pipeline_class()

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    attempts = [True] if (is_local or offline) else [True, False]
    last: Exception | None = None
    if is_local:
        for comp, none in saved_none_components(Path(location)).items():
            kwargs.setdefault(comp, none)  # a pipeline saved without T5 reloads only when told so again
    for local_only in attempts:
        try:
            with quiet_libraries():
                return pipe_cls.from_pretrained(location, local_files_only=local_only, **kwargs)
        except Exception as err:  # noqa: BLE001 - hub, filesystem and config errors come in many types
            last = err
            if is_local:
                break
    reason = str(last).splitlines()[0][:200] if last else "unknown error"
    if is_local:
        raise WeightsError(
            f"Cannot load a {adapter.PIPELINE_CLASS} from {location}: {reason}. Is it a diffusers {adapter.NAME} pipeline folder?"
        )
    raise ModelNotFoundError(
        f"Pipeline {location!r} (model {rec.name!r}) is not in the local Hugging Face cache and cannot be downloaded here ({reason}). "
        "Download it elsewhere and pass --weights PATH (a diffusers pipeline folder)."
    )


def read_transformer_config(
    location: str, is_local: bool, rec: Recipe, subfolder: str | None = "transformer"
) -> dict[str, Any]:
    adapter = _adapter_of(rec)
    try:
        with quiet_libraries():
            cfg = adapter.model_class().load_config(location, subfolder=subfolder, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        reason = str(err).splitlines()[0][:200]
        if not is_local:
            raise ModelNotFoundError(
                f"Pipeline {location!r} is not in the local Hugging Face cache and cannot be downloaded here ({reason}). "
                "Download it elsewhere and pass --weights PATH (a diffusers pipeline folder)."
            ) from None
        raise WeightsError(
            f"Cannot read transformer/config.json of {location}: {reason}. Pass a diffusers pipeline folder."
        ) from None
    cls = cfg.get("_class_name")
    if cls not in (None, *adapter.config_class_names()):
        raise WeightsError(
            f"{location}: transformer/config.json is a {cls}, not a {adapter.MODEL_CLASS}; recipe {rec.name!r} is for architecture "
            f"{rec.architecture!r}. Pass the matching --model or --recipe."
        )
    cfg = dict(cfg)
    cfg["_class_name"] = adapter.MODEL_CLASS  # hub DiT/PixArt configs say Transformer2DModel
    return cfg


def load_diffusers_pipeline(
    model: str | None = None, *, recipe: str | os.PathLike | Recipe | None = None, weights=None, transformer=None
):
    """The plain diffusers pipeline of a model (embedded, ``--weights`` folder or cached hub id)."""
    rec = generation_recipe(model, recipe)
    loc, local = pipeline_location(rec, weights)
    kwargs = {"transformer": transformer} if transformer is not None else {}
    return pipeline_from_pretrained(loc, local, rec, **kwargs)


def generation_recipe(model: str | None, recipe) -> Recipe:
    """The recipe of a generation run; its architecture must declare a diffusers pipeline (one line if not)."""
    rec = (
        recipe if isinstance(recipe, Recipe) else load_recipe(recipe if recipe is not None else (model or "sd35-tiny"))
    )
    adapter = _adapter_of(rec)
    if not adapter.PIPELINE_CLASS:
        adapter.pipeline_class()  # raises the one-line ConfigError
    return rec


def resolve_phases(rec: Recipe, num_layers: int, ratio: float | None, use_phases: bool) -> tuple[TimestepPhase, ...]:
    """The phase schedule: the recipe's learned phases, or the one-phase case of a fixed ratio."""
    if use_phases and ratio is not None:
        raise ConfigError("give --ratio or --phases, not both (a fixed ratio is a one-phase schedule).")
    if use_phases:
        return phases_from_recipe(rec, num_layers)
    r = rec.prune.ratios[0] if ratio is None else ratio
    return (uniform_phase(num_layers, r, rec.routed_blocks(num_layers)),)


def _artifact_key(
    rec: Recipe,
    weights,
    router,
    phase: TimestepPhase,
    spec,
    dtype: str,
    dense: bool,
    context: str = "drop",
    loras=None,
    controlnet_layers: int = 0,
) -> str:
    key = export_key_for(
        rec,
        weights,
        None if dense else router,
        0.0,
        dense,
        spec.to_dict(),
        dtype,
        rec.export.opset,
        False,
        context,
        loras,
        controlnet_layers,
    )
    key["keep_ratios"] = list(phase.keep_ratios)
    key["t_range"] = [phase.t_start, phase.t_stop]
    return sha256_bytes(canonical_json(key).encode())


def _ensure_onnx(
    rec: Recipe,
    weights,
    router,
    phase: TimestepPhase,
    spec,
    dtype: str,
    root: Path,
    say,
    *,
    dense: bool = False,
    use_phases: bool = False,
    context: str = "drop",
    bucket: str | None = None,
    loras=None,
    controlnet_layers: int = 0,
) -> dict[str, Any]:
    """Exports (or reuses, by content key: a context-keep graph is never reused for drop) the ONNX of one phase,
    or of the dense reference, under ``<root>/<model>[/<W>x<H>]/runtime/``; returns its provenance."""
    key = _artifact_key(rec, weights, router, phase, spec, dtype, dense, context, loras, controlnet_layers)
    folder = (
        root / rec.name / (bucket or "") / "runtime" / f"{safe_component(phase.name, 'phase name')}-{dtype}-{key[:12]}"
    )
    path = inside(root, folder / "model.onnx", "runtime ONNX")
    status = "cached"
    meta = None
    if path.is_file():
        why = verify_onnx_record(path)  # reused by content, never by key alone: an edited graph is exported again
        try:
            meta = read_shiva_metadata(path) if why is None else None
        except Exception:  # noqa: BLE001 - an unreadable cache entry is re-exported
            meta = None
        if why is not None:
            logger.warning("re-exporting cached graph %s: %s", path, why)
        if not meta or meta.get("runtime_key") != key:
            meta = None
    parity = None
    if meta is None:
        status = "exported"
        say(f"export onnx ({phase.name})")
        if dense:
            budget: dict[str, Any] = {"dense": True}
        elif use_phases:
            budget = {"keep_ratios": list(phase.keep_ratios)}
        else:
            budget = {"ratio": 1.0 - next(r for r in phase.keep_ratios if r is not None)}
        res = export_pruned(
            recipe=rec,
            weights=weights,
            router=None if dense else router,
            height=spec.height,
            width=spec.width,
            batch=spec.batch,
            text_len=spec.text_len,
            cfg=spec.cfg,
            dtype=dtype,
            out=path,
            validate=True,
            extra_metadata={"runtime_key": key, "phase": phase.name, "t_start": phase.t_start, "t_stop": phase.t_stop},
            context=None if dense else context,
            loras=loras,
            controlnet_layers=controlnet_layers,
            **budget,
        )
        if res.parity is not None and res.parity.status != "skipped" and not res.parity.passed:
            raise ParityError(f"exported {path} fails ORT parity: {res.parity.summary_line()}", report=res.parity)
        parity = res.parity.summary_line() if res.parity is not None else None
        meta = read_shiva_metadata(path)
    return {
        "phase": phase.name,
        "onnx": str(path),
        "onnx_sha256": sha256_file(path),
        "status": status,
        "k_per_block": meta.get("k_per_block") or {},
        "context": meta.get("context"),
        "router_sha256": meta.get("router_sha256"),
        "model_config_sha256": meta.get("model_config_sha256"),
        "input_spec": meta.get("input_spec"),
        "parity": parity,
        "loras": meta.get("loras"),
        "controlnet_layers": int(meta.get("controlnet_layers") or 0),
    }


def _config_hash(config: dict[str, Any]) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in config.items() if not k.startswith("_")}).encode())


def _check_artifact_record(p: Path) -> None:
    """An --artifact graph runs only while it is byte for byte what `shiva-export onnx` wrote (its sha256 record)."""
    why = verify_onnx_record(p)
    if why is not None:
        raise ConfigError(
            f"--artifact {p} cannot be trusted: {why}. Re-export it with `shiva-export onnx` (and keep the .sha256.json beside it)."
        )


def _open_artifacts(
    artifacts: Sequence[str | os.PathLike], backend: str, config: dict[str, Any], say
) -> list[tuple[TimestepPhase, Any, dict]]:
    """User-given artifacts (ONNX files or engine folders): phases read from their metadata."""
    out = []
    for a in artifacts:
        p = Path(a)
        if backend == "trt":
            plan = find_plan(p)
            man = read_manifest(manifest_path_for(plan))
            op = Path(man.onnx_path) if man.onnx_path else Path("model.onnx")
            onnx_path = op if op.is_absolute() else plan.parent / op
            meta = read_shiva_metadata(onnx_path) if onnx_path.is_file() else {}
            info = {
                "engine": str(plan.parent),
                "engine_sha256": man.engine_sha256,
                "onnx_sha256": man.onnx_sha256,
                "backend": man.backend,
                "backend_version": man.backend_version,
            }
        else:
            meta = read_shiva_metadata(p, require=True, what="--artifact")
            _check_artifact_record(p)
            info = {"onnx": str(p), "onnx_sha256": sha256_file(p)}
        if "input_spec" not in meta or "model" not in meta:
            raise ConfigError(
                f"--artifact {p} carries no shiva.* metadata, so it was not written by `shiva-export onnx`; export one with it."
            )
        want = meta.get("model_config_sha256")
        if want and want != _config_hash(config):
            raise ConfigError(
                f"--artifact {p} was exported from another transformer (config sha256 {want[:12]}... != {_config_hash(config)[:12]}...); "
                "export it from this pipeline's transformer."
            )

        n_layers = get_adapter(config).config_num_blocks(config)
        keep = meta.get("keep_ratios") or [None] * n_layers

        name = safe_component(
            meta.get("phase") or f"ratio{float(meta.get('ratio', 0.0)):.2f}", f"--artifact {p}: shiva.phase"
        )
        phase = TimestepPhase(
            str(name), float(meta.get("t_start", 1000.0)), float(meta.get("t_stop", 0.0)), tuple(keep)
        )
        spec = InputSpec(**meta["input_spec"])
        info.update(
            phase=phase.name,
            k_per_block=meta.get("k_per_block"),
            router_sha256=meta.get("router_sha256"),
            input_spec=meta["input_spec"],
            status="given",
            loras=meta.get("loras"),
            controlnet_layers=int(meta.get("controlnet_layers") or 0),
            context=None if meta.get("dense") else (meta.get("context") or "drop"),
        )  # exports before the option dropped
        out.append((phase, spec, info, meta))
    out.sort(key=lambda x: -x[0].t_start)
    return out


def load_pipeline(
    model: str | None = None,
    *,
    backend: str = "torch",
    ratio: float | None = None,
    phases: bool = False,
    dense: bool = False,
    recipe: str | os.PathLike | Recipe | None = None,
    weights: str | os.PathLike | None = None,
    router: str | os.PathLike | None = None,
    artifacts: Sequence[str | os.PathLike] | None = None,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    cfg: bool = True,
    dtype: str = "fp32",
    provider: str = "cpu",
    threads: int | None = None,
    device: str = "cpu",
    artifact_root: str | os.PathLike = "engines",
    progress: Callable[[str], None] | None = None,
    context: str | None = None,
    loras=None,
    controlnet_layers: int = 0,
):
    """Loads a diffusers pipeline with a Shiva-pruned transformer.

    Args:
        model (str): Built-in model name (``sd35-tiny``, ``flux-tiny``, ``pixart-tiny``, ``dit-tiny``, ``sd35``, ...).
        backend (str): ``torch``, ``ort`` or ``trt``. Defaults to ``torch``.
        ratio (float): Fraction of image tokens pruned per routed block (one phase). Defaults to the
            recipe's first ratio.
        phases (bool): Run the recipe's learned ``[[schedule.phases]]`` (one static graph per phase).
        dense (bool): No pruning at all: the plain transformer (torch) or the dense reference graph.
        recipe (PathLike | Recipe): Recipe overriding the model's. Defaults to None.
        weights (PathLike): Local diffusers *pipeline* folder. Defaults to None (embedded or hub).
        router (PathLike): Router safetensors. Defaults to the recipe's.
        artifacts (list[PathLike]): Existing ONNX files (``ort``) or engine folders (``trt``) to run, one
            per phase; their phases and shapes come from their metadata. Defaults to exporting on demand.
        height, width (int): Pixels of the static graphs. Default to the recipe's shapes.
        batch (int): Prompts per call of the static graphs. Defaults to 1.
        cfg (bool): Classifier-free guidance (the graph batch holds uncond + cond); always off for architectures
            without batched CFG (Flux). Defaults to True.
        dtype (str): Graph dtype (``ort``/``trt``), or the torch pipeline's dtype (``torch``: fp32, fp16 or bf16;
            routers keep computing in fp32). Defaults to ``fp32``.
        device (str): ``cpu`` or ``cuda``: where the pipeline (text encoders, VAE, torch transformer) runs.
        provider (str): ONNX Runtime provider, ``cpu`` or ``cuda``. Defaults to ``cpu``.
        threads (int): ONNX Runtime intra-op threads. Defaults to ORT's choice.
        artifact_root (PathLike): Where exported graphs are cached. Defaults to ``engines``.
        context (str): ``"drop"`` or ``"keep"``: whether rejected tokens still give keys and values in routed blocks
            (``ShivaConfig.context``; SD3/SD3.5 only). Defaults to the recipe's ``[prune] context``; given
            ``artifacts`` must have been exported with it.
        loras (Sequence[LoraSpec]): ``resolve_loras``'s: unfused (peft) on torch, else fused into the graphs and their cache keys.
        controlnet_layers (int): ``ort``/``trt``: graphs with this many ControlNet residual inputs. Defaults to 0.

    Returns:
        DiffusionPipeline: the architecture's pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``,
        ``PixArtSigmaPipeline`` or ``DiTPipeline``) with ``pipe.shiva`` (:class:`ShivaPipelineInfo`).

    Example:
        >>> pipe = load_pipeline("sd35-tiny", backend="ort", ratio=0.4)
        >>> image = pipe("a red cube", num_inference_steps=12, max_sequence_length=pipe.shiva.max_sequence_length).images[0]
        >>> flux = load_pipeline("flux-tiny", backend="ort", ratio=0.4)   # FluxPipeline; cfg is off (guidance embedding)
        >>> dit = load_pipeline("dit-tiny", backend="torch", ratio=0.4)   # DiTPipeline: dit(class_labels=dit.get_label_ids(["cat"]))
    """
    _check_pipeline_options(backend, dtype, device, dense, ratio, phases, context)
    say = progress or (lambda m: None)
    rec = generation_recipe(model, recipe)
    adapter = _adapter_of(rec)
    ctx = adapter.check_context(rec.prune.context if context is None else context)
    say("load pipeline")
    cfg = cfg and adapter.BATCHED_CFG  # Flux: guidance is an embedding, never a [uncond; cond] batch
    src = _pipeline_source(rec, adapter, weights)
    h = rec.shapes.height if height is None else height
    w = rec.shapes.width if width is None else width
    adapter.check_image_size(config_obj(src.config), h, w)
    info_kwargs: dict[str, Any] = {"loras": [lo.to_dict() for lo in loras or ()]}

    if backend == "torch":
        pipe, phase_list, router_info = _torch_pipeline(src, router, ratio, phases, dense, cfg, ctx, loras)
        text_len = rec.shapes.text_len
        artifacts_info: list[dict[str, Any]] = []
        info_kwargs["dtype"] = dtype  # the pipeline's torch dtype (its routers stay float32)
    else:
        spec = InputSpec(batch=batch, height=h, width=w, text_len=rec.shapes.text_len, cfg=cfg)
        graphs = _Graphs(backend, dtype, provider, threads, Path(artifact_root), loras, controlnet_layers)
        pipe, aps, ctx = _artifact_pipeline(
            src, spec, graphs, artifacts, weights, router, ratio, phases, dense, context, ctx, say
        )
        phase_list = tuple(a.phase for a in aps)
        artifacts_info = [a.info for a in aps]
        router_info = {
            "router_sha256": sorted({a.info.get("router_sha256") for a in aps if a.info.get("router_sha256")})
        }
        text_len = aps[0].spec.text_len
        h, w, batch, cfg = aps[0].spec.height, aps[0].spec.width, aps[0].spec.batch, aps[0].spec.cfg
        info_kwargs["dtype"] = aps[0].dtype
    max_seq = adapter.max_sequence_length(pipe, text_len)  # what the pipeline must encode for the graph's text length
    _place(pipe, device, dtype if backend == "torch" else "fp32", dense)
    pipe.set_progress_bar_config(disable=True)
    pipe.shiva = ShivaPipelineInfo(
        model=rec.name,
        backend=backend,
        recipe=rec,
        phases=phase_list,
        dense=dense,
        pipeline_source=src.loc,
        artifacts=artifacts_info,
        router=router_info,
        max_sequence_length=max_seq,
        text_len=text_len,
        height=h,
        width=w,
        batch=batch,
        cfg=cfg,
        context=None if dense else ctx,
        **info_kwargs,
    )
    return pipe


@dataclass(frozen=True)
class _Source:
    """Where a pipeline comes from: the model's recipe and adapter, the pipeline folder or hub id, and the transformer
    folder that replaces the pipeline's own transformer when there is one (``--weights`` naming one, or a ``train
    --dora`` recipe's), with the transformer config read from wherever the transformer comes from."""

    rec: Recipe
    adapter: Any
    loc: str
    local: bool
    tf_dir: Path | None
    config: dict[str, Any]

    @property
    def n_layers(self) -> int:
        return self.adapter.config_num_blocks(self.config)


def _pipeline_source(rec: Recipe, adapter, weights) -> _Source:
    loc, local = pipeline_location(rec, weights)
    tf_dir = _transformer_folder(
        rec, weights
    )  # a transformer folder (--weights, or train --dora's) runs in the model's pipeline
    config = (
        read_transformer_config(str(tf_dir), True, rec, subfolder=None)
        if tf_dir
        else read_transformer_config(loc, local, rec)
    )
    return _Source(rec, adapter, loc, local, tf_dir, config)


@dataclass(frozen=True)
class _Graphs:
    """How the graphs of an ``ort``/``trt`` pipeline run (backend, ONNX Runtime provider and threads), and how the
    ones not given are made: graph dtype, cache root, LoRAs fused, ControlNet residual inputs."""

    backend: str
    dtype: str
    provider: str
    threads: int | None
    root: Path
    loras: Any = None
    controlnet_layers: int = 0

    def runner(self, info: dict[str, Any]):
        """An ONNX Runtime session over ``info["onnx"]``, or a TensorRT runner over ``info["engine"]``."""
        if self.backend == "ort":
            return OrtRunner(info["onnx"], provider=self.provider, threads=self.threads)
        return TrtRunner(info["engine"])


def _place(pipe, device: str, torch_dtype_name: str, dense: bool) -> None:
    """Moves the pipeline to its device, and a torch pipeline to its dtype with the routers kept in float32."""
    if device != "cpu":
        pipe.to(device)
    if torch_dtype_name != "fp32":
        import torch

        pipe.to(dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[torch_dtype_name])
        if not dense:  # routers always compute in float32 (top-k is sensitive to rounding)
            pipe.transformer.shiva_routers.to(torch.float32)


def _check_pipeline_options(
    backend: str, dtype: str, device: str, dense: bool = False, ratio=None, phases: bool = False, context=None
) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}.")
    if backend != "torch":
        trace_cache_enabled()  # a bad SHIVA_ONNX_CACHE is refused before the pipeline loads, not at its first export
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--dtype {dtype!r} is unknown; choose fp32, fp16 or bf16.")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is unknown; choose cpu or cuda.")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HardwareError(
                "--device cuda needs a CUDA GPU, and torch sees none. Run on a GPU machine or use --device cpu."
            )
    if dense and (ratio not in (None, 0.0) or phases):
        raise ConfigError("a dense pipeline prunes nothing; drop --ratio/--phases or dense.")
    if dense and context == "keep":
        raise ConfigError("a dense pipeline routes nothing, so --context keep has no effect; drop --context or dense.")


def _torch_pipeline(src: _Source, router, ratio, phases: bool, dense: bool, cfg: bool, ctx: str, loras=None):
    """The model's pipeline with its own transformer, LoRAs loaded (unfused), routed in place: (pipe, phases, router info)."""
    rec, own = src.rec, {}
    if src.tf_dir is not None:  # loaded as `onnx --weights` loads it: sha256-checked against a bound recipe
        own["transformer"] = load_transformer(recipe=rec, weights=src.tf_dir)
    pipe = pipeline_from_pretrained(src.loc, src.local, rec, **own)
    src.adapter.check_pipeline(pipe, rec)
    if not own:  # a transformer loaded with the pipeline (load_transformer checks its own)
        check_finite(pipe.transformer.state_dict(), f"transformer weights in {src.loc}", WeightsError)

    load_loras_(pipe.transformer, loras or ())  # unfused, before routing: the routed blocks run the peft layers
    if dense:
        return pipe, (), {"source": "none (dense)"}
    phase_list = resolve_phases(rec, src.n_layers, ratio, phases)
    return pipe, phase_list, _apply_torch(pipe.transformer, rec, router, phase_list, cfg, ctx)


def _artifact_pipeline(
    src: _Source,
    spec: InputSpec,
    graphs: _Graphs,
    artifacts,
    weights,
    router,
    ratio,
    phases: bool,
    dense: bool,
    context: str | None,
    ctx: str,
    say,
):
    """The model's pipeline around a ShivaArtifactTransformer over the given graphs or engines, else over the cached
    ones (exported or built on first use), one per phase: (pipe, artifact phases, their context)."""
    from shiva_export.runtime.modules import (
        ShivaArtifactTransformer,  # lazy: shiva_export.runtime.modules defines it on first access (module __getattr__ imports diffusers)
    )

    if artifacts:
        aps, ctx = _opened_phases(artifacts, graphs, src.config, src.rec, context, say)
    else:
        n_layers = src.n_layers
        phase_list = (
            (TimestepPhase("dense", 1000.0, 0.0, (None,) * n_layers),)
            if dense
            else resolve_phases(src.rec, n_layers, ratio, phases)
        )
        aps = _built_phases(src.rec, weights, router, phase_list, spec, graphs, dense, phases, ctx, say)
    module = ShivaArtifactTransformer(src.config, aps, graphs.backend, adapter=src.adapter)
    pipe = pipeline_from_pretrained(src.loc, src.local, src.rec, transformer=module)
    src.adapter.check_pipeline(pipe, src.rec)
    return pipe, aps, ctx


def _opened_phases(artifacts, graphs: _Graphs, config, rec: Recipe, context, say):
    """Runners over given ONNX files or engine folders, phases and shapes from their metadata, which must carry
    ``loras``: (phases, context)."""
    opened = _open_artifacts(artifacts, graphs.backend, config, say)
    ctx = _artifacts_context(opened, context)
    _check_artifact_loras(opened, graphs.loras)
    aps = [
        ArtifactPhase(phase, aspec, graphs.runner(info), info, rec.name, graphs.dtype)
        for phase, aspec, info, _meta in opened
    ]
    return aps, ctx


def _built_phases(
    rec, weights, router, phase_list, spec, graphs: _Graphs, dense: bool, use_phases: bool, ctx: str, say
) -> list:
    """One runner per phase over the cached graph (``ort``) or engine (``trt``), exported or built on first use, in the
    ``<W>x<H>`` folder of a resolution bucket where the model has buckets."""
    bucket = pick_bucket(rec, graphs.root, spec.height, spec.width)  # a model with buckets runs only at their sizes
    loras, cn_layers = graphs.loras, graphs.controlnet_layers
    aps = []
    for phase in phase_list:
        if graphs.backend == "ort":
            info = _ensure_onnx(
                rec,
                weights,
                router,
                phase,
                spec,
                graphs.dtype,
                graphs.root,
                say,
                dense=dense,
                use_phases=use_phases,
                context=ctx,
                bucket=bucket,
                loras=loras,
                controlnet_layers=cn_layers,
            )
        else:
            info = _ensure_engine(
                rec,
                weights,
                router,
                phase,
                spec,
                graphs.dtype,
                graphs.root,
                dense,
                use_phases,
                say,
                ctx,
                bucket,
                loras,
                cn_layers,
            )
        aps.append(ArtifactPhase(phase, spec, graphs.runner(info), info, rec.name, graphs.dtype))
    return aps


def _check_artifact_loras(opened, loras) -> None:
    """Given graphs carry their LoRAs fused: they must be exactly the requested ones (files by sha256, and scales)."""

    def strip(rows):  # the file name is only a label
        return [(r.get("sha256"), r.get("scale")) for r in rows or []]

    want = lora_provenance(loras)
    for _p, _s, info, _m in opened:
        if strip(info.get("loras")) != strip(want):
            got = ", ".join(f"{r.get('file')}@{r.get('scale')}" for r in info.get("loras") or []) or "none"
            raise ConfigError(
                f"--artifact {info.get('onnx') or info.get('engine')} was exported with LoRAs [{got}], not the --lora/--lora-scale given; "
                "export it with these LoRAs (or drop --artifact to export on demand)."
            )


def _artifacts_context(opened, context: str | None) -> str:
    """The context the given artifacts were exported with (all the same), checked against ``context`` when given."""
    found = {info.get("context") for _p, _s, info, _m in opened} - {None}
    if len(found) > 1:
        raise ConfigError(
            f"--artifact graphs were exported with different contexts ({', '.join(sorted(found))}); pass graphs of one context."
        )
    got = found.pop() if found else None
    if context is not None and got is not None and got != context:
        raise ConfigError(
            f"--context {context} but the --artifact graphs were exported with context {got!r}; export them with --context {context}."
        )
    return got if got is not None else ("drop" if context is None else context)


def config_obj(config: dict[str, Any]):
    """Attribute view of a config dict (what the adapters' size helpers read)."""
    from types import SimpleNamespace

    return SimpleNamespace(**{k: v for k, v in config.items() if not k.startswith("_")})


def _apply_torch(transformer, rec: Recipe, router, phase_list, cfg: bool, context: str = "drop") -> dict[str, Any]:
    config = ShivaConfig(
        phase_list[0].keep_ratios,
        cfg=cfg,
        bottleneck=rec.router.bottleneck,
        group_size=rec.router.group_size,
        context=context,
    )
    rc = config.router_config(*router_dims(transformer))
    bank, info = resolve_router(rec, router, rc)
    bank = apply_shiva_(transformer, config, routers=bank, seed=rec.router.seed)
    set_shiva_phases_(transformer, phase_list, auto_cfg=True)
    info["tensor_sha256"] = router_tensor_hash(bank)
    return info


def _ensure_engine(
    rec,
    weights,
    router,
    phase,
    spec,
    dtype,
    root: Path,
    dense: bool,
    use_phases: bool,
    say,
    context: str = "drop",
    bucket: str | None = None,
    loras=None,
    controlnet_layers: int = 0,
) -> dict[str, Any]:
    """Builds (or reuses) the engine of a fixed-ratio or learned phase with ``build_engines``: the folders
    ``shiva-export trt [--size WxH] [--phases]`` writes."""
    size = {"sizes": [bucket]} if bucket else {"height": spec.height, "width": spec.width}
    if use_phases and not dense:
        budget: dict[str, Any] = {"phases": [phase.name], "dense": False}
    else:
        budget = {
            "ratios": [0.0 if dense else 1.0 - next(x for x in phase.keep_ratios if x is not None)],
            "dense": dense,
        }
    say(f"engine ({phase.name})")
    builds = build_engines(
        recipe=rec,
        weights=weights,
        router=router,
        dtype=dtype,
        batch=spec.batch,
        text_len=spec.text_len,
        cfg=spec.cfg,
        out_dir=root,
        context=None if dense else context,
        loras=loras,
        controlnet_layers=controlnet_layers,
        **size,
        **budget,
    )
    b = builds[-1]
    if b.status == "failed" or b.plan_path is None:
        raise EngineBuildError(f"engine for {phase.name} did not build: {b.error}")

    man = read_manifest(manifest_path_for(b.plan_path))
    return {
        "phase": phase.name,
        "engine": str(b.out_dir),
        "engine_sha256": man.engine_sha256,
        "onnx_sha256": man.onnx_sha256,
        "status": b.status,
        "k_per_block": b.per_block_k,
        "backend": man.backend,
        "backend_version": man.backend_version,
        "loras": (man.export_key or {}).get("loras"),
        "controlnet_layers": int((man.export_key or {}).get("controlnet_layers") or 0),
    }


def shiva_pipeline(
    pipe,
    *,
    backend: str = "torch",
    recipe: str | os.PathLike | Recipe,
    ratio: float | None = None,
    phases: bool = False,
    router: str | os.PathLike | None = None,
    cfg: bool = True,
    context: str | None = None,
):
    """Prunes the transformer of a pipeline the user already loaded (``torch`` backend, in place); ``context`` as
    in :func:`load_pipeline`.

    For ``ort``/``trt`` use :func:`load_pipeline` with ``weights=`` the pipeline folder: graphs are static,
    so they are exported for the recipe's shapes and the module is handed to ``from_pretrained``.
    """
    if backend != "torch":
        raise ConfigError(
            f"shiva_pipeline(backend={backend!r}) on an already loaded pipeline is torch-only; use load_pipeline(weights=FOLDER, backend={backend!r})."
        )

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    adapter = get_adapter(pipe.transformer)
    if adapter.NAME != rec.architecture:
        raise ConfigError(
            f"the pipeline's transformer is a {adapter.MODEL_CLASS}, recipe {rec.name!r} is for {rec.architecture!r}. Pass the matching recipe."
        )
    ctx = adapter.check_context(rec.prune.context if context is None else context)
    n_layers = adapter.num_blocks(pipe.transformer)
    phase_list = resolve_phases(rec, n_layers, ratio, phases)
    router_info = _apply_torch(pipe.transformer, rec, router, phase_list, cfg and adapter.BATCHED_CFG, ctx)
    text_len = rec.shapes.text_len
    pipe.shiva = ShivaPipelineInfo(
        model=rec.name,
        backend="torch",
        recipe=rec,
        phases=phase_list,
        dense=False,
        pipeline_source="(user pipeline)",
        router=router_info,
        max_sequence_length=adapter.max_sequence_length(pipe, text_len),
        text_len=text_len,
        height=rec.shapes.height,
        width=rec.shapes.width,
        cfg=cfg and adapter.BATCHED_CFG,
        context=ctx,
    )
    return pipe
