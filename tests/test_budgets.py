"""One budget, one folder: distinct ratios never collide, equal-k ratios are one budget, engines' ONNX is never overwritten."""

from __future__ import annotations

import pytest

from shiva_export.cli import main
from shiva_export.engines.budgets import unique_budgets
from shiva_export.export.pruned import budget_label
from shiva_export.recipe import load_recipe


@pytest.mark.parametrize("a,b", [(0.4, 0.404), (0.12, 0.125), (0.2, 0.2000001), (0.0, 0.001)])
def test_distinct_ratios_get_distinct_folders(a, b):
    assert budget_label(a) != budget_label(b)


def test_two_decimal_labels_are_unchanged():
    assert [budget_label(r) for r in (0.0, 0.2, 0.4, 0.6)] == ["ratio0.00", "ratio0.20", "ratio0.40", "ratio0.60"]
    assert budget_label(0.125) == "ratio0.125" and budget_label(0.404) == "ratio0.404"


def test_ratios_with_the_same_k_are_one_budget():
    rec = load_recipe("sd35-tiny")  # 256 image tokens at 256 px
    keep, same = unique_budgets(rec, [0.4, 0.401, 0.404, 0.0], 256, 256)
    # floor(256 * 0.6) = floor(256 * 0.599) = 153, floor(256 * 0.596) = 152
    assert keep == [0.0, 0.4, 0.404] and same == {0.401: 0.4}
    keep, same = unique_budgets(rec, [0.12, 0.125], 256, 256)  # k 225 vs 224
    assert keep == [0.12, 0.125] and same == {}


def test_onnx_default_out_never_overwrites_an_engines_onnx(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "engines" / "sd35-tiny" / "ratio0.40" / "fp32"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"engine's onnx")
    (d / "manifest.json").write_text("{}")
    code = main(["onnx", "--model", "sd35-tiny", "--ratio", "0.4", "--no-validate"])
    err = capsys.readouterr().err
    assert code == 1 and "belongs to the engine built there" in err and "--out" in err
    assert (d / "model.onnx").read_bytes() == b"engine's onnx"


def test_timing_cache_never_overwrites_another_file(tmp_path):
    from shiva_export.engines.builder import check_timing_cache_path
    from shiva_export.errors import OutputPathError

    assert check_timing_cache_path(tmp_path / "new.cache") == tmp_path / "new.cache"
    other = tmp_path / "notes.txt"
    other.write_text("my notes")
    with pytest.raises(OutputPathError, match="is not a timing cache written by shiva-export"):
        check_timing_cache_path(other)
    assert other.read_text() == "my notes"


@pytest.mark.trt_rtx
def test_timing_cache_written_by_a_build_is_reusable_and_stamped(tmp_path):
    import onnx

    from shiva_export.engines import build_engine
    from shiva_export.engines.builder import check_timing_cache_path
    from tests.test_engines_build_rtx import pruning_graph  # a tiny TopK/Gather/Scatter graph

    onnx_path = tmp_path / "m.onnx"
    onnx.save(pruning_graph(), onnx_path)
    cache = tmp_path / "tc.cache"
    build_engine(onnx_path, tmp_path / "a.plan", backend="tensorrt-rtx", timing_cache_path=cache)
    assert (tmp_path / "tc.cache.shiva.json").is_file() and check_timing_cache_path(cache) == cache
    build_engine(onnx_path, tmp_path / "b.plan", backend="tensorrt-rtx", timing_cache_path=cache)  # reuse is allowed


def test_weights_fingerprint_catches_a_same_size_same_mtime_change(tmp_path):
    import os

    from shiva_export.export.graph_cache import weights_fingerprint

    rec = load_recipe("sd35-tiny")
    w = tmp_path / "transformer"
    w.mkdir()
    f = w / "diffusion_pytorch_model.safetensors"
    f.write_bytes(b"A" * 4096)
    (w / "config.json").write_text("{}")
    before = weights_fingerprint(rec, w)
    assert weights_fingerprint(rec, w) == before  # stable (memoised)
    st = f.stat()
    f.write_bytes(b"B" * 4096)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert weights_fingerprint(rec, w) != before
