"""Markers and auto-skips: gpu / trt / trt_rtx tests skip cleanly when the backend or hardware is absent."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path

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


_GROUP_LINE = re.compile(r"^XDIST_GROUP = shared\.(\w+)\b", re.MULTILINE)


@functools.cache
def _file_group(path: str) -> str:
    """A test file's unit of work on the xdist workers: itself, or the shared group it names with ``XDIST_GROUP``."""
    try:
        m = _GROUP_LINE.search(Path(path).read_text(encoding="utf-8"))
    except OSError:
        return path
    return f"group:{m.group(1)}" if m else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, except that the files naming one ``XDIST_GROUP`` (tests/shared.py) go to one worker
    together, which then makes their shared exports, training or runtime graphs once. (xdist's own ``loadgroup``
    cannot do this under pytest 9: it renames ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _file_group(str(config.rootpath / super()._split_scope(nodeid)))

    return GroupedFileScheduling(config, log)


# diffusers binds its StreamHandler to sys.stderr on first use; do that now (the session-wide stream)
# rather than inside a test whose capsys stream is closed afterwards ("I/O operation on closed file").
import diffusers.utils.logging as _dlog  # noqa: E402

_dlog.get_logger("diffusers")
