"""Real training data: encode prompts (and images) with the pipeline's own encoders into sharded
safetensors, and read them back lazily.

:func:`encode_train_data` (``shiva-export train-data``) loads the model's real diffusers pipeline (the
same loading code as ``generate``: embedded tiny pipeline, local folder, or a hub id from the offline
cache; the transformer is not loaded), encodes each prompt with ``pipe.encode_prompt`` (SD3: CLIP x2 +
T5 -> ``prompt_embeds [T, J]``, ``pooled [P]``) and, with images, encodes them with the pipeline's VAE
into ``latents [C, H/8, W/8] = (mean - shift_factor) * scaling_factor``, the scaling the SD3 pipeline
inverts before decoding. It also encodes the null prompt ``""`` once, exactly as the pipeline encodes the
unconditional half of classifier-free guidance, into ``null.safetensors``.

Layout of an output folder (written into a temporary sibling folder and moved into place whole, so a
crash never leaves a folder that looks complete)::

    manifest.json             format, model, recipe sha256, pipeline component sha256s, versions, shapes,
                              dtype, counts, the null embedding's and every shard's bytes + sha256
    null.safetensors          prompt_embeds [T, J], pooled [P]   (encode_prompt(""))
    shard-00000.safetensors   latents [n, C, h, w] (with images), prompt_embeds [n, T, J], pooled [n, P]
    ...

:class:`ShardedLatents` reads such a folder lazily: shards are memory-mapped (``safetensors.safe_open``)
and each sample is read on demand (``get_slice``), through a ``torch.utils.data`` DataLoader (optional
worker processes). Resident memory does not grow with the dataset: the reader holds the null embedding,
one epoch permutation (8 bytes per sample) and the batch being built. On open the folder is checked
against the manifest (file sizes, safetensors headers, sha256 of every shard memoised by
:func:`~shiva_export.utils.io.sha256_file_cached`, so only the first open reads the shards in full).

Batches follow :class:`~shiva_export.train.data.LatentFolder` exactly (rectified flow ``x_t = (1 - s) x0 +
s eps``, ``s = t / 1000``, target ``eps - x0``); samples come from a seeded per-epoch permutation (no
replacement within an epoch). A text-only folder (no images) gives real text conditioning with seeded
Gaussian ``x_t`` and no target: distillation only, no flow-matching loss.

Example:
    >>> encode_train_data("sd35-tiny", prompts=["a red cube", "a blue ball"], out="data/tiny")
    >>> data = ShardedLatents("data/tiny", seed=0)
    >>> b = data.batch(4, caption_dropout=0.1, cfg_pairs=True)   # 8 rows: [uncond; cond]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError, MissingDependencyError, ModelNotFoundError, OutputPathError, ShapeError
from shiva_export.logging import get_logger

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
    "is_train_data",
    "ShardDataset",
    "ShardedLatents",
]

logger = get_logger(__name__)

MANIFEST_NAME = "manifest.json"
NULL_NAME = "null.safetensors"
FORMAT = "shiva-train-data"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_PIPELINE_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae")


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
        raise ConfigError(f"--prompts {p} cannot be read as UTF-8 text ({err.__class__.__name__}). Save it as UTF-8, one prompt per line.") from None
    if "\x00" in raw:
        raise ConfigError(f"--prompts {p} holds NUL bytes, so it is not a text file. Pass a UTF-8 text file with one prompt per line.")
    out = [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise ConfigError(f"--prompts {p} holds no prompt (only blank lines or # comments). Write one prompt per line.")
    return out


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"--images {folder} is not a folder. Pass a folder of {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images.")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ConfigError(f"--images {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}). Add images or drop --images.")
    return files


def image_records(folder: str | os.PathLike, prompts: Sequence[str] | None = None) -> list[DataRecord]:
    """Image/caption pairs of a folder: with ``prompts``, the i-th prompt captions the i-th image in file-name
    order (counts must match); without, each image's caption is the text file beside it (``cat.png`` ->
    ``cat.txt``).

    Raises:
        ConfigError: Not a folder, no image, a count mismatch, or a missing/empty caption file.
    """
    folder = Path(folder).expanduser()
    files = _image_files(folder)
    if prompts is not None:
        if len(prompts) != len(files):
            raise ConfigError(
                f"--images {folder} holds {len(files)} images but --prompts has {len(prompts)} prompts; expected one prompt per image "
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
            raise ConfigError(f"image {f} has no caption: {cap} is missing, empty or not UTF-8. Write its caption there, or pass --prompts FILE (one line per image).")
        out.append(DataRecord(text, f, f.name))
    return out


def dataset_records(name: str, split: str = "train", prompt_column: str | None = None, image_column: str | None = None) -> list[DataRecord]:
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
            raise ConfigError(f"--dataset {name} has no prompt, text or caption column (columns: {cols}). Pass --prompt-column NAME.")
    for flag, col in (("--prompt-column", prompt_column), ("--image-column", image_column)):
        if col is not None and col not in cols:
            raise ConfigError(f"{flag} {col!r} is not a column of --dataset {name} (columns: {cols}). Pick one of those.")
    out = []
    for i, text in enumerate(ds[prompt_column]):  # the text column only: images are decoded one batch at a time
        if not isinstance(text, str):
            raise ConfigError(f"--dataset {name} row {i}: column {prompt_column!r} is a {type(text).__name__}, not text. Pass --prompt-column of a text column.")
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
    from shiva_export._version import __version__

    out["shiva-export"] = __version__
    return out


def _component_digests(location: str, is_local: bool) -> dict[str, str | None]:
    """sha256 per pipeline component folder: the hash of ``{relative path: file sha256}`` of its files."""
    from shiva_export.utils.io import canonical_json, sha256_bytes, sha256_file_cached

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
        raise ConfigError(f"cannot read image {where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. Remove or re-save it.") from None


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file. Pass a folder (it is created).")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputPathError(f"--out {out} exists and is not empty. Pass another folder, or --overwrite to replace an earlier train-data output.")
        if not (out / MANIFEST_NAME).is_file():
            raise OutputPathError(f"--out {out} is not empty and holds no {MANIFEST_NAME}, so it is not a train-data output; refusing to replace it. Pass another folder.")


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
        model (str): Model name (``sd35-tiny``, ``sd35-shapes``, ``sd35``, ...). Defaults to ``sd35-tiny``.
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
        pipe (StableDiffusion3Pipeline): An already loaded pipeline of this model to encode with (its
            ``name_or_path`` folder is hashed for the manifest). Defaults to None (load the model's, without
            its transformer).

    Returns:
        TrainDataResult: The output folder and its manifest.

    Raises:
        ConfigError: Bad sizes, counts, images or an architecture other than SD3.
        OutputPathError: ``out`` exists and is not replaceable, or cannot be written.
    """
    from safetensors.torch import save as st_save

    from shiva_export.recipe import recipe_hash
    from shiva_export.runtime.pipeline import (
        _from_pretrained,
        _pipeline_location,
        _recipe,
        _transformer_config,
        config_obj,
    )
    from shiva_export.utils.io import atomic_write_json, sha256_bytes, temp_prefix

    t_start = time.perf_counter()
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
        from shiva_export.errors import HardwareError

        raise HardwareError("--device cuda needs a CUDA GPU, and torch sees none. Run on a GPU machine or use --device cpu.")
    out = Path(out).expanduser()
    _prepare_out(out, overwrite)
    rec = _recipe(model, recipe)
    h = rec.shapes.height if height is None else int(height)
    w = rec.shapes.width if width is None else int(width)
    with_images = any(r.image is not None for r in recs)
    if with_images and not all(r.image is not None for r in recs):
        raise ConfigError("some records have an image and some do not; expected all or none. Encode text-only and image data into separate folders.")

    if pipe is None:
        loc, local = _pipeline_location(rec, weights)
        tcfg = _transformer_config(loc, local, rec)
    else:
        loc = str(getattr(pipe, "name_or_path", "") or "")
        local = Path(loc).is_dir()
        tcfg = _transformer_config(loc, local, rec) if local else dict(pipe.transformer.config)
    from shiva_export.models.sd3 import check_image_size

    check_image_size(config_obj(tcfg), h, w)
    if pipe is None:
        pipe = _from_pretrained(loc, local, rec, transformer=None)  # the transformer is not needed to encode
    if device != "cpu":
        pipe.to(device)
    max_seq = rec.shapes.text_len - pipe.tokenizer.model_max_length
    if max_seq < 1:
        raise ConfigError(
            f"{rec.source_path}: text_len {rec.shapes.text_len} leaves {max_seq} T5 tokens after the CLIP tokenizer's "
            f"{pipe.tokenizer.model_max_length}; use a recipe whose shapes.text_len exceeds the CLIP length."
        )
    vae = pipe.vae
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
    scale = float(vae.config.scaling_factor)
    load_seconds = time.perf_counter() - t_start
    store = _DTYPES[dtype]
    if progress is not None:
        progress(0, len(recs))

    clip_len = int(pipe.tokenizer.model_max_length)
    truncated = [0]

    def count_truncated(texts: list[str]) -> None:
        """Prompts longer than CLIP's window or the T5 length (encode_prompt cuts them, as at inference)."""
        for text in texts:
            n_clip = len(pipe.tokenizer(text).input_ids)
            n_t5 = len(pipe.tokenizer_3(text).input_ids) if getattr(pipe, "tokenizer_3", None) is not None else 0
            truncated[0] += int(n_clip > clip_len or n_t5 > max_seq)

    def encode_text(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        count_truncated(texts)
        pe, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, device=device, do_classifier_free_guidance=False, max_sequence_length=max_seq)
        return pe.float().cpu(), pooled.float().cpu()

    def encode_images(batch_recs: list[DataRecord]) -> torch.Tensor:
        ims = [_load_image(r.image, r.name or str(r.image)) for r in batch_recs]
        x = pipe.image_processor.preprocess(ims, height=h, width=w, resize_mode="crop").to(device=device, dtype=vae.dtype)
        z = vae.encode(x).latent_dist.mean
        return ((z - shift) * scale).float().cpu()

    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        from shiva_export.utils.io import sweep_stale_temps

        sweep_stale_temps(parent)  # half-written folders of killed runs (their pid is gone)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name + "."), suffix=".tmp", dir=parent))
    except OSError as err:
        raise OutputPathError(f"cannot create a folder beside --out {out} ({err.strerror or err}). Pass a writable --out.") from None
    meta = {"format": FORMAT, "model": rec.name}
    shards: list[dict[str, Any]] = []
    pending: dict[str, list[torch.Tensor]] = {"latents": [], "prompt_embeds": [], "pooled": []}
    shapes: dict[str, list[int]] = {}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        data = st_save({k: v.to(store).contiguous() for k, v in tensors.items()}, metadata=meta)
        path = tmp / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return {"file": name, "bytes": len(data), "sha256": sha256_bytes(data)}

    def flush() -> None:
        n = len(pending["prompt_embeds"])
        if not n:
            return
        tensors = {k: torch.stack(v) for k, v in pending.items() if v}
        info = write(f"shard-{len(shards):05d}.safetensors", tensors)
        info["samples"] = n
        shards.append(info)
        for v in pending.values():
            v.clear()

    try:
        t_enc = time.perf_counter()
        from shiva_export.runtime.pipeline import quiet_libraries

        with torch.inference_mode(), quiet_libraries():  # truncation notes are counted instead (manifest, summary)
            null_pe, null_pooled = encode_text([""])  # what the pipeline encodes for the uncond half of CFG
            null_info = write(NULL_NAME, {"prompt_embeds": null_pe[0], "pooled": null_pooled[0]})
            done = 0
            for i in range(0, len(recs), batch):
                chunk = recs[i : i + batch]
                pe, pooled = encode_text([r.prompt for r in chunk])
                lat = encode_images(chunk) if with_images else None
                for j in range(len(chunk)):
                    pending["prompt_embeds"].append(pe[j])
                    pending["pooled"].append(pooled[j])
                    if lat is not None:
                        pending["latents"].append(lat[j])
                    if len(pending["prompt_embeds"]) == shard_size:
                        flush()
                if not shapes:
                    shapes = {"prompt_embeds": list(pe.shape[1:]), "pooled": list(pooled.shape[1:])}
                    if lat is not None:
                        shapes["latents"] = list(lat.shape[1:])
                done += len(chunk)
                if progress is not None:
                    progress(done, len(recs))
            flush()
        encode_seconds = time.perf_counter() - t_enc
        from shiva_export.models import VAE_SCALE

        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": rec.name,
            "architecture": rec.architecture,
            "recipe": str(rec.source_path),
            "recipe_sha256": recipe_hash(rec),
            "pipeline": {"source": loc, "local": local, "components": _component_digests(loc, local), "versions": _versions()},
            "samples": len(recs),
            "truncated_prompts": truncated[0],
            "has_latents": with_images,
            "latent_shape": [int(tcfg["in_channels"]), h // VAE_SCALE, w // VAE_SCALE],
            "shapes": shapes,
            "dtype": _DTYPE_NAMES[store],
            "height": h,
            "width": w,
            "text_len": rec.shapes.text_len,
            "max_sequence_length": max_seq,
            "clip_max_length": int(pipe.tokenizer.model_max_length),
            "vae": {"shift_factor": shift, "scaling_factor": scale, "latents": "(posterior mean - shift_factor) * scaling_factor"} if with_images else None,
            "null": dict(null_info, prompt=""),
            "shards": shards,
            "source": source or {"kind": "prompts"},
            "seed": seed,
            "seconds": round(time.perf_counter() - t_start, 3),
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        _commit(tmp, out, parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d samples in %d shards to %s", len(recs), len(shards), out)
    return TrainDataResult(out, manifest, time.perf_counter() - t_start, encode_seconds, load_seconds)


def _commit(tmp: Path, out: Path, parent: Path) -> None:
    """Moves the finished temp folder to ``out`` (replacing an earlier output, checked by :func:`_prepare_out`)."""
    from shiva_export.utils.io import temp_prefix

    trash = None
    try:
        if out.is_dir() and any(out.iterdir()):
            trash = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name + "."), suffix=".old", dir=parent))
            os.replace(out, trash / "old")
        elif out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:
        raise OutputPathError(f"cannot move the finished data into --out {out} ({err.strerror or err}). Pass another --out.") from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------- reading
def is_train_data(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a ``train-data`` output (holds ``manifest.json``)."""
    return (Path(folder).expanduser() / MANIFEST_NAME).is_file()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"--data {folder}: {MANIFEST_NAME} cannot be read ({err.__class__.__name__}). Re-run shiva-export train-data.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ConfigError(f"--data {folder}: {MANIFEST_NAME} is not a {FORMAT} manifest. Re-run shiva-export train-data into a new folder.")
    if m.get("version") != FORMAT_VERSION:
        raise ConfigError(f"--data {folder}: manifest version {m.get('version')!r}; this shiva-export reads version {FORMAT_VERSION}. Re-encode with this version.")
    for key in ("samples", "shards", "shapes", "null", "latent_shape"):
        if key not in m:
            raise ConfigError(f"--data {folder}: {MANIFEST_NAME} lacks {key!r}. Re-run shiva-export train-data.")

    def bad(what: str) -> ConfigError:
        return ConfigError(f"--data {folder}: {MANIFEST_NAME} has a malformed {what}. Re-run shiva-export train-data.")

    def ints(v, n: int | None = None) -> bool:
        return isinstance(v, list) and (n is None or len(v) == n) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)

    def entry_ok(e, samples: bool) -> bool:
        return (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str) and ints([e.get("bytes")])
                and (not samples or ints([e.get("samples")])))

    if not ints([m["samples"]]):
        raise bad("samples count")
    if not isinstance(m["shards"], list) or not m["shards"] or not all(entry_ok(e, True) for e in m["shards"]):
        raise bad("shards list")
    if not entry_ok(m["null"], False):
        raise bad("null entry")
    if not ints(m["latent_shape"], 3):
        raise bad("latent_shape")
    if not isinstance(m["shapes"], dict) or not all(ints(v) for v in m["shapes"].values()):
        raise bad("shapes")
    return m


def _check_file(folder: Path, entry: dict[str, Any], verify: str) -> Path:
    from safetensors import SafetensorError

    from shiva_export.utils.io import safe_component, sha256_file_cached

    name = safe_component(entry.get("file"), "train-data shard")
    path = folder / name
    fix = "Re-run shiva-export train-data (the folder is damaged)."
    if not path.is_file():
        raise ConfigError(f"--data {folder}: {name} is missing. {fix}")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise ConfigError(f"--data {folder}: {name} is {size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced). {fix}")
    if verify == "sha256" and sha256_file_cached(path) != entry.get("sha256"):
        raise ConfigError(f"--data {folder}: {name} does not match its sha256 in the manifest (corrupted). {fix}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"--data {folder}: {name} is not a readable safetensors file ({str(err).splitlines()[0]}). {fix}") from None
    return path


class ShardDataset(torch.utils.data.Dataset):
    """Per-sample reads from memory-mapped shards: ``ds[i]`` -> ``{"prompt_embeds", "pooled"[, "latents"]}``
    (float32, no batch axis). Picklable for DataLoader workers: file handles are opened lazily per process.

    Attributes:
        reads (int): Samples read in this process (what the RAM tests count).
    """

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], keys: Sequence[str]):
        self.paths = [str(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.keys = tuple(keys)
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self.reads = 0
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def locate(self, i: int) -> tuple[int, int]:
        import bisect

        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range 0..{len(self) - 1}")
        s = bisect.bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    def _handle(self, s: int):
        f = self._handles.get(s)
        if f is None:
            from safetensors import safe_open

            f = self._handles[s] = safe_open(self.paths[s], framework="pt")
        return f

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, j = self.locate(int(i))
        f = self._handle(s)
        self.reads += 1
        return {k: f.get_slice(k)[j : j + 1][0].float() for k in self.keys}

    def close(self) -> None:
        self._handles.clear()


class _IndexStream(torch.utils.data.Sampler):
    """The endless sample order from position ``start``: epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``."""

    def __init__(self, n: int, seed: int, start: int):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        while True:
            e, off = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e)).tolist()
            yield from perm[off:]
            pos = (e + 1) * self.n

    def __len__(self) -> int:  # endless; DataLoader only needs it for warnings
        return 2**62


@dataclass
class _Loader:
    batch: int
    it: Iterator


class ShardedLatents:
    """Lazy reader of a ``shiva-export train-data`` folder with the :class:`~shiva_export.train.data.LatentFolder`
    batch interface (see the module docstring).

    Args:
        folder (PathLike): The train-data output folder (holds ``manifest.json``).
        shapes (DataShapes | None): Expected per-sample shapes (checks the data fits the model). Defaults to None.
        seed (int): Seed of the sample order, noise and caption dropout. Defaults to 0.
        num_workers (int): DataLoader worker processes reading samples (0: in this process). Defaults to 0.
        verify (str): ``sha256`` (sizes + memoised shard hashes) or ``size`` (sizes and headers only). Defaults to ``sha256``.

    Raises:
        ConfigError: The manifest or a shard is missing, damaged or inconsistent.
        ShapeError: The stored shapes do not fit ``shapes``.
    """

    def __init__(self, folder: str | os.PathLike, shapes=None, seed: int = 0, *, num_workers: int = 0, verify: str = "sha256"):
        from safetensors import safe_open

        from shiva_export.train.data import DataShapes

        if verify not in ("sha256", "size"):
            raise ConfigError(f"verify {verify!r} is unknown; choose sha256 or size.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers {num_workers!r} is out of range; expected an int >= 0.")
        p = Path(folder).expanduser()
        if not p.is_dir():
            raise ConfigError(f"--data folder does not exist: {p}. Pass a shiva-export train-data output folder.")
        m = _read_manifest(p)
        self.manifest = m
        self.has_targets = bool(m.get("has_latents"))
        keys = ("prompt_embeds", "pooled") + (("latents",) if self.has_targets else ())
        want = {k: tuple(m["shapes"][k]) for k in keys if k in m["shapes"]}
        if set(want) != set(keys):
            raise ConfigError(f"--data {p}: manifest shapes {sorted(m['shapes'])} lack {sorted(set(keys) - set(want))}. Re-run shiva-export train-data.")
        paths, counts = [], []
        for entry in m["shards"]:
            path = _check_file(p, entry, verify)
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if not set(keys) <= names:
                    raise ConfigError(f"--data {p}: {path.name} lacks tensors {sorted(set(keys) - names)}. Re-run shiva-export train-data.")
                for k in keys:
                    got = tuple(f.get_slice(k).get_shape())
                    if got != (entry["samples"], *want[k]):
                        raise ShapeError(f"--data {p}: {path.name} holds {k} {got}; the manifest says {(entry['samples'], *want[k])}. Re-run shiva-export train-data.")
            paths.append(path)
            counts.append(int(entry["samples"]))
        if sum(counts) != int(m["samples"]) or not counts:
            raise ConfigError(f"--data {p}: the shards hold {sum(counts)} samples, the manifest says {m['samples']}. Re-run shiva-export train-data.")
        null_path = _check_file(p, m["null"], verify)
        from safetensors.torch import load_file

        null = load_file(str(null_path))
        self.null_prompt_embeds = null["prompt_embeds"].float()
        self.null_pooled = null["pooled"].float()
        c, lh, lw = (int(v) for v in m["latent_shape"])
        got = DataShapes(c, lh, lw, *(int(v) for v in want["prompt_embeds"]), int(want["pooled"][0]))
        if shapes is not None:
            for fld in ("channels", "text_dim", "pooled_dim"):
                if getattr(got, fld) != getattr(shapes, fld):
                    raise ShapeError(f"--data {p} has {fld} {getattr(got, fld)}; the model needs {getattr(shapes, fld)}. Encode it for this model (shiva-export train-data --model ...).")
            if (got.height, got.width) != (shapes.height, shapes.width):  # the learned k per phase is for the recipe's token count
                from shiva_export.models import VAE_SCALE

                raise ShapeError(
                    f"--data {p} was encoded at {m.get('width')}x{m.get('height')} px (latent {got.width}x{got.height}); training runs at "
                    f"{shapes.width * VAE_SCALE}x{shapes.height * VAE_SCALE} px (the recipe's shapes). Re-encode with --width/--height to match, or pass --recipe with those shapes."
                )
        self.shapes = got
        self.folder = p
        self.seed = int(seed)
        self.num_workers = num_workers
        self.dataset = ShardDataset(paths, counts, keys)
        self._g = torch.Generator(device="cpu").manual_seed(self.seed)
        self._pos = 0
        self._loader: _Loader | None = None
        logger.info("opened %d samples in %d shards from %s (%s)", len(self), len(paths), p, got)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        kind = "latents" if self.has_targets else "text only"
        return f"ShardedLatents({str(self.folder)!r}, samples={len(self)}, shards={len(self.dataset.paths)}, {kind}, seed={self.seed})"

    @property
    def null_text(self) -> dict[str, torch.Tensor]:
        """The stored null embedding under the transformer's argument names (no batch axis)."""
        return {"encoder_hidden_states": self.null_prompt_embeds, "pooled_projections": self.null_pooled}

    def _next_samples(self, batch: int) -> dict[str, torch.Tensor]:
        if self._loader is None or self._loader.batch != batch:
            self.close()
            kw: dict[str, Any] = {}
            if self.num_workers:
                kw = {"num_workers": self.num_workers, "prefetch_factor": 2, "persistent_workers": False}
            dl = torch.utils.data.DataLoader(self.dataset, batch_size=batch, sampler=_IndexStream(len(self), self.seed, self._pos), **kw)
            self._loader = _Loader(batch, iter(dl))
        out = next(self._loader.it)
        self._pos += batch
        return out

    def batch(self, batch: int, timesteps: torch.Tensor | None = None, *, caption_dropout: float = 0.0, cfg_pairs: bool = False):
        """The next ``batch`` samples of the seeded order, noised to ``timesteps`` (rectified flow).

        Args:
            batch (int): Samples B.
            timesteps (Tensor): ``[B]`` on 0..1000. Defaults to uniform in ``[0, 1000)``.
            caption_dropout (float): Probability per sample that its text is replaced by the null
                embedding. Defaults to 0.
            cfg_pairs (bool): Return ``2B`` rows ``[uncond; cond]`` sharing ``x_t``, timestep and target,
                the uncond half the null embedding (the SD3 pipeline's CFG batch). Defaults to False.

        Returns:
            Batch: ``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``, ``timestep``, target.
        """
        from shiva_export.train.data import Batch, _timesteps, condition_batch

        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        if timesteps is not None:  # checked before any sample is consumed (the stream position stays put)
            _timesteps(batch, timesteps, None)
        from shiva_export.train.data import _check_conditioning

        _check_conditioning(caption_dropout, cfg_pairs)
        g = self._g
        s = self._next_samples(batch)
        if self.has_targets:
            x0 = s["latents"]
            eps = torch.randn(x0.shape, generator=g)
            t = _timesteps(batch, timesteps, g)
            sigma = (t / 1000.0).view(-1, 1, 1, 1)
            xt, target = (1.0 - sigma) * x0 + sigma * eps, eps - x0
        else:  # text only: seeded Gaussian x_t (as SyntheticData), no flow target
            xt = torch.randn((batch, *self.shapes_latent), generator=g)
            t = _timesteps(batch, timesteps, g)
            target = None
        inputs = {"hidden_states": xt, "encoder_hidden_states": s["prompt_embeds"], "pooled_projections": s["pooled"]}
        b = Batch(inputs, t, target=target)
        return condition_batch(b, self.null_text, caption_dropout=caption_dropout, cfg_pairs=cfg_pairs, generator=g)

    @property
    def shapes_latent(self) -> tuple[int, int, int]:
        return (self.shapes.channels, self.shapes.height, self.shapes.width)

    def state_dict(self) -> dict:
        return {"kind": "sharded", "seed": self.seed, "samples": len(self), "position": self._pos, "rng": self._g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sharded" or int(state.get("samples", -1)) != len(self):
            raise ConfigError(
                f"the checkpoint's data state is {state.get('kind')!r} with {state.get('samples')} samples; this --data {self.folder} "
                f"holds {len(self)}. Resume with the original --data."
            )
        self.close()
        self._pos = int(state["position"])
        self._g.set_state(state["rng"])

    def close(self) -> None:
        """Stops the DataLoader (its workers) and closes the shard files; the next batch reopens them."""
        self._loader = None
        self.dataset.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

