"""Checkpoints of ``shiva-export train``: ``checkpoint.pt`` (atomic, resumable, tensors only) and the
trainable state a checkpoint and a held-out snapshot hold.

A checkpoint holds the routers, the policy, the EMA budget, the optimizer, the data stream's and the
sampling generator's state, the step history, the DoRA adapters (``--dora``) and the held-out stopper
(``--eval-every``); :func:`check_compatible` refuses to resume it under settings that change what it means.
It is read with ``torch.load(weights_only=True)``: a pickled object in the file is refused, never run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError
from shiva_export.train import dora as _dora
from shiva_export.utils.io import atomic_write_bytes

__all__ = [
    "CHECKPOINT_NAME",
    "Trainables",
    "save_checkpoint",
    "load_checkpoint",
    "check_compatible",
    "checkpoint_payload",
    "resume_from",
]

CHECKPOINT_NAME = "checkpoint.pt"
_CKPT_FORMAT = "shiva-train-checkpoint/1"


@dataclass
class Trainables:
    """The modules a run trains and their optimizer: what a checkpoint and a held-out snapshot hold."""

    bank: torch.nn.Module
    policy: torch.nn.Module
    budget: torch.nn.Module
    opt: torch.optim.Optimizer
    transformer: torch.nn.Module
    dora: bool

    def snapshot(self) -> dict[str, Any]:
        """The trainable state (copied by the held-out stopper when it is a stage's best)."""
        snap = {
            "routers": self.bank.state_dict(),
            "policy": self.policy.state_dict(),
            "budget": self.budget.state_dict(),
            "optimizer": self.opt.state_dict(),
        }
        return {**snap, "dora": _dora.adapter_state_dict(self.transformer)} if self.dora else snap  # -- DoRA

    def restore(self, snap: dict[str, Any]) -> None:
        self.bank.load_state_dict(snap["routers"])
        self.policy.load_state_dict(snap["policy"])
        self.budget.load_state_dict(snap["budget"])
        self.opt.load_state_dict(snap["optimizer"])
        if self.dora:  # -- DoRA
            _dora.load_adapter_state_dict(self.transformer, snap["dora"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Writes ``payload`` (:func:`checkpoint_payload`) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, read tensors-only; a missing, damaged or foreign file is one ConfigError line."""
    if not path.is_file():
        raise ConfigError(
            f"--resume found no checkpoint: {path}. Run without --resume first, or pass the --out-dir of the interrupted run."
        )
    try:
        # weights_only: tensors, dicts, lists and numbers only; a pickled object in the file is refused, never run.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # torch's "pickle protocol" notes on a foreign file: the error below says it
            ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ConfigError(
            f"cannot read checkpoint {path}: {str(err).splitlines()[0]}. Delete it and train from scratch."
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != _CKPT_FORMAT:
        raise ConfigError(
            f"{path} is not a shiva training checkpoint (format {ck.get('format') if isinstance(ck, dict) else None!r}). Use another --out-dir."
        )
    return ck


def check_compatible(ck: dict, rec, cfg, path: Path) -> None:
    """Refuses a checkpoint of another model, or written under settings that change what resuming it means."""
    old = ck.get("config", {})
    if ck.get("model") != rec.name:
        raise ConfigError(
            f"checkpoint {path} was trained for model {ck.get('model')!r}, not {rec.name!r}. Use another --out-dir."
        )
    keys = (
        "target_keep",
        "batch",
        "seed",
        "tap_every",
        "estimator",
        "min_keep",
        "max_logit",
        "cfg_pairs",
        "caption_dropout",
        "budget",
        "budget_timesteps",
        "budget_measure",
        "eval_every",
        "context",
    )
    before = {"context": "drop"}  # settings added later: what checkpoints written before them ran with
    for key in keys + (
        ("eval_samples",) if cfg.eval_every is not None else ()
    ):  # the held-out split changes the training pool
        was = old.get(key, before.get(key))
        if was != getattr(cfg, key):
            raise ConfigError(
                f"checkpoint {path} has {key} = {was!r}, this run {getattr(cfg, key)!r}; expected the same value. "
                "Resume with the original settings or use another --out-dir."
            )
    if int(ck["step"]) > cfg.total_steps:
        raise ConfigError(
            f"checkpoint {path} is at step {ck['step']}, beyond this run's {cfg.total_steps} total steps. Pass more --steps."
        )


def checkpoint_payload(
    rec, cfg, step: int, parts: Trainables, data, gen: torch.Generator, history: list[dict], stopper
) -> dict[str, Any]:
    """Everything :func:`resume_from` restores, at global step ``step``."""
    return {
        "format": _CKPT_FORMAT,
        "model": rec.name,
        "config": cfg.to_dict(),
        "step": step,
        "routers": parts.bank.state_dict(),
        "policy": parts.policy.state_dict(),
        "budget": parts.budget.state_dict(),
        "optimizer": parts.opt.state_dict(),
        "data": data.state_dict(),
        "generator": gen.get_state(),
        "history": history,
        **({"dora": _dora.adapter_state_dict(parts.transformer)} if cfg.dora else {}),  # -- DoRA
        **({"heldout": stopper.state_dict()} if stopper is not None else {}),
    }


def resume_from(path: Path, rec, cfg, parts: Trainables, data, gen: torch.Generator, stopper) -> tuple[int, list[dict]]:
    """Loads ``path`` into the run's modules, data stream, generator and stopper; returns ``(step, history)``."""
    ck = load_checkpoint(path)
    check_compatible(ck, rec, cfg, path)
    _dora.load_checkpoint_state(parts.transformer, ck, cfg.dora, path)  # -- DoRA: adapters (refuses a --dora mismatch)
    parts.bank.load_state_dict(ck["routers"])
    parts.policy.load_state_dict(ck["policy"])
    parts.budget.load_state_dict(ck["budget"])
    parts.opt.load_state_dict(ck["optimizer"])
    lrs = {"router": cfg.lr_router, "policy": cfg.lr_policy, "dora": cfg.lr_dora}
    for g in parts.opt.param_groups:  # this run's learning rates, not the checkpoint's (load_state_dict restores those)
        g["base_lr"] = lrs[g["name"]]
    data.load_state_dict(ck["data"])
    gen.set_state(ck["generator"])
    if stopper is not None and "heldout" in ck:
        stopper.load_state_dict(ck["heldout"])
    return int(ck["step"]), list(ck.get("history", []))
