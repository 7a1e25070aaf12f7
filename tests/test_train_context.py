"""`shiva-export train --context keep` (sd35-tiny): the student's routed blocks run with the kept context exactly
as inference does (every image token gives keys and values), and the outputs record it."""

from __future__ import annotations

import json

import pytest
import torch

from shiva_export.errors import ConfigError
from shiva_export.train import TrainConfig, train

MODEL = "sd35-tiny"


def _cfg(out_dir, **kw) -> TrainConfig:
    base = dict(
        warmup_steps=3,
        policy_steps=2,
        joint_steps=1,
        batch=2,
        lr_router=3e-3,
        lr_policy=1e-3,
        phases=2,
        out_dir=out_dir,
        checkpoint_every=1000,
        num_threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _kv_lengths(context: str, tmp_path, **kw):
    """Trains a few steps with forward hooks on a routed block's attention projections; returns the run and
    ``{projection: [token counts it saw]}`` of the student passes (queries vs keys/values of the image stream)."""
    from shiva_export.models import load_transformer, num_image_tokens

    rec = _recipe()
    model = load_transformer(recipe=rec, dtype="fp32")
    block = model.transformer_blocks[2]
    seen: dict[str, list[int]] = {"to_q": [], "to_k": [], "to_v": []}
    handles = [
        getattr(block.attn, name).register_forward_hook(lambda m, a, o, _n=name: seen[_n].append(int(a[0].shape[1])))
        for name in seen
    ]
    try:
        res = train(MODEL, _cfg(tmp_path, context=context, **kw), transformer=model)
    finally:
        for h in handles:
            h.remove()
    return res, seen, num_image_tokens(model, rec.shapes.height, rec.shapes.width)


def _recipe():
    from shiva_export.recipe import load_recipe

    return load_recipe(MODEL)


@pytest.mark.parametrize("estimator", ["output-gated", "residual"])
def test_student_attention_sees_every_token_as_context(tmp_path, estimator):
    res, seen, n = _kv_lengths("keep", tmp_path, estimator=estimator)
    assert res.finished and res.context == "keep"
    routed_q = [q for q in seen["to_q"] if q < n]  # the student's calls (the teacher runs every token)
    assert routed_q, seen["to_q"]
    # one K/V projection per attention call, each over all N image tokens, while the queries are the k kept ones
    assert len(seen["to_k"]) == len(seen["to_q"]) and set(seen["to_k"]) == {n} and set(seen["to_v"]) == {n}


def test_drop_keeps_keys_to_the_kept_tokens(tmp_path):
    res, seen, n = _kv_lengths("drop", tmp_path)
    assert res.context == "drop"
    assert seen["to_k"] == seen["to_q"] and min(seen["to_k"]) < n


def test_gradients_reach_the_routers_through_the_kept_context(tmp_path):
    from safetensors.torch import load_file

    from shiva_export.models import load_transformer, router_dims
    from shiva_export.prune.api import ShivaConfig
    from shiva_export.prune.router import RouterBank

    res, _, _ = _kv_lengths("keep", tmp_path, warmup_steps=2, policy_steps=0, joint_steps=1)
    rec = _recipe()
    model = load_transformer(recipe=rec, dtype="fp32")
    n_layers = len(model.transformer_blocks)
    rc = ShivaConfig.uniform(
        n_layers, 0.4, rec.routed_blocks(n_layers), bottleneck=rec.router.bottleneck, group_size=rec.router.group_size
    )
    bank = RouterBank(rc.router_config(*router_dims(model)))
    bank.reset_parameters(rec.router.seed)
    init = bank.state_dict()
    trained = load_file(str(res.router_path))
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # the routers learned (from their seeded init)


class _Run:
    def __init__(self, out):
        self.out_dir, self.recipe_path, self.router_path, self.lut_path = (
            out,
            out / "recipe.toml",
            out / "router.safetensors",
            out / "lut.json",
        )


@pytest.fixture(scope="module")
def keep_run(tmp_path_factory):
    """A short `shiva-export train --context keep` run (the CLI end to end)."""
    from shiva_export.cli import main

    out = tmp_path_factory.mktemp("ctx") / "run"
    rc = main(
        [
            "train",
            "--model",
            MODEL,
            "--context",
            "keep",
            "--budget-measure",
            "flops",
            "--steps",
            "3",
            "--steps",
            "2",
            "--steps",
            "1",
            "--batch",
            "2",
            "--out-dir",
            str(out),
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    return _Run(out)


def test_written_recipe_and_router_record_context_keep(keep_run):
    from shiva_export.prune.router import read_router_metadata
    from shiva_export.recipe import load_recipe

    rec = load_recipe(keep_run.recipe_path)
    assert rec.prune.context == "keep"
    assert 'context = "keep"' in keep_run.recipe_path.read_text()
    assert read_router_metadata(keep_run.router_path)["context"] == "keep"
    lut = json.loads(keep_run.lut_path.read_text())
    assert lut["context"] == "keep" and lut["budget_measure"] == "flops"


def test_recipe_context_is_the_default_and_drop_writes_none(tmp_path, keep_run):
    from shiva_export.recipe import load_recipe

    res = train(
        keep_run.recipe_path, _cfg(tmp_path / "again", warmup_steps=1, policy_steps=0, joint_steps=1)
    )  # the recipe says keep
    assert res.context == "keep" and load_recipe(res.recipe_path).prune.context == "keep"
    res = train(
        keep_run.recipe_path, _cfg(tmp_path / "drop", warmup_steps=1, policy_steps=0, joint_steps=1, context="drop")
    )
    assert (
        load_recipe(res.recipe_path).prune.context == "drop"
        and "context" not in res.recipe_path.read_text().split("[prune]")[1].split("[")[0]
    )


def test_flops_measure_counts_the_kept_context():
    from shiva_export.models import get_adapter, load_transformer, num_image_tokens
    from shiva_export.train.policy import KeepMeasure

    model = load_transformer(recipe=_recipe(), dtype="fp32")
    rec = _recipe()
    n = num_image_tokens(model, rec.shapes.height, rec.shapes.width)
    routed = rec.routed_blocks(len(model.transformer_blocks))
    keeps = torch.tensor([[0.3, 0.5, 0.7, 0.9, 0.6][: len(routed)]], dtype=torch.float64)
    adapter = get_adapter(model)
    for context in ("drop", "keep"):
        m = KeepMeasure.for_model(
            "flops", model, n, rec.shapes.text_len, routed, rec.router.bottleneck, context=context
        )
        r = float(m(keeps))
        # the uniform keep r costs what the table costs, by the adapter's own count with this context
        per = [None] * len(model.transformer_blocks)
        uni = list(per)
        for j, b in enumerate(routed):
            per[b], uni[b] = float(keeps[0, j]), r

        def blocks(kr):
            fc = adapter.count_flops(
                model.config, n, rec.shapes.text_len, kr, bottleneck=rec.router.bottleneck, context=context
            )
            return sum(sum(fc.blocks[b].values()) for b in routed)

        # the count floors k = N * keep; compare the continuous fit with a tolerance of one token per block
        assert blocks(uni) == pytest.approx(blocks(per), rel=2e-2)
    drop = KeepMeasure.for_model("flops", model, n, rec.shapes.text_len, routed, rec.router.bottleneck)
    keep = KeepMeasure.for_model("flops", model, n, rec.shapes.text_len, routed, rec.router.bottleneck, context="keep")
    assert not torch.allclose(drop.coeffs, keep.coeffs)


def test_config_refuses_an_unknown_context(tmp_path):
    with pytest.raises(ConfigError, match="context 'both'"):
        _cfg(tmp_path, context="both")


def test_cli_refuses_a_bad_context_before_loading(tmp_path, capsys):
    from shiva_export.cli import main

    assert main(["train", "--model", MODEL, "--context", "both", "--out-dir", str(tmp_path / "a")]) == 2
    assert "--context" in capsys.readouterr().err
    assert main(["train", "--model", "flux-tiny", "--context", "keep", "--out-dir", str(tmp_path / "b")]) == 2
    assert "not implemented for architecture 'flux'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_context_keep_refused_for_an_architecture_without_it(tmp_path):
    with pytest.raises(ConfigError, match="not implemented for architecture 'flux'"):
        train("flux-tiny", _cfg(tmp_path, context="keep"))
    assert not (tmp_path / "checkpoint.pt").exists()
