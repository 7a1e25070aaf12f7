"""Routing option ``context = "keep"``: rejected tokens still give keys and values (SD3 / SD3.5).

Exact identities: keep 1.0 with the option is dense bit for bit; one routed block under "keep" gives, at the kept
positions and for the text stream, what the dense block gives there (every query sees all image keys in both).
"""

from __future__ import annotations

import json

import pytest
import torch

from shiva_export.errors import ConfigError, RecipeError
from shiva_export.models.base import get_adapter
from shiva_export.models.sd3 import count_flops
from shiva_export.prune import ShivaConfig, apply_shiva_, is_shiva_applied, record_selection, remove_shiva_
from shiva_export.prune.api import set_shiva_config_
from shiva_export.validate.flops import count_model_flops
from tests.fixtures import tiny

torch.use_deterministic_algorithms(True)


def _run(model, x):
    with torch.no_grad():
        return model(**x).sample


def _outputs(name: str, ratio: float):
    """(dense, drop, keep) outputs of one seeded tiny model and CFG batch at ``ratio``."""
    model = tiny.build(name)
    x = tiny.inputs(model, batch=1, cfg=True)
    dense = _run(model, x)
    out = {}
    for context in ("drop", "keep"):
        apply_shiva_(
            model, ShivaConfig.uniform(len(model.transformer_blocks), ratio, cfg=True, context=context), seed=3
        )
        out[context] = _run(model, x)
        remove_shiva_(model)
    assert torch.equal(_run(model, x), dense)  # removal restores the processors exactly
    return dense, out["drop"], out["keep"]


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_keep_one_with_context_is_dense_bit_for_bit(name):
    dense, drop, keep = _outputs(name, 0.0)
    assert torch.equal(keep, dense) and torch.equal(drop, dense)


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_ratio_04_keep_differs_from_drop_and_dense(name):
    dense, drop, keep = _outputs(name, 0.4)
    assert (keep - drop).abs().max() > 1e-3 and (keep - dense).abs().max() > 1e-3


def _block_io(model, x):
    """Per routed block: its full input/output (recorded) and the call it received (kept tokens, text, temb)."""
    calls = {}

    def hook(i):
        def fn(mod, args, kwargs, output):
            calls[i] = (kwargs["encoder_hidden_states"], kwargs["temb"], output[0])

        return fn

    blocks = model.transformer_blocks
    hs = [blk.register_forward_hook(hook(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    try:
        with record_selection(model, hidden_states=True) as rec:
            _run(model, x)
    finally:
        for h in hs:
            h.remove()
    return [(r, *calls[r["block"]]) for r in rec]


@pytest.mark.parametrize("context,matches", [("keep", True), ("drop", False)])
def test_routed_block_matches_dense_block_on_kept_tokens(context, matches):
    """Under "keep" every kept query (and every text query) attends to all N image keys, as in the dense block,
    so the block's outputs there equal the dense block's; rejected tokens pass unchanged. "drop" fails it."""
    model = tiny.build("sd35")  # block 2 has dual attention (attn2), block 3 is context_pre_only
    x = tiny.inputs(model, batch=1, cfg=True)
    apply_shiva_(model, ShivaConfig.uniform(len(model.transformer_blocks), 0.4, cfg=True, context=context), seed=3)
    worst = 0.0
    for rec, ehs, temb, ctx_out in _block_io(model, x):
        block = model.transformer_blocks[rec["block"]]
        with torch.no_grad():
            dense_ctx, dense_img = type(block).forward(block, rec["hidden_in"], ehs, temb)  # the processors' plain path
        idx = rec["indices"].unsqueeze(-1).expand(-1, -1, dense_img.shape[-1])
        rejected = torch.ones(rec["hidden_in"].shape[:2], dtype=torch.bool).scatter(1, rec["indices"], False)
        assert torch.equal(rec["hidden_out"][rejected], rec["hidden_in"][rejected])
        worst = max(worst, (rec["hidden_out"].gather(1, idx) - dense_img.gather(1, idx)).abs().max().item())
        if dense_ctx is not None:
            worst = max(worst, (ctx_out - dense_ctx).abs().max().item())
    assert (worst < 1e-5) if matches else (worst > 1e-3), worst


def test_processors_wrapped_while_applied_and_context_fixed():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model = tiny.build("sd35")
    n = len(model.transformer_blocks)
    apply_shiva_(model, ShivaConfig.uniform(n, 0.4, context="keep"))
    assert type(model.transformer_blocks[0].attn.processor) is JointAttnProcessor2_0  # block 0 stays dense
    assert all(type(model.transformer_blocks[i].attn.processor).__name__ == "_ContextKVProcessor" for i in range(1, n))
    assert type(model.transformer_blocks[2].attn2.processor).__name__ == "_ContextKVProcessor"
    set_shiva_config_(model, ShivaConfig.uniform(n, 0.2, context="keep"))  # other keep ratios: fine
    with pytest.raises(ConfigError, match="changes context 'keep' -> 'drop'"):
        set_shiva_config_(model, ShivaConfig.uniform(n, 0.2))
    remove_shiva_(model)
    assert all(type(b.attn.processor) is JointAttnProcessor2_0 for b in model.transformer_blocks)
    assert (
        model.transformer_blocks[2].attn2.processor is model.transformer_blocks[2].attn.processor
    )  # shared, as diffusers built it


# ----------------------------------------------------------------------------------------------- export + ORT parity
_RECIPE = """
schema_version = 1
name = "ctx-tiny"
architecture = "sd3"
[model]
source = "embedded"
seed = 0
[model.config]
sample_size = 16
patch_size = 2
in_channels = 16
out_channels = 16
num_layers = 3
attention_head_dim = 8
num_attention_heads = 4
joint_attention_dim = 32
caption_projection_dim = 32
pooled_projection_dim = 32
pos_embed_max_size = 16
dual_attention_layers = [0, 1]
qk_norm = "rms_norm"
[prune]
ratios = [0.4]
context = "keep"
[router]
bottleneck = 16
[shapes]
height = 128
width = 128
text_len = 8
batch = 1
cfg = true
[pipeline]
clip_max_length = 4
[tolerances.fp32]
atol = 1e-4
rtol = 0.0
min_cosine = 0.99999
"""


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ctx") / "ctx-tiny.toml"
    p.write_text(_RECIPE)
    return p


def test_onnx_export_keep_static_shapes_and_ort_parity(recipe_file, tmp_path):
    """The recipe's [prune] context = "keep" reaches the graph: ORT matches the keep-routed PyTorch model (fp32
    tolerance), the metadata says so, and the graph's output is not the drop-routed model's."""
    import dataclasses

    import numpy as np
    import onnx

    from shiva_export.export.ort import ort_session
    from shiva_export.export.pruned import export_pruned

    keep = export_pruned(recipe=recipe_file, ratio=0.4, out=tmp_path / "keep.onnx", parity_cases=2)
    assert keep.config.context == "keep" and keep.to_dict()["context"] == "keep"
    assert keep.parity.passed and keep.parity.worst.max_abs <= 1e-4, keep.parity.summary_line()
    m = onnx.load(str(keep.export.onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["shiva.context"] == "keep" and json.loads(meta["shiva.k_per_block"]) == {"1": 38, "2": 38}
    assert all(d.HasField("dim_value") for i in m.graph.input for d in i.type.tensor_type.shape.dim)
    adapter = get_adapter("sd3")
    drop = adapter.build_embedded(dict(keep.recipe.model.config), keep.recipe.model.seed)
    apply_shiva_(
        drop, dataclasses.replace(keep.config, context="drop"), seed=keep.recipe.router.seed
    )  # the export's random router
    x = adapter.make_inputs(drop.config, keep.spec, seed=1)
    ort = ort_session(keep.export.onnx_path).run(None, {k: v.numpy() for k, v in x.items()})[0]
    assert np.abs(ort - _run(drop, x).numpy()).max() > 1e-3


def test_dense_with_context_keep_is_refused(recipe_file):
    from shiva_export.export.pruned import export_pruned

    with pytest.raises(ConfigError, match="dense export routes nothing"):
        export_pruned(recipe=recipe_file, dense=True, context="keep")


# ----------------------------------------------------------------------------------------------- FLOPs
def test_flops_keep_between_drop_and_dense_and_dense_at_keep_one():
    from shiva_export.recipe import load_recipe

    cfg = load_recipe("sd35-tiny").model.config  # N = 256, dual attention in blocks 0-2
    n, t, L = 256, 32, 6
    dense = count_flops(cfg, n, t, None, batch=2)
    k06 = [None] + [0.6] * (L - 1)
    drop, keep = (count_flops(cfg, n, t, k06, batch=2, context=c) for c in ("drop", "keep"))
    assert drop.total < keep.total < dense.total
    assert drop.terms["block.ctx.kv"] == drop.terms["block.ctx.adaln"] == 0 and keep.context == "keep"
    k, D, B = 153, 64, 2
    b1, b2 = keep.blocks[1], keep.blocks[4]  # a dual block and a plain one
    assert b1["block.ctx.kv"] == 2 * 2 * 2 * B * (n - k) * D * D and b2["block.ctx.kv"] == 2 * 2 * B * (n - k) * D * D
    assert (
        b1["block.attn.joint"] == 2 * 2 * B * (k + t) * (n + t) * D and b1["block.attn2.sdpa"] == 2 * 2 * B * k * n * D
    )
    assert keep.total - drop.total == sum(
        keep.blocks[i]["block.ctx.kv"] + keep.blocks[i]["block.ctx.adaln"] for i in range(L)
    ) + sum(
        keep.blocks[i]["block.attn.joint"]
        - drop.blocks[i]["block.attn.joint"]
        + keep.blocks[i]["block.attn2.sdpa"]
        - drop.blocks[i]["block.attn2.sdpa"]
        for i in range(L)
    )
    # keep 1.0: the kept set is the context, the routing computes nothing extra: dense blocks (+ the router)
    one = [None] + [1.0] * (L - 1)
    keep1, drop1 = (count_flops(cfg, n, t, one, batch=2, context=c) for c in ("keep", "drop"))
    assert keep1.blocks_total == dense.blocks_total and keep1.total == drop1.total == dense.total + keep1.router_total
    assert count_model_flops("sd3", cfg, n, t, k06, batch=2, context="keep").total == keep.total


# ----------------------------------------------------------------------------------------------- refusals and records
def test_other_architectures_refuse_keep_before_loading(monkeypatch, tmp_path):
    for arch in ("flux", "pixart", "dit"):
        with pytest.raises(ConfigError, match=f"not implemented for architecture '{arch}'"):
            get_adapter(arch).check_context("keep")
        with pytest.raises(ConfigError, match=f"architecture '{arch}'"):
            count_model_flops(arch, {}, 64, 8, None, context="keep")
    from shiva_export.export.pruned import export_pruned
    from shiva_export.runtime.pipeline import load_pipeline

    monkeypatch.setattr("shiva_export.export.pruned.load_transformer", lambda **kw: pytest.fail("loaded a model"))
    monkeypatch.setattr("shiva_export.runtime.pipeline.pipeline_location", lambda *a: pytest.fail("loaded a pipeline"))

    with pytest.raises(ConfigError, match="architecture 'flux'"):
        export_pruned(model="flux-tiny", context="keep", out=tmp_path / "m.onnx", bounded=False)
    with pytest.raises(ConfigError, match="architecture 'flux'"):
        load_pipeline("flux-tiny", context="keep")
    with pytest.raises(ConfigError, match="context 'sideways' is unknown"):
        ShivaConfig((None, 0.5), context="sideways")


def test_apply_on_flux_refuses_keep_and_leaves_model_untouched():
    from shiva_export.models.base import load_transformer
    from shiva_export.recipe import load_recipe

    flux = load_transformer(recipe=load_recipe("flux-tiny"))
    n = get_adapter(flux).num_blocks(flux)
    with pytest.raises(ConfigError, match="architecture 'flux'"):
        apply_shiva_(flux, ShivaConfig.uniform(n, 0.4, context="keep"))
    assert not is_shiva_applied(flux) and "shiva_routers" not in flux._modules


def test_recipe_context_key_hash_and_cache_keys(tmp_path):
    from shiva_export.export.graph_cache import export_key_for
    from shiva_export.export.pruned import default_onnx_path
    from shiva_export.recipe import load_recipe, recipe_hash

    src = (tiny_recipe := load_recipe("sd35-tiny")).source_path.read_text()
    explicit = tmp_path / "sd35-tiny.toml"
    explicit.write_text(src.replace("[prune]\n", '[prune]\ncontext = "drop"\n', 1))
    keep = tmp_path / "keep" / "sd35-tiny.toml"
    keep.parent.mkdir()
    keep.write_text(src.replace("[prune]\n", '[prune]\ncontext = "keep"\n', 1))
    assert load_recipe(explicit).prune.context == "drop" and tiny_recipe.prune.context == "drop"
    assert recipe_hash(load_recipe(explicit)) == recipe_hash(
        tiny_recipe
    )  # the default leaves old hashes (cache keys) as they were
    assert load_recipe(keep).prune.context == "keep" and recipe_hash(load_recipe(keep)) != recipe_hash(tiny_recipe)
    flux = load_recipe("flux-tiny").source_path.read_text()
    bad = tmp_path / "flux.toml"
    bad.write_text(flux.replace("[prune]\n", '[prune]\ncontext = "keep"\n', 1))
    with pytest.raises(RecipeError, match="not implemented for architecture 'flux'"):
        load_recipe(bad)
    args = (tiny_recipe, None, None, 0.4, False, {"batch": 1}, "fp32", 20, False)
    k_drop, k_keep = export_key_for(*args), export_key_for(*args, "keep")
    assert "context" not in k_drop and k_keep["context"] == "keep" and k_keep != k_drop
    assert default_onnx_path("m", 0.4, "fp32", context="keep").parent.parent.name.endswith("-context-keep")
    assert ShivaConfig((None, 0.5), context="keep").to_dict()["context"] == "keep"


def test_pipeline_records_context_and_runtime_keys_tell_it_apart():
    from shiva_export.models import InputSpec
    from shiva_export.prune.schedule import uniform_phase
    from shiva_export.recipe import load_recipe
    from shiva_export.runtime.pipeline import _artifact_key, _artifacts_context, load_pipeline

    pipe = load_pipeline("sd35-tiny", ratio=0.4, context="keep")  # torch backend
    assert pipe.shiva.context == "keep" and pipe.shiva.to_dict()["context"] == "keep"
    assert type(pipe.transformer.transformer_blocks[1].attn.processor).__name__ == "_ContextKVProcessor"
    rec = load_recipe("sd35-tiny")
    args = (
        rec,
        None,
        None,
        uniform_phase(6, 0.4, rec.routed_blocks(6)),
        InputSpec(1, 256, 256, 32, True),
        "fp32",
        False,
    )
    assert (
        _artifact_key(*args, "keep") != _artifact_key(*args, "drop") == _artifact_key(*args)
    )  # drop keys as before the option
    given = [(None, None, {"context": c}, None) for c in ("keep", "keep")]
    assert _artifacts_context(given, None) == "keep" == _artifacts_context(given, "keep")
    with pytest.raises(ConfigError, match="exported with context 'keep'"):
        _artifacts_context(given, "drop")
    with pytest.raises(ConfigError, match="different contexts"):
        _artifacts_context([*given, (None, None, {"context": "drop"}, None)], None)


def test_cli_context_flag(capsys, tmp_path):
    from shiva_export.cli import main

    assert main(["onnx", "--model", "sd35-tiny", "--context", "sideways", "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["onnx", "--model", "flux-tiny", "--context", "keep", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not implemented for architecture 'flux'" in err
    assert (
        main(
            ["generate", "--model", "sd35-tiny", "--prompt", "a", "--context", "sideways", "--out", str(tmp_path / "g")]
        )
        == 2
    )
    assert (
        main(["generate", "--model", "flux-tiny", "--prompt", "a", "--context", "keep", "--out", str(tmp_path / "g")])
        == 2
    )
    assert "not implemented for architecture 'flux'" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "m.onnx").exists()  # refused before writing anything
