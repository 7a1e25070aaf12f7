"""A table-driven corpus of bad and hostile inputs across every command.

Each row runs the CLI in-process and asserts the documented exit code, one ``Error:`` line (or Click's
usage message) naming the problem, no traceback, and that nothing was left in the output folder.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from shiva_export.cli import main

RECIPE = (Path(__file__).resolve().parents[1] / "recipes" / "sd35-tiny.toml").read_text()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/shiva-pwned",))


def _w(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def _onnx_bytes() -> bytes:
    from onnx import TensorProto as TP
    from onnx import helper as h

    x = h.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", TP.FLOAT, [1, 4])
    return h.make_model(
        h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [x], [y]), opset_imports=[h.make_opsetid("", 17)]
    ).SerializeToString()


# Fixtures a row can name: each maps to a file or folder made in tmp.
def _make(kind: str, tmp: Path) -> Path:
    return {
        "empty": lambda: _w(tmp / "in" / "empty.onnx", b""),
        "text": lambda: _w(tmp / "in" / "text.onnx", "this is not an onnx model\n"),
        "binary": lambda: _w(tmp / "in" / "binary.bin", bytes(range(256)) * 8),
        "truncated_onnx": lambda: _w(tmp / "in" / "trunc.onnx", _onnx_bytes()[:20]),
        "foreign_onnx": lambda: _w(tmp / "in" / "foreign.onnx", _onnx_bytes()),
        "pickle": lambda: _w(tmp / "in" / "evil.safetensors", pickle.dumps({"w": _Boom()})),
        "recipe_inf": lambda: _w(tmp / "in" / "inf.toml", RECIPE.replace("atol = 1e-4", "atol = inf")),
        "recipe_nan": lambda: _w(tmp / "in" / "nan.toml", RECIPE.replace("atol = 1e-4", "atol = nan")),
        "recipe_neg_height": lambda: _w(tmp / "in" / "neg.toml", RECIPE.replace("height = 256", "height = -256")),
        "recipe_huge_height": lambda: _w(tmp / "in" / "huge.toml", RECIPE.replace("height = 256", "height = 1048576")),
        "recipe_huge_text": lambda: _w(
            tmp / "in" / "htext.toml", RECIPE.replace("text_len = 32", "text_len = 1000000000")
        ),
        "recipe_unknown_key": lambda: _w(tmp / "in" / "unk.toml", RECIPE.replace("[prune]", "[prune]\nbogus = 1")),
        "recipe_version": lambda: _w(
            tmp / "in" / "ver.toml", RECIPE.replace("schema_version = 1", "schema_version = 99")
        ),
        "recipe_bad_toml": lambda: _w(tmp / "in" / "bad.toml", "schema_version = = 1\n"),
        "recipe_unsorted": lambda: _w(
            tmp / "in" / "uns.toml", RECIPE.replace("ratios = [0.2, 0.4, 0.6]", "ratios = [0.6, 0.2]")
        ),
        "recipe_neg_layers": lambda: _w(tmp / "in" / "nl.toml", RECIPE.replace("num_layers = 6", "num_layers = -6")),
        "recipe_phase_escape": lambda: _w(
            tmp / "in" / "ph.toml", RECIPE.replace('name = "early"', 'name = "../../evil"')
        ),
        "suite_binary": lambda: _w(tmp / "in" / "suite.toml", bytes(range(256))),
        "suite_escape": lambda: _w(
            tmp / "in" / "s1.toml",
            'schema_version = 1\nname = "../../x"\n[[case]]\nkind = "speed"\nmodel = "sd35-tiny"\nratios = [0.4]\n',
        ),
        "suite_model_escape": lambda: _w(
            tmp / "in" / "s2.toml",
            'schema_version = 1\nname = "s"\n[[case]]\nkind = "speed"\nmodel = "../x"\nratios = [0.4]\n',
        ),
        "suite_repeats0": lambda: _w(
            tmp / "in" / "s3.toml",
            'schema_version = 1\nname = "s"\n[[case]]\nkind = "speed"\nmodel = "sd35-tiny"\nratios = [0.4]\nrepeats = 0\n',
        ),
        "suite_unknown_kind": lambda: _w(
            tmp / "in" / "s4.toml",
            'schema_version = 1\nname = "s"\n[[case]]\nkind = "fuzz"\nmodel = "sd35-tiny"\nratios = [0.4]\n',
        ),
        "suite_bad_ratio": lambda: _w(
            tmp / "in" / "s5.toml",
            'schema_version = 1\nname = "s"\n[[case]]\nkind = "speed"\nmodel = "sd35-tiny"\nratios = [1.5]\n',
        ),
        "prompts_binary": lambda: _w(tmp / "in" / "prompts.txt", b"\xff\xfe\x00bad"),
        "prompts_empty": lambda: _w(tmp / "in" / "prompts0.txt", "\n# only a comment\n\n"),
        "file": lambda: _w(tmp / "in" / "a-file", "x"),
        "dir": lambda: (tmp / "in" / "emptydir").mkdir(parents=True, exist_ok=True) or tmp / "in" / "emptydir",
        "weights_no_config": lambda: _w(tmp / "in" / "w1" / "model.safetensors", b"x").parent,
        "weights_bad_config": lambda: _w(tmp / "in" / "w2" / "config.json", "{not json").parent,
        "ckpt_dir_pickle": lambda: _w(tmp / "in" / "ck" / "checkpoint.pt", pickle.dumps({"x": _Boom()})).parent,
        "chain_bad_json": lambda: _w(tmp / "in" / "chain1" / "segments.json", "{not json").parent,
        "chain_escape": lambda: (
            _w(
                tmp / "in" / "chain2" / "segments.json",
                '{"format": "shiva-engine-chain/1", "count": 2, "inputs": ["x"], "outputs": ["y"], '
                '"segments": [{"dir": "../../etc", "inputs": ["x"], "outputs": ["y"], "plan_sha256": "0"}, '
                '{"dir": "seg1of2", "inputs": ["y"], "outputs": ["y"], "plan_sha256": "0"}]}',
            ).parent
        ),
        "segment_alone": lambda: _w(tmp / "in" / "model.seg0of2.onnx", _onnx_bytes()),
        "missing": lambda: tmp / "in" / "does-not-exist",
        "unwritable": lambda: Path("/proc/shiva-no-such-dir/out"),
    }[kind]()


E = "error"  # the message is an 'Error:' line
U = "usage"  # the message is Click's usage error ('Invalid value' / 'No such option' / 'Missing')

ONNX_T = ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{out}/m.onnx"]
GEN = ["generate", "--model", "sd35-tiny", "--out", "{out}"]
CORPUS = [
    # --- onnx: option values
    ("onnx-ratio-1", ONNX_T + ["--ratio", "1.0"], 2, "out of range"),
    ("onnx-ratio-neg", ONNX_T + ["--ratio", "-0.1"], 2, "out of range"),
    ("onnx-ratio-nan", ONNX_T + ["--ratio", "nan"], 2, "ratio"),
    ("onnx-ratio-inf", ONNX_T + ["--ratio", "inf"], 2, "ratio"),
    ("onnx-ratio-k0", ONNX_T + ["--ratio", "0.999"], 2, "leaves k = 0"),
    ("onnx-ratio-text", ONNX_T + ["--ratio", "half"], 2, "--ratio"),
    ("onnx-height-250", ONNX_T + ["--height", "250"], 2, "multiple of 16"),
    ("onnx-height-0", ONNX_T + ["--height", "0"], 2, "height"),
    ("onnx-height-huge", ONNX_T + ["--height", "1048576"], 2, "position-embedding range"),
    ("onnx-width-neg", ONNX_T + ["--width", "-16"], 2, "width"),
    ("onnx-batch-0", ONNX_T + ["--batch", "0"], 2, "--batch 0"),
    ("onnx-batch-neg", ONNX_T + ["--batch", "-2"], 2, "batch"),
    ("onnx-text-len-0", ONNX_T + ["--text-len", "0"], 2, "text length"),
    ("onnx-opset-23", ONNX_T + ["--opset", "23"], 2, "opset 23"),
    ("onnx-opset-9", ONNX_T + ["--opset", "9"], 2, "opset"),
    ("onnx-dtype-int8", ONNX_T + ["--dtype", "int8"], 2, "int8"),
    ("onnx-dtype-bf16", ONNX_T + ["--dtype", "bf16"], 2, "no bfloat16 Conv"),
    (
        "trt-dtype-bf16",
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--ratio",
            "0.4",
            "--dtype",
            "bf16",
            "--backend",
            "tensorrt-rtx",
            "--out-dir",
            "{out}/e",
        ],
        2,
        "bfloat16",
    ),
    (
        "onnx-parity-cases-0",
        ["onnx", "--model", "sd35-tiny", "--out", "{out}/m.onnx", "--parity-cases", "0"],
        2,
        "parity_cases",
    ),
    ("onnx-unknown-model", ONNX_T[:1] + ["--model", "sd99"] + ONNX_T[3:], 2, "Unknown model"),
    ("onnx-model-escape", ONNX_T[:1] + ["--model", "../../etc/passwd"] + ONNX_T[3:], 2, "Recipe files end in .toml"),
    ("onnx-unknown-phase", ONNX_T + ["--phase", "middle"], 2, "--phase 'middle'"),
    ("onnx-phase-index", ONNX_T + ["--phase", "7"], 2, "out of range"),
    ("onnx-ratio-and-phase", ONNX_T + ["--phase", "early", "--ratio", "0.4"], 2, "not several"),
    # --- onnx: files
    ("onnx-recipe-missing", ONNX_T + ["--recipe", "{missing}"], 2, "not found"),
    ("onnx-recipe-binary", ONNX_T + ["--recipe", "{binary}"], 2, ""),
    ("onnx-recipe-bad-toml", ONNX_T + ["--recipe", "{recipe_bad_toml}"], 2, "not valid TOML"),
    ("onnx-recipe-inf", ONNX_T + ["--recipe", "{recipe_inf}"], 2, "atol"),
    ("onnx-recipe-nan", ONNX_T + ["--recipe", "{recipe_nan}"], 2, "atol"),
    ("onnx-recipe-neg-height", ONNX_T + ["--recipe", "{recipe_neg_height}"], 2, "height"),
    ("onnx-recipe-huge-height", ONNX_T + ["--recipe", "{recipe_huge_height}"], 2, "height"),
    ("onnx-recipe-huge-text", ONNX_T + ["--recipe", "{recipe_huge_text}"], 2, "text_len"),
    ("onnx-recipe-unknown-key", ONNX_T + ["--recipe", "{recipe_unknown_key}"], 2, "unknown field"),
    ("onnx-recipe-version", ONNX_T + ["--recipe", "{recipe_version}"], 2, "schema_version"),
    ("onnx-recipe-unsorted", ONNX_T + ["--recipe", "{recipe_unsorted}"], 2, "ascending"),
    ("onnx-recipe-neg-layers", ONNX_T + ["--recipe", "{recipe_neg_layers}"], 2, "num_layers"),
    ("onnx-recipe-phase-escape", ONNX_T + ["--recipe", "{recipe_phase_escape}"], 2, "name"),
    ("onnx-router-missing", ONNX_T + ["--router", "{missing}"], 2, "router"),
    ("onnx-router-empty", ONNX_T + ["--router", "{empty}"], 2, "router"),
    ("onnx-router-pickle", ONNX_T + ["--router", "{pickle}"], 2, "router"),
    ("onnx-router-binary", ONNX_T + ["--router", "{binary}"], 2, "router"),
    ("onnx-weights-missing", ONNX_T + ["--weights", "{missing}"], 1, "does not exist"),
    ("onnx-weights-file", ONNX_T + ["--weights", "{file}"], 1, "not a readable folder"),
    ("onnx-weights-empty-dir", ONNX_T + ["--weights", "{dir}"], 1, "config.json"),
    ("onnx-weights-no-config", ONNX_T + ["--weights", "{weights_no_config}"], 1, "config.json"),
    ("onnx-weights-bad-config", ONNX_T + ["--weights", "{weights_bad_config}"], 1, "config.json"),
    (
        "onnx-out-unwritable",
        ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{unwritable}"],
        1,
        "ONNX output",
    ),
    ("onnx-out-is-dir", ["onnx", "--model", "sd35-tiny", "--no-validate", "--out", "{dir}"], 1, ""),
    # --- inspect
    ("inspect-empty", ["inspect", "{empty}"], 2, "empty"),
    ("inspect-text", ["inspect", "{text}"], 2, "ONNX"),
    ("inspect-truncated", ["inspect", "{truncated_onnx}"], 2, "ONNX"),
    ("inspect-missing", ["inspect", "{missing}"], 2, ""),
    ("inspect-dir", ["inspect", "{dir}"], 2, ""),
    ("inspect-bad-backend", ["inspect", "{foreign_onnx}", "--backend", "tensorflow"], 2, "tensorflow"),
    # --- validate parity / speed / suite
    ("parity-onnx-empty", ["validate", "parity", "--model", "sd35-tiny", "--onnx", "{empty}"], 2, "empty"),
    ("parity-onnx-text", ["validate", "parity", "--model", "sd35-tiny", "--onnx", "{text}"], 2, "ONNX"),
    ("parity-onnx-truncated", ["validate", "parity", "--model", "sd35-tiny", "--onnx", "{truncated_onnx}"], 2, "ONNX"),
    ("parity-onnx-foreign", ["validate", "parity", "--model", "sd35-tiny", "--onnx", "{foreign_onnx}"], 2, "shiva"),
    ("parity-cases-0", ["validate", "parity", "--model", "sd35-tiny", "--cases", "0"], 2, "cases"),
    ("parity-ratio-1", ["validate", "parity", "--model", "sd35-tiny", "--ratio", "1.0"], 2, "out of range"),
    (
        "parity-report-unwritable",
        ["validate", "parity", "--model", "sd35-tiny", "--report", "{unwritable}"],
        1,
        "report",
    ),
    ("speed-ratio-1", ["validate", "speed", "--model", "sd35-tiny", "--ratio", "1.5"], 2, "ratio"),
    ("speed-repeats-0", ["validate", "speed", "--model", "sd35-tiny", "--repeats", "0"], 2, "repeats"),
    ("speed-backend-bad", ["validate", "speed", "--model", "sd35-tiny", "--backend", "tf"], 2, "tf"),
    ("speed-out-unwritable", ["validate", "speed", "--model", "sd35-tiny", "--out-dir", "{unwritable}"], 1, ""),
    ("e2e-ratio-1", ["validate", "speed", "--e2e", "--model", "sd35-tiny", "--ratio", "1.5"], 2, "ratio"),
    (
        "e2e-compile-ort",
        ["validate", "speed", "--e2e", "--model", "sd35-tiny", "--backend", "ort", "--compile"],
        2,
        "compile",
    ),
    ("e2e-device-cuda", ["validate", "speed", "--e2e", "--model", "sd35-tiny", "--device", "cuda"], 4, "CUDA"),
    ("suite-unknown", ["validate", "suite", "nope"], 2, "Unknown suite"),
    ("suite-binary", ["validate", "suite", "{suite_binary}"], 2, ""),
    ("suite-escape", ["validate", "suite", "{suite_escape}", "--out-dir", "{out}/r"], 2, "name"),
    ("suite-model-escape", ["validate", "suite", "{suite_model_escape}", "--out-dir", "{out}/r"], 2, "model"),
    ("suite-repeats-0", ["validate", "suite", "{suite_repeats0}", "--out-dir", "{out}/r"], 2, "repeats"),
    ("suite-unknown-kind", ["validate", "suite", "{suite_unknown_kind}", "--out-dir", "{out}/r"], 2, "kind"),
    ("suite-bad-ratio", ["validate", "suite", "{suite_bad_ratio}", "--out-dir", "{out}/r"], 2, "ratios"),
    # --- recipe
    ("recipe-check-missing", ["recipe", "check", "{missing}"], 2, ""),
    ("recipe-check-inf", ["recipe", "check", "{recipe_inf}"], 2, "atol"),
    ("recipe-check-unknown-key", ["recipe", "check", "{recipe_unknown_key}"], 2, "unknown field"),
    ("recipe-show-unknown", ["recipe", "show", "sd99"], 2, "Unknown model"),
    # --- trt / run
    (
        "trt-onnx-empty",
        ["trt", "--model", "sd35-tiny", "--onnx", "{empty}", "--backend", "tensorrt-rtx", "--out-dir", "{out}/e"],
        2,
        "empty",
    ),
    (
        "trt-onnx-text",
        ["trt", "--model", "sd35-tiny", "--onnx", "{text}", "--backend", "tensorrt-rtx", "--out-dir", "{out}/e"],
        2,
        "ONNX",
    ),
    (
        "trt-onnx-foreign",
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--onnx",
            "{foreign_onnx}",
            "--backend",
            "tensorrt-rtx",
            "--out-dir",
            "{out}/e",
        ],
        2,
        "shiva",
    ),
    (
        "trt-backend-bad",
        ["trt", "--model", "sd35-tiny", "--backend", "tensorflow", "--out-dir", "{out}/e"],
        2,
        "tensorflow",
    ),
    (
        "trt-ratio-1",
        ["trt", "--model", "sd35-tiny", "--ratio", "1.0", "--backend", "tensorrt-rtx", "--out-dir", "{out}/e"],
        2,
        "out of range",
    ),
    (
        "trt-timing-cache-foreign",
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--ratio",
            "0.4",
            "--backend",
            "tensorrt-rtx",
            "--timing-cache",
            "{file}",
            "--out-dir",
            "{out}/e",
        ],
        1,
        "not a timing cache",
    ),
    (
        "trt-segments-0",
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--ratio",
            "0.4",
            "--backend",
            "tensorrt-rtx",
            "--segments",
            "0",
            "--out-dir",
            "{out}/e",
        ],
        2,
        "--segments 0",
    ),
    (
        "trt-segments-99",
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--ratio",
            "0.4",
            "--backend",
            "tensorrt-rtx",
            "--segments",
            "99",
            "--out-dir",
            "{out}/e",
        ],
        2,
        "out of range",
    ),
    (
        "trt-segments-dynamic",
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--ratio",
            "0.4",
            "--backend",
            "tensorrt-rtx",
            "--segments",
            "2",
            "--dynamic-batch",
            "--out-dir",
            "{out}/e",
        ],
        2,
        "fixed shapes",
    ),
    (
        "trt-segments-foreign",
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--onnx",
            "{foreign_onnx}",
            "--backend",
            "tensorrt-rtx",
            "--segments",
            "2",
            "--out-dir",
            "{out}/e",
        ],
        2,
        "shiva",
    ),
    ("run-chain-bad-json", ["run", "{chain_bad_json}"], 1, "engine chain"),
    ("run-chain-escape", ["run", "{chain_escape}"], 1, "segment"),
    ("parity-segment-foreign", ["validate", "parity", "--model", "sd35-tiny", "--onnx", "{segment_alone}"], 2, "shiva"),
    ("run-missing", ["run", "{missing}"], 1, "not found"),
    ("run-empty-dir", ["run", "{dir}"], 1, "not found"),
    # --- train
    ("train-keep-1.5", ["train", "--model", "sd35-tiny", "--target-keep", "1.5", "--out-dir", "{out}/t"], 2, "target"),
    ("train-keep-0", ["train", "--model", "sd35-tiny", "--target-keep", "0", "--out-dir", "{out}/t"], 2, "target"),
    ("train-phases-9", ["train", "--model", "sd35-tiny", "--phases", "9", "--out-dir", "{out}/t"], 2, "phases"),
    ("train-resume-none", ["train", "--model", "sd35-tiny", "--resume", "--out-dir", "{dir}"], 2, "no checkpoint"),
    (
        "train-resume-pickle",
        ["train", "--model", "sd35-tiny", "--resume", "--out-dir", "{ckpt_dir_pickle}", "--steps", "1"],
        2,
        "checkpoint",
    ),
    ("train-data-missing", ["train", "--model", "sd35-tiny", "--data", "{missing}", "--out-dir", "{out}/t"], 2, "data"),
    # --- generate
    ("gen-no-prompt", GEN, 2, "--prompt"),
    ("gen-prompts-missing", GEN + ["--prompts", "{missing}"], 2, "prompts"),
    ("gen-prompts-binary", GEN + ["--prompts", "{prompts_binary}"], 2, "UTF-8"),
    ("gen-prompts-empty", GEN + ["--prompts", "{prompts_empty}"], 2, "--prompt"),
    ("gen-steps-0", GEN + ["--prompt", "x", "--steps", "0"], 2, "--steps 0"),
    ("gen-guidance-nan", GEN + ["--prompt", "x", "--guidance", "nan"], 2, "--guidance"),
    ("gen-guidance-neg", GEN + ["--prompt", "x", "--guidance", "-1"], 2, "--guidance"),
    ("gen-backend-bad", GEN + ["--prompt", "x", "--backend", "tf"], 2, "torch, ort, trt"),
    ("gen-dtype-bf16-ort", GEN + ["--prompt", "x", "--backend", "ort", "--dtype", "bf16"], 2, "bf16"),
    ("gen-device-cuda", GEN + ["--prompt", "x", "--device", "cuda"], 4, "CUDA"),
    ("gen-ratio-1", GEN + ["--prompt", "x", "--ratio", "1.0"], 2, "out of range"),
    ("gen-ratio-and-phases", GEN + ["--prompt", "x", "--ratio", "0.4", "--phases"], 2, "not both"),
    ("gen-height-250", GEN + ["--prompt", "x", "--height", "250"], 2, "multiple of 16"),
    (
        "gen-artifact-missing",
        GEN + ["--prompt", "x", "--backend", "ort", "--artifact", "{missing}"],
        2,
        "does not exist",
    ),
    ("gen-artifact-foreign", GEN + ["--prompt", "x", "--backend", "ort", "--artifact", "{foreign_onnx}"], 2, "shiva"),
    ("gen-artifact-empty", GEN + ["--prompt", "x", "--backend", "ort", "--artifact", "{empty}"], 2, "empty"),
    ("gen-artifact-text", GEN + ["--prompt", "x", "--backend", "ort", "--artifact", "{text}"], 2, "ONNX"),
    (
        "gen-trt-artifact-missing",
        GEN + ["--prompt", "x", "--backend", "trt", "--artifact", "{missing}"],
        1,
        "not found",
    ),
    ("gen-weights-file", GEN + ["--prompt", "x", "--weights", "{file}"], 1, "not a folder"),
    ("gen-weights-not-pipeline", GEN + ["--prompt", "x", "--weights", "{dir}"], 1, "model_index.json"),
    ("gen-out-unwritable", ["generate", "--model", "sd35-tiny", "--prompt", "x", "--out", "{unwritable}"], 1, "--out"),
    ("gen-hub-offline", ["generate", "--model", "sd35", "--prompt", "x", "--out", "{out}"], 2, "--weights"),
    ("gen-unknown-model", ["generate", "--model", "sd99", "--prompt", "x", "--out", "{out}"], 2, "Unknown model"),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_corpus_size():
    assert len(CORPUS) >= 60 and len({r[0] for r in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name,args,code,needle", CORPUS, ids=[r[0] for r in CORPUS])
def test_bad_input_is_one_clean_line(name, args, code, needle, tmp_path, capsys):
    out = tmp_path / "out"
    subs = {"out": str(out)}
    import re

    for a in args:
        for key in re.findall(r"\{(\w+)\}", a):
            if key not in subs:
                subs[key] = str(_make(key, tmp_path))
    argv = [a.format(**subs) for a in args]
    pwned = Path("/tmp/shiva-pwned")
    pwned.unlink(missing_ok=True)
    got = main(argv)
    assert_clean_refusal(name, got, code, needle, out, capsys)
    assert not pwned.exists(), f"{name}: code from a pickle ran"


def test_a_weights_folder_with_a_missing_tensor_is_a_load_error(tmp_path, capsys):
    """Never export from freshly initialised parameters: a missing tensor fails at load with one line (exit 1)."""
    import safetensors.torch as st

    from shiva_export.models.base import load_transformer
    from shiva_export.recipe import load_recipe

    load_transformer(recipe=load_recipe("sd35-tiny")).save_pretrained(tmp_path / "w")
    f = tmp_path / "w" / "diffusion_pytorch_model.safetensors"
    tensors = st.load_file(f)
    tensors.pop("pos_embed.proj.bias")
    st.save_file(tensors, f, metadata={"format": "pt"})
    code = main(
        [
            "onnx",
            "--model",
            "sd35-tiny",
            "--weights",
            str(tmp_path / "w"),
            "--no-validate",
            "--out",
            str(tmp_path / "o" / "m.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 1 and "missing keys: pos_embed.proj.bias" in err and "uninitialised" in err and "Traceback" not in err
    ), err
    assert not (tmp_path / "o" / "m.onnx").exists()


def test_a_config_of_another_model_class_is_a_load_error(tmp_path, capsys):
    import json

    from shiva_export.models.base import load_transformer
    from shiva_export.recipe import load_recipe

    load_transformer(recipe=load_recipe("sd35-tiny")).save_pretrained(tmp_path / "w")
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (tmp_path / "w" / "config.json").write_text(json.dumps(cfg))
    code = main(
        [
            "onnx",
            "--model",
            "sd35-tiny",
            "--weights",
            str(tmp_path / "w"),
            "--no-validate",
            "--out",
            str(tmp_path / "o" / "m.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert code in (1, 2) and "UNet2DConditionModel" in err and "Traceback" not in err, err


def assert_clean_refusal(name: str, got: int, code: int, needle: str, out: Path, capsys) -> None:
    """A corpus row's contract: the exit code, one clean error line naming ``needle``, no traceback or leaked
    warning, and no file left under ``out``."""
    stdout, err = capsys.readouterr()
    assert got == code, f"{name}: exit {got}, expected {code}\n{err}"
    assert "Traceback" not in err and "Traceback" not in stdout, err
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    usage = "Invalid value" in err or "No such option" in err or "Missing" in err or "Usage:" in err
    assert len(errors) == 1 or (code == 2 and usage and not errors), f"{name}: not one clean line:\n{err}"
    assert needle.lower() in err.lower(), f"{name}: {needle!r} not in\n{err}"
    for bad in ("Warning:", "warn(", "UserWarning", "FutureWarning"):
        assert bad not in err, f"{name}: leaked warning\n{err}"
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not left, f"{name}: left files {left}"
