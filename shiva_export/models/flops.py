"""FLOP bookkeeping shared by every adapter's analytic count (``ModelAdapter.count_flops``).

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

Each adapter owns its formula (``models/sd3.py``, ``flux.py``, ``pixart.py``, ``dit.py``) and returns a
:class:`FlopCount`; :func:`assemble_count` sums per-block terms and adds the router's (:func:`router_terms`,
the same router for every architecture). ``shiva_export.validate.flops`` compares counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.prune.topk import static_k

__all__ = ["FlopCount", "assemble_count", "router_terms", "check_counts"]

#: The quadratic attention products of SD3 (other adapters name theirs ``*.sdpa``).
_ATTENTION_TERMS = ("block.attn.joint", "block.attn2.sdpa")


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


def router_terms(batch: int, n: int, hidden: int, pooled: int, bottleneck: int) -> dict[str, int]:
    """The router's matmul FLOPs in one routed block (the same router for every architecture)."""
    B, N, D, dp = batch, n, hidden, bottleneck
    return {
        "router.proj_x": 2 * B * N * D * dp,
        "router.context": 2 * B * (D + pooled) * dp + 2 * dp * dp,
        "router.score": 2 * B * N * dp,
        "router.select": 0,
    }


def check_counts(num_image_tokens: int, text_len: int, batch: int, bottleneck: int) -> None:
    """ShapeError unless every count is an integer >= 1."""
    for name, v in (
        ("num_image_tokens", num_image_tokens),
        ("text_len", text_len),
        ("batch", batch),
        ("bottleneck", bottleneck),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapeError(
                f"{name} for FLOP counting is {v!r}. It must be an integer >= 1. Pass a positive token/batch count."
            )


def assemble_count(
    num_blocks: int,
    num_image_tokens: int,
    text_len: int,
    keep_ratios,
    batch: int,
    bottleneck: int,
    model_terms: dict[str, int],
    block_terms,
    notes: tuple[str, ...] = (),
) -> FlopCount:
    """Builds a :class:`FlopCount` for a non-SD3 adapter.

    Args:
        block_terms (Callable[[int, int, bool], dict[str, int]]): ``(block index, kept tokens k, routed)`` ->
            that block's ``block.*`` terms (router terms are added here for routed blocks).
    """
    check_counts(num_image_tokens, text_len, batch, bottleneck)
    N = num_image_tokens
    keeps = (None,) * num_blocks if keep_ratios is None else tuple(keep_ratios)
    if len(keeps) != num_blocks:
        raise ConfigError(
            f"keep_ratios has {len(keeps)} entries for a {num_blocks}-block model. Give one per block (None = dense). Fix the schedule."
        )
    kept = tuple(N if r is None else static_k(N, r) for r in keeps)
    terms = dict(model_terms)
    blocks = []
    for i in range(num_blocks):
        b = dict(block_terms(i, kept[i], keeps[i] is not None))
        blocks.append(b)
        for name, v in b.items():
            terms[name] = terms.get(name, 0) + v
    return FlopCount(terms, tuple(blocks), kept, N, text_len, batch, keeps, bottleneck, notes)
