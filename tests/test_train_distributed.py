"""`shiva-export train` under torchrun: 2 gloo processes give the parameters of 1 process with the same
global batch (float tolerance), rank 0 writes the outputs, and a run resumes at another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ARGS = [
    "--model",
    "sd35-tiny",
    "--batch",
    "4",
    "--phases",
    "1",
    "--sampler-steps",
    "4",
    "--threads",
    "1",
    "--quiet",
    "--json",
]


def _torchrun(n: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "shiva_export",
        "train",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shiva_export", "train", *args], capture_output=True, text=True, timeout=300
    )


def _state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_gloo_processes_match_one_process(tmp_path):
    # one policy-stage step: routers, policy and the budget all get a gradient
    steps = ["--steps", "0", "--steps", "1", "--steps", "0"]
    one = _single(*ARGS, *steps, "--out-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, *ARGS, *steps, "--out-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert _max_diff(a["routers"], b["routers"]) <= 1e-5
    assert _max_diff(a["policy"], b["policy"]) <= 1e-6
    assert float(a["budget"]["mu"]) == pytest.approx(float(b["budget"]["mu"]), abs=1e-9)
    assert a["history"][0]["loss"] == pytest.approx(b["history"][0]["loss"], rel=1e-5)
    # rank 0 alone printed the summary and wrote the outputs
    summaries = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(two.stdout[two.stdout.index("{") :])["finished"]
    assert (tmp_path / "two" / "recipe.toml").is_file() and len(
        (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ) == 1


def test_resume_at_another_world_size(tmp_path):
    from shiva_export.train import TrainConfig, train

    steps = ["--steps", "2", "--steps", "1", "--steps", "0"]
    full = _single(*ARGS, *steps, "--out-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    cut = TrainConfig(
        warmup_steps=2,
        policy_steps=1,
        joint_steps=0,
        batch=4,
        phases=1,
        sampler_steps=4,
        num_threads=1,
        out_dir=tmp_path / "cut",
        stop_at_step=2,
    )
    assert not train("sd35-tiny", cut).finished  # 1 process, cut after step 2
    rest = _torchrun(2, *ARGS, *steps, "--out-dir", str(tmp_path / "cut"), "--resume")  # 2 processes finish it
    assert rest.returncode == 0, rest.stderr[-2000:]
    done, ref = _state(tmp_path / "cut"), _state(tmp_path / "full")
    assert done["step"] == 3 and [h["step"] for h in done["history"]] == [1, 2, 3]
    assert done["history"][2]["loss"] == pytest.approx(ref["history"][2]["loss"], rel=1e-4)
    # AdamW moves components whose gradient is ~0 by +-lr whatever their float noise, so a few steps
    # leave differences of the order of the learning rate (3e-4), not of float round-off
    assert _max_diff(done["routers"], ref["routers"]) <= 2e-3
    assert (tmp_path / "cut" / "recipe.toml").is_file()
