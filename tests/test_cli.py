"""CLI conduct: one-line errors with documented exit codes, JSON on stdout, real --weights loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from shiva_export.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--ratio", "1.0"], 2, "--ratio 1.0 is out of range; expected 0 <= ratio < 1"),
        (["--ratio", "-0.1"], 2, "--ratio -0.1 is out of range"),
        (["--ratio", "0.999"], 2, "leaves k = 0 of 256 image tokens"),
        (["--height", "250"], 2, "--height 250 is not a positive multiple of 16"),
        (["--width", "2048"], 2, "exceeds the model's position-embedding range of 1024 px"),
        (["--batch", "0"], 2, "--batch 0 is invalid"),
        (["--opset", "23"], 2, "--opset 23 is out of range"),
        (["--dtype", "int8"], 2, "int8"),
    ],
)
def test_bad_values_exit_2_one_line(capsys, args, code, needle, tmp_path):
    c, out, err = run(capsys, "onnx", "--model", "sd35-tiny", "--out", str(tmp_path / "m.onnx"), *args)
    assert c == code, err
    if args[0] != "--dtype":
        assert needle in _one_line_error(err)
    else:
        assert needle in err
    assert out == ""


def test_unknown_model(capsys):
    c, _, err = run(capsys, "onnx", "--model", "sd99")
    assert c == 2 and "Unknown model: 'sd99'" in _one_line_error(err)


def test_hub_model_offline_says_how_to_pass_weights(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    c, _, err = run(capsys, "onnx", "--model", "sd35", "--out", str(tmp_path / "m.onnx"))
    line = _one_line_error(err)
    assert c == 2 and "stabilityai/stable-diffusion-3.5-medium" in line and "--weights PATH" in line


def test_unreadable_weights_folder(capsys, tmp_path):
    c, _, err = run(capsys, "onnx", "--model", "sd35-tiny", "--weights", str(tmp_path / "nope"))
    assert c == 1 and "--weights folder does not exist" in _one_line_error(err)
    (tmp_path / "empty").mkdir()
    c, _, err = run(capsys, "onnx", "--model", "sd35-tiny", "--weights", str(tmp_path / "empty"))
    assert c == 1 and "holds no config.json" in _one_line_error(err)


def test_output_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    c, _, err = run(capsys, "onnx", "--model", "sd35-tiny", "--out", str(blocker / "m.onnx"))
    assert c == 1 and "Cannot create the folder" in _one_line_error(err)
    c, _, err = run(capsys, "onnx", "--model", "sd35-tiny", "--out", str(tmp_path))
    assert c == 1 and "is a directory" in _one_line_error(err)


def test_debug_shows_traceback(capsys):
    c, _, err = run(capsys, "onnx", "--model", "sd99", "--debug")
    assert c == 2 and "Traceback" in err


def test_main_job_json_and_weights_path(capsys, tmp_path):
    """The README's main job, then the same model through save_pretrained + --weights (real loading)."""
    c, out, err = run(
        capsys, "onnx", "--model", "sd35-tiny", "--ratio", "0.4", "--json", "--out", str(tmp_path / "a.onnx")
    )
    assert c == 0, err
    s = json.loads(out)
    assert s["parity"]["passed"] and s["parity"]["worst_max_abs"] <= 1e-4
    assert s["k_per_block"] == {str(b): 153 for b in range(1, 6)} and s["op_counts"]["TopK"] >= 5

    from shiva_export.models.sd3 import load_transformer
    from shiva_export.recipe import load_recipe

    load_transformer(recipe=load_recipe("sd35-tiny")).save_pretrained(tmp_path / "weights")
    c, out, err = run(
        capsys,
        "onnx",
        "--model",
        "sd35-tiny",
        "--weights",
        str(tmp_path / "weights"),
        "--ratio",
        "0.4",
        "--json",
        "--out",
        str(tmp_path / "b.onnx"),
    )
    assert c == 0, err
    s2 = json.loads(out)
    assert s2["parity"]["passed"] and s2["router"]["tensor_sha256"] == s["router"]["tensor_sha256"]
    # same weights, same router, same budget -> same graph bytes up to metadata
    assert s2["k_per_block"] == s["k_per_block"]


def test_parity_failure_exits_3(capsys, tmp_path):
    bad = tmp_path / "strict.toml"
    src = open(__import__("shiva_export.recipe", fromlist=["x"]).recipe_path("sd3-tiny")).read()
    bad.write_text(src.replace("atol = 1e-4", "atol = 1e-12"))
    c, out, err = run(
        capsys, "onnx", "--recipe", str(bad), "--ratio", "0.4", "--out", str(tmp_path / "m.onnx"), "--parity-cases", "1"
    )
    assert c == 3, err
    assert "FAILED | " in out and "worst sample" in out


_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"onnxruntime", "tensorrt", "tensorrt_rtx", "polygraphy", "torch", "diffusers", "matplotlib"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for test: {name}")
    sys.meta_path.insert(0, Block())
    from shiva_export.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize(
    "cmd",
    [
        [],
        ["onnx"],
        ["trt"],
        ["inspect"],
        ["run"],
        ["validate"],
        ["validate", "parity"],
        ["validate", "speed"],
        ["validate", "suite"],
        ["recipe"],
        ["recipe", "check"],
        ["recipe", "show"],
        ["recipe", "schema"],
        ["recipe", "list"],
    ],
)
def test_help_works_without_heavy_packages(cmd):
    """Every --help works with onnxruntime, tensorrt, torch and diffusers blocked from import."""
    r = subprocess.run([sys.executable, "-c", _BLOCKER, *cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_ratio_meaning_in_help(capsys):
    c, out, _ = run(capsys, "onnx", "--help")
    assert c == 0 and "PRUNED" in out and "0.4 keeps 60%" in out.replace("\n", " ").replace("  ", " ")


def test_hub_model_without_network_fails_fast_without_hf_hub_offline(capsys, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset and no network: one line at once (a connect probe), not ~34 s of hub retries."""
    import time

    import shiva_export.models.base as base

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    calls = []
    real = base.ModelAdapter.from_pretrained

    def spy(self, location, subfolder, dtype, local_files_only):
        calls.append(local_files_only)
        return real(self, location, subfolder, dtype, local_files_only)

    monkeypatch.setattr(base.ModelAdapter, "from_pretrained", spy)
    monkeypatch.setattr(base, "hub_reachable", lambda endpoint, timeout=None: False)
    t0 = time.perf_counter()
    c, _, err = run(capsys, "onnx", "--model", "sd35", "--out", str(tmp_path / "m.onnx"))
    line = _one_line_error(err)
    assert c == 2 and "--weights PATH" in line and "not reachable" in line
    assert calls == [True]  # the cache was looked at; no download was attempted
    assert time.perf_counter() - t0 < 20


def test_hub_probe_is_bounded(monkeypatch):
    import socket
    import time

    from shiva_export.models.base import hub_reachable

    assert hub_reachable("https://hub.invalid") is False  # RFC 2606: never resolves
    assert hub_reachable("not a url") is False
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))  # a connect that hangs
    t0 = time.perf_counter()
    assert hub_reachable("https://huggingface.co", timeout=0.5) is False
    assert time.perf_counter() - t0 < 2
