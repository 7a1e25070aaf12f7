"""The embedded (tiny, offline) StableDiffusion3Pipeline: build, cache, reload, run, tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shiva_export.errors import OutputPathError, RecipeError
from shiva_export.models import components as C
from shiva_export.recipe import load_recipe
from shiva_export.runtime import embedded as E


def _recipe(name: str, **pipeline):
    """A built-in recipe, optionally with [pipeline] fields overridden."""
    r = load_recipe(name)
    if pipeline:
        r = r.model_copy(update={"pipeline": r.pipeline.model_copy(update=pipeline)})
    return r


def _run(pipe, recipe, seed=0, steps=2):
    return pipe(
        "a red cube",
        num_inference_steps=steps,
        guidance_scale=4.5,
        height=256,
        width=256,
        max_sequence_length=recipe.max_sequence_length(),
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images


CASES = {"sd35-tiny": {}, "sd3-tiny": {}, "sd3-tiny-no-t5": {"t5": False}}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shiva-cache")


@pytest.fixture(scope="module")
def loaded(cache_dir):
    """case -> (recipe, pipeline reloaded from the cache folder)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHIVA_CACHE_DIR", str(cache_dir))
        for case, overrides in CASES.items():
            r = _recipe(case.removesuffix("-no-t5"), **overrides)
            pipe = E.load_embedded_pipeline(r)
            pipe.set_progress_bar_config(disable=True)
            out[case] = (r, pipe)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_reloaded_pipeline_runs_deterministically(loaded, case):
    r, pipe = loaded[case]
    a = _run(pipe, r)
    b = _run(pipe, r)
    assert a.shape == (1, 16, 32, 32)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(pipe, r, seed=1))
    assert (pipe.text_encoder_3 is None) == (not r.pipeline.t5)


def test_component_constraints(loaded):
    r, pipe = loaded["sd35-tiny"]
    tc = pipe.transformer.config
    c1, c2, t5 = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.text_encoder_3.config
    assert c1.hidden_size + c2.hidden_size <= tc.joint_attention_dim
    assert c1.projection_dim + c2.projection_dim == tc.pooled_projection_dim
    assert t5.d_model == tc.joint_attention_dim
    assert c1.max_position_embeddings >= pipe.tokenizer.model_max_length == r.pipeline.clip_max_length
    assert c1.eos_token_id == pipe.tokenizer.eos_token_id != 2
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.shift == r.pipeline.scheduler_shift
    assert pipe.default_sample_size * pipe.vae_scale_factor == r.shapes.height


def test_reload_is_bit_exact_and_build_deterministic(loaded):
    r, pipe = loaded["sd3-tiny"]
    rng = torch.get_rng_state()
    a, b = E.build_embedded_pipeline(r), E.build_embedded_pipeline(r)
    assert torch.equal(rng, torch.get_rng_state()), "the build must not disturb the global RNG"
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        sa, sb, sl = (getattr(p, name).state_dict() for p in (a, b, pipe))
        assert sa.keys() == sl.keys(), name
        assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sl[k]) for k in sa), name
    assert not torch.equal(
        a.text_encoder.text_model.embeddings.token_embedding.weight,
        a.text_encoder_2.text_model.embeddings.token_embedding.weight,
    )


def test_tokenizers_round_trip(loaded):
    r, pipe = loaded["sd35-tiny"]
    tok, tok3 = pipe.tokenizer, pipe.tokenizer_3
    ids = tok("a red cube").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "red</w>", "cube</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a red cube"
    odd = tok("Zebra-stripes, 42 (photorealistic)!").input_ids  # no unknown tokens: byte-level
    assert tok.unk_token_id == tok.eos_token_id and tok.eos_token_id not in odd[1:-1]
    padded = tok("a red cube", padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == r.pipeline.clip_max_length

    n = r.max_sequence_length()
    assert n == r.shapes.text_len - r.pipeline.clip_max_length
    t3 = tok3("a red cube", padding="max_length", max_length=n, truncation=True).input_ids
    assert len(t3) == n and t3[3] == tok3.eos_token_id and set(t3[4:]) == {tok3.pad_token_id}
    assert tok3.convert_ids_to_tokens(t3[:3]) == ["▁a", "▁red", "▁cube"]
    long = tok3("a red cube on a blue sphere " * 8, padding="max_length", max_length=n, truncation=True).input_ids
    assert len(long) == n and long[-1] == tok3.eos_token_id
    assert tok3.unk_token_id not in tok3("Zebra-stripes, 42 (photorealistic)!").input_ids


def test_cache_reused_and_corrupt_stamp_rebuilt(loaded, cache_dir, monkeypatch):
    monkeypatch.setenv("SHIVA_CACHE_DIR", str(cache_dir))
    r, _ = loaded["sd3-tiny"]
    folder = E.ensure_embedded_pipeline(r)
    assert folder == E.embedded_pipeline_dir(r) and folder.parent == cache_dir / "pipelines"
    assert folder.name.startswith("sd3-tiny-") and len(folder.name) == len("sd3-tiny-") + 12
    mtime = (folder / "model_index.json").stat().st_mtime_ns
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # tokenizer.json: reloading needs no sentencepiece
        assert (folder / sub / "tokenizer.json").is_file() and not (folder / sub / "spiece.model").exists()
    stamp = json.loads((folder / "shiva_pipeline.json").read_text())
    assert stamp["recipe"] == "sd3-tiny" and stamp["builder_version"] == 1 and folder.name.endswith(stamp["key"][:12])

    def _no_build(recipe):
        raise AssertionError("rebuilt a cached pipeline")

    with monkeypatch.context() as mp:
        mp.setattr(E, "build_embedded_pipeline", _no_build)
        assert E.ensure_embedded_pipeline(r) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == mtime

    (folder / "shiva_pipeline.json").write_text("{not json")
    assert E.ensure_embedded_pipeline(r) == folder
    assert json.loads((folder / "shiva_pipeline.json").read_text())["key"] == stamp["key"]
    assert (folder / "model_index.json").stat().st_mtime_ns != mtime
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers

    # everything the build depends on is in the key
    assert E.embedded_pipeline_dir(_recipe("sd3-tiny", seed=1)) != folder
    assert E.embedded_pipeline_dir(_recipe("sd3-tiny", scheduler_shift=1.0)) != folder


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIVA_CACHE_DIR", str(tmp_path))

    def _boom(recipe):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "build_embedded_pipeline", _boom)
    with pytest.raises(KeyboardInterrupt):
        E.ensure_embedded_pipeline(_recipe("sd3-tiny"))
    assert list((tmp_path / "pipelines").iterdir()) == []


def test_errors(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SHIVA_CACHE_DIR", str(blocker))
    with pytest.raises(OutputPathError, match="SHIVA_CACHE_DIR") as e:
        E.ensure_embedded_pipeline(_recipe("sd3-tiny"))
    assert "\n" not in str(e.value) and str(blocker) in str(e.value)
    with pytest.raises(RecipeError, match="embedded"):
        E.ensure_embedded_pipeline(load_recipe("sd35"))
    bad = load_recipe("sd3-tiny")
    bad = bad.model_copy(update={"pipeline": bad.pipeline.model_copy(update={"clip_max_length": bad.shapes.text_len})})
    with pytest.raises(RecipeError, match="clip_max_length"):
        E.build_embedded_pipeline(bad)


def test_transformer_override_is_quiet(loaded, cache_dir, monkeypatch, capfd):
    """A foreign ModelMixin transformer loads without diffusers' "Expected types" warning."""
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class Wrapper(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, sample_size=32, patch_size=2, in_channels=16, joint_attention_dim=64):
            super().__init__()

    monkeypatch.setenv("SHIVA_CACHE_DIR", str(cache_dir))
    r, _ = loaded["sd35-tiny"]
    capfd.readouterr()
    pipe = E.load_embedded_pipeline(r, transformer=Wrapper())
    assert isinstance(pipe.transformer, Wrapper) and pipe.default_sample_size == 32
    err = capfd.readouterr().err
    assert "Expected types" not in err and "Loading" not in err, err


def test_mid_encoders_stay_small():
    """sd3-mid (joint_attention_dim 4096, pooled 2048): the encoders fit the constraints with a few M params."""
    hidden, heads = C.clip_hidden(4096)
    assert (hidden, heads) == (256, 4)
    tok = C.clip_tokenizer(77)
    clip = C.clip_encoder(tok, hidden, heads, 1024, 1)
    t5 = C.t5_encoder(C.t5_tokenizer(), 4096, 3)
    n_clip = sum(p.numel() for p in clip.parameters())
    n_t5 = sum(p.numel() for p in t5.parameters())
    assert n_clip < 3e6 and n_t5 < 8e6, (n_clip, n_t5)
    assert C.clip_hidden(64) == (32, 4) and C.clip_hidden(16) == (8, 1)


_OFFLINE = textwrap.dedent(
    """
    import os, socket, sys
    attempts = []
    def _blocked(*a, **k):
        attempts.append(a)
        raise OSError("network blocked by test")
    socket.socket.connect = _blocked
    socket.socket.connect_ex = _blocked
    socket.create_connection = _blocked
    import torch
    from shiva_export.recipe import load_recipe
    from shiva_export.runtime.embedded import load_embedded_pipeline
    r = load_recipe("sd35-tiny")
    pipe = load_embedded_pipeline(r)
    pipe.set_progress_bar_config(disable=True)
    lat = pipe("a red cube", num_inference_steps=2, guidance_scale=4.5, height=256, width=256,
               max_sequence_length=r.max_sequence_length(), generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    assert tuple(lat.shape) == (1, 16, 32, 32), lat.shape
    print("ok", len(attempts))
    """
)


def test_offline_without_hf_hub_offline(tmp_path):
    """Build + reload + run with sockets blocked and HF_HUB_OFFLINE unset; no library output on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    env.update(SHIVA_CACHE_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, "-c", _OFFLINE], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["ok", "0"], p.stdout
    assert p.stderr.strip() == "", p.stderr[-3000:]
