"""Training's learning signal: the output-gated estimator (forward identity, sign on a block whose update is
aligned with its input), the budget measures, the keep floor, the estimator check against finite
differences, and the paper-only path on the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from shiva_export.errors import ConfigError
from shiva_export.prune.topk import gather_tokens, scatter_tokens
from shiva_export.train import TrainConfig
from shiva_export.train.policy import KeepMeasure, RatioPolicy
from shiva_export.train.ste import DifferentiableTopK, route_output_gated, route_with_ste


def _toy(seed=0, b=2, n=32, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g)
    scores = torch.randn(b, n, generator=g)
    return x, scores


def test_output_gated_forward_is_the_hard_routing_bit_for_bit():
    x, scores = _toy()
    sel = DifferentiableTopK(noise_std=0.0).select(scores, 0.5)
    block = lambda t: t * 1.7 + 0.3  # noqa: E731
    teacher = block(x) - x
    y = route_output_gated(x, sel, block, teacher)
    assert torch.equal(y, scatter_tokens(x, sel.indices, block(gather_tokens(x, sel.indices))))


def _loss_at_keep(x, scores, block, target, keep: float) -> float:
    sel = DifferentiableTopK(noise_std=0.0).select(scores, keep)
    return float(((scatter_tokens(x, sel.indices, block(gather_tokens(x, sel.indices))) - target) ** 2).mean())


def test_output_gated_has_the_finite_difference_sign_where_the_residual_ste_does_not():
    # A block whose update is aligned with x (f(x) = 1.5 x): applying it to more tokens moves toward the
    # dense target, so dL/dkeep < 0. The residual STE's -<dL/dy, x> for rejected tokens says the opposite.
    x, scores = _toy(1, b=4, n=64)
    block = lambda t: 1.5 * t  # noqa: E731
    target = block(x)  # the dense teacher's output
    fd = (_loss_at_keep(x, scores, block, target, 0.6) - _loss_at_keep(x, scores, block, target, 0.4)) / 0.2
    assert fd < 0
    grads = {}
    for name in ("output-gated", "residual"):
        keep = torch.tensor(0.5, requires_grad=True)
        sel = DifferentiableTopK(noise_std=0.0).select(scores, keep)
        if name == "output-gated":
            y = route_output_gated(x, sel, block, target - x)
        else:
            y = route_with_ste(x, sel, block)
        ((y - target) ** 2).mean().backward()
        grads[name] = float(keep.grad)
    assert grads["output-gated"] < 0 < grads["residual"], grads


def test_keep_measures():
    from shiva_export.models import load_transformer
    from shiva_export.recipe import load_recipe

    keep = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert float(KeepMeasure("tokens")(keep)) == pytest.approx(0.5)
    model = load_transformer(recipe=load_recipe("sd35-tiny"))
    m = KeepMeasure.for_model("flops", model, 256, 32, [1, 2, 3, 4, 5])
    for r in (0.3, 0.6, 0.9):
        assert float(m(torch.full((3, 5), r))) == pytest.approx(r, abs=1e-6)  # uniform keep: the measure is the keep
    # FLOPs are convex in k (attention ~k^2): a spread table costs more than its plain mean
    spread = torch.tensor([[0.2, 1.0, 0.2, 1.0, 0.6]])
    assert float(m(spread)) > float(spread.mean())
    with pytest.raises(ConfigError, match="unknown"):
        KeepMeasure("area")


def test_policy_keep_floor():
    pol = RatioPolicy(6, target=0.6, min_keep=0.2)
    out = pol(torch.tensor([10.0, 500.0]), torch.arange(1, 6))
    assert torch.allclose(out, torch.full_like(out, 0.6), atol=1e-6)  # starts exactly on target
    assert float(pol.keep_of(torch.tensor(-1e4))) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="min_keep"):
        RatioPolicy(6, target=0.6, min_keep=0.7)
    bounded = RatioPolicy(6, target=0.6, min_keep=0.2, max_logit=4.0)
    with torch.no_grad():
        bounded.b_anchor.fill_(1e4)  # a drifted anchor: the logit stays inside (-4, 4)
    z = bounded.logits(torch.tensor([500.0]), torch.arange(1, 6)).detach()
    assert float(z.max()) <= 4.0 and float(z.max()) > 3.99
    with pytest.raises(ConfigError, match="estimator"):
        TrainConfig(estimator="magic")
    with pytest.raises(ConfigError, match="budget_timesteps"):
        TrainConfig(budget_timesteps="random")


def test_estimator_check_reports_sign_and_magnitude():
    from shiva_export.validate.estimator import check_estimator

    rep = check_estimator("sd35-tiny", keeps=(0.6,), samples=2, router="random")
    assert {c.estimator for c in rep.cases} == {"output-gated", "residual"}
    assert len(rep.cases) == 2 * 5 and {c.layer for c in rep.cases} == {1, 2, 3, 4, 5}
    assert all(c.finite_difference < 0 for c in rep.cases if c.agree is not None)  # more tokens, lower loss
    d = rep.to_dict()
    assert (
        set(d["summary"]) == {"output-gated", "residual"}
        and 0.0 <= d["summary"]["output-gated"]["sign_agreement"] <= 1.0
    )
    summary = d["summary"]["output-gated"]
    assert (
        -1.0 <= summary["rank_agreement"] <= 1.0
        and summary["magnitude_error"] >= 0
        and isinstance(summary["beats_baseline"], bool)
    )
    assert (
        summary["constant_baseline"]["sign_agreement"] == 1.0
    )  # every finite difference is negative: a constant agrees in sign
    assert "| output-gated |" in rep.to_markdown() and "cannot tell an estimator from a constant" in rep.to_markdown()


def _report(grads, fds):
    from shiva_export.validate.estimator import EstimatorCase, EstimatorReport

    rep = EstimatorReport(model="m", router="r", keeps=[0.4, 0.6, 0.8], delta=0.1, samples=2)
    for i, (g, f) in enumerate(zip(grads, fds)):
        rep.cases.append(EstimatorCase("e", [0.4, 0.6, 0.8][i // 5], 1 + i % 5, g, f, (g < 0) == (f < 0)))
    return rep


def test_estimator_gate_fails_a_constant_estimator():
    # every finite difference negative (more tokens, lower loss), different per layer and keep
    fds = [-0.5, -0.1, -0.3, -0.05, -0.2, -0.9, -0.2, -0.6, -0.1, -0.4, -1.4, -0.3, -1.0, -0.2, -0.7]
    const = _report([-0.3] * 15, fds)
    assert const.agreement("e") == 1.0  # the old check: a perfect score
    assert const.rank_agreement("e") == 0.0 and not const.beats_baseline("e")
    best_const = _report(
        [const.baseline("e")["value"]] * 15, fds
    )  # the best constant only ties the baseline: still fails
    assert best_const.magnitude_error("e") == pytest.approx(
        best_const.baseline("e")["magnitude_error"]
    ) and not best_const.beats_baseline("e")
    noisy = [f * s for f, s in zip(fds, [1.3, 0.8, 1.1, 0.9, 1.2, 0.7, 1.1, 1.0, 0.9, 1.2, 0.8, 1.3, 1.0, 0.9, 1.1])]
    good = _report(noisy, fds)
    assert (
        good.rank_agreement("e") > 0.8
        and good.magnitude_error("e") < good.baseline("e")["magnitude_error"]
        and good.beats_baseline("e")
    )
    flipped = _report([-g for g in noisy], fds)  # right magnitudes, wrong ranking and sign
    assert flipped.agreement("e") == 0.0 and not flipped.beats_baseline("e")
    scaled = _report([10 * g for g in noisy], fds)  # right ranking, magnitude 10x off: worse than the constant
    assert scaled.rank_agreement("e") > 0.8 and not scaled.beats_baseline("e")
    md = const.to_markdown()
    assert "| e | 100% (100%) | +0.00 (+0.00) |" in md and "| NO |" in md


def test_cli_validate_estimator_and_paper_only_train(tmp_path, capsys):
    from shiva_export.cli import main

    code = main(
        [
            "validate",
            "estimator",
            "--model",
            "sd35-tiny",
            "--keep",
            "0.6",
            "--samples",
            "2",
            "--router",
            "random",
            "--json",
            "-q",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["summary"]
    code = main(["validate", "estimator", "--model", "sd35-tiny", "--min-agreement", "1.5"])
    out, err = capsys.readouterr()
    assert code == 2 and "min-agreement" in err and "Traceback" not in err
    code = main(
        [
            "validate",
            "estimator",
            "--model",
            "sd35-tiny",
            "--keep",
            "0.6",
            "--samples",
            "2",
            "--router",
            "random",
            "--estimator",
            "residual",
            "--beat-baseline",
            "-q",
        ]
    )
    out, err = capsys.readouterr()
    rep = out.split("| residual |")[1]
    assert code == (0 if "| yes |" in rep.split("\n")[0] else 3) and ("does not beat a constant" in err) == (code == 3)
    # the paper-only path: residual STE, no importance auxiliary, the batch's timesteps for the budget
    out_dir = tmp_path / "paper"
    code = main(
        [
            "train",
            "--model",
            "sd35-tiny",
            "--steps",
            "3",
            "--steps",
            "2",
            "--steps",
            "1",
            "--batch",
            "2",
            "--paper-only",
            "--out-dir",
            str(out_dir),
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    lut = json.loads((out_dir / "lut.json").read_text())
    assert lut["estimator"] == "residual" and lut["min_keep"] == 0.0
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert (
        ck["config"]["importance_weight"] == 0.0
        and ck["config"]["budget_timesteps"] == "batch"
        and ck["config"]["budget"] == "ema"
    )
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"distill", "keep", "samples_per_s", "eta_s"} <= set(rows[0])


def test_cfg_pair_student_equals_cfg_inference_and_trains(tmp_path):
    from shiva_export.models import load_transformer
    from shiva_export.prune.api import ShivaConfig, apply_shiva_, set_route_override
    from shiva_export.recipe import load_recipe
    from shiva_export.train import train
    from shiva_export.train.data import SyntheticData
    from shiva_export.train.student import RouteState, make_override

    rec = load_recipe("sd35-tiny")
    model = load_transformer(recipe=rec)
    data = SyntheticData(model, 256, 256, 32, seed=2)
    batch = data.batch(2, timesteps=torch.tensor([800.0, 200.0]), cfg_pairs=True)
    inputs = batch.model_inputs()
    assert batch.cfg and len(batch) == 4 and torch.equal(inputs["hidden_states"][:2], inputs["hidden_states"][2:])
    routed = rec.routed_blocks(6)
    apply_shiva_(model, ShivaConfig.uniform(6, 0.4, routed, cfg=True), seed=0)
    with torch.no_grad():
        hard = model(**inputs).sample  # CFG inference: both halves keep the tokens of max(s_uncond, s_cond)
        st = RouteState(routed, DifferentiableTopK(noise_std=0.0), set())
        st.cfg = True
        set_route_override(model, make_override(st))
        st.mode, st.record_updates = "dense", True
        model(**inputs)
        st.mode, st.keep = "student", torch.tensor([[0.6] * 5, [0.6] * 5]).repeat(2, 1)
        assert torch.equal(model(**inputs).sample, hard)
    res = train(
        "sd35-tiny",
        TrainConfig(
            warmup_steps=2,
            policy_steps=1,
            joint_steps=1,
            batch=2,
            cfg_pairs=True,
            caption_dropout=0.1,
            out_dir=tmp_path,
            checkpoint_every=100,
        ),
    )
    assert res.finished and abs(res.mean_keep - 0.6) <= 0.02


def test_written_recipe_of_a_local_model_finds_its_weights(tmp_path):
    from shiva_export.models import load_transformer
    from shiva_export.recipe import load_recipe
    from shiva_export.train import train

    res = train(
        "sd35-shapes",
        TrainConfig(
            warmup_steps=1, policy_steps=1, joint_steps=1, batch=2, out_dir=tmp_path / "out", checkpoint_every=100
        ),
    )
    rec = load_recipe(res.recipe_path)
    assert rec.model.source == "local" and (rec.local_pipeline_path() / "model_index.json").is_file()
    assert load_transformer(recipe=rec) is not None
