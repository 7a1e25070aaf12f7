"""The Shiva pruning core: exact identities, budgets, reversibility, CFG, routers."""

from __future__ import annotations

import copy

import pytest
import torch

from shiva_export.errors import ConfigError, RouterError
from shiva_export.models.sd3 import num_image_tokens
from shiva_export.prune import (
    RouterBank,
    ShivaConfig,
    apply_shiva_,
    block_budgets,
    is_shiva_applied,
    load_routers,
    record_selection,
    remove_shiva_,
    save_routers,
    select_topk,
    static_k,
)
from tests.fixtures import tiny

torch.use_deterministic_algorithms(True)
MODELS = ["sd3", "sd35", "sd35-diffusers-test"]


def _dense(model, x):
    with torch.no_grad():
        return model(**x).sample


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch,cfg", [(1, False), (1, True)])  # CFG: model batch 2
@pytest.mark.parametrize("selection", ["bounded", "topk"])
def test_keep_one_is_bit_identical(name, batch, cfg, selection):
    model = tiny.build(name)
    x = tiny.inputs(model, batch=batch, cfg=cfg)
    ref = _dense(model, x)
    config = ShivaConfig.uniform(len(model.transformer_blocks), 0.0, cfg=cfg, selection=selection)
    apply_shiva_(model, config)
    with record_selection(model) as rec:
        out = _dense(model, x)
    n = num_image_tokens(model, tiny.HEIGHT, tiny.WIDTH)
    assert [r["block"] for r in rec] == list(range(1, len(model.transformer_blocks)))
    assert all(r["k"] == n and r["indices"].shape == (x["hidden_states"].shape[0], n) for r in rec)
    assert torch.equal(out, ref), f"max abs diff {(out - ref).abs().max().item()}"


@pytest.mark.parametrize("name", MODELS)
def test_ratio_04_budget_identity_and_removal(name):
    model = tiny.build(name)
    x = tiny.inputs(model, batch=2, cfg=True)
    ref = _dense(model, x)
    n_layers = len(model.transformer_blocks)
    config = ShivaConfig.uniform(n_layers, 0.4, cfg=True)
    apply_shiva_(model, config, seed=3)
    n = num_image_tokens(model, tiny.HEIGHT, tiny.WIDTH)
    k = int(n * 0.6)
    seen_shapes = {}
    # tokens the unmodified diffusers block computes on (its first layer); the block's own call sees all N
    # (a routed block gathers and scatters inside its forward)
    hooks = [
        blk.norm1.register_forward_pre_hook(lambda m, a, i=i: seen_shapes.__setitem__(i, tuple(a[0].shape)))
        for i, blk in enumerate(model.transformer_blocks)
    ]
    with record_selection(model, hidden_states=True) as rec:
        out = _dense(model, x)
    for h in hooks:
        h.remove()
    assert seen_shapes[0][1] == n  # first block dense
    for i in range(1, n_layers):
        assert seen_shapes[i][1] == k, f"block {i} processed {seen_shapes[i][1]} tokens, expected k={k}"
    assert block_budgets(config, n) == {i: k for i in range(1, n_layers)}
    for r in rec:
        idx = r["indices"]
        assert idx.shape == (4, k)
        assert torch.all(idx[:, 1:] > idx[:, :-1]), "kept indices must be ascending and unique"
        rejected = torch.ones(4, n, dtype=torch.bool)
        rejected.scatter_(1, idx, False)
        assert torch.equal(r["hidden_out"][rejected], r["hidden_in"][rejected]), (
            "rejected tokens must pass through unchanged"
        )
        assert torch.equal(
            r["block_input"],
            torch.gather(r["hidden_in"], 1, idx.unsqueeze(-1).expand(-1, -1, r["hidden_in"].shape[-1])),
        )
        # CFG: both halves keep the same tokens, chosen from the element-wise max of their scores
        assert torch.equal(idx[:2], idx[2:])
        s = r["scores"]
        assert torch.equal(idx[:2], select_topk(torch.cat([torch.maximum(s[:2], s[2:])] * 2), k)[:2])
    assert not torch.equal(out, ref)
    bank = remove_shiva_(model)
    assert isinstance(bank, RouterBank) and not is_shiva_applied(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "shiva_routers")
    assert torch.equal(_dense(model, x), ref), "remove_shiva_ must restore the dense outputs exactly"


def test_per_block_schedule_and_first_block_dense():
    model = tiny.build("sd35")
    n = num_image_tokens(model, tiny.HEIGHT, tiny.WIDTH)
    config = ShivaConfig((None, 0.9, 0.5, None))
    apply_shiva_(model, config)
    with record_selection(model) as rec:
        _dense(model, tiny.inputs(model))
    assert [(r["block"], r["k"]) for r in rec] == [(1, int(n * 0.9)), (2, n // 2)]
    with pytest.raises(ConfigError, match="block 0"):
        ShivaConfig((0.5, 0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="one per block"):
        remove_shiva_(model)
        apply_shiva_(model, ShivaConfig((None, 0.5)))


def test_apply_twice_and_remove_unapplied_are_errors():
    model = tiny.build("sd3")
    with pytest.raises(ConfigError, match="not applied"):
        remove_shiva_(model)
    apply_shiva_(model, ShivaConfig.uniform(4, 0.2))
    with pytest.raises(ConfigError, match="already applied"):
        apply_shiva_(model, ShivaConfig.uniform(4, 0.2))


@pytest.mark.parametrize(
    "n,keep,k",
    [(4096, 0.6, 2457), (1024, 0.8, 819), (1000, 0.7, 700), (1000, 1 - 0.3, 700), (64, 1.0, 64), (10, 0.1, 1)],
)
def test_static_k_floor(n, keep, k):
    assert static_k(n, keep) == k


def test_static_k_errors():
    with pytest.raises(ConfigError, match="k = 0"):
        static_k(64, 0.01)
    with pytest.raises(ConfigError, match="out of range"):
        static_k(64, 0.0)
    with pytest.raises(ConfigError, match="out of range"):
        ShivaConfig.uniform(4, 1.0)
    with pytest.raises(ConfigError, match="out of range"):
        ShivaConfig.uniform(4, -0.1)


def test_router_stays_fp32_and_roundtrips(tmp_path):
    model = tiny.build("sd35")
    config = ShivaConfig.uniform(4, 0.4)
    bank = apply_shiva_(model, config, seed=5)
    model.half()
    assert all(p.dtype == torch.float32 for p in bank.parameters())
    assert next(model.transformer_blocks.parameters()).dtype == torch.float16
    path = tmp_path / "router.safetensors"
    sha = save_routers(bank, path)
    loaded, sha2 = load_routers(path, bank.config)
    assert sha == sha2
    for (k1, v1), (k2, v2) in zip(sorted(bank.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2)
    # Group-12 layout: 3 routed blocks in pairs -> 2 routers
    assert bank.config.num_routers == 2 and bank.config.slot(3) == (1, 0)
    other = ShivaConfig.uniform(4, 0.4, bottleneck=32).router_config(
        64 * 0 + bank.config.hidden_dim, bank.config.pooled_dim
    )
    with pytest.raises(RouterError, match="bottleneck = 64 in the file, 32 expected"):
        load_routers(path, other)
    bad = tmp_path / "router.pt"
    bad.write_bytes(b"x")
    with pytest.raises(RouterError, match="safetensors"):
        load_routers(bad, bank.config)


def test_router_scores_batch_order_invariant():
    model = tiny.build("sd3")
    apply_shiva_(model, ShivaConfig.uniform(4, 0.5))
    x = tiny.inputs(model, batch=3)
    perm = torch.tensor([2, 0, 1])
    xp = {k: v[perm] for k, v in x.items()}
    with torch.no_grad(), record_selection(model) as a:
        model(**x)
    with torch.no_grad(), record_selection(model) as b:
        model(**xp)
    for ra, rb in zip(a, b):
        assert torch.allclose(ra["scores"][perm], rb["scores"], atol=1e-6)
        assert torch.equal(ra["indices"][perm], rb["indices"])


def test_deepcopy_keeps_independent_state():
    model = tiny.build("sd3")
    apply_shiva_(model, ShivaConfig.uniform(4, 0.5))
    x = tiny.inputs(model)
    clone = copy.deepcopy(model)
    remove_shiva_(clone)
    assert is_shiva_applied(model)
    _dense(model, x)


def test_adapter_passed_in_routes_like_the_registered_lookup():
    """prune lies below models: the adapter given to apply_shiva_ is the one that installs and removes the
    routing, and it routes exactly as the default (the lookup shiva_export.models registers)."""
    from shiva_export.models.sd3 import SD3Adapter
    from shiva_export.prune.api import routing_state

    a, b = tiny.build("sd3"), tiny.build("sd3")
    x = tiny.inputs(a)
    given = SD3Adapter()
    apply_shiva_(a, ShivaConfig.uniform(4, 0.5), seed=3, adapter=given)
    apply_shiva_(b, ShivaConfig.uniform(4, 0.5), seed=3)
    assert routing_state(a).adapter is given and isinstance(routing_state(b).adapter, SD3Adapter)
    assert torch.equal(_dense(a, x), _dense(b, x))
    remove_shiva_(a)
    assert routing_state(a) is None and not any("forward" in blk.__dict__ for blk in a.transformer_blocks)


def test_prune_without_a_lookup_asks_for_the_adapter(monkeypatch):
    """prune never imports models (lint-imports checks that); with no lookup registered, apply_shiva_ says how to
    pass the adapter, in one ConfigError line, and leaves the model untouched."""
    import shiva_export.prune.api as api

    monkeypatch.setattr(api, "_ADAPTER_LOOKUP", [])
    model = tiny.build("sd3")
    with pytest.raises(
        ConfigError,
        match=r"^no architecture adapter for SD3Transformer2DModel: pass apply_shiva_\(\.\.\., adapter=get_adapter\(transformer\)\)",
    ) as ei:
        apply_shiva_(model, ShivaConfig.uniform(4, 0.5))
    assert "\n" not in str(ei.value) and not is_shiva_applied(model)
