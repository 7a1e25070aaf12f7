"""Resolution buckets: one static graph (and engine) per image size, each in a ``<width>x<height>`` folder.

Static shapes are what make an engine fast, so a deployment that serves several sizes builds one graph per
size (a bucket) instead of one dynamic-shape graph. The sizes come from ``--size WxH`` (repeatable) or the
recipe's ``[[buckets]]``; the layout is ``<root>/<model>/<W>x<H>/<budget>/<dtype>/``. Without either, the
single size of ``[shapes]`` (or ``--height``/``--width``) keeps the layout without a size folder.

``generate`` runs a bucket only at its exact size: :func:`pick_bucket` names the folder of the requested
size and refuses any other size in one line that lists the buckets there are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shiva_export.errors import ConfigError, ShapeError

__all__ = ["parse_size", "bucket_name", "bucket_sizes", "known_buckets", "pick_bucket"]

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)``: width x height in pixels."""
    m = _SIZE.match(str(text).strip().lower())
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise ConfigError(
            f"--size {text!r} is not WIDTHxHEIGHT in pixels; write e.g. --size 1024x1024 or --size 128x96."
        )
    return int(m[1]), int(m[2])


def bucket_name(width: int, height: int) -> str:
    """The folder of a bucket: ``<width>x<height>``."""
    return f"{width}x{height}"


def bucket_sizes(
    recipe, sizes: list[str] | None, height: int | None = None, width: int | None = None
) -> list[tuple[int, int]] | None:
    """The buckets to build, as (width, height): ``--size`` values, else the recipe's ``[[buckets]]``, else None
    (one size without a size folder). ``--size`` with ``--height``/``--width`` is refused: say the size once."""
    if sizes and (height is not None or width is not None):
        raise ConfigError("give --size WxH or --height/--width, not both (--size 1024x768 is width 1024, height 768).")
    if sizes:
        parsed = [parse_size(s) for s in sizes]
        return list(dict.fromkeys(parsed))  # each bucket once, in the order given
    if recipe.buckets and height is None and width is None:
        return [(b.width, b.height) for b in recipe.buckets]
    return None


def _built(model_root: Path) -> list[str]:
    """Bucket folders already under ``<root>/<model>`` (what `onnx` or `trt` wrote)."""
    if not model_root.is_dir():
        return []
    return [
        p.name
        for p in model_root.iterdir()
        if p.is_dir() and _SIZE.match(p.name) and all(int(x) > 0 for x in p.name.split("x"))
    ]


def known_buckets(recipe, root: str | os.PathLike) -> list[str]:
    """The recipe's ``[[buckets]]`` and the bucket folders under ``<root>/<model>``, sorted by area then width."""
    names = {b.name for b in recipe.buckets} | set(_built(Path(root) / recipe.name))
    return sorted(names, key=lambda n: (parse_size(n)[0] * parse_size(n)[1], parse_size(n)[0]))


def pick_bucket(recipe, root: str | os.PathLike, height: int, width: int) -> str | None:
    """The bucket folder for ``height`` x ``width``; None where the model has no buckets (the size-free layout).

    Raises:
        ShapeError: The model has buckets and none is this size (the message lists them).
    """
    names = known_buckets(recipe, root)
    if not names:
        return None
    want = bucket_name(width, height)
    if want in names:
        return want
    raise ShapeError(
        f"{recipe.name} has no bucket {want} (width x height); its buckets are {', '.join(names)} in {Path(root) / recipe.name}. "
        f"Generate at one of them (--width/--height), or build this size with `shiva-export trt --model {recipe.name} --size {want}`."
    )
