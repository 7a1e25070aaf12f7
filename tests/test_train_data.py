"""``shiva-export train-data`` and the lazy ``ShardedLatents`` reader, end to end on the embedded sd35-tiny
pipeline (offline): encoding with the pipeline's own encoders, the manifest, the null embedding, batches,
caption dropout, CFG pairs, resume, damaged shards, ``make_data`` and the CLI."""

from __future__ import annotations

import math
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from shiva_export.train.cached import LatentFolder, ShardedLatents, make_data
from shiva_export.train.data import Batch, SyntheticData
from shiva_export.train.dataset import (
    MANIFEST_NAME,
    NULL_NAME,
    dataset_records,
    encode_train_data,
    image_records,
    read_prompt_file,
)

PROMPTS = ["a red cube", "a blue ball on a table", "green tree", "a cat", "a dog in the sea", "small yellow star"]


@pytest.fixture(scope="module")
def tiny_pipe():
    from shiva_export.runtime.pipeline import load_diffusers_pipeline

    return load_diffusers_pipeline("sd35-tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    for i in range(len(PROMPTS)):  # different sizes and aspects: center crop + resize to 256 x 256
        arr = (np.random.RandomState(i).rand(64 + 8 * i, 80, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(d / f"{i:02d}.png")
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_pipe, images):
    out = tmp_path_factory.mktemp("data") / "tiny"
    encode_train_data(
        "sd35-tiny", records=image_records(images, PROMPTS), out=out, shard_size=4, batch=4, pipe=tiny_pipe
    )
    return out


def _encode_prompt(pipe, texts):
    from shiva_export.recipe import load_recipe

    n = load_recipe("sd35-tiny").max_sequence_length()
    with torch.inference_mode():
        pe, _, pooled, _ = pipe.encode_prompt(
            texts, texts, texts, device="cpu", do_classifier_free_guidance=False, max_sequence_length=n
        )
    return pe, pooled


def test_manifest_records_what_made_the_data(data_dir):
    import json

    from shiva_export.recipe import load_recipe, recipe_hash
    from shiva_export.utils.io import sha256_file

    m = json.loads((data_dir / MANIFEST_NAME).read_text())
    assert m["format"] == "shiva-train-data" and m["version"] == 1 and m["model"] == "sd35-tiny"
    assert m["samples"] == 6 and [s["samples"] for s in m["shards"]] == [4, 2] and m["truncated_prompts"] == 0
    assert m["has_latents"] and m["dtype"] == "float32"
    assert m["shapes"] == {"prompt_embeds": [32, 64], "pooled": [64], "latents": [16, 32, 32]}
    assert m["latent_shape"] == [16, 32, 32] and m["max_sequence_length"] == 16
    assert m["recipe_sha256"] == recipe_hash(load_recipe("sd35-tiny"))
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "vae"} <= set(m["pipeline"]["components"])
    assert m["vae"]["shift_factor"] == pytest.approx(0.0609) and m["vae"]["scaling_factor"] == pytest.approx(1.5305)
    for entry in m["shards"] + [m["null"]]:
        f = data_dir / entry["file"]
        assert f.stat().st_size == entry["bytes"] and sha256_file(f) == entry["sha256"]
    assert sorted(p.name for p in data_dir.iterdir()) == [
        MANIFEST_NAME,
        NULL_NAME,
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]


def test_stored_tensors_are_the_pipelines_own_encodings(data_dir, tiny_pipe, images):
    data = ShardedLatents(data_dir)
    null_pe, null_pooled = _encode_prompt(tiny_pipe, [""])
    null = data.null_text
    assert torch.equal(null["encoder_hidden_states"], null_pe[0]) and torch.equal(
        null["pooled_projections"], null_pooled[0]
    )
    pe, pooled = _encode_prompt(tiny_pipe, PROMPTS[4:])  # the second shard, encoded in one call of 2
    s = data.dataset[5]
    torch.testing.assert_close(s["prompt_embeds"], pe[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(s["pooled"], pooled[1], atol=1e-5, rtol=0)
    from PIL import Image

    vae = tiny_pipe.vae
    x = tiny_pipe.image_processor.preprocess(
        Image.open(images / "05.png").convert("RGB"), height=256, width=256, resize_mode="crop"
    )
    with torch.inference_mode():
        z = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(s["latents"], z[0], atol=1e-4, rtol=0)


def test_batches_noise_like_latent_folder(data_dir):
    data = ShardedLatents(data_dir, seed=0)
    t = torch.tensor([0.0, 250.0, 999.0])
    b = data.batch(3, timesteps=t)
    assert isinstance(b, Batch) and not b.cfg and b.dropped is None
    assert b.hidden_states.shape == (3, 16, 32, 32) and b.target.shape == (3, 16, 32, 32)
    assert b.inputs["encoder_hidden_states"].shape == (3, 32, 64) and b.inputs["pooled_projections"].shape == (3, 64)
    stored = torch.stack([data.dataset[i]["latents"] for i in range(len(data))])
    x0 = b.hidden_states - (t / 1000.0).view(-1, 1, 1, 1) * b.target  # x_t = x0 + sigma (eps - x0)
    for row in x0:
        assert torch.isclose(row, stored, atol=1e-4).flatten(1).all(1).any()
    assert torch.equal(b.hidden_states[0], x0[0])  # t = 0 is the clean latent
    # one epoch visits every sample once (seeded permutation), then the next epoch reshuffles
    d = ShardedLatents(data_dir, seed=1)
    seen = [tuple(d.batch(1).inputs["pooled_projections"][0, :4].tolist()) for _ in range(6)]
    assert len(set(seen)) == 6


def _held_tensor_bytes(reader) -> int:
    seen, total = set(), 0
    for obj in (reader, reader.dataset):
        for v in vars(obj).values():
            vals = v.values() if isinstance(v, dict) else (v if isinstance(v, (list, tuple)) else [v])
            for t in vals:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def test_reader_memory_is_flat_in_dataset_size(tmp_path, data_dir, tiny_pipe):
    big = tmp_path / "big"
    encode_train_data(
        "sd35-tiny", prompts=[f"prompt {i}" for i in range(40)], out=big, shard_size=8, batch=20, pipe=tiny_pipe
    )
    small, large = ShardedLatents(data_dir, seed=0), ShardedLatents(big, seed=0)
    assert len(small) == 6 and len(large) == 40 and not large.has_targets
    held = {len(r): _held_tensor_bytes(r) for r in (small, large)}
    assert held[6] == held[40]  # the null embedding only: nothing per sample is held
    for r in (small, large):
        assert r.dataset.reads == 0  # opening reads headers, not samples
        r.batch(2)
        assert r.dataset.reads == 2  # a batch reads exactly its samples
    b = large.batch(3)  # text only: seeded Gaussian x_t, real text, no flow target
    assert b.target is None and b.hidden_states.shape == (3, 16, 32, 32)


def test_caption_dropout_rate_and_null(data_dir):
    data = ShardedLatents(data_dir, seed=0)
    dropped = 0
    for _ in range(50):
        b = data.batch(8, caption_dropout=0.1)
        m = b.dropped
        dropped += int(m.sum())
        null_rows = (b.inputs["encoder_hidden_states"] == data.null_text["encoder_hidden_states"]).flatten(1).all(1)
        assert torch.equal(null_rows, m)
        assert torch.equal((b.inputs["pooled_projections"] == data.null_text["pooled_projections"]).all(1), m)
    assert dropped == 42  # of 400 (rate 0.105), seed 0, p = 0.1
    with pytest.raises(Exception, match="caption_dropout"):
        data.batch(2, caption_dropout=1.5)


def test_cfg_pairs_share_latents_and_timesteps(data_dir):
    data = ShardedLatents(data_dir, seed=0)
    ref = ShardedLatents(data_dir, seed=0).batch(3, timesteps=torch.tensor([10.0, 500.0, 900.0]))
    b = data.batch(3, timesteps=torch.tensor([10.0, 500.0, 900.0]), cfg_pairs=True)
    assert b.cfg and len(b) == 6
    hs, t = b.hidden_states, b.timestep
    assert torch.equal(hs[:3], hs[3:]) and torch.equal(t[:3], t[3:]) and torch.equal(b.target[:3], b.target[3:])
    assert torch.equal(hs[3:], ref.hidden_states)  # the cond half is the plain batch (same stream)
    assert torch.equal(b.inputs["encoder_hidden_states"][:3], data.null_text["encoder_hidden_states"].expand(3, -1, -1))
    assert torch.equal(b.inputs["pooled_projections"][:3], data.null_text["pooled_projections"].expand(3, -1))
    assert torch.equal(b.inputs["encoder_hidden_states"][3:], ref.inputs["encoder_hidden_states"])
    assert b.model_inputs()["timestep"].shape == (6,)


def test_resume_gives_the_same_next_batch(data_dir):
    a = ShardedLatents(data_dir, seed=3)
    a.batch(4)
    state = a.state_dict()
    with pytest.raises(Exception, match="timesteps has 2 values"):
        a.batch(4, timesteps=torch.tensor([1.0, 2.0]))  # refused before a sample is consumed
    assert a.state_dict()["position"] == state["position"] == 4
    want = a.batch(4, caption_dropout=0.5)
    b = ShardedLatents(data_dir, seed=3)
    b.load_state_dict(state)
    got = b.batch(4, caption_dropout=0.5)
    for k in want.inputs:
        assert torch.equal(want.inputs[k], got.inputs[k]), k
    assert torch.equal(want.timestep, got.timestep) and torch.equal(want.dropped, got.dropped)
    # worker processes read the same samples in the same order
    w = ShardedLatents(data_dir, seed=3, num_workers=2)
    w.load_state_dict(state)
    got_w = w.batch(4, caption_dropout=0.5)
    assert torch.equal(want.hidden_states, got_w.hidden_states)
    w.close()
    with pytest.raises(Exception, match="holds 6"):
        b.load_state_dict(dict(state, samples=7))


def test_damaged_shards_fail_with_one_line(tmp_path, data_dir):
    from shiva_export.errors import ConfigError

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    shard = bad / "shard-00001.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-100])
    with pytest.raises(ConfigError, match="truncated") as e:
        ShardedLatents(bad)
    assert "\n" not in str(e.value)
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="sha256") as e:
        ShardedLatents(bad)
    assert "\n" not in str(e.value)
    shard.unlink()
    with pytest.raises(ConfigError, match="missing"):
        ShardedLatents(bad)


def test_make_data_picks_the_source(tmp_path, data_dir, tiny_pipe):
    from safetensors.torch import save_file

    from shiva_export.errors import ShapeError

    tf = tiny_pipe.transformer
    assert isinstance(make_data(data_dir, tf, 256, 256, 32), ShardedLatents)
    with pytest.raises(ShapeError, match="encoded at 256x256 px"):  # the recipe's token count must match the data's
        make_data(data_dir, tf, 512, 512, 32)
    assert isinstance(make_data(data_dir / MANIFEST_NAME, tf, 256, 256, 32), ShardedLatents)
    assert isinstance(make_data(None, tf, 256, 256, 32), SyntheticData)
    folder = tmp_path / "per-sample"
    folder.mkdir()
    src = ShardedLatents(data_dir)
    for i in range(2):
        s = src.dataset[i]
        save_file(
            {"latents": s["latents"], "prompt_embeds": s["prompt_embeds"], "pooled": s["pooled"]},
            str(folder / f"{i:05d}.safetensors"),
        )
    lf = make_data(folder, tf, 256, 256, 32)
    assert isinstance(lf, LatentFolder) and len(lf) == 2
    with pytest.raises(Exception, match="null embedding"):
        lf.batch(2, cfg_pairs=True)
    shutil.copy(data_dir / NULL_NAME, folder / NULL_NAME)  # a null.safetensors beside the samples enables CFG pairs
    lf = LatentFolder(folder, tf)
    assert len(lf) == 2 and len(lf.batch(2, cfg_pairs=True)) == 4


def test_synthetic_cfg_pairs_and_dropout(tiny_pipe):
    tf = tiny_pipe.transformer
    plain = SyntheticData(tf, 256, 256, 32, seed=0).batch(4)
    d = SyntheticData(tf, 256, 256, 32, seed=0)
    b = d.batch(4, cfg_pairs=True)
    assert b.cfg and len(b) == 8 and torch.equal(b.hidden_states[4:], plain.hidden_states)  # stream unchanged
    assert torch.equal(b.hidden_states[:4], b.hidden_states[4:]) and torch.equal(b.timestep[:4], b.timestep[4:])
    null = d.null_text
    assert torch.equal(b.inputs["encoder_hidden_states"][:4], null["encoder_hidden_states"].expand(4, -1, -1))
    assert torch.equal(
        null["pooled_projections"], SyntheticData(tf, 256, 256, 32, seed=0).null_text["pooled_projections"]
    )  # fixed per seed
    b = SyntheticData(tf, 256, 256, 32, seed=0).batch(64, caption_dropout=0.25)
    rows = (b.inputs["pooled_projections"] == null["pooled_projections"]).all(1)
    assert torch.equal(rows, b.dropped) and 5 < int(b.dropped.sum()) < 30


def test_dit_synthetic_cfg_uses_the_null_class():
    from shiva_export.models import load_transformer
    from shiva_export.recipe import load_recipe

    rec = load_recipe("dit-tiny")
    tf = load_transformer(recipe=rec)
    b = SyntheticData(tf, rec.shapes.height, rec.shapes.width, rec.shapes.text_len, seed=0).batch(3, cfg_pairs=True)
    n = int(tf.config.num_embeds_ada_norm)
    assert b.inputs["class_labels"][:3].tolist() == [n] * 3 and (b.inputs["class_labels"][3:] < n).all()
    assert torch.equal(b.hidden_states[:3], b.hidden_states[3:])


def test_sources_and_their_errors(tmp_path, images, monkeypatch):
    from shiva_export.errors import ConfigError, MissingDependencyError, ModelNotFoundError

    f = tmp_path / "p.txt"
    f.write_text("# captions\n\na red cube\n  blue ball  \n", encoding="utf-8")
    assert read_prompt_file(f) == ["a red cube", "blue ball"]
    f.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="no prompt"):
        read_prompt_file(f)
    with pytest.raises(ConfigError, match="holds 6 images but --prompts has 2"):
        image_records(images, ["a", "b"])
    with pytest.raises(ConfigError, match="no caption"):
        image_records(images)
    (images / "00.txt").write_text("sidecar caption")
    try:
        with pytest.raises(ConfigError, match="01.png has no caption"):
            image_records(images)
    finally:
        (images / "00.txt").unlink()

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(MissingDependencyError, match="datasets"):
        dataset_records("some/captions")

    rows = [
        {"caption": " a red cube ", "img": str(images / "00.png")},
        {"caption": "blue ball", "img": {"bytes": (images / "01.png").read_bytes(), "path": None}},
    ]
    decoded: list[int] = []

    class FakeDataset:  # the part of datasets.Dataset the reader uses: columns, column access, row access
        column_names = ["caption", "img"]

        def __getitem__(self, key):
            if isinstance(key, str):
                return [r[key] for r in rows]
            decoded.append(key)
            return rows[key]

    def load_dataset(name, split):
        if name != "cached/captions":
            raise FileNotFoundError(f"Couldn't find '{name}' on the Hugging Face Hub either")
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    recs = dataset_records("cached/captions", image_column="img")
    assert [(r.prompt, r.name) for r in recs] == [
        ("a red cube", "cached/captions[0]"),
        ("blue ball", "cached/captions[1]"),
    ]
    assert decoded == []  # no image is read before the encoder asks for it
    from shiva_export.train.dataset import _load_image

    assert _load_image(recs[1].image, recs[1].name).size == (80, 72) and decoded == [1]
    assert dataset_records("cached/captions")[0].image is None  # text only unless --image-column
    with pytest.raises(ModelNotFoundError, match="offline"):
        dataset_records("not/cached")
    with pytest.raises(ConfigError, match="--prompt-column 'text'"):
        dataset_records("cached/captions", prompt_column="text")


def test_cli_writes_data_and_train_runs_on_it(tmp_path, capsys):
    from shiva_export.cli import main

    prompts = tmp_path / "prompts.txt"
    long = "a very long prompt about a blue ball sitting on a wooden table near the sea under a bright sky"
    prompts.write_text("\n".join(PROMPTS[:2] + [long]) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    assert (
        main(
            [
                "train-data",
                "--model",
                "sd35-tiny",
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--shard-size",
                "2",
                "--json",
            ]
        )
        == 0
    )
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 3 and summary["shards"] == 2 and (out / MANIFEST_NAME).is_file()
    assert summary["truncated_prompts"] == 1  # CLIP's 16-token window cuts the long one, as at inference
    assert main(["train-data", "--prompts", str(prompts), "--out", str(out), "--quiet"]) == 1  # exists: not replaced
    assert "exists and is not empty" in capsys.readouterr().err
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            "sd35-tiny",
            "--data",
            str(out),
            "--steps",
            "2",
            "--steps",
            "1",
            "--steps",
            "1",
            "--out-dir",
            str(run),
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert rc == 0 and (run / "router.safetensors").is_file()


def test_cli_bad_inputs_exit_with_documented_codes(tmp_path, capsys, monkeypatch):
    from shiva_export.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    assert main(["train-data", "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --prompts") and len([ln for ln in err.splitlines() if ln.startswith("Error:")]) == 1
    assert main(["train-data", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["train-data", "--out", str(tmp_path / "o")]) == 2
    assert "no data given" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["train-data", "--dataset", "some/captions", "--out", str(tmp_path / "o")]) == 4
    assert "pip install datasets" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_works_without_heavy_packages():
    """`train-data --help` with torch, diffusers, onnxruntime and tensorrt blocked from import."""
    import subprocess

    from tests.test_cli import _BLOCKER

    r = subprocess.run(
        [sys.executable, "-c", _BLOCKER, "train-data", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "--shard-size" in r.stdout


def test_train_resumes_on_sharded_data(tmp_path, data_dir):
    """The loop checkpoints the reader's state (position in the seeded order + noise RNG): a cut and resumed run
    ends with the routers of an uninterrupted one, and the flow loss is on (real latents)."""
    from shiva_export.train import TrainConfig, train

    kw = dict(
        warmup_steps=3,
        policy_steps=1,
        joint_steps=1,
        batch=2,
        checkpoint_every=2,
        data=data_dir,
        num_threads=1,
        phases=1,
        sampler_steps=8,
    )
    full = train("sd35-tiny", TrainConfig(out_dir=tmp_path / "full", **kw))
    assert all(h["flow"] is not None for h in full.history)
    train("sd35-tiny", TrainConfig(out_dir=tmp_path / "cut", stop_at_step=3, **kw))
    second = train("sd35-tiny", TrainConfig(out_dir=tmp_path / "cut", resume=True, **kw))
    assert second.finished and [h["loss"] for h in second.history] == pytest.approx(
        [h["loss"] for h in full.history], abs=1e-6
    )
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert a["data"]["kind"] == "sharded" and a["data"]["position"] == b["data"]["position"] == 10
    for k, v in a["routers"].items():
        assert torch.allclose(v, b["routers"][k], atol=1e-6), k


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m["shards"][0].update(file="../../etc/passwd"), "not a safe file name"),
        (lambda m: m["shards"][0].update(samples="4"), "malformed shards"),
        (lambda m: m.update(shards=[]), "malformed shards"),
        (lambda m: m.update(latent_shape=[16, 32]), "malformed latent_shape"),
        (lambda m: m.update(null=None), "malformed null"),
        (lambda m: m.update(format="other"), "not a shiva-train-data manifest"),
        (lambda m: m.update(version=99), "version 99"),
        (lambda m: m["shards"][1].update(samples=3), r"holds prompt_embeds \(2, 32, 64\); the manifest says \(3"),
    ],
)
def test_hostile_manifest_is_one_typed_line(tmp_path, data_dir, edit, needle):
    import json

    from shiva_export.errors import ShivaError

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    m = json.loads((bad / MANIFEST_NAME).read_text())
    edit(m)
    (bad / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ShivaError, match=needle) as e:
        ShardedLatents(bad)
    assert "\n" not in str(e.value)


# -- every architecture: the cached layout is the adapter's ---------------------------------------------------
ARCH_PROMPTS = {
    "flux-tiny": ["a red cube", "a blue ball", "green tree"],
    "pixart-tiny": ["a red cube", "a blue ball", "green tree"],
    "dit-tiny": ["1", "2", "3"],
}


@pytest.fixture(scope="module", params=sorted(ARCH_PROMPTS))
def arch_data(request, tmp_path_factory, images):
    """``train-data`` (CLI) on a non-SD3 tiny model: 3 images with captions (DiT: class ids), shards of 2."""
    import contextlib
    import io
    import json

    from shiva_export.cli import main
    from shiva_export.runtime.pipeline import load_diffusers_pipeline

    model = request.param
    root = tmp_path_factory.mktemp(model)
    img = root / "images"
    img.mkdir()
    for f in sorted(images.iterdir())[:3]:
        shutil.copy(f, img / f.name)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(ARCH_PROMPTS[model]) + "\n", encoding="utf-8")
    out = root / "data"
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        rc = main(
            [
                "train-data",
                "--model",
                model,
                "--images",
                str(img),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--shard-size",
                "2",
                "--json",
            ]
        )
    assert rc == 0 and json.loads(buf.getvalue())["samples"] == 3
    return model, out, load_diffusers_pipeline(model), img


def test_other_architectures_store_their_pipelines_own_encodings(arch_data):
    """The manifest names the architecture; the shapes are the adapter's cached layout at the recipe's size; the
    text tensors are the pipeline's own encode_prompt (DiT: the class id) and the latents its VAE's (Flux: packed)."""
    import json

    from PIL import Image

    from shiva_export.models import InputSpec, get_adapter
    from shiva_export.recipe import load_recipe

    model, out, pipe, img = arch_data
    rec, adapter = load_recipe(model), get_adapter(pipe.transformer)
    m = json.loads((out / MANIFEST_NAME).read_text())
    want = adapter.cache_shapes(
        pipe.transformer.config, InputSpec(1, rec.shapes.height, rec.shapes.width, rec.shapes.text_len, False)
    )
    assert (
        m["architecture"] == adapter.NAME
        and {k: tuple(v) for k, v in m["shapes"].items()} == want
        and tuple(m["latent_shape"]) == want["latents"]
    )
    data = ShardedLatents(out)
    s = data.dataset[2]  # the second shard's only sample
    text = ARCH_PROMPTS[model][2]
    with torch.inference_mode():
        if model == "flux-tiny":
            pe, pooled, _ = pipe.encode_prompt([text], [text], device="cpu", max_sequence_length=rec.shapes.text_len)
            torch.testing.assert_close(s["prompt_embeds"], pe[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(s["pooled"], pooled[0], atol=1e-5, rtol=0)
        elif model == "pixart-tiny":
            pe, mask, _, _ = pipe.encode_prompt(
                [text],
                do_classifier_free_guidance=False,
                device="cpu",
                clean_caption=False,
                max_sequence_length=rec.shapes.text_len,
            )
            torch.testing.assert_close(s["prompt_embeds"], pe[0], atol=1e-5, rtol=0)
            assert torch.equal(s["prompt_attention_mask"], mask[0].long())
        else:
            assert int(s["class_labels"]) == 3 and int(data.null["class_labels"]) == int(
                pipe.transformer.config.num_embeds_ada_norm
            )
        vae = pipe.vae
        from diffusers.image_processor import VaeImageProcessor

        x = VaeImageProcessor(vae_scale_factor=8).preprocess(
            Image.open(sorted(img.iterdir())[2]).convert("RGB"),
            height=rec.shapes.height,
            width=rec.shapes.width,
            resize_mode="crop",
        )
        z = (vae.encode(x).latent_dist.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        if model == "flux-tiny":
            z = pipe._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])
    torch.testing.assert_close(s["latents"], z[0], atol=1e-4, rtol=0)


def test_other_architectures_batches_run_the_transformer(arch_data):
    """Cached batches are the transformer's own arguments (with the adapter's static extras, e.g. Flux ids), noised by
    the adapter's objective: rectified flow (Flux, target eps - x0) or DDPM (PixArt, DiT, target eps); the clean latent
    comes back exactly from x_t and the target. CFG pairs put the pipeline's null conditioning in the uncond half."""
    from shiva_export.models import get_adapter
    from shiva_export.recipe import load_recipe

    model, out, pipe, _ = arch_data
    rec, tf = load_recipe(model), pipe.transformer
    adapter = get_adapter(tf)
    data = make_data(out, tf, rec.shapes.height, rec.shapes.width, rec.shapes.text_len, seed=0)
    t = torch.tensor([0.0, 400.0, 999.0])
    b = data.batch(3, timesteps=t)
    stored = torch.stack([data.dataset[i]["latents"] for i in range(len(data))])
    view = (-1, *[1] * (b.hidden_states.dim() - 1))
    if adapter.PREDICTION == "flow":  # x_t = (1 - s) x0 + s eps, target eps - x0
        x0 = b.hidden_states - (t / 1000.0).view(view) * b.target
    else:  # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps, abar of the pipeline's scheduler at integer t
        abar = adapter.scheduler().alphas_cumprod[t.long()].view(view)
        x0 = (b.hidden_states - (1 - abar).sqrt() * b.target) / abar.sqrt()
    for row in x0:
        assert torch.isclose(row, stored, atol=1e-4).flatten(1).all(1).any()
    pairs = data.batch(2, cfg_pairs=True)
    for name, v in data.null_text.items():
        assert torch.equal(pairs.inputs[name][:2], v.to(pairs.inputs[name].dtype).expand_as(pairs.inputs[name][:2]))
    with torch.no_grad():
        y = tf(**pairs.model_inputs()).sample
    assert adapter.training_prediction(tf.config, y).shape == pairs.target.shape


def test_other_architectures_train_on_their_data(arch_data, tmp_path):
    """``train --data`` on the cached folder: 3 steps with the denoising loss (real latents), CFG pairs and caption
    dropout; a model of another architecture is refused with one line."""
    import contextlib
    import io
    import json

    from shiva_export.cli import main
    from shiva_export.errors import ConfigError
    from shiva_export.models import load_transformer
    from shiva_export.recipe import load_recipe

    model, out, _, _ = arch_data
    run = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        rc = main(
            [
                "train",
                "--model",
                model,
                "--data",
                str(out),
                "--steps",
                "1",
                "--steps",
                "1",
                "--steps",
                "1",
                "--batch",
                "2",
                "--cfg-pairs",
                "--caption-dropout",
                "0.2",
                "--out-dir",
                str(run),
                "--quiet",
                "--threads",
                "1",
                "--json",
            ]
        )
    res = json.loads(buf.getvalue())
    assert rc == 0 and (run / "router.safetensors").is_file() and res["step"] == 3
    assert all(h["flow"] is not None and math.isfinite(h["flow"]) for h in res["history"])
    assert "cached latents" in (run / "recipe.toml").read_text().splitlines()[0]
    other = load_transformer(recipe=load_recipe("sd35-tiny"))
    with pytest.raises(ConfigError, match="encoded for architecture") as e:
        make_data(out, other, 256, 256, 32)
    assert "\n" not in str(e.value)
