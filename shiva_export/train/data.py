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
  ``v = eps - x0`` (SD3's convention). SD3 layout only. Read wholly into RAM: for small folders
  (``recipes/sd35-shapes`` training); an optional ``null.safetensors`` (prompt_embeds, pooled) gives
  it a null embedding for caption dropout / CFG pairs.
* :class:`~shiva_export.train.dataset.ShardedLatents`: a ``shiva-export train-data`` output (sharded,
  memory-mapped, read lazily; the pipeline's real null embedding). Same batches as ``LatentFolder``.

Every source's ``batch(B, timesteps=None, *, caption_dropout=0.0, cfg_pairs=False)`` can replace a
sample's text by the null embedding with probability ``caption_dropout`` (seeded) and, with
``cfg_pairs``, return ``2B`` rows ``[uncond; cond]`` that share ``x_t``, timestep and target, the uncond
half the null embedding, as the SD3 pipeline's CFG batch (``torch.cat([latents] * 2)``) does
(:func:`condition_batch`). ``SyntheticData`` has no real null embedding: its "null" text is a fixed
seeded Gaussian draw (DiT: the null class label), synthetic like the rest of its inputs.

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

__all__ = ["Batch", "DataShapes", "SyntheticData", "LatentFolder", "make_data", "condition_batch", "LATENT_KEYS"]

logger = get_logger(__name__)

#: Tensor names every cached-latent file must hold.
LATENT_KEYS = ("latents", "prompt_embeds", "pooled")
_NULL_FILE = "null.safetensors"  # optional in a LatentFolder: the null embedding (not a sample)


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
        cfg (bool): Rows are ``[uncond; cond]`` halves of B each sharing ``x_t``/timestep/target (the
            router must select the same tokens in both halves, by max score, as inference does).
        dropped (torch.Tensor | None): ``[B]`` bool, the samples whose text caption dropout replaced
            by the null embedding (the cond half with ``cfg``); None without caption dropout.
    """

    inputs: dict[str, torch.Tensor]
    timestep: torch.Tensor
    target: torch.Tensor | None = None
    timestep_scale: float = 1.0
    cfg: bool = False
    dropped: torch.Tensor | None = None

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.inputs["hidden_states"]

    def __len__(self) -> int:
        return int(self.hidden_states.shape[0])

    def rows(self, ids: list[int], pairs: int | None = None) -> Batch:
        """The sub-batch of samples ``ids``. A CFG batch (``pairs=2``, default from :attr:`cfg`) is
        ``[uncond; cond]`` halves: both rows of each sample are kept (the result is again ``[uncond; cond]``)."""
        pairs = (2 if self.cfg else 1) if pairs is None else pairs
        n = len(self) // pairs
        if len(ids) == n and list(ids) == list(range(n)):
            return self
        full = [i + p * n for p in range(pairs) for i in ids]
        ix = torch.as_tensor(full, dtype=torch.long)
        pick = lambda t: t.index_select(0, ix) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == len(self) else t  # noqa: E731
        dropped = None if self.dropped is None else self.dropped.index_select(0, torch.as_tensor(list(ids), dtype=torch.long))
        return Batch({k: pick(v) for k, v in self.inputs.items()}, pick(self.timestep), None if self.target is None else pick(self.target),
                     self.timestep_scale, cfg=self.cfg, dropped=dropped)

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


def _check_conditioning(caption_dropout: float, cfg_pairs: bool) -> None:
    if not isinstance(caption_dropout, (int, float)) or isinstance(caption_dropout, bool) or not 0.0 <= caption_dropout < 1.0:
        raise ConfigError(f"caption_dropout {caption_dropout!r} is out of range; expected 0 <= p < 1 (0.1 is usual).")
    if not isinstance(cfg_pairs, bool):
        raise ConfigError(f"cfg_pairs {cfg_pairs!r} is not a bool.")


def condition_batch(batch: Batch, null: dict[str, torch.Tensor], *, caption_dropout: float = 0.0, cfg_pairs: bool = False,
                    generator: torch.Generator | None = None, batched: set[str] | None = None) -> Batch:
    """Caption dropout and CFG pairs on a batch of B conditional samples.

    Args:
        batch (Batch): B conditional samples.
        null (dict[str, Tensor]): The null conditioning per input name, without batch axis (SD3:
            ``encoder_hidden_states [T, J]``, ``pooled_projections [P]``).
        caption_dropout (float): Probability per sample that its conditioning becomes ``null``; one
            ``torch.rand(B)`` draw from ``generator``, made only when > 0. Defaults to 0.
        cfg_pairs (bool): Return ``2B`` rows ``[uncond; cond]``: every batched input, the timestep and
            the target repeated, the uncond half's conditioning ``null``. Defaults to False.
        generator (torch.Generator): RNG of the dropout draw. Defaults to None (global RNG).
        batched (set[str]): Input names with a batch axis (repeated by ``cfg_pairs``). Defaults to all inputs.

    Returns:
        Batch: The batch itself when both are off, else a new one (``cfg`` and ``dropped`` set).
    """
    _check_conditioning(caption_dropout, cfg_pairs)
    if caption_dropout == 0.0 and not cfg_pairs:
        return batch
    b = len(batch)
    inputs = dict(batch.inputs)
    dropped = None
    if caption_dropout > 0.0:
        dropped = torch.rand(b, generator=generator) < caption_dropout
        for name, v in null.items():
            x = inputs[name]
            m = dropped.view(-1, *([1] * (x.dim() - 1)))
            inputs[name] = torch.where(m, v.to(x.dtype).expand_as(x), x)
    t, target = batch.timestep, batch.target
    if cfg_pairs:
        names = set(inputs) if batched is None else batched
        for name, x in list(inputs.items()):
            if name in names:
                inputs[name] = torch.cat([null[name].to(x.dtype).expand_as(x) if name in null else x, x])
        t = torch.cat([t, t])
        target = None if target is None else torch.cat([target, target])
    return Batch(inputs, t, target=target, timestep_scale=batch.timestep_scale, cfg=cfg_pairs, dropped=dropped)


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
        self._null: dict[str, torch.Tensor] | None = None

    @property
    def null_text(self) -> dict[str, torch.Tensor]:
        """The synthetic "null" conditioning (no batch axis): a fixed Gaussian draw per text input from its
        own generator (``seed``-derived; the batch stream is untouched), DiT's null class label."""
        if self._null is None:
            shapes = self.adapter.input_shapes(self.config, self.spec)
            g = torch.Generator(device="cpu").manual_seed(self.seed + 0x6E756C6C)  # "null"
            null = {n: torch.randn(shapes[n][1:], generator=g) for n in self._floats if n != "hidden_states"}
            if "class_labels" in shapes:  # DiT: the label embedder's extra row is the unconditional class
                null["class_labels"] = torch.tensor(int(self.config.num_embeds_ada_norm), dtype=torch.int64)
            self._null = null
        return self._null

    def __repr__(self) -> str:
        return f"SyntheticData({self.adapter.NAME}, seed={self.seed}, {self.spec.height}x{self.spec.width}, text_len={self.spec.text_len})"

    def batch(self, batch: int, timesteps: torch.Tensor | None = None, *, caption_dropout: float = 0.0, cfg_pairs: bool = False) -> Batch:
        """Draws ``batch`` samples; ``timesteps`` (``[batch]``, 0..1000) default to uniform in ``[0, 1000)``.
        ``caption_dropout`` / ``cfg_pairs``: see :func:`condition_batch` (with the synthetic :attr:`null_text`)."""
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        _check_conditioning(caption_dropout, cfg_pairs)
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
        out = Batch(inputs, t, timestep_scale=float(self.adapter.TIMESTEP_SCALE))
        if caption_dropout == 0.0 and not cfg_pairs:
            return out
        batched = {n for n in shapes if n != "timestep"}  # Flux img_ids/txt_ids have no batch axis
        return condition_batch(out, self.null_text, caption_dropout=caption_dropout, cfg_pairs=cfg_pairs, generator=g, batched=batched)

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
        files = sorted(f for f in p.glob("*.safetensors") if f.name != _NULL_FILE)
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
        self.null_text: dict[str, torch.Tensor] | None = None
        if (p / _NULL_FILE).is_file():
            try:
                nd = load_file(str(p / _NULL_FILE))
                self.null_text = {"encoder_hidden_states": nd["prompt_embeds"].float(), "pooled_projections": nd["pooled"].float()}
            except (SafetensorError, OSError, ValueError, KeyError) as err:
                raise ConfigError(f"cannot read the null embedding {p / _NULL_FILE}: {str(err).splitlines()[0]}. It needs tensors prompt_embeds [T, J] and pooled [P].") from None
            if self.null_text["encoder_hidden_states"].shape != self.prompt_embeds.shape[1:] or self.null_text["pooled_projections"].shape != self.pooled.shape[1:]:
                raise ShapeError(f"the null embedding {p / _NULL_FILE} has shapes that differ from the samples' in {p}. Encode it with the same pipeline.")
        logger.info("loaded %d cached samples from %s (%s)", len(files), p, got)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __repr__(self) -> str:
        return f"LatentFolder({str(self.folder)!r}, samples={len(self)}, seed={self.seed})"

    def batch(self, batch: int, timesteps: torch.Tensor | None = None, *, caption_dropout: float = 0.0, cfg_pairs: bool = False) -> Batch:
        """Draws ``batch`` samples with replacement and noises them to ``timesteps`` (rectified flow).
        ``caption_dropout`` / ``cfg_pairs`` (see :func:`condition_batch`) need ``null.safetensors`` in the folder."""
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        _check_conditioning(caption_dropout, cfg_pairs)
        if (caption_dropout > 0.0 or cfg_pairs) and self.null_text is None:
            raise ConfigError(
                f"caption dropout / CFG pairs need the pipeline's null embedding, and {self.folder} has no {_NULL_FILE}. "
                "Encode the data with shiva-export train-data (it stores encode_prompt(\"\")), or add that file."
            )
        return self._noised(torch.randint(0, len(self), (batch,), generator=self._g), timesteps, caption_dropout, cfg_pairs)

    def every(self, timesteps: torch.Tensor | None = None, *, cfg_pairs: bool = False) -> Batch:
        """Every sample once, in file order, noised to ``timesteps`` (``[len(self)]``) from this source's RNG:
        a fixed evaluation batch of a held-out split (:meth:`split_off`)."""
        _check_conditioning(0.0, cfg_pairs)
        if cfg_pairs and self.null_text is None:
            raise ConfigError(f"CFG pairs need the pipeline's null embedding, and {self.folder} has no {_NULL_FILE}. Add that file or train without --cfg-pairs.")
        return self._noised(torch.arange(len(self)), timesteps, 0.0, cfg_pairs)

    def _noised(self, ix: torch.Tensor, timesteps, caption_dropout: float, cfg_pairs: bool) -> Batch:
        g, batch = self._g, int(ix.numel())
        x0 = self.latents[ix]
        eps = torch.randn(x0.shape, generator=g)
        t = _timesteps(batch, timesteps, g)
        sigma = (t / 1000.0).view(-1, 1, 1, 1)
        xt = (1.0 - sigma) * x0 + sigma * eps
        inputs = {"hidden_states": xt, "encoder_hidden_states": self.prompt_embeds[ix], "pooled_projections": self.pooled[ix]}
        out = Batch(inputs, t, target=eps - x0)
        if caption_dropout == 0.0 and not cfg_pairs:
            return out
        return condition_batch(out, self.null_text, caption_dropout=caption_dropout, cfg_pairs=cfg_pairs, generator=g)

    def split_off(self, n: int, seed: int) -> LatentFolder:
        """Removes the last ``n`` samples (by file name) from this source and returns them as their own
        source with RNG ``seed``: a held-out split that training never draws from.

        Raises:
            ConfigError: ``n`` is not in ``1 .. len(self) - 1``.
        """
        if not isinstance(n, int) or not 1 <= n < len(self):
            raise ConfigError(f"held-out split of {n!r} samples from {self.folder} ({len(self)} samples); expected 1 <= n < {len(self)}. Pass fewer --eval-samples.")
        import copy

        held = copy.copy(self)
        held.latents, held.prompt_embeds, held.pooled = self.latents[-n:], self.prompt_embeds[-n:], self.pooled[-n:]
        held.seed, held._g = int(seed), torch.Generator(device="cpu").manual_seed(int(seed))
        self.latents, self.prompt_embeds, self.pooled = self.latents[:-n], self.prompt_embeds[:-n], self.pooled[:-n]
        return held

    def state_dict(self) -> dict:
        return {"kind": "latents", "seed": self.seed, "rng": self._g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._g.set_state(state["rng"])


def make_data(data: str | os.PathLike | None, model, height: int, width: int, text_len: int, seed: int = 0, *, num_workers: int = 0):
    """The training source for ``--data``: a ``shiva-export train-data`` output (a folder holding
    ``manifest.json``, or that file) -> :class:`~shiva_export.train.dataset.ShardedLatents` (reading with
    ``num_workers`` DataLoader processes); another folder (one ``.safetensors`` per sample, SD3 layout) ->
    :class:`LatentFolder`; None -> :class:`SyntheticData`."""
    if data is None:
        return SyntheticData(model, height, width, text_len, seed=seed)
    from shiva_export.models import get_adapter
    from shiva_export.train.dataset import MANIFEST_NAME, ShardedLatents, is_train_data

    p = Path(data).expanduser()
    if p.is_file() and p.name == MANIFEST_NAME:
        p = p.parent
    adapter = get_adapter(model)
    if adapter.NAME != "sd3":
        raise ConfigError(
            f"--data {data}: cached latents hold the SD3 layout (latents [C, H, W], prompt_embeds, pooled); "
            f"a {adapter.NAME} model trains on synthetic inputs here. Omit --data."
        )
    shapes = DataShapes.from_model(model, height, width, text_len)
    if is_train_data(p):
        return ShardedLatents(p, shapes=shapes, seed=seed, num_workers=num_workers)
    return LatentFolder(p, shapes=shapes, seed=seed)
