"""LoRA and ControlNet through the pruned graphs (issue 19, parts 1-2), on sd35-tiny.

LoRAs are made with peft and saved with the pipeline's ``save_lora_weights``; the ControlNet is a tiny
``SD3ControlNetModel`` built from a config (seeded, its zero-initialised output projections randomised so its
residuals are not zero) and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json

import pytest
import torch

from shiva_export.cli import main
from shiva_export.errors import ConfigError, WeightsError
from shiva_export.recipe import load_recipe

STEPS = 3
TARGETS = (["to_q", "to_k", "to_v", "to_out.0"], ["ff.net.0.proj", "ff.net.2"])


def _save_lora(transformer, folder, targets, seed):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name=f"mk{seed}"
    )
    sd = get_peft_model_state_dict(transformer, adapter_name=f"mk{seed}")
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=sd)
    transformer.delete_adapters(f"mk{seed}")
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Two LoRAs of sd35-tiny: attention (rank 4, alpha 8) and feed-forward."""
    from shiva_export.models import load_transformer

    tf = load_transformer(recipe=load_recipe("sd35-tiny"))
    root = tmp_path_factory.mktemp("loras")
    return [_save_lora(tf, root / f"lora{i}", t, seed=i + 1) for i, t in enumerate(TARGETS)]


@pytest.fixture(scope="module")
def two_loras(lora_files):
    from shiva_export.export.lora import resolve_loras

    return resolve_loras(lora_files, [0.7, -0.5])


CN_LAYERS = 2


def _spec_phase():
    from shiva_export.models import InputSpec
    from shiva_export.prune.schedule import uniform_phase

    rec = load_recipe("sd35-tiny")
    return (
        rec,
        InputSpec(batch=1, height=256, width=256, text_len=32, cfg=True),
        uniform_phase(6, 0.4, rec.routed_blocks(6)),
    )


@pytest.fixture(scope="module")
def shared_graph(tmp_path_factory, lora_files):
    """The one runtime export the ORT tests share (what `generate --backend ort --ratio 0.4 --lora lora0 --lora-scale 0.5
    --controlnet <2 layers>` exports): sd35-tiny, ratio 0.4, LoRA 0 fused at 0.5, 2 ControlNet residual inputs, parity-checked."""
    from shiva_export.export.lora import resolve_loras
    from shiva_export.runtime.pipeline import _ensure_onnx

    rec, spec, phase = _spec_phase()
    root = tmp_path_factory.mktemp("engines")
    loras = resolve_loras(lora_files[:1], [0.5])
    info = _ensure_onnx(
        rec, None, None, phase, spec, "fp32", root, lambda m: None, loras=loras, controlnet_layers=CN_LAYERS
    )
    return root, loras, info


def _inputs(seed=0):
    from shiva_export.models import InputSpec, load_transformer, make_inputs

    tf = load_transformer(recipe=load_recipe("sd35-tiny"))
    return tf, make_inputs(tf, InputSpec(batch=1, height=256, width=256, text_len=32, cfg=True), seed=seed)


def _torch_pruned(loras, ratio=0.4):
    """sd35-tiny with the LoRAs unfused and the recipe's router at ``ratio`` (the torch backend's setup)."""
    from shiva_export.export.lora import load_loras_
    from shiva_export.prune.schedule import uniform_phase
    from shiva_export.runtime.pipeline import _apply_torch

    rec = load_recipe("sd35-tiny")
    tf, _ = _inputs()
    load_loras_(tf, loras)
    n = len(tf.transformer_blocks)
    _apply_torch(tf, rec, None, (uniform_phase(n, ratio, rec.routed_blocks(n)),), cfg=True)
    return tf


# -- LoRA -------------------------------------------------------------------------------------------------------
def test_lora_count_mismatch_and_bad_files_are_refused_in_one_line(capsys, lora_files, tmp_path):
    from shiva_export.export.lora import load_loras_, resolve_loras

    with pytest.raises(ConfigError, match="2 --lora but 1 --lora-scale"):
        resolve_loras(lora_files, [0.5])
    code = main(
        [
            "onnx",
            "--model",
            "sd35-tiny",
            "--lora",
            str(lora_files[0]),
            "--lora",
            str(lora_files[1]),
            "--lora-scale",
            "0.5",
            "--out",
            str(tmp_path / "x.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "2 --lora but 1 --lora-scale" in err and not (tmp_path / "x.onnx").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_loras([tmp_path / "missing.safetensors"])
    from shiva_export.engines.budgets import build_engines
    from shiva_export.export.pruned import export_pruned

    with pytest.raises(ConfigError, match="bounded-memory export"):  # before anything loads
        export_pruned(
            model="sd35-tiny", ratio=0.4, out=tmp_path / "b.onnx", bounded=True, loras=resolve_loras(lora_files[:1])
        )
    with pytest.raises(ConfigError, match="--segments 2 .* ControlNet"):
        build_engines(model="sd35-tiny", ratios=[0.4], segments=2, controlnet_layers=2, out_dir=tmp_path)
    # a LoRA holding NaN is refused before diffusers sees it
    from safetensors.torch import load_file, save_file

    sd = load_file(str(lora_files[0]))
    name = next(iter(sd))
    sd[name] = sd[name].clone()
    sd[name][0, 0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    tf, _ = _inputs()
    with pytest.raises(WeightsError, match="NaN or Inf"):
        load_loras_(tf, resolve_loras([bad]))


def test_ort_with_fused_loras_equals_torch_with_unfused_loras(capsys, two_loras, lora_files, controlnet_dir, tmp_path):
    """Two LoRAs at scales 0.7 and -0.5 through `onnx --lora` (and `--controlnet`: residual inputs): the graph (fused)
    equals the torch model with the LoRAs unfused at the same scales and the residuals added by diffusers, pruned at
    ratio 0.4, within today's fp32 parity tolerance."""
    from shiva_export.export import controlnet as cn
    from shiva_export.export.onnx import read_shiva_metadata
    from shiva_export.export.parity import check_parity

    out = tmp_path / "lora.onnx"
    args = [
        "onnx",
        "--model",
        "sd35-tiny",
        "--ratio",
        "0.4",
        "--out",
        str(out),
        "--no-validate",
        "--json",
        "--controlnet",
        str(controlnet_dir),
    ]
    for f, s in zip(lora_files, ("0.7", "-0.5")):
        args += ["--lora", str(f), "--lora-scale", s]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    want = [lo.to_dict() for lo in two_loras]
    meta = read_shiva_metadata(out)
    assert summary["loras"] == want and meta["loras"] == want and meta["controlnet_layers"] == CN_LAYERS
    tf = _torch_pruned(two_loras)
    tol = load_recipe("sd35-tiny").tolerance("fp32")
    cases = [(s, t, _inputs(s)[1]) for s, t in ((0, None), (1, 1.0), (2, 999.0))]
    for s, t, x in cases:
        if t is not None:
            x["timestep"] = torch.full_like(x["timestep"], t)
        x.update(cn.sample_inputs(tf, 2, 256, CN_LAYERS, seed=s))
    with cn.residual_inputs(tf):
        rep = check_parity(
            out, tf, cases, atol=tol.atol, rtol=tol.rtol, min_cosine=tol.min_cosine, min_index_agreement=1.0
        )
    assert rep.passed, rep.summary_line()
    assert rep.worst.max_abs <= tol.atol and rep.index_agreement == 1.0
    print("LoRA parity:", rep.summary_line())
    # the LoRAs change the output (so the comparison above can fail)
    plain = _torch_pruned(())
    x = _inputs(0)[1]
    with torch.no_grad():
        assert (plain(**x).sample - tf(**x).sample).abs().max().item() > 100 * tol.atol


def test_ratio0_with_lora_is_bit_identical_to_dense_with_lora(two_loras):
    from shiva_export.runtime.pipeline import load_pipeline

    def latents(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a red cube",
            num_inference_steps=STEPS,
            guidance_scale=4.5,
            generator=g,
            output_type="latent",
            max_sequence_length=16,
            height=256,
            width=256,
        ).images

    dense = load_pipeline("sd35-tiny", backend="torch", dense=True, loras=two_loras)
    pruned = load_pipeline("sd35-tiny", backend="torch", ratio=0.0, loras=two_loras)
    plain = load_pipeline("sd35-tiny", backend="torch", dense=True)
    d = latents(dense)
    assert torch.equal(latents(pruned), d)
    assert not torch.equal(latents(plain), d)  # the LoRAs are in use
    assert pruned.shiva.to_dict()["loras"] == [lo.to_dict() for lo in two_loras]


def test_lora_cache_keys_change_with_scale_and_file_and_reuse_otherwise(two_loras, lora_files, shared_graph, tmp_path):
    from shiva_export.export.graph_cache import export_key_for
    from shiva_export.export.lora import resolve_loras
    from shiva_export.runtime.pipeline import _artifact_key, _ensure_onnx

    rec, spec, phase = _spec_phase()

    def key(loras):
        return _artifact_key(rec, None, None, phase, spec, "fp32", False, "drop", loras)

    a = resolve_loras(lora_files[:1], [0.5])
    assert key(a) == key(resolve_loras(lora_files[:1], [0.5]))
    assert len({key(()), key(a), key(resolve_loras(lora_files[:1], [0.6])), key(two_loras)}) == 4
    ek = export_key_for(rec, None, None, 0.4, False, spec.to_dict(), "fp32", 20, False, "drop", a)
    assert ek["loras"] == [{"file": lora_files[0].name, "sha256": a[0].sha256, "scale": 0.5}]
    assert "loras" not in export_key_for(
        rec, None, None, 0.4, False, spec.to_dict(), "fp32", 20, False
    )  # old keys unchanged
    # a changed file (same name) is another LoRA
    changed = tmp_path / "lora0.safetensors"
    changed.write_bytes(lora_files[0].read_bytes()[:-1] + b" ")
    assert resolve_loras([changed], [0.5])[0].sha256 != a[0].sha256
    assert key(a) != _artifact_key(
        rec, None, None, phase, spec, "fp32", False, "drop", a, CN_LAYERS
    )  # ControlNet inputs: another graph
    root, _, first = shared_graph
    again = _ensure_onnx(
        rec,
        None,
        None,
        phase,
        spec,
        "fp32",
        root,
        lambda m: None,
        loras=resolve_loras(lora_files[:1], [0.5]),
        controlnet_layers=CN_LAYERS,
    )
    assert (first["status"], again["status"]) == ("exported", "cached") and first["onnx"] == again["onnx"]
    assert first["loras"] == [lo.to_dict() for lo in a] and first["parity"] and "pass" in first["parity"].lower()
    from shiva_export.runtime.pipeline import load_pipeline

    with pytest.raises(
        ConfigError, match="was exported with LoRAs"
    ):  # a given graph must carry exactly the requested LoRAs
        load_pipeline("sd35-tiny", backend="ort", artifacts=[first["onnx"]], loras=resolve_loras(lora_files[:1], [0.6]))


# -- ControlNet -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """A tiny SD3ControlNetModel of sd35-tiny's width (2 layers), seeded; save_pretrained into a folder."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(0)
    cn = SD3ControlNetModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=CN_LAYERS,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=64,
        qk_norm="rms_norm",
        force_zeros_for_pooled_projection=False,
    )
    with (
        torch.no_grad()
    ):  # diffusers zero-initialises the residual projections: randomise them so residuals are non-zero
        for p in list(cn.controlnet_blocks.parameters()) + list(cn.pos_embed_input.parameters()):
            p.normal_(0.0, 0.05)
    d = tmp_path_factory.mktemp("controlnet") / "cn"
    cn.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def control_image(tmp_path_factory):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    arr = (torch.rand((256, 256, 3), generator=g) * 255).to(torch.uint8).numpy()
    p = tmp_path_factory.mktemp("ctl") / "control.png"
    Image.fromarray(arr).save(p)
    return p


def _cn_latents(pipe, image, steps=STEPS):
    from shiva_export.runtime.controlnet import load_control_image

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the pipeline samples the control image's VAE posterior from the global RNG
    return pipe(
        "a red cube",
        num_inference_steps=steps,
        guidance_scale=4.5,
        generator=g,
        output_type="latent",
        max_sequence_length=16,
        height=256,
        width=256,
        control_image=load_control_image(image, 256, 256),
        controlnet_conditioning_scale=0.8,
    ).images


def test_controlnet_ratio0_equals_dense_controlnet_pipeline_bit_for_bit(controlnet_dir, control_image):
    from diffusers import StableDiffusion3ControlNetPipeline

    from shiva_export.runtime.controlnet import controlnet_pipeline, load_controlnet
    from shiva_export.runtime.pipeline import load_diffusers_pipeline, load_pipeline

    cn = load_controlnet(controlnet_dir)
    dense = StableDiffusion3ControlNetPipeline.from_pipe(load_diffusers_pipeline("sd35-tiny"), controlnet=cn)
    dense.set_progress_bar_config(disable=True)
    pruned = controlnet_pipeline(load_pipeline("sd35-tiny", backend="torch", ratio=0.0), cn)
    d = _cn_latents(dense, control_image)
    assert torch.equal(_cn_latents(pruned, control_image), d)
    plain = load_diffusers_pipeline("sd35-tiny")
    plain.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    ref = plain(
        "a red cube",
        num_inference_steps=STEPS,
        guidance_scale=4.5,
        generator=g,
        output_type="latent",
        max_sequence_length=16,
        height=256,
        width=256,
    ).images
    assert not torch.equal(ref, d)  # the ControlNet acts


def test_controlnet_graph_parity_and_ort_pipeline_equals_torch(controlnet_dir, control_image, shared_graph):
    """The graph with residual inputs (and a fused LoRA) passed ORT parity with the residuals fed, and the ControlNet
    pipeline on ORT equals the torch one (LoRA unfused, ratio 0.4, trained router) within the fp32 tolerance."""
    from shiva_export.runtime.controlnet import controlnet_pipeline, load_controlnet
    from shiva_export.runtime.pipeline import load_pipeline

    root, loras, first = shared_graph
    assert first["controlnet_layers"] == CN_LAYERS and "pass" in first["parity"].lower()
    cn = load_controlnet(controlnet_dir)
    ort = load_pipeline(
        "sd35-tiny", backend="ort", ratio=0.4, artifact_root=root, controlnet_layers=CN_LAYERS, loras=loras
    )
    assert ort.shiva.artifacts[0]["status"] == "cached"
    tch = load_pipeline("sd35-tiny", backend="torch", ratio=0.4, loras=loras)
    got = _cn_latents(controlnet_pipeline(ort, cn), control_image)
    ref = _cn_latents(controlnet_pipeline(tch, cn), control_image)
    tol = load_recipe("sd35-tiny").tolerance("fp32")
    print(f"ControlNet pipeline ORT vs torch: max abs {(got - ref).abs().max().item():.3g} over {STEPS} steps")
    assert (got - ref).abs().max().item() <= tol.atol
    # the same graph without a ControlNet: zero residuals, equal to the plain torch pipeline
    g = torch.Generator().manual_seed(0)
    kw = {
        "num_inference_steps": STEPS,
        "guidance_scale": 4.5,
        "output_type": "latent",
        "max_sequence_length": 16,
        "height": 256,
        "width": 256,
    }
    plain_ort = ort("a red cube", generator=g, **kw).images
    plain_tch = tch("a red cube", generator=torch.Generator().manual_seed(0), **kw).images
    assert (plain_ort - plain_tch).abs().max().item() <= tol.atol and (
        plain_ort - got
    ).abs().max().item() > 100 * tol.atol


def test_generate_cli_controlnet_and_lora_on_ort(
    capsys, controlnet_dir, control_image, lora_files, shared_graph, tmp_path
):
    root, _, _ = shared_graph
    out = tmp_path / "gen"
    code = main(
        [
            "generate",
            "--model",
            "sd35-tiny",
            "--prompt",
            "a red cube",
            "--backend",
            "ort",
            "--ratio",
            "0.4",
            "--steps",
            "2",
            "--controlnet",
            str(controlnet_dir),
            "--control-image",
            str(control_image),
            "--control-scale",
            "0.5",
            "--lora",
            str(lora_files[0]),
            "--lora-scale",
            "0.5",
            "--artifact-root",
            str(root),
            "--out",
            str(out),
            "--json",
            "-q",
        ]
    )
    rec = json.loads(capsys.readouterr().out)
    assert code == 0 and (out / "000-a-red-cube.png").is_file()
    assert rec["controlnet"]["layers"] == CN_LAYERS and rec["controlnet"]["control_scale"] == 0.5
    art = rec["pipeline"]["artifacts"][0]
    assert rec["pipeline"]["loras"][0]["scale"] == 0.5 and art["loras"][0]["scale"] == 0.5 and art["status"] == "cached"
    assert (
        main(
            [
                "generate",
                "--model",
                "sd35-tiny",
                "--prompt",
                "x",
                "--controlnet",
                str(controlnet_dir),
                "--out",
                str(tmp_path / "g2"),
            ]
        )
        == 2
    )
    assert "--controlnet and --control-image go together" in capsys.readouterr().err


# -- refitting weight-stripped engines on a LoRA change ----------------------------------------------------------
def test_lora_change_on_a_stripped_engine_is_a_refit_decision(two_loras, lora_files, tmp_path):
    """CPU part of the refit path: which manifest may take a new LoRA by a refit (no TensorRT needed)."""
    from types import SimpleNamespace

    from shiva_export.engines.lora_refit import (
        refit_manifest,
        refit_option,
        refittable_manifest,
    )
    from shiva_export.engines.manifest import (
        EngineManifest,
        read_manifest,
        write_manifest,
    )
    from shiva_export.export.lora import resolve_loras
    from shiva_export.utils.io import sha256_file

    be = SimpleNamespace(name="tensorrt", version="10.13")
    a = resolve_loras(lora_files[:1], [0.5])
    opts = {"strip_weights": True, **refit_option(True, a)}
    assert opts["refit"] == "any" and refit_option(True, ()) == {} and refit_option(False, a) == {}
    key_a = {"ratio": 0.4, "loras": [lo.to_dict() for lo in a]}
    key_b = {"ratio": 0.4, "loras": [lo.to_dict() for lo in two_loras]}
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"stripped plan")
    m = EngineManifest(
        model_name="sd35-tiny",
        model_config_hash="c",
        onnx_sha256="o",
        engine_sha256=sha256_file(plan),
        backend=be.name,
        backend_version=be.version,
        input_shapes={},
        dtype="fp32",
        export_key=key_a,
        build_options={**opts, "refit_weights": {"onnx_sha256": "o", "data": None, "data_sha256": None}},
    )
    mpath = tmp_path / "manifest.json"
    write_manifest(mpath, m)
    assert refittable_manifest(mpath, plan, key_b, opts, be) is not None  # only the LoRAs differ: refit
    assert refittable_manifest(mpath, plan, key_a, opts, be) is None  # same LoRAs: the cache, not a refit
    assert refittable_manifest(mpath, plan, {**key_b, "ratio": 0.2}, opts, be) is None  # another graph: rebuild
    assert (
        refittable_manifest(mpath, plan, key_b, {"strip_weights": True}, be) is None
    )  # REFIT_IDENTICAL engine: rebuild
    assert refittable_manifest(mpath, plan, key_b, opts, SimpleNamespace(name="tensorrt", version="10.14")) is None
    new = refit_manifest(
        read_manifest(mpath), key_b, "o2", {"onnx_sha256": "o2", "data": None, "data_sha256": None}, "r"
    )
    assert new.engine_sha256 == m.engine_sha256 and new.export_key == key_b and new.onnx_sha256 == "o2"
    assert new.build_options["refit_weights"]["onnx_sha256"] == "o2" and new.build_options["refit"] == "any"
    plan.write_bytes(b"another plan")
    assert refittable_manifest(mpath, plan, key_b, opts, be) is None  # the plan is not the manifest's


@pytest.mark.gpu
@pytest.mark.trt
def test_stripped_lora_engine_refits_on_a_lora_change_and_matches_ort(two_loras, lora_files, tmp_path):
    """GPU: a weight-stripped engine built with one LoRA takes another LoRA by a refit (same plan sha256), and the
    refit engine's output equals ONNX Runtime on the re-exported graph."""
    from shiva_export.engines.budgets import build_engines
    from shiva_export.engines.manifest import read_manifest
    from shiva_export.engines.runner import EngineRunner
    from shiva_export.export.lora import resolve_loras
    from shiva_export.runtime.modules import OrtRunner

    kw = {
        "model": "sd35-tiny",
        "ratios": [0.4],
        "dense": False,
        "backend": "tensorrt",
        "out_dir": tmp_path,
        "strip_weights": True,
    }
    first = build_engines(loras=resolve_loras(lora_files[:1], [0.5]), **kw)[0]
    sha = read_manifest(first.manifest_path).engine_sha256
    second = build_engines(loras=two_loras, **kw)[0]
    assert (first.status, second.status) == ("built", "refit") and read_manifest(
        second.manifest_path
    ).engine_sha256 == sha
    assert second.deserialize["refit_checked"] is True
    _, x = _inputs()
    runner = EngineRunner(second.out_dir)
    runner.activate()  # deserialize + refit from the re-exported ONNX
    got = runner.infer(x)["sample"].float().cpu()
    ref = OrtRunner(second.onnx_path)(x)
    assert (got - ref).abs().max().item() < 1e-2


@pytest.mark.trt_rtx
def test_rtx_engine_with_loras_and_controlnet_inputs_builds_and_is_cached(two_loras, tmp_path):
    """`trt --lora ... --controlnet ...` on TensorRT-RTX (AOT, no GPU needed): the engine takes the residual inputs,
    its manifest's export key records the LoRAs (sha256, scale) and the residual count, and the same inputs reuse it."""
    from shiva_export.engines.budgets import build_engines
    from shiva_export.engines.manifest import read_manifest

    kw = {
        "model": "sd35-tiny",
        "ratios": [0.4],
        "dense": False,
        "backend": "tensorrt-rtx",
        "out_dir": tmp_path,
        "loras": two_loras,
        "controlnet_layers": CN_LAYERS,
        "validate": False,
    }
    first = build_engines(**kw)[0]
    m = read_manifest(first.manifest_path)
    assert first.status == "built" and m.export_key["loras"] == [lo.to_dict() for lo in two_loras]
    assert m.export_key["controlnet_layers"] == CN_LAYERS and m.input_shapes["controlnet_block_1"] == [2, 256, 64]
    assert build_engines(**kw)[0].status == "cached"
