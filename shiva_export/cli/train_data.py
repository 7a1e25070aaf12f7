"""``shiva-export train-data``: encode prompts (and images) with the pipeline's own encoders into sharded
safetensors that ``shiva-export train --data`` reads lazily."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from shiva_export.cli._exit_codes import ExitCode
from shiva_export.cli._options import JsonSummary, PromptFile, Quiet, RecipeFile, TorchThreads
from shiva_export.cli._output import err_console, result_json, result_text

HELP = (
    "Encode training data with the model's own diffusers pipeline: each prompt through pipe.encode_prompt (SD3: "
    "CLIP x2 + T5 -> prompt_embeds [T, J], pooled [P]), each image (--images, --image-column) through the VAE into "
    'latents ((posterior mean - shift_factor) * scaling_factor), and the null prompt "" once (the unconditional '
    "embedding CFG uses, for caption dropout and CFG pairs). Writes sharded safetensors plus manifest.json (model, "
    "recipe sha256, pipeline component sha256s, shapes, dtype, per-shard sha256) into --out, atomically. "
    "`shiva-export train --data OUT` reads it lazily (memory-mapped). Without images the data is text only: "
    "training then noises seeded Gaussian x_t and has no flow-matching loss (latents are needed for that)."
)
EPILOG = """Examples:

  shiva-export train-data --model sd35-tiny --prompts prompts.txt --out data/tiny-text

  shiva-export train-data --model sd35-shapes --images scenes/ --out data/shapes          (captions: scenes/NAME.txt)

  shiva-export train-data --model sd35-tiny --prompts captions.txt --images imgs/ --out data/tiny --shard-size 256

  shiva-export train-data --model sd35 --weights ./sd3.5-medium --dataset my/captions --split train \\
      --image-column image --device cuda --dtype bf16 --out data/sd35

  shiva-export train --model sd35-tiny --data data/tiny --steps 300

--prompts pairs its i-th line with the i-th image in file-name order. --dataset reads the local `datasets` cache
only (never downloads). Exit codes: 0 ok, 1 error (output not writable), 2 bad value (prompt file, images, sizes,
columns, dataset not cached), 4 missing dependency (datasets) or GPU.
"""


Out = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="Output folder (created; must be new or empty, or --overwrite an earlier output)."
    ),
]
Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model whose pipeline encodes: sd35-tiny, sd35-shapes, sd3-tiny, sd35 (needs --weights offline), ...",
    ),
]
Dataset = Annotated[
    str | None, typer.Option("--dataset", help="A `datasets` dataset name in the local cache (offline only).")
]
Split = Annotated[str, typer.Option("--split", help="Split of --dataset.")]
PromptColumn = Annotated[
    str | None, typer.Option("--prompt-column", help="Text column of --dataset. Default: prompt, text or caption.")
]
ImageColumn = Annotated[
    str | None,
    typer.Option("--image-column", help="Image column of --dataset (encoded with the VAE). Default: none (text only)."),
]
Images = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help="Folder of images (png/jpg/webp/bmp): captions from --prompts (file-name order) or NAME.txt beside each.",
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option("--weights", help="Local diffusers PIPELINE folder (model_index.json, text encoders, VAE)."),
]
ShardSize = Annotated[int, typer.Option("--shard-size", help="Samples per shard file.")]
Height = Annotated[
    int | None,
    typer.Option("--height", help="Image height in pixels (center crop, then resize). Default: the recipe's."),
]
Width = Annotated[int | None, typer.Option("--width", help="Image width in pixels. Default: the recipe's.")]
Batch = Annotated[int, typer.Option("--batch", help="Prompts/images per encoder call.")]
Seed = Annotated[
    int, typer.Option("--seed", help="Recorded in the manifest (encoding is deterministic: posterior mean).")
]
Dtype = Annotated[str, typer.Option("--dtype", help="Stored dtype: fp32 | fp16 | bf16 (the encoders run in fp32).")]
Device = Annotated[str, typer.Option("--device", help="cpu | cuda: where the text encoders and VAE run.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing train-data output at --out.")]


def train_data_command(
    out: Out,
    model: Model = "sd35-tiny",
    prompts: PromptFile = None,
    dataset: Dataset = None,
    split: Split = "train",
    prompt_column: PromptColumn = None,
    image_column: ImageColumn = None,
    images: Images = None,
    recipe: RecipeFile = None,
    weights: Weights = None,
    shard_size: ShardSize = 256,
    height: Height = None,
    width: Width = None,
    batch: Batch = 8,
    seed: Seed = 0,
    dtype: Dtype = "fp32",
    device: Device = "cpu",
    overwrite: Overwrite = False,
    threads: TorchThreads = None,
    json_out: JsonSummary = False,
    quiet: Quiet = False,
) -> int:
    from shiva_export.checks import check_cuda_device, check_ignored, check_model_name, check_out_dir, check_side
    from shiva_export.errors import ConfigError

    check_model_name(model)
    check_out_dir(out, "--out")
    check_cuda_device(device)
    check_side(height, "--height")
    check_side(width, "--width")
    if prompts is not None and dataset is not None:
        raise ConfigError(
            f"--prompts {prompts} and --dataset {dataset} were both given; expected one source of prompts. Drop one of them."
        )
    if dataset is not None and images is not None:
        raise ConfigError(
            f"--dataset {dataset} and --images {images} were both given; a dataset brings its own images (--image-column). Drop --images."
        )
    if prompts is None and dataset is None and images is None:
        raise ConfigError("no data given: pass --prompts FILE, --dataset NAME or --images FOLDER.")
    check_ignored({"--split": split != "train"}, "--dataset", dataset is not None)
    if dataset is None and (prompt_column is not None or image_column is not None):
        raise ConfigError("--prompt-column / --image-column apply to --dataset only. Drop them or pass --dataset NAME.")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads} is out of range; expected >= 1.")
        import torch

        torch.set_num_threads(threads)
    from shiva_export.train.dataset import encode_train_data

    records, source = _records(prompts, dataset, split, prompt_column, image_column, images)
    bar, progress = _encode_progress(show=not (quiet or json_out), model=model)
    from shiva_export.utils.io import folder_lock

    try:
        with folder_lock(out.parent, "--out's folder"):  # a second run writing the same output is refused
            res = encode_train_data(
                model,
                out=out,
                records=records,
                source=source,
                recipe=recipe,
                weights=weights,
                shard_size=shard_size,
                height=height,
                width=width,
                batch=batch,
                seed=seed,
                dtype=dtype,
                device=device,
                overwrite=overwrite,
                progress=progress,
            )
    finally:
        if bar is not None and bar.task_ids:
            bar.stop()
    summary = res.to_dict()
    if json_out:
        result_json(summary)
    else:
        result_text(format_summary(summary))
    return ExitCode.OK


def _records(
    prompts: Path | None,
    dataset: str | None,
    split: str,
    prompt_column: str | None,
    image_column: str | None,
    images: Path | None,
):
    """The samples to encode and the manifest's record of where they came from: (records, source)."""
    from shiva_export.train.dataset import DataRecord, dataset_records, image_records, read_prompt_file

    if dataset is not None:
        records = dataset_records(dataset, split=split, prompt_column=prompt_column, image_column=image_column)
        return records, {
            "kind": "dataset",
            "name": dataset,
            "split": split,
            "prompt_column": prompt_column,
            "image_column": image_column,
        }
    texts = read_prompt_file(prompts) if prompts is not None else None
    if images is not None:
        records = image_records(images, texts, prompts)
        return records, {"kind": "images", "images": str(images), "prompts": None if prompts is None else str(prompts)}
    return [DataRecord(t) for t in texts], {"kind": "prompts", "prompts": str(prompts)}


def _encode_progress(*, show: bool, model: str):
    """A Rich bar over the samples (started on the first call) and its ``progress(done, total)``; plain lines off a
    terminal, nothing when hidden: (bar or None, progress)."""
    bar = None
    task: list[int] = []
    if show:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
            disable=not err_console.is_terminal,
        )
        print(f"loading the {model} pipeline (text encoders, VAE) ...", file=sys.stderr, flush=True)

    def progress(done: int, total: int) -> None:
        if bar is None:
            return
        if not task:
            bar.start()
            task.append(bar.add_task("encode", total=total))
        bar.update(task[0], completed=done)
        if not err_console.is_terminal and (done == total or done == 0):
            print(f"encoded {done}/{total}", file=sys.stderr, flush=True)

    return bar, progress


def format_summary(s: dict) -> str:
    sh = s["shapes"]
    kind = f"latents {sh['latents']}" if s["has_latents"] else "text only (no latents: no flow-matching loss)"
    rate = f"{s['samples_per_second']:.2f} samples/s" if s.get("samples_per_second") else "n/a"
    return "\n".join(
        [
            f"out dir      {s['out_dir']}",
            f"manifest     {s['manifest']}",
            f"model        {s['model']}",
            f"samples      {s['samples']} in {s['shards']} shards ({s['bytes'] / 2**20:.2f} MiB, {s['dtype']})",
            f"tensors      {', '.join(f'{k} {v}' for k, v in sh.items() if k != 'latents')}, {kind}",
            f"truncated    {s['truncated_prompts']} prompts longer than the text encoders' windows (cut, as at inference)",
            f"time         {s['seconds']:.1f} s (pipeline load {s['load_seconds']:.1f} s, encode {s['encode_seconds']:.1f} s: {rate})",
            f"train with   shiva-export train --model {s['model']} --data {s['out_dir']}",
        ]
    )
