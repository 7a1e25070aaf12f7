"""Training inputs for router/policy distillation: seeded synthetic batches or cached latents.

Two sources yield the same :class:`Batch` (the transformer's forward-argument names plus the clean
latent when there is one):

* :class:`SyntheticData` (any architecture): seeded Gaussian latents used directly as the noisy input
  ``x_t``, uniformly random (or caller-given, e.g. stratified) timesteps in ``[0, 1000)``, Gaussian text
  embeddings and pooled projections in the adapter's shapes, and the adapter's own values for the other
  inputs. Enough for feature distillation against the dense teacher (the teacher defines the target),
  and what CI uses. No flow-matching loss is possible (there is no clean latent).
* :class:`LatentFolder`: a folder of ``.safetensors`` files, one sample each, holding ``latents [C, H, W]``
  (clean VAE latents, already scaled/shifted the way the backbone expects), ``prompt_embeds [T, J]`` and
  ``pooled [P]``. The noisy input is built with the rectified-flow interpolation
  ``x_t = (1 - sigma) * x0 + sigma * eps`` with ``sigma = t / 1000``, and the flow-matching target is
  ``v = eps - x0`` (SD3's convention). SD3 layout only.

Example:
    >>> data = SyntheticData(transformer, height=256, width=256, text_len=32, seed=0)
    >>> batch = data.batch(8, timesteps=stratified_timesteps(8))
    >>> out = transformer(**batch.model_inputs()).sample
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.logging import get_logger

__all__ = ["Batch", "DataShapes", "SyntheticData", "LatentFolder", "make_data", "LATENT_KEYS"]

logger = get_logger(__name__)

#: Tensor names every cached-latent file must hold.
LATENT_KEYS = ("latents", "prompt_embeds", "pooled")


@dataclass(frozen=True)
class DataShapes:
    """Per-sample shapes of the transformer inputs (no batch axis).

    Args:
        channels (int): Latent channels C (``in_channels``).
        height (int): Latent height (pixels / 8).
        width (int): Latent width (pixels / 8).
        text_len (int): Text tokens T.
        text_dim (int): Text embedding width J (``joint_attention_dim``).
        pooled_dim (int): Pooled projection width P.
    """

    channels: int
    height: int
    width: int
    text_len: int
    text_dim: int
    pooled_dim: int

    @classmethod
    def from_model(cls, config, height_px: int, width_px: int, text_len: int) -> DataShapes:
        """Shapes for a transformer config at an image size in pixels."""
        from shiva_export.models import VAE_SCALE

        cfg = getattr(config, "config", config)
        return cls(cfg.in_channels, height_px // VAE_SCALE, width_px // VAE_SCALE, text_len, cfg.joint_attention_dim, cfg.pooled_projection_dim)


@dataclass
class Batch:
    """One training batch: the transformer's keyword arguments plus the flow-matching target.

    Attributes:
        inputs (dict[str, torch.Tensor]): Forward arguments except ``timestep`` (the architecture's own
            names: ``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``, ``class_labels``...).
        timestep (torch.Tensor): ``[B]`` float32 timesteps on the 0..1000 scale of schedules and the policy.
        target (torch.Tensor | None): Flow-matching target ``eps - x0``, shaped like ``hidden_states``
            (real latents only).
        timestep_scale (float): The model's ``timestep`` is ``timestep / timestep_scale`` (Flux: 1000).
    """

    inputs: dict[str, torch.Tensor]
    timestep: torch.Tensor
    target: torch.Tensor | None = None
    timestep_scale: float = 1.0

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.inputs["hidden_states"]

    def __len__(self) -> int:
        return int(self.hidden_states.shape[0])

    def rows(self, ids: list[int], pairs: int = 1) -> Batch:
        """The sub-batch of samples ``ids``. With ``pairs=2`` the batch is ``[uncond; cond]`` halves and
        both rows of each sample are kept (the result is again ``[uncond; cond]``)."""
        n = len(self) // pairs
        if len(ids) == n and list(ids) == list(range(n)):
            return self
        full = [i + p * n for p in range(pairs) for i in ids]
        ix = torch.as_tensor(full, dtype=torch.long)
        pick = lambda t: t.index_select(0, ix) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == len(self) else t  # noqa: E731
        return Batch({k: pick(v) for k, v in self.inputs.items()}, pick(self.timestep), None if self.target is None else pick(self.target), self.timestep_scale)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The transformer's keyword arguments."""
        t = self.timestep if self.timestep_scale == 1.0 else self.timestep / self.timestep_scale
        return dict(self.inputs, timestep=t)


def _timesteps(batch: int, timesteps: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    if timesteps is None:
        return torch.rand(batch, generator=g) * 1000.0
    t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
    if t.numel() != batch:
        raise ShapeError(f"timesteps has {t.numel()} values for a batch of {batch}; expected one per sample. Pass [batch] timesteps.")
    return t


class SyntheticData:
    """Seeded synthetic batches of any architecture: Gaussian float inputs (latents used as ``x_t``, text
    states, pooled vectors) in the adapter's shapes, and the adapter's own seeded values for the rest
    (Flux position ids and guidance, PixArt caption masks, DiT class labels).

    Each call to :meth:`batch` draws from the object's own generator, so the stream is reproducible from
    ``seed`` and resumable from :meth:`state_dict`. Float inputs are drawn in the adapter's
    ``float_inputs`` order (SD3: latents, text, pooled), the stream earlier releases drew.

    Args:
        model: The transformer (or its config); its adapter gives names and shapes.
        height (int): Image height in pixels.
        width (int): Image width in pixels.
        text_len (int): Text tokens.
        seed (int): RNG seed. Defaults to 0.
    """

    has_targets = False

    def __init__(self, model, height: int, width: int, text_len: int, seed: int = 0):
        from shiva_export.models import InputSpec, get_adapter

        self.adapter = get_adapter(model)
        self.config = getattr(model, "config", model)
        self.spec = InputSpec(batch=1, height=height, width=width, text_len=text_len, cfg=False)
        self.seed = int(seed)
        self._g = torch.Generator(device="cpu").manual_seed(self.seed)
        names = self.adapter.input_names(self.config)
        self._floats = tuple(n for n in self.adapter.float_inputs(self.config) if n in names)
        self._extras = tuple(n for n in names if n not in self._floats and n != "timestep")

    def __repr__(self) -> str:
        return f"SyntheticData({self.adapter.NAME}, seed={self.seed}, {self.spec.height}x{self.spec.width}, text_len={self.spec.text_len})"

    def batch(self, batch: int, timesteps: torch.Tensor | None = None) -> Batch:
        """Draws ``batch`` samples; ``timesteps`` (``[batch]``, 0..1000) default to uniform in ``[0, 1000)``."""
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        from dataclasses import replace

        g = self._g
        spec = replace(self.spec, batch=batch)
        shapes = self.adapter.input_shapes(self.config, spec)
        inputs = {n: torch.randn((batch, *shapes[n][1:]), generator=g) for n in self._floats}
        t = _timesteps(batch, timesteps, g)
        if self._extras:  # the adapter's own seeded values, e.g. DiT class labels, PixArt masks, Flux ids
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            made = self.adapter.make_inputs(self.config, spec, seed=seed)
            inputs.update({n: v for n, v in made.items() if n not in inputs and n != "timestep"})
        return Batch(inputs, t, timestep_scale=float(self.adapter.TIMESTEP_SCALE))

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "seed": self.seed, "rng": self._g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._g.set_state(state["rng"])


class LatentFolder:
    """Cached latents + text embeddings, one ``.safetensors`` file per sample (see module docstring).

    All files are read once at construction and checked for names and shapes; samples are drawn
    with replacement from a seeded generator.

    Args:
        folder (PathLike): Folder holding ``*.safetensors`` files.
        shapes (DataShapes | None): Expected per-sample shapes (checks the files fit the model). Defaults to None.
        seed (int): RNG seed of sampling and noise. Defaults to 0.

    Raises:
        ConfigError: The folder is missing, holds no ``.safetensors`` file, or a file lacks a tensor.
        ShapeError: A tensor's shape does not fit ``shapes`` or the other files.
    """

    has_targets = True

    def __init__(self, folder: str | os.PathLike, shapes: DataShapes | None = None, seed: int = 0):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = Path(folder).expanduser()
        if not p.is_dir():
            raise ConfigError(f"--data folder does not exist: {p}. Pass a folder of .safetensors files (latents, prompt_embeds, pooled) or omit --data for synthetic inputs.")
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"--data folder holds no .safetensors file: {p}. Write one file per sample with tensors {list(LATENT_KEYS)}.")
        lat, txt, pooled = [], [], []
        for f in files:
            try:
                d = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as err:
                raise ConfigError(f"cannot read cached sample {f}: {str(err).splitlines()[0]}. Re-write it with safetensors.torch.save_file.") from None
            missing = [k for k in LATENT_KEYS if k not in d]
            if missing:
                raise ConfigError(f"cached sample {f} lacks tensors {missing}; expected {list(LATENT_KEYS)}. Add them or remove the file.")
            want = {"latents": 3, "prompt_embeds": 2, "pooled": 1}
            for k, nd in want.items():
                if d[k].dim() != nd:
                    raise ShapeError(f"cached sample {f}: {k} has shape {tuple(d[k].shape)}; expected {nd} dims (no batch axis). Save one sample per file.")
            lat.append(d["latents"].float())
            txt.append(d["prompt_embeds"].float())
            pooled.append(d["pooled"].float())
        for name, ts in (("latents", lat), ("prompt_embeds", txt), ("pooled", pooled)):
            shapes_seen = {tuple(t.shape) for t in ts}
            if len(shapes_seen) > 1:
                raise ShapeError(f"cached {name} differ in shape across files in {p}: {sorted(shapes_seen)}; expected one shape. Use one resolution and text length.")
        self.latents = torch.stack(lat)
        self.prompt_embeds = torch.stack(txt)
        self.pooled = torch.stack(pooled)
        got = DataShapes(*self.latents.shape[1:], *self.prompt_embeds.shape[1:], self.pooled.shape[1])
        if shapes is not None:
            for field in ("channels", "text_dim", "pooled_dim"):
                if getattr(got, field) != getattr(shapes, field):
                    raise ShapeError(
                        f"cached samples in {p} have {field} {getattr(got, field)}; the model needs {getattr(shapes, field)}. Encode them for this model."
                    )
        self.shapes = got
        self.folder = p
        self.seed = int(seed)
        self._g = torch.Generator(device="cpu").manual_seed(self.seed)
        logger.info("loaded %d cached samples from %s (%s)", len(files), p, got)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __repr__(self) -> str:
        return f"LatentFolder({str(self.folder)!r}, samples={len(self)}, seed={self.seed})"

    def batch(self, batch: int, timesteps: torch.Tensor | None = None) -> Batch:
        """Draws ``batch`` samples with replacement and noises them to ``timesteps`` (rectified flow)."""
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        g = self._g
        ix = torch.randint(0, len(self), (batch,), generator=g)
        x0 = self.latents[ix]
        eps = torch.randn(x0.shape, generator=g)
        t = _timesteps(batch, timesteps, g)
        sigma = (t / 1000.0).view(-1, 1, 1, 1)
        xt = (1.0 - sigma) * x0 + sigma * eps
        inputs = {"hidden_states": xt, "encoder_hidden_states": self.prompt_embeds[ix], "pooled_projections": self.pooled[ix]}
        return Batch(inputs, t, target=eps - x0)

    def state_dict(self) -> dict:
        return {"kind": "latents", "seed": self.seed, "rng": self._g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._g.set_state(state["rng"])


def make_data(data: str | os.PathLike | None, model, height: int, width: int, text_len: int, seed: int = 0) -> SyntheticData | LatentFolder:
    """``LatentFolder(data)`` when a folder is given (SD3-layout cached latents), else :class:`SyntheticData`."""
    if data is None:
        return SyntheticData(model, height, width, text_len, seed=seed)
    from shiva_export.models import get_adapter

    adapter = get_adapter(model)
    if adapter.NAME != "sd3":
        raise ConfigError(
            f"--data {data}: cached latents hold the SD3 layout (latents [C, H, W], prompt_embeds, pooled); "
            f"a {adapter.NAME} model trains on synthetic inputs here. Omit --data."
        )
    return LatentFolder(data, shapes=DataShapes.from_model(model, height, width, text_len), seed=seed)
