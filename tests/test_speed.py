"""Speed benchmark plumbing on sd3-tiny: files, JSON keys, table rows. No assertions on timings."""

from __future__ import annotations

import json

import pytest

from shiva_export.errors import ConfigError
from shiva_export.validate.speed import benchmark_speed

RATIOS = [0.0, 0.4]
BACKENDS = ["torch", "ort"]


@pytest.fixture(scope="module")
def speed(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("speed")
    stages: list[str] = []
    report = benchmark_speed(
        model="sd3-tiny",
        ratios=RATIOS,
        backends=BACKENDS,
        warmup=1,
        repeats=3,
        threads=2,
        out_dir=out,
        progress=stages.append,
    )
    return report, out, stages


def test_files_json_and_markdown(speed):
    report, out, stages = speed
    for name in ("speed.json", "speed.md", "speed.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind

    data = json.loads((out / "speed.json").read_text())
    for key in (
        "model",
        "spec",
        "num_image_tokens",
        "text_len",
        "threads",
        "machine",
        "versions",
        "rows",
        "flops",
        "method",
        "notes",
        "command",
    ):
        assert key in data, key
    assert data["model"] == "sd3-tiny" and data["num_image_tokens"] == 256 and data["repeats"] == 3
    assert data["threads"]["torch_intra_op"] == 2 and data["threads"]["ort_intra_op"] == 2
    assert data["machine"]["cpu_model"] and "torch" in data["versions"] and "onnxruntime" in data["versions"]
    rows = data["rows"]
    assert len(rows) == len(BACKENDS) * (1 + len(RATIOS))
    row_keys = {
        "backend",
        "ratio",
        "keep",
        "k",
        "median_ms",
        "p90_ms",
        "speedup",
        "ideal_speedup",
        "efficiency",
        "overhead_pct",
    }
    for row in rows:
        assert row_keys <= set(row)
        assert len(row["times_ms"]) == 3
        if row["ratio"] is not None:
            assert row["k"] == int(256 * (1 - row["ratio"]) + 1e-9) and row["overhead_pct"] is not None
            assert row["ideal_speedup"] == pytest.approx(data["flops"]["ideal_speedup"][f"{row['ratio']:.2f}"])
    assert data["flops"]["dense"]["total"] == rows[0]["flops"]

    md = (out / "speed.md").read_text()
    assert md == report.to_markdown()
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in md.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert cells[0][:2] == ["backend", "ratio"]
    seen = {(c[0], c[1]) for c in cells[1:]}
    for backend in BACKENDS:
        assert (backend, "dense") in seen
        for r in RATIOS:
            assert (backend, f"{r:.2f}") in seen
    assert stages[0] == "load model" and stages[-1] == "write report"


def test_report_api(speed):
    report, _, _ = speed
    assert report.row("ort", 0.4).k == 153
    assert report.row("torch", None).speedup == 1.0
    assert report.to_dict()["rows"][0]["backend"] == "torch"


def test_bad_arguments_are_typed():
    with pytest.raises(ConfigError, match="ratio 1.0 is out of range"):
        benchmark_speed(model="sd3-tiny", ratios=[1.0])
    with pytest.raises(ConfigError, match="backends"):
        benchmark_speed(model="sd3-tiny", backends=["tensorrt"])
    with pytest.raises(ConfigError, match="repeats"):
        benchmark_speed(model="sd3-tiny", repeats=0)
