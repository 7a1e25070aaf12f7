"""The README's first command, as written there: the trained sd35-shapes pipeline draws what its captions ask for,
pruned with the learned schedule, and writes the images, the grid and the record it names."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from shiva_export.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _first_command() -> list[str]:
    block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 2, "the README opens with exactly two set-up commands"
    words = shlex.split(lines[0])
    return words[words.index(".venv/bin/shiva-export") + 1 :]


def test_readme_first_command_draws_the_captioned_shapes(tmp_path, capsys):
    from PIL import Image

    from shiva_export.shapes.analyze import prompt_correct
    from shiva_export.shapes.data import parse_caption

    args = _first_command()
    assert args[:3] == ["generate", "--model", "sd35-shapes"] and "--compare-dense" in args
    args[args.index("--out") + 1] = str(tmp_path / "out")
    code = main(args)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert (
        str(tmp_path / "out" / "grid.png") in stdout and str(tmp_path / "out" / "generate.json") in stdout
    )  # the files to open
    assert (tmp_path / "out" / "grid.png").is_file() and len(record["images"]) in (2, 3)
    for im in record["images"]:
        attrs = parse_caption(im["prompt"])  # prompts of the caption set the model was trained on
        for png in (im["png"], im["dense"]["png"]):
            rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255.0
            assert prompt_correct(rgb, attrs)["all"], f"{png} does not show {im['prompt']!r}"
