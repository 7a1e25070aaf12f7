"""ONNX export: op set, static budgets in metadata, ORT parity, dynamic batch, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from shiva_export.errors import ExportError
from shiva_export.export.ort import ort_session
from shiva_export.export.parity import check_parity
from shiva_export.export.pruned import export_pruned
from shiva_export.models.sd3 import InputSpec, make_inputs
from tests import shared

XDIST_GROUP = shared.EXPORTS  # conftest: one worker, which makes the shared artifacts once


def _reference(res):
    """The fp32 PyTorch model with exactly the export's router and budget (the recipe's trained router)."""
    from shiva_export.export.pruned import resolve_router
    from shiva_export.models.sd3 import load_transformer
    from shiva_export.prune import apply_shiva_

    t = load_transformer(recipe=res.recipe)
    bank, _ = resolve_router(res.recipe, None, res.config.router_config(t.inner_dim, t.config.pooled_projection_dim))
    apply_shiva_(t, res.config, routers=bank, seed=res.recipe.router.seed)
    return t


def _meta(path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def _topk_nodes(path):
    m = onnx.load(str(path), load_external_data=False)
    return m, [n for n in m.graph.node if n.op_type == "TopK"]


@pytest.fixture(scope="module")
def exports():
    """The session's shared sd35-tiny exports (tests/shared.py), validated with export_pruned's default 3 parity cases."""
    return {r: shared.export("sd35-tiny", r) for r in (0.0, 0.2, 0.4, 0.6)}


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.4, 0.6])
def test_sd35_tiny_export_opset_metadata_parity(exports, ratio):
    res = exports[ratio]
    model, topks = _topk_nodes(res.export.onnx_path)
    ops = {n.op_type for n in model.graph.node}
    assert topks and all(next((a.i for a in n.attribute if a.name == "sorted"), 1) == 1 for n in topks)
    assert "NonZero" not in ops and {"GatherElements", "ScatterElements"} <= ops
    inits = {i.name: i for i in model.graph.initializer}
    for n in topks:  # K is a constant <= 3840 (TensorRT)
        k = onnx.numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
        assert k is not None and int(k.reshape(-1)[0]) <= 3840
    meta = _meta(res.export.onnx_path)
    n = 256
    k = int(np.floor(n * (1 - ratio) + 1e-9))
    assert json.loads(meta["shiva.k_per_block"]) == {str(b): k for b in range(1, 6)}
    assert float(meta["shiva.ratio"]) == ratio
    assert len(meta["shiva.router_sha256"]) == 64 and "torch" in json.loads(meta["shiva.versions"])
    # static shapes everywhere: every graph input dim is a number
    for i in model.graph.input:
        assert all(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
    p = res.parity
    assert p.passed, p.summary_line()
    assert p.worst.max_abs <= 1e-4 and p.index_agreement == 1.0
    assert len(p.cases) == 3 and all(c.index_agreement for c in p.cases)
    assert p.summary_line().startswith("PASSED | ")


def test_sd3_tiny_export_parity(tmp_path):
    res = export_pruned(model="sd3-tiny", ratio=0.4, out=tmp_path / "m.onnx", cfg=False, batch=2)
    assert res.parity.passed and res.parity.worst.max_abs <= 1e-4, res.parity.summary_line()
    assert res.spec.model_batch == 2 and res.export.input_shapes["hidden_states"][0] == 2


def test_corrupted_onnx_fails_parity_and_names_output(exports, tmp_path):
    res = exports[0.4]
    model = onnx.load(str(res.export.onnx_path))
    # perturb one weight of the output projection (the last MatMul's constant operand) by 1e-2
    inits = {t.name: t for t in model.graph.initializer}
    last_mm = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input)][-1]
    w = inits[next(i for i in last_mm.input if i in inits)]
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1e-2
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    t = _reference(res)
    cases = [(0, None, make_inputs(t.config, res.spec, seed=0))]
    assert check_parity(
        res.export.onnx_path, t, cases, atol=1e-4, rtol=0.0, min_cosine=0.99999
    ).passed  # the reference is right
    report = check_parity(bad, t, cases, atol=1e-4, rtol=0.0, min_cosine=0.99999)
    assert not report.passed and "worst output 'sample'" in report.reason
    assert report.summary_line().startswith("FAILED | ")


def test_dynamic_batch_runs_any_batch(tmp_path):
    """On sd3-tiny (the SD3 adapter, as sd35-tiny), whose graph the dynamic-batch engine test also traces."""
    res = export_pruned(model="sd3-tiny", ratio=0.4, out=tmp_path / "dyn.onnx", dynamic_batch=True, validate=False)
    m = onnx.load(str(res.export.onnx_path), load_external_data=False)
    assert not m.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    sess = ort_session(res.export.onnx_path)
    t = _reference(res)
    for prompts in (1, 3):
        spec = InputSpec(prompts, res.spec.height, res.spec.width, res.spec.text_len, True)
        x = make_inputs(t.config, spec, seed=prompts)
        with torch.no_grad():
            ref = t(**x).sample.numpy()
        out = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
        assert out.shape == ref.shape == (2 * prompts, 16, 32, 32)
        assert np.abs(out - ref).max() <= 1e-4


def test_fp16_export_parity_against_fp32_reference(tmp_path):
    res = export_pruned(model="sd35-tiny", ratio=0.4, out=tmp_path / "h.onnx", dtype="fp16", parity_cases=2)
    assert res.export.dtype == "fp16"
    assert res.parity.passed, res.parity.summary_line()
    assert res.parity.worst.max_abs > 0  # really compared in reduced precision


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import shiva_export.export.onnx as ex

    def boom(*a, **k):
        raise onnx.checker.ValidationError("simulated crash")

    monkeypatch.setattr(ex.onnx.checker, "check_model", boom) if hasattr(ex, "onnx") else monkeypatch.setattr(
        onnx.checker, "check_model", boom
    )
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="simulated crash"):
        export_pruned(model="sd3-tiny", ratio=0.4, out=out, validate=False)
    assert list(tmp_path.iterdir()) == [], "an interrupted export must leave no file behind"


def test_debug_outputs_expose_kept_indices(tmp_path):
    res = export_pruned(model="sd3-tiny", ratio=0.4, out=tmp_path / "d.onnx", debug_outputs=True, parity_cases=1)
    assert res.parity.passed and res.parity.index_agreement == 1.0
    sess = ort_session(res.export.onnx_path)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["sample", "kept_indices.1", "kept_indices.2", "kept_indices.3"]
    x = make_inputs(
        res.spec
        and __import__("shiva_export.models.sd3", fromlist=["x"])
        .load_transformer(recipe=__import__("shiva_export.recipe", fromlist=["x"]).load_recipe("sd3-tiny"))
        .config,
        res.spec,
        seed=0,
    )
    outs = sess.run(None, {k: v.numpy() for k, v in x.items()})
    assert outs[1].shape == (2, 153) and (np.diff(outs[1], axis=1) > 0).all()
