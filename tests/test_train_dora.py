"""Stage-3 DoRA (`shiva-export train --dora`): targets, identity at init, teacher, merge, recipe binding, resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from shiva_export.errors import ConfigError, ModelNotFoundError, WeightsError  # noqa: E402
from shiva_export.models import InputSpec, load_transformer, make_inputs  # noqa: E402
from shiva_export.recipe import load_recipe  # noqa: E402
from shiva_export.runtime.pipeline import load_pipeline  # noqa: E402
from shiva_export.train import (  # noqa: E402
    TrainConfig,
    dora,  # noqa: E402
    train,
)

MODEL = "sd35-tiny"
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
CTX = ("add_q_proj", "add_k_proj", "add_v_proj")
FF = ("net.0.proj", "net.2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: no gain from more, and CI cores are shared
    yield
    torch.set_num_threads(old)


def _base(model: str = MODEL) -> nn.Module:
    return load_transformer(recipe=load_recipe(model))


def _spec(model: str = MODEL) -> InputSpec:
    rec = load_recipe(model)
    return InputSpec(1, rec.shapes.height, rec.shapes.width, rec.shapes.text_len, False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _expected_targets(model: str, t: nn.Module) -> set[str]:
    """The attention and FFN linears, spelled out per architecture (independently of the adapters' regexes)."""
    out: set[str] = set()
    for i, b in enumerate(t.transformer_blocks):
        p = f"transformer_blocks.{i}"
        if model in ("sd35-tiny", "flux-tiny"):
            out |= {f"{p}.attn.{n}" for n in ATTN + CTX} | {f"{p}.ff.{n}" for n in FF}
            if b.attn.to_add_out is not None:
                out.add(f"{p}.attn.to_add_out")
            if getattr(b, "attn2", None) is not None:
                out |= {f"{p}.attn2.{n}" for n in ATTN}
            if b.ff_context is not None:
                out |= {f"{p}.ff_context.{n}" for n in FF}
        else:  # pixart: self + cross attention; dit: self attention
            out |= {f"{p}.attn1.{n}" for n in ATTN} | {f"{p}.ff.{n}" for n in FF}
            if model == "pixart-tiny":
                out |= {f"{p}.attn2.{n}" for n in ATTN}
    for i, _ in enumerate(getattr(t, "single_transformer_blocks", [])):
        p = f"single_transformer_blocks.{i}"
        out |= {f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v", f"{p}.proj_mlp", f"{p}.proj_out"}
    return out


@pytest.mark.parametrize(
    ("model", "count"), [("sd35-tiny", 81), ("flux-tiny", 34), ("pixart-tiny", 40), ("dit-tiny", 24)]
)
def test_target_pattern_hits_exactly_attention_and_ffn_linears(model, count):
    t = _base(model)
    names = dora.dora_targets(t)
    assert set(names) == _expected_targets(model, t) and len(names) == count
    assert not [
        n for n in names if "norm" in n or "embed" in n or n.startswith("proj_out")
    ]  # no AdaLN, embedders, head
    if model == "sd35-tiny":  # the regex reaches the dual attention (peft's list form would miss attn2 by suffix)
        assert "transformer_blocks.0.attn2.to_q" in names and "transformer_blocks.0.norm1.linear" not in names
        assert "transformer_blocks.5.attn.to_add_out" not in names  # context_pre_only last block


def test_peft_adapts_exactly_the_targets_fp32_frozen():
    t = _base("flux-tiny")
    names = dora.add_dora(t, r=4, alpha=4)
    wrapped = sorted(n for n, m in t.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
    assert wrapped == sorted(names) == sorted(_expected_targets("flux-tiny", t))
    params = dora.dora_parameters(t)
    assert params and all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    assert all(not p.requires_grad for n, p in t.named_parameters() if ".base_layer." in n)


def test_identity_at_init_and_teacher_is_the_base():
    t = _base()
    x = make_inputs(t, _spec(), seed=0)
    with torch.no_grad():
        y_base = t(**x).sample
    dora.add_dora(t, trainable=True)
    with torch.no_grad():
        y_init = t(**x).sample
    torch.testing.assert_close(y_init, y_base, atol=1e-6, rtol=0)  # B = 0, magnitude = ||W||: measured 0.0
    with torch.no_grad():  # a trained adapter: the teacher must still be the base, exactly
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        y_adapted = t(**x).sample
        with dora.teacher_mode(t):
            y_teacher = t(**x).sample
        y_after = t(**x).sample
    assert _rel(y_adapted, y_base) > 1e-3
    assert torch.equal(y_teacher, y_base)
    assert torch.equal(y_after, y_adapted) and all(p.requires_grad for p in dora.dora_parameters(t))


def test_merge_matches_unmerged_and_leaves_a_plain_transformer(tmp_path):
    t = _base()
    keys = set(t.state_dict())
    dora.add_dora(t)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            elif "magnitude" in n:
                p.mul_(1.1)
    x = make_inputs(t, _spec(), seed=3)
    with torch.no_grad():
        y_adapted = t(**x).sample
    res = dora.merge_and_save(t, tmp_path, check_inputs=_spec())
    assert res.rel_error is not None and res.rel_error < 1e-5 and res.modules == 81  # measured ~2e-7
    assert not dora.has_dora(t) and set(t.state_dict()) == keys
    assert res.path == tmp_path / "transformer" and res.files == ["diffusion_pytorch_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shiva-tmp-")]
    with torch.no_grad():
        y_loaded = load_transformer(weights=res.path)(**x).sample
    assert _rel(y_loaded, y_adapted) < 1e-5


# ------------------------------------------------------------------------------------- a short --dora run
_STEPS = dict(
    warmup_steps=2,
    policy_steps=1,
    joint_steps=3,
    batch=2,
    lr_router=3e-3,
    lr_policy=1e-3,
    phases=2,
    checkpoint_every=1000,
    dora=True,
    num_threads=1,
)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    """One finished `train(dora=True)` run, with the adapted model captured just before the merge."""
    out = tmp_path_factory.mktemp("dora")
    seen: dict = {}
    merge = dora.merge_and_save

    def spy(transformer, out_dir, check_inputs=None, **kw):
        from shiva_export.prune.api import is_shiva_applied

        seen["routed"] = is_shiva_applied(transformer)
        seen["base"] = {
            k.replace(".base_layer", ""): v.clone() for k, v in transformer.state_dict().items() if "lora_" not in k
        }
        seen["x"] = make_inputs(transformer, _spec(), seed=11)
        with torch.no_grad():
            seen["y"] = transformer(**seen["x"]).sample
        return merge(transformer, out_dir, check_inputs, **kw)

    events: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dora, "merge_and_save", spy)
        res = train(MODEL, TrainConfig(out_dir=out, **_STEPS), progress=events.append)
    return res, seen, events


def test_dora_run_trains_only_adapters_and_binds_the_recipe(dora_run):
    from shiva_export.models.base import weights_sha256

    res, seen, events = dora_run
    assert res.finished and not seen["routed"]
    base = _base().state_dict()
    assert set(seen["base"]) == set(base) and all(
        torch.equal(seen["base"][k], v) for k, v in base.items()
    )  # base untouched
    ck = torch.load(res.out_dir / "checkpoint.pt", weights_only=True)
    assert any(float(v.abs().max()) > 0 for k, v in ck["dora"].items() if "lora_B" in k)  # stage 3 moved the adapters
    assert [g["name"] for g in ck["optimizer"]["param_groups"]] == ["router", "policy", "dora"]
    assert res.dora["rel_error"] < 1e-5
    rec = load_recipe(res.recipe_path)
    assert (rec.model.source, rec.model.path) == ("local", "transformer")
    assert rec.model.sha256 == res.dora["sha256"] == weights_sha256(res.out_dir / "transformer")
    assert rec.router.sha256 == res.router_sha256
    with torch.no_grad():
        y = load_transformer(recipe=rec)(**seen["x"]).sample
    assert _rel(y, seen["y"]) < 1e-5  # the recipe loads the merged model == the unmerged adapted one
    assert any(e["event"] == "dora-merged" for e in events)


def test_recipe_refuses_tampered_missing_or_base_weights(dora_run, tmp_path):
    res, _, _ = dora_run
    out = tmp_path / "run"
    shutil.copytree(res.out_dir, out)
    rec = load_recipe(out / "recipe.toml")
    base = tmp_path / "base"
    _base().save_pretrained(base)
    with pytest.raises(WeightsError, match="do not match recipe") as err:
        load_transformer(recipe=rec, weights=base)  # --weights cannot swap the unadapted base in
    assert "\n" not in str(err.value)
    from shiva_export.runtime.pipeline import pipeline_location

    with pytest.raises(WeightsError, match="do not match recipe"):  # nor can `generate --weights` with another pipeline
        pipeline_location(rec, load_recipe("sd35-shapes").local_pipeline_path())
    with pytest.raises(WeightsError, match="do not match recipe"):  # nor a transformer folder
        load_pipeline(MODEL, recipe=rec, weights=base, dense=True)
    f = out / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256") as err:
        load_transformer(recipe=rec)
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="do not match recipe"):  # the pipeline path checks the same binding
        load_pipeline(MODEL, recipe=rec, ratio=0.4)
    shutil.rmtree(out / "transformer")
    with pytest.raises(ModelNotFoundError, match="bound by \\[model\\] sha256") as err:
        load_transformer(recipe=rec)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelNotFoundError, match="bound by \\[model\\] sha256"):
        load_pipeline(MODEL, recipe=rec, dense=True)


def test_resume_restores_adapter_state(dora_run, tmp_path):
    full, _, _ = dora_run
    out = tmp_path / "cut"
    first = train(MODEL, TrainConfig(out_dir=out, stop_at_step=3, **_STEPS))  # end of stage 2
    assert not first.finished and not (out / "transformer").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(float(v.abs().max()) == 0 for k, v in ck["dora"].items() if "lora_B" in k)  # untouched before stage 3
    train(MODEL, TrainConfig(out_dir=out, stop_at_step=4, resume=True, **_STEPS))  # one joint step, then cut
    with pytest.raises(ConfigError, match="with --dora"):
        train(MODEL, TrainConfig(out_dir=out, resume=True, **dict(_STEPS, dora=False)))
    second = train(MODEL, TrainConfig(out_dir=out, resume=True, **_STEPS))
    assert second.finished and second.step == 6
    a = torch.load(full.out_dir / "checkpoint.pt", weights_only=True)["dora"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["dora"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_settings_errors():
    with pytest.raises(ConfigError, match="stage 3"):
        TrainConfig(warmup_steps=2, policy_steps=1, joint_steps=0, dora=True)
    with pytest.raises(ConfigError, match="dora_rank"):
        TrainConfig(dora=True, dora_rank=0)
    with pytest.raises(ConfigError, match="non-linear"):
        dora.add_dora(_base(), target_modules=r"pos_embed\.proj")  # a Conv2d
    from pydantic import ValidationError

    from shiva_export.recipe import ModelSection

    with pytest.raises(ValidationError, match="sha256 is only for"):
        ModelSection(source="embedded", config={"num_layers": 1}, sha256="0" * 64)


def test_cli_help_mentions_dora():
    from typer.testing import CliRunner

    from shiva_export.cli import app

    r = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert r.exit_code == 0 and "--dora" in r.output and "--dora-rank" in r.output and "--lr-dora" in r.output
    assert "--stage3-keep" in r.output and "--dense-weight" in r.output
    r = CliRunner().invoke(app, ["validate", "quality", "--help"], terminal_width=200)
    assert r.exit_code == 0 and "--weights" in r.output


# ----------------------------------------------------------------------------- the DoRA recipe in a pipeline
def _weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa = {k: v for k, v in a.state_dict().items() if "shiva_routers" not in k}
    sb = b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)


def test_dora_recipe_runs_the_merged_transformer_in_the_base_pipeline(dora_run):
    """`generate`/`validate quality` loading: the recipe alone, or --weights its transformer folder, gives the base
    model's pipeline (text encoders, VAE, scheduler) around exactly the merged weights, routed by the trained router."""
    from shiva_export.runtime.generate import run_pipeline
    from shiva_export.runtime.pipeline import pipeline_location

    res, _, _ = dora_run
    rec = load_recipe(res.recipe_path)
    merged = load_transformer(recipe=rec)
    assert pipeline_location(rec, None) == pipeline_location(load_recipe(MODEL), None)  # the base's other components
    for weights in (None, res.out_dir / "transformer"):
        pipe = load_pipeline(MODEL, recipe=rec, weights=weights, ratio=0.4)
        assert _weights_equal(pipe.transformer, merged) and pipe.shiva.router["file_sha256"] == res.router_sha256
        dense = load_pipeline(MODEL, recipe=rec, weights=weights, dense=True)
        assert _weights_equal(dense.transformer, merged)
    assert not _weights_equal(merged, _base())  # the adapters moved the weights: the test could tell them apart
    a = run_pipeline(pipe, "a red cube", steps=2, guidance=2.0, seed=0).image
    b = run_pipeline(dense, "a red cube", steps=2, guidance=2.0, seed=0).image
    assert a.shape == b.shape and a.std() > 0


def test_dora_recipe_without_a_base_model_of_its_name_is_refused(dora_run, tmp_path):
    res, _, _ = dora_run
    out = tmp_path / "renamed"
    shutil.copytree(res.out_dir, out)
    text = (out / "recipe.toml").read_text().replace('name = "sd35-tiny"', 'name = "my-model"')
    (out / "recipe.toml").write_text(text)
    with pytest.raises(WeightsError, match="no built-in sd3 model named 'my-model'") as err:
        load_pipeline(recipe=out / "recipe.toml", dense=True)
    assert "\n" not in str(err.value)


def test_validate_quality_cli_takes_the_dora_recipe_and_weights(dora_run, tmp_path, capsys):
    import json

    from shiva_export.cli import main

    res, _, _ = dora_run
    # validate quality scores with the shapes judge only where the recipe names it (a random tiny model has none):
    # the same DoRA recipe, beside the original (its relative paths hold), with the judge named
    text = res.recipe_path.read_text(encoding="utf-8")
    assert "[pipeline]" in text and "judge" not in text
    judged = res.recipe_path.with_name("judged.toml")
    judged.write_text(text.replace("[pipeline]", '[pipeline]\njudge = "shapes"', 1), encoding="utf-8")
    args = [
        "validate",
        "quality",
        "--model",
        MODEL,
        "--recipe",
        str(judged),
        "--method",
        "shiva",
        "--keep",
        "0.6",
        "--prompts",
        "1",
        "--steps",
        "1",
        "--n-ref",
        "2",
        "--velocity-samples",
        "1",
        "--latency-repeats",
        "0",
        "--json",
    ]
    code = main([*args, "--weights", str(res.out_dir / "transformer"), "--out-dir", str(tmp_path / "q")])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(stdout)["rows"]
    assert [r["method"] for r in rows] == ["dense", "shiva"] and "untrained" not in rows[1]["label"]
    base = tmp_path / "base"
    _base().save_pretrained(base)
    code = main(
        [*args, "--weights", str(base), "--out-dir", str(tmp_path / "q2")]
    )  # the unadapted base: refused, one line
    _, err = capsys.readouterr()
    # refused in one line before anything is written (the output folder may exist: its writability is checked first)
    assert code == 1 and "sha256" in err and "recipe was written for" in err and not any((tmp_path / "q2").rglob("*"))


# ------------------------------------------------------------------------------ stage 3: uniform keep, dense term
def test_stage3_keep_routes_the_student_uniformly_and_freezes_the_policy(tmp_path, monkeypatch):
    from shiva_export.train.ste import DifferentiableTopK

    keeps: list[float] = []
    select = DifferentiableTopK.select

    def spy(self, scores, keep, *a, **kw):
        keeps.append(float(keep.detach()) if torch.is_tensor(keep) else float(keep))
        return select(self, scores, keep, *a, **kw)

    monkeypatch.setattr(DifferentiableTopK, "select", spy)
    cfg = dict(_STEPS, dora=False, stage3_keep=0.5)
    cut = train(MODEL, TrainConfig(out_dir=tmp_path, stop_at_step=3, **cfg))  # end of stage 2
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    keeps.clear()
    res = train(MODEL, TrainConfig(out_dir=tmp_path, resume=True, **cfg))
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert not cut.finished and res.finished
    assert keeps and set(keeps) == {0.5}  # every stage-3 student selection, every routed block
    assert [h["keep"] for h in res.history[3:]] == [[0.5] * 5] * 3
    assert all(torch.equal(before["policy"][k], v) for k, v in after["policy"].items())  # no policy or budget update
    assert any(not torch.equal(before["routers"][k], v) for k, v in after["routers"].items())  # routers still learn


def test_dense_term_is_zero_at_identity_then_trains_the_adapters(dora_run, tmp_path):
    """--dense-weight: the adapted model run dense vs the frozen teacher. It is exactly 0 while the adapters are the
    identity (first joint step), then non-zero, and its gradient changes what the adapters learn."""
    res, _, _ = dora_run
    with_term = train(MODEL, TrainConfig(out_dir=tmp_path, dense_weight=10.0, **_STEPS))
    dense = [h["dense"] for h in with_term.history]
    assert dense[:3] == [None] * 3 and dense[3] <= 1e-12 and dense[4] > 1e-9 and dense[5] > 1e-9
    assert all(h.get("dense") is None for h in res.history)
    assert with_term.history[2]["loss"] == res.history[2]["loss"]  # same run before stage 3
    a = torch.load(res.out_dir / "checkpoint.pt", weights_only=True)["dora"]
    b = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["dora"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-6


def test_resume_uses_this_runs_learning_rates(tmp_path):
    cfg = dict(_STEPS, dora=False)
    train(MODEL, TrainConfig(out_dir=tmp_path, stop_at_step=2, **cfg))
    train(MODEL, TrainConfig(out_dir=tmp_path, resume=True, **dict(cfg, lr_router=5e-4)))
    groups = {
        g["name"]: g for g in torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    }
    assert groups["router"]["base_lr"] == 5e-4 and groups["policy"]["base_lr"] == _STEPS["lr_policy"]


def test_stage3_settings_errors():
    with pytest.raises(ConfigError, match="stage3_keep"):
        TrainConfig(stage3_keep=1.5)
    with pytest.raises(ConfigError, match="stage3-keep"):
        TrainConfig(warmup_steps=2, policy_steps=1, joint_steps=0, stage3_keep=0.6)
    with pytest.raises(ConfigError, match="needs --dora"):
        TrainConfig(dense_weight=1.0)
    with pytest.raises(ConfigError, match="dense_weight"):
        TrainConfig(dora=True, dense_weight=float("nan"))
