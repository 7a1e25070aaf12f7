"""Bounded-K top-k lowering: exact equality with the tie-rule oracle, ONNX graph shape, ORT and TRT-RTX."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shiva_export.prune import topk_lowering
from shiva_export.prune.topk_lowering import TRT_TOPK_MAX_K, needs_lowering, select_topk_bounded, topk_reference

KEEP_RATIOS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)
NS = (1024, 4096, 16384)


def _ks(n: int, max_k: int = TRT_TOPK_MAX_K) -> list[int]:
    ks = {1, n, min(max_k, n), min(max_k + 1, n), max(1, n - max_k - 1), max(1, n - max_k), n // 2, n // 2 + 1}
    ks |= {max(1, math.floor(n * r)) for r in KEEP_RATIOS}
    return sorted(ks)


def _scores(kind: str, b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(b, n, generator=g)
    if kind == "ties3":  # heavy ties: three distinct values
        return torch.randint(0, 3, (b, n), generator=g).float()
    if kind == "ties_zero":  # +0.0 / -0.0 / 1.0 / -1.0: signed zeros must count as ties
        table = torch.tensor([0.0, -0.0, 1.0, -1.0])
        return table[torch.randint(0, 4, (b, n), generator=g)]
    if kind == "ties_inf":  # +-inf as ordinary values, mixed with duplicates
        table = torch.tensor([float("-inf"), -1.0, 0.0, 2.0, float("inf")])
        return table[torch.randint(0, 5, (b, n), generator=g)]
    if kind == "const":  # all equal: the first k positions win
        return torch.full((b, n), 0.5)
    if kind == "dup_randn":  # few distinct floats, each duplicated many times
        vals = torch.randn(7, generator=g)
        return vals[torch.randint(0, 7, (b, n), generator=g)]
    raise AssertionError(kind)


def _check(scores: torch.Tensor, k: int, max_k: int = TRT_TOPK_MAX_K) -> None:
    got = select_topk_bounded(scores, k, max_k)
    want = topk_reference(scores, k)
    assert got.dtype == torch.int64 and got.shape == (scores.shape[0], k)
    assert torch.equal(got, want), f"N={scores.shape[1]} k={k} max_k={max_k}"
    if k > 1:
        assert bool((got[:, 1:] > got[:, :-1]).all()), "not strictly ascending"


# --------------------------------------------------------------------------------------------- oracle
def test_reference_tie_rule_lower_position_wins():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, -0.0, 0.0]])
    assert topk_reference(s, 2).tolist() == [[1, 2]]
    assert topk_reference(s, 4).tolist() == [[0, 1, 2, 4]]
    assert topk_reference(s, 5).tolist() == [[0, 1, 2, 3, 4]]  # 0.0 at 3 beats -0.0 at 5 and 0.0 at 6
    assert topk_reference(s, 6).tolist() == [[0, 1, 2, 3, 4, 5]]  # -0.0 ties +0.0: position decides
    for k in range(1, 8):
        assert torch.equal(select_topk_bounded(s, k, max_k=2), topk_reference(s, k))


@pytest.mark.parametrize("n", NS)
def test_matches_plain_topk_without_ties(n):
    s = _scores("randn", 3, n, seed=n)
    for k in _ks(n):
        want = torch.sort(torch.topk(s, k, dim=1).indices, dim=1).values
        assert torch.equal(select_topk_bounded(s, k), want)
        assert torch.equal(topk_reference(s, k), want)


# ------------------------------------------------------------------------------------ grid + property
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b", (1, 3))
@pytest.mark.parametrize("kind", ("ties3", "ties_zero", "ties_inf", "dup_randn"))
def test_grid_equals_oracle(n, b, kind):
    s = _scores(kind, b, n, seed=1000 * n + b)
    for k in _ks(n):
        _check(s, k)


@pytest.mark.parametrize("n", NS)
def test_all_equal_scores_keep_first_k(n):
    s = _scores("const", 2, n, seed=0)
    for k in _ks(n):
        assert torch.equal(select_topk_bounded(s, k), torch.arange(k).expand(2, k))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.sampled_from(NS),
    b=st.sampled_from((1, 3)),
    kind=st.sampled_from(("randn", "ties3", "ties_zero", "ties_inf", "dup_randn", "const")),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_property_equals_oracle(n, b, kind, seed, data):
    choice = data.draw(
        st.one_of(
            st.sampled_from(_ks(n)),
            st.integers(1, n),
        ),
        label="k",
    )
    _check(_scores(kind, b, n, seed), choice)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 700),
    max_k=st.integers(1, 64),
    b=st.sampled_from((1, 3)),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_property_small_max_k_many_rounds(n, max_k, b, levels, seed, data):
    """A small ``max_k`` forces many masked rounds in both directions."""
    k = data.draw(st.integers(1, n), label="k")
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, levels, (b, n), generator=g).float()
    _check(s, k, max_k)


@pytest.mark.parametrize("n,max_k", [(16384, TRT_TOPK_MAX_K), (4096, TRT_TOPK_MAX_K), (1000, 37), (333, 1)])
def test_every_topk_call_is_bounded(monkeypatch, n, max_k):
    calls: list[tuple[int, bool]] = []
    real_topk = torch.topk

    def spy(x, k, dim=-1, largest=True, sorted=True):
        assert sorted is True
        calls.append((k, largest))
        return real_topk(x, k, dim=dim, largest=largest, sorted=sorted)

    monkeypatch.setattr(topk_lowering.torch, "topk", spy)
    s = _scores("ties3", 2, n, seed=7)
    for k in _ks(n, max_k):
        calls.clear()
        got = select_topk_bounded(s, k, max_k)
        assert all(kk <= max_k for kk, _ in calls), (k, calls)
        assert torch.equal(got, topk_reference(s, k))


def test_needs_lowering_and_validation():
    assert not needs_lowering(3840, 4096)
    assert needs_lowering(3841, 4096)
    assert not needs_lowering(1, 16384)
    assert needs_lowering(9830, 16384)
    assert not needs_lowering(50, 100, max_k=50)
    with pytest.raises(ValueError):
        select_topk_bounded(torch.zeros(1, 10), 0)
    with pytest.raises(ValueError):
        select_topk_bounded(torch.zeros(1, 10), 11)
    with pytest.raises(TypeError):
        select_topk_bounded(torch.zeros(1, 10), torch.tensor(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        select_topk_bounded(torch.zeros(10), 3)


# ---------------------------------------------------------------------------------------------- ONNX
class _Select(torch.nn.Module):
    def __init__(self, k: int, plain: bool = False) -> None:
        super().__init__()
        self.k = k
        self.plain = plain

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.plain:
            return torch.sort(torch.topk(scores, self.k, dim=1).indices, dim=1).values
        return select_topk_bounded(scores, self.k)


def _export(mod: torch.nn.Module, scores: torch.Tensor, path) -> str:
    mod.eval()
    torch.onnx.export(mod, (scores,), str(path), dynamo=True, opset_version=20, external_data=False)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{N: (path, k)}`` for the lowering at keep 0.6, batch 3."""
    pytest.importorskip("onnx")
    out = {}
    for n in (4096, 16384):
        k = math.floor(n * 0.6)
        path = tmp_path_factory.mktemp("topk") / f"select_{n}_{k}.onnx"
        out[n] = (_export(_Select(k), torch.randn(3, n), path), k)
    return out


def _topk_ks(model) -> list[tuple[int, int]]:
    import onnx
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    res = []
    for node in model.graph.node:
        if node.op_type != "TopK":
            continue
        assert node.input[1] in consts, "TopK K must be a constant"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        res.append((int(consts[node.input[1]].reshape(-1)[0]), int(attrs.get("sorted", 1))))
    return res


@pytest.mark.parametrize("n", (4096, 16384))
def test_onnx_graph_is_trt_friendly(exported, n):
    import onnx

    path, _ = exported[n]
    model = onnx.load(path)
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert "NonZero" not in ops
    topks = _topk_ks(model)
    assert topks, "expected at least one TopK"
    assert all(kk <= TRT_TOPK_MAX_K and srt == 1 for kk, srt in topks), topks


@pytest.mark.parametrize("n", (4096, 16384))
def test_onnxruntime_matches_torch(exported, n):
    ort = pytest.importorskip("onnxruntime")
    path, k = exported[n]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for kind, seed in (("randn", 1), ("ties3", 2), ("ties_zero", 3), ("ties_inf", 4), ("const", 5)):
        s = _scores(kind, 3, n, seed)
        got = torch.from_numpy(sess.run(None, {name: s.numpy()})[0])
        assert torch.equal(got, select_topk_bounded(s, k)), kind
        assert torch.equal(got, topk_reference(s, k)), kind


# ------------------------------------------------------------------------------------------ TRT-RTX
def _trt_build(trt, path: str):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(path):
        return None, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    return builder.build_serialized_network(network, config), []


@pytest.mark.trt_rtx
def test_trt_rtx_builds_lowering_but_not_plain_topk(exported, tmp_path):
    trt = pytest.importorskip("tensorrt_rtx")
    path, k = exported[16384]
    assert k == 9830
    t0 = time.perf_counter()
    engine, errors = _trt_build(trt, path)
    elapsed = time.perf_counter() - t0
    assert engine is not None, errors
    print(f"tensorrt_rtx build of the lowering (N=16384, k={k}): {elapsed:.2f} s, engine {engine.nbytes} B")

    plain = _export(_Select(k, plain=True), torch.randn(3, 16384), tmp_path / "plain.onnx")
    import onnx

    assert any(kk > TRT_TOPK_MAX_K for kk, _ in _topk_ks(onnx.load(plain)))
    engine, _ = _trt_build(trt, plain)
    assert engine is None, "plain TopK with K > 3840 unexpectedly built"
