"""`shiva-export train` on sd35-tiny: short CI distillation, outputs, phase export, resume."""

from __future__ import annotations

import pytest
import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.train import TrainConfig, evaluate_router, train
from shiva_export.train.cached import LatentFolder
from shiva_export.train.data import SyntheticData
from shiva_export.train.outputs import dumps_toml, sampler_timesteps
from tests import shared

XDIST_GROUP = shared.TRAINING  # conftest: one worker, which makes the shared artifacts once

MODEL = "sd35-tiny"


def _cfg(out_dir, **kw) -> TrainConfig:
    base = dict(
        warmup_steps=40,
        policy_steps=8,
        joint_steps=6,
        batch=4,
        lr_router=3e-3,
        lr_policy=1e-3,
        phases=2,
        out_dir=out_dir,
        checkpoint_every=1000,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    events: list[dict] = []
    res = train(MODEL, _cfg(out), progress=events.append)
    return res, events


def test_outputs_written_and_valid(trained):
    from shiva_export.models.sd3 import load_transformer
    from shiva_export.prune.api import ShivaConfig
    from shiva_export.prune.router import load_routers
    from shiva_export.recipe import load_recipe

    res, events = trained
    assert res.finished and res.step == 54
    steps = [e for e in events if e["event"] == "step"]
    assert [e["stage"] for e in steps[:1] + steps[40:41] + steps[48:49]] == ["router-warmup", "policy", "joint"]
    assert all({"loss", "mean_keep", "stage"} <= set(e) for e in steps)
    rec = load_recipe(res.recipe_path)
    assert rec.router.weights == "router.safetensors" and rec.router.sha256 == res.router_sha256
    assert rec.schedule is not None and len(rec.schedule.phases) == 2
    assert len(rec.schedule.lut) == 28 and len(rec.schedule.lut[0]) == 5
    assert rec.schedule.target_keep == pytest.approx(0.6)
    model = load_transformer(recipe=rec)
    n = len(model.transformer_blocks)
    rc = ShivaConfig.uniform(n, 0.4, rec.routed_blocks(n)).router_config(
        model.inner_dim, model.config.pooled_projection_dim
    )
    _, sha = load_routers(rec.router_weights_path(), rc)
    assert sha == res.router_sha256
    assert abs(res.mean_keep - 0.6) <= 0.02
    assert res.lut_path.is_file()


def test_trained_router_beats_untrained(trained):
    res, _ = trained
    ev = evaluate_router(res.recipe_path, keep=0.6, seeds=range(2000, 2004))
    assert ev.errors["trained"] < ev.errors["random"], ev.errors
    assert ev.lut_mean_keep == pytest.approx(0.6, abs=0.02)


def test_phase_export_passes_parity(trained, tmp_path):
    from shiva_export.export.pruned import export_pruned

    res, _ = trained
    ex = export_pruned(recipe=res.recipe_path, phase=0, validate=True, parity_cases=1, out=tmp_path / "p0.onnx")
    assert ex.parity is not None and ex.parity.passed
    assert list(ex.budgets.values()) == res.phases[0]["k"]
    assert ex.router["file_sha256"] == res.router_sha256


def test_resume_continues_at_the_right_step(tmp_path):
    kw = dict(warmup_steps=4, policy_steps=2, joint_steps=2, batch=2, checkpoint_every=3)
    assert _cfg(tmp_path, **kw) == TrainConfig(
        out_dir=tmp_path, **shared.SHORT_TRAINING
    )  # the same run as the session's short training
    full = shared.short_training(MODEL)
    first = train(MODEL, _cfg(tmp_path / "cut", stop_at_step=5, **kw))
    assert not first.finished and first.step == 5 and first.recipe_path is None
    events: list[dict] = []
    second = train(MODEL, _cfg(tmp_path / "cut", resume=True, **kw), progress=events.append)
    assert events[0] == {
        "event": "resume",
        "step": 5,
        "total": 8,
        "checkpoint": str(tmp_path / "cut" / "checkpoint.pt"),
        "world": 1,
    }
    assert [e["step"] for e in events if e["event"] == "step"] == [6, 7, 8]
    assert second.finished and second.step == 8 and len(second.history) == 8
    assert full.finished and full.step == 8
    a = torch.load(full.out_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for k, v in a["routers"].items():
        assert torch.allclose(v, b["routers"][k], atol=1e-6), k
    assert second.router_sha256 is not None


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(MODEL, _cfg(tmp_path, resume=True, warmup_steps=1, policy_steps=0, joint_steps=0))


def test_config_errors():
    with pytest.raises(ConfigError, match="target keep"):
        TrainConfig(target_keep=1.5)
    with pytest.raises(ConfigError, match="phases"):
        TrainConfig(phases=5)
    with pytest.raises(ConfigError, match="at least one training step"):
        TrainConfig(warmup_steps=0, policy_steps=0, joint_steps=0)


def test_synthetic_data_is_seeded():
    from shiva_export.models import load_transformer
    from shiva_export.recipe import load_recipe

    model = load_transformer(recipe=load_recipe("sd35-tiny"))
    a, b = SyntheticData(model, 256, 256, 8, seed=3).batch(2), SyntheticData(model, 256, 256, 8, seed=3).batch(2)
    assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.timestep, b.timestep)
    assert a.target is None and a.hidden_states.shape == (2, 16, 32, 32)
    assert set(a.model_inputs()) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
    # the SD3 stream is the one earlier releases drew (latents, text, pooled from one generator), so
    # shipped routers retrain to the same bytes
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a.hidden_states, torch.randn((2, 16, 32, 32), generator=g))
    assert torch.equal(a.inputs["encoder_hidden_states"], torch.randn((2, 8, 64), generator=g))


def test_latent_folder(tmp_path):
    import types

    from safetensors.torch import save_file

    from shiva_export.models import load_transformer
    from shiva_export.recipe import load_recipe

    tf = load_transformer(recipe=load_recipe(MODEL))  # 16 latent channels, text 64 wide, pooled 64, at 256 x 256 px
    shapes = dict(model=tf, height=256, width=256)
    with pytest.raises(ConfigError, match="does not exist"):
        LatentFolder(tmp_path / "missing", **shapes)
    with pytest.raises(ConfigError, match="no .safetensors"):
        LatentFolder(tmp_path, **shapes)
    save_file(
        {"latents": torch.randn(16, 32, 32), "prompt_embeds": torch.randn(8, 64)}, str(tmp_path / "a.safetensors")
    )
    with pytest.raises(ConfigError, match="lacks tensors"):
        LatentFolder(tmp_path, **shapes)
    save_file(
        {"latents": torch.randn(16, 32, 32), "prompt_embeds": torch.randn(8, 64), "pooled": torch.randn(64)},
        str(tmp_path / "a.safetensors"),
    )
    save_file(
        {"latents": torch.randn(16, 32, 32), "prompt_embeds": torch.randn(8, 64), "pooled": torch.randn(64)},
        str(tmp_path / "b.safetensors"),
    )
    data = LatentFolder(tmp_path, seed=0, **shapes)
    batch = data.batch(3, timesteps=torch.tensor([0.0, 500.0, 999.0]))
    assert batch.target is not None and batch.hidden_states.shape == (3, 16, 32, 32)
    four = types.SimpleNamespace(
        **{**dict(tf.config), "in_channels": 4, "_class_name": type(tf).__name__}
    )  # a 4-channel model
    with pytest.raises(ShapeError, match="channels"):
        LatentFolder(tmp_path, four, height=256, width=256)
    with pytest.raises(ShapeError, match="latent grid"):  # the recipe's token count is what the schedule is learned for
        LatentFolder(tmp_path, tf, height=512, width=512)


def test_toml_writer_round_trips():
    import tomllib

    d = {
        "a": 1,
        "b": 'x"y',
        "t": {"f": 0.1, "l": [[0.5, 0.25]], "sub": {"z": True}},
        "arr": [{"n": "p", "k": [1, 2]}, {"n": "q", "k": [3]}],
        "none": None,
    }
    back = tomllib.loads(dumps_toml(d))
    d.pop("none")
    assert back == d


def test_sampler_timesteps_descend():
    ts = sampler_timesteps(28, 3.0)
    assert len(ts) == 28 and ts[0] == pytest.approx(1000.0) and all(a > b for a, b in zip(ts, ts[1:]))
