"""Hostile inputs, second pass (issue 21): caches trusted only by content, special files never written,
non-finite tensors refused, contradictory flags refused, every option checked before work.

Same format as ``test_hostile_inputs.py``: each row runs the CLI in-process and asserts the exit code, one
``Error:`` line naming the problem, no traceback, and nothing left in the output folder. Rows that aim a
write at a special file also assert the node is still what it was (private nodes made in tmp with
``os.mknod`` / ``os.mkfifo``; never the machine's real ``/dev`` files). One real export is shared by the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shiva_export.cli import main
from tests.test_hostile_inputs import ONNX_T, _make, assert_clean_refusal

ROOT = Path(__file__).resolve().parents[1]
GEN = ["generate", "--model", "sd35-tiny", "--out", "{out}", "--prompt", "x"]
TRT = ["trt", "--model", "sd35-tiny", "--backend", "tensorrt-rtx", "--out-dir", "{out}/e"]
TRT_ONNX = ["trt", "--backend", "tensorrt-rtx", "--out-dir", "{out}/e"]


GEN_ORT = [
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
    "--json",
]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> dict:
    """One real `generate --backend ort` (its graph exported into the runtime cache with its sha256 record), shared
    by the cache-tampering test and by every row that needs a graph of this tool."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("runtime")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(GEN_ORT + ["--artifact-root", str(root / "engines"), "--out", str(root / "a"), "-q"]) == 0
    (graph_path,) = (root / "engines" / "sd35-tiny" / "runtime").glob("*/model.onnx")
    return {
        "root": root,
        "record": json.loads(buf.getvalue()),
        "graph": graph_path,
        "png": (root / "a" / "000-a-red-cube.png").read_bytes(),
    }


@pytest.fixture(scope="module")
def graph(runtime) -> Path:
    return runtime["graph"]


def _copy_graph(src: Path, dst: Path, record: bool = True) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    if record:
        shutil.copy(src.with_name(src.name + ".sha256.json"), dst.with_name(dst.name + ".sha256.json"))
    return dst


def _edit_metadata(path: Path, key: str, value: str) -> None:
    import onnx

    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
    onnx.save(m, str(path))


def _flip_weight_byte(path: Path) -> None:
    """One byte of a weight flipped in place; the file keeps its size and mtime (still a valid ONNX)."""
    import onnx

    raw = max((t.raw_data for t in onnx.load(str(path)).graph.initializer), key=len)
    data = bytearray(path.read_bytes())
    i = data.find(raw) + len(raw) // 2
    st = path.stat()
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _router(tmp: Path, value: float) -> Path:
    """The shipped sd35-tiny router with one weight set to ``value`` (valid shiva-router/1 metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = ROOT / "recipes" / "sd35-tiny.learned" / "router.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    first = min(tensors)
    tensors[first].view(-1)[0] = value
    dst = tmp / "in" / f"router-{value}.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _nan_data(tmp: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp / "in" / "nan-data"
    d.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "latents": torch.full((16, 32, 32), float("nan")),
            "prompt_embeds": torch.zeros(32, 64),
            "pooled": torch.zeros(64),
        },
        str(d / "0.safetensors"),
    )
    return d


def _engine(tmp: Path, edit: dict | None, version: str = "1.2.0") -> Path:
    """An engine folder (plan bytes + a sealed manifest); ``edit`` changes manifest fields afterwards, by hand."""
    from shiva_export.engines.manifest import EngineManifest, write_manifest
    from shiva_export.utils.io import sha256_file

    d = tmp / "in" / "engine"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.plan").write_bytes(b"plan" * 64)
    write_manifest(
        d / "manifest.json",
        EngineManifest(
            model_name="sd35-tiny",
            model_config_hash="cfg",
            onnx_sha256="0" * 64,
            engine_sha256=sha256_file(d / "model.plan"),
            backend="tensorrt-rtx",
            backend_version=version,
            input_shapes={"hidden_states": [2, 16, 32, 32]},
            dtype="fp32",
            ratio=0.4,
            keep_ratio=0.6,
            per_block_k={"1": 153},
        ),
    )
    if edit:
        data = json.loads((d / "manifest.json").read_text())
        data.update(edit)
        (d / "manifest.json").write_text(json.dumps(data))
    return d


def _special(kind: str, tmp: Path) -> Path:
    p = tmp / "in" / f"{kind}.node"
    p.parent.mkdir(parents=True, exist_ok=True)
    if kind == "chardev":
        os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        os.mknod(p, 0o600 | stat.S_IFSOCK)
    else:  # a symlink leading out of its folder, to a file that must not change
        victim = tmp / "elsewhere" / "victim"
        victim.parent.mkdir(parents=True, exist_ok=True)
        victim.write_text("keep me")
        p.symlink_to(victim)
    return p


SPECIAL = {"chardev": stat.S_ISCHR, "fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK, "symlink_out": stat.S_ISLNK}


def _make2(kind: str, tmp: Path, graph: Path) -> Path:
    if kind in SPECIAL:
        return _special(kind, tmp)
    made = {
        "graph04": lambda: _copy_graph(graph, tmp / "in" / "g" / "model.onnx"),
        "graph_no_record": lambda: _copy_graph(graph, tmp / "in" / "nr" / "model.onnx", record=False),
        "graph_tampered": lambda: _copy_graph(graph, tmp / "in" / "t" / "model.onnx"),
        "graph_of_sd3": lambda: _copy_graph(graph, tmp / "in" / "o" / "model.onnx"),
        "router_nan": lambda: _router(tmp, float("nan")),
        "router_inf": lambda: _router(tmp, float("inf")),
        "nan_data": lambda: _nan_data(tmp),
        "data_of_sd3": lambda: (
            _w(
                tmp / "in" / "d3" / "manifest.json",
                json.dumps(
                    {"format": "shiva-train-data", "version": 1, "model": "sd3-tiny", "recipe": "recipes/sd3-tiny.toml"}
                ),
            ).parent
        ),
        "recipe_deep": lambda: _w(tmp / "in" / "deep.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n"),
        "recipe_k_edited": lambda: _w(
            tmp / "in" / "k.toml",
            _recipe_text().replace("k = [196, 191, 184, 149, 56]", "k = [9999, 191, 184, 149, 56]"),
        ),
        "recipe_layers_str": lambda: _w(
            tmp / "in" / "ls.toml", _recipe_text().replace("num_layers = 6", 'num_layers = "six"')
        ),
        "suite_ratio_nan": lambda: _w(
            tmp / "in" / "sn.toml",
            'schema_version = 1\nname = "s"\n[[case]]\nkind = "parity"\nmodel = "sd35-tiny"\nratios = [nan]\n',
        ),
        "imgs_two": lambda: _two_pngs(tmp / "in" / "imgs"),
        "prompts_one": lambda: _w(tmp / "in" / "prompts-one.txt", "a red cube\n"),
        "weights_unet": lambda: (
            _w(tmp / "in" / "unet" / "config.json", json.dumps({"_class_name": "UNet2DConditionModel"})).parent
        ),
        "graph_ext_missing": lambda: _external_missing(graph, tmp / "in" / "ext" / "model.onnx"),
        "engine_edited_ratio": lambda: _engine(tmp, {"ratio": 0.2}),
        "engine_edited_version": lambda: _engine(tmp, {"backend_version": "9.9.9"}),
        "engine_edited_k": lambda: _engine(tmp, {"per_block_k": {"1": 256}}),
    }
    if kind in made:
        p = made[kind]()
        if kind == "graph_tampered":
            _flip_weight_byte(p)
        elif kind == "graph_of_sd3":
            _edit_metadata(p, "shiva.model", "sd3-tiny")
        return p
    return _make(kind, tmp)


def _recipe_text() -> str:
    """The built-in sd35-tiny recipe with its router path made absolute, so a copy in tmp still loads."""
    text = (ROOT / "recipes" / "sd35-tiny.toml").read_text()
    return re.sub(
        r'(?m)^(weights\s*=\s*)"([^"/][^"]*)"', lambda m: f'{m.group(1)}"{ROOT / "recipes" / m.group(2)}"', text
    )


def _two_pngs(d: Path) -> Path:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(d / f"{i}.png")
    return d


def _external_missing(graph: Path, dst: Path) -> Path:
    """The graph saved with its weights in a side file, which is then deleted."""
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        onnx.load(str(graph)),
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    (dst.parent / "model.onnx.data").unlink()
    return dst


def _w(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


CORPUS = [
    # --- S1 1 / S3: graphs are trusted by content (the sha256 recorded beside them at export), never by name
    ("gen-artifact-tampered", GEN + ["--backend", "ort", "--artifact", "{graph_tampered}"], 2, "differs from the"),
    ("gen-artifact-no-record", GEN + ["--backend", "ort", "--artifact", "{graph_no_record}"], 2, "content record"),
    (
        "gen-trt-manifest-edited",
        GEN + ["--backend", "trt", "--artifact", "{engine_edited_ratio}"],
        1,
        "edited after it was written",
    ),
    ("run-manifest-edited-ratio", ["run", "{engine_edited_ratio}"], 1, "edited after it was written"),
    ("run-manifest-edited-k", ["run", "{engine_edited_k}"], 1, "edited after it was written"),
    ("run-manifest-edited-version", ["run", "{engine_edited_version}"], 1, "edited after it was written"),
    # --- S1 2: only regular files are written; device nodes, FIFOs, sockets and outward symlinks are refused
    ("trt-timing-cache-chardev", TRT + ["--ratio", "0.4", "--timing-cache", "{chardev}"], 1, "character device"),
    ("trt-timing-cache-fifo", TRT + ["--ratio", "0.4", "--timing-cache", "{fifo}"], 1, "FIFO"),
    ("trt-timing-cache-socket", TRT + ["--ratio", "0.4", "--timing-cache", "{socket}"], 1, "socket"),
    ("trt-timing-cache-symlink-out", TRT + ["--ratio", "0.4", "--timing-cache", "{symlink_out}"], 1, "symlink"),
    (
        "onnx-out-chardev",
        ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{chardev}"],
        1,
        "character device",
    ),
    ("onnx-out-fifo", ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{fifo}"], 1, "FIFO"),
    ("onnx-out-symlink-out", ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{symlink_out}"], 1, "symlink"),
    # --- S1 3: non-finite tensors
    ("onnx-router-nan", ONNX_T + ["--router", "{router_nan}"], 2, "NaN/inf"),
    ("gen-torch-router-inf", GEN + ["--backend", "torch", "--steps", "1", "--router", "{router_inf}"], 2, "NaN/inf"),
    (
        "train-data-nan",
        ["train", "--model", "sd35-tiny", "--data", "{nan_data}", "--steps", "3", "--out-dir", "{out}/t"],
        2,
        "NaN/inf",
    ),
    (
        "train-sampler-shift-nan",
        ["train", "--model", "sd35-tiny", "--sampler-shift", "nan", "--out-dir", "{out}/t"],
        2,
        "--sampler-shift",
    ),
    # --- S1 4: another model's training data
    (
        "train-data-other-model",
        ["train", "--model", "sd35-tiny", "--data", "{data_of_sd3}", "--out-dir", "{out}/t"],
        2,
        "made for model 'sd3-tiny'",
    ),
    # --- S2: contradictory flags, each naming both
    ("gen-torch-with-artifact", GEN + ["--backend", "torch", "--artifact", "{graph04}"], 2, "--artifact"),
    (
        "gen-ratio-vs-artifact",
        GEN + ["--backend", "ort", "--ratio", "0.2", "--artifact", "{graph04}"],
        2,
        "--ratio 0.2 contradicts --artifact",
    ),
    (
        "gen-phases-vs-uniform-artifact",
        GEN + ["--backend", "ort", "--phases", "--artifact", "{graph04}"],
        2,
        "--phases",
    ),
    ("trt-onnx-and-ratio", TRT_ONNX + ["--onnx", "{graph04}", "--ratio", "0.4"], 2, "--ratio"),
    ("trt-model-vs-onnx", TRT_ONNX + ["--model", "sd3-tiny", "--onnx", "{graph04}"], 2, "graph of model 'sd35-tiny'"),
    (
        "onnx-model-is-recipe-path",
        ["onnx", "--model", "recipes/sd35-tiny.toml", "--no-validate", "--out", "{out}/m.onnx"],
        2,
        "--recipe",
    ),
    ("trt-batch-min-without-dynamic", TRT + ["--ratio", "0.4", "--batch-min", "2"], 2, "--dynamic-batch"),
    ("trt-workspace-0", TRT + ["--ratio", "0.4", "--workspace", "0"], 2, "--workspace 0"),
    (
        "parity-graph-of-another-model",
        ["validate", "parity", "--model", "sd35-tiny", "--onnx", "{graph_of_sd3}"],
        2,
        "graph of model 'sd3-tiny'",
    ),
    # --- S2: checked before any export or load
    ("trt-opt-level-6", TRT + ["--ratio", "0.4", "--opt-level", "6"], 2, "--opt-level 6"),
    ("trt-workspace-neg", TRT + ["--ratio", "0.4", "--workspace", "-5"], 2, "--workspace -5"),
    ("trt-aot-target-empty", TRT + ["--ratio", "0.4", "--aot-target", ""], 2, "--aot-target"),
    (
        "trt-batch-min-above-max",
        TRT + ["--ratio", "0.4", "--dynamic-batch", "--batch-min", "5", "--batch-max", "2"],
        2,
        "--batch-min 5",
    ),
    ("onnx-text-len-huge", ONNX_T + ["--text-len", "1000000000"], 2, "--text-len 1000000000"),
    ("onnx-batch-huge", ONNX_T + ["--batch", "1000000000"], 2, "--batch 1000000000"),
    ("onnx-batch-huge-dynamic", ONNX_T + ["--batch", "100000", "--dynamic-batch"], 2, "--dynamic-batch"),
    ("trt-batch-huge", TRT + ["--ratio", "0.4", "--batch", "1000000000"], 2, "--batch"),
    ("gen-seed-65-bits", GEN + ["--seed", str(2**64)], 2, "--seed"),
    ("gen-seed-negative", GEN + ["--seed", "-1"], 2, "--seed"),
    ("gen-width-absurd", GEN + ["--width", "99999999999999999999999"], 2, "--width 1024"),
    ("recipe-deep-nesting", ["recipe", "check", "{recipe_deep}"], 2, "nested too deeply"),
    ("onnx-recipe-deep-nesting", ONNX_T + ["--recipe", "{recipe_deep}"], 2, "nested too deeply"),
    ("train-out-dir-is-file", ["train", "--model", "sd35-tiny", "--out-dir", "{file}"], 1, "not a folder"),
    ("gen-out-is-file", ["generate", "--model", "sd35-tiny", "--prompt", "x", "--out", "{file}"], 1, "not a folder"),
    ("speed-out-dir-is-file", ["validate", "speed", "--model", "sd35-tiny", "--out-dir", "{file}"], 1, "not a folder"),
    ("trt-out-dir-is-file", TRT[:-2] + ["--ratio", "0.4", "--out-dir", "{file}"], 1, "not a folder"),
    ("train-data-out-is-file", ["train-data", "--out", "{file}", "--prompts", "{file}"], 1, "not a folder"),
    ("quality-out-dir-is-file", ["validate", "quality", "--out-dir", "{file}"], 1, "not a folder"),
    (
        "frontier-out-dir-is-file",
        ["validate", "frontier", "--model", "sd35-tiny", "--out-dir", "{file}"],
        1,
        "not a folder",
    ),
    ("suite-out-dir-is-file", ["validate", "suite", "cpu", "--out-dir", "{file}"], 1, "not a folder"),
    (
        "speed-batch-huge",
        ["validate", "speed", "--model", "sd35-tiny", "--batch", "1000000000"],
        2,
        "--batch 1000000000",
    ),
    (
        "train-seed-65-bits",
        ["train", "--model", "sd35-tiny", "--seed", str(2**64), "--out-dir", "{out}/t"],
        2,
        "--seed",
    ),
    ("run-seed-65-bits", ["run", "{dir}", "--seed", str(2**64)], 2, "--seed"),
    ("run-iterations-0", ["run", "{dir}", "--iterations", "0"], 2, "--iterations"),
    # --- probe 2 rerun (docs/quality/hostile-probe-2.md): each row is a probe case that was not clean on main
    ("onnx-ratio-given-twice", ONNX_T + ["--ratio", "0.4", "--ratio", "0.5"], 2, "--ratio 0.4 and --ratio 0.5"),
    (
        "onnx-validate-and-no-validate",
        ["onnx", "--model", "sd35-tiny", "--validate", "--no-validate", "--out", "{out}/m.onnx"],
        2,
        "--validate and --no-validate",
    ),
    ("onnx-out-socket", ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{socket}"], 1, "socket"),
    (
        "speed-compile-without-e2e",
        ["validate", "speed", "--model", "sd35-tiny", "--compile", "--out-dir", "{out}/s"],
        2,
        "--compile acts only with --e2e",
    ),
    (
        "speed-steps-without-e2e",
        ["validate", "speed", "--model", "sd35-tiny", "--steps", "5", "--out-dir", "{out}/s"],
        2,
        "--steps acts only with --e2e",
    ),
    (
        "speed-phases-without-e2e",
        ["validate", "speed", "--model", "sd35-tiny", "--phases", "--out-dir", "{out}/s"],
        2,
        "--phases acts only with --e2e",
    ),
    (
        "train-dora-rank-without-dora",
        ["train", "--model", "sd35-tiny", "--dora-rank", "8", "--out-dir", "{out}/t"],
        2,
        "--dora-rank acts only with --dora",
    ),
    (
        "train-lambda-budget-without-ema",
        ["train", "--model", "sd35-tiny", "--lambda-budget", "3", "--out-dir", "{out}/t"],
        2,
        "--budget ema",
    ),
    (
        "train-paper-only-vs-estimator",
        ["train", "--model", "sd35-tiny", "--paper-only", "--estimator", "output-gated", "--out-dir", "{out}/t"],
        2,
        "--paper-only and --estimator",
    ),
    ("train-threads-0", ["train", "--model", "sd35-tiny", "--threads", "0", "--out-dir", "{out}/t"], 2, "--threads 0"),
    (
        "train-data-split-without-dataset",
        ["train-data", "--model", "sd35-tiny", "--prompts", "{file}", "--out", "{out}/d", "--split", "validation"],
        2,
        "--split acts only with --dataset",
    ),
    (
        "quality-model-without-judge",
        ["validate", "quality", "--model", "sd35-tiny", "--out-dir", "{out}/q"],
        2,
        "no judge",
    ),
    (
        "frontier-steps-0",
        ["validate", "frontier", "--model", "sd35-tiny", "--steps", "0", "--out-dir", "{out}/f"],
        2,
        "--steps 0",
    ),
    (
        "frontier-guidance-nan",
        ["validate", "frontier", "--model", "sd35-tiny", "--guidance", "nan", "--out-dir", "{out}/f"],
        2,
        "--guidance nan",
    ),
    (
        "frontier-dense-steps-0",
        ["validate", "frontier", "--model", "sd35-tiny", "--dense-steps", "0", "--out-dir", "{out}/f"],
        2,
        "--dense-steps 0",
    ),
    (
        "parity-engine-without-engines-dir",
        ["validate", "parity", "--model", "sd35-tiny", "--backend", "engine"],
        2,
        "--engines-dir",
    ),
    (
        "parity-engines-dir-missing",
        ["validate", "parity", "--model", "sd35-tiny", "--engines-dir", "{missing}"],
        2,
        "does-not-exist",
    ),
    (
        "parity-onnx-with-ratio",
        ["validate", "parity", "--onnx", "{graph04}", "--ratio", "0.2"],
        2,
        "--ratio 0.2 contradicts --onnx",
    ),
    ("recipe-phase-k-edited", ["recipe", "check", "{recipe_k_edited}"], 2, "k = [9999"),
    ("onnx-recipe-config-wrong-type", ONNX_T + ["--recipe", "{recipe_layers_str}"], 2, "num_layers = 'six'"),
    ("onnx-weights-unsupported-class", ONNX_T + ["--weights", "{weights_unet}"], 2, "--weights"),
    ("inspect-external-data-missing", ["inspect", "{graph_ext_missing}"], 2, "external data file"),
    (
        "gen-prompts-only-comments",
        ["generate", "--model", "sd35-tiny", "--out", "{out}", "--prompts", "{prompts_empty}"],
        2,
        "prompts0.txt holds no prompt",
    ),
    ("suite-ratio-nan", ["validate", "suite", "{suite_ratio_nan}"], 2, "got nan"),
    (
        "train-target-keep-0",
        ["train", "--model", "sd35-tiny", "--target-keep", "0", "--out-dir", "{out}/t"],
        2,
        "--target-keep 0",
    ),
    (
        "train-min-keep-above-target",
        ["train", "--model", "sd35-tiny", "--min-keep", "0.9", "--target-keep", "0.5", "--out-dir", "{out}/t"],
        2,
        "--min-keep 0.9",
    ),
    (
        "train-max-logit-0",
        ["train", "--model", "sd35-tiny", "--max-logit", "0", "--out-dir", "{out}/t"],
        2,
        "--max-logit 0",
    ),
    (
        "train-steps-negative",
        ["train", "--model", "sd35-tiny", "--steps", "-5", "--out-dir", "{out}/t"],
        2,
        "--steps -5",
    ),
    (
        "train-eval-every-0",
        ["train", "--model", "sd35-tiny", "--eval-every", "0", "--out-dir", "{out}/t"],
        2,
        "--eval-every 0",
    ),
    ("unknown-command", ["bogus-command"], 2, "Choose one of: generate"),
    (
        "train-data-fewer-prompts-than-images",
        [
            "train-data",
            "--model",
            "sd35-tiny",
            "--images",
            "{imgs_two}",
            "--prompts",
            "{prompts_one}",
            "--out",
            "{out}/d",
        ],
        2,
        "prompts-one.txt has 1 prompts",
    ),
    (
        "train-sampler-steps-0",
        ["train", "--model", "sd35-tiny", "--sampler-steps", "0", "--out-dir", "{out}/t"],
        2,
        "--sampler-steps",
    ),
    # --- exit codes: missing hardware is 4 everywhere
    (
        "train-device-cuda7",
        ["train", "--model", "sd35-tiny", "--device", "cuda:7", "--out-dir", "{out}/t"],
        4,
        "cuda:7",
    ),
    # --- S3
    ("inspect-backend-version-abc", ["inspect", "{graph04}", "--backend-version", "abc"], 2, "--backend-version"),
]
if not _ort_has_cuda():
    CORPUS.append(
        ("gen-provider-cuda-without-ort-gpu", GEN + ["--backend", "ort", "--provider", "cuda"], 4, "onnxruntime-gpu")
    )
    CORPUS.append(
        (
            "parity-ort-cuda-without-ort-gpu",
            ["validate", "parity", "--model", "sd35-tiny", "--backend", "ort-cuda"],
            4,
            "onnxruntime-gpu",
        )
    )


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _torch_has_cuda():
    CORPUS.append(("gen-trt-without-gpu", GEN + ["--backend", "trt", "--ratio", "0.4"], 4, "needs a CUDA GPU"))
try:  # a well-formed but unknown AOT target is refused by asking tensorrt_rtx, before the export
    import tensorrt_rtx  # noqa: F401

    CORPUS.append(("trt-aot-target-unknown", TRT + ["--ratio", "0.4", "--aot-target", "99.9"], 2, "--aot-target 99.9"))
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_corpus_size():
    assert len(CORPUS) >= 45 and len({r[0] for r in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name,args,code,needle", CORPUS, ids=[r[0] for r in CORPUS])
def test_bad_input_is_one_clean_line(name, args, code, needle, tmp_path, capsys, request):
    out = tmp_path / "out"
    subs = {"out": str(out)}
    for a in args:
        for key in re.findall(r"\{(\w+)\}", a):
            if key not in subs:
                subs[key] = str(
                    _make2(key, tmp_path, request.getfixturevalue("graph") if key.startswith("graph") else None)
                )
    argv = [a.format(**subs) for a in args]
    got = main(argv)
    assert_clean_refusal(name, got, code, needle, out, capsys)
    for key, test in SPECIAL.items():  # the node is still what it was, and nothing was stamped beside it
        if key in subs:
            p = Path(subs[key])
            assert test(os.lstat(p).st_mode), f"{name}: {p} was replaced"
            assert not p.with_name(p.name + ".shiva.json").exists(), f"{name}: stamp written beside {p}"
            if key == "symlink_out":
                assert (tmp_path / "elsewhere" / "victim").read_text() == "keep me"
    assert not list((tmp_path / "in").glob(".shiva-tmp-*")) if (tmp_path / "in").exists() else True


# ------------------------------------------------------------------------------ one writer per output
_HOLDER = (
    "import sys, time\nfrom shiva_export.utils.io import folder_lock\n"
    "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n"
)


@pytest.fixture
def held(tmp_path):
    """Another process writing ``tmp/busy`` (holding its lock), as a concurrent run would."""
    d = tmp_path / "busy"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(d)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    yield d
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    "argv",
    [
        ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{busy}/m.onnx"],
        ["train", "--model", "sd35-tiny", "--steps", "3", "--out-dir", "{busy}"],
        ["generate", "--model", "sd35-tiny", "--prompt", "x", "--out", "{busy}"],
        ["validate", "speed", "--model", "sd35-tiny", "--out-dir", "{busy}"],
    ],
    ids=["onnx", "train", "generate", "speed"],
)
def test_a_second_run_into_one_output_is_refused(argv, held, capsys):
    got = main([a.format(busy=held) for a in argv])
    err = capsys.readouterr().err
    assert got == 1 and "is being written by pid" in err and "Traceback" not in err, err
    assert sorted(p.name for p in held.iterdir()) == [".shiva.lock"]  # only the holder's lock: nothing written


def test_the_lock_is_reentrant_and_leaves_no_folder_behind(tmp_path):
    from shiva_export.utils.io import folder_lock

    d = tmp_path / "a" / "b"
    with folder_lock(d), folder_lock(d):  # a command and the library function it calls
        assert (d / ".shiva.lock").is_file()
    assert not (tmp_path / "a").exists()  # created for the lock, empty again: removed


# ------------------------------------------------------------------------------ the runtime graph cache
def test_a_tampered_runtime_graph_is_exported_again_never_reused(runtime, tmp_path, capsys):
    """S1 1: one flipped weight byte (size and mtime kept) in engines/<model>/runtime/...: the next generate
    re-exports it and draws the very image of the first run; it never runs the edited graph."""
    engines = tmp_path / "engines"
    shutil.copytree(runtime["root"] / "engines", engines)
    (graph_path,) = (engines / "sd35-tiny" / "runtime").glob("*/model.onnx")
    _flip_weight_byte(graph_path)
    assert main(GEN_ORT + ["--artifact-root", str(engines), "--out", str(tmp_path / "b")]) == 0
    second = json.loads(capsys.readouterr().out)
    a0, b0 = runtime["record"]["pipeline"]["artifacts"][0], second["pipeline"]["artifacts"][0]
    assert a0["status"] == "exported" and b0["status"] == "exported" and b0["onnx_sha256"] == a0["onnx_sha256"]
    assert (tmp_path / "b" / "000-a-red-cube.png").read_bytes() == runtime["png"]


def test_verify_onnx_record_catches_valid_onnx_edits(graph, tmp_path):
    from shiva_export.utils.io import verify_onnx_record

    g = _copy_graph(graph, tmp_path / "g" / "model.onnx")
    assert verify_onnx_record(g) is None
    _edit_metadata(g, "shiva.ratio", "0.2")  # still a valid ONNX, another budget claimed
    assert "differs from the" in verify_onnx_record(g)
    g.with_name("model.onnx.sha256.json").unlink()
    assert "no content record" in verify_onnx_record(g)


# ------------------------------------------------------------------------------ S1 5: weight binding
def test_a_bound_recipe_refuses_a_pipeline_folder_holding_other_weights(tmp_path, capsys):
    """A recipe bound by sha256 (train --dora) whose [model] path is a pipeline folder with the *base* transformer."""
    text = (ROOT / "recipes" / "sd35-shapes.toml").read_text()
    text = text.replace(
        'path = "sd35-shapes/pipeline"',
        f'path = "{ROOT / "recipes" / "sd35-shapes" / "pipeline"}"\nsha256 = "{"ab" * 32}"',
    )
    text = re.sub(r'weights = "sd35-shapes.learned/', f'weights = "{ROOT / "recipes" / "sd35-shapes.learned"}/', text)
    rec = _w(tmp_path / "bound.toml", text)
    from shiva_export.errors import WeightsError
    from shiva_export.recipe import load_recipe
    from shiva_export.runtime.pipeline import pipeline_location

    with pytest.raises(WeightsError, match="do not match recipe"):
        pipeline_location(load_recipe(rec), None)  # what validate quality, generate and speed --e2e load
    from shiva_export.models.base import weights_sha256

    good = _w(
        tmp_path / "good.toml",
        text.replace("ab" * 32, weights_sha256(ROOT / "recipes" / "sd35-shapes" / "pipeline" / "transformer")),
    )
    assert pipeline_location(load_recipe(good), None)[0].endswith("pipeline")  # the weights it is bound to load
    code = main(["onnx", "--recipe", str(rec), "--no-validate", "--out", str(tmp_path / "o" / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "do not match recipe" in err and not (tmp_path / "o" / "m.onnx").exists(), err


def test_run_checks_the_backend_version_before_looking_for_a_gpu(tmp_path, capsys):
    """A sealed manifest of another TensorRT-RTX version: `run` names the version, not the missing GPU."""
    pytest.importorskip("tensorrt_rtx")
    d = _engine(tmp_path, None, version="0.0.1")
    code = main(["run", str(d)])
    err = capsys.readouterr().err
    assert code == 1 and "0.0.1" in err and "this runtime is" in err and "CUDA" not in err, err


# ------------------------------------------------------------------------------ S3
def test_the_e2e_report_names_the_cpu_and_load_average():
    from shiva_export.runtime.benchmark import E2EReport
    from shiva_export.validate.speed import _loadavg, _machine

    rep = E2EReport(
        "sd35-tiny", 1, 1.0, 16, 16, 0, 1, "cpu", "fp32", False, [], {**_machine(_loadavg()), "threads": 1}, "x"
    )
    line = next(ln for ln in rep.to_markdown().splitlines() if "Machine:" in ln)
    assert "Machine: ?" not in line and "None" not in line and "load average" in line, line


def test_every_tool_write_refuses_special_files(tmp_path):
    """The helper every atomic write goes through: regular files only, never a node or an outward symlink."""
    from shiva_export.errors import OutputPathError
    from shiva_export.utils.io import atomic_write_text, check_regular_target

    for kind, is_kind in SPECIAL.items():
        p = _special(kind, tmp_path)
        with pytest.raises(OutputPathError):
            atomic_write_text(p, "x")
        assert is_kind(os.lstat(p).st_mode)
    inside_link = tmp_path / "in" / "inner-link"
    (tmp_path / "in" / "real").write_text("old")
    inside_link.symlink_to(tmp_path / "in" / "real")
    assert check_regular_target(inside_link) == inside_link  # a symlink within the folder to a regular file is fine


def test_an_edited_embedded_pipeline_cache_is_rebuilt(tmp_path, monkeypatch):
    """The embedded pipeline cache (<cache>/pipelines/<name>-<key>) is reused by content too: an edited weight file
    (size kept) is not loaded, the pipeline is built again, bit for bit."""
    monkeypatch.setenv("SHIVA_CACHE_DIR", str(tmp_path / "cache"))
    from shiva_export.recipe import load_recipe
    from shiva_export.runtime.embedded import (
        _cache_key,
        _is_complete,
        ensure_embedded_pipeline,
    )

    rec = load_recipe("sd35-tiny")
    folder = ensure_embedded_pipeline(rec)
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    good = f.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert not _is_complete(folder, _cache_key(rec))
    assert ensure_embedded_pipeline(rec) == folder and f.read_bytes() == good
