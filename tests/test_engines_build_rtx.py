"""Engine builds with TensorRT-RTX (ahead of time, no GPU needed), manifests and backend resolution.

Tests marked ``trt_rtx`` build real engines and skip when ``tensorrt_rtx`` is not installed; the
manifest and missing-dependency tests need no backend.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from shiva_export._imports import INSTALL_HINTS
from shiva_export.engines import (
    RTX_DEFAULT_AOT_TARGETS,
    Backend,
    EngineManifest,
    build_engine,
    cache_key,
    current_gpu,
    deserialize_check,
    manifest_path_for,
    read_manifest,
    resolve_backend,
    verify_engine,
    write_manifest,
)
from shiva_export.engines.manifest import manifest_self_hash
from shiva_export.errors import (
    ConfigError,
    EngineBuildError,
    HardwareError,
    ManifestError,
    MissingDependencyError,
    PreflightError,
)


def pruning_graph(n=64, d=16, k=38, dynamic_batch=False):
    """MatMul -> TopK(sorted=1) -> GatherElements -> MatMul -> ScatterElements, static except optionally B."""
    rng = np.random.default_rng(0)
    b = "B" if dynamic_batch else 1
    inits = [
        nh.from_array(rng.standard_normal((d, 1)).astype(np.float32), "W_score"),
        nh.from_array(rng.standard_normal((d, d)).astype(np.float32) / d, "W_block"),
        nh.from_array(np.array([k], np.int64), "K"),
        nh.from_array(np.array([2], np.int64), "axis2"),
        nh.from_array(np.array([1, k, d], np.int64), "gather_shape"),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "W_score"], ["s3"], name="router"),
        h.make_node("Squeeze", ["s3", "axis2"], ["s"], name="squeeze"),
        h.make_node("TopK", ["s", "K"], ["vals", "idx"], name="topk", axis=1, sorted=1),
        h.make_node("Unsqueeze", ["idx", "axis2"], ["idx3"], name="unsqueeze"),
        h.make_node("Expand", ["idx3", "gather_shape"], ["idx_e"], name="expand"),
        h.make_node("GatherElements", ["x", "idx_e"], ["kept"], name="gather", axis=1),
        h.make_node("MatMul", ["kept", "W_block"], ["upd"], name="block"),
        h.make_node("ScatterElements", ["x", "idx_e", "upd"], ["y"], name="scatter", axis=1),
    ]
    if dynamic_batch:  # keep the selection path static; only a side branch sees the dynamic batch
        nodes = [h.make_node("Relu", ["x"], ["y"], name="relu")]
        inits = []
    graph = h.make_graph(
        nodes,
        "pruned",
        [h.make_tensor_value_info("x", TP.FLOAT, [b, n, d])],
        [h.make_tensor_value_info("y", TP.FLOAT, [b, n, d])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model, path, external=False) -> Path:
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + "_data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx")


@pytest.fixture(scope="module")
def built(trt, tmp_path_factory):
    """One engine built once for the module: (onnx path, BuildResult)."""
    root = tmp_path_factory.mktemp("rtx")
    onnx_path = save(pruning_graph(), root / "pruned.onnx", external=True)
    result = build_engine(onnx_path, root / "engines" / "pruned.plan", backend="tensorrt-rtx")
    return onnx_path, result


# --------------------------------------------------------------------------------------------------
# builds


@pytest.mark.trt_rtx
def test_build_writes_plan_and_reports(trt, built):
    onnx_path, res = built
    assert (onnx_path.parent / "pruned.onnx_data").is_file()  # parsed by path, weights external
    data = res.plan_path.read_bytes()
    assert res.plan_path.is_file() and res.size_bytes == len(data) > 0
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert res.backend == "tensorrt-rtx" and res.backend_version == trt.__version__
    assert 0 < res.build_seconds <= res.total_seconds
    assert res.onnx_path == onnx_path
    assert res.aot_targets == RTX_DEFAULT_AOT_TARGETS and res.aot_targets_default
    gpu = current_gpu()
    assert res.gpu_name == (gpu["name"] if gpu else None)
    assert res.compute_capability == (gpu["compute_capability"] if gpu else None)
    assert res.timing_cache is None and res.profile is None
    assert not list(res.plan_path.parent.glob(".*.tmp"))  # atomic write left no temp file
    json.dumps(res.to_dict())


@pytest.mark.trt_rtx
def test_topk_k_above_3840_is_refused_before_the_builder(trt, tmp_path):
    onnx_path = save(pruning_graph(n=4096, k=3900), tmp_path / "big.onnx")

    def no_builder(*_a, **_k):
        raise AssertionError("the builder must not be created when preflight fails")

    stub = types.SimpleNamespace(Builder=no_builder, __name__="tensorrt_rtx_stub")
    backend = Backend(name="tensorrt-rtx", module_name="tensorrt_rtx", version=trt.__version__, module=stub)
    with pytest.raises(PreflightError, match=r"node 'topk' \(TopK\): TopK K = 3900 .* K must be <= 3840"):
        build_engine(onnx_path, tmp_path / "big.plan", backend=backend)
    assert not (tmp_path / "big.plan").exists()


@pytest.mark.trt_rtx
def test_builder_errors_are_captured_in_the_exception(trt, tmp_path):
    # With the pre-flight skipped, the real builder refuses K=3900; its logger line is in the message.
    onnx_path = save(pruning_graph(n=4096, k=3900), tmp_path / "big.onnx")
    with pytest.raises(EngineBuildError, match=r"K exceeds the maximum value allowed \(3840\)") as exc:
        build_engine(onnx_path, tmp_path / "big.plan", backend="tensorrt-rtx", skip_preflight=True)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "big.plan").exists()


@pytest.mark.trt_rtx
def test_parser_errors_are_listed(trt, tmp_path):
    graph = h.make_graph(
        [h.make_node("NonZero", ["x"], ["o"], name="mask")],
        "g",
        [h.make_tensor_value_info("x", TP.FLOAT, [4, 4])],
        [h.make_tensor_value_info("o", TP.INT64, [2, None])],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_path = save(model, tmp_path / "nz.onnx")
    with pytest.raises(PreflightError, match="NonZero"):
        build_engine(onnx_path, tmp_path / "nz.plan", backend="tensorrt-rtx")
    with pytest.raises(EngineBuildError, match=r"ONNX parser rejected .*NonZero"):
        build_engine(onnx_path, tmp_path / "nz.plan", backend="tensorrt-rtx", skip_preflight=True)


@pytest.mark.trt_rtx
def test_timing_cache_created_and_reused(trt, tmp_path):
    onnx_path = save(pruning_graph(), tmp_path / "m.onnx")
    cache = tmp_path / "cache" / "timing.cache"
    first = build_engine(onnx_path, tmp_path / "a.plan", backend="tensorrt-rtx", timing_cache_path=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    assert first.timing_cache["loaded_bytes"] == 0 and first.timing_cache["saved_bytes"] == cache.stat().st_size
    size = cache.stat().st_size
    second = build_engine(onnx_path, tmp_path / "b.plan", backend="tensorrt-rtx", timing_cache_path=cache)
    assert second.timing_cache["loaded_bytes"] == size
    assert isinstance(second.timing_cache["accepted"], bool)  # False on a CPU-only machine: RTX cannot load it
    assert cache.is_file() and second.plan_path.is_file()


@pytest.mark.trt_rtx
def test_aot_compute_capability_targets(trt, tmp_path):
    onnx_path = save(pruning_graph(), tmp_path / "m.onnx")
    res = build_engine(onnx_path, tmp_path / "m.plan", backend="tensorrt-rtx", compute_capabilities=["8.9", "sm_120"])
    assert res.aot_targets == ("SM89", "SM120") and not res.aot_targets_default
    with pytest.raises(ConfigError, match="compute capability target"):
        build_engine(onnx_path, tmp_path / "x.plan", backend="tensorrt-rtx", compute_capabilities=["7.0"])


@pytest.mark.trt_rtx
def test_settings_are_validated(trt, tmp_path):
    onnx_path = save(pruning_graph(), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="0-5"):
        build_engine(onnx_path, tmp_path / "m.plan", backend="tensorrt-rtx", builder_optimization_level=9)
    with pytest.raises(ConfigError, match="workspace_bytes"):
        build_engine(onnx_path, tmp_path / "m.plan", backend="tensorrt-rtx", workspace_bytes=-1)
    with pytest.raises(EngineBuildError, match="not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan", backend="tensorrt-rtx")
    res = build_engine(
        onnx_path, tmp_path / "m.plan", backend="tensorrt-rtx", workspace_bytes=1 << 30, builder_optimization_level=1
    )
    assert res.plan_path.is_file()


@pytest.mark.trt_rtx
def test_dynamic_batch_needs_a_valid_profile(trt, tmp_path):
    onnx_path = save(pruning_graph(dynamic_batch=True), tmp_path / "dyn.onnx")
    with pytest.raises(PreflightError, match="dynamic shape"):
        build_engine(onnx_path, tmp_path / "dyn.plan", backend="tensorrt-rtx")
    with pytest.raises(ConfigError, match="inputs the graph does not have"):
        build_engine(onnx_path, tmp_path / "dyn.plan", backend="tensorrt-rtx", profile={"nope": ((1, 64, 16),) * 3})
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        build_engine(
            onnx_path,
            tmp_path / "dyn.plan",
            backend="tensorrt-rtx",
            profile={"x": ((4, 64, 16), (2, 64, 16), (8, 64, 16))},
        )
    with pytest.raises(ConfigError, match="graph fixes it to 64"):
        build_engine(
            onnx_path,
            tmp_path / "dyn.plan",
            backend="tensorrt-rtx",
            profile={"x": ((1, 32, 16), (2, 64, 16), (8, 64, 16))},
        )
    profile = {"x": ((1, 64, 16), (2, 64, 16), (4, 64, 16))}
    res = build_engine(onnx_path, tmp_path / "dyn.plan", backend="tensorrt-rtx", profile=profile)
    assert res.profile == {"x": [[1, 64, 16], [2, 64, 16], [4, 64, 16]]}


@pytest.mark.trt_rtx
def test_deserialize_check_is_honest(trt, built, tmp_path):
    _, res = built
    report = deserialize_check(res.plan_path, "tensorrt-rtx")
    assert report["backend"] == "tensorrt-rtx" and report["plan_bytes"] == res.size_bytes
    if report["gpu"] is None:
        # CPU-only: tensorrt_rtx cannot deserialize (CUDA driver needed); nothing is faked.
        assert report["deserialized"] is False and report["io"] == []
        assert "no CUDA GPU" in report["reason"]
    elif report["deserialized"]:
        names = {name for name, *_ in report["io"]}
        assert names == {"x", "y"} and report["reason"] is None
    else:
        assert report["reason"]  # e.g. a GPU outside the AOT targets
    truncated = tmp_path / "truncated.plan"
    truncated.write_bytes(res.plan_path.read_bytes()[: res.size_bytes // 2])
    bad = deserialize_check(truncated, "tensorrt-rtx")
    assert bad["deserialized"] is False and "malformed" in bad["reason"]


@pytest.mark.trt_rtx
def test_tensorrt_code_path_is_strongly_typed_without_precision_flags(trt, tmp_path):
    # Datacenter TensorRT cannot be installed here; tensorrt_rtx shares its API, so it stands in to
    # check what the "tensorrt" path asks of the builder: the STRONGLY_TYPED flag and no builder flags.
    calls = {}

    class RecordingBuilder:
        def __init__(self, logger):
            self._real = trt.Builder(logger)

        def __getattr__(self, name):
            return getattr(self._real, name)

        def create_network(self, flags):
            calls["network_flags"] = flags
            return self._real.create_network(flags)

        def build_serialized_network(self, network, config):
            calls["config_flags"] = config.flags
            return self._real.build_serialized_network(network, config)

        def build_serialized_network_to_stream(self, network, config, writer):
            calls["config_flags"] = config.flags
            return self._real.build_serialized_network_to_stream(network, config, writer)

    stand_in = types.ModuleType("tensorrt_rtx")
    stand_in.__dict__.update({k: v for k, v in vars(trt).items() if not k.startswith("__")})
    stand_in.Builder = RecordingBuilder
    backend = Backend(name="tensorrt", module_name="tensorrt", version="10.13.3.9", module=stand_in)
    onnx_path = save(pruning_graph(), tmp_path / "m.onnx")
    res = build_engine(onnx_path, tmp_path / "m.plan", backend=backend)
    assert calls["network_flags"] == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    default_flags = trt.Builder(trt.Logger()).create_builder_config().flags  # TF32 is on by default
    assert calls["config_flags"] == default_flags  # no FP16/BF16 (or any other) builder flag was set
    assert res.backend == "tensorrt" and res.aot_targets is None and res.plan_path.is_file()
    with pytest.raises(ConfigError, match="tensorrt-rtx only"):
        build_engine(onnx_path, tmp_path / "x.plan", backend=backend, compute_capabilities=["8.9"])


@pytest.mark.trt_rtx
def test_resolve_backend_names(trt):
    be = resolve_backend("tensorrt-rtx")
    assert be.name == "tensorrt-rtx" and be.is_rtx and be.version == trt.__version__ and be.module is trt
    assert resolve_backend("tensorrt_rtx") == be
    assert resolve_backend(be) is be
    with pytest.raises(ConfigError, match="Unknown TensorRT backend"):
        resolve_backend("onnxruntime")
    from shiva_export._imports import is_available

    if not is_available("tensorrt"):
        assert resolve_backend("auto").name == "tensorrt-rtx"


# --------------------------------------------------------------------------------------------------
# manifests


def _manifest(**overrides) -> EngineManifest:
    fields = dict(
        model_name="sd3-tiny",
        model_config_hash="cfg123",
        onnx_sha256="a" * 64,
        engine_sha256="b" * 64,
        backend="tensorrt-rtx",
        backend_version="1.7.1.116",
        input_shapes={"hidden_states": (2, 16, 32, 32)},
        dtype="fp16",
        recipe_sha256="r" * 64,
        router_sha256="o" * 64,
        aot_targets=list(RTX_DEFAULT_AOT_TARGETS),
        ratio=0.3,
        keep_ratio=0.7,
        per_block_k={3: 179, 4: 179},
        build_seconds=1.25,
    )
    fields.update(overrides)
    return EngineManifest(**fields)


@pytest.mark.trt_rtx
def test_manifest_round_trip_and_verify(trt, built, tmp_path):
    onnx_path, res = built
    manifest = EngineManifest.from_build(
        res,
        model_name="toy",
        model_config_hash="cfg",
        input_shapes={"x": [1, 64, 16]},
        dtype="fp32",
        per_block_k={0: 38},
    )
    assert manifest.onnx_sha256 == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert manifest.engine_sha256 == res.sha256 and manifest.aot_targets == list(RTX_DEFAULT_AOT_TARGETS)
    path = write_manifest(manifest_path_for(res.plan_path), manifest)
    assert path.name == "manifest.json" and path.parent == res.plan_path.parent
    again = read_manifest(path)
    assert again == manifest and cache_key(again) == cache_key(manifest)
    assert EngineManifest.from_json(manifest.to_json()) == manifest

    verify_engine(res.plan_path, again, trt.__version__, None)
    verify_engine(
        res.plan_path, again, trt.__version__, {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    )

    tampered = tmp_path / "tampered.plan"
    data = bytearray(res.plan_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match its manifest: sha256"):
        verify_engine(tampered, again, trt.__version__, None)


def test_manifest_json_round_trip_without_backend(tmp_path):
    m = _manifest()
    assert m.input_shapes == {"hidden_states": [2, 16, 32, 32]} and m.per_block_k == {"3": 179, "4": 179}
    path = write_manifest(tmp_path / "e.plan.manifest.json", m)
    assert read_manifest(path) == m
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["shiva_export_version"] and data["created_at"]


def test_cache_key_tracks_inputs_not_timings():
    base = _manifest()
    assert cache_key(base) == cache_key(
        _manifest(build_seconds=99.0, created_at="2020-01-01T00:00:00+00:00", engine_sha256="c" * 64)
    )
    for change in (
        {"onnx_sha256": "d" * 64},
        {"recipe_sha256": "e" * 64},
        {"router_sha256": None},
        {"model_config_hash": "other"},
        {"backend_version": "1.8.0"},
        {"aot_targets": ["SM89"]},
        {"input_shapes": {"hidden_states": [2, 16, 64, 64]}},
        {"dtype": "bf16"},
    ):
        assert cache_key(_manifest(**change)) != cache_key(base), change


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "Expected a JSON object"),
        ('{"schema_version": 99}', "schema_version 99"),
    ],
)
def test_read_manifest_rejects_malformed(tmp_path, text, match):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=match):
        read_manifest(path)


def test_read_manifest_rejects_bad_fields(tmp_path):
    good = json.loads(_manifest().to_json())
    path = tmp_path / "m.json"
    for mutate, match in (
        (lambda d: d.pop("engine_sha256"), "lacks required field"),
        (lambda d: d.update(surprise=1), "unknown field"),
        (lambda d: d.update(input_shapes={"x": "1x2"}), "input_shapes"),
        (lambda d: d.update(ratio="0.3"), "ratio"),
        (lambda d: d.update(per_block_k={"3": 1.5}), "per_block_k"),
    ):
        data = json.loads(json.dumps(good))
        mutate(data)
        data["self_sha256"] = manifest_self_hash(data)  # a consistent manifest with a bad field
        path.write_text(json.dumps(data))
        with pytest.raises(ManifestError, match=match):
            read_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.json")


def _plan(tmp_path) -> tuple[Path, str]:
    plan = tmp_path / "fake.plan"
    plan.write_bytes(b"plan bytes")
    return plan, hashlib.sha256(b"plan bytes").hexdigest()


def test_verify_engine_backend_version_and_gpu(tmp_path):
    plan, digest = _plan(tmp_path)
    rtx = _manifest(engine_sha256=digest)
    verify_engine(plan, rtx, "1.7.1.116", "8.9", backend="tensorrt_rtx")
    verify_engine(plan, rtx, None, (12, 1))  # SM120+ covers 12.1
    with pytest.raises(ManifestError, match="1.7.1.116, this runtime is 1.8.0"):
        verify_engine(plan, rtx, "1.8.0", None)
    with pytest.raises(ManifestError, match="built with tensorrt-rtx, not tensorrt"):
        verify_engine(plan, rtx, None, None, backend="tensorrt")
    with pytest.raises(ManifestError, match=r"targets compute capabilities .*this GPU is 9.0"):
        verify_engine(plan, rtx, "1.7.1.116", {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    with pytest.raises(ManifestError, match="this GPU is 8.9"):
        verify_engine(plan, _manifest(engine_sha256=digest, aot_targets=["SM120"]), None, "sm_89")

    dc = _manifest(
        engine_sha256=digest,
        backend="tensorrt",
        backend_version="10.13.3.9",
        aot_targets=None,
        gpu_name="NVIDIA A100",
        compute_capability="8.0",
    )
    verify_engine(plan, dc, "10.13.3.9", {"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"})
    with pytest.raises(ManifestError, match=r"built for compute capability 8.0 \(NVIDIA A100\), this GPU is 8.6"):
        verify_engine(plan, dc, "10.13.3.9", {"name": "NVIDIA RTX A6000", "compute_capability": "8.6"})
    with pytest.raises(ManifestError, match="not found"):
        verify_engine(tmp_path / "gone.plan", dc, None, None)


# --------------------------------------------------------------------------------------------------
# missing backends


def test_missing_backend_module_raises_with_pip_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # import now fails like an absent package
    with pytest.raises(MissingDependencyError) as exc:
        resolve_backend("tensorrt-rtx")
    assert INSTALL_HINTS["tensorrt_rtx"] in str(exc.value)

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as exc:
        resolve_backend("auto")
    assert INSTALL_HINTS["tensorrt_rtx"] in str(exc.value) and INSTALL_HINTS["tensorrt"] in str(exc.value)

    onnx_path = save(pruning_graph(), tmp_path / "m.onnx")
    with pytest.raises(MissingDependencyError):
        build_engine(onnx_path, tmp_path / "m.plan", backend="tensorrt-rtx")
    assert not (tmp_path / "m.plan").exists()


def test_missing_backends_in_a_fresh_interpreter():
    # A meta-path finder blocks both modules, as on a machine where neither is installed.
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_libs", "tensorrt_rtx_bindings"):
                    raise ImportError(f"blocked {name}")
                return None
        sys.meta_path.insert(0, Block())
        import shiva_export.engines as e
        from shiva_export.errors import MissingDependencyError
        assert not any(m.startswith("tensorrt") for m in sys.modules), "engines imported a backend at import time"
        try:
            e.resolve_backend("auto")
        except MissingDependencyError as err:
            print(type(err).__name__, err)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MissingDependencyError ")
    assert INSTALL_HINTS["tensorrt_rtx"] in out.stdout


def _weighty_graph(n: int = 1024):
    """X [1, n] @ W [n, n] (fp32, 4 MB at n=1024): enough weight bytes to see them leave the plan."""
    w = nh.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "W")
    g = h.make_graph(
        [h.make_node("MatMul", ["X", "W"], ["Y"])],
        "weighty",
        [h.make_tensor_value_info("X", TP.FLOAT, [1, n])],
        [h.make_tensor_value_info("Y", TP.FLOAT, [1, n])],
        [w],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 20)])


@pytest.mark.trt_rtx
def test_plan_is_streamed_into_its_file(trt, tmp_path):
    onnx_path = save(_weighty_graph(), tmp_path / "w.onnx")
    res = build_engine(onnx_path, tmp_path / "full.plan", backend="tensorrt-rtx")
    assert res.size_bytes > 4 << 20 and not res.weights_stripped  # the weights are in the plan
    assert res.plan_path.stat().st_size == res.size_bytes  # size and sha256 are the file's
    assert hashlib.sha256(res.plan_path.read_bytes()).hexdigest() == res.sha256
    assert not list(tmp_path.glob(".shiva-tmp-*"))  # no temp left behind


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.trt_rtx
def test_stripped_build_without_a_gpu_is_a_hardware_error(trt, tmp_path):
    # Observed with tensorrt_rtx 1.7.1.116: REFIT, REFIT_IDENTICAL and STRIP_PLAN builds all fail on a
    # CPU-only machine (Myelin graph_jit: CHECK(status == CUDA_SUCCESS), cudaError 35).
    if _cuda():
        pytest.skip("a GPU is present: the stripped build is expected to work (test_stripped_plan_holds_no_weights)")
    onnx_path = save(_weighty_graph(), tmp_path / "w.onnx")
    with pytest.raises(HardwareError, match="weight-stripped.*without a CUDA GPU"):
        build_engine(onnx_path, tmp_path / "s.plan", backend="tensorrt-rtx", strip_weights=True)
    assert not list(tmp_path.glob("*.plan")) and not list(tmp_path.glob(".shiva-tmp-*"))


@pytest.mark.trt_rtx
@pytest.mark.gpu
def test_stripped_plan_holds_no_weights(trt, tmp_path):
    onnx_path = save(_weighty_graph(), tmp_path / "w.onnx")
    full = build_engine(onnx_path, tmp_path / "full.plan", backend="tensorrt-rtx")
    stripped = build_engine(onnx_path, tmp_path / "stripped.plan", backend="tensorrt-rtx", strip_weights=True)
    assert stripped.weights_stripped and stripped.size_bytes < full.size_bytes - (3 << 20)  # the 4 MB of W are gone


@pytest.mark.trt_rtx
def test_refit_source_is_checked_against_the_manifest(trt, tmp_path):
    from shiva_export.engines.budgets import _refit_weights, build_engines
    from shiva_export.engines.runner import EngineRunner

    # any model: the check is the manifest's; sd3-tiny is the cheapest to export
    (res,) = build_engines(
        model="sd3-tiny",
        ratios=[0.4],
        dense=False,
        backend="tensorrt-rtx",
        out_dir=tmp_path,
        validate=False,
        height=128,
        width=128,
    )
    m = json.loads(res.manifest_path.read_text())
    assert m["build_options"]["strip_weights"] is False and "refit_weights" not in m["build_options"]
    # what a stripped build records (it needs a GPU to build, see above): the runner checks it before refitting
    m["build_options"] = {**m["build_options"], "strip_weights": True, "refit_weights": _refit_weights(res.onnx_path)}
    m["self_sha256"] = manifest_self_hash(m)  # re-sealed: an unsealed edit is refused before anything else
    res.manifest_path.write_text(json.dumps(m))
    runner = EngineRunner(res.out_dir)
    assert runner.refit_source() == res.onnx_path
    res.onnx_path.write_bytes(res.onnx_path.read_bytes() + b"\0")
    with pytest.raises(EngineBuildError, match="changed since"):
        runner.refit_source()
    res.onnx_path.unlink()
    with pytest.raises(EngineBuildError, match="missing"):
        runner.refit_source()
