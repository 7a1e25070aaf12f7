"""Drop-in ``pipe.transformer`` modules that run static artifacts: ONNX Runtime sessions or TensorRT engines.

:class:`ShivaArtifactTransformer` holds one static graph per phase (a fixed ``--ratio`` is the one-phase
case) and runs, at every denoising step, the graph of the phase that owns the step's timestep (on the
0..1000 scale: the call's timestep times the adapter's ``TIMESTEP_SCALE``). It is a diffusers
``ModelMixin``, so ``<Pipeline>.from_pretrained(folder, transformer=module)`` accepts it, and it exposes
exactly what the pipelines read from their transformer. Found by reading ``pipeline_stable_diffusion_3.py``,
``flux/pipeline_flux.py``, ``pixart_alpha/pipeline_pixart_sigma.py``, ``dit/pipeline_dit.py`` and
``pipeline_utils.py`` (diffusers 0.42):

==========================================  ================================================================
what a pipeline touches                     where / what the module gives
==========================================  ================================================================
``config.sample_size``                      SD3 / PixArt default height and width, DiT's only size:
                                            the artifact's latent size (``ModelAdapter.artifact_config``)
``config.in_channels``, ``out_channels``    latent channels (Flux: / 4, packed); PixArt / DiT split a
                                            learned-sigma output when ``out_channels == 2 * in_channels``
``config.guidance_embeds``                  Flux: whether to pass ``guidance``
``config.joint_attention_dim``,             SD3 without T5; ``use_dynamic_shifting``: the full diffusers
``patch_size``                              config is exposed (``load_config``), weights never loaded
``transformer(...)``                        bound to the diffusers model class's ``forward`` signature; the
                                            adapter's ``input_names`` feed the graph; arguments baked into
                                            the graph (Flux ``img_ids``/``txt_ids``: RoPE constants) must
                                            equal the baked values; anything else that is set (skip-layer
                                            guidance, ControlNet, LoRA/IP-Adapter kwargs) is refused
``cache_context(name)``                     Flux enters it around every call: a no-op (no step cache)
``.device``, ``.dtype``, ``.to()``          ``pipe.device``, ``_execution_device``, ``pipe.to``, DiT's
                                            latent dtype: a zero-size buffer carries them
``.modules()``, ``_hf_hook``,               offload probes of ``DiffusionPipeline``: plain ``nn.Module``
``_diffusers_hook``                         behaviour (no hooks)
``__class__``, ``__module__``               ``register_modules`` writes them into ``model_index.json``;
                                            ``save_pretrained`` is refused (save the artifacts instead)
==========================================  ================================================================

The output is cast back to ``hidden_states.dtype``: an fp16 graph in an fp32 pipeline must not turn the
scheduler's latents into fp16 (the scheduler casts its result to the model output's dtype).

The static shapes are a contract: every call is checked against the artifact's batch (CFG doubles it; CFG
only where the adapter says the pipeline batches it), image size (``call_geometry``: from the latent grid,
or Flux's ``img_ids``), text length (not for DiT) and the baked constants, and a mismatch raises
:class:`~shiva_export.errors.ShapeError` naming the field, both values and the export command that fits.
Nothing is padded or re-exported silently. Integer inputs (PixArt's caption mask, DiT's class labels) are
fed as int64, floats in the graph's dtype.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shiva_export.engines.runner import EngineRunner
from shiva_export.errors import ConfigError, ShapeError
from shiva_export.export.controlnet import as_feed
from shiva_export.export.ort import ort_session
from shiva_export.models import InputSpec, get_adapter
from shiva_export.prune.schedule import TimestepPhase, call_timestep, check_phases, phase_index

# ShivaArtifactTransformer is defined on first access (module __getattr__ below), which ruff cannot see.
__all__ = ["ArtifactPhase", "ShivaArtifactTransformer", "OrtRunner", "TrtRunner", "check_call_shapes", "export_command"]  # noqa: F822


def export_command(
    model: str,
    phase: TimestepPhase,
    spec: InputSpec,
    *,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    text_len: int | None = None,
    cfg: bool | None = None,
    dtype: str = "fp32",
) -> str:
    """The ``shiva-export onnx`` command that exports this phase for the given call shapes."""
    budget = f"--phase {phase.name}" if not phase.name.startswith("ratio") else f"--ratio {phase.name[5:]}"
    h = spec.height if height is None else height
    w = spec.width if width is None else width
    b = spec.batch if batch is None else batch
    t = spec.text_len if text_len is None else text_len
    c = spec.cfg if cfg is None else cfg
    return (
        f"shiva-export onnx --model {model} {budget} --height {h} --width {w} --batch {b} --text-len {t} "
        f"{'--cfg' if c else '--no-cfg'} --dtype {dtype}"
    )


@dataclass
class ArtifactPhase:
    """One phase's static graph and what it was built for.

    Args:
        phase (TimestepPhase): The timesteps it owns and its keep schedule.
        spec (InputSpec): Static input shapes (prompts per call, pixels, text tokens, CFG).
        run (Callable): ``run(feed: dict[str, torch.Tensor]) -> torch.Tensor`` (the ``sample`` output).
        info (dict): Provenance: ONNX / engine path and sha256, k per block, router sha256.
        model (str): Model name, for the export command in error messages.
        dtype (str): Artifact dtype (``fp32``, ``fp16``, ``bf16``).
    """

    phase: TimestepPhase
    spec: InputSpec
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    model: str = "MODEL"
    dtype: str = "fp32"


def check_call_shapes(
    ap: ArtifactPhase,
    batch: int,
    height_px: int,
    width_px: int,
    text_len: int | None,
    cfg: bool,
    where: str = "pipeline call",
) -> None:
    """Raises :class:`ShapeError` unless a call of ``batch`` model rows, this size, text length and CFG fits ``ap``
    (``text_len`` None: a model without text, not checked)."""
    spec = ap.spec
    fits = {
        "cfg": (cfg, spec.cfg),
        "height": (height_px, spec.height),
        "width": (width_px, spec.width),
        "text_len": (spec.text_len if text_len is None else text_len, spec.text_len),
        "batch": (batch, spec.model_batch),
    }
    for name, (got, want) in fits.items():
        if got == want:
            continue
        prompts = batch // 2 if cfg and batch % 2 == 0 else batch
        fix = export_command(
            ap.model,
            ap.phase,
            spec,
            height=height_px,
            width=width_px,
            batch=prompts,
            text_len=text_len,
            cfg=cfg,
            dtype=ap.dtype,
        )
        what = {
            "cfg": f"CFG is {'on' if got else 'off'} ({'guidance_scale > 1' if got else 'guidance_scale <= 1 or skip-layer guidance'}) but the artifact was exported with {'--cfg' if want else '--no-cfg'}",
            "height": f"height is {got} px but the artifact was exported for {want} px",
            "width": f"width is {got} px but the artifact was exported for {want} px",
            "text_len": f"text length is {got} tokens but the artifact was exported for {want} (the pipeline's max_sequence_length sets it)",
            "batch": f"model batch is {got} rows but the artifact was exported for {want} ({spec.batch} prompt(s){' x 2 for CFG' if spec.cfg else ''})",
        }[name]
        raise ShapeError(f"{where}: {what} (phase {ap.phase.name!r}); export one that fits: {fix}")


def __getattr__(name: str):
    # diffusers is imported on first use, so importing this module stays cheap and backend-free.
    if name == "ShivaArtifactTransformer":
        cls = _artifact_transformer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _artifact_transformer_class():
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin

    class ShivaArtifactTransformer(_ArtifactTransformerBase, ModelMixin, ConfigMixin):
        __doc__ = _ArtifactTransformerBase.__doc__
        config_name = "config.json"

    ShivaArtifactTransformer.__module__ = __name__
    ShivaArtifactTransformer.__qualname__ = "ShivaArtifactTransformer"
    return ShivaArtifactTransformer


def _is_unset(value: Any) -> bool:
    """A forward argument that asks for nothing: None, False, an empty container, or a dict of Nones
    (PixArt's ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}``)."""
    if value is None or value is False:
        return True
    if isinstance(value, dict):
        return all(_is_unset(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return len(value) == 0
    return False


class _ArtifactTransformerBase:
    """A ``pipe.transformer`` that runs one static graph per phase (ONNX Runtime or TensorRT).

    Architecture-generic: the model's adapter (``shiva_export.models``) says which forward arguments are
    graph inputs (``input_names``), which are baked in as constants (``static_inputs``: Flux's ``img_ids`` /
    ``txt_ids``, whose RoPE the export computed), how to read the call's image size and text length
    (``call_geometry``), how timesteps map to the phases' 0..1000 scale (``TIMESTEP_SCALE``) and whether
    CFG is batched (``BATCHED_CFG``).

    Args:
        config (dict): The diffusers transformer config (``<ModelClass>.load_config``); the torch weights are
            never loaded. ``sample_size`` follows the artifacts (``ModelAdapter.artifact_config``).
        phases (list[ArtifactPhase]): In sampling order; their t-ranges must tile the timestep axis.
        backend (str): ``ort`` or ``trt`` (reported in :attr:`shiva_info`).
        adapter (ModelAdapter): The architecture adapter. Defaults to the one of ``config["_class_name"]``.

    Example:
        >>> module = ShivaArtifactTransformer(config, [ArtifactPhase(phase, spec, OrtRunner("model.onnx"))], "ort")
        >>> pipe = FluxPipeline.from_pretrained(folder, transformer=module)
    """

    def __init__(self, config: dict[str, Any], phases: list[ArtifactPhase], backend: str, adapter=None):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        if not phases:
            raise ConfigError("ShivaArtifactTransformer needs at least one artifact phase.")
        check_phases([p.phase for p in phases], "artifact phases")
        sizes = {(p.spec.height, p.spec.width) for p in phases}
        if len(sizes) != 1:
            raise ShapeError(
                f"the phases' artifacts were exported for different image sizes {sorted(sizes)}; export every phase at one size."
            )
        adapter = get_adapter(dict(config) if adapter is None else adapter)
        self._internal_dict = FrozenDict(adapter.artifact_config(dict(config), phases[0].spec))
        self.phases = list(phases)
        self.backend = backend
        self.trace: list[str] = []
        self._adapter = adapter
        self._params = list(inspect.signature(adapter.model_class().forward).parameters)[1:]
        self._statics: dict[InputSpec, dict[str, torch.Tensor]] = {}
        self._static_names = set(adapter.static_inputs(self.config, phases[0].spec))
        # device/dtype for pipe.device, pipe.dtype and pipe.to(); carries no data.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    # ----------------------------------------------------------------------------------------- diffusers API
    def save_pretrained(self, *args, **kwargs):  # noqa: D401 - refusing is the point
        raise ConfigError(
            "this transformer runs exported artifacts and holds no torch weights; save the artifacts (ONNX / engine folders) "
            "and the diffusers pipeline without it, not the Shiva pipeline."
        )

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' ``CacheMixin.cache_context`` (``FluxPipeline`` enters it around every call): a static graph
        has no step cache, so it is a no-op."""
        yield

    @property
    def shiva_info(self) -> dict[str, Any]:
        """Artifacts per phase (paths, sha256, k per block), the backend and the phase trace of the calls."""
        return {
            "backend": self.backend,
            "phases": [dict(p.phase.to_dict(), spec=p.spec.to_dict(), dtype=p.dtype, **p.info) for p in self.phases],
            "trace": list(self.trace),
        }

    def check_call(
        self, batch: int, height_px: int, width_px: int, text_len: int | None, cfg: bool, where: str = "pipeline call"
    ) -> None:
        """Shape-contract check of a planned call against every phase (run before the first step)."""
        for p in self.phases:
            check_call_shapes(p, batch, height_px, width_px, text_len, cfg, where)

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if len(args) > len(self._params):
            raise ConfigError(
                f"{self._adapter.MODEL_CLASS}.forward takes {len(self._params)} arguments, got {len(args)} positional ones."
            )
        bound = dict(zip(self._params, args))
        for k, v in kwargs.items():
            if k not in self._params:
                raise ConfigError(
                    f"{self._adapter.MODEL_CLASS}.forward has no argument {k!r}; the pipeline and the artifact's model do not match."
                )
            bound[k] = v
        return bound

    def _check_statics(self, ap: ArtifactPhase, call: dict[str, Any]) -> None:
        """Arguments the export baked in as constants must arrive with exactly the baked values."""
        key = ap.spec  # frozen dataclass: the baked values depend on the static shapes only
        if key not in self._statics:
            self._statics[key] = self._adapter.static_inputs(self.config, ap.spec)
        for name, want in self._statics[key].items():
            got = call.get(name)
            if got is None:
                raise ConfigError(
                    f"{name} is baked into the graph (phase {ap.phase.name!r}) and the call passes none; call the transformer with {name}=."
                )
            got = torch.as_tensor(got).detach().to("cpu", torch.float32)
            if tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want.to(torch.float32)):
                what = f"shape {list(got.shape)}" if tuple(got.shape) != tuple(want.shape) else "other values"
                raise ShapeError(
                    f"pipeline call: {name} has {what} than the {list(want.shape)} baked into the graph for {ap.spec.width}x{ap.spec.height} px "
                    f"and {ap.spec.text_len} text tokens (phase {ap.phase.name!r}); call at that size and text length, or export one that fits: "
                    f"{export_command(ap.model, ap.phase, ap.spec, dtype=ap.dtype)}"
                )

    def forward(self, *args, **kwargs):
        call = self._bind(args, kwargs)
        adapter = self._adapter
        return_dict = call.pop("return_dict", True)
        names = adapter.input_names(self.config)
        for name, value in call.items():
            if name in names or name in self._static_names or _is_unset(value):
                continue
            if name == _CONTROLNET_KWARG and all(p.info.get("controlnet_layers") for p in self.phases):
                continue  # every graph takes the residuals as inputs
            why = adapter.UNSUPPORTED_CALL_ARGS.get(
                name, f"{name} is not an input of the static graph; use the torch backend"
            )
            raise ConfigError(f"{why} (got {name}={_short(value)}).")
        hidden_states = call.get("hidden_states")
        missing = [n for n in names if call.get(n) is None]
        if missing or hidden_states is None:
            raise ConfigError(
                f"the static graph needs {', '.join(names)}; the call passes no {', '.join(missing or ['hidden_states'])}."
            )
        t = call_timestep(call["timestep"]) * adapter.TIMESTEP_SCALE
        ap = self.phases[phase_index([p.phase for p in self.phases], t)]
        b = int(hidden_states.shape[0])
        # A CFG call is the pipeline's torch.cat([latents] * 2): both halves share the latent bit for bit.
        cfg = (
            adapter.BATCHED_CFG
            and b > 0
            and b % 2 == 0
            and torch.equal(hidden_states[: b // 2], hidden_states[b // 2 :])
        )
        geo = adapter.call_geometry(self.config, call)
        check_call_shapes(ap, b, geo["height"], geo["width"], geo["text_len"], cfg)
        self._check_statics(ap, call)
        shapes = adapter.input_shapes(self.config, ap.spec)
        feed = {}
        for n in names:
            v = torch.as_tensor(call[n])
            want = tuple(shapes[n])
            if len(want) == 1 and v.numel() == 1:  # a per-row scalar given once (timestep of a scalar schedule)
                v = v.reshape(1).expand(want[0])
            if tuple(v.shape) != want:
                raise ShapeError(
                    f"pipeline call: {n} has shape {list(v.shape)} but the graph (phase {ap.phase.name!r}) takes {list(want)}; "
                    f"export one that fits: {export_command(ap.model, ap.phase, ap.spec, dtype=ap.dtype)}"
                )
            feed[n] = v
        if ap.info.get("controlnet_layers"):  # graphs with ControlNet inputs (zeros when the call has no ControlNet)
            feed.update(
                as_feed(call.get(_CONTROLNET_KWARG), int(ap.info["controlnet_layers"]), hidden_states, self.config)
            )
        self.trace.append(ap.phase.name)
        out = ap.run(feed).to(device=hidden_states.device, dtype=hidden_states.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


_CONTROLNET_KWARG = "block_controlnet_hidden_states"


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(map(str, value))) + "}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class OrtRunner:
    """Runs one exported ONNX in ONNX Runtime (CPU; CUDA when onnxruntime-gpu is installed and in use).

    Inputs are cast to the graph's input dtypes (``timestep`` stays float32); the ``sample`` output is
    returned as a torch tensor.
    """

    def __init__(self, onnx_path: str | os.PathLike, provider: str = "cpu", threads: int | None = None):
        self.path = Path(onnx_path)
        self.session = ort_session(self.path, provider=provider, threads=threads)
        self.provider = self.session.get_providers()[0]
        self._types = {i.name: i.type for i in self.session.get_inputs()}
        self._np = {
            "tensor(float)": "float32",
            "tensor(float16)": "float16",
            "tensor(double)": "float64",
            "tensor(int64)": "int64",
            "tensor(int32)": "int32",
            "tensor(bool)": "bool",
        }
        #: graphs exported with ``--debug-outputs`` also return ``kept_indices.<block>``; with ``record`` set to
        #: a list, each call appends ``{block: indices}`` (for kept-index agreement checks).
        self.index_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith("kept_indices.")]
        self.record: list | None = None

    def __call__(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        import numpy as np

        arrays = {}
        for name, t in feed.items():
            want = self._np.get(self._types.get(name, "tensor(float)"), "float32")
            t = t.detach().to("cpu")
            if want.startswith("float"):
                t = t.to(torch.float32)  # then numpy casts to the graph's float width
            arrays[name] = np.ascontiguousarray(t.numpy().astype(want, copy=False))
        names = ["sample"] + (self.index_outputs if self.record is not None else [])
        outs = self.session.run(names, arrays)
        if self.record is not None:
            self.record.append(
                {int(n.split(".", 1)[1]): torch.from_numpy(np.asarray(v)) for n, v in zip(names[1:], outs[1:])}
            )
        return torch.from_numpy(np.asarray(outs[0], dtype=np.float32))


class TrtRunner:
    """Runs one TensorRT / TensorRT-RTX engine through :class:`~shiva_export.engines.runner.EngineRunner`.

    The plan's sha256 and the manifest are verified when the runner opens (before any GPU is touched
    by the caller's pipeline); activation then checks the backend version and GPU and deserializes once.
    """

    def __init__(self, engine_dir: str | os.PathLike, backend: str | None = None):
        self.runner = EngineRunner(engine_dir, backend=backend)
        self.runner.activate()

    def __call__(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.runner.infer({k: v for k, v in feed.items()})["sample"]
