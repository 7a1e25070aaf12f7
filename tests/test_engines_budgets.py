"""`shiva-export trt` on tensorrt_rtx: real AOT engines per budget, manifests, cache, tamper refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shiva_export.cli import main
from shiva_export.engines.manifest import read_manifest, verify_engine
from shiva_export.errors import ManifestError

pytestmark = pytest.mark.trt_rtx


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from shiva_export.engines.budgets import build_engines

    root = tmp_path_factory.mktemp("engines")
    tc = root / "timing.cache"
    out = {}
    for model in ("sd3-tiny", "sd35-tiny"):
        out[model] = build_engines(
            model=model, ratios=[0.2, 0.4, 0.6], backend="tensorrt-rtx", out_dir=root, timing_cache=tc, validate=True
        )
    return root, tc, out


@pytest.mark.parametrize("model", ["sd3-tiny", "sd35-tiny"])
def test_engines_per_budget_with_complete_manifests(built, model):
    root, tc, out = built
    res = out[model]
    assert [r.ratio for r in res] == [0.0, 0.2, 0.4, 0.6] and all(r.status == "built" for r in res)
    assert res[0].dense and not any(r.dense for r in res[1:])
    for r in res:
        assert r.plan_path == root / model / f"ratio{r.ratio:.2f}" / "fp32" / "model.plan"
        assert r.plan_path.stat().st_size > 1e6 and r.parity.startswith("PASSED")
        m = read_manifest(r.manifest_path)
        for field in (
            "model_name",
            "model_config_hash",
            "recipe_sha256",
            "onnx_sha256",
            "engine_sha256",
            "backend",
            "backend_version",
            "build_seconds",
        ):
            assert getattr(m, field), field
        assert m.backend == "tensorrt-rtx" and m.aot_targets  # no GPU: the RTX AOT targets are recorded
        assert m.input_shapes["hidden_states"][0] == 2  # CFG batch
        assert m.ratio == r.ratio and abs(m.keep_ratio - (1 - r.ratio)) < 1e-12
        if r.dense:
            assert m.per_block_k == {} and m.router_sha256 is None
        else:
            assert len(set(m.per_block_k.values())) == 1 and m.router_sha256
        assert m.export_key["ratio"] == r.ratio and m.deserialize["deserialized"] in (True, False)
        verify_engine(r.plan_path, m, m.backend_version, None, backend="tensorrt-rtx")  # intact: accepted
    assert tc.is_file()


def test_second_run_is_cached_and_force_rebuilds(built):
    from shiva_export.engines.budgets import build_engines

    root, tc, _ = built
    again = build_engines(
        model="sd3-tiny", ratios=[0.2, 0.4, 0.6], backend="tensorrt-rtx", out_dir=root, timing_cache=tc
    )
    assert [r.status for r in again] == ["cached"] * 4
    forced = build_engines(
        model="sd3-tiny",
        ratios=[0.4],
        dense=False,
        backend="tensorrt-rtx",
        out_dir=root,
        timing_cache=tc,
        force=True,
        validate=False,
    )
    assert [r.status for r in forced] == ["built"]
    other_shape = build_engines(
        model="sd3-tiny", ratios=[0.4], dense=False, backend="tensorrt-rtx", out_dir=root, batch=2, validate=False
    )
    assert [r.status for r in other_shape] == ["built"]  # a different shape is a different key


def test_tampered_engine_is_refused_and_rebuilt(built, tmp_path):
    from shiva_export.engines.budgets import build_engines

    root, tc, out = built
    r = out["sd3-tiny"][2]  # ratio 0.4 (any model: the cache's check is by content; sd3-tiny re-exports fastest)
    m = read_manifest(r.manifest_path)
    data = bytearray(r.plan_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    r.plan_path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        verify_engine(r.plan_path, m, m.backend_version, None, backend="tensorrt-rtx")
    again = build_engines(
        model="sd3-tiny", ratios=[0.4], dense=False, backend="tensorrt-rtx", out_dir=root, validate=False
    )
    assert again[0].status == "built"  # the cache noticed the tampered plan
    verify_engine(
        again[0].plan_path, read_manifest(again[0].manifest_path), m.backend_version, None, backend="tensorrt-rtx"
    )


def test_trt_cli_json_and_table(capsys, tmp_path):
    code = main(
        [
            "trt",
            "--model",
            "sd3-tiny",
            "--ratio",
            "0.6",
            "--no-dense",
            "--backend",
            "tensorrt-rtx",
            "--out-dir",
            str(tmp_path),
            "--json",
            "--no-validate",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out)["engines"]
    assert len(rows) == 1 and rows[0]["status"] == "built" and rows[0]["per_block_k"] == {"1": 102, "2": 102, "3": 102}
    code = main(
        [
            "trt",
            "--model",
            "sd3-tiny",
            "--ratio",
            "0.6",
            "--no-dense",
            "--backend",
            "tensorrt-rtx",
            "--out-dir",
            str(tmp_path),
            "--no-validate",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "cached" in out and "r=0.6 keep=0.4" in out


_BLOCK = (
    "import importlib.abc, sys\n"
    "class B(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'tensorrt_bindings', 'tensorrt_rtx_bindings'): raise ImportError('blocked')\n"
    "sys.meta_path.insert(0, B())\n"
    "from shiva_export.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize(
    "backend,pip",
    [("tensorrt-rtx", "pip install tensorrt-rtx-cu12==1.7.1.116"), ("tensorrt", "pip install 'tensorrt-cu12")],
)
def test_missing_backend_module_exits_4_one_line(tmp_path, backend, pip):
    r = subprocess.run(
        [sys.executable, "-c", _BLOCK, "trt", "--model", "sd3-tiny", "--backend", backend, "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 4, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and pip in errors[0] and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir()), "nothing is exported before the backend is known to exist"


def test_run_without_gpu_exits_4(built, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    root, _, out = built
    code = main(["run", str(out["sd3-tiny"][1].out_dir)])
    err = capsys.readouterr().err
    assert code == 4 and "needs a CUDA GPU" in err


def test_inspect_cli_reports_findings(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3900])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 3900])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [1, 3900])
    g = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="big_topk")], "g", [x], [v, i], [k])
    p = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(p))
    code = main(["inspect", str(p), "--backend", "tensorrt-rtx"])
    out = capsys.readouterr().out
    assert code == 1 and "big_topk" in out and "3840" in out


def test_dynamic_batch_engine_gets_a_profile(tmp_path):
    from shiva_export.engines.budgets import build_engines

    res = build_engines(
        model="sd3-tiny",
        ratios=[0.4],
        dense=False,
        backend="tensorrt-rtx",
        out_dir=tmp_path,
        dynamic_batch=True,
        batch_range=(1, 2, 4),
        validate=True,
    )
    assert res[0].status == "built" and res[0].parity.startswith("PASSED")
    m = read_manifest(res[0].manifest_path)
    assert m.build_options["dynamic_batch"] and m.build_options["batch_range"] == [1, 2, 4]
    import onnx

    g = onnx.load(str(res[0].onnx_path), load_external_data=False)
    assert not g.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
