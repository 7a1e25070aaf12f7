"""The trace cache (export.graph_cache): a second export of the same graph copies the verified trace instead of
tracing; any change to the key, or to the stored bytes, traces again; SHIVA_ONNX_CACHE=0 and a failed export
store nothing. One real trace is shared by the module; the key tests stop each export at the cache."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

from shiva_export.errors import ExportError
from shiva_export.export import graph_cache
from shiva_export.export import onnx as onnx_export
from shiva_export.export.pruned import export_pruned

KW = dict(model="sd3-tiny", ratio=0.4, parity_cases=1)


class _Stop(Exception):
    """Ends an export where a test has seen what it needs."""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One trace of sd3-tiny at ratio 0.4 in a private cache: (cache folder, the export)."""
    d = tmp_path_factory.mktemp("trace-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SHIVA_CACHE_DIR", str(d / "cache"))
    mp.delenv("SHIVA_ONNX_CACHE", raising=False)
    try:
        res = export_pruned(**KW, out=d / "a" / "model.onnx")
    finally:
        mp.undo()
    assert not res.export.trace_cached
    return d / "cache", res


@pytest.fixture
def cache(base, tmp_path, monkeypatch):
    """A copy of the base cache as this test's own, and a count of the exporter's traces."""
    d = tmp_path / "cache"
    shutil.copytree(base[0], d)
    monkeypatch.setenv("SHIVA_CACHE_DIR", str(d))
    monkeypatch.delenv("SHIVA_ONNX_CACHE", raising=False)
    calls = []
    real = torch.onnx.export

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.onnx, "export", counting)
    return d, calls


def _entries(d):
    return sorted((d / "onnx").glob("[0-9a-f]*")) if (d / "onnx").is_dir() else []


def _lookup(monkeypatch, tmp_path, **kw):
    """(the trace cache key this export asks for, whether the cache held it), without tracing."""
    seen = {}
    real_fetch = graph_cache.GraphCache.fetch

    def fetch(self, dest):
        seen.update(key=self.key, hit=real_fetch(self, dest))
        raise _Stop

    monkeypatch.setattr(graph_cache.GraphCache, "fetch", fetch)
    with pytest.raises(_Stop):
        export_pruned(**(KW | kw), out=tmp_path / "probe" / "model.onnx", validate=False)
    monkeypatch.setattr(graph_cache.GraphCache, "fetch", real_fetch)
    return seen["key"], seen["hit"]


def _router_file(path, seed: int):
    from shiva_export.models import load_transformer, num_blocks, router_dims
    from shiva_export.prune.api import ShivaConfig
    from shiva_export.prune.router import RouterBank, save_routers
    from shiva_export.recipe import load_recipe

    rec = load_recipe("sd3-tiny")
    t = load_transformer(recipe=rec)
    n = num_blocks(t)
    cfg = ShivaConfig.uniform(
        n, 0.4, rec.routed_blocks(n), bottleneck=rec.router.bottleneck, group_size=rec.router.group_size
    )
    bank = RouterBank(cfg.router_config(*router_dims(t)))
    bank.reset_parameters(seed)
    save_routers(bank, path)
    return path


def test_a_second_export_of_the_same_graph_is_copied_from_the_cache_and_equal(base, cache, tmp_path):
    d, calls = cache
    second = export_pruned(**KW, out=tmp_path / "b" / "model.onnx", debug_outputs=True)
    third = export_pruned(**KW, out=tmp_path / "c" / "model.onnx")
    assert calls == [] and len(_entries(d)) == 1
    assert second.export.trace_cached and third.export.trace_cached
    assert third.export.onnx_sha256 == base[1].export.onnx_sha256  # the same file, metadata included
    assert second.parity.passed and second.parity.index_agreement == 1.0  # the copy is checked like a trace
    names = [o.name for o in onnx.load(str(second.export.onnx_path)).graph.output]
    assert names == ["sample", "kept_indices.1", "kept_indices.2", "kept_indices.3"]
    assert third.to_dict()["trace_cached"] is True


def test_the_same_export_finds_its_entry(cache, monkeypatch, tmp_path):
    assert _lookup(monkeypatch, tmp_path)[1] is True


@pytest.mark.parametrize(
    "change",
    [
        dict(ratio=0.2),
        dict(dtype="fp16"),
        dict(height=128, width=64),
        dict(opset=18),
        dict(context="keep"),
        dict(dynamic_batch=True),
        dict(controlnet_layers=2),
        dict(ratio=None, keep_ratios=[None, 0.6, 0.6, 0.5]),
    ],
    ids=["ratio", "dtype", "size", "opset", "context", "dynamic-batch", "controlnet", "schedule"],
)
def test_anything_that_changes_the_graph_changes_the_key(cache, monkeypatch, tmp_path, change):
    key, hit = _lookup(monkeypatch, tmp_path, **change)
    assert hit is False and key != _lookup(monkeypatch, tmp_path)[0]


def test_another_router_file_changes_the_key(cache, monkeypatch, tmp_path):
    a = _lookup(monkeypatch, tmp_path, router=_router_file(tmp_path / "a.safetensors", 1))
    b = _lookup(monkeypatch, tmp_path, router=_router_file(tmp_path / "b.safetensors", 2))
    assert a[0]["export"]["router"] != b[0]["export"]["router"] and not a[1] and not b[1]


def test_another_source_changes_the_key(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(graph_cache, "source_digest", lambda: "0" * 64)  # as if any shiva_export file had changed
    assert _lookup(monkeypatch, tmp_path)[1] is False


def test_a_tampered_entry_is_traced_again_and_replaced(base, cache, tmp_path):
    d, calls = cache
    (entry,) = _entries(d)
    graph = entry / "graph"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of a weight, same size
    graph.write_bytes(bytes(data))
    again = export_pruned(**KW, out=tmp_path / "b.onnx")
    assert not again.export.trace_cached and len(calls) == 1 and again.parity.passed
    assert again.export.onnx_sha256 == base[1].export.onnx_sha256
    third = export_pruned(**KW, out=tmp_path / "c.onnx", validate=False)  # the entry was stored anew
    assert third.export.trace_cached and len(calls) == 1


def test_an_entry_stored_under_another_key_is_not_used(cache, monkeypatch, tmp_path):
    d, _ = cache
    (entry,) = _entries(d)
    stored = json.loads((entry / "key.json").read_text())
    stored["key"]["export"]["ratio"] = 0.2  # a valid entry whose key is not this export's
    (entry / "key.json").write_text(json.dumps(stored))
    assert _lookup(monkeypatch, tmp_path)[1] is False


def _restamp(entry, name):
    """Rewrites key.json so that ``name`` hashes as stored: an entry consistent in itself, whatever it holds."""
    from shiva_export.utils.io import sha256_file

    stored = json.loads((entry / "key.json").read_text())
    stored["files"][name] = sha256_file(entry / name)
    (entry / "key.json").write_text(json.dumps(stored))


def test_an_entry_may_hold_nothing_but_its_graph(cache, monkeypatch, tmp_path):
    """A file listed beside the graph (even with its right sha256) would be copied next to the output: a miss."""
    d, _ = cache
    (entry,) = _entries(d)
    (entry / "important.txt").write_text("EVIL\n")
    _restamp(entry, "important.txt")
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "important.txt").write_text("PRECIOUS\n")
    assert _lookup(monkeypatch, tmp_path)[1] is False
    assert (tmp_path / "probe" / "important.txt").read_text() == "PRECIOUS\n"


@pytest.mark.parametrize("name", ["graph", "key.json"])
def test_a_fifo_in_an_entry_is_a_miss_not_a_hang(cache, monkeypatch, tmp_path, name):
    import os

    d, _ = cache
    (entry,) = _entries(d)
    (entry / name).unlink()
    os.mkfifo(entry / name)
    assert _lookup(monkeypatch, tmp_path)[1] is False


def test_a_consistent_but_wrong_entry_fails_parity_is_removed_and_traced_afresh(base, cache, tmp_path):
    import numpy as np
    from onnx import numpy_helper

    d, calls = cache
    (entry,) = _entries(d)
    g = onnx.load(str(entry / "graph"))
    t = max(g.graph.initializer, key=lambda t: np.prod(t.dims))
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 10.0, t.name))  # another model, same key
    onnx.save(g, str(entry / "graph"))
    _restamp(entry, "graph")
    res = export_pruned(**KW, out=tmp_path / "a.onnx")
    assert not res.export.trace_cached and len(calls) == 1 and res.parity.passed
    assert res.export.onnx_sha256 == base[1].export.onnx_sha256
    assert export_pruned(**KW, out=tmp_path / "b.onnx", validate=False).export.trace_cached  # stored anew


def test_off_by_environment_or_argument_never_looks(cache, monkeypatch, tmp_path):
    def trace(*a, **k):
        raise _Stop

    monkeypatch.setattr(onnx_export, "_trace_to_onnx", trace)
    monkeypatch.setattr(graph_cache.GraphCache, "fetch", lambda *a: pytest.fail("looked in the cache"))
    with pytest.raises(_Stop):
        export_pruned(**KW, out=tmp_path / "a.onnx", validate=False, trace_cache=False)
    monkeypatch.setenv("SHIVA_ONNX_CACHE", "0")
    with pytest.raises(_Stop):
        export_pruned(**KW, out=tmp_path / "b.onnx", validate=False)


def test_a_value_that_is_not_a_switch_is_refused_before_loading(monkeypatch, tmp_path):
    from shiva_export.errors import ConfigError

    monkeypatch.setenv("SHIVA_ONNX_CACHE", "maybe")
    monkeypatch.setattr("shiva_export.export.pruned.load_transformer", lambda **kw: pytest.fail("loaded a model"))
    monkeypatch.setattr("shiva_export.export.pruned.lazy_transformer", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="SHIVA_ONNX_CACHE='maybe'.*set it to 0"):
        export_pruned(**KW, out=tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_generate_refuses_a_bad_switch_before_loading_its_pipeline(monkeypatch, tmp_path, capsys):
    from shiva_export.cli import main

    monkeypatch.setenv("SHIVA_ONNX_CACHE", "maybe")
    monkeypatch.setattr("shiva_export.runtime.pipeline.ensure_embedded_pipeline", lambda *a: pytest.fail("loaded"))
    args = ["generate", "--model", "sd3-tiny", "--prompt", "x", "--backend", "ort", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "SHIVA_ONNX_CACHE='maybe'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_failed_export_stores_nothing(cache, monkeypatch, tmp_path):
    d, calls = cache

    def boom(*a, **k):
        raise onnx.checker.ValidationError("simulated crash")

    monkeypatch.setattr(onnx.checker, "check_model", boom)
    with pytest.raises(ExportError, match="simulated crash"):
        export_pruned(**(KW | dict(ratio=0.2)), out=tmp_path / "a.onnx", validate=False)
    assert len(calls) == 1 and len(_entries(d)) == 1  # traced, checked, refused: the base entry alone
    assert [p.name for p in (d / "onnx").iterdir() if p.name.startswith(".")] == []  # no staged leftovers


def test_hub_weights_are_never_keyed():
    """Their content is unknown before loading, so no trace is keyed on a hub id."""
    from types import SimpleNamespace

    from shiva_export.export.pruned import _trace_key
    from shiva_export.models import InputSpec
    from shiva_export.prune.api import ShivaConfig
    from shiva_export.recipe import load_recipe

    pm = SimpleNamespace(ratio_used=0.4, config=ShivaConfig.uniform(4, 0.4, [1, 2, 3]), controlnet_layers=0)
    args = (None, pm, InputSpec(1, 64, 64, 8, True), False, "fp16", 20, False, None)
    assert _trace_key(load_recipe("sd35"), None, *args) is None
    assert _trace_key(load_recipe("sd3-tiny"), None, *args)["keep_ratios"] == [None, 0.6, 0.6, 0.6]


def test_the_source_digest_changes_with_any_source_file(tmp_path):
    from pathlib import Path

    pkg = Path(graph_cache.__file__).resolve().parents[1]
    copy = tmp_path / "shiva_export"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert graph_cache.tree_digest(copy) == graph_cache.source_digest()
    target = copy / "prune" / "topk.py"
    target.write_text(target.read_text() + "\n# edited\n")
    assert graph_cache.tree_digest(copy) != graph_cache.source_digest()
