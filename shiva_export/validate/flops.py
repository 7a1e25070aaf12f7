"""Analytic FLOP count of an SD3/SD3.5 ``SD3Transformer2DModel`` forward, dense or Shiva-pruned.

Convention
----------
* **2 FLOPs per multiply-add**, and only **matrix products** are counted: every ``nn.Linear``, the
  patch-embedding ``Conv2d``, and the two attention products ``Q K^T`` and ``A V`` (counted over all heads:
  ``2 * 2 * S^2 * D`` for ``S`` tokens of width ``D``).
* **Not counted** (elementwise, ``O(tokens * D)`` or less): bias adds, LayerNorm/RMSNorm (including SD3.5
  qk-norm), adaLN modulation ``(1 + scale) * x + shift`` and gates, SiLU/GELU, softmax and its scaling,
  residual adds, the position-embedding add, the sinusoidal timestep features, unpatchify. On SD3.5-Medium
  at 1024 px they would add well under 1 % (softmax alone is ~5 FLOPs per attention score).
* One forward of the transformer (one denoising step) for ``batch`` samples through the network: with
  CFG pass the model batch (``2 x`` prompts).
* Weights that act on one vector per sample (adaLN ``norm1``/``norm1_context``/``norm_out`` linears, the
  time/text embedder, the router's context projections) are counted per sample: tiny but included.

Terms (``S = k + T`` joint tokens, ``k`` = image tokens the block sees: ``N`` dense, ``floor(N * keep)`` routed)
-------------------------------------------------------------------------------------------------------------
================================  ======================================================================
``embed.patch``                   ``2 * N * (C_in * p^2) * D`` (Conv2d, kernel = stride = patch)
``embed.time_text``               ``2 * (256*D + D*D + P*D + D*D)`` per sample (timestep + pooled MLPs)
``embed.context``                 ``2 * T * J * D`` (``context_embedder``, J = joint_attention_dim)
``block.adaln``                   ``2 * D * m * D`` per sample per block, ``m`` = 6 (``norm1``), 9 in dual
                                  blocks (``SD35AdaLayerNormZeroX``); plus ``norm1_context``: 6, or 2 in
                                  the last (``context_pre_only``) block
``block.img.qkv`` / ``.out``      ``3 * 2*k*D^2`` / ``2*k*D^2``
``block.img.mlp``                 ``2 * 2*k*D*4D`` (GELU-tanh FF, 4x)
``block.txt.qkv``                 ``3 * 2*T*D^2`` in every block
``block.txt.out`` / ``.mlp``      ``2*T*D^2`` / ``2 * 2*T*D*4D``, not in the last block (``context_pre_only``:
                                  its text output is never used, diffusers builds no ``to_add_out``/``ff_context``)
``block.attn.joint``              ``2 * 2 * (k+T)^2 * D`` (one SDPA over ``[image; text]``)
``block.attn2.qkv`` / ``.out``    dual-attention blocks only (SD3.5-M blocks 0..12): ``3 * 2*k*D^2`` / ``2*k*D^2``
``block.attn2.sdpa``              ``2 * 2 * k^2 * D`` (image-only self-attention)
``block.ctx.adaln``                context ``"keep"`` only (routed blocks with ``k < N``): ``norm1``'s linear once
                                  more, ``2 * D * m * D`` per sample (the full-token context is normalised and
                                  modulated by the block's own ``norm1``)
``block.ctx.kv``                  context ``"keep"`` only: K/V projections of the ``N - k`` rejected tokens,
                                  ``2 * 2*(N-k)*D^2``, again for ``attn2`` in dual blocks; the attention
                                  products then run ``k + T`` queries over ``N + T`` keys:
                                  ``block.attn.joint`` = ``2 * 2 * (k+T)(N+T) * D``, ``block.attn2.sdpa`` =
                                  ``2 * 2 * k * N * D``
``router.proj_x``                 routed blocks: ``2 * N * D * d'`` (every token is scored)
``router.context``                ``2 * (D + P) * d'`` per sample + ``2 * d'^2`` (layer embedding, once)
``router.score``                  ``2 * N * d'``; the router's LayerNorm/SiLU are elementwise (not counted)
``router.select``                 0: TopK, the compaction CumSums, gather and scatter move data and do no
                                  multiply-adds; they are listed so the table says so
``out.norm`` / ``out.proj``       ``2 * D * 2D`` per sample / ``2 * N * D * (p^2 * C_out)``
================================  ======================================================================

SD3.5-Medium at 1024 px (N = 4096, T = 333, D = 1536, 24 blocks, dual attention in 0..12, batch 1):
**11.2496 TFLOP** dense (11,249,573,707,776): 11.2437 T in the blocks (1.52 GFLOP of it adaLN
linears), 5.83 GFLOP model-level (patch conv 0.81, context embedder 4.19, time/text embedder 0.017,
norm_out 0.009, proj_out 0.81). Attention products are 37.6 % of it. The often-quoted "~11.26 T" is the
same count within 0.1 %: it is what one gets by also giving the last block a full text stream
(+14.15 GFLOP of text out-proj and MLP that diffusers never builds for a ``context_pre_only`` block),
11.2637 T. Keep 0.6 in blocks 1..23 (block 0 dense): 6.2985 T, ideal speedup 1.786x.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.logging import get_logger
from shiva_export.prune.topk import static_k

__all__ = ["FlopCount", "count_flops", "count_model_flops", "assemble_count", "router_terms", "ideal_speedup", "TERMS"]

logger = get_logger(__name__)

#: Width of SD3's sinusoidal timestep features (``Timesteps(num_channels=256)`` in diffusers).
_TIMESTEP_CHANNELS = 256

#: ``SD3Transformer2DModel.__init__`` defaults (diffusers), used for keys a config dict leaves out.
_DEFAULTS: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": None,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "dual_attention_layers": (),
}

#: Every term name, in report order (model-level, per block, router, output).
TERMS: tuple[str, ...] = (
    "embed.patch",
    "embed.time_text",
    "embed.context",
    "block.adaln",
    "block.img.qkv",
    "block.img.out",
    "block.img.mlp",
    "block.txt.qkv",
    "block.txt.out",
    "block.txt.mlp",
    "block.attn.joint",
    "block.attn2.qkv",
    "block.attn2.out",
    "block.attn2.sdpa",
    "block.ctx.adaln",
    "block.ctx.kv",
    "router.proj_x",
    "router.context",
    "router.score",
    "router.select",
    "out.norm",
    "out.proj",
)
_ATTENTION_TERMS = ("block.attn.joint", "block.attn2.sdpa")


@dataclass(frozen=True)
class _Arch:
    hidden: int
    num_layers: int
    pooled: int
    joint: int
    caption: int
    patch: int
    in_channels: int
    out_channels: int
    dual: frozenset[int]


def _read_config(config: Any) -> _Arch:
    cfg = getattr(config, "config", config)  # a transformer -> its config
    if isinstance(cfg, Mapping):
        get = lambda key: cfg.get(key, _DEFAULTS.get(key))  # noqa: E731
    else:
        get = lambda key: getattr(cfg, key, _DEFAULTS.get(key))  # noqa: E731
    try:
        heads, head_dim = int(get("num_attention_heads")), int(get("attention_head_dim"))
        in_ch = int(get("in_channels"))
        out_ch = get("out_channels")
        arch = _Arch(
            hidden=heads * head_dim,
            num_layers=int(get("num_layers")),
            pooled=int(get("pooled_projection_dim")),
            joint=int(get("joint_attention_dim")),
            caption=int(get("caption_projection_dim")),
            patch=int(get("patch_size")),
            in_channels=in_ch,
            out_channels=in_ch if out_ch is None else int(out_ch),
            dual=frozenset(int(i) for i in (get("dual_attention_layers") or ())),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"SD3 transformer config cannot be read for FLOP counting: {err}. Expected integer fields such as "
            "num_layers, num_attention_heads, attention_head_dim. Pass a diffusers config, a config dict or the model."
        ) from None
    for name in ("hidden", "num_layers", "pooled", "joint", "caption", "patch", "in_channels", "out_channels"):
        if getattr(arch, name) < 1:
            raise ConfigError(f"SD3 transformer config field {name} is {getattr(arch, name)}. It must be >= 1. Fix the config.")
    bad = sorted(i for i in arch.dual if not 0 <= i < arch.num_layers)
    if bad:
        raise ConfigError(
            f"dual_attention_layers holds {bad}. Valid block indices are 0..{arch.num_layers - 1}. Fix the config."
        )
    return arch


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one transformer forward, term by term (see the module docstring for the convention).

    Args:
        terms (dict[str, int]): Term name -> FLOPs summed over blocks, in :data:`TERMS` order.
        blocks (tuple[dict[str, int], ...]): Per-block breakdown (``block.*`` and ``router.*`` terms).
        kept_tokens (tuple[int, ...]): Image tokens each block processes (``N`` for dense blocks).
        num_image_tokens (int): N.
        text_len (int): T.
        batch (int): Samples through the network (CFG: 2 x prompts).
        keep_ratios (tuple[float | None, ...]): Per-block keep ratio, ``None`` for dense.
        bottleneck (int): Router width d' used for the router terms.
        context (str): The routing's ``ShivaConfig.context`` the count is for.
    """

    terms: dict[str, int]
    blocks: tuple[dict[str, int], ...]
    kept_tokens: tuple[int, ...]
    num_image_tokens: int
    text_len: int
    batch: int
    keep_ratios: tuple[float | None, ...]
    bottleneck: int = 64
    notes: tuple[str, ...] = field(default=())
    context: str = "drop"

    @property
    def total(self) -> int:
        """All FLOPs of the forward."""
        return sum(self.terms.values())

    @property
    def blocks_total(self) -> int:
        """FLOPs inside the transformer blocks (``block.*``), router excluded."""
        return sum(v for k, v in self.terms.items() if k.startswith("block."))

    @property
    def router_total(self) -> int:
        """Router + selection FLOPs (``router.*``)."""
        return sum(v for k, v in self.terms.items() if k.startswith("router."))

    @property
    def model_level_total(self) -> int:
        """Embeddings and the output head (``embed.*`` and ``out.*``)."""
        return sum(v for k, v in self.terms.items() if k.startswith(("embed.", "out.")))

    @property
    def attention_total(self) -> int:
        """The quadratic attention products (``QK^T`` and ``AV``), joint and attn2."""
        return sum(v for k, v in self.terms.items() if k in _ATTENTION_TERMS or k.endswith(".sdpa"))

    @property
    def routed(self) -> bool:
        return any(r is not None for r in self.keep_ratios)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "blocks_total": self.blocks_total,
            "router_total": self.router_total,
            "model_level_total": self.model_level_total,
            "attention_total": self.attention_total,
            "terms": dict(self.terms),
            "kept_tokens": list(self.kept_tokens),
            "num_image_tokens": self.num_image_tokens,
            "text_len": self.text_len,
            "batch": self.batch,
            "keep_ratios": list(self.keep_ratios),
            "bottleneck": self.bottleneck,
            "context": self.context,
            "convention": "2 FLOPs per multiply-add; matrix products only (Linear, patch Conv2d, QK^T, AV)",
        }

    def to_markdown(self, unit: float = 1e9, unit_name: str = "GFLOP", reference: FlopCount | None = None) -> str:
        """Markdown table of the terms (and of a reference count, e.g. the dense model, when given)."""
        head = f"| term | {unit_name} |" + (f" reference {unit_name} |" if reference else "")
        rule = "|---|---:|" + ("---:|" if reference else "")
        lines = [head, rule]
        for name in self.terms:
            cell = f"| `{name}` | {self.terms[name] / unit:,.3f} |"
            if reference:
                cell += f" {reference.terms[name] / unit:,.3f} |"
            lines.append(cell)
        total = f"| **total** | **{self.total / unit:,.3f}** |"
        if reference:
            total += f" **{reference.total / unit:,.3f}** |"
        lines.append(total)
        return "\n".join(lines) + "\n"


def count_flops(
    config: Any,
    num_image_tokens: int,
    text_len: int,
    keep_ratios: Sequence[float | None] | None = None,
    *,
    batch: int = 1,
    bottleneck: int = 64,
    context: str = "drop",
) -> FlopCount:
    """Counts the FLOPs of one ``SD3Transformer2DModel`` forward, dense or with Shiva routing.

    Args:
        config (Any): A diffusers config (``transformer.config``), a config dict, or the transformer.
            Keys it lacks take ``SD3Transformer2DModel``'s defaults.
        num_image_tokens (int): N, image tokens (``(H/16) * (W/16)`` for SD3 at patch 2).
        text_len (int): T, text tokens (333 for SD3 with 256 T5 tokens).
        keep_ratios (Sequence[float | None]): One entry per block, ``None`` = dense, else the keep ratio in
            (0, 1]; ``k = floor(N * keep)`` as in :func:`~shiva_export.prune.topk.static_k`. ``None`` (the
            argument) means a dense model with no router. Defaults to None.
        batch (int): Samples through the network (with CFG, 2 x prompts). Defaults to 1.
        bottleneck (int): Router width d'. Defaults to 64.
        context (str): The routing's ``ShivaConfig.context``: ``"keep"`` adds the rejected tokens' context
            (``block.ctx.*``, keys over ``N + T`` tokens) to routed blocks with ``k < N``; at ``k = N`` the
            routing computes no separate context, so keep 1.0 counts as dense. Defaults to ``"drop"``.

    Returns:
        FlopCount: Term-by-term FLOPs and totals.

    Example:
        >>> cfg = dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
        ...            dual_attention_layers=tuple(range(13)))
        >>> round(count_flops(cfg, 4096, 333).total / 1e12, 2)
        11.25
    """
    from shiva_export.prune.api import check_context

    check_context(context)
    arch = _read_config(config)
    for name, v in (("num_image_tokens", num_image_tokens), ("text_len", text_len), ("batch", batch), ("bottleneck", bottleneck)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapeError(f"{name} for FLOP counting is {v!r}. It must be an integer >= 1. Pass a positive token/batch count.")
    L, D, N, T, B, dp = arch.num_layers, arch.hidden, num_image_tokens, text_len, batch, bottleneck
    if keep_ratios is None:
        keeps: tuple[float | None, ...] = (None,) * L
    else:
        keeps = tuple(keep_ratios)
        if len(keeps) != L:
            raise ConfigError(f"keep_ratios has {len(keeps)} entries for a {L}-block model. Give one per block (None = dense). Fix the schedule.")
    kept = tuple(N if r is None else static_k(N, r) for r in keeps)  # static_k validates 0 < r <= 1 and k >= 1

    terms = dict.fromkeys(TERMS, 0)
    p2 = arch.patch * arch.patch
    terms["embed.patch"] = 2 * B * N * arch.in_channels * p2 * D
    terms["embed.time_text"] = 2 * B * (_TIMESTEP_CHANNELS * D + D * D + arch.pooled * D + D * D)
    terms["embed.context"] = 2 * B * T * arch.joint * arch.caption
    terms["out.norm"] = 2 * B * D * 2 * D
    terms["out.proj"] = 2 * B * N * D * p2 * arch.out_channels

    blocks = []
    for i in range(L):
        k, last, dual = kept[i], i == L - 1, i in arch.dual
        ctx = context == "keep" and keeps[i] is not None and k < N  # rejected tokens still give keys and values
        kv = N if ctx else k  # image keys the attention products run over
        b = dict.fromkeys((t for t in TERMS if t.startswith(("block.", "router."))), 0)
        b["block.adaln"] = 2 * B * D * D * ((9 if dual else 6) + (2 if last else 6))
        b["block.img.qkv"] = 3 * 2 * B * k * D * D
        b["block.img.out"] = 2 * B * k * D * D
        b["block.img.mlp"] = 2 * 2 * B * k * D * 4 * D
        b["block.txt.qkv"] = 3 * 2 * B * T * D * D
        if not last:
            b["block.txt.out"] = 2 * B * T * D * D
            b["block.txt.mlp"] = 2 * 2 * B * T * D * 4 * D
        b["block.attn.joint"] = 2 * 2 * B * (k + T) * (kv + T) * D
        if dual:
            b["block.attn2.qkv"] = 3 * 2 * B * k * D * D
            b["block.attn2.out"] = 2 * B * k * D * D
            b["block.attn2.sdpa"] = 2 * 2 * B * k * kv * D
        if ctx:
            b["block.ctx.adaln"] = 2 * B * D * D * (9 if dual else 6)
            b["block.ctx.kv"] = 2 * 2 * B * (N - k) * D * D * (2 if dual else 1)
        if keeps[i] is not None:
            b["router.proj_x"] = 2 * B * N * D * dp
            b["router.context"] = 2 * B * (D + arch.pooled) * dp + 2 * dp * dp
            b["router.score"] = 2 * B * N * dp
            b["router.select"] = 0
        blocks.append(b)
        for name, v in b.items():
            terms[name] += v

    notes = (
        "2 FLOPs per multiply-add; only matrix products are counted (Linear, patch Conv2d, QK^T, AV)",
        "not counted: biases, norms (incl. qk RMSNorm), modulation/gates, activations, softmax, residuals",
        "router.select = 0: TopK, CumSum compaction, gather and scatter do no multiply-adds",
        "last block is context_pre_only: text stream has qkv only (no to_add_out, no ff_context)",
    ) + (("context keep: rejected tokens' norm1 + K/V (block.ctx.*), attention over all N image keys",) if context == "keep" else ())
    return FlopCount(terms, tuple(blocks), kept, N, T, B, keeps, dp, notes, context)


def ideal_speedup(dense: FlopCount, pruned: FlopCount) -> float:
    """FLOP ratio ``dense.total / pruned.total``: the speedup if time were proportional to FLOPs.

    Args:
        dense (FlopCount): The reference count (usually ``keep_ratios=None``).
        pruned (FlopCount): The pruned count at the same shapes.

    Raises:
        ConfigError: The two counts are for different token counts or batch sizes.
    """
    a = (dense.num_image_tokens, dense.text_len, dense.batch)
    b = (pruned.num_image_tokens, pruned.text_len, pruned.batch)
    if a != b:
        raise ConfigError(
            f"ideal_speedup compares counts at different shapes: (N, T, batch) = {a} vs {b}. They must match. "
            "Count both at the same image size, text length and batch."
        )
    return dense.total / pruned.total


def router_terms(batch: int, n: int, hidden: int, pooled: int, bottleneck: int) -> dict[str, int]:
    """The router's matmul FLOPs in one routed block (the same router for every architecture)."""
    B, N, D, dp = batch, n, hidden, bottleneck
    return {
        "router.proj_x": 2 * B * N * D * dp,
        "router.context": 2 * B * (D + pooled) * dp + 2 * dp * dp,
        "router.score": 2 * B * N * dp,
        "router.select": 0,
    }


def _check_counts(num_image_tokens: int, text_len: int, batch: int, bottleneck: int) -> None:
    for name, v in (("num_image_tokens", num_image_tokens), ("text_len", text_len), ("batch", batch), ("bottleneck", bottleneck)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapeError(f"{name} for FLOP counting is {v!r}. It must be an integer >= 1. Pass a positive token/batch count.")


def assemble_count(num_blocks: int, num_image_tokens: int, text_len: int, keep_ratios, batch: int, bottleneck: int,
                   model_terms: dict[str, int], block_terms, notes: tuple[str, ...] = ()) -> FlopCount:
    """Builds a :class:`FlopCount` for a non-SD3 adapter.

    Args:
        block_terms (Callable[[int, int, bool], dict[str, int]]): ``(block index, kept tokens k, routed)`` ->
            that block's ``block.*`` terms (router terms are added here for routed blocks).
    """
    _check_counts(num_image_tokens, text_len, batch, bottleneck)
    N = num_image_tokens
    keeps = (None,) * num_blocks if keep_ratios is None else tuple(keep_ratios)
    if len(keeps) != num_blocks:
        raise ConfigError(f"keep_ratios has {len(keeps)} entries for a {num_blocks}-block model. Give one per block (None = dense). Fix the schedule.")
    kept = tuple(N if r is None else static_k(N, r) for r in keeps)
    terms = dict(model_terms)
    blocks = []
    for i in range(num_blocks):
        b = dict(block_terms(i, kept[i], keeps[i] is not None))
        blocks.append(b)
        for name, v in b.items():
            terms[name] = terms.get(name, 0) + v
    return FlopCount(terms, tuple(blocks), kept, N, text_len, batch, keeps, bottleneck, notes)


def count_model_flops(model_or_architecture: Any, config: Any, num_image_tokens: int, text_len: int,
                      keep_ratios: Sequence[float | None] | None = None, *, batch: int = 1, bottleneck: int = 64,
                      context: str = "drop") -> FlopCount:
    """:func:`count_flops` for any architecture: the adapter of ``model_or_architecture`` (a transformer, a
    class name or a recipe ``architecture`` key) counts ``config`` (a config dict or diffusers config)."""
    from shiva_export.models.base import get_adapter

    return get_adapter(model_or_architecture).count_flops(config, num_image_tokens, text_len, keep_ratios, batch=batch, bottleneck=bottleneck,
                                                          context=context)
