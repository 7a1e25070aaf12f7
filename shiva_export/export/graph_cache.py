"""What determines an exported graph, and a cache of traced graphs keyed by it.

:func:`export_key_for` is everything that determines a pruned model's ONNX, known before exporting (the recipe,
the weights' content, the router, the budget, shapes, dtype, opset, tool versions). The engine cache keys its
manifests on it, and the export keys its trace cache on it.

The trace cache (``$SHIVA_CACHE_DIR/onnx/<sha>/``) keeps the exporter's raw output (the graph before
``shiva.*`` metadata is stamped on it, plus its external data), so a second export of the same graph (``trt``
after ``onnx``, ``validate parity`` after ``trt``, the runtime after either) copies it instead of tracing
again: a trace takes seconds for a tiny model and minutes for a real one. Trust:

- the key holds the export key, a digest of this package's own source, the exporter's versions and every
  trace input (names, shapes, dtypes, opset, dynamic axes, the weights' path: lazy or loaded), so any change
  that could change the graph changes the key;
- an entry is reused only when its stored key equals the asked one and every file still has the sha256 it
  was stored with (a tampered or truncated entry is traced again and replaced);
- an entry is stored only after its export committed (so a graph the checker rejected is never kept), in a
  temporary folder moved into place whole;
- the graph is copied out (the export stamps it), its external data hard-linked where the file system
  allows (never written in place: exports replace files), else copied.

``SHIVA_ONNX_CACHE=0`` (or ``export_pruned(trace_cache=False)``) traces every time. Hub-id weights are never
cached: their content is not known before loading.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from shiva_export._version import __version__
from shiva_export.errors import ConfigError
from shiva_export.logging import get_logger
from shiva_export.recipe import Recipe, recipe_hash
from shiva_export.utils.io import (
    cache_root,
    canonical_json,
    sha256_bytes,
    sha256_file,
    sha256_file_cached,
    sweep_stale_temps,
    temp_prefix,
)

__all__ = ["GraphCache", "export_key_for", "source_digest", "trace_cache_enabled", "weights_fingerprint"]

logger = get_logger(__name__)

_KEY_FILE = "key.json"
_FORMAT = "shiva-trace-cache/1"


def weights_fingerprint(recipe: Recipe, weights: str | os.PathLike | None) -> dict[str, Any]:
    """Cheap identity of the transformer weights, without loading them.

    Embedded models: their config + seed. Local folders: every weight/config file's name, size and
    content sha256 (:func:`~shiva_export.utils.io.sha256_file_cached`: hashed once, re-hashed whenever the
    file changes, even at the same size and mtime). Hub ids: the repo id (a local snapshot is resolved by
    diffusers).
    """
    if weights is None and recipe.model.source == "local":
        weights = recipe.local_model_path()
    if weights is None:
        if recipe.model.source == "embedded":
            return {"embedded": recipe.model.config, "seed": recipe.model.seed}
        return {"hub": recipe.model.repo_id, "subfolder": recipe.model.subfolder}
    root = Path(weights).expanduser().resolve()
    files = []
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
                files.append([str(p.relative_to(root)), p.stat().st_size, sha256_file_cached(p)])
    return {"folder": str(root), "files": files}


def export_key_for(
    recipe: Recipe,
    weights: str | os.PathLike | None,
    router: str | os.PathLike | None,
    ratio: float,
    dense: bool,
    shapes: dict[str, Any],
    dtype: str,
    opset: int,
    dynamic_batch: bool,
    context: str = "drop",
    loras=None,
    controlnet_layers: int = 0,
) -> dict[str, Any]:
    """Everything that determines the exported ONNX, known before exporting. ``context`` (the routing's
    ``ShivaConfig.context``) enters the key only when not ``"drop"``, and ``loras`` (each LoRA's sha256 and scale)
    only when given, so keys made before these options stay valid."""
    import importlib.metadata as md

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    router_id: Any
    if dense:
        router_id = None
    elif router is not None:
        router_id = {"file_sha256": sha256_file(router)}
    elif recipe.router_weights_path() is not None:
        router_id = {"file_sha256": sha256_file(recipe.router_weights_path())}
    else:
        router_id = {"random_seed": recipe.router.seed}
    key = {
        "recipe_sha256": recipe_hash(recipe),
        "weights": weights_fingerprint(recipe, weights),
        "router": router_id,
        "ratio": ratio,
        "dense": dense,
        "shapes": shapes,
        "dtype": dtype,
        "opset": opset,
        "dynamic_batch": dynamic_batch,
        "versions": {
            "shiva-export": __version__,
            "torch": ver("torch"),
            "diffusers": ver("diffusers"),
            "onnx": ver("onnx"),
        },
    }
    if context != "drop" and not dense:
        key["context"] = context
    if loras:
        key["loras"] = [lo.to_dict() for lo in loras]
    if controlnet_layers:
        key["controlnet_layers"] = int(controlnet_layers)
    return key


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """:func:`tree_digest` of this package: a graph traced by other code is another graph, whatever the version
    number says."""
    return tree_digest(Path(__file__).resolve().parents[1])


def tree_digest(root: Path) -> str:
    """sha256 over every ``*.py`` under ``root``, each by its relative path and content."""
    lines = [f"{p.relative_to(root)} {sha256_file(p)}" for p in sorted(root.rglob("*.py"))]
    return sha256_bytes("\n".join(lines).encode())


def trace_cache_enabled() -> bool:
    """False when ``SHIVA_ONNX_CACHE`` is ``0``/``off``/``false``/``no`` (every export traces), True when unset or
    ``1``/``on``/``true``/``yes``; any other value is refused (ConfigError), never read as either."""
    raw = os.environ.get("SHIVA_ONNX_CACHE", "1")
    value = raw.strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes", ""):
        return True
    raise ConfigError(f"SHIVA_ONNX_CACHE={raw!r} is not a switch; set it to 0 (trace every export) or 1 (the default).")


class GraphCache:
    """One key's entry in the trace cache: :meth:`fetch` copies a verified entry out, :meth:`stage` and
    :meth:`commit` store a fresh trace. Never raises for the cache's own sake: an unusable cache only costs a trace."""

    def __init__(self, key: dict[str, Any], data_names: tuple[str, ...] = (), root: Path | None = None):
        self.key = {"format": _FORMAT, **key}
        self.files = ("graph", *data_names)  # what an entry of this key holds (beside key.json), and all it may hold
        self.key_sha256 = sha256_bytes(canonical_json(self.key).encode())
        self.root = (root or cache_root()) / "onnx"
        self.entry = self.root / self.key_sha256[:32]
        self._staged: Path | None = None

    def fetch(self, dest_onnx: Path) -> bool:
        """Copies the entry's graph to ``dest_onnx`` (external data beside it) when the entry exists, holds this key
        and every file still has its stored sha256; False otherwise (nothing written)."""
        files = self._verified_files()
        if files is None:
            return False
        written = []
        try:
            for name in files:
                target = dest_onnx if name == "graph" else dest_onnx.parent / name
                _link_or_copy(self.entry / name, target, link=name != "graph")
                written.append(target)
        except OSError as err:
            logger.debug("trace cache %s: could not copy out (%s); tracing", self.entry.name, err)
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            return False
        logger.debug("trace cache hit %s", self.entry.name)
        return True

    def stage(self, traced_onnx: Path, data_files: list[Path]) -> None:
        """Puts a copy of a fresh trace (graph, external data) aside in a temporary folder of the cache; :meth:`commit`
        moves it into place, :meth:`discard` drops it."""
        if sorted(["graph", *(f.name for f in data_files)]) != sorted(self.files):
            logger.debug("trace cache: %s wrote other files than its key names; not stored", traced_onnx)
            return  # an entry it could never reuse
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            sweep_stale_temps(self.root)
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix("trace-"), dir=self.root))
            _link_or_copy(traced_onnx, tmp / "graph", link=False)
            for f in data_files:
                _link_or_copy(f, tmp / f.name, link=True)
            digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / _KEY_FILE).write_text(json.dumps({"key": self.key, "files": digests}, indent=2, sort_keys=True))
            self._staged = tmp
        except OSError as err:
            logger.debug("trace cache: could not stage %s (%s)", traced_onnx, err)
            self.discard()

    def commit(self) -> None:
        """Moves the staged entry into place (replacing an entry that failed verification); keeps a valid entry
        another process stored first."""
        tmp, self._staged = self._staged, None
        if tmp is None:
            return
        try:
            if self.entry.exists():
                if self._verified_files() is not None:
                    return
                shutil.rmtree(self.entry)
            os.replace(tmp, self.entry)
        except OSError as err:
            logger.debug("trace cache: could not store %s (%s)", self.entry.name, err)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def discard(self) -> None:
        tmp, self._staged = self._staged, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _verified_files(self) -> tuple[str, ...] | None:
        """The entry's files (``graph`` first) when its key.json holds this key and exactly this key's files, each a
        regular file with its stored sha256; else None. Never opens anything but a regular file (a FIFO would block)."""
        try:
            stored = _small_json(self.entry / _KEY_FILE)
            if not isinstance(stored, dict) or set(stored) != {"key", "files"} or not isinstance(stored["files"], dict):
                return None
            if canonical_json(stored["key"]) != canonical_json(self.key) or sorted(stored["files"]) != sorted(
                self.files
            ):
                return None
            for name in self.files:
                path = self.entry / name
                if not _regular(path) or sha256_file_cached(path) != stored["files"][name]:
                    logger.debug("trace cache %s: %s changed; tracing again", self.entry.name, name)
                    return None
        except (OSError, ValueError, TypeError):
            return None
        return self.files


_MAX_KEY_BYTES = 1 << 20


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _small_json(path: Path) -> Any:
    """A regular file's JSON, refused (ValueError) above 1 MiB."""
    if not _regular(path) or path.stat().st_size > _MAX_KEY_BYTES:
        raise ValueError(f"{path.name} is not a small regular file")
    return json.loads(path.read_text())


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    """Hard-links ``src`` to ``dst`` (external data, never written in place) where allowed, else copies it."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)
