"""`shiva-export validate parity`: three-way parity through polygraphy, and its failure modes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from shiva_export.cli import main
from tests import shared

XDIST_GROUP = shared.EXPORTS  # conftest: one worker, which makes the shared artifacts once


@pytest.mark.parametrize("model", ["sd3-tiny", "sd35-tiny"])
def test_parity_passes_for_every_budget(capsys, tmp_path, model):
    report = tmp_path / "parity.md"
    code = main(
        [
            "validate",
            "parity",
            "--model",
            model,
            "--ratio",
            "0",
            "--ratio",
            "0.2",
            "--ratio",
            "0.4",
            "--ratio",
            "0.6",
            "--cases",
            "3",
            "--json",
            "--report",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rep = json.loads(out)
    assert rep["passed"] and rep["summary"].startswith("PASSED | ")
    comps = rep["comparisons"]
    assert [c["ratio"] for c in comps] == [0.0, 0.2, 0.4, 0.6] and all(c["backend"] == "onnxrt-cpu" for c in comps)
    for c in comps:
        assert c["max_abs"] <= 1e-4 and c["min_index_overlap"] == 1.0 and c["exact_index_rows"] == 1.0
        assert c["polygraphy_simple"] and c["polygraphy_cosine"] and c["cases"] == 3
        for k in ("mean_abs", "median_abs", "p99_abs", "max_rel", "min_cosine"):
            assert k in c
    md = report.read_text()
    assert "| 0.4 | onnxrt-cpu | 3 |" in md and md.strip().splitlines()[-1].startswith("PASSED | ")


@pytest.fixture(scope="module")
def export_04():
    return shared.export("sd3-tiny", 0.4, parity_cases=1)  # read only: the tests write their broken copies elsewhere


def test_corrupted_onnx_fails_with_exit_3_naming_output(capsys, tmp_path, export_04):
    model = onnx.load(str(export_04.export.onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    mm = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input)][-1]
    w = inits[next(i for i in mm.input if i in inits)]
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1e-2  # one weight perturbed
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code = main(["validate", "parity", "--model", "sd3-tiny", "--onnx", str(bad), "--cases", "2"])
    out = capsys.readouterr().out
    assert code == 3
    last = out.strip().splitlines()[-1]
    assert last.startswith("FAILED | ") and "sample max_abs" in last


def test_wrong_router_fails_with_exit_3(capsys, tmp_path, export_04):
    from shiva_export.prune.router import RouterBank, save_routers

    bank = RouterBank(export_04.config.router_config(64, 64))
    bank.reset_parameters(seed=123)  # not the router the ONNX was exported with
    path = tmp_path / "wrong.safetensors"
    save_routers(bank, path)
    code = main(
        [
            "validate",
            "parity",
            "--model",
            "sd3-tiny",
            "--onnx",
            str(export_04.export.onnx_path),
            "--router",
            str(path),
            "--cases",
            "2",
            "--json",
        ]
    )
    rep = json.loads(capsys.readouterr().out)
    assert code == 3 and not rep["passed"]
    c = rep["comparisons"][0]
    assert c["min_index_overlap"] < 1.0 and "kept-index overlap" in c["reason"]


def test_boundary_score_ties_are_told_from_real_mismatches():
    import torch

    from shiva_export.export.parity import _near_ties

    scores = torch.tensor([[0.9, 0.5, 0.30000001, 0.3, 0.1]])
    rec = [{"block": 1, "indices": torch.tensor([[0, 1, 2]]), "scores": scores}]
    assert _near_ties(rec, {1: np.array([[0, 1, 3]])}) == 1  # 0.30000001 vs 0.3 at the k-th place: a tie
    assert _near_ties(rec, {1: np.array([[0, 2, 3]])}) == 0  # dropping 0.5 for 0.3 is a real mismatch
    assert _near_ties(rec, {1: np.array([[0, 1, 4]])}) == 0  # 0.1 is far below the k-th score
    # CFG pairs rank on the max of both halves
    cfg = [
        {
            "block": 1,
            "indices": torch.tensor([[0, 1], [0, 1]]),
            "scores": torch.tensor([[0.9, 0.3, 0.3], [0.1, 0.2, 0.30000001]]),
        }
    ]
    assert _near_ties(cfg, {1: np.array([[0, 2], [0, 2]])}) == 2
