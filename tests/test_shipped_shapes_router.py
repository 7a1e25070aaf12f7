"""The shipped sd35-shapes router and schedule: trained for the recipe's own sampler (the knee of the step curve)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shiva_export.recipe import load_recipe
from shiva_export.train.outputs import sampler_timesteps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipes():
    return load_recipe("sd35-shapes"), load_recipe(ROOT / "recipes" / "sd35-shapes.learned" / "recipe.toml")


def test_recipe_steps_are_the_knee_of_the_measured_step_curve(recipes):
    import importlib.util

    rec, _ = recipes
    curve = json.loads((ROOT / "docs" / "quality" / "step-curve.json").read_text())
    spec = importlib.util.spec_from_file_location("step_curve", ROOT / "scripts" / "step_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    knee, plateau = mod.knee(curve["rows"], curve["tolerance_points"])
    assert curve["seed"] == 1 and curve["prompts"] == 96 and curve["guidance"] == rec.pipeline.guidance
    assert knee == curve["knee_steps"] == rec.pipeline.steps and plateau == pytest.approx(curve["plateau"])


def test_router_and_schedule_are_the_learned_ones_for_this_sampler(recipes):
    rec, learned = recipes
    path = rec.router_weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec.router.sha256 == learned.router.sha256
    assert rec.schedule.model_dump() == learned.schedule.model_dump()
    assert learned.pipeline.steps == rec.pipeline.steps and learned.pipeline.guidance == rec.pipeline.guidance
    assert rec.schedule.timesteps == pytest.approx(sampler_timesteps(rec.pipeline.steps, rec.pipeline.scheduler_shift))
    info = json.loads((ROOT / "recipes" / "sd35-shapes.learned" / "training.json").read_text())
    assert info["sampler_steps"] == rec.pipeline.steps
    budgets = [info["config"][k] for k in ("warmup_steps", "policy_steps", "joint_steps")]
    assert all(0 < run <= b for run, b in zip(info["stages_run"], budgets))
    delta = info["heldout"]["min_delta"]
    for stage in info["heldout"][
        "stages"
    ].values():  # no evaluation of the stage beat the kept state by more than min_delta
        assert min(e["loss"] for e in stage["evals"]) >= stage["best_loss"] * (1.0 - delta)


def test_context_keep_recipe_is_sd35_shapes_with_its_own_trained_router():
    """sd35-shapes-ctx: the shipped pipeline and settings, context "keep", and the router + schedule trained with it."""
    base, rec = load_recipe("sd35-shapes"), load_recipe("sd35-shapes-ctx")
    learned = load_recipe(ROOT / "recipes" / "sd35-shapes-ctx.learned" / "recipe.toml")
    assert rec.name == "sd35-shapes-ctx" and rec.prune.context == "keep" == learned.prune.context
    assert (
        rec.local_pipeline_path() == base.local_pipeline_path()
    )  # the shipped pipeline folder, relative to the recipe
    a, b = base.content_dict(), rec.content_dict()
    for d in (a, b):
        for key in ("name", "description", "router", "schedule"):
            d.pop(key)
        d["prune"].pop("context", None)
    assert a == b
    path = rec.router_weights_path()
    assert (
        hashlib.sha256(path.read_bytes()).hexdigest()
        == rec.router.sha256
        == learned.router.sha256
        != base.router.sha256
    )
    assert rec.schedule.model_dump() == learned.schedule.model_dump()
    from shiva_export.prune.router import read_router_metadata

    assert read_router_metadata(path)["context"] == "keep"
    info = json.loads((ROOT / "recipes" / "sd35-shapes-ctx.learned" / "training.json").read_text())
    assert info["config"]["context"] == "keep" and info["sampler_steps"] == rec.pipeline.steps
    base_cfg = json.loads((ROOT / "recipes" / "sd35-shapes.learned" / "training.json").read_text())["config"]
    same = {k: v for k, v in info["config"].items() if k not in ("context", "out_dir")}
    assert same == {
        k: v for k, v in base_cfg.items() if k in same and k != "out_dir"
    }  # the shipped command plus --context keep
