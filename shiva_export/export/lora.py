"""LoRA adapters (diffusers LoRA format) on the transformer: loaded with diffusers' own loader, fused for export.

``onnx``, ``trt`` and ``generate`` take ``--lora PATH`` (repeatable) with one ``--lora-scale S`` each. The static
graphs (ONNX Runtime, TensorRT) have the LoRAs fused into their weights before pruning and export: diffusers'
``load_lora_adapter`` per file, ``set_adapters`` with the scales, ``fuse_lora``, ``unload_lora``. The torch backend
keeps them unfused (peft layers with the scales set by ``set_adapters``): the routed blocks run diffusers' own block
forward, so the LoRA acts on the kept tokens exactly as on dense ones.

Each LoRA is identified by its file's sha256 and its scale (:meth:`LoraSpec.to_dict`): both go into the ONNX
metadata (``shiva.loras``), the engine manifest's export key and every cache key, so a changed file or scale
re-exports and the same inputs reuse. Tensors are read with safetensors (no pickle) and checked finite before
diffusers sees them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, WeightsError
from shiva_export.utils.io import sha256_file, sha256_file_cached

__all__ = ["LORA_FILE", "LoraSpec", "fuse_loras_", "load_loras_", "lora_provenance", "resolve_loras"]

#: the file name ``save_lora_weights`` writes into a folder.
LORA_FILE = "pytorch_lora_weights.safetensors"
#: the state-dict prefix of the transformer's LoRA tensors in the diffusers format.
_PREFIX = "transformer."


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora``: its safetensors file, scale and the file's sha256."""

    path: Path
    scale: float
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """What identifies the LoRA in metadata and cache keys (the file name is a label, the sha256 the identity)."""
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def lora_provenance(loras: Sequence[LoraSpec] | None) -> list[dict[str, Any]]:
    return [lo.to_dict() for lo in loras or ()]


def _lora_file(p: Path) -> Path:
    if p.is_dir():
        p = p / LORA_FILE
    if not p.is_file():
        raise ConfigError(
            f"--lora {p} does not exist; pass a diffusers LoRA .safetensors file or the folder save_lora_weights wrote ({LORA_FILE})."
        )
    if p.suffix != ".safetensors":
        raise ConfigError(
            f"--lora {p} is not a .safetensors file; only safetensors LoRAs are read (no pickle). Convert it with safetensors."
        )
    return p


def resolve_loras(
    paths: Sequence[str | os.PathLike] | None, scales: Sequence[float] | None = None
) -> tuple[LoraSpec, ...]:
    """``--lora`` paths and their ``--lora-scale`` values (none given: 1.0 each) as :class:`LoraSpec` (files hashed).

    Raises:
        ConfigError: the numbers of paths and scales differ, a scale is not finite, a file is missing or not safetensors.
    """
    paths = list(paths or ())
    scales = list(scales or ())
    if scales and len(scales) != len(paths):
        raise ConfigError(
            f"{len(paths)} --lora but {len(scales)} --lora-scale; give one --lora-scale per --lora, in the same order (or none for 1.0 each)."
        )
    if not paths:
        return ()
    out = []
    for i, raw in enumerate(paths):
        s = float(scales[i]) if scales else 1.0
        if not math.isfinite(s):
            raise ConfigError(f"--lora-scale {scales[i]} is not a finite number; pass e.g. --lora-scale 0.8.")
        f = _lora_file(Path(raw).expanduser())
        out.append(LoraSpec(f, s, sha256_file_cached(f)))
    return tuple(out)


def _read_checked(lora: LoraSpec) -> tuple[dict, dict | None]:
    """The LoRA's state dict and adapter metadata (rank/alpha), read with safetensors; refuses non-finite tensors,
    files that changed since they were hashed, and files without transformer LoRA tensors."""
    import torch
    from safetensors import SafetensorError, safe_open

    if sha256_file(lora.path) != lora.sha256:
        raise WeightsError(
            f"--lora {lora.path} changed while it was being loaded (sha256 differs); run the command again."
        )
    try:
        with safe_open(str(lora.path), framework="pt") as f:
            names = f.keys()  # a safe_open handle, not a dict
            sd = {k: f.get_tensor(k) for k in names}
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"--lora {lora.path} is not a readable safetensors file ({str(err)[:120]}).") from None
    mine = {k: v for k, v in sd.items() if k.startswith(_PREFIX)}
    if not mine:
        raise WeightsError(
            f"--lora {lora.path} holds no transformer LoRA tensors ('{_PREFIX}*' keys); only transformer LoRAs are supported."
        )
    if len(mine) != len(sd):
        other = sorted({k.split(".", 1)[0] for k in sd if not k.startswith(_PREFIX)})
        raise WeightsError(
            f"--lora {lora.path} also holds {', '.join(other)} LoRA tensors; only transformer LoRAs are supported (the text encoders are not exported)."
        )
    for k, v in mine.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise WeightsError(f"--lora {lora.path}: tensor {k} holds NaN or Inf; this LoRA is damaged, re-save it.")
    meta = None
    raw = header.get("transformer_lora_adapter_metadata")
    if raw:
        import json

        meta = json.loads(raw)
    return mine, meta


def load_loras_(transformer, loras: Sequence[LoraSpec]) -> list[str]:
    """Loads every LoRA into ``transformer`` (diffusers ``load_lora_adapter``) and sets their scales
    (``set_adapters``); unfused. Returns the adapter names. No-op for no LoRAs."""
    names: list[str] = []
    if not loras:
        return names
    for i, lo in enumerate(loras):
        sd, meta = _read_checked(lo)
        name = f"shiva_lora_{i}"
        try:
            transformer.load_lora_adapter(sd, prefix="transformer", adapter_name=name, metadata=meta)
        except (ValueError, KeyError, RuntimeError) as err:  # shape mismatch: a LoRA of another model
            reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
            raise WeightsError(
                f"--lora {lo.path} does not fit this transformer ({reason}); use a LoRA trained for this model."
            ) from None
        names.append(name)
    transformer.set_adapters(names, weights=[lo.scale for lo in loras])
    return names


def fuse_loras_(transformer, loras: Sequence[LoraSpec]) -> None:
    """Loads, fuses at their scales and unloads the LoRAs: ``transformer`` is left a plain model with merged weights."""
    names = load_loras_(transformer, loras)
    if not names:
        return
    transformer.fuse_lora(lora_scale=1.0, adapter_names=names)  # the scales are the adapters' weights (set_adapters)
    transformer.unload_lora()
