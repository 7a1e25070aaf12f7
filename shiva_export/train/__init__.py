"""Training-time building blocks of Shiva-DiT (paper Sec. 2.1-2.4).

* :mod:`shiva_export.train.ste`: residual-based differentiable top-k -- the inference top-k in the
  forward pass, a soft-rank / inclusion-probability surrogate with a residual straight-through
  estimator in the backward pass, and temperature annealing.
* :mod:`shiva_export.train.loop`: the three-stage training loop (`shiva-export train`), built from
  :mod:`~shiva_export.train.config` (``TrainConfig``), :mod:`~shiva_export.train.student` (the route override
  and the losses), :mod:`~shiva_export.train.checkpoint` and :mod:`~shiva_export.train.outputs` (router,
  LUT, recipe; ``TrainResult``).
* :mod:`shiva_export.train.evaluate`: router evaluation against the dense model.
* :mod:`shiva_export.train.data`: the training batch, caption dropout and CFG pairs, synthetic batches.
* :mod:`shiva_export.train.dataset`: ``shiva-export train-data`` (encode prompts/images with the pipeline's
  own encoders into sharded safetensors, in the layout the architecture's adapter declares).
* :mod:`shiva_export.train.cached`: the cached-latent sources of ``train --data`` (the lazy, memory-mapped
  ``ShardedLatents``, the per-sample ``LatentFolder``) and ``make_data``.
* :mod:`shiva_export.train.policy`: the adaptive (timestep, layer) keep-ratio policy, the EMA budget
  loss, stratified timestep / ratio sampling, and LUT quantisation into static per-phase schedules.
* :mod:`shiva_export.train.dora`: stage-3 DoRA adapters (peft, imported on first use), the teacher
  with adapters disabled, their checkpoint state, and the fp32 merge + save the written recipe binds to.
"""

from shiva_export.train.cached import LatentFolder, ShardedLatents
from shiva_export.train.config import TrainConfig
from shiva_export.train.data import SyntheticData
from shiva_export.train.dataset import encode_train_data
from shiva_export.train.evaluate import evaluate_router
from shiva_export.train.loop import train
from shiva_export.train.outputs import TrainResult
from shiva_export.train.policy import (
    MAX_PHASES,
    EMABudget,
    PhaseSchedule,
    RatioPolicy,
    quantize_lut,
    stratified_ratios,
    stratified_timesteps,
    timestep_embedding,
)
from shiva_export.train.ste import (
    DEFAULT_NOISE_STD,
    DifferentiableTopK,
    Selection,
    TemperatureSchedule,
    gather_with_ste,
    inclusion_probability,
    route_with_ste,
    scatter_with_ste,
    soft_rank,
    soft_rank_reference,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate_router",
    "SyntheticData",
    "LatentFolder",
    "ShardedLatents",
    "encode_train_data",
    "DEFAULT_NOISE_STD",
    "DifferentiableTopK",
    "Selection",
    "TemperatureSchedule",
    "soft_rank",
    "soft_rank_reference",
    "inclusion_probability",
    "gather_with_ste",
    "scatter_with_ste",
    "route_with_ste",
    "RatioPolicy",
    "EMABudget",
    "PhaseSchedule",
    "timestep_embedding",
    "stratified_timesteps",
    "stratified_ratios",
    "quantize_lut",
    "MAX_PHASES",
]
