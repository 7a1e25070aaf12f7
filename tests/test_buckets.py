"""Resolution buckets and learned-phase engines: one static graph per size in a <W>x<H> folder, the token count of
each size from the adapter, `trt --size ... --phases` in the layout `generate --backend trt --phases` reads, and
`generate` refusing a size that has no bucket in one line."""

from __future__ import annotations

import json

import pytest

from shiva_export.cli import main
from shiva_export.errors import ConfigError, ShapeError
from shiva_export.export.buckets import bucket_sizes, known_buckets, parse_size, pick_bucket
from shiva_export.recipe import Bucket, load_recipe, recipe_hash


def _with_buckets(name: str, sizes: list[tuple[int, int]]):
    rec = load_recipe(name)
    return rec.model_copy(update={"buckets": [Bucket(width=w, height=h) for w, h in sizes]})


def test_sizes_parse_as_width_x_height_and_bad_ones_say_the_form():
    assert parse_size("1024x768") == (1024, 768) and parse_size(" 64X48 ") == (64, 48)
    for bad in ("1024", "0x64", "64x", "64*48", "-64x48"):
        with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
            parse_size(bad)


def test_bucket_list_comes_from_size_flags_else_the_recipe_and_refuses_both_forms():
    rec = _with_buckets("sd35-tiny", [(64, 64), (64, 48)])
    assert bucket_sizes(rec, ["32x32", "32x32", "48x32"]) == [(32, 32), (48, 32)]  # flags win, each once
    assert bucket_sizes(rec, None) == [(64, 64), (64, 48)]
    assert bucket_sizes(rec, None, height=64) is None  # an explicit single size: the size-free layout
    assert bucket_sizes(load_recipe("sd35-tiny"), None) is None
    with pytest.raises(ConfigError, match="not both"):
        bucket_sizes(rec, ["64x64"], width=64)


def test_recipe_buckets_parse_refuse_duplicates_and_leave_the_recipe_hash(tmp_path):
    src = load_recipe("sd35-tiny").source_path.read_text()
    with_b = tmp_path / "b.toml"
    with_b.write_text(src + "\n[[buckets]]\nwidth = 64\nheight = 64\n\n[[buckets]]\nwidth = 64\nheight = 48\n")
    rec = load_recipe(with_b)
    assert [b.name for b in rec.buckets] == ["64x64", "64x48"]
    plain = tmp_path / "p.toml"
    plain.write_text(src)
    assert recipe_hash(rec) == recipe_hash(load_recipe(plain))  # which sizes get built changes no graph
    dup = tmp_path / "d.toml"
    dup.write_text(src + "\n[[buckets]]\nwidth = 64\nheight = 64\n\n[[buckets]]\nwidth = 64\nheight = 64\n")
    with pytest.raises(Exception, match="64x64 twice"):
        load_recipe(dup)


def test_pick_bucket_matches_exactly_and_refuses_others_in_one_line(tmp_path):
    rec = load_recipe("sd35-tiny")
    assert pick_bucket(rec, tmp_path, 64, 64) is None  # no bucket anywhere: the size-free layout
    (tmp_path / "sd35-tiny" / "64x48" / "ratio0.40" / "fp32").mkdir(parents=True)  # what `trt --size 64x48` leaves
    (tmp_path / "sd35-tiny" / "runtime").mkdir()
    rec_b = _with_buckets("sd35-tiny", [(128, 128)])
    assert known_buckets(rec_b, tmp_path) == ["64x48", "128x128"]  # built and declared, smallest first
    assert pick_bucket(rec_b, tmp_path, 48, 64) == "64x48" and pick_bucket(rec_b, tmp_path, 128, 128) == "128x128"
    with pytest.raises(ShapeError) as err:
        pick_bucket(rec_b, tmp_path, 64, 64)
    msg = str(err.value)
    assert "\n" not in msg and "no bucket 64x64" in msg and "64x48, 128x128" in msg and "--size 64x64" in msg


def test_default_paths_put_each_bucket_and_phase_in_its_own_folder():
    from pathlib import Path

    from shiva_export.export.pruned import _default_out_path, default_onnx_path

    rec = load_recipe("sd35-tiny")
    assert default_onnx_path("sd35-tiny", 0.4, "fp32", bucket="64x48") == Path(
        "engines/sd35-tiny/64x48/ratio0.40/fp32/model.onnx"
    )
    assert default_onnx_path("sd35-tiny", 0.4, "fp32") == Path(
        "engines/sd35-tiny/ratio0.40/fp32/model.onnx"
    )  # no bucket: as before
    assert _default_out_path(rec, "early", 0.3, "fp16", "drop", "64x48") == Path(
        "engines/sd35-tiny/64x48/phase-early/fp16/model.onnx"
    )
    assert _default_out_path(rec, "late", 0.5, "fp32", "keep", None) == Path(
        "engines/sd35-tiny/phase-late-context-keep/fp32/model.onnx"
    )


def test_budget_dedup_counts_each_buckets_tokens_from_the_adapter():
    from shiva_export.engines.budgets import image_tokens, unique_budgets

    flux = load_recipe("flux-tiny")  # 2x2-packed latents: 64 tokens at 128 px (an SD3 count would say 256)
    assert image_tokens(flux, 128, 128) == 64
    assert unique_budgets(flux, [0.4, 0.405], 128, 128) == (
        [0.4],
        {0.405: 0.4},
    )  # k 38 and 38; at 256 tokens 153 and 152
    sd = load_recipe("sd35-tiny")
    assert image_tokens(sd, 64, 48) == 12 and image_tokens(sd, 256, 256) == 256
    assert unique_budgets(sd, [0.4, 0.42], 64, 64) == ([0.4], {0.42: 0.4})  # 16 tokens: k 9 and 9
    assert unique_budgets(sd, [0.4, 0.42], 256, 256) == ([0.4, 0.42], {})  # 256 tokens: k 153 and 148


def test_onnx_exports_one_parity_checked_graph_per_size(tmp_path, monkeypatch, capsys):
    """Sizes are model-agnostic: sd3-tiny, whose graph traces fastest."""
    from shiva_export.export.onnx import read_shiva_metadata

    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "onnx",
            "--model",
            "sd3-tiny",
            "--ratio",
            "0.4",
            "--size",
            "64x64",
            "--size",
            "64x48",
            "--parity-cases",
            "1",
            "--json",
            "-q",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    rows = out["exports"]
    assert [r["onnx"] for r in rows] == [f"engines/sd3-tiny/{s}/ratio0.40/fp32/model.onnx" for s in ("64x64", "64x48")]
    assert [r["num_image_tokens"] for r in rows] == [16, 12] and all(r["parity"]["passed"] for r in rows)
    spec = read_shiva_metadata(tmp_path / rows[1]["onnx"])["input_spec"]
    assert (spec["width"], spec["height"]) == (64, 48)
    code = main(
        ["onnx", "--model", "sd3-tiny", "--size", "64x64", "--size", "64x48", "--out", "x.onnx", "--no-validate"]
    )
    assert code == 2 and "cannot share one --out" in capsys.readouterr().err


def test_generate_refuses_a_size_without_a_bucket_before_any_export(tmp_path, capsys):
    (tmp_path / "engines" / "sd35-tiny" / "64x48").mkdir(parents=True)
    code = main(
        [
            "generate",
            "--model",
            "sd35-tiny",
            "--prompt",
            "a red cube",
            "--backend",
            "ort",
            "--height",
            "64",
            "--width",
            "64",
            "--artifact-root",
            str(tmp_path / "engines"),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "2",
        ]
    )
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and "no bucket 64x64" in errors[0] and "64x48" in errors[0], errors
    assert [p.name for p in (tmp_path / "engines" / "sd35-tiny").iterdir()] == ["64x48"]  # nothing exported


@pytest.fixture(scope="module")
def phase_engines(tmp_path_factory):
    """`trt --size 256x256 --size 64x48 --phases` on sd35-tiny (two learned phases): four AOT engines, built once.
    (256x256 is the recipe's own size, whose phase graphs the runtime tests trace too: each is traced once.)"""
    from shiva_export.engines.budgets import build_engines

    root = tmp_path_factory.mktemp("engines")
    return root, build_engines(
        model="sd35-tiny", sizes=["256x256", "64x48"], phases=True, backend="tensorrt-rtx", out_dir=root, validate=False
    )


@pytest.mark.trt_rtx
def test_trt_phases_builds_every_bucket_and_phase_with_manifests(phase_engines):
    from shiva_export.engines.manifest import read_manifest
    from shiva_export.export.onnx import read_shiva_metadata

    root, builds = phase_engines
    assert [(b.bucket, b.phase, b.status) for b in builds] == [
        ("256x256", "early", "built"),
        ("256x256", "late", "built"),
        ("64x48", "early", "built"),
        ("64x48", "late", "built"),
    ]
    rec = load_recipe("sd35-tiny")
    for b in builds:
        assert b.out_dir == root / "sd35-tiny" / b.bucket / f"phase-{b.phase}" / "fp32" and b.plan_path.is_file()
        m = read_manifest(b.manifest_path)
        row = next(p for p in rec.schedule.phases if p.name == b.phase)
        width = int(b.bucket.split("x")[0])
        assert m.export_key["phase"]["name"] == b.phase and m.export_key["shapes"]["width"] == width
        meta = read_shiva_metadata(b.onnx_path)
        assert (meta["phase"], meta["t_start"], meta["t_stop"]) == (row.name, row.t_start, row.t_stop)
        n = 256 if b.bucket == "256x256" else 12
        assert m.per_block_k == meta["k_per_block"] and all(
            k == int(n * r) for k, r in zip(m.per_block_k.values(), row.keep_ratios)
        )
        assert m.ratio == pytest.approx(1 - sum(row.keep_ratios) / len(row.keep_ratios))


@pytest.mark.trt_rtx
def test_generate_trt_phases_reads_the_engines_trt_phases_built(phase_engines):
    """`generate --backend trt --phases` asks build_engines for its bucket and phase: the same folders, cached, no rebuild."""
    from shiva_export.models import InputSpec
    from shiva_export.prune.schedule import phases_from_recipe
    from shiva_export.runtime.pipeline import _ensure_engine

    root, builds = phase_engines
    rec = load_recipe("sd35-tiny")
    spec = InputSpec(batch=1, height=48, width=64, text_len=rec.shapes.text_len, cfg=True)
    for phase in phases_from_recipe(rec, 6):
        info = _ensure_engine(
            rec,
            None,
            None,
            phase,
            spec,
            "fp32",
            root,
            False,
            True,
            lambda m: None,
            "drop",
            pick_bucket(rec, root, 48, 64),
        )
        want = next(b for b in builds if b.bucket == "64x48" and b.phase == phase.name)
        assert info["status"] == "cached" and info["engine"] == str(want.out_dir)


@pytest.mark.trt_rtx
@pytest.mark.gpu
def test_generate_trt_phases_runs_the_bucket_on_a_gpu(phase_engines, tmp_path, capsys):
    root, _ = phase_engines
    code = main(
        [
            "generate",
            "--model",
            "sd35-tiny",
            "--prompt",
            "a red cube",
            "--backend",
            "trt",
            "--phases",
            "--height",
            "48",
            "--width",
            "64",
            "--artifact-root",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "4",
            "--device",
            "cuda",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert [a["engine"] for a in rec["pipeline"]["artifacts"]] == [
        str(root / "sd35-tiny" / "64x48" / f"phase-{p}" / "fp32") for p in ("early", "late")
    ]


@pytest.mark.trt_rtx
def test_trt_cli_size_and_phases_reuse_the_built_engines(phase_engines, capsys):
    root, builds = phase_engines
    args = [
        "trt",
        "--model",
        "sd35-tiny",
        "--size",
        "256x256",
        "--size",
        "64x48",
        "--backend",
        "tensorrt-rtx",
        "--out-dir",
        str(root),
    ]
    code = main([*args, "--phases", "--json"])
    rows = json.loads(capsys.readouterr().out)["engines"]
    assert code == 0 and [(r["bucket"], r["phase"], r["status"]) for r in rows] == [
        (b.bucket, b.phase, "cached") for b in builds
    ]
    assert rows[0]["ratio"] == pytest.approx(builds[0].ratio)
    code = main([*args, "--phases", "--ratio", "0.4"])
    assert code == 2 and "not both" in capsys.readouterr().err
