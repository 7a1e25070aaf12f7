"""Cut exports (``shiva_export.export.segments``) and chained engines (``shiva_export.engines.chain``).

The cut is a graph operation: the chain of segments must compute what the whole graph computes (ONNX Runtime,
every adapter), reference the export's weights without copying them, and refuse a chain that does not fit
together. The TensorRT-RTX part builds one engine per segment ahead of time (no GPU) and checks the layout,
the manifests and the by-content verification.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from shiva_export.cli import main
from shiva_export.errors import ConfigError, ManifestError
from shiva_export.export.ort import ChainedSession, ort_session
from shiva_export.export.segments import plan_cuts, read_segments, segment_path, split_onnx
from tests import archcases, shared

XDIST_GROUP = shared.EXPORTS  # conftest: one worker, which makes the shared artifacts once

MODELS = archcases.NAMES


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One ratio-0.4 export per adapter (graph + weights): this module's copies of the session's shared exports
    (tests/shared.py), since cutting writes the segments beside the source."""
    root = tmp_path_factory.mktemp("seg")
    return {m: shared.export_copy(m, 0.4, root / m / "model.onnx") for m in MODELS}


def _feed(sess, seed=0):
    g = np.random.default_rng(seed)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        if i.type == "tensor(int64)":
            feed[i.name] = g.integers(0, 4, size=shape).astype(np.int64)
        elif i.name == "timestep":
            feed[i.name] = g.uniform(1, 999, size=shape).astype(np.float32)
        else:
            feed[i.name] = g.standard_normal(shape).astype(np.float32)
    return feed


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("count", [2, 3])
def test_the_chain_computes_what_the_whole_graph_computes(exports, model, count):
    src = exports[model]
    segments = split_onnx(src, count)
    assert [s.path for s in segments] == [segment_path(src, i, count) for i in range(count)]
    assert segments[0].blocks[0] == 0 and all(a.blocks[1] == b.blocks[0] for a, b in zip(segments, segments[1:]))
    whole = ort_session(src)
    feed = _feed(whole)
    want = whole.run(["sample"], feed)[0]
    chain = ChainedSession(segments[-1].path)
    try:
        got = chain.run(["sample"], feed)[0]
    finally:
        chain.close()
    # the same nodes on the same weights: only ORT's per-session fusions may differ
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    # each cut carries the hidden states and a few conditioning tensors, never a block's internals
    for seg in segments[1:]:
        assert len(seg.inputs) <= 10, seg.inputs


def test_cuts_balance_weight_bytes():
    assert plan_cuts([10] * 8, 0, 2) == [4]
    assert plan_cuts([10] * 9, 0, 3) == [3, 6]
    assert plan_cuts([100, 10, 10, 10, 10], 0, 2) == [1]  # a heavy first block (with the embedders) alone
    with pytest.raises(ConfigError, match="out of range"):
        plan_cuts([1, 1], 0, 3)


def test_segments_reference_the_exports_weights_without_copying(exports, tmp_path):
    """An export with external data: every segment initializer points into the export's own .data file."""
    import onnx

    src = tmp_path / "model.onnx"
    m = onnx.load(str(exports["sd35-tiny"]))
    onnx.save(m, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    data = (tmp_path / "model.onnx.data").stat().st_size
    segments = split_onnx(src, 2)
    for seg in segments:
        g = onnx.load(str(seg.path), load_external_data=False)
        assert seg.path.stat().st_size < data / 4
        external = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert sum(seg.weight_bytes for seg in segments) >= data and len(external) > 10
        assert all({e.key: e.value for e in t.external_data}["location"] == "model.onnx.data" for t in external)
        assert all(len(t.raw_data) < 1024 for t in g.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx",
        "model.onnx.data",
        "model.seg0of2.onnx",
        "model.seg1of2.onnx",
    ]
    whole, chain = ort_session(src), ChainedSession(segments[0].path)
    feed = _feed(whole)
    np.testing.assert_array_equal(chain.run(["sample"], feed)[0], whole.run(["sample"], feed)[0])
    chain.close()


def test_a_second_cut_of_the_same_export_is_kept_and_a_changed_export_is_cut_again(exports, tmp_path):
    src = tmp_path / "model.onnx"
    shutil.copy(exports["sd35-tiny"], src)
    first = split_onnx(src, 2)
    stamp = first[0].path.stat().st_mtime_ns
    assert split_onnx(src, 2) == first and first[0].path.stat().st_mtime_ns == stamp
    shutil.copy(exports["dit-tiny"], src)  # another export at the same path
    again = split_onnx(src, 2)
    assert again[0].source_onnx_sha256 != first[0].source_onnx_sha256


def test_a_chain_that_does_not_fit_together_is_refused(exports, tmp_path):
    src = tmp_path / "model.onnx"
    shutil.copy(exports["sd35-tiny"], src)
    segments = split_onnx(src, 3)
    with pytest.raises(ConfigError, match="already a segment"):
        split_onnx(segments[0].path, 2)
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    shutil.copy(exports["sd35-tiny"], other)
    split_onnx(other, 3, cuts=[2, 4])  # other cuts of the same export
    shutil.copy(segment_path(other, 1, 3), segments[1].path)
    with pytest.raises(ConfigError, match="reads"):
        read_segments(segments[0].path)
    segments[2].path.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        read_segments(segments[0].path)
    # the CLI says so in one line
    assert main(["validate", "parity", "--model", "sd35-tiny", "--onnx", str(segments[0].path)]) == 2


def test_an_export_without_block_scopes_cannot_be_cut(exports, tmp_path):
    import onnx

    m = onnx.load(str(exports["sd35-tiny"]))
    kept = [p for p in m.metadata_props if p.key != "shiva.block_scopes"]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    src = tmp_path / "old.onnx"
    onnx.save(m, str(src))
    with pytest.raises(ConfigError, match="re-export"):
        split_onnx(src, 2)


def test_parity_of_a_chain_against_pytorch(exports, capsys):
    seg = split_onnx(exports["flux-tiny"], 2)[1]
    assert main(["validate", "parity", "--model", "flux-tiny", "--onnx", str(seg.path), "--cases", "2"]) == 0
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.trt_rtx
def test_a_chain_of_rtx_engines_builds_and_is_verified_by_content(exports, tmp_path):
    from shiva_export.engines.chain import CHAIN_FILE, read_chain
    from shiva_export.engines.manifest import read_manifest
    from shiva_export.engines.runner import EngineRunner, find_plan
    from shiva_export.utils.io import sha256_file

    src = tmp_path / "x" / "model.onnx"
    src.parent.mkdir()
    shutil.copy(exports["sd35-tiny"], src)
    out = tmp_path / "engines"
    args = ["trt", "--onnx", str(src), "--backend", "tensorrt-rtx", "--out-dir", str(out), "-q"]
    assert main(args + ["--segments", "2"]) == 0
    d = out / "sd35-tiny" / "ratio0.40" / "fp32"
    assert sorted(p.name for p in d.iterdir()) == sorted([CHAIN_FILE, "manifest.json", "seg0of2", "seg1of2"])
    chain = read_chain(d / CHAIN_FILE)
    top = read_manifest(d / "manifest.json")
    assert top.engine_sha256 == sha256_file(d / CHAIN_FILE) and top.build_options["segments"] == 2
    assert top.per_block_k == {str(b): 153 for b in range(1, 6)}
    parts = [read_manifest(d / r["dir"] / "manifest.json") for r in chain["segments"]]
    assert [p.engine_sha256 for p in parts] == [r["plan_sha256"] for r in chain["segments"]]
    assert sorted(k for p in parts for k in p.per_block_k) == sorted(top.per_block_k)  # each block's k in its segment
    assert find_plan(d) == d / CHAIN_FILE
    EngineRunner(d).verify()
    # the runtime opens a chain like one engine: metadata from its source export, then the GPU is looked for
    assert (
        main(
            [
                "generate",
                "--model",
                "sd35-tiny",
                "--prompt",
                "x",
                "--backend",
                "trt",
                "--artifact",
                str(d),
                "--out",
                str(tmp_path / "img"),
            ]
        )
        == 4
    )
    # a segment plan changed after the build: refused before any GPU is looked for
    with open(d / "seg1of2" / "model.plan", "ab") as f:
        f.write(b"x")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        EngineRunner(d).verify()
    # a chain file pointing at another build's segment
    data = json.loads((d / CHAIN_FILE).read_text())
    data["segments"][0]["plan_sha256"] = "0" * 64
    (d / CHAIN_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError):
        EngineRunner(d).verify()
    # one budget, one engine: a whole build in the same folder replaces the chain
    assert main(args) == 0
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.plan"]
    assert find_plan(d) == d / "model.plan"


def test_segment_names_out_of_range_are_refused(tmp_path):
    for name in ("m.seg0of0.onnx", "m.seg3of2.onnx", "m.seg0of99.onnx"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ConfigError, match="segments numbered from 0"):
            read_segments(tmp_path / name)


@pytest.mark.trt_rtx
def test_a_cached_chain_is_reused_checked_by_content_and_replaced_cleanly(tmp_path):
    from shiva_export.engines.chain import CHAIN_FILE

    out = tmp_path / "engines"  # any model with >= 3 blocks: the cache's checks are by content; sd3-tiny builds fastest
    base = [
        "trt",
        "--model",
        "sd3-tiny",
        "--ratio",
        "0.4",
        "--no-dense",
        "--no-validate",
        "--backend",
        "tensorrt-rtx",
        "--out-dir",
        str(out),
        "--json",
    ]
    d = out / "sd3-tiny" / "ratio0.40" / "fp32"

    import io
    from contextlib import redirect_stdout

    def run(args):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(args) == 0
        return json.loads(buf.getvalue())["engines"][0]

    first = run(base + ["--segments", "2"])
    assert first["status"] == "built" and first["plan"].endswith(CHAIN_FILE)
    # no --segments (as `generate --backend trt` builds): the cached chain is reused, not replaced by a whole build
    again = run(base)
    assert again["status"] == "cached" and again["plan"] == first["plan"] and again["engine_mb"] == first["engine_mb"]
    # a segment plan changed on disk: not cached any more
    with open(d / "seg1of2" / "model.plan", "ab") as f:
        f.write(b"x")
    assert run(base + ["--segments", "2"])["status"] == "built"
    # another count: the old segment folders go
    assert run(base + ["--segments", "3"])["status"] == "built"
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["seg0of3", "seg1of3", "seg2of3"]
