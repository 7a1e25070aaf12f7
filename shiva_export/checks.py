"""Checks every command runs before it loads a model or writes a file: contradictory flags, numbers whose
size would reach an allocator or a C call, special output paths, non-finite tensors.

Each check raises one typed error (:mod:`shiva_export.errors`) whose line names the flag(s), the value and the
fix; the CLI turns it into its exit code. Limits on sizes are derived from the memory of this machine, so a
number that passes them can at least be allocated.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from shiva_export.errors import (
    ConfigError,
    HardwareError,
    MissingDependencyError,
    OutputPathError,
    ShapeError,
)

__all__ = [
    "MAX_SIDE",
    "available_memory",
    "check_build_options",
    "check_cuda_device",
    "check_finite",
    "check_gpu",
    "check_ignored",
    "check_number",
    "check_overridden",
    "check_model_name",
    "check_onnx_external_data",
    "check_ort_provider",
    "check_out_dir",
    "check_parity_backends",
    "check_seed",
    "check_side",
    "check_sizes",
]

#: the largest image side accepted (px): 4x the largest trained resolution of any supported model
MAX_SIDE = 16384
_SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range


def available_memory() -> int:
    """Bytes of memory this process could still allocate (MemAvailable; physical pages as a fallback)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_model_name(model: str | None, flag: str = "--model") -> None:
    """``--model`` is a name (``sd35-tiny``), never a path: a recipe file goes to ``--recipe``."""
    if model is None:
        return
    if model.endswith(".toml") or "/" in model or os.sep in model:
        raise ConfigError(
            f"{flag} {model!r} is a path, but {flag} takes a model name (sd35-tiny, sd35, flux-dev, ...); "
            "recipe files end in .toml and go to --recipe FILE."
        )


def check_out_dir(path: str | os.PathLike | None, flag: str) -> None:
    """An output folder must be a folder (or not exist yet)."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(
            f"{flag} {p} exists and is not a folder; pass a folder path (it is created when missing)."
        )
    for parent in p.parents:  # a file on the way makes mkdir fail with NotADirectoryError
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{flag} {p}: {parent} is a file, not a folder; pass a folder path.")
            break


def check_seed(seed: int | None, count: int = 1, flag: str = "--seed") -> None:
    """Seeds ``seed .. seed + count - 1`` must fit a 64-bit generator seed."""
    if seed is None:
        return
    if not isinstance(seed, int) or seed < 0 or seed + max(count, 1) - 1 > _SEED_MAX:
        raise ConfigError(
            f"{flag} {seed} is out of range; expected 0..{_SEED_MAX - max(count, 1) + 1} (a 64-bit generator seed). Pass e.g. {flag} 0."
        )


def check_side(value: int | None, flag: str, default: int | None = None) -> None:
    """An image side in pixels: 16 .. :data:`MAX_SIDE`, before any model is loaded."""
    if value is None:
        return
    if not 16 <= value <= MAX_SIDE:
        fix = f" (the recipe's is {default})" if default else ""
        raise ShapeError(
            f"{flag} {value} is out of range; expected a multiple of 16 from 16 to {MAX_SIDE} px{fix}. Pass e.g. {flag} {default or 1024}."
        )


def check_sizes(
    *,
    batch: int | None = None,
    text_len: int | None = None,
    height: int | None = None,
    width: int | None = None,
    dynamic_batch: bool = False,
    cfg: bool | None = True,
    defaults: dict[str, int] | None = None,
) -> None:
    """A ``--batch`` or ``--text-len`` whose tensors would not fit in memory is refused before anything is allocated
    (sides are checked against the model elsewhere; here they only size the estimate).

    The bound is one fp32 attention score matrix of one head over the joint sequence ((N + T)^2 per model batch
    row, N = image tokens at 16 px per token): every supported transformer materialises at least that much (the
    input tensors are smaller), so a call above it cannot run on this machine.
    """
    if dynamic_batch and batch is not None and batch > 1024:
        raise ShapeError(
            f"--batch {batch} with --dynamic-batch is out of range; the symbolic batch axis spans 1..1024 prompts. Pass --batch 1..1024."
        )
    if (batch is None or batch < 1) and (text_len is None or text_len < 1):
        return  # nothing given to blame (non-positive values get their own message later)
    d = defaults or {}
    rows = max(batch or d.get("batch") or 1, 1) * (1 if cfg is False else 2)
    h = min(max(height or d.get("height") or 1024, 16), MAX_SIDE)
    w = min(max(width or d.get("width") or 1024, 16), MAX_SIDE)
    n = (h // 16) * (w // 16)
    t = max(text_len or d.get("text_len") or 1, 1)
    need = rows * (n + t) ** 2 * 4
    have = available_memory()
    if need <= have:
        return
    if text_len is not None and text_len >= 1:
        limit = max(1, math.isqrt(have // (4 * rows)) - n)
        raise ShapeError(
            f"--text-len {text_len} is too large for this machine: {rows} x ({n + t} tokens)^2 fp32 attention scores need {need / 2**30:.3g} GiB, "
            f"{have / 2**30:.3g} GiB are available; expected at most about {limit}. Pass the model's text length (e.g. --text-len 333 for SD3)."
        )
    limit = max(1, have // (4 * (n + t) ** 2 * (1 if cfg is False else 2)))
    raise ShapeError(
        f"--batch {batch} is too large for this machine: {rows} x ({n + t} tokens)^2 fp32 attention scores need {need / 2**30:.3g} GiB, "
        f"{have / 2**30:.3g} GiB are available; expected at most about {limit}. Pass a smaller --batch."
    )


def check_finite(tensors: dict[str, Any], where: str, error: type[Exception] = ConfigError) -> None:
    """Every floating tensor of ``tensors`` holds only finite values; else one line naming the file and tensor."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise error(
                f"{where}: tensor {name!r} holds {bad} NaN/inf value(s) of {t.numel()}; refusing to use it. Re-train or re-save the file."
            )


def check_number(value: float | None, flag: str, lo: float, hi: float | None = None, example: str = "") -> None:
    """A numeric option given (not None) is finite and within ``lo .. hi`` (inclusive); NaN never passes."""
    if value is None:
        return
    if not (math.isfinite(value) and value >= lo and (hi is None or value <= hi)):
        rng = f"{lo:g}..{hi:g}" if hi is not None else f"a finite number >= {lo:g}"
        raise ConfigError(
            f"{flag} {value} is out of range; expected {rng}." + (f" Pass e.g. {flag} {example}." if example else "")
        )


def check_ignored(given: dict[str, bool], needs: str, present: bool) -> None:
    """Flags that act only together with ``needs`` are refused without it: silently ignoring one hides a typo or a
    forgotten flag. ``given`` maps each flag to whether the user set it."""
    flags = [f for f, g in given.items() if g]
    if flags and not present:
        raise ConfigError(
            f"{flags[0]} acts only with {needs}, which was not given, so it would be ignored; add {needs} or drop {flags[0]}."
        )


def check_overridden(flag: str, present: bool, given: dict[str, bool], why: str) -> None:
    """``flag`` fixes options of its own (e.g. --paper-only); giving one of them too is a contradiction, not a merge."""
    flags = [f for f, g in given.items() if g]
    if flags and present:
        raise ConfigError(f"{flag} and {flags[0]} contradict each other: {flag} {why}; drop one of them.")


def check_cuda_device(device: str, flag: str = "--device") -> None:
    """``cuda`` / ``cuda:N`` needs that GPU (exit 4 through HardwareError, as every command)."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise ConfigError(f"{flag} {device!r} is not a device; expected cpu, cuda or cuda:N.")
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    idx = int(m.group(1) or 0)
    if idx >= n:
        raise HardwareError(
            f"{flag} {device} needs CUDA GPU {idx}, and torch sees {n} GPU(s). Run on a machine with that GPU or use {flag} cpu."
        )


def check_onnx_external_data(path: str | os.PathLike, flag: str = "ONNX_PATH") -> None:
    """Every external-data file an ONNX names exists beside it and is long enough: a graph whose weights are gone
    is not a graph (static checks alone would pass it)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX at all: the reader's own message names it
        return
    base = Path(path).parent
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        f = base / info.location
        need = (info.offset or 0) + (info.length or 0)
        if not f.is_file() or f.stat().st_size < need:
            what = "is missing" if not f.is_file() else f"holds {f.stat().st_size} bytes, {need} needed"
            raise ConfigError(
                f"{flag} {path}: its external data file {f} (tensor {t.name!r}) {what}; copy the .onnx with its data file(s), or re-export it."
            )


def check_gpu(flag: str, why: str) -> None:
    """``flag`` needs a CUDA GPU (exit 4), checked before minutes of export that could not be used here."""
    import torch

    if not torch.cuda.is_available():
        raise HardwareError(
            f"{flag} needs a CUDA GPU ({why}), and torch sees none. Run on a GPU machine, or use --backend ort."
        )


def check_ort_provider(provider: str, backend: str = "ort", flag: str = "--provider cuda") -> None:
    """``--provider cuda`` needs onnxruntime-gpu (checked before minutes of export)."""
    if provider != "cuda" or backend != "ort":
        return
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError(
            f"{flag} needs onnxruntime-gpu, and onnxruntime is not installed. pip install onnxruntime-gpu."
        ) from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingDependencyError(
            f"{flag} needs onnxruntime-gpu (CUDAExecutionProvider), and the installed onnxruntime has only "
            f"{', '.join(ort.get_available_providers())}. pip install onnxruntime-gpu, or drop {flag}."
        )


def check_parity_backends(backends: list[str] | None, engines_dir: str | os.PathLike | None) -> None:
    """``validate parity --backend``: engines need ``--engines-dir`` (an existing folder); ort-cuda needs
    onnxruntime-gpu (exit 4). Checked before the reference model is loaded."""
    chosen = list(backends or [])
    if "engine" in chosen and engines_dir is None:
        raise ConfigError(
            "--backend engine needs --engines-dir DIR (the root `shiva-export trt` wrote to); add it or drop --backend engine."
        )
    if engines_dir is not None and not Path(engines_dir).is_dir():
        raise ConfigError(
            f"--engines-dir {engines_dir} is not a folder; pass the root `shiva-export trt --out-dir` wrote engines to."
        )
    if "ort-cuda" in chosen:
        check_ort_provider("cuda", flag="--backend ort-cuda")


_AOT = re.compile(r"^(?:current|(?:sm_?)?\d{2,3}\+?|\d+\.\d+\+?)$", re.IGNORECASE)


def check_build_options(
    *,
    workspace_mib: int | None = None,
    opt_level: int | None = None,
    aot_targets: list[str] | None = None,
    dynamic_batch: bool = False,
    batch_min: int | None = None,
    batch_max: int | None = None,
    batch: int | None = None,
) -> None:
    """TensorRT builder options, before any export (each was refused only after a 30-45 s export)."""
    if workspace_mib is not None and workspace_mib < 1:
        raise ConfigError(
            f"--workspace {workspace_mib} is out of range; expected a positive number of MiB (omit it for the backend's default)."
        )
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise ConfigError(f"--opt-level {opt_level} is out of range; expected 0..5 (default 3).")
    for t in aot_targets or []:
        if not isinstance(t, str) or not _AOT.match(t.strip()):
            raise ConfigError(
                f"--aot-target {t!r} is not a compute capability; expected e.g. 8.9, sm_89, SM120+ or current."
            )
    given = [f for f, v in (("--batch-min", batch_min), ("--batch-max", batch_max)) if v is not None]
    if given and not dynamic_batch:
        raise ConfigError(
            f"{' and '.join(given)} set the profile of a dynamic batch, and --dynamic-batch was not given; add --dynamic-batch or drop {given[0]}."
        )
    for f, v in (("--batch-min", batch_min), ("--batch-max", batch_max)):
        if v is not None and not 1 <= v <= 1024:
            raise ConfigError(f"{f} {v} is out of range; expected 1..1024 prompts.")
    lo, hi, b = batch_min or 1, batch_max, batch or 1
    if hi is not None and lo > hi:
        raise ConfigError(
            f"--batch-min {lo} is above --batch-max {hi}; expected --batch-min <= --batch <= --batch-max."
        )
    if dynamic_batch and not (lo <= b <= (hi if hi is not None else max(4 * b, 2))):
        raise ConfigError(
            f"--batch {b} is outside the profile --batch-min {lo} .. --batch-max {hi}; the profile's opt batch must lie in it."
        )


def check_train_data(data: str | os.PathLike | None, model_name: str, recipe_source: Any = None) -> None:
    """``--data`` must be made for this model (its manifest names it) and hold only finite numbers; checked
    before the model is loaded, so a refused run leaves no checkpoint."""
    if data is None:
        return
    import json

    p = Path(data).expanduser()
    if p.is_file() and p.name == "manifest.json":
        p = p.parent
    if not p.is_dir():
        return  # the data reader names a missing folder
    manifest = p / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return  # the data reader names a damaged manifest
        got = m.get("model") if isinstance(m, dict) else None
        if isinstance(got, str) and got != model_name:
            raise ConfigError(
                f"--data {p} was made for model {got!r} (recipe {m.get('recipe')}), and --model is {model_name!r} "
                f"(recipe {recipe_source}); re-run `shiva-export train-data --model {model_name}` or train --model {got}."
            )
    _scan_finite(p)


def _scan_finite(folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 - safe_open is not a dict
                    check_finite({k: h.get_tensor(k)}, f"--data {f}")
        except (SafetensorError, OSError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            return  # the data reader names an unreadable file
