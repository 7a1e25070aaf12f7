"""Held-out stopping of `shiva-export train` (--eval-every / --patience): the rule, the split, the best state kept."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shiva_export.errors import ConfigError
from shiva_export.train import TrainConfig, loop, train
from shiva_export.train.cached import LatentFolder
from shiva_export.train.heldout import EarlyStopping

MODEL = "sd35-tiny"


def _cfg(out_dir, **kw) -> TrainConfig:
    base = dict(
        warmup_steps=8,
        policy_steps=6,
        joint_steps=6,
        batch=2,
        lr_router=3e-3,
        lr_policy=1e-3,
        phases=2,
        out_dir=out_dir,
        checkpoint_every=1000,
        eval_every=2,
        patience=2,
        eval_samples=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def _router_state(transformer) -> dict[str, torch.Tensor]:
    from shiva_export.prune.api import ROUTERS_ATTR

    return {k: v.detach().clone() for k, v in transformer._modules[ROUTERS_ATTR].state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ the rule
def test_patience_counts_evaluations_without_a_relative_improvement():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    stop.start(0)
    states = iter(range(100))
    snap = lambda: {"id": next(states)}  # noqa: E731
    assert not stop.observe(0, 1.0, snap)  # the first value is the best so far
    assert not stop.observe(2, 0.95, snap)  # 5% better: below the 10% that counts
    assert not stop.observe(4, 0.8, snap) and stop.best_step == 4 and stop.bad == 0
    assert not stop.observe(6, 0.79, snap)
    assert stop.observe(8, 0.81, snap)  # second evaluation without an improvement
    assert stop.snapshot == {"id": 1} and stop.best == 0.8
    stop.start(1)  # a new stage forgets the old best
    assert stop.best == math.inf and stop.snapshot is None and not stop.observe(8, 5.0, snap)
    s = stop.summary(0)
    assert s["best_step"] == 4 and s["best_loss"] == 0.8 and [e["step"] for e in s["evals"]] == [0, 2, 4, 6, 8]
    again = EarlyStopping(2, 0.1)
    again.load_state_dict(json.loads(json.dumps(stop.state_dict())))
    assert again.state_dict() == stop.state_dict()


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="patience"):
        TrainConfig(eval_every=5, patience=0)
    with pytest.raises(ConfigError, match="eval_min_delta"):
        TrainConfig(eval_every=5, eval_min_delta=-0.1)
    with pytest.raises(ConfigError, match="eval_every"):
        TrainConfig(eval_every=0)
    with pytest.raises(ConfigError, match="eval_samples"):
        TrainConfig(eval_every=5, eval_samples=0)


def test_cli_held_out_stopping(tmp_path, capsys):
    from shiva_export.cli import main

    code = main(["train", "--model", MODEL, "--patience", "3", "--out-dir", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert code == 2 and "--eval-every" in err and "Traceback" not in err and not (tmp_path / "x").exists()
    code = main(
        [
            "train",
            "--model",
            MODEL,
            "--steps",
            "2",
            "--steps",
            "2",
            "--steps",
            "2",
            "--batch",
            "2",
            "--eval-every",
            "1",
            "--patience",
            "1",
            "--eval-min-delta",
            "0.9",
            "--eval-samples",
            "2",
            "--out-dir",
            str(tmp_path / "y"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "stopped early at step 1" in err and "run per stage 1/1/1; held-out stopping" in out
    assert json.loads((tmp_path / "y" / "training.json").read_text())["stages_run"] == [1, 1, 1]


# ------------------------------------------------------------------------------------------------ the split
def test_latent_folder_split_is_held_out(tmp_path):
    from safetensors.torch import save_file

    for i in range(5):
        save_file(
            {
                "latents": torch.full((16, 32, 32), float(i)),
                "prompt_embeds": torch.randn(8, 64),
                "pooled": torch.randn(64),
            },
            str(tmp_path / f"{i}.safetensors"),
        )
    data = LatentFolder(tmp_path, "sd3", seed=0)
    held = data.split_off(2, seed=7)
    assert len(data) == 3 and len(held) == 2
    assert sorted(data.latents[:, 0, 0, 0].tolist()) == [0.0, 1.0, 2.0]  # training never draws 3 or 4
    t = torch.tensor([0.0, 999.0])
    a, b = held.every(t), LatentFolder(tmp_path, "sd3").split_off(2, seed=7).every(t)
    assert torch.equal(a.hidden_states, b.hidden_states)  # fixed for the run
    assert torch.equal(a.hidden_states[0], held.latents[0])  # t = 0: the clean latent of file 3
    with pytest.raises(ConfigError, match="fewer --eval-samples"):
        data.split_off(3, seed=0)


# ------------------------------------------------------------------------------------------------ the loop
def test_flat_held_out_loss_stops_every_stage_early(tmp_path):
    """A relative min_delta of 0.9 makes any real loss curve flat: each stage stops after `patience`
    evaluations, keeps its entry state, and the run still finishes with valid outputs."""
    events: list[dict] = []
    res = train(MODEL, _cfg(tmp_path, eval_min_delta=0.9), progress=events.append)
    assert res.finished and res.step == 20 and res.stages_run == [4, 4, 4]
    for name in ("router-warmup", "policy", "joint"):
        st = res.heldout["stages"][name]
        assert st["best_step"] == st["evals"][0]["step"] and st["stopped_at"] == st["evals"][-1]["step"]
        assert len(st["evals"]) == 3 and all(math.isfinite(e["loss"]) for e in st["evals"])
    assert [e["stage"] for e in events if e["event"] == "stage-end"] == ["router-warmup", "policy", "joint"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and sum("heldout" in r for r in rows) == 6
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["stages_run"] == [4, 4, 4] and info["heldout"]["samples"] == 4
    assert "4/4/4 of budgets 8/6/6" in res.recipe_path.read_text().splitlines()[0]


def test_best_state_of_each_stage_is_kept(tmp_path, monkeypatch):
    """Scripted held-out losses: stage 1's best is its third evaluation; the state the next stage starts
    from (and the written router, after flat later stages) is the router of that evaluation."""
    script = iter([1.0, 0.9, 0.5, 0.6, 0.7] + [1.0] * 20)
    seen: list[dict] = []

    def fake(transformer, *args, **kw):
        seen.append(_router_state(transformer))
        return next(script)

    monkeypatch.setattr(loop, "heldout_loss", fake)
    res = train(MODEL, _cfg(tmp_path, eval_min_delta=0.0))
    warm = res.heldout["stages"]["router-warmup"]
    assert (
        [e["step"] for e in warm["evals"]] == [0, 2, 4, 6, 8] and warm["best_step"] == 4 and warm["stopped_at"] is None
    )
    assert not _same(seen[2], seen[4])  # training moved on after the best
    assert _same(seen[5], seen[2])  # stage 2 begins from stage 1's best
    from safetensors.torch import load_file

    written = load_file(str(res.router_path))
    entry_joint = seen[5 + len(res.heldout["stages"]["policy"]["evals"])]
    assert _same(written, entry_joint)
    assert res.stages_run[1:] == [4, 4]
