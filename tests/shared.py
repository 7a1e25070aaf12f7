"""Session-wide cache of the suite's expensive artifacts, shared across test files.

An export of a tiny model takes 4-15 s on one core and several files need the same (model, ratio, dtype): each is
made once per session by :func:`export` (always validated, so every caller gets ORT parity) and handed out
read-only, as are its TensorRT-RTX engine (:func:`engine`) and the one short training (:func:`short_training`).
A test that writes next to its export (segments, tampering) takes its own copy with :func:`export_copy`. Built
under a per-session folder (``$SHIVA_TEST_SHARED``, set by ``tests/conftest.py``); in-process, so each pytest
process (an xdist worker too) makes its own, so the files that reuse one artifact name the same ``XDIST_GROUP``
(``EXPORTS``, ``TRAINING``, ``RUNTIME``): ``tests/conftest.py`` then sends them to one worker, which makes it once.
:func:`runtime_root` is the session's artifact root for tests that run a graph without asserting how the runtime
cache got it (the cache reuses a graph only after checking it by content).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "root",
    "export",
    "export_copy",
    "engine",
    "SHORT_TRAINING",
    "short_training",
    "runtime_root",
    "EXPORTS",
    "TRAINING",
    "RUNTIME",
]

#: xdist groups (``XDIST_GROUP`` in a test file) of the files sharing :func:`export`/:func:`engine`,
#: :func:`short_training` and :func:`runtime_root`.
EXPORTS, TRAINING, RUNTIME = "shared-exports", "shared-training", "shared-runtime"

#: Parity cases a shared export is validated with unless the caller asks otherwise (export_pruned's default).
PARITY_CASES = 3

_EXPORTS: dict[tuple, Any] = {}
_TRAININGS: dict[str, Any] = {}
_ENGINES: dict[tuple, Any] = {}

#: The one short `train` run the suite shares (router warm-up, policy and joint stages, two learned phases); a
#: checkpoint every 3 steps (and at the end) so resume tests can compare against it.
SHORT_TRAINING = dict(
    warmup_steps=4, policy_steps=2, joint_steps=2, batch=2, phases=2, lr_router=3e-3, lr_policy=1e-3, checkpoint_every=3
)


def root() -> Path:
    """This session's folder for shared artifacts."""
    path = os.environ.get("SHIVA_TEST_SHARED")
    if not path:
        path = os.environ["SHIVA_TEST_SHARED"] = tempfile.mkdtemp(prefix="shiva-test-shared-")
    return Path(path)


def runtime_root() -> Path:
    """This session's ``--artifact-root`` for tests that need the runtime's graphs but not a fresh cache: each graph
    is exported by the first test that asks for it and reused, checked by content, by the others. Tests that assert
    "exported", or that tamper with a cached graph, keep their own root."""
    path = root() / "runtime-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _label(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def _key(model: str, ratio: float, dtype: str, kw: dict[str, Any]) -> tuple:
    """The export's identity: shape options equal to the recipe's own are the default export (one key, one file)."""
    from shiva_export.recipe import load_recipe

    shapes = load_recipe(model).shapes
    kw = {
        k: v
        for k, v in kw.items()
        if not (k in ("height", "width", "batch", "text_len", "cfg") and getattr(shapes, k) == v)
    }
    return (model, float(ratio), dtype, tuple(sorted(kw.items())))


def export(model: str, ratio: float, *, dtype: str = "fp32", parity_cases: int = PARITY_CASES, **kw: Any):
    """``export_pruned(model=model, ratio=ratio, dtype=dtype, **kw)`` made once per session and validated (ORT
    parity) with at least ``parity_cases`` seeded cases; an earlier export with as many or more is reused. Do not
    write to its files (see :func:`export_copy`)."""
    from shiva_export.export.pruned import export_pruned

    key = _key(model, ratio, dtype, kw)
    hit = _EXPORTS.get(key)
    if hit is None or len(hit.parity.cases) < parity_cases:
        extra = "".join(f"-{k}{_label(v)}" for k, v in key[3])
        out = root() / "exports" / f"{model}-r{ratio}-{dtype}{extra}-p{parity_cases}" / "model.onnx"
        _EXPORTS[key] = hit = export_pruned(
            model=model, ratio=ratio, dtype=dtype, out=out, validate=True, parity_cases=parity_cases, **dict(key[3])
        )
    return hit


def export_copy(model: str, ratio: float, dest: str | os.PathLike, **kw: Any) -> Path:
    """A private copy of the shared export (graph and external weights) at ``dest`` (an ``.onnx`` path)."""
    ex = export(model, ratio, **kw).export
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ex.onnx_path, dest)
    if ex.data_path is not None:  # the graph names its data file by base name: keep that name beside the copy
        shutil.copyfile(ex.data_path, dest.parent / ex.data_path.name)
    return dest


def engine(model: str, ratio: float, **kw: Any):
    """``build_engine`` (TensorRT-RTX, ahead of time) of the shared :func:`export`, once per session (a ``BuildResult``)."""
    key = _key(model, ratio, kw.pop("dtype", "fp32"), kw)
    if key not in _ENGINES:
        from shiva_export.engines import build_engine

        ex = export(model, ratio, dtype=key[2], parity_cases=1, **dict(key[3]))  # whichever export of that key exists
        _ENGINES[key] = build_engine(
            ex.export.onnx_path, ex.export.onnx_path.parent / "model.plan", backend="tensorrt-rtx"
        )
    return _ENGINES[key]


def short_training(model: str = "sd35-tiny"):
    """``train(model, TrainConfig(**SHORT_TRAINING))`` run once per session (a ``TrainResult``; read its outputs only)."""
    if model not in _TRAININGS:
        from shiva_export.train import TrainConfig, train

        _TRAININGS[model] = train(model, TrainConfig(out_dir=root() / "train" / model, **SHORT_TRAINING))
    return _TRAININGS[model]
