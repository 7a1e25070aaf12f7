"""The generation runtime: Shiva pipelines on torch and ONNX Runtime, phase switching, the static-shape contract."""

from __future__ import annotations

import json

import pytest
import torch

from shiva_export.cli import main
from shiva_export.errors import ConfigError, ShapeError
from shiva_export.prune.api import ShivaConfig, apply_shiva_, phase_trace, record_selection, remove_shiva_
from shiva_export.recipe import load_recipe

STEPS = 10


def _latents(pipe, prompt="a red cube", steps=STEPS, seed=0, guidance=4.5, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=g,
        output_type="latent",
        max_sequence_length=16,
        height=256,
        width=256,
        **kw,
    ).images


@pytest.fixture(scope="module")
def torch_pipe():
    from shiva_export.runtime.pipeline import load_diffusers_pipeline

    pipe = load_diffusers_pipeline("sd35-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ort_export(tmp_path_factory):
    """ratio 0.4 ONNX of sd35-tiny with the trained router and kept-index debug outputs."""
    from shiva_export.export.pruned import export_pruned

    out = tmp_path_factory.mktemp("ort") / "r04.onnx"
    res = export_pruned(model="sd35-tiny", ratio=0.4, out=out, debug_outputs=True, validate=False)
    return res


def test_ratio0_torch_pipeline_is_bit_identical_to_dense(torch_pipe):
    dense = _latents(torch_pipe)
    t = torch_pipe.transformer
    apply_shiva_(t, ShivaConfig.uniform(len(t.transformer_blocks), 0.0, cfg=True))
    try:
        pruned = _latents(torch_pipe)
    finally:
        remove_shiva_(t)
    assert torch.equal(pruned, dense)
    assert torch.equal(_latents(torch_pipe), dense)  # removed: dense again


def test_ort_pipeline_matches_torch_pruned_pipeline(torch_pipe, ort_export):
    """Final latents within the recipe's fp32 tolerance after a full 10-step run; kept indices agree per step."""
    from shiva_export.prune.schedule import uniform_phase
    from shiva_export.runtime.modules import ArtifactPhase, OrtRunner, ShivaArtifactTransformer
    from shiva_export.runtime.pipeline import _apply_torch, load_diffusers_pipeline

    rec = load_recipe("sd35-tiny")
    t = torch_pipe.transformer
    n = len(t.transformer_blocks)
    phase = uniform_phase(n, 0.4, rec.routed_blocks(n))
    _apply_torch(t, rec, None, (phase,), cfg=True)
    try:
        with record_selection(t) as rec_torch:
            ref = _latents(torch_pipe)
    finally:
        remove_shiva_(t)
    runner = OrtRunner(ort_export.export.onnx_path)
    runner.record = []
    module = ShivaArtifactTransformer(
        dict(t.config), [ArtifactPhase(phase, ort_export.spec, runner, {}, "sd35-tiny")], "ort"
    )
    pipe = load_diffusers_pipeline("sd35-tiny", transformer=module)
    pipe.set_progress_bar_config(disable=True)
    got = _latents(pipe)
    tol = rec.tolerance("fp32")
    assert (got - ref).abs().max().item() <= tol.atol
    assert len(runner.record) == STEPS and module.trace == [phase.name] * STEPS
    blocks = sorted(runner.record[0])
    torch_steps = [rec_torch[i * len(blocks) : (i + 1) * len(blocks)] for i in range(STEPS)]
    for step, (o, tr) in enumerate(zip(runner.record, torch_steps)):
        for r in tr:
            assert torch.equal(o[r["block"]].long(), r["indices"].long()), f"step {step} block {r['block']}"


def test_learned_phases_switch_at_the_recorded_boundary(torch_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from shiva_export.runtime.pipeline import _apply_torch, resolve_phases

    rec = load_recipe("sd35-tiny")
    t = torch_pipe.transformer
    n = len(t.transformer_blocks)
    phases = resolve_phases(rec, n, None, True)
    assert [p.name for p in phases] == ["early", "late"]
    boundary = rec.schedule.phases[0].t_stop
    assert phases[0].t_stop == boundary  # taken from the recipe, not re-derived
    one = resolve_phases(rec, n, 0.4, False)
    for steps in (12, 28):
        sched = FlowMatchEulerDiscreteScheduler(shift=rec.pipeline.scheduler_shift)
        sched.set_timesteps(steps)
        expected = ["early" if float(ts) > boundary else "late" for ts in sched.timesteps]
        _apply_torch(t, rec, None, phases, cfg=True)
        try:
            two_phase = _latents(torch_pipe, steps=steps)
            trace = phase_trace(t)
        finally:
            remove_shiva_(t)
        assert trace == expected
        assert 0 < trace.count("early") < steps
        if steps == 28:  # the training sampler's split, step for step
            assert trace.count("early") == sum(1 for ts in rec.schedule.timesteps if ts > boundary) == 27
    _apply_torch(t, rec, None, one, cfg=True)
    try:
        one_phase = _latents(torch_pipe, steps=28)
    finally:
        remove_shiva_(t)
    assert not torch.equal(two_phase, one_phase)


def test_torch_pipeline_routes_non_cfg_calls_per_row(torch_pipe):
    """guidance <= 1 is a batch of 1: the runtime routes it without CFG pairing instead of failing."""
    from shiva_export.runtime.pipeline import _apply_torch, resolve_phases

    rec = load_recipe("sd35-tiny")
    t = torch_pipe.transformer
    _apply_torch(t, rec, None, resolve_phases(rec, len(t.transformer_blocks), 0.4, False), cfg=True)
    try:
        lat = _latents(torch_pipe, guidance=1.0, steps=2)
    finally:
        remove_shiva_(t)
    assert lat.shape == (1, 16, 32, 32) and torch.isfinite(lat).all()


def test_static_shape_contract(torch_pipe, ort_export):
    from shiva_export.prune.schedule import uniform_phase
    from shiva_export.runtime.modules import ArtifactPhase, OrtRunner, ShivaArtifactTransformer
    from shiva_export.runtime.pipeline import load_diffusers_pipeline

    rec = load_recipe("sd35-tiny")
    n = len(torch_pipe.transformer.transformer_blocks)
    ap = ArtifactPhase(
        uniform_phase(n, 0.4, rec.routed_blocks(n)),
        ort_export.spec,
        OrtRunner(ort_export.export.onnx_path),
        {},
        "sd35-tiny",
    )
    module = ShivaArtifactTransformer(dict(torch_pipe.transformer.config), [ap], "ort")
    cases = [
        ((4, 256, 256, 32, True), "model batch is 4 rows but the artifact was exported for 2", "--batch 2"),
        ((2, 512, 512, 32, True), "height is 512 px but the artifact was exported for 256 px", "--height 512"),
        ((2, 256, 256, 40, True), "text length is 40 tokens but the artifact was exported for 32", "--text-len 40"),
        ((1, 256, 256, 32, False), "CFG is off", "--no-cfg"),
    ]
    for args, msg, fix in cases:
        with pytest.raises(ShapeError) as e:
            module.check_call(*args)
        line = str(e.value)
        assert (
            msg in line
            and fix in line
            and "shiva-export onnx --model sd35-tiny --ratio 0.40" in line
            and "\n" not in line
        )
    pipe = load_diffusers_pipeline("sd35-tiny", transformer=module)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ShapeError, match="model batch is 4 rows"):
        _latents(pipe, steps=1, num_images_per_prompt=2)
    with pytest.raises(ConfigError, match="skip-layer guidance"):
        _latents(pipe, steps=2, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    with pytest.raises(ConfigError, match="save the artifacts"):
        module.save_pretrained("/nonexistent")
    assert pipe.transformer is module and pipe.transformer.config.sample_size == 32


# ------------------------------------------------------------------------------------------------ CLI
def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The README's `generate` command (ort, ratio 0.4, --compare-dense) and the learned phases, run once."""
    root = tmp_path_factory.mktemp("gen")
    return root


def test_generate_writes_pngs_record_and_grid(capsys, generated):
    out = generated / "out"
    code, stdout, err = _run(
        capsys,
        "generate",
        "--model",
        "sd35-tiny",
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue ball",
        "--backend",
        "ort",
        "--ratio",
        "0.4",
        "--compare-dense",
        "--out",
        str(out),
        "--artifact-root",
        str(generated / "engines"),
        "--json",
    )
    assert code == 0, err
    rec = json.loads(stdout)  # one object
    assert "Traceback" not in err and "Warning" not in err and "torchvision" not in err
    assert [im["seed"] for im in rec["images"]] == [0, 1]
    for im in rec["images"]:
        assert (out / im["png"].split("/")[-1]).is_file()
        assert im["phase_steps"] == {"ratio0.40": 12}
        d = im["dense"]
        assert d["psnr_db"] is not None and d["psnr_db"] > 20 and 0 < d["mean_abs_diff"] < 0.1
        t = im["timings_ms"]
        assert t["transformer"]["calls"] == 12 and t["total"] >= t["denoise_loop"] >= t["transformer"]["total"] > 0
    assert (out / "grid.png").is_file() and json.loads((out / "generate.json").read_text())["model"] == "sd35-tiny"
    art = rec["pipeline"]["artifacts"]
    assert len(art) == 1 and len(art[0]["onnx_sha256"]) == 64 and art[0]["status"] == "exported"
    assert rec["pipeline"]["router"]["router_sha256"]
    # cached on the second run, by content key
    code, stdout, err = _run(
        capsys,
        "generate",
        "--model",
        "sd35-tiny",
        "--prompt",
        "a red cube",
        "--backend",
        "ort",
        "--ratio",
        "0.4",
        "--out",
        str(out),
        "--artifact-root",
        str(generated / "engines"),
        "--json",
        "--steps",
        "2",
    )
    assert code == 0, err
    assert json.loads(stdout)["pipeline"]["artifacts"][0]["status"] == "cached"


def test_generate_learned_phases_on_ort(capsys, generated):
    out = generated / "phases"
    code, stdout, err = _run(
        capsys,
        "generate",
        "--model",
        "sd35-tiny",
        "--prompt",
        "a red cube",
        "--backend",
        "ort",
        "--phases",
        "--out",
        str(out),
        "--artifact-root",
        str(generated / "engines"),
        "--json",
        "--steps",
        "28",
    )
    assert code == 0, err
    rec = json.loads(stdout)
    im = rec["images"][0]
    from shiva_export.recipe import load_recipe

    sched = load_recipe("sd35-tiny").schedule  # the shipped schedule's own 28-step training split
    n_early = sum(1 for ts in sched.timesteps if ts > sched.phases[0].t_stop)
    assert im["phase_steps"] == {"early": n_early, "late": 28 - n_early}
    assert im["phase_trace"] == "E" * n_early + "L" * (28 - n_early)
    assert [a["phase"] for a in rec["pipeline"]["artifacts"]] == ["early", "late"]


def test_generate_shape_mismatch_exits_2_with_the_fitting_command(capsys, generated, ort_export):
    onnx = str(ort_export.export.onnx_path)
    base = [
        "generate",
        "--model",
        "sd35-tiny",
        "--prompt",
        "x",
        "--backend",
        "ort",
        "--artifact",
        onnx,
        "--out",
        str(generated / "bad"),
    ]
    code, out, err = _run(capsys, *base, "--guidance", "1.0")
    line = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert code == 2 and len(line) == 1 and "CFG is off" in line[0] and "--no-cfg" in line[0], err
    code, out, err = _run(capsys, *base, "--height", "512", "--width", "512")
    assert code == 2 and "512" in err and "exported for 256" in err, err
    assert "Traceback" not in err and out == ""


def test_generate_bad_options(capsys, tmp_path):
    code, _, err = _run(capsys, "generate", "--model", "sd35-tiny", "--out", str(tmp_path))
    assert code == 2 and "--prompt" in err
    code, _, err = _run(
        capsys, "generate", "--model", "sd35-tiny", "--prompt", "x", "--backend", "tensorflow", "--out", str(tmp_path)
    )
    assert code == 2 and "torch, ort, trt" in err
    code, _, err = _run(
        capsys,
        "generate",
        "--model",
        "sd35-tiny",
        "--prompt",
        "x",
        "--ratio",
        "0.4",
        "--phases",
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "not both" in err
    code, _, err = _run(capsys, "generate", "--model", "sd35", "--prompt", "x", "--out", str(tmp_path))
    assert code == 2 and "--weights" in err and "Traceback" not in err


def test_generate_torch_backend_with_weights_folder(capsys, tmp_path, torch_pipe):
    """--weights takes a saved diffusers pipeline folder: the real from_pretrained path."""
    folder = tmp_path / "pipe"
    torch_pipe.save_pretrained(folder)
    code, stdout, err = _run(
        capsys,
        "generate",
        "--model",
        "sd35-tiny",
        "--weights",
        str(folder),
        "--prompt",
        "a cat",
        "--backend",
        "torch",
        "--ratio",
        "0.4",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    assert code == 0, err
    rec = json.loads(stdout)
    assert rec["pipeline"]["pipeline"] == str(folder) and rec["images"][0]["phase_steps"] == {"ratio0.40": 3}
    code, _, err = _run(
        capsys,
        "generate",
        "--model",
        "sd35-tiny",
        "--weights",
        str(tmp_path),
        "--prompt",
        "a",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 1 and "model_index.json" in err


# ------------------------------------------------------------------------------------------ e2e speed
def test_e2e_benchmark_writes_json_markdown_png(tmp_path, generated):
    from shiva_export.runtime.benchmark import benchmark_e2e

    rep = benchmark_e2e(
        model="sd35-tiny",
        backends=["ort", "torch"],
        ratios=[0.4],
        steps=3,
        warmup=0,
        repeats=1,
        threads=1,
        artifact_root=generated / "engines",
        out_dir=tmp_path,
    )
    rows = {(r["backend"], r["budget"]): r for r in rep.rows()}
    assert set(rows) == {("ort", "dense"), ("ort", "ratio 0.40"), ("torch", "dense"), ("torch", "ratio 0.40")}
    for key in (("ort", "dense"), ("torch", "dense")):
        r = rows[key]
        assert r["transformer_speedup"] == 1.0 and r["e2e_speedup"] == 1.0 and r["ideal_transformer"] == 1.0
    r = rows[("ort", "ratio 0.40")]
    # the ideals are the FLOP counter's ratio over the 3 steps (N = 256, T = 32, CFG batch 2) and Amdahl on the
    # dense row's own medians
    from shiva_export.models.sd3 import count_flops
    from shiva_export.recipe import load_recipe

    cfg = load_recipe("sd35-tiny").model.config
    keep = (None,) + (0.6,) * 5
    ideal = count_flops(cfg, 256, 32, None, batch=2).total / count_flops(cfg, 256, 32, keep, batch=2).total
    assert r["ideal_transformer"] == round(ideal, 4)
    d = rows[("ort", "dense")]
    assert r["ideal_e2e"] == pytest.approx(
        d["total"] / (d["total"] - d["transformer"] + d["transformer"] / ideal), abs=2e-3
    )
    assert r["total"] >= r["transformer"] > 0 and r["phase_steps"] == {"ratio0.40": 3}
    md = (tmp_path / "e2e.md").read_text()
    assert "| ort | ratio 0.40 |" in md and "Reproduce: `shiva-export validate speed --e2e" in md
    assert json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_suite_parses_and_skips_cleanly_without_a_gpu(tmp_path):
    from shiva_export.validate.suite import load_suite, run_suite

    s = load_suite("gpu")
    kinds = {(c.kind, tuple(c.backends), c.compile, c.dtype) for c in s.case}
    assert (
        ("e2e", ("torch",), True, "bf16") in kinds
        and ("e2e", ("torch",), False, "bf16") in kinds
        and any(b == ("trt",) for _, b, _, _ in kinds)
    )
    assert all(c.steps == [28, 50] and c.model == "sd35-shape" and c.ratios == [0.2, 0.4] for c in s.case)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run the suite for real")
    summary = run_suite("gpu", out_dir=tmp_path)
    assert summary["passed"] and all(r.get("skipped") for r in summary["results"])
    assert load_suite("e2e-cpu").case[0].kind == "e2e"


# ------------------------------------------------------------------------------------------- engines
@pytest.mark.trt_rtx
def test_trt_backend_verifies_the_engine_before_looking_for_a_gpu(capsys, tmp_path):
    """An untouched engine gets as far as the GPU check (exit 4 here); a tampered one is refused first (exit 1)."""
    from shiva_export.engines.budgets import build_engines

    # any model: what is checked is the artifact path; sd3-tiny is the cheapest to export
    builds = build_engines(
        model="sd3-tiny",
        ratios=[0.4],
        dense=False,
        backend="tensorrt-rtx",
        out_dir=tmp_path / "engines",
        validate=False,
    )
    eng = builds[-1].out_dir
    base = [
        "generate",
        "--model",
        "sd3-tiny",
        "--prompt",
        "x",
        "--backend",
        "trt",
        "--artifact",
        str(eng),
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = _run(capsys, *base)
    if not torch.cuda.is_available():
        assert code == 4 and "needs a CUDA GPU" in err, err
    plan = eng / "model.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    code, _, err = _run(capsys, *base)
    assert code == 1 and "does not match its manifest" in err and "Traceback" not in err, err
