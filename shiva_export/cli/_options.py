"""Options that mean the same thing in several commands, declared once (same flags, same help text).

A command's signature reads ``quiet: Quiet = False``: Typer reads the ``typer.Option`` from the ``Annotated``
metadata (and copies it per command), the default comes from the ``=``. Options whose help text says something
specific to one command are declared in that command's module instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
# onnx, trt, train-data
JsonSummary = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")]

# onnx, trt, train, train-data, serve
RecipeFile = Annotated[
    Path | None, typer.Option("--recipe", help="Recipe TOML overriding the model's built-in recipes/<model>.toml.")
]
# validate estimator, validate frontier
TrainedRecipe = Annotated[
    Path | None, typer.Option("--recipe", help="Recipe TOML override (e.g. a trained recipe.toml).")
]
# onnx, train
TransformerWeights = Annotated[
    Path | None,
    typer.Option("--weights", help="Local diffusers folder (transformer folder or pipeline folder with transformer/)."),
]
# onnx, trt, generate
LoraScale = Annotated[
    list[float] | None,
    typer.Option("--lora-scale", help="Scale of each --lora, in order (one per --lora; default 1.0 each)."),
]
# generate, train-data
PromptFile = Annotated[
    Path | None,
    typer.Option("--prompts", help="Text file with one prompt per line (blank lines and # comments skipped)."),
]

# generate and serve: the pipeline they run and where its graphs are cached
PipelineBackend = Annotated[str, typer.Option("--backend", "-b", help="torch | ort | trt.")]
PipelineRouter = Annotated[Path | None, typer.Option("--router", help="Router safetensors. Default: the recipe's.")]
Provider = Annotated[str, typer.Option("--provider", help="ONNX Runtime provider: cpu | cuda (needs onnxruntime-gpu).")]
ArtifactRoot = Annotated[Path, typer.Option("--artifact-root", help="Cache folder of exported graphs / engines.")]

# generate, validate speed
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch and ONNX Runtime.")]
# train, train-data
TorchThreads = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch. Default: torch's.")]
# validate quality, validate estimator, validate frontier
TorchCpuThreads = Annotated[int | None, typer.Option("--threads", help="torch CPU threads.")]
# validate quality, validate frontier
CfgScale = Annotated[float | None, typer.Option("--guidance", help="CFG scale (default: the recipe's).")]
