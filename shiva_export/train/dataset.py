"""Real training data: ``shiva-export train-data`` encodes prompts (and images) with the pipeline's own
encoders into sharded safetensors; :mod:`shiva_export.train.cached` reads them back lazily.

:func:`encode_train_data` loads the model's real diffusers pipeline (the same loading code as ``generate``:
embedded tiny pipeline, local folder, or a hub id from the offline cache; the transformer is not loaded)
and stores what the architecture's adapter says a cached sample is (``ModelAdapter.CACHE_TEXT_INPUTS``,
``encode_text_cache``, ``encode_latent_cache``): each prompt's text conditioning as the pipeline encodes it
(SD3: CLIP x2 + T5 -> ``prompt_embeds [T, J]``, ``pooled [P]``; Flux: T5 + pooled CLIP; PixArt: T5 and its
mask; DiT: the class id) and, with images, their clean latents in the transformer's input layout (VAE
posterior mean, ``(mean - shift_factor) * scaling_factor``, the scaling the pipeline inverts before
decoding; Flux packs them 2 x 2). It also encodes the null prompt ``""`` once, exactly as the pipeline
encodes the unconditional half of classifier-free guidance (DiT: the null class), into ``null.safetensors``.

Layout of an output folder (written into a temporary sibling folder and moved into place whole, so a
crash never leaves a folder that looks complete)::

    manifest.json             format, model, architecture, recipe sha256, pipeline component sha256s,
                              versions, shapes, dtype, counts, the null entry's and every shard's bytes + sha256
    null.safetensors          the text tensors of encode_prompt("")   (SD3: prompt_embeds [T, J], pooled [P])
    shard-00000.safetensors   latents [n, ...] (with images) and the text tensors [n, ...]
    ...

Example:
    >>> encode_train_data("sd35-tiny", prompts=["a red cube", "a blue ball"], out="data/tiny")
    >>> data = ShardedLatents("data/tiny", seed=0)   # shiva_export.train.cached
    >>> b = data.batch(4, caption_dropout=0.1, cfg_pairs=True)   # 8 rows: [uncond; cond]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shiva_export._version import __version__
from shiva_export.errors import ConfigError, HardwareError, MissingDependencyError, ModelNotFoundError, OutputPathError
from shiva_export.logging import get_logger
from shiva_export.models import VAE_SCALE, InputSpec, adapter_for_architecture
from shiva_export.recipe import recipe_hash
from shiva_export.runtime.pipeline import config_obj, generation_recipe, quiet_libraries
from shiva_export.utils.io import (
    atomic_write_json,
    canonical_json,
    sha256_bytes,
    sha256_file_cached,
    sweep_stale_temps,
    temp_prefix,
)

__all__ = [
    "MANIFEST_NAME",
    "NULL_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "DataRecord",
    "TrainDataResult",
    "encode_train_data",
    "read_prompt_file",
    "image_records",
    "dataset_records",
]

logger = get_logger(__name__)

MANIFEST_NAME = "manifest.json"
NULL_NAME = "null.safetensors"
FORMAT = "shiva-train-data"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_PIPELINE_COMPONENTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
)


# ------------------------------------------------------------------------------------------- sources
@dataclass
class DataRecord:
    """One sample to encode: a prompt and, optionally, an image (path, PIL image, or a callable returning one)."""

    prompt: str
    image: Any = None  # a path, a PIL image, a zero-argument loader, or None
    name: str = ""


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line; blank lines and ``#`` comments skipped (as ``generate --prompts``).

    Raises:
        ConfigError: The file is missing, not UTF-8 text, or holds no prompt.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--prompts {p} is not a file. Pass a UTF-8 text file with one prompt per line.")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"--prompts {p} cannot be read as UTF-8 text ({err.__class__.__name__}). Save it as UTF-8, one prompt per line."
        ) from None
    if "\x00" in raw:
        raise ConfigError(
            f"--prompts {p} holds NUL bytes, so it is not a text file. Pass a UTF-8 text file with one prompt per line."
        )
    out = [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise ConfigError(f"--prompts {p} holds no prompt (only blank lines or # comments). Write one prompt per line.")
    return out


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(
            f"--images {folder} is not a folder. Pass a folder of {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images."
        )
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ConfigError(
            f"--images {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}). Add images or drop --images."
        )
    return files


def image_records(
    folder: str | os.PathLike, prompts: Sequence[str] | None = None, prompts_source: str | os.PathLike | None = None
) -> list[DataRecord]:
    """Image/caption pairs of a folder: with ``prompts``, the i-th prompt captions the i-th image in file-name
    order (counts must match); without, each image's caption is the text file beside it (``cat.png`` ->
    ``cat.txt``). ``prompts_source`` (the prompt file) is only named in the count-mismatch message.

    Raises:
        ConfigError: Not a folder, no image, a count mismatch, or a missing/empty caption file.
    """
    folder = Path(folder).expanduser()
    files = _image_files(folder)
    if prompts is not None:
        if len(prompts) != len(files):
            raise ConfigError(
                f"--images {folder} holds {len(files)} images but --prompts{' ' + str(prompts_source) if prompts_source else ''} has {len(prompts)} prompts; expected one prompt per image "
                "(paired in file-name order). Fix the counts, or drop --prompts and put a caption file beside each image (cat.png -> cat.txt)."
            )
        return [DataRecord(pr, f, f.name) for pr, f in zip(prompts, files)]
    out = []
    for f in files:
        cap = f.with_suffix(".txt")
        try:
            text = cap.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if not text:
            raise ConfigError(
                f"image {f} has no caption: {cap} is missing, empty or not UTF-8. Write its caption there, or pass --prompts FILE (one line per image)."
            )
        out.append(DataRecord(text, f, f.name))
    return out


def dataset_records(
    name: str, split: str = "train", prompt_column: str | None = None, image_column: str | None = None
) -> list[DataRecord]:
    """Records of a Hugging Face ``datasets`` dataset, from the local cache only (never downloads).

    ``prompt_column`` defaults to the first of ``prompt``, ``text``, ``caption`` the dataset has; images
    are read only from an explicit ``image_column``.

    Raises:
        MissingDependencyError: ``datasets`` is not installed.
        ModelNotFoundError: The dataset or split is not in the local cache.
        ConfigError: A named column is missing.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError(
            f"--dataset {name} needs the 'datasets' package, which cannot be imported ({err}). Install it (pip install datasets) or pass --prompts FILE."
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "not cached"
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ModelNotFoundError(
            f"--dataset {name} (split {split!r}) cannot be loaded offline ({reason}). Download it into the datasets cache elsewhere, or pass --prompts FILE."
        ) from None
    cols = list(getattr(ds, "column_names", []) or [])
    if prompt_column is None:
        prompt_column = next((c for c in ("prompt", "text", "caption") if c in cols), None)
        if prompt_column is None:
            raise ConfigError(
                f"--dataset {name} has no prompt, text or caption column (columns: {cols}). Pass --prompt-column NAME."
            )
    for flag, col in (("--prompt-column", prompt_column), ("--image-column", image_column)):
        if col is not None and col not in cols:
            raise ConfigError(
                f"{flag} {col!r} is not a column of --dataset {name} (columns: {cols}). Pick one of those."
            )
    out = []
    for i, text in enumerate(ds[prompt_column]):  # the text column only: images are decoded one batch at a time
        if not isinstance(text, str):
            raise ConfigError(
                f"--dataset {name} row {i}: column {prompt_column!r} is a {type(text).__name__}, not text. Pass --prompt-column of a text column."
            )
        image = _RowImage(ds, i, image_column) if image_column else None
        out.append(DataRecord(text.strip(), image, f"{name}[{i}]"))
    if not out:
        raise ConfigError(f"--dataset {name} split {split!r} is empty. Pick another --split.")
    return out


@dataclass(frozen=True)
class _RowImage:
    """A dataset row's image, read when the encoder reaches it (a dataset's images never sit in RAM together)."""

    ds: Any
    row: int
    column: str

    def __call__(self):
        return self.ds[self.row][self.column]


# ------------------------------------------------------------------------------------------ encoding
@dataclass
class TrainDataResult:
    """What :func:`encode_train_data` wrote."""

    out_dir: Path
    manifest: dict[str, Any]
    seconds: float
    encode_seconds: float
    load_seconds: float

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "out_dir": str(self.out_dir),
            "manifest": str(self.out_dir / MANIFEST_NAME),
            "model": m["model"],
            "samples": m["samples"],
            "truncated_prompts": m.get("truncated_prompts", 0),
            "shards": len(m["shards"]),
            "has_latents": m["has_latents"],
            "shapes": m["shapes"],
            "dtype": m["dtype"],
            "bytes": sum(s["bytes"] for s in m["shards"]),
            "seconds": round(self.seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "encode_seconds": round(self.encode_seconds, 3),
            "samples_per_second": round(m["samples"] / self.encode_seconds, 3) if self.encode_seconds > 0 else None,
        }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)

    out["shiva-export"] = __version__
    return out


def _component_digests(location: str, is_local: bool) -> dict[str, str | None]:
    """sha256 per pipeline component folder: the hash of ``{relative path: file sha256}`` of its files."""
    root: Path | None = Path(location) if is_local else None
    if root is None:
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(location, local_files_only=True))
        except Exception:  # noqa: BLE001 - no local snapshot: record no digests
            return {}
    out: dict[str, str | None] = {}
    for comp in _PIPELINE_COMPONENTS:
        d = root / comp
        if not d.is_dir():
            continue
        files = {str(f.relative_to(d)): sha256_file_cached(f) for f in sorted(d.rglob("*")) if f.is_file()}
        out[comp] = sha256_bytes(canonical_json(files).encode())
    return out


def _load_image(img: Any, where: str):
    """RGB PIL image of a path, a PIL image, a ``datasets`` image dict (``bytes``/``path``) or a loader."""
    import io

    from PIL import Image, UnidentifiedImageError

    if callable(img):
        img = img()
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, dict):  # datasets Image(decode=False)
        img = io.BytesIO(img["bytes"]) if img.get("bytes") else img.get("path")
    if img is None:
        raise ConfigError(f"image {where} is empty. Remove the row or pick another --image-column.")
    try:
        with Image.open(img) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as err:
        raise ConfigError(
            f"cannot read image {where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. Remove or re-save it."
        ) from None


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file. Pass a folder (it is created).")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputPathError(
                f"--out {out} exists and is not empty. Pass another folder, or --overwrite to replace an earlier train-data output."
            )
        if not (out / MANIFEST_NAME).is_file():
            raise OutputPathError(
                f"--out {out} is not empty and holds no {MANIFEST_NAME}, so it is not a train-data output; refusing to replace it. Pass another folder."
            )


def encode_train_data(
    model: str | None = "sd35-tiny",
    *,
    out: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    records: Sequence[DataRecord] | None = None,
    source: dict[str, Any] | None = None,
    recipe: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    shard_size: int = 256,
    height: int | None = None,
    width: int | None = None,
    batch: int = 8,
    seed: int = 0,
    dtype: str = "fp32",
    device: str = "cpu",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    pipe=None,
) -> TrainDataResult:
    """Encodes prompts (and images) with a model's own pipeline into a sharded train-data folder.

    Args:
        model (str): Model name (``sd35-tiny``, ``flux-tiny``, ``pixart-tiny``, ``sd35``, ...). Defaults to ``sd35-tiny``.
        out (PathLike): Output folder; must not exist or be empty (or, with ``overwrite``, an earlier output).
        prompts (Sequence[str]): Prompts, text only. Give this or ``records``.
        records (Sequence): From :func:`image_records` / :func:`dataset_records` (prompt + optional image).
        source (dict): What the records came from, recorded in the manifest. Defaults to None.
        recipe (PathLike): Recipe overriding the model's. Defaults to None.
        weights (PathLike): Local diffusers pipeline folder. Defaults to None (embedded, recipe path or hub cache).
        shard_size (int): Samples per shard. Defaults to 256.
        height, width (int): Image size in pixels (images are center-cropped to the aspect, then resized).
            Default to the recipe's shapes.
        batch (int): Prompts/images per encoder call. Defaults to 8.
        seed (int): Recorded; encoding is deterministic (posterior mean, no sampling). Defaults to 0.
        dtype (str): Stored dtype, ``fp32``, ``fp16`` or ``bf16`` (encoders run in fp32). Defaults to ``fp32``.
        device (str): ``cpu`` or ``cuda``, where the encoders run. Defaults to ``cpu``.
        overwrite (bool): Replace an existing train-data folder at ``out``. Defaults to False.
        progress (Callable[[int, int], None]): Called with (done, total) after every batch. Defaults to None.
        pipe: An already loaded diffusers pipeline of this model to encode with (its ``name_or_path`` folder
            is hashed for the manifest). Defaults to None (load the model's, without
            its transformer).

    Returns:
        TrainDataResult: The output folder and its manifest.

    Raises:
        ConfigError: Bad sizes, counts, images, or an architecture whose adapter declares no cached layout.
        OutputPathError: ``out`` exists and is not replaceable, or cannot be written.
    """
    t_start = time.perf_counter()
    recs = _check_encode_args(prompts, records, shard_size, batch, dtype, device)
    out = Path(out).expanduser()
    _prepare_out(out, overwrite)
    rec = generation_recipe(model, recipe)
    h = rec.shapes.height if height is None else int(height)
    w = rec.shapes.width if width is None else int(width)
    with_images = any(r.image is not None for r in recs)
    if with_images and not all(r.image is not None for r in recs):
        raise ConfigError(
            "some records have an image and some do not; expected all or none. Encode text-only and image data into separate folders."
        )
    enc = _Encoder.open(rec, weights, pipe, h, w, device)
    load_seconds = time.perf_counter() - t_start
    if progress is not None:
        progress(0, len(recs))
    parent, tmp = _temp_folder(out)
    try:
        t_enc = time.perf_counter()
        writer = _ShardWriter(
            tmp, _DTYPES[dtype], {"format": FORMAT, "model": rec.name}, shard_size, enc.adapter.CACHE_TEXT_INPUTS
        )
        null_info = _encode_records(enc, writer, recs, batch, with_images, progress)
        encode_seconds = time.perf_counter() - t_enc
        manifest = _manifest(rec, enc, writer, null_info, len(recs), with_images, source, seed, t_start)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        _commit(tmp, out, parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d samples in %d shards to %s", len(recs), len(writer.shards), out)
    return TrainDataResult(out, manifest, time.perf_counter() - t_start, encode_seconds, load_seconds)


def _check_encode_args(prompts, records, shard_size: int, batch: int, dtype: str, device: str) -> list[DataRecord]:
    """The records to encode, once the sizes, dtype and device are known to be valid."""
    if (prompts is None) == (records is None):
        raise ConfigError("give prompts or records (exactly one) to encode_train_data.")
    recs = [DataRecord(p) for p in prompts] if prompts is not None else list(records)
    if not recs:
        raise ConfigError("no prompt to encode. Pass at least one prompt.")
    for name, v, lo in (("--shard-size", shard_size, 1), ("--batch", batch, 1)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} {v!r} is out of range; expected an int >= {lo}.")
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is unknown; choose one of {', '.join(_DTYPES)}.")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is unknown; choose cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise HardwareError(
            "--device cuda needs a CUDA GPU, and torch sees none. Run on a GPU machine or use --device cpu."
        )
    return recs


@dataclass
class _Encoder:
    """The model's pipeline (without its transformer) and its adapter's cache encoders, at one image size."""

    pipe: Any
    adapter: Any
    tcfg: dict[str, Any]
    location: str
    local: bool
    text_len: int
    height: int
    width: int
    device: str
    text_info: dict[str, Any]
    truncated: int = 0

    @classmethod
    def open(cls, rec, weights, pipe, h: int, w: int, device: str) -> _Encoder:
        """Loads the pipeline (unless given) after checking the image size against the transformer config."""
        from shiva_export.runtime.pipeline import (  # lazy: looked up at call time (tests/test_context_kept.py patches pipeline_location)
            pipeline_from_pretrained,
            pipeline_location,
            read_transformer_config,
        )

        adapter = adapter_for_architecture(rec.architecture)
        if pipe is None:
            loc, local = pipeline_location(rec, weights)
            tcfg = read_transformer_config(loc, local, rec)
        else:
            loc = str(getattr(pipe, "name_or_path", "") or "")
            local = Path(loc).is_dir()
            tcfg = read_transformer_config(loc, local, rec) if local else dict(pipe.transformer.config)
        adapter.check_image_size(config_obj(tcfg), h, w)
        if pipe is None:
            pipe = pipeline_from_pretrained(
                loc, local, rec, transformer=None
            )  # the transformer is not needed to encode
        if device != "cpu":
            pipe.to(device)
        text_info = adapter.text_cache_info(pipe, rec.shapes.text_len)  # refuses a text length the pipeline cannot give
        return cls(pipe, adapter, tcfg, loc, local, rec.shapes.text_len, h, w, device, text_info)

    def text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out, truncated = self.adapter.encode_text_cache(
            self.pipe, config_obj(self.tcfg), texts, self.text_len, self.device
        )
        self.truncated += truncated
        return out

    def latents(self, records: list[DataRecord]) -> torch.Tensor:
        ims = [_load_image(r.image, r.name or str(r.image)) for r in records]
        processor = getattr(self.pipe, "image_processor", None)
        if processor is None:  # DiTPipeline has none: the VAE's own preprocessing ([-1, 1], resized)
            from diffusers.image_processor import VaeImageProcessor

            processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE)
        x = processor.preprocess(ims, height=self.height, width=self.width, resize_mode="crop")
        return self.adapter.encode_latent_cache(self.pipe, x)

    def latent_shape(self) -> list[int]:
        return [
            int(v)
            for v in self.adapter.cache_shapes(
                config_obj(self.tcfg), InputSpec(1, self.height, self.width, self.text_len, False)
            )["latents"]
        ]


def _temp_folder(out: Path) -> tuple[Path, Path]:
    """``(parent, temp folder)`` beside ``out``: the output is written there and moved into place whole."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(parent)  # half-written folders of killed runs (their pid is gone)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name + "."), suffix=".tmp", dir=parent))
    except OSError as err:
        raise OutputPathError(
            f"cannot create a folder beside --out {out} ({err.strerror or err}). Pass a writable --out."
        ) from None
    return parent, tmp


class _ShardWriter:
    """Samples collected into shards of ``shard_size`` (stored dtype for floats; masks and class ids as they are)."""

    def __init__(
        self, tmp: Path, store: torch.dtype, meta: dict[str, str], shard_size: int, text_inputs: dict[str, str]
    ):
        self.tmp, self.store, self.meta, self.shard_size = tmp, store, meta, shard_size
        self.text_keys = tuple(text_inputs)
        self.pending: dict[str, list[torch.Tensor]] = {"latents": [], **{k: [] for k in self.text_keys}}
        self.shards: list[dict[str, Any]] = []
        self.shapes: dict[str, list[int]] = {}

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        from safetensors.torch import save as st_save

        data = st_save(
            {k: (v.to(self.store) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
            metadata=self.meta,
        )
        path = self.tmp / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return {"file": name, "bytes": len(data), "sha256": sha256_bytes(data)}

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """One encoded batch ``{key: [n, ...]}``; a full shard is written as soon as it fills."""
        if not self.shapes:
            self.shapes = {k: list(rows[k].shape[1:]) for k in (*self.text_keys, "latents") if k in rows}
        for j in range(int(rows[self.text_keys[0]].shape[0])):
            for k, v in rows.items():
                self.pending[k].append(v[j])
            if len(self.pending[self.text_keys[0]]) == self.shard_size:
                self.flush()

    def flush(self) -> None:
        n = len(self.pending[self.text_keys[0]])
        if not n:
            return
        info = self.write(
            f"shard-{len(self.shards):05d}.safetensors", {k: torch.stack(v) for k, v in self.pending.items() if v}
        )
        info["samples"] = n
        self.shards.append(info)
        for v in self.pending.values():
            v.clear()


def _encode_records(
    enc: _Encoder, writer: _ShardWriter, recs: list[DataRecord], batch: int, with_images: bool, progress
) -> dict[str, Any]:
    """The null prompt into ``null.safetensors``, then every record in batches into shards; returns the null entry."""
    with torch.inference_mode(), quiet_libraries():  # truncation notes are counted instead (manifest, summary)
        null = enc.text([""])  # what the pipeline encodes for the uncond half of CFG
        null_info = writer.write(NULL_NAME, {k: v[0] for k, v in null.items()})
        done = 0
        for i in range(0, len(recs), batch):
            chunk = recs[i : i + batch]
            rows = enc.text([r.prompt for r in chunk])
            if with_images:
                rows["latents"] = enc.latents(chunk)
            writer.add(rows)
            done += len(chunk)
            if progress is not None:
                progress(done, len(recs))
        writer.flush()
    return null_info


def _manifest(
    rec,
    enc: _Encoder,
    writer: _ShardWriter,
    null_info: dict[str, Any],
    samples: int,
    with_images: bool,
    source,
    seed: int,
    t_start: float,
) -> dict[str, Any]:
    vae = enc.pipe.vae.config
    shift, scale = float(getattr(vae, "shift_factor", 0.0) or 0.0), float(vae.scaling_factor)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": rec.name,
        "architecture": rec.architecture,
        "recipe": str(rec.source_path),
        "recipe_sha256": recipe_hash(rec),
        "pipeline": {
            "source": enc.location,
            "local": enc.local,
            "components": _component_digests(enc.location, enc.local),
            "versions": _versions(),
        },
        "samples": samples,
        "truncated_prompts": enc.truncated,
        "has_latents": with_images,
        "latent_shape": enc.latent_shape(),
        "shapes": writer.shapes,
        "dtype": _DTYPE_NAMES[writer.store],
        "height": enc.height,
        "width": enc.width,
        "text_len": rec.shapes.text_len,
        **enc.text_info,
        "vae": {
            "shift_factor": shift,
            "scaling_factor": scale,
            "latents": "(posterior mean - shift_factor) * scaling_factor",
        }
        if with_images
        else None,
        "null": dict(null_info, prompt=""),
        "shards": writer.shards,
        "source": source or {"kind": "prompts"},
        "seed": seed,
        "seconds": round(time.perf_counter() - t_start, 3),
    }


def _commit(tmp: Path, out: Path, parent: Path) -> None:
    """Moves the finished temp folder to ``out`` (replacing an earlier output, checked by :func:`_prepare_out`)."""
    trash = None
    try:
        if out.is_dir() and any(out.iterdir()):
            trash = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name + "."), suffix=".old", dir=parent))
            os.replace(out, trash / "old")
        elif out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:
        raise OutputPathError(
            f"cannot move the finished data into --out {out} ({err.strerror or err}). Pass another --out."
        ) from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
