"""Declarative suites in validate/: strict schema, and one command runs parity + speed cases."""

from __future__ import annotations

import json

import pytest

from shiva_export.cli import main
from shiva_export.errors import RecipeError
from shiva_export.validate.suite import available_suites, load_suite


def test_builtin_suites_load():
    assert {"cpu", "mid", "sd35m"} <= set(available_suites())
    assert {c.kind for c in load_suite("cpu").case} == {"parity", "speed"}
    assert load_suite("mid").case[-1].model == "sd3-mid"


def test_bad_suite_rejected(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('schema_version = 1\nname = "x"\n[[case]]\nkind = "parity"\nmodel = "sd3-tiny"\nratios = [1.2]\n')
    with pytest.raises(RecipeError, match=r"case\.0\.ratios\.0 is invalid"):
        load_suite(p)


def test_mini_suite_end_to_end(tmp_path, capsys):
    p = tmp_path / "mini.toml"
    p.write_text(
        'schema_version = 1\nname = "mini"\n'
        '[[case]]\nkind = "parity"\nmodel = "sd3-tiny"\nratios = [0.4]\nbackends = ["ort-cpu"]\ncases = 1\n'
        '[[case]]\nkind = "speed"\nmodel = "sd3-tiny"\nratios = [0.0, 0.4]\nbackends = ["torch", "ort"]\nwarmup = 1\nrepeats = 2\n'
    )
    out_dir = tmp_path / "reports"
    code = main(["validate", "suite", str(p), "--out-dir", str(out_dir), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["passed"] and len(summary["results"]) == 2
    assert (out_dir / "00-parity-sd3-tiny.md").read_text().strip().splitlines()[-1].startswith("PASSED | ")
    speed = out_dir / "01-speed-sd3-tiny"
    for f in ("speed.json", "speed.md", "speed.png"):
        assert (speed / f).is_file() and (speed / f).stat().st_size > 0
    assert (out_dir / "suite.json").is_file()
