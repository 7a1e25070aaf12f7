"""Every adapter through every stage, on its embedded tiny recipe (seeded random weights).

One case per architecture (``tests/archcases.py``, SD3 included): the same identities as ``test_prune.py``
(keep 1.0 bit for bit, exact k per routed block, rejected tokens unchanged, exact removal), the export contract
(pre-flight, ORT parity <= 1e-4 at ratios 0/0.2/0.4/0.6), an RTX build, and loading a ``save_pretrained``
folder through ``--weights``. Architecture-specific checks (Flux RoPE) follow.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from shiva_export.errors import ConfigError, RecipeError, WeightsError
from shiva_export.models import InputSpec, get_adapter, load_transformer, supported_classes
from shiva_export.prune import ShivaConfig, apply_shiva_, is_shiva_applied, record_selection, remove_shiva_
from shiva_export.recipe import load_recipe

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

from tests import archcases, shared  # noqa: E402

XDIST_GROUP = shared.EXPORTS  # conftest: one worker, which makes the shared artifacts once


@pytest.fixture(scope="module", params=archcases.NAMES)
def arch(request):
    rec = load_recipe(request.param)
    model = load_transformer(recipe=rec)
    return request.param, rec, model


def _spec(rec, batch=1):
    s = rec.shapes
    return InputSpec(batch, s.height, s.width, s.text_len, s.cfg)


def _blocks(model):
    a = get_adapter(model)
    return a.blocks(model) if hasattr(a, "blocks") else list(model.transformer_blocks)


def _run(model, x):
    with torch.no_grad():
        return model(**x).sample


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("selection", ["bounded", "topk"])
def test_keep_one_is_bit_identical(arch, batch, selection):
    name, rec, model = arch
    a = get_adapter(model)
    x = a.make_inputs(model.config, _spec(rec, batch), seed=1)
    ref = _run(model, x)
    n_blocks = a.num_blocks(model)
    apply_shiva_(model, ShivaConfig.uniform(n_blocks, 0.0, selection=selection))
    try:
        with record_selection(model) as recs:
            out = _run(model, x)
    finally:
        remove_shiva_(model)
    n = a.num_image_tokens(model.config, rec.shapes.height, rec.shapes.width)
    assert [r["block"] for r in recs] == list(range(1, n_blocks))
    assert all(r["k"] == n for r in recs)
    assert torch.equal(out, ref), f"{name}: max abs diff {(out - ref).abs().max().item()}"


def test_ratio_04_processes_k_tokens_rejected_unchanged_and_removal_is_exact(arch):
    name, rec, model = arch
    a = get_adapter(model)
    x = a.make_inputs(model.config, _spec(rec, 2), seed=2)
    ref = _run(model, x)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    n_blocks = a.num_blocks(model)
    n = a.num_image_tokens(model.config, rec.shapes.height, rec.shapes.width)
    k = int(n * 0.6)
    apply_shiva_(model, ShivaConfig.uniform(n_blocks, 0.4), seed=3)
    seen = {}
    probe, text_in = archcases.BY_NAME[name].probe, archcases.BY_NAME[name].text_in_probe
    hooks = [
        probe(b).register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[1]))
        for i, b in enumerate(_blocks(model))
    ]
    try:
        with record_selection(model, hidden_states=True) as recs:
            out = _run(model, x)
    finally:
        for h in hooks:
            h.remove()
    t = rec.shapes.text_len
    assert seen[0] == n + text_in(_blocks(model)[0], t), "block 0 stays dense"
    for i in range(1, n_blocks):
        assert seen[i] == k + text_in(_blocks(model)[i], t), (
            f"{name} block {i} processed {seen[i]} tokens, expected k={k}"
        )
    assert [r["block"] for r in recs] == list(range(1, n_blocks))
    for r in recs:
        idx = r["indices"]
        b = x["hidden_states"].shape[0]
        assert idx.shape == (b, k) and torch.all(idx[:, 1:] > idx[:, :-1])
        rejected = torch.ones(b, n, dtype=torch.bool)
        rejected.scatter_(1, idx, False)
        assert torch.equal(r["hidden_out"][rejected], r["hidden_in"][rejected]), (
            "rejected tokens must pass through unchanged"
        )
        assert torch.equal(
            r["block_input"],
            torch.gather(r["hidden_in"], 1, idx.unsqueeze(-1).expand(-1, -1, r["hidden_in"].shape[-1])),
        )
    assert not torch.equal(out, ref)
    remove_shiva_(model)
    assert not is_shiva_applied(model) and not hasattr(model, "shiva_routers")
    assert all("forward" not in b.__dict__ for b in _blocks(model)) and "forward" not in model.__dict__
    assert not model._forward_pre_hooks
    assert sd_before.keys() == model.state_dict().keys()
    assert torch.equal(_run(model, x), ref), "remove_shiva_ must restore the dense outputs exactly"


@pytest.fixture(scope="module")
def exports(arch):
    """The session's shared exports of this recipe (``tests/shared.py``; ORT parity on 3 seeded cases)."""
    return {r: shared.export(arch[0], r) for r in (0.0, 0.2, 0.4, 0.6)}


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.4, 0.6])
def test_export_passes_preflight_and_ort_parity(arch, exports, ratio):
    from shiva_export.engines import preflight

    ex = exports[ratio]
    assert ex.parity is not None and ex.parity.passed, ex.parity.reason
    assert ex.parity.worst.max_abs <= 1e-4
    assert ex.parity.index_agreement == 1.0
    report = preflight(ex.export.onnx_path, "tensorrt-rtx")
    assert report.ok, str(report)
    model = onnx.load(str(ex.export.onnx_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"NonZero", "If", "Loop"}
    assert all(a.i == 1 for n in model.graph.node if n.op_type == "TopK" for a in n.attribute if a.name == "sorted")
    assert ex.export.op_counts.get("TopK", 0) >= len(ex.budgets)  # one (or more, bounded) TopK per routed block
    assert not any(i.data_type == onnx.TensorProto.DOUBLE for i in model.graph.initializer), "no float64 in the graph"
    names = [i.name for i in model.graph.input]
    assert names == list(get_adapter(arch[2]).input_names(arch[2].config))
    assert ex.export.input_shapes == {k: list(v) for k, v in ex.spec.shapes(arch[2]).items()}


def test_validate_parity_suite_on_the_export(arch, exports):
    """``validate parity`` (polygraphy Comparator: torch runner vs ORT runner) on the ratio-0.4 export."""
    from shiva_export.validate.compare import validate_parity

    rep = validate_parity(recipe=arch[1], onnx=exports[0.4].export.onnx_path, cases=2)
    assert rep.passed, rep.summary_line()
    assert all(c.max_abs <= 1e-4 for c in rep.comparisons)


@pytest.mark.trt_rtx
def test_rtx_build(arch, exports):
    res = shared.engine(
        arch[0], 0.4
    )  # build_engine of exports[0.4], once per session (test_budget_matrix builds it too)
    assert res.plan_path.is_file() and res.size_bytes > 0


def test_save_pretrained_loads_through_weights(arch, tmp_path):
    name, rec, model = arch
    model.save_pretrained(tmp_path / "transformer")
    for folder in (tmp_path / "transformer", tmp_path):  # transformer folder and pipeline-style parent
        loaded = load_transformer(recipe=rec, weights=folder)
        assert type(loaded) is type(model)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    other = "flux-tiny" if rec.architecture == "sd3" else "sd3-tiny"  # a recipe of another architecture
    with pytest.raises(WeightsError, match=f"architecture '{load_recipe(other).architecture}'"):
        load_transformer(recipe=load_recipe(other), weights=tmp_path)


# -- the registry --------------------------------------------------------------------------------------------


def test_unsupported_architecture_fails_in_one_line_listing_the_supported(tmp_path):
    for obj in ({"_class_name": "HunyuanDiT2DModel"}, "HunyuanDiT2DModel", torch.nn.Linear(2, 2)):
        with pytest.raises(ConfigError) as err:
            get_adapter(obj)
        msg = str(err.value)
        assert "\n" not in msg and all(c in msg for c in supported_classes())
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    with pytest.raises(ConfigError, match="Supported: .*FluxTransformer2DModel"):
        load_transformer(weights=tmp_path)
    with pytest.raises(ConfigError, match="no Shiva adapter|No Shiva adapter"):
        apply_shiva_(torch.nn.Linear(2, 2), ShivaConfig.uniform(2, 0.4))
    bad = tmp_path / "bad.toml"
    bad.write_text(
        load_recipe("flux-tiny").source_path.read_text().replace('architecture = "flux"', 'architecture = "hunyuan"')
    )
    with pytest.raises(RecipeError, match="no adapter; choose one of .*flux.*sd3"):
        load_recipe(bad)


def test_every_adapter_has_recipes_for_its_repo_ids():
    for cls in supported_classes():
        a = get_adapter(cls)
        for model_name, repo in a.REPO_IDS.items():
            rec = load_recipe(model_name)
            assert rec.architecture == a.NAME and rec.model.repo_id == repo


# -- Flux specifics ------------------------------------------------------------------------------------------


def test_flux_rope_rows_follow_the_kept_tokens():
    """A routed Flux block equals the plain block on the kept tokens with RoPE computed from the kept
    tokens' own position ids (so the gathered cos/sin rows are the right ones, text rows whole)."""
    rec = load_recipe("flux-tiny")
    model = load_transformer(recipe=rec)
    a = get_adapter(model)
    x = a.make_inputs(model.config, _spec(rec), seed=4)
    apply_shiva_(model, ShivaConfig.uniform(a.num_blocks(model), 0.5), seed=5)
    captured = {}
    for i in (1, 3):  # a double-stream and a single-stream block
        blk = a.blocks(model)[i]
        blk.register_forward_hook(lambda m, args, kw, out, i=i: captured.__setitem__(i, (kw, out)), with_kwargs=True)
    with record_selection(model) as recs:
        _run(model, x)
    t = rec.shapes.text_len
    for r in recs:
        if r["block"] not in captured:
            continue
        kw, (ehs_out, hs_out) = captured[r["block"]]
        idx = r["indices"]
        blk = a.blocks(model)[r["block"]]
        ids = torch.cat([x["txt_ids"], x["img_ids"][idx[0]]])
        rope = model.pos_embed(ids)
        kept = torch.gather(kw["hidden_states"], 1, idx.unsqueeze(-1).expand(-1, -1, kw["hidden_states"].shape[-1]))
        with torch.no_grad():
            e_ref, h_ref = type(blk).forward(blk, kept, kw["encoder_hidden_states"], kw["temb"], rope)
        torch.testing.assert_close(
            torch.gather(hs_out, 1, idx.unsqueeze(-1).expand(-1, -1, hs_out.shape[-1])), h_ref, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(ehs_out, e_ref, atol=1e-6, rtol=0)
        assert (
            kw["image_rotary_emb"][0].shape[0] == t + rec.shapes.height // 16 * rec.shapes.width // 16
        )  # the block got the whole table


# -- FLOPs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [None, 0.6])
def test_flops_match_torch_flop_counter(arch, keep):
    """Each adapter's analytic count equals torch.utils.flop_counter on a real forward (math SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    name, rec, model = arch
    a = get_adapter(model)
    spec = _spec(rec)
    x = a.make_inputs(model.config, spec, seed=0)
    keeps = None
    if keep is not None:
        config = ShivaConfig.uniform(a.num_blocks(model), 1.0 - keep)
        apply_shiva_(model, config)
        keeps = config.keep_ratios
    try:
        model.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(**x)
    finally:
        if keep is not None:
            remove_shiva_(model)
    n = a.num_image_tokens(model.config, spec.height, spec.width)
    ours = a.count_flops(model.config, n, spec.text_len, keeps, batch=spec.model_batch)
    assert ours.total == counter.get_total_flops(), (
        f"{name}: analytic {ours.total} vs torch {counter.get_total_flops()}"
    )


FLUX_DEV = dict(
    num_layers=19,
    num_single_layers=38,
    num_attention_heads=24,
    attention_head_dim=128,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    in_channels=64,
    guidance_embeds=True,
)
PIXART_SIGMA = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    caption_channels=4096,
    sample_size=128,
    patch_size=2,
    use_additional_conditions=False,
)


def test_real_shape_flops_config_only():
    """The docs/benchmarks.md numbers (config-only counts of the real checkpoints at 1024 px)."""
    from shiva_export.validate.flops import count_model_flops

    flux = count_model_flops("flux", FLUX_DEV, 4096, 512)
    assert round(flux.total / 1e12, 2) == 74.38
    flux_r = count_model_flops("flux", FLUX_DEV, 4096, 512, ShivaConfig.uniform(57, 0.25).keep_ratios)
    assert round(1 - flux_r.total / flux.total, 3) == 0.251
    pix = count_model_flops("pixart", PIXART_SIGMA, 4096, 300, batch=2)  # CFG pair
    assert round(pix.total / 1e12, 2) == 13.27
    with pytest.raises(ConfigError, match="Supported"):
        count_model_flops("HunyuanDiT2DModel", {}, 16, 4)


def test_phase_schedule_dispatches_on_the_calls_timestep(arch):
    """set_shiva_phases_ works through the block-override adapters' pre-hook (Flux: 1000 x timestep)."""
    from shiva_export.prune.api import phase_trace, set_shiva_phases_
    from shiva_export.prune.schedule import TimestepPhase

    name, rec, model = arch
    a = get_adapter(model)
    L = a.num_blocks(model)
    n = a.num_image_tokens(model.config, rec.shapes.height, rec.shapes.width)
    apply_shiva_(model, ShivaConfig.uniform(L, 0.5))
    try:
        early = TimestepPhase("early", 1000.0, 500.0, (None,) + (0.5,) * (L - 1))
        late = TimestepPhase("late", 500.0, 0.0, (None,) + (0.75,) * (L - 1))
        set_shiva_phases_(model, [early, late])
        for t, want in ((900.0, int(n * 0.5)), (100.0, int(n * 0.75))):
            x = a.make_inputs(model.config, _spec(rec), seed=0, timestep=t)
            with record_selection(model) as recs:
                _run(model, x)
            assert {r["k"] for r in recs} == {want}, f"{name} at t={t}"
        assert phase_trace(model) == ["early", "late"]
    finally:
        remove_shiva_(model)
