"""Tiny, complete diffusers pipelines for embedded recipes, built offline and cached.

Embedded recipes (``[model] source = "embedded"``) have a seeded random transformer and no checkpoint.
:func:`build_embedded_pipeline` puts the rest of the architecture's pipeline around it, from nothing on disk
and with no network; *which* components is the adapter's fact (``ModelAdapter.embedded_pipeline``), built
from the seeded builders of :mod:`shiva_export.models.components` (which also documents how SD3's are sized):

============  =========================  =============================================================
recipe        pipeline                   components
============  =========================  =============================================================
sd3 / sd35    StableDiffusion3Pipeline   CLIP x2 (with projection) + T5 (unless ``[pipeline] t5 =
                                         false``), 16-channel VAE, flow matching (``scheduler_shift``)
flux          FluxPipeline               CLIP (pooled output = ``pooled_projection_dim``) + T5
                                         (``joint_attention_dim``), ``in_channels / 4``-channel VAE
                                         (Flux scaling/shift), flow matching with dynamic shifting
pixart        PixArtSigmaPipeline        T5 (``caption_channels``), 4-channel VAE (SDXL scaling, quant
                                         convs), DPM-Solver++
dit           DiTPipeline                no text encoder: 4-channel VAE (SD scaling), DDIM, ``id2label``
                                         (written into ``model_index.json``: ``save_pretrained`` drops it)
============  =========================  =============================================================

All weights are seeded with ``[pipeline] seed`` (the transformer with ``[model] seed``), so the build is
deterministic. :func:`ensure_embedded_pipeline` saves it once with ``save_pretrained`` under the cache folder
(``$SHIVA_CACHE_DIR`` or ``~/.cache/shiva-export``) and :func:`load_embedded_pipeline` reloads it with
``from_pretrained(local_files_only=True)``, the same code path as a real checkpoint.

Pitfalls handled here: a pipeline saved without T5 reloads only when ``text_encoder_3=None,
tokenizer_3=None`` are passed again; ``from_pretrained(transformer=obj)`` with a wrapper logs "Expected
types for transformer" and importing the pipeline logs "SiglipImageProcessor requires torchvision": both
are silenced (library loggers set to error around the calls). Bit-identity holds within one loaded
pipeline; a built and a reloaded pipeline may differ by float rounding (safetensors tensor alignment).

torch, diffusers and transformers are imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from shiva_export.errors import OutputPathError, RecipeError
from shiva_export.models import adapter_for_architecture, load_transformer
from shiva_export.utils.io import canonical_json, sha256_bytes, sha256_file_cached, sweep_stale_temps, temp_prefix

__all__ = [
    "build_embedded_pipeline",
    "embedded_pipeline_dir",
    "ensure_embedded_pipeline",
    "load_embedded_pipeline",
    "saved_none_components",
]

_BUILDER_VERSION = 1
_STAMP = "shiva_pipeline.json"


# ----------------------------------------------------------------------------------------------- helpers


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("diffusers", "transformers", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def _check_embedded(recipe) -> None:
    if recipe.model.source != "embedded":
        raise RecipeError(
            f"Embedded pipeline requested for recipe {recipe.name!r}: model.source = {recipe.model.source!r}. "
            "Only recipes with source = 'embedded' are built offline; load hub pipelines from their repo id."
        )
    _adapter(recipe).check_embedded_recipe(recipe)  # e.g. SD3: RecipeError when text_len <= clip_max_length


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers and transformers loggers at error, progress bars off and Python warnings ignored, restored after."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    d_bar, t_bar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bar:
            dlog.enable_progress_bar()
        if t_bar:
            tlog.enable_progress_bar()


def saved_none_components(folder: Path) -> dict[str, None]:
    """Components saved as ``[null, null]`` (e.g. SD3 without T5): ``from_pretrained`` reloads the folder only
    when they are passed as None again."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}


# ------------------------------------------------------------------------------------------- tokenizers


# ------------------------------------------------------------------------------------------- components


# ---------------------------------------------------------------------------------------------- public


def _adapter(recipe):
    return adapter_for_architecture(recipe.architecture)


def build_embedded_pipeline(recipe):
    """Builds the tiny pipeline of an embedded recipe in memory, offline and deterministically.

    The components are the architecture adapter's (:meth:`~shiva_export.models.base.ModelAdapter.embedded_pipeline`),
    assembled from the builders of this module, every one seeded from ``[pipeline] seed``.

    Args:
        recipe (Recipe): A recipe with ``[model] source = "embedded"``.

    Returns:
        DiffusionPipeline: The adapter's ``PIPELINE_CLASS`` (``StableDiffusion3Pipeline``, ``FluxPipeline``,
        ``PixArtSigmaPipeline``, ``DiTPipeline``) around the seeded transformer.
    """
    _check_embedded(recipe)
    adapter = _adapter(recipe)
    adapter.pipeline_class()  # one line when the architecture has no pipeline
    with _quiet_libraries():
        transformer = load_transformer(recipe=recipe)
        return adapter.embedded_pipeline(transformer, recipe)


def _cache_key(recipe) -> str:
    payload = {
        "architecture": recipe.architecture,
        "model": recipe.model.model_dump(mode="json"),
        "pipeline": recipe.pipeline.model_dump(mode="json"),
        "text_len": recipe.shapes.text_len,
        "builder_version": _BUILDER_VERSION,
        "versions": _versions(),
    }
    return sha256_bytes(canonical_json(payload).encode())


def _cache_root() -> Path:
    env = os.environ.get("SHIVA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shiva-export"


def embedded_pipeline_dir(recipe) -> Path:
    """The cache folder of a recipe's embedded pipeline: ``<cache>/pipelines/<name>-<sha12>``.

    ``<cache>`` is ``$SHIVA_CACHE_DIR`` or ``~/.cache/shiva-export``; ``sha12`` hashes everything the build
    depends on (the architecture, ``[model]``, ``[pipeline]``, ``shapes.text_len``, the builder and library versions).
    """
    return _cache_root() / "pipelines" / f"{recipe.name}-{_cache_key(recipe)[:12]}"


def _is_complete(folder: Path, key: str) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(stamp, dict) and stamp.get("key") == key and (folder / "model_index.json").is_file()):
        return False
    return _digests(folder) == stamp.get("files")  # reused by content: an edited weight file means a rebuild


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a saved pipeline but its stamp (memoised on size, mtime, ctime and inode)."""
    return {
        str(f.relative_to(folder)): sha256_file_cached(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != _STAMP
    }


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def ensure_embedded_pipeline(recipe) -> Path:
    """Returns the cached pipeline folder of an embedded recipe, building and saving it first if needed.

    The build is saved into a temporary sibling folder, stamped (``shiva_pipeline.json``) and moved into
    place with :func:`os.replace`, so a crash never leaves a folder that looks complete. If another
    process finishes first, its folder is kept and this one discarded.
    """
    _check_embedded(recipe)
    key = _cache_key(recipe)
    final = embedded_pipeline_dir(recipe)
    if _is_complete(final, key):
        return final
    parent = final.parent
    fix = "Set SHIVA_CACHE_DIR to a writable folder."
    try:
        parent.mkdir(parents=True, exist_ok=True)

        sweep_stale_temps(parent)  # half-built pipelines of killed runs
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name + "."), suffix=".tmp", dir=parent))
    except OSError as err:
        raise OutputPathError(
            f"Cannot create the pipeline cache folder: {parent} ({err.strerror or err}). {fix}"
        ) from None
    try:
        pipe = build_embedded_pipeline(recipe)
        with _quiet_libraries():
            pipe.save_pretrained(tmp, safe_serialization=True)
        index_extras = _adapter(recipe).pipeline_index_extras(pipe)
        if index_extras:  # e.g. DiT's id2label, which DiTPipeline takes at __init__ but save_pretrained does not write
            index = json.loads((tmp / "model_index.json").read_text())
            index.update(index_extras)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        stamp = {
            "recipe": recipe.name,
            "key": key,
            "versions": _versions(),
            "builder_version": _BUILDER_VERSION,
            "files": _digests(tmp),
        }
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        if final.exists() and not _is_complete(final, key):  # stale or half-broken: move aside, then drop
            trash = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name + "."), suffix=".old", dir=parent))
            try:
                os.replace(final, trash / "old")
            except FileNotFoundError:
                pass
            _remove(trash)
        try:
            os.replace(tmp, final)
        except OSError:
            if _is_complete(final, key):  # another process won the race
                _remove(tmp)
                return final
            raise
    except OSError as err:
        _remove(tmp)
        raise OutputPathError(
            f"Cannot write the pipeline cache folder: {final} ({err.strerror or err}). {fix}"
        ) from None
    except BaseException:
        _remove(tmp)
        raise
    return final


def load_embedded_pipeline(recipe, *, transformer=None, torch_dtype=None):
    """Loads an embedded recipe's pipeline from its cache folder (building it once), offline.

    Args:
        recipe (Recipe): A recipe with ``[model] source = "embedded"``.
        transformer (ModelMixin): A transformer to use instead of the saved one (e.g. an ONNX Runtime or
            TensorRT wrapper); passed into ``from_pretrained`` so the default size follows its config.
            Defaults to None (the saved seeded transformer).
        torch_dtype (torch.dtype): Load dtype. Defaults to None (fp32).

    Returns:
        StableDiffusion3Pipeline: Call it with ``max_sequence_length=recipe.max_sequence_length()``.
    """
    folder = ensure_embedded_pipeline(recipe)
    adapter = _adapter(recipe)
    pipe_cls = adapter.pipeline_class()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if transformer is not None:
        kwargs["transformer"] = transformer
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    kwargs.update(saved_none_components(folder))
    with _quiet_libraries():
        return pipe_cls.from_pretrained(str(folder), **kwargs)
