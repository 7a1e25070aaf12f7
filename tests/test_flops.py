"""Analytic FLOP counter: a hand count, SD3.5-Medium at 1024 px, ideal speedup, and agreement with torch."""

from __future__ import annotations

import pytest
import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.models.sd3 import FLOP_TERMS as TERMS
from shiva_export.models.sd3 import count_flops
from shiva_export.validate.flops import ideal_speedup
from tests.fixtures.tiny import CATALOGUE, HEIGHT, WIDTH, build, inputs

# One block: it is both block 0 and the last block (context_pre_only), with dual attention.
ONE_BLOCK = dict(
    num_layers=1,
    num_attention_heads=2,
    attention_head_dim=4,  # D = 8
    patch_size=2,
    in_channels=4,
    out_channels=4,
    joint_attention_dim=12,
    caption_projection_dim=8,
    pooled_projection_dim=6,
    dual_attention_layers=(0,),
)
N, T = 16, 5

SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)


def test_one_block_hand_count_dense():
    D = 8
    hand = {
        "embed.patch": 2 * N * (4 * 2 * 2) * D,  # conv: 16 tokens x (C_in 4 * p^2 4) x D 8 = 4096
        "embed.time_text": 2 * (256 * D + D * D + 6 * D + D * D),  # 4448
        "embed.context": 2 * T * 12 * 8,  # 960
        "block.adaln": 2 * D * 9 * D + 2 * D * 2 * D,  # SD35AdaLayerNormZeroX 9D + AdaLayerNormContinuous 2D = 1408
        "block.img.qkv": 3 * 2 * N * D * D,  # 6144
        "block.img.out": 2 * N * D * D,  # 2048
        "block.img.mlp": 2 * 2 * N * D * 4 * D,  # 16384
        "block.txt.qkv": 3 * 2 * T * D * D,  # 1920
        "block.txt.out": 0,  # context_pre_only
        "block.txt.mlp": 0,  # context_pre_only
        "block.attn.joint": 2 * 2 * (N + T) ** 2 * D,  # 14112
        "block.attn2.qkv": 3 * 2 * N * D * D,  # 6144
        "block.attn2.out": 2 * N * D * D,  # 2048
        "block.attn2.sdpa": 2 * 2 * N * N * D,  # 8192
        "block.ctx.adaln": 0,  # context "keep" only
        "block.ctx.kv": 0,
        "router.proj_x": 0,
        "router.context": 0,
        "router.score": 0,
        "router.select": 0,
        "out.norm": 2 * D * 2 * D,  # 256
        "out.proj": 2 * N * D * (2 * 2 * 4),  # 4096
    }
    c = count_flops(ONE_BLOCK, N, T)
    assert c.terms == hand
    assert c.total == 72256 == sum(hand.values())
    assert c.kept_tokens == (16,)
    assert list(c.terms) == list(TERMS)


def test_one_block_hand_count_routed():
    D, k, dp = 8, 8, 4  # keep 0.5 of 16 tokens, router width 4
    hand = {
        "embed.patch": 4096,
        "embed.time_text": 4448,
        "embed.context": 960,
        "block.adaln": 1408,
        "block.img.qkv": 3 * 2 * k * D * D,  # 3072
        "block.img.out": 2 * k * D * D,  # 1024
        "block.img.mlp": 2 * 2 * k * D * 4 * D,  # 8192
        "block.txt.qkv": 1920,
        "block.txt.out": 0,
        "block.txt.mlp": 0,
        "block.attn.joint": 2 * 2 * (k + T) ** 2 * D,  # 5408
        "block.attn2.qkv": 3 * 2 * k * D * D,  # 3072
        "block.attn2.out": 2 * k * D * D,  # 1024
        "block.attn2.sdpa": 2 * 2 * k * k * D,  # 2048
        "block.ctx.adaln": 0,  # context "drop" (the default)
        "block.ctx.kv": 0,
        "router.proj_x": 2 * N * D * dp,  # every token is scored: 1024
        "router.context": 2 * (D + 6) * dp + 2 * dp * dp,  # temb + pooled per sample, layer embedding once: 144
        "router.score": 2 * N * dp,  # 128
        "router.select": 0,  # TopK / gather / scatter: no multiply-adds
        "out.norm": 256,
        "out.proj": 4096,
    }
    c = count_flops(ONE_BLOCK, N, T, [0.5], bottleneck=dp)
    assert c.terms == hand
    assert c.total == sum(hand.values()) == 42320
    assert c.kept_tokens == (8,)
    assert c.router_total == 1024 + 144 + 128
    # batch scales everything except the layer-embedding projection (one vector per call)
    c2 = count_flops(ONE_BLOCK, N, T, [0.5], bottleneck=dp, batch=2)
    assert c2.total == 2 * c.total - 2 * dp * dp


def test_one_block_hand_count_context_keep():
    """Context "keep": the 8 rejected tokens' norm1 + K/V (joint and dual attention), and k + T queries over N + T keys."""
    D, k, dp = 8, 8, 4
    drop = count_flops(ONE_BLOCK, N, T, [0.5], bottleneck=dp)
    keep = count_flops(ONE_BLOCK, N, T, [0.5], bottleneck=dp, context="keep")
    changed = {
        "block.ctx.adaln": 2 * D * 9 * D,  # SD35AdaLayerNormZeroX's linear once more: 1152
        "block.ctx.kv": 2 * 2 * (N - k) * D * D * 2,  # K and V of the rejected tokens, attn and attn2: 4096
        "block.attn.joint": 2 * 2 * (k + T) * (N + T) * D,  # 8736
        "block.attn2.sdpa": 2 * 2 * k * N * D,  # 4096
    }
    assert keep.terms == drop.terms | changed
    assert keep.total == 42320 + 1152 + 4096 + (8736 - 5408) + (4096 - 2048) == 52944
    assert keep.kept_tokens == (8,) and keep.context == "keep" and drop.context == "drop"


def test_sd35_medium_1024px_dense():
    c = count_flops(SD35_MEDIUM, 4096, 333)
    assert c.total == pytest.approx(11.26e12, rel=0.01)
    assert c.total == 11_249_573_707_776  # pinned; see the module docstring for the breakdown
    # the "11.26 T" figure = this count + the last block's text out-proj and MLP (not built in diffusers)
    assert c.total + 18 * 333 * 1536**2 == pytest.approx(11.26e12, rel=5e-4)
    assert c.attention_total / c.total == pytest.approx(0.376, abs=1e-3)
    assert c.router_total == 0


def test_sd35_medium_keep06_ideal_speedup():
    dense = count_flops(SD35_MEDIUM, 4096, 333)
    pruned = count_flops(SD35_MEDIUM, 4096, 333, [None] + [0.6] * 23)
    assert pruned.kept_tokens == (4096,) + (2457,) * 23
    assert pruned.total == pytest.approx(6.2985e12, rel=1e-4)
    assert ideal_speedup(dense, pruned) == pytest.approx(1.786, abs=1e-3)
    assert pruned.router_total == pytest.approx(18.5e9, rel=0.01)  # 0.3 % of the pruned forward


def test_monotonic_in_keep_ratio():
    dense = count_flops(SD35_MEDIUM, 4096, 333)
    keeps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    totals = [count_flops(SD35_MEDIUM, 4096, 333, [None] + [r] * 23).total for r in keeps]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    speedups = [dense.total / t for t in totals]
    assert speedups == sorted(speedups, reverse=True)
    assert speedups[-1] < 1.0  # keep 1.0 pays the router and saves nothing


_COUNTER_CASES = [(name, keep, False) for name in sorted(CATALOGUE) for keep in (None, 0.6)] + [("sd35", 0.6, True)]


@pytest.mark.parametrize(("name", "keep", "cfg"), _COUNTER_CASES)
def test_matches_torch_flop_counter(name, keep, cfg):
    """The analytic count equals torch.utils.flop_counter on real forwards (math SDPA, so QK^T/AV are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from shiva_export.models.sd3 import num_image_tokens
    from shiva_export.prune.api import ShivaConfig, apply_shiva_

    model = build(name)
    x = inputs(model, batch=1, cfg=cfg)
    keeps = None
    if keep is not None:
        config = ShivaConfig.uniform(len(model.transformer_blocks), 1.0 - keep, cfg=cfg)
        apply_shiva_(model, config)
        keeps = config.keep_ratios
    model.requires_grad_(False)  # FlopCounterMode's module tracker trips over grad-less params under no_grad otherwise
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**x)
    n = num_image_tokens(model, HEIGHT, WIDTH)
    ours = count_flops(model, n, x["encoder_hidden_states"].shape[1], keeps, batch=x["hidden_states"].shape[0])
    assert ours.total == counter.get_total_flops()


def test_errors_are_typed():
    with pytest.raises(ConfigError, match="keep_ratios has 2 entries"):
        count_flops(ONE_BLOCK, N, T, [None, 0.5])
    with pytest.raises(ConfigError, match="keep ratio"):
        count_flops(ONE_BLOCK, N, T, [1.5])
    with pytest.raises(ShapeError, match="num_image_tokens"):
        count_flops(ONE_BLOCK, 0, T)
    with pytest.raises(ConfigError, match="dual_attention_layers"):
        count_flops(dict(ONE_BLOCK, dual_attention_layers=(3,)), N, T)
    with pytest.raises(ConfigError, match="different shapes"):
        ideal_speedup(count_flops(ONE_BLOCK, N, T), count_flops(ONE_BLOCK, N, T + 1))


def test_to_dict_and_markdown():
    dense = count_flops(ONE_BLOCK, N, T)
    pruned = count_flops(ONE_BLOCK, N, T, [0.5], bottleneck=4)
    d = pruned.to_dict()
    assert d["total"] == pruned.total and d["terms"]["router.select"] == 0 and d["kept_tokens"] == [8]
    md = pruned.to_markdown(unit=1.0, unit_name="FLOP", reference=dense)
    assert md.count("\n") == len(TERMS) + 3 and "`router.select`" in md
