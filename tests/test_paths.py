"""Output paths come only from what the user typed: names from recipes, suites and ONNX metadata are validated."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h

from shiva_export.cli import main
from shiva_export.errors import ConfigError, OutputPathError
from shiva_export.utils.io import inside, safe_component


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "x" * 101, "a\\b", "é", None, 3])
def test_safe_component_refuses(bad):
    with pytest.raises(ConfigError, match="not a safe file name"):
        safe_component(bad, "name")


def test_inside(tmp_path):
    assert inside(tmp_path, tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(OutputPathError, match="outside its output folder"):
        inside(tmp_path / "root", tmp_path / "root" / ".." / "escape")


def test_recipe_phase_name_cannot_escape(tmp_path, capsys):
    src = (__import__("shiva_export.recipe", fromlist=["x"]).recipe_path("sd35-tiny")).read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(
        src.replace('name = "early"', 'name = "../../../tmp/evil"').replace(
            "sd35-tiny.learned/", str(tmp_path) + "/../x/"
        )
    )
    code = main(["recipe", "check", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "schedule.phases[0].name" in err and "Traceback" not in err


def test_suite_name_cannot_escape(tmp_path, capsys):
    bad = tmp_path / "s.toml"
    bad.write_text(
        'schema_version = 1\nname = "../../escape"\n[[case]]\nkind = "speed"\nmodel = "sd35-tiny"\nratios = [0.4]\n'
    )
    code = main(["validate", "suite", str(bad), "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "name" in err and "Traceback" not in err
    assert not (tmp_path.parent / "escape").exists()


def _foreign_onnx(path, meta=None):
    x = h.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", TP.FLOAT, [1, 4])
    m = h.make_model(
        h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [x], [y]), opset_imports=[h.make_opsetid("", 17)]
    )
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, path)
    return path


@pytest.mark.trt_rtx
def test_trt_refuses_a_foreign_or_escaping_onnx(tmp_path, capsys):
    out = tmp_path / "engines"
    code = main(
        [
            "trt",
            "--model",
            "sd35-tiny",
            "--onnx",
            str(_foreign_onnx(tmp_path / "f.onnx")),
            "--backend",
            "tensorrt-rtx",
            "--out-dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "carries no shiva.* metadata" in err, err
    evil = _foreign_onnx(tmp_path / "e.onnx", {"shiva.model": "../../../escaped", "shiva.input_spec": "{}"})
    code = main(
        ["trt", "--model", "sd35-tiny", "--onnx", str(evil), "--backend", "tensorrt-rtx", "--out-dir", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "not a safe file name" in err, err
    assert not (tmp_path / "escaped").exists() and not out.exists() or not any(out.rglob("*.plan"))


def test_a_killed_runs_temporaries_are_swept_and_a_live_ones_kept(tmp_path):
    import os
    import subprocess

    from shiva_export.utils.io import atomic_write_bytes, sweep_stale_temps

    dead = subprocess.run(["true"]).returncode == 0 and subprocess.Popen(["true"])
    dead.wait()
    stale_dir = tmp_path / f".shiva-tmp-{dead.pid}-export-abc"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"half")
    stale_file = tmp_path / f".shiva-tmp-{dead.pid}-model.plan.x.tmp"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".shiva-tmp-{os.getpid()}-export-live"
    live.mkdir()
    mine = tmp_path / ".my-own-dotfile"
    mine.write_text("keep")
    removed = sweep_stale_temps(tmp_path)
    assert set(removed) == {stale_dir, stale_file}
    assert live.exists() and mine.exists() and not stale_dir.exists() and not stale_file.exists()
    atomic_write_bytes(tmp_path / "x.bin", b"1")  # temp names carry the pid
    assert (tmp_path / "x.bin").read_bytes() == b"1" and not list(tmp_path.glob(".shiva-tmp-*x.bin*"))


def test_two_writers_of_one_folder_the_second_is_refused(tmp_path):
    import multiprocessing as mp

    from shiva_export.utils.io import folder_lock

    with folder_lock(tmp_path / "eng"):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_try_lock, args=(str(tmp_path / "eng"), q))
        p.start()
        p.join(60)
        msg = q.get(timeout=5)
    assert "is being written by pid" in msg and "wait for that run" in msg
    with folder_lock(tmp_path / "eng"):  # released: the next writer gets it
        pass


def _try_lock(folder, q):
    from shiva_export.errors import OutputPathError
    from shiva_export.utils.io import folder_lock

    try:
        with folder_lock(folder):
            q.put("acquired")
    except OutputPathError as e:
        q.put(str(e))
