"""validate frontier: the paired statistics, the frontier rule, SSIM, and the command end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shiva_export.validate.frontier import FrontierConfig, default_configs, frontier_flags
from shiva_export.validate.stats import mcnemar_exact, paired_bootstrap, paired_bootstrap_mean, wilson_interval
from tests import shared

XDIST_GROUP = shared.RUNTIME  # conftest: one worker, whose runtime cache (shared.runtime_root) they share


def test_mcnemar_exact_matches_the_binomial_tail():
    a = [True] * 10 + [False] * 5
    b = [False] * 10 + [False] * 5
    c = mcnemar_exact(a, b)
    assert c.p == pytest.approx(2 * 0.5**10)
    assert c.significant and c.diff == pytest.approx(10 / 15)
    # 3 vs 1 discordant pairs: p = 2 * (1 + 4) / 16 = 0.625, not significant
    c = mcnemar_exact([True, True, True, False, True], [False, False, False, True, True])
    assert c.p == pytest.approx(0.625) and not c.significant


def test_mcnemar_of_identical_outcomes_is_one():
    c = mcnemar_exact([True, False, True], [True, False, True])
    assert c.p == 1.0 and not c.significant and c.diff == 0.0


def test_paired_tests_refuse_unpaired_samples():
    from shiva_export.errors import ConfigError

    with pytest.raises(ConfigError, match="same prompts and seeds"):
        mcnemar_exact([True], [True, False])
    with pytest.raises(ConfigError, match="no paired samples"):
        paired_bootstrap_mean([], [])


def test_bootstrap_mean_finds_a_constant_shift_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(20, 3, 200)
    shifted = paired_bootstrap_mean(list(base + 0.5), list(base))
    assert shifted.significant and shifted.low > 0 and shifted.diff == pytest.approx(0.5)
    noise = paired_bootstrap_mean(list(base + rng.normal(0, 1, 200)), list(base + rng.normal(0, 1, 200)))
    assert noise.low < 0 < noise.high and not noise.significant


def test_generic_bootstrap_agrees_with_the_vectorised_mean():
    rng = np.random.default_rng(1)
    a, b = list(rng.normal(1, 1, 60)), list(rng.normal(0, 1, 60))
    g = paired_bootstrap(a, b, lambda v: float(np.mean(v)), n_boot=2000)
    v = paired_bootstrap_mean(a, b, n_boot=2000)
    assert g.diff == pytest.approx(v.diff)
    assert g.low == pytest.approx(v.low, abs=0.12) and g.high == pytest.approx(v.high, abs=0.12)


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(89, 96)
    assert lo < 89 / 96 < hi and hi < 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_frontier_rule_needs_a_cheaper_significantly_better_row():
    flops = [10.0, 5.0, 6.0, 6.0]
    better = {(1, 2)}  # row 1 (cheaper) is significantly better than row 2
    flags = frontier_flags(flops, lambda o, r: (o, r) in better)
    assert flags == [True, True, False, True]
    # equal FLOPs count as "lower or equal"
    assert frontier_flags([5.0, 5.0], lambda o, r: o == 0) == [True, False]


def test_default_grid_has_every_family_and_the_reference_first():
    rows = default_configs(20, learned=True, cache_grid=[("fbc", {"threshold": 0.1})])
    assert rows[0] == FrontierConfig("dense", 20)
    fams = {r.family for r in rows}
    assert fams == {"dense", "cache", "shiva", "stack"}
    assert any(r.backend == "ort" for r in rows) and any(r.cache and r.pruned for r in rows)
    assert sorted({r.steps for r in rows if r.family == "dense"}, reverse=True)[0] == 20


def test_ssim_identity_and_order():
    from shiva_export.runtime.generate import ssim

    rng = np.random.default_rng(0)
    img = rng.random((24, 24, 3))
    assert ssim(img, img) == pytest.approx(1.0)
    small = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    big = np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1)
    assert ssim(img, big) < ssim(img, small) < 1.0


# ------------------------------------------------------------------------------------------- end to end
_CONTRACT = {"family", "config", "steps", "flops_per_image", "latency_ms", "accuracy", "fd", "psnr", "ssim", "frontier"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """sd35-tiny, 1 prompt x 2 seeds, 4 steps: a dense step, a cache, a Shiva row, a cached Shiva stack and the
    ONNX Runtime stack (its graph from the session's runtime cache, tests/shared.py)."""
    from shiva_export.validate.frontier import validate_frontier

    cfgs = [
        FrontierConfig("dense", 4),
        FrontierConfig("dense", 2),
        FrontierConfig("cache", 4, cache=("taylorseer", (("cache_interval", 2), ("disable_cache_before_step", 1)))),
        FrontierConfig("shiva", 4, keep=0.6),
        FrontierConfig(
            "stack", 4, keep=0.6, cache=("taylorseer", (("cache_interval", 2), ("disable_cache_before_step", 1)))
        ),
        FrontierConfig("stack", 2, keep=0.6, backend="ort"),
        FrontierConfig("shiva", 4, keep=0.6, context="keep"),
    ]
    out = tmp_path_factory.mktemp("frontier")
    rep = validate_frontier(
        model="sd35-tiny",
        prompts=1,
        seeds=[0, 1],
        configs=cfgs,
        latency_repeats=1,
        out_dir=out,
        artifact_root=shared.runtime_root(),
    )
    return rep, out


def test_tiny_frontier_rows_follow_the_contract(tiny_report):
    rep, out = tiny_report
    data = json.loads((out / "frontier.json").read_text())
    assert [r["family"] for r in data["rows"]] == ["dense", "dense", "cache", "shiva", "stack", "stack", "shiva"]
    for r in data["rows"]:
        assert _CONTRACT <= set(r)
        assert r["accuracy"] is None and r["fd"] is None  # sd35-tiny has no judge
        assert isinstance(r["frontier"], bool) and r["flops_per_image"] > 0 and r["n_images"] == 2
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "Best per compute level" in (out / "frontier.md").read_text()


def test_executed_flops_count_what_ran(tiny_report):
    rows = tiny_report[0].rows
    dense4, dense2, cache, shiva, stack, ort, kept = (r["flops_per_image"] for r in rows)
    assert dense2 == pytest.approx(dense4 / 2)  # per-step cost is fixed: half the steps, half the FLOPs
    assert cache < dense4  # TaylorSeer every 2nd step from step 1: skipped blocks are not counted
    assert shiva < dense4 and stack < shiva  # the cache skips steps of the pruned model too
    assert ort == pytest.approx(shiva / 2)  # the static graph of the same budget, half the steps
    assert shiva < kept < dense4  # kept context adds the rejected tokens' keys and values, not their MLP


def test_reference_row_and_a_tiny_difference(tiny_report):
    rows = tiny_report[0].rows
    assert rows[0]["psnr"] is None and rows[0]["ssim"] == 1.0 and rows[0]["frontier"]
    for r in rows[1:]:
        assert r["psnr"] > 10 and 0 < r["ssim"] <= 1.0
    # the cheapest row cannot be dominated by a cheaper one
    cheapest = min(range(len(rows)), key=lambda i: rows[i]["flops_per_image"])
    assert rows[cheapest]["frontier"]


def test_shapes_frontier_reports_accuracy_fd_and_paired_tests(tmp_path):
    from shiva_export.validate.frontier import validate_frontier

    cfgs = [FrontierConfig("dense", 3), FrontierConfig("shiva", 3, keep=0.6)]
    rep = validate_frontier(model="sd35-shapes", prompts=2, seeds=[1, 2], configs=cfgs, latency_repeats=0, n_ref=16)
    ref, shiva = rep.rows
    assert 0.0 <= ref["accuracy"] <= 1.0 and ref["fd"] > 0 and len(ref["correct"]) == 4
    assert set(ref["accuracy_by_seed"]) == {"1", "2"}
    assert shiva["vs_reference"]["p"] is not None and "McNemar" in shiva["vs_reference"]["detail"]
    assert shiva["fd_vs_reference"]["low"] is not None
    assert rep.settings["primary_quality"] == "accuracy"


def test_frontier_cli_json_and_option_checks(tmp_path, capsys):
    from shiva_export.cli import main

    assert main(["validate", "frontier", "--model", "sd35-tiny", "--seed", "-1", "--out-dir", str(tmp_path / "a")]) == 2
    assert (
        main(["validate", "frontier", "--model", "sd35-tiny", "--family", "fast", "--out-dir", str(tmp_path / "b")])
        == 2
    )
    assert (
        main(
            [
                "validate",
                "frontier",
                "--model",
                "sd35-tiny",
                "--seed",
                "3",
                "--seed",
                "3",
                "--out-dir",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    capsys.readouterr()
    code = main(
        [
            "validate",
            "frontier",
            "--model",
            "flux-tiny",
            "--prompts",
            "1",
            "--steps",
            "2",
            "--family",
            "dense",
            "--no-ort",
            "--latency-repeats",
            "0",
            "--json",
            "--out-dir",
            str(tmp_path / "flux"),
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["config"] for r in data["rows"]] == ["dense + 2 steps"] and _CONTRACT <= set(data["rows"][0])
