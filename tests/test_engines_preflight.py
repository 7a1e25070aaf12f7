"""Pre-flight checks on hand-made ONNX graphs: one graph per refused construct, plus a clean one."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from shiva_export.engines import TOPK_MAX_K, PreflightReport, format_report, preflight
from shiva_export.errors import ConfigError, PreflightError, ShivaError

F = TP.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=17, functions=(), extra_opsets=()):
    graph = h.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    opsets = [h.make_opsetid("", opset), *extra_opsets]
    model = h.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 10 if opset >= 21 else 8
    return model


def _vi(name, dims, dtype=F):
    return h.make_tensor_value_info(name, dtype, dims)


def _k(value, name="K"):
    return nh.from_array(np.array([value], np.int64), name)


def topk_graph(n=64, k=38, sorted_=1, k_source="initializer"):
    """x[1, n] -> TopK(K) -> (values, indices)."""
    inits, nodes, inputs = [], [], [_vi("x", [1, n])]
    if k_source == "initializer":
        inits.append(_k(k))
    elif k_source == "constant":
        nodes.append(h.make_node("Constant", [], ["K"], name="k_const", value=_k(k, "kv")))
    elif k_source == "input":
        inputs.append(_vi("K", [1], TP.INT64))
    nodes.append(h.make_node("TopK", ["x", "K"], ["v", "i"], name="topk", axis=1, sorted=sorted_))
    return _model(nodes, inputs, [_vi("v", [1, None]), _vi("i", [1, None], TP.INT64)], inits)


def clean_graph():
    """The pruning path: MatMul -> TopK(sorted=1) -> GatherElements -> ScatterElements (all static)."""
    rng = np.random.default_rng(0)
    n, d, k = 64, 16, 38
    inits = [
        nh.from_array(rng.standard_normal((d, 1)).astype(np.float32), "W"),
        _k(k),
        nh.from_array(np.array([2], np.int64), "ax"),
        nh.from_array(np.array([1, k, d], np.int64), "shp"),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "W"], ["s3"], name="score"),
        h.make_node("Squeeze", ["s3", "ax"], ["s"], name="squeeze"),
        h.make_node("TopK", ["s", "K"], ["v", "i"], name="topk", axis=1, sorted=1),
        h.make_node("Unsqueeze", ["i", "ax"], ["i3"], name="unsqueeze"),
        h.make_node("Expand", ["i3", "shp"], ["ie"], name="expand"),
        h.make_node("GatherElements", ["x", "ie"], ["g"], name="gather", axis=1),
        h.make_node("Relu", ["g"], ["u"], name="block"),
        h.make_node("ScatterElements", ["x", "ie", "u"], ["y"], name="scatter", axis=1),
    ]
    return _model(nodes, [_vi("x", [1, n, d])], [_vi("y", [1, n, d])], inits)


def _codes(report: PreflightReport) -> list[str]:
    return [f.code for f in report.findings]


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tensorrt", "tensorrt-rtx"])
def test_clean_graph_passes(backend):
    model = clean_graph()
    onnx.checker.check_model(model)
    report = preflight(model, backend, "10.13.3" if backend == "tensorrt" else "1.7.1.116")
    assert report.ok, format_report(report)
    assert report.findings == []
    assert report.opset == 17
    assert report.op_counts["TopK"] == 1 and report.op_counts["ScatterElements"] == 1
    assert sum(report.op_counts.values()) == 8
    report.raise_if_failed()  # no-op
    json.dumps(report.to_dict())
    assert "OK" in format_report(report)


def test_preflight_reads_a_path_without_loading_weights(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(clean_graph(), str(path), save_as_external_data=True, location="m.onnx_data", size_threshold=0)
    assert (tmp_path / "m.onnx_data").is_file()
    report = preflight(path, "tensorrt-rtx")
    assert report.ok and report.source == str(path)


def test_topk_k_read_from_external_data(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save_model(
        topk_graph(n=4096, k=3900), str(path), save_as_external_data=True, location="big.data", size_threshold=0
    )
    assert _codes(preflight(path, "tensorrt-rtx")) == ["topk-k-too-large"]


@pytest.mark.parametrize("k_source", ["initializer", "constant"])
def test_topk_k_above_limit(k_source):
    report = preflight(topk_graph(n=4096, k=3900, k_source=k_source), "tensorrt-rtx")
    assert _codes(report) == ["topk-k-too-large"]
    f = report.findings[0]
    assert f.node == "topk" and f.op == "TopK"
    assert "3900" in f.problem and str(TOPK_MAX_K) in f.problem
    assert "keep" in f.fix


def test_topk_k_at_limit_is_fine():
    assert preflight(topk_graph(n=4096, k=TOPK_MAX_K), "tensorrt").ok


def test_topk_k_not_constant():
    report = preflight(topk_graph(k_source="input"), "tensorrt")
    assert _codes(report) == ["topk-k-not-constant"]
    assert "fold" in report.findings[0].fix


def test_topk_legacy_k_attribute():
    nodes = [h.make_node("TopK", ["x"], ["v", "i"], name="old_topk", axis=1, k=4000)]
    model = _model(nodes, [_vi("x", [1, 4096])], [_vi("v", [1, 4000]), _vi("i", [1, 4000], TP.INT64)], opset=9)
    assert _codes(preflight(model, "tensorrt")) == ["topk-k-too-large"]


def test_topk_unsorted():
    report = preflight(topk_graph(sorted_=0), "tensorrt-rtx")
    assert _codes(report) == ["topk-unsorted"]
    assert "sorted=True" in report.findings[0].fix


def _dds_model(op):
    x2 = _vi("x", [4, 4])
    if op == "NonZero":
        return _model([h.make_node(op, ["x"], ["o"], name="nz")], [x2], [_vi("o", [2, None], TP.INT64)])
    if op == "Unique":
        return _model([h.make_node(op, ["x"], ["o"], name="nz")], [_vi("x", [4])], [_vi("o", [None])])
    if op == "Compress":
        cond = _vi("c", [4], TP.BOOL)
        return _model([h.make_node(op, ["x", "c"], ["o"], name="nz", axis=0)], [x2, cond], [_vi("o", [None, 4])])
    if op == "NonMaxSuppression":
        inputs = [_vi("boxes", [1, 4, 4]), _vi("scores", [1, 1, 4])]
        return _model([h.make_node(op, ["boxes", "scores"], ["o"], name="nz")], inputs, [_vi("o", [None, 3], TP.INT64)])
    if op == "If":
        then_g = h.make_graph([h.make_node("Identity", ["x"], ["t"])], "then", [], [_vi("t", [4, 4])])
        else_g = h.make_graph([h.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [4, 4])])
        node = h.make_node("If", ["c"], ["o"], name="nz", then_branch=then_g, else_branch=else_g)
        return _model([node], [x2, _vi("c", [], TP.BOOL)], [_vi("o", [4, 4])])
    if op == "Loop":
        body = h.make_graph(
            [h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Neg", ["v_in"], ["v_out"])],
            "body",
            [_vi("iter", [], TP.INT64), _vi("cond_in", [], TP.BOOL), _vi("v_in", [4, 4])],
            [_vi("cond_out", [], TP.BOOL), _vi("v_out", [4, 4])],
        )
        node = h.make_node("Loop", ["n", "", "x"], ["o"], name="nz", body=body)
        return _model([node], [x2, _vi("n", [], TP.INT64)], [_vi("o", [4, 4])])
    raise AssertionError(op)


@pytest.mark.parametrize("op", ["NonZero", "Unique", "Loop", "If", "NonMaxSuppression", "Compress"])
def test_data_dependent_ops(op):
    report = preflight(_dds_model(op), "tensorrt-rtx")
    assert _codes(report) == [f"data-dependent-{op.lower()}"], format_report(report)
    f = report.findings[0]
    assert f.node == "nz" and f.op == op and f.fix


def test_findings_inside_subgraphs_are_reported():
    then_g = h.make_graph(
        [h.make_node("TopK", ["x", "K"], ["tv", "ti"], name="inner_topk", axis=1, sorted=0)],
        "then",
        [],
        [_vi("tv", [4, 2])],
    )
    else_g = h.make_graph([h.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", [4, 2])])
    node = h.make_node("If", ["c"], ["o"], name="branch", then_branch=then_g, else_branch=else_g)
    model = _model([node], [_vi("x", [4, 4]), _vi("c", [], TP.BOOL)], [_vi("o", [4, 2])], [_k(2)])
    report = preflight(model, "tensorrt")
    assert sorted(_codes(report)) == ["data-dependent-if", "topk-unsorted"]
    inner = next(f for f in report.findings if f.code == "topk-unsorted")
    assert inner.node == "branch/then_branch/inner_topk"
    assert report.op_counts == {"Identity": 1, "If": 1, "TopK": 1}


def _scatter_model(op, reduction):
    inputs = [_vi("x", [4, 4]), _vi("i", [2, 4] if op == "ScatterElements" else [2, 1], TP.INT64), _vi("u", [2, 4])]
    kw = {"axis": 0} if op == "ScatterElements" else {}
    if reduction is not None:
        kw["reduction"] = reduction
    return _model([h.make_node(op, ["x", "i", "u"], ["o"], name="sc", **kw)], inputs, [_vi("o", [4, 4])], opset=18)


@pytest.mark.parametrize("op", ["ScatterElements", "ScatterND"])
@pytest.mark.parametrize("reduction", ["add", "mul", "max", "min"])
def test_scatter_reduction_refused(op, reduction):
    report = preflight(_scatter_model(op, reduction), "tensorrt")
    assert _codes(report) == ["scatter-reduction"]
    assert f"'{reduction}'" in report.findings[0].problem


@pytest.mark.parametrize("op", ["ScatterElements", "ScatterND"])
@pytest.mark.parametrize("reduction", [None, "none"])
def test_scatter_without_reduction_is_fine(op, reduction):
    assert preflight(_scatter_model(op, reduction), "tensorrt-rtx").ok


def _attention_model(dtype=F, declared=True):
    shp = [1, 2, 8, 16]
    if declared:
        nodes = [h.make_node("Attention", ["q", "k", "v"], ["o"], name="attn")]
        return _model(nodes, [_vi(n, shp, dtype) for n in "qkv"], [_vi("o", shp, dtype)], opset=23)
    # q/k/v come out of Casts, so their dtype is only known after shape inference.
    nodes = [h.make_node("Cast", [n], [n + "c"], to=dtype) for n in "qkv"]
    nodes.append(h.make_node("Attention", ["qc", "kc", "vc"], ["o"], name="attn"))
    return _model(nodes, [_vi(n, shp, TP.DOUBLE) for n in "qkv"], [_vi("o", shp, dtype)], opset=23)


def _rms_model(dtype=F):
    shp = [1, 8, 16]
    scale = nh.from_array(np.ones(16, np.float32 if dtype == F else np.float16), "scale")
    nodes = [h.make_node("RMSNormalization", ["x", "scale"], ["o"], name="rms", axis=-1)]
    return _model(nodes, [_vi("x", shp, dtype)], [_vi("o", shp, dtype)], [scale], opset=23)


@pytest.mark.parametrize(
    ("version", "ok"), [("10.13.3.9", False), ("10.14.1.48", True), ("11.1.0", True), (None, False)]
)
def test_attention_on_tensorrt_depends_on_version(version, ok):
    report = preflight(_attention_model(), "tensorrt", version)
    assert report.ok is ok
    if not ok:
        assert _codes(report) == ["attention-version"]
        assert "10.14" in report.findings[0].problem and "opset <= 22" in report.findings[0].fix


@pytest.mark.parametrize(("version", "ok"), [("10.14.1", False), ("10.15.0", True), (None, False)])
def test_rmsnorm_on_tensorrt_depends_on_version(version, ok):
    report = preflight(_rms_model(), "tensorrt", version)
    assert report.ok is ok
    if not ok:
        assert _codes(report) == ["rmsnormalization-version"]


@pytest.mark.parametrize("declared", [True, False])
def test_attention_fp32_refused_by_rtx(declared):
    report = preflight(_attention_model(F, declared=declared), "tensorrt-rtx", "1.7.1.116")
    assert _codes(report) == ["attention-fp32-rtx"]
    assert "float" in report.findings[0].problem


@pytest.mark.parametrize("dtype", [TP.FLOAT16, TP.BFLOAT16])
@pytest.mark.parametrize("declared", [True, False])
def test_attention_half_precision_ok_on_rtx(dtype, declared):
    assert preflight(_attention_model(dtype, declared=declared), "tensorrt-rtx", "1.7.1.116").ok


def test_rmsnorm_ok_on_rtx():
    assert preflight(_rms_model(), "tensorrt-rtx", "1.7.1.116").ok


def test_dynamic_inputs_need_a_profile():
    nodes = [h.make_node("Relu", ["x"], ["o"], name="relu"), h.make_node("Relu", ["z"], ["p"], name="relu2")]
    shapeless = onnx.ValueInfoProto(name="z")
    shapeless.type.tensor_type.elem_type = F
    model = _model(nodes, [_vi("x", ["B", 4]), shapeless], [_vi("o", ["B", 4]), _vi("p", None)])
    report = preflight(model, "tensorrt-rtx")
    assert _codes(report) == ["dynamic-input", "dynamic-input"]
    assert report.findings[0].node == "input 'x'" and "[B, 4]" in report.findings[0].problem
    assert "profile" in report.findings[0].fix
    assert preflight(model, "tensorrt-rtx", profile_given=True).ok


def test_custom_domain_op_needs_a_plugin_but_local_functions_are_fine():
    custom = h.make_node("FancyOp", ["x"], ["o"], name="fancy", domain="com.example")
    model = _model([custom], [_vi("x", [4])], [_vi("o", [4])], extra_opsets=[h.make_opsetid("com.example", 1)])
    report = preflight(model, "tensorrt")
    assert _codes(report) == ["custom-domain-op"] and report.findings[0].op == "com.example::FancyOp"

    fn = h.make_function(
        "pkg.local", "MyRelu", ["a"], ["b"], [h.make_node("Relu", ["a"], ["b"])], [h.make_opsetid("", 17)]
    )
    call = h.make_node("MyRelu", ["x"], ["o"], name="call", domain="pkg.local")
    model = _model(
        [call], [_vi("x", [4])], [_vi("o", [4])], functions=[fn], extra_opsets=[h.make_opsetid("pkg.local", 1)]
    )
    assert preflight(model, "tensorrt").ok


def test_local_function_bodies_are_checked():
    body = [
        h.make_node("Constant", [], ["K"], value=_k(4000, "kv")),
        h.make_node("TopK", ["a", "K"], ["v", "b"], name="fn_topk", axis=1),
    ]
    fn = h.make_function("pkg.local", "Select", ["a"], ["b"], body, [h.make_opsetid("", 17)])
    call = h.make_node("Select", ["x"], ["o"], name="call", domain="pkg.local")
    model = _model(
        [call],
        [_vi("x", [1, 4096])],
        [_vi("o", [1, 4000], TP.INT64)],
        functions=[fn],
        extra_opsets=[h.make_opsetid("pkg.local", 1)],
    )
    report = preflight(model, "tensorrt-rtx")
    assert _codes(report) == ["topk-k-too-large"]
    assert report.findings[0].node == "function pkg.local::Select/fn_topk"
    assert report.op_counts == {"Constant": 1, "TopK": 1, "pkg.local::Select": 1}


def test_unnamed_nodes_get_a_readable_label():
    model = topk_graph(sorted_=0)
    model.graph.node[0].name = ""
    assert preflight(model, "tensorrt").findings[0].node == "TopK#0 -> v"


def test_raise_if_failed_one_line_first_node_and_count():
    model = topk_graph(n=4096, k=3900, sorted_=0)
    report = preflight(model, "tensorrt-rtx", "1.7.1.116")
    assert len(report.findings) == 2
    with pytest.raises(PreflightError) as exc:
        report.raise_if_failed()
    msg = str(exc.value)
    assert isinstance(exc.value, ShivaError)
    assert "\n" not in msg
    assert msg.startswith("tensorrt-rtx 1.7.1.116 will not build node 'topk' (TopK): TopK sorted=0")
    assert "Fix: export torch.topk" in msg
    assert "1 other finding(s)" in msg


def test_format_report_lists_every_finding():
    model = topk_graph(n=4096, k=3900, sorted_=0)
    text = format_report(preflight(model, "tensorrt"))
    assert "FAILED (2 finding(s))" in text
    assert text.count("problem:") == 2 and text.count("fix:") == 2
    assert "TopK x1" in text


def test_to_dict_is_json_ready():
    data = preflight(topk_graph(sorted_=0), "tensorrt-rtx").to_dict()
    assert json.loads(json.dumps(data))["findings"][0]["code"] == "topk-unsorted"
    assert data["ok"] is False and data["op_counts"] == {"TopK": 1}


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="Unknown TensorRT backend"):
        preflight(clean_graph(), "onnxruntime")
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(tmp_path / "missing.onnx", "tensorrt")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ConfigError, match="is not a readable ONNX model"):
        preflight(bad, "tensorrt")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="is empty"):  # a 0-byte file must not pass the pre-flight
        preflight(empty, "tensorrt")
    assert preflight(clean_graph(), "tensorrt_rtx").backend == "tensorrt-rtx"
