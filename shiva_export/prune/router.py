"""The context-aware token router (paper Sec. 2.2, Eqs. 8-9).

``score_i = w^T LayerNorm(SiLU(P_x(x_i) + P_t(temb) + P_c(pooled) + P_l(e_l)))`` with a bottleneck of
width ``d'`` (64 by default). One :class:`ShivaRouter` serves ``group_size`` adjacent routed blocks and
tells them apart with a learned layer embedding ``e_l`` ("Group-12": pairs of blocks on a 24-block model).

Inputs reused from the backbone: ``x_i`` is the block's input image token, ``temb`` the backbone's
conditioning vector (``time_text_embed(timestep, pooled)``, width D), ``pooled`` the raw pooled text
projection (2048-d on SD3). With D = 1536 this gives (1536 + 1536 + 2048) x 64 weights per router,
matching the paper's 4.1 M parameters for 12 routers.

Routers always compute in float32, whatever the backbone dtype: top-k is sensitive to ties and
rounding, and fp32 scores keep the PyTorch, ONNX Runtime and TensorRT selections identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shiva_export.checks import check_finite
from shiva_export.errors import RouterError
from shiva_export.utils.io import canonical_json, check_writable, sha256_file

__all__ = ["RouterConfig", "ShivaRouter", "RouterBank", "save_routers", "load_routers", "read_router_metadata"]

_FORMAT = "shiva-router/1"


@dataclass(frozen=True)
class RouterConfig:
    """Shape of the router bank.

    Args:
        hidden_dim (int): Backbone width D (image tokens and temb).
        pooled_dim (int): Width of the pooled text projection.
        routed_blocks (tuple[int, ...]): Block indices that are routed, ascending.
        bottleneck (int): Router width d'. Defaults to 64.
        group_size (int): Adjacent routed blocks sharing one router. Defaults to 2.
    """

    hidden_dim: int
    pooled_dim: int
    routed_blocks: tuple[int, ...]
    bottleneck: int = 64
    group_size: int = 2

    def __post_init__(self):
        if not self.routed_blocks:
            raise RouterError("routed_blocks is empty; route at least one block (block 0 always stays dense).")
        if list(self.routed_blocks) != sorted(set(self.routed_blocks)) or self.routed_blocks[0] < 1:
            raise RouterError(
                f"routed_blocks {list(self.routed_blocks)} must be unique, ascending and >= 1 (block 0 is always dense)."
            )
        if self.bottleneck < 1 or self.group_size < 1:
            raise RouterError(f"bottleneck ({self.bottleneck}) and group_size ({self.group_size}) must be >= 1.")

    @property
    def num_routers(self) -> int:
        return -(-len(self.routed_blocks) // self.group_size)

    def slot(self, block: int) -> tuple[int, int]:
        """(router index, layer slot) of a routed block."""
        pos = self.routed_blocks.index(block)
        return divmod(pos, self.group_size)

    def to_dict(self) -> dict:
        return {
            "hidden_dim": self.hidden_dim,
            "pooled_dim": self.pooled_dim,
            "routed_blocks": list(self.routed_blocks),
            "bottleneck": self.bottleneck,
            "group_size": self.group_size,
        }


class ShivaRouter(nn.Module):
    """One router shared by ``group_size`` adjacent blocks; returns ``[B, N]`` float32 scores."""

    def __init__(self, hidden_dim: int, pooled_dim: int, bottleneck: int = 64, group_size: int = 2):
        super().__init__()
        self.proj_x = nn.Linear(hidden_dim, bottleneck)
        self.proj_t = nn.Linear(hidden_dim, bottleneck, bias=False)
        self.proj_c = nn.Linear(pooled_dim, bottleneck, bias=False)
        self.layer_embed = nn.Embedding(group_size, bottleneck)
        self.proj_l = nn.Linear(bottleneck, bottleneck, bias=False)
        self.norm = nn.LayerNorm(bottleneck)
        self.score = nn.Linear(bottleneck, 1, bias=False)

    def context(self, temb: torch.Tensor, pooled: torch.Tensor, slot: int) -> torch.Tensor:
        """``P_t(temb) + P_c(pooled) + P_l(e_slot)`` as ``[B, 1, d']`` (per-sample shift)."""
        e = self.layer_embed.weight[slot]
        h = self.proj_t(temb.float()) + self.proj_c(pooled.float()) + self.proj_l(e)
        return h.unsqueeze(1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, pooled: torch.Tensor, slot: int) -> torch.Tensor:
        h = self.proj_x(x.float()) + self.context(temb, pooled, slot)
        return self.score(self.norm(torch.nn.functional.silu(h))).squeeze(-1)


class RouterBank(nn.Module):
    """All routers of one model, addressed by block index. Parameters stay float32 under ``.to(dtype)``."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        self.routers = nn.ModuleList(
            ShivaRouter(config.hidden_dim, config.pooled_dim, config.bottleneck, config.group_size)
            for _ in range(config.num_routers)
        )

    def _apply(self, fn, recurse=True):
        # Let device moves through but keep floating parameters in float32 (see module docstring).
        super()._apply(fn, recurse)
        for p in self.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def forward(self, block: int, x: torch.Tensor, temb: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        r, slot = self.config.slot(block)
        return self.routers[r](x, temb, pooled, slot)

    def reset_parameters(self, seed: int) -> None:
        """Seeded random init (deterministic across machines): used until a trained router is loaded."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                elif name.endswith("layer_embed.weight"):
                    p.copy_(torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def read_router_metadata(path: str | Path) -> dict:
    """The Shiva metadata of a router file (format, config, and what training recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["shiva"]) if "shiva" in meta else meta


def save_routers(bank: RouterBank, path: str | Path, extra: dict | None = None) -> str:
    """Writes the router bank as safetensors (atomically, byte-reproducible) and returns its sha256."""
    from safetensors.torch import save_file

    path = check_writable(path, "router weights")
    # One metadata key holding canonical JSON: safetensors writes its metadata map in arbitrary order,
    # so several keys would make the same weights hash differently from save to save.
    meta = {"shiva": canonical_json({"format": _FORMAT, "config": bank.config.to_dict(), **(extra or {})})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in bank.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(path)


def load_routers(path: str | Path, expected: RouterConfig) -> tuple[RouterBank, str]:
    """Loads router weights from safetensors and checks they fit ``expected``.

    Returns:
        tuple[RouterBank, str]: The bank and the file's sha256.

    Raises:
        RouterError: The file is unreadable, not a Shiva router file, or built for another model/config.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise RouterError(
            f"Router weights must be a .safetensors file, got: {path}. Convert or re-save them with save_routers()."
        )
    if not path.is_file():
        raise RouterError(f"Router weights not found: {path}. Pass an existing .safetensors file to --router.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise RouterError(f"Cannot read router weights {path}: {err}. Is it a safetensors file?") from None

    check_finite(tensors, f"router weights {path}", RouterError)  # a NaN score makes top-k pick arbitrary tokens
    if "shiva" in meta:
        meta = json.loads(meta["shiva"])
    elif "config" in meta:  # files written before the single-key layout
        meta = {**meta, "config": json.loads(meta["config"])}
    if meta.get("format") != _FORMAT:
        raise RouterError(f"{path} is not a Shiva router file (format {meta.get('format')!r}, expected {_FORMAT!r}).")
    got = meta["config"]
    want = expected.to_dict()
    if got != want:
        diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        raise RouterError(
            f"Router weights {path} were made for another model/config: "
            + "; ".join(f"{k} = {a} in the file, {b} expected" for k, (a, b) in diff.items())
            + ". Use the router trained for this model, or omit --router for the recipe's default."
        )
    bank = RouterBank(expected)
    missing, unexpected = bank.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RouterError(
            f"Router weights {path} do not match the router layout (missing {missing}, unexpected {unexpected})."
        )
    return bank, sha256_file(path)
