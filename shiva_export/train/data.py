"""Training inputs for router/policy distillation: seeded synthetic batches or cached latents.

Two sources yield the same :class:`Batch` (the transformer's forward-argument names plus the clean
latent when there is one):

* :class:`SyntheticData` (any architecture): seeded Gaussian latents used directly as the noisy input
  ``x_t``, uniformly random (or caller-given, e.g. stratified) timesteps in ``[0, 1000)``, Gaussian text
  embeddings and pooled projections in the adapter's shapes, and the adapter's own values for the other
  inputs. Enough for feature distillation against the dense teacher (the teacher defines the target),
  and what CI uses. No flow-matching loss is possible (there is no clean latent).
* :class:`~shiva_export.train.cached.ShardedLatents` (a ``shiva-export train-data`` output) and
  :class:`~shiva_export.train.cached.LatentFolder` (one file per sample): cached latents and the pipeline's
  own text conditioning, in the layout of the architecture's adapter (:mod:`shiva_export.train.cached`).

Every source's ``batch(B, timesteps=None, *, caption_dropout=0.0, cfg_pairs=False)`` can replace a
sample's text by the null embedding with probability ``caption_dropout`` (seeded) and, with
``cfg_pairs``, return ``2B`` rows ``[uncond; cond]`` that share ``x_t``, timestep and target, the uncond
half the null embedding, as the SD3 pipeline's CFG batch (``torch.cat([latents] * 2)``) does
(:func:`condition_batch`). ``SyntheticData`` has no real null embedding: its "null" text is a fixed
seeded Gaussian draw (DiT: the null class label), synthetic like the rest of its inputs.

This module depends on no other source module: the cached sources build on its :class:`Batch`,
:func:`condition_batch`, :func:`draw_timesteps` and :func:`check_conditioning`.

Example:
    >>> data = SyntheticData(transformer, height=256, width=256, text_len=32, seed=0)
    >>> batch = data.batch(8, timesteps=stratified_timesteps(8))
    >>> out = transformer(**batch.model_inputs()).sample
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.logging import get_logger
from shiva_export.models import InputSpec, get_adapter

__all__ = ["Batch", "SyntheticData", "condition_batch", "draw_timesteps", "check_conditioning"]

logger = get_logger(__name__)


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

        def pick(t):
            return (
                t.index_select(0, ix) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == len(self) else t
            )

        dropped = (
            None if self.dropped is None else self.dropped.index_select(0, torch.as_tensor(list(ids), dtype=torch.long))
        )
        return Batch(
            {k: pick(v) for k, v in self.inputs.items()},
            pick(self.timestep),
            None if self.target is None else pick(self.target),
            self.timestep_scale,
            cfg=self.cfg,
            dropped=dropped,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The transformer's keyword arguments."""
        t = self.timestep if self.timestep_scale == 1.0 else self.timestep / self.timestep_scale
        return dict(self.inputs, timestep=t)


def draw_timesteps(batch: int, timesteps: torch.Tensor | None, g: torch.Generator | None) -> torch.Tensor:
    """``timesteps`` as ``[batch]`` float32 (checked), or ``batch`` uniform draws in ``[0, 1000)`` from ``g``."""
    if timesteps is None:
        return torch.rand(batch, generator=g) * 1000.0
    t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
    if t.numel() != batch:
        raise ShapeError(
            f"timesteps has {t.numel()} values for a batch of {batch}; expected one per sample. Pass [batch] timesteps."
        )
    return t


def check_conditioning(caption_dropout: float, cfg_pairs: bool) -> None:
    """Refuses a caption dropout outside ``[0, 1)`` or a non-bool ``cfg_pairs``."""
    if (
        not isinstance(caption_dropout, (int, float))
        or isinstance(caption_dropout, bool)
        or not 0.0 <= caption_dropout < 1.0
    ):
        raise ConfigError(f"caption_dropout {caption_dropout!r} is out of range; expected 0 <= p < 1 (0.1 is usual).")
    if not isinstance(cfg_pairs, bool):
        raise ConfigError(f"cfg_pairs {cfg_pairs!r} is not a bool.")


def condition_batch(
    batch: Batch,
    null: dict[str, torch.Tensor],
    *,
    caption_dropout: float = 0.0,
    cfg_pairs: bool = False,
    generator: torch.Generator | None = None,
    batched: set[str] | None = None,
) -> Batch:
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
    check_conditioning(caption_dropout, cfg_pairs)
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

    def batch(
        self,
        batch: int,
        timesteps: torch.Tensor | None = None,
        *,
        caption_dropout: float = 0.0,
        cfg_pairs: bool = False,
    ) -> Batch:
        """Draws ``batch`` samples; ``timesteps`` (``[batch]``, 0..1000) default to uniform in ``[0, 1000)``.
        ``caption_dropout`` / ``cfg_pairs``: see :func:`condition_batch` (with the synthetic :attr:`null_text`)."""
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        check_conditioning(caption_dropout, cfg_pairs)
        from dataclasses import replace

        g = self._g
        spec = replace(self.spec, batch=batch)
        shapes = self.adapter.input_shapes(self.config, spec)
        inputs = {n: torch.randn((batch, *shapes[n][1:]), generator=g) for n in self._floats}
        t = draw_timesteps(batch, timesteps, g)
        if self._extras:  # the adapter's own seeded values, e.g. DiT class labels, PixArt masks, Flux ids
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            made = self.adapter.make_inputs(self.config, spec, seed=seed)
            inputs.update({n: v for n, v in made.items() if n not in inputs and n != "timestep"})
        out = Batch(inputs, t, timestep_scale=float(self.adapter.TIMESTEP_SCALE))
        if caption_dropout == 0.0 and not cfg_pairs:
            return out
        batched = {n for n in shapes if n != "timestep"}  # Flux img_ids/txt_ids have no batch axis
        return condition_batch(
            out, self.null_text, caption_dropout=caption_dropout, cfg_pairs=cfg_pairs, generator=g, batched=batched
        )

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "seed": self.seed, "rng": self._g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._g.set_state(state["rng"])
