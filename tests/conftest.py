"""Markers and auto-skips: gpu / trt / trt_rtx tests skip cleanly when the backend or hardware is absent."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
if os.environ.get(
    "PYTEST_XDIST_WORKER"
):  # two workers on two cores: one torch/BLAS thread each (and in the CLIs they start)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
if "SHIVA_CACHE_DIR" not in os.environ:  # embedded pipelines are built into a per-session folder, not ~/.cache
    import tempfile

    os.environ["SHIVA_CACHE_DIR"] = tempfile.mkdtemp(prefix="shiva-test-cache-")
if "SHIVA_TEST_SHARED" not in os.environ:  # tests/shared.py: exports, engines and a training made once per session
    import tempfile

    os.environ["SHIVA_TEST_SHARED"] = tempfile.mkdtemp(prefix="shiva-test-shared-")
if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker its own shared exports (two workers never write one file)
    _own = os.path.join(os.environ["SHIVA_TEST_SHARED"], os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(_own, exist_ok=True)
    os.environ["SHIVA_TEST_SHARED"] = _own


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skips = {
        "gpu": (not _cuda(), "needs a CUDA GPU"),
        "trt": (not _has("tensorrt"), "needs the tensorrt module"),
        "trt_rtx": (
            not _has("tensorrt_rtx"),
            "needs the tensorrt_rtx module (pip install tensorrt-rtx-cu12==1.7.1.116)",
        ),
        "slow": (os.environ.get("SHIVA_SLOW", "0") in ("", "0"), "slow; set SHIVA_SLOW=1"),
    }
    for item in items:
        for mark, (skip, why) in skips.items():
            if skip and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))
        # `--dist loadgroup` sends each group to one xdist worker whole: a file is its own group (module fixtures
        # run once), unless it names a shared one (tests/shared.py: files that reuse the same session exports).
        group = getattr(item.module, "XDIST_GROUP", None) or item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


# diffusers binds its StreamHandler to sys.stderr on first use; do that now (the session-wide stream)
# rather than inside a test whose capsys stream is closed afterwards ("I/O operation on closed file").
import diffusers.utils.logging as _dlog  # noqa: E402

_dlog.get_logger("diffusers")
