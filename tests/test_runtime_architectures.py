"""The generation runtime for every architecture (``tests/archcases.py``): the real ``StableDiffusion3Pipeline`` /
``FluxPipeline`` / ``PixArtSigmaPipeline`` / ``DiTPipeline`` (offline tiny pipelines, seeded) with the transformer
routed in place (torch) or replaced by ``ShivaArtifactTransformer`` over ONNX Runtime sessions (ort).

- keep 1.0 through the routed path is bit-identical to the dense pipeline of the same seed (torch);
- ORT at ratio 0.4 follows torch at ratio 0.4 (final latents within 1e-4 abs or 1e-5 of the peak; see ORT_ATOL);
- the static-shape contract: another height / batch / text length (and, for Flux, other position ids than
  the RoPE baked into the graph) fails with one ShapeError line naming the field and both values;
- phases dispatch on the call's timestep on the 0..1000 scale (Flux calls with t / 1000);
- ``shiva-export generate`` writes the image, the dense image, the grid and generate.json, and a bad input
  exits 2 with one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shiva_export.cli import main
from shiva_export.errors import ConfigError, RecipeError, ShapeError
from shiva_export.models import InputSpec, adapter_for_architecture
from shiva_export.recipe import load_recipe
from tests import archcases, shared

XDIST_GROUP = shared.RUNTIME  # conftest: one worker, whose runtime cache (shared.runtime_root) they share

torch.set_num_threads(1)

STEPS = 3
MODELS = archcases.NAMES
PROMPT = {c.name: c.prompt for c in archcases.CASES}
# ORT vs torch on the final latents: 1e-4 abs at unit scale, 1e-5 of the peak where the latents are large. With random
# weights DPM-Solver++ (PixArt) and DDIM (DiT) grow the latents to |x| ~ 1e3 (VAE-scaled), so a 1e-6 relative float
# reassociation reads ~5e-3 absolute there. Measured: Flux ~1e-6 abs; PixArt / DiT ~1e-6 of the peak.
ORT_ATOL, ORT_RTOL_PEAK = 1e-4, 1e-5


def _run(pipe, model, seed=0):
    from shiva_export.runtime.generate import run_pipeline

    return run_pipeline(pipe, PROMPT[model], steps=STEPS, guidance=pipe.shiva.recipe.pipeline.guidance, seed=seed)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("arch-runtime")


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param


@pytest.fixture(scope="module")
def ort_pipe(model, root):
    from shiva_export.runtime.pipeline import load_pipeline

    return load_pipeline(model, backend="ort", ratio=0.4, threads=1, artifact_root=shared.runtime_root())


def test_embedded_pipeline_is_deterministic_and_reloads(model):
    """Seeded offline build (twice: equal weights), the components sized from the transformer, and the cached
    folder reloads with the same pipeline class (DiT: with its id2label)."""
    from shiva_export.runtime import embedded as E

    rec = load_recipe(model)
    a, b = E.build_embedded_pipeline(rec), E.build_embedded_pipeline(rec)
    for name, comp in a.components.items():
        if isinstance(comp, torch.nn.Module):
            sa, sb = comp.state_dict(), b.components[name].state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    t = a.transformer.config
    if model == "sd35-tiny":
        assert a.text_encoder.config.projection_dim + a.text_encoder_2.config.projection_dim == t.pooled_projection_dim
        assert (
            a.text_encoder_3.config.d_model == t.joint_attention_dim and a.vae.config.latent_channels == t.in_channels
        )
    elif model == "flux-tiny":
        assert (
            a.text_encoder.config.hidden_size == t.pooled_projection_dim
            and a.text_encoder_2.config.d_model == t.joint_attention_dim
        )
        assert 4 * a.vae.config.latent_channels == t.in_channels
    elif model == "pixart-tiny":
        assert a.text_encoder.config.d_model == t.caption_channels and a.vae.config.latent_channels == t.in_channels
    else:
        assert (
            a.vae.config.latent_channels == t.in_channels
            and a.labels["cat"] == 0
            and len(set(a.labels.values())) == t.num_embeds_ada_norm
        )
    pipe = E.load_embedded_pipeline(rec)
    assert type(pipe).__name__ == adapter_for_architecture(rec.architecture).PIPELINE_CLASS
    if model == "dit-tiny":
        assert pipe.labels == a.labels  # id2label survives save_pretrained (written into model_index.json)


def test_keep_one_torch_is_bit_identical_to_dense(model):
    from shiva_export.prune.api import remove_shiva_
    from shiva_export.runtime.pipeline import load_pipeline

    pipe = load_pipeline(model, backend="torch", ratio=0.0)  # every routed block at k = N
    assert type(pipe).__name__ == adapter_for_architecture(pipe.shiva.recipe.architecture).PIPELINE_CLASS
    routed = _run(pipe, model)
    assert routed.times.phase_trace == ["ratio0.00"] * STEPS
    remove_shiva_(pipe.transformer)
    dense = _run(pipe, model)
    assert torch.equal(routed.latents, dense.latents), f"max abs {(routed.latents - dense.latents).abs().max()}"
    assert np.array_equal(routed.image, dense.image)


def test_ort_follows_torch_at_ratio_04(model, ort_pipe):
    from shiva_export.runtime.pipeline import load_pipeline

    ref = _run(load_pipeline(model, backend="torch", ratio=0.4), model)
    got = _run(ort_pipe, model)
    diff = (got.latents - ref.latents).abs().max().item()
    peak = ref.latents.abs().max().item()
    print(
        f"{model}: ORT vs torch ratio 0.4, final latents max abs {diff:.3e} (peak |latent| {peak:.3g}, relative {diff / peak:.2e})"
    )
    assert diff <= max(ORT_ATOL, ORT_RTOL_PEAK * peak)
    assert got.times.phase_trace == ["ratio0.40"] * STEPS and len(got.times.transformer) == STEPS
    assert ort_pipe.shiva.cfg == adapter_for_architecture(ort_pipe.shiva.recipe.architecture).BATCHED_CFG


def _call(module, spec: InputSpec):
    """One forward call with the adapter's pipeline-shaped inputs for ``spec`` (Flux: with its position ids)."""
    adapter = module._adapter
    return module(**adapter.make_inputs(module.config, spec, seed=1, timestep=500.0), return_dict=False)[0]


def test_static_shape_contract(model, ort_pipe):
    module = ort_pipe.transformer
    spec = module.phases[0].spec
    assert _call(module, spec).shape[0] == spec.model_batch  # the exported shapes run
    h2 = 2 * spec.height
    field = {
        "height": (
            InputSpec(spec.batch, h2, h2, spec.text_len, spec.cfg),
            f"height is {h2} px but the artifact was exported for {spec.height} px",
        ),
        "batch": (
            InputSpec(2, spec.height, spec.width, spec.text_len, spec.cfg),
            f"model batch is {2 * spec.model_batch} rows but the artifact was exported for {spec.model_batch}",
        ),
    }
    if model != "dit-tiny":  # DiT has no text
        field["text_len"] = (
            InputSpec(spec.batch, spec.height, spec.width, spec.text_len + 4, spec.cfg),
            f"text length is {spec.text_len + 4} tokens but the artifact was exported for {spec.text_len}",
        )
    for name, (other, msg) in field.items():
        with pytest.raises(ShapeError) as e:
            _call(module, other)
        line = str(e.value)
        assert msg in line and "\n" not in line and f"shiva-export onnx --model {model} --ratio 0.40" in line, (
            name,
            line,
        )
    if model == "flux-tiny":  # RoPE is baked for the pipeline's ids: other ids of the same shape are refused too
        inputs = module._adapter.make_inputs(module.config, spec, seed=1, timestep=500.0)
        inputs["txt_ids"] = inputs["txt_ids"] + 1.0
        with pytest.raises(ShapeError, match=r"txt_ids has other values than the \[8, 3\] baked into the graph"):
            module(**inputs)
    with pytest.raises(ConfigError, match="not in the static graph|not an input of the static graph"):
        extra = archcases.BY_NAME[model].unsupported_call
        module(**module._adapter.make_inputs(module.config, spec, seed=1, timestep=500.0), **extra)


def test_phases_dispatch_on_the_0_1000_scale(model, ort_pipe):
    """Two phases split at t = 500 over the same graph: the trace follows the scheduler's timesteps on the
    0..1000 scale, whatever scale the pipeline calls the transformer with (Flux: t / 1000)."""
    from shiva_export.prune.schedule import TimestepPhase
    from shiva_export.runtime.modules import ArtifactPhase

    module = ort_pipe.transformer
    ap = module.phases[0]
    keep = ap.phase.keep_ratios
    saved = module.phases
    module.phases = [
        ArtifactPhase(TimestepPhase("early", 1000.0, 500.0, keep), ap.spec, ap.run, ap.info, ap.model),
        ArtifactPhase(TimestepPhase("late", 500.0, 0.0, keep), ap.spec, ap.run, ap.info, ap.model),
    ]
    try:
        res = _run(ort_pipe, model)
    finally:
        module.phases = saved
    sched = ort_pipe.scheduler  # the run's own timesteps (set_timesteps was called by the pipeline)
    expected = ["early" if float(t) > 500.0 else "late" for t in sched.timesteps[:STEPS]]
    assert res.times.phase_trace == expected and "early" in expected and "late" in expected


# ------------------------------------------------------------------------------------------------ CLI
def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_cli_writes_image_dense_grid_and_record(capsys, model, ort_pipe, root):
    out = root / f"out-{model}"
    code, stdout, err = _cli(
        capsys,
        "generate",
        "--model",
        model,
        "--prompt",
        PROMPT[model],
        "--backend",
        "ort",
        "--ratio",
        "0.4",
        "--compare-dense",
        "--steps",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
        "--artifact-root",
        str(shared.runtime_root()),
        "--json",
    )
    assert code == 0, err
    assert "Traceback" not in err and "Warning" not in err
    rec = json.loads(stdout)
    assert rec["model"] == model and rec["backend"] == "ort" and rec["budget"] == "ratio 0.40"
    im = rec["images"][0]
    assert (out / im["png"].split("/")[-1]).is_file() and (out / im["dense"]["png"].split("/")[-1]).is_file()
    assert (out / "grid.png").is_file() and json.loads((out / "generate.json").read_text())["model"] == model
    assert im["phase_steps"] == {"ratio0.40": 2} and im["timings_ms"]["transformer"]["calls"] == 2
    assert im["dense"]["timings_ms"]["transformer"]["calls"] == 2 and im["dense"]["latent_max_abs"] > 0
    assert [a["status"] for a in rec["pipeline"]["artifacts"]] == [
        "cached"
    ]  # the fixture's export, found by content key


def test_generate_cli_bad_input_exits_2_in_one_line(capsys, model, ort_pipe, root):
    args, msg = archcases.BY_NAME[model].bad_generate
    code, out, err = _cli(
        capsys,
        "generate",
        "--model",
        model,
        *args,
        "--backend",
        "ort",
        "--ratio",
        "0.4",
        "--steps",
        "1",
        "--out",
        str(root / "bad"),
        "--artifact-root",
        str(shared.runtime_root()),
    )
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and msg in errors[0], err
    assert "Traceback" not in err and out == ""


# --------------------------------------------------------------------------------------------- refusals
def test_load_pipeline_without_a_pipeline_class_fails_in_one_line(monkeypatch, tmp_path):
    from shiva_export.models.flux import FluxAdapter
    from shiva_export.runtime.pipeline import load_pipeline

    monkeypatch.setattr(FluxAdapter, "PIPELINE_CLASS", None)
    with pytest.raises(ConfigError, match="declares no diffusers pipeline") as e:
        load_pipeline("flux-tiny", backend="torch")
    assert "\n" not in str(e.value) and "FluxTransformer2DModel" in str(e.value)
    bad = tmp_path / "unet.toml"
    bad.write_text(
        load_recipe("dit-tiny").source_path.read_text().replace('architecture = "dit"', 'architecture = "unet"')
    )
    with pytest.raises(RecipeError, match="architecture 'unet' has no adapter") as e:
        load_pipeline(recipe=bad, backend="torch")
    assert "\n" not in str(e.value)


@pytest.mark.trt_rtx
def test_trt_backend_goes_through_the_artifact_path_and_refuses_without_a_gpu(capsys, tmp_path):
    """``--backend trt`` exports, builds (TensorRT-RTX, ahead of time, no GPU needed) and then opens the engine
    like any artifact: without a CUDA GPU it stops there in one line with exit 4."""
    from shiva_export.engines.budgets import build_engines

    builds = build_engines(
        model="dit-tiny",
        ratios=[0.4],
        dense=False,
        backend="tensorrt-rtx",
        out_dir=tmp_path / "engines",
        validate=False,
    )
    eng = builds[-1].out_dir
    code, _, err = _cli(
        capsys,
        "generate",
        "--model",
        "dit-tiny",
        "--prompt",
        "cat",
        "--backend",
        "trt",
        "--artifact",
        str(eng),
        "--out",
        str(tmp_path / "o"),
    )
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the engine would run")
    assert code == 4 and len(errors) == 1 and "needs a CUDA GPU" in errors[0], err
