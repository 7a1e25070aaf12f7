"""Drop-in ``pipe.transformer`` modules that run static artifacts: ONNX Runtime sessions or TensorRT engines.

:class:`ShivaArtifactTransformer` holds one static graph per phase (a fixed ``--ratio`` is the one-phase
case) and runs, at every denoising step, the graph of the phase that owns the step's timestep. It is a
diffusers ``ModelMixin``, so ``StableDiffusion3Pipeline.from_pretrained(folder, transformer=module)``
accepts it, and it exposes exactly what the pipeline reads from its transformer. Found by reading
``pipeline_stable_diffusion_3.py`` and ``pipeline_utils.py`` (diffusers 0.42):

========================================  ==================================================================
what the pipeline touches                 where / what the module gives
========================================  ==================================================================
``config.sample_size``, ``patch_size``    ``__init__`` (default size = sample_size * 8): the artifact's
                                          latent size, so the pipeline's default height/width are the export's
``config.in_channels``                    ``__call__`` (latent channels)
``config.joint_attention_dim``            ``encode_prompt`` when ``text_encoder_3`` is None (T5 zeros)
``config.patch_size``                     ``__call__`` with ``use_dynamic_shifting``
``transformer(hidden_states=,             the denoising loop; ``skip_layers=`` only with skip-layer guidance
timestep=, encoder_hidden_states=,        (refused: not in the static graph), ``joint_attention_kwargs``
pooled_projections=,                      (LoRA scale / IP-Adapter: refused unless empty)
joint_attention_kwargs=, return_dict=)``
``.device``, ``.dtype``, ``.to()``        ``pipe.device``, ``_execution_device``, ``pipe.to``: a zero-size
                                          buffer carries them
``.modules()``, ``_hf_hook``,             offload probes of ``DiffusionPipeline``: plain ``nn.Module``
``_diffusers_hook``                       behaviour (no hooks)
``__class__``, ``__module__``             ``register_modules`` writes them into ``model_index.json``;
                                          ``save_pretrained`` is refused (save the artifacts instead)
========================================  ==================================================================

The output is cast back to ``hidden_states.dtype``: an fp16 graph in an fp32 pipeline must not turn the
scheduler's latents into fp16 (the scheduler casts its result to the model output's dtype).

The static shapes are a contract: every call is checked against the artifact's batch (CFG doubles it),
latent size and text length, and a mismatch raises :class:`~shiva_export.errors.ShapeError` naming the
field, both values and the export command that fits. Nothing is padded or re-exported silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.models import VAE_SCALE, InputSpec
from shiva_export.prune.schedule import TimestepPhase, call_timestep, check_phases, phase_index

__all__ = ["ArtifactPhase", "ShivaArtifactTransformer", "OrtRunner", "TrtRunner", "check_call_shapes", "export_command"]


def export_command(model: str, phase: TimestepPhase, spec: InputSpec, *, height: int | None = None, width: int | None = None,
                   batch: int | None = None, text_len: int | None = None, cfg: bool | None = None, dtype: str = "fp32") -> str:
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


def check_call_shapes(ap: ArtifactPhase, batch: int, height_px: int, width_px: int, text_len: int, cfg: bool, where: str = "pipeline call") -> None:
    """Raises :class:`ShapeError` unless a call of ``batch`` model rows, this size, text length and CFG fits ``ap``."""
    spec = ap.spec
    fits = {
        "cfg": (cfg, spec.cfg),
        "height": (height_px, spec.height),
        "width": (width_px, spec.width),
        "text_len": (text_len, spec.text_len),
        "batch": (batch, spec.model_batch),
    }
    for name, (got, want) in fits.items():
        if got == want:
            continue
        prompts = batch // 2 if cfg and batch % 2 == 0 else batch
        fix = export_command(ap.model, ap.phase, spec, height=height_px, width=width_px, batch=prompts, text_len=text_len, cfg=cfg, dtype=ap.dtype)
        what = {
            "cfg": f"CFG is {'on' if got else 'off'} ({'guidance_scale > 1' if got else 'guidance_scale <= 1 or skip-layer guidance'}) but the artifact was exported with {'--cfg' if want else '--no-cfg'}",
            "height": f"height is {got} px but the artifact was exported for {want} px",
            "width": f"width is {got} px but the artifact was exported for {want} px",
            "text_len": f"text length is {got} tokens but the artifact was exported for {want} (CLIP + max_sequence_length)",
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


class _ArtifactTransformerBase:
    """A ``pipe.transformer`` that runs one static graph per phase (ONNX Runtime or TensorRT).

    Args:
        config (dict): The diffusers transformer config (``SD3Transformer2DModel.load_config``); the torch
            weights are never loaded. ``sample_size`` is set to the artifacts' latent size.
        phases (list[ArtifactPhase]): In sampling order; their t-ranges must tile the timestep axis.
        backend (str): ``ort`` or ``trt`` (reported in :attr:`shiva_info`).

    Example:
        >>> module = ShivaArtifactTransformer(config, [ArtifactPhase(phase, spec, OrtRunner("model.onnx"))], "ort")
        >>> pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=module)
    """

    def __init__(self, config: dict[str, Any], phases: list[ArtifactPhase], backend: str):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        if not phases:
            raise ConfigError("ShivaArtifactTransformer needs at least one artifact phase.")
        check_phases([p.phase for p in phases], "artifact phases")
        sizes = {(p.spec.height, p.spec.width) for p in phases}
        if len(sizes) != 1:
            raise ShapeError(f"the phases' artifacts were exported for different image sizes {sorted(sizes)}; export every phase at one size.")
        h, w = sizes.pop()
        cfg = {k: v for k, v in dict(config).items()}
        cfg["sample_size"] = h // VAE_SCALE if h == w else cfg.get("sample_size")
        self._internal_dict = FrozenDict(cfg)
        self.phases = list(phases)
        self.backend = backend
        self.trace: list[str] = []
        # device/dtype for pipe.device, pipe.dtype and pipe.to(); carries no data.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    # ----------------------------------------------------------------------------------------- diffusers API
    def save_pretrained(self, *args, **kwargs):  # noqa: D401 - refusing is the point
        raise ConfigError(
            "this transformer runs exported artifacts and holds no torch weights; save the artifacts (ONNX / engine folders) "
            "and the diffusers pipeline without it, not the Shiva pipeline."
        )

    @property
    def shiva_info(self) -> dict[str, Any]:
        """Artifacts per phase (paths, sha256, k per block), the backend and the phase trace of the calls."""
        return {
            "backend": self.backend,
            "phases": [dict(p.phase.to_dict(), spec=p.spec.to_dict(), dtype=p.dtype, **p.info) for p in self.phases],
            "trace": list(self.trace),
        }

    def check_call(self, batch: int, height_px: int, width_px: int, text_len: int, cfg: bool, where: str = "pipeline call") -> None:
        """Shape-contract check of a planned call against every phase (run before the first step)."""
        for p in self.phases:
            check_call_shapes(p, batch, height_px, width_px, text_len, cfg, where)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ):
        if skip_layers is not None:
            raise ConfigError(
                f"skip-layer guidance (skip_layers={skip_layers}) is not in the static graph; call the pipeline with skip_guidance_layers=None."
            )
        if block_controlnet_hidden_states is not None:
            raise ConfigError("ControlNet residuals are not in the static graph; use the torch backend for ControlNet.")
        if joint_attention_kwargs:
            raise ConfigError(
                f"joint_attention_kwargs {sorted(joint_attention_kwargs)} (LoRA scale, IP-Adapter) are not in the static graph; "
                "fuse LoRA weights before export or use the torch backend."
            )
        if timestep is None or encoder_hidden_states is None or pooled_projections is None:
            raise ConfigError("the static graph needs hidden_states, encoder_hidden_states, pooled_projections and timestep.")
        i = phase_index([p.phase for p in self.phases], call_timestep(timestep))
        ts = torch.as_tensor(timestep).reshape(-1)
        ap = self.phases[i]
        b = int(hidden_states.shape[0])
        # A CFG call is the pipeline's torch.cat([latents] * 2): both halves share the latent bit for bit.
        cfg = b > 0 and b % 2 == 0 and torch.equal(hidden_states[: b // 2], hidden_states[b // 2 :])
        check_call_shapes(ap, b, int(hidden_states.shape[-2]) * VAE_SCALE, int(hidden_states.shape[-1]) * VAE_SCALE, int(encoder_hidden_states.shape[1]), cfg)
        self.trace.append(ap.phase.name)
        feed = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "pooled_projections": pooled_projections,
            "timestep": ts.expand(b).to(torch.float32) if ts.numel() == 1 else ts.to(torch.float32),
        }
        out = ap.run(feed).to(device=hidden_states.device, dtype=hidden_states.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


class OrtRunner:
    """Runs one exported ONNX in ONNX Runtime (CPU; CUDA when onnxruntime-gpu is installed and in use).

    Inputs are cast to the graph's input dtypes (``timestep`` stays float32); the ``sample`` output is
    returned as a torch tensor.
    """

    def __init__(self, onnx_path: str | os.PathLike, provider: str = "cpu", threads: int | None = None):
        from shiva_export.validate.parity import ort_session

        self.path = Path(onnx_path)
        self.session = ort_session(self.path, provider=provider, threads=threads)
        self.provider = self.session.get_providers()[0]
        self._types = {i.name: i.type for i in self.session.get_inputs()}
        self._np = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
        #: graphs exported with ``--debug-outputs`` also return ``kept_indices.<block>``; with ``record`` set to
        #: a list, each call appends ``{block: indices}`` (for kept-index agreement checks).
        self.index_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith("kept_indices.")]
        self.record: list | None = None

    def __call__(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        import numpy as np

        arrays = {}
        for name, t in feed.items():
            want = self._np.get(self._types.get(name, "tensor(float)"), "float32")
            arrays[name] = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy().astype(want, copy=False))
        names = ["sample"] + (self.index_outputs if self.record is not None else [])
        outs = self.session.run(names, arrays)
        if self.record is not None:
            self.record.append({int(n.split(".", 1)[1]): torch.from_numpy(np.asarray(v)) for n, v in zip(names[1:], outs[1:])})
        return torch.from_numpy(np.asarray(outs[0], dtype=np.float32))


class TrtRunner:
    """Runs one TensorRT / TensorRT-RTX engine through :class:`~shiva_export.engines.runner.EngineRunner`.

    The plan's sha256 and the manifest are verified when the runner opens (before any GPU is touched
    by the caller's pipeline); activation then checks the backend version and GPU and deserializes once.
    """

    def __init__(self, engine_dir: str | os.PathLike, backend: str | None = None):
        from shiva_export.engines.runner import EngineRunner

        self.runner = EngineRunner(engine_dir, backend=backend)
        self.runner.activate()

    def __call__(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.runner.infer({k: v for k, v in feed.items()})["sample"]
