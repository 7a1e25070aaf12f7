"""The one list of architecture cases that every per-architecture test runs over.

One row per adapter, on its embedded tiny recipe (seeded random weights, no download), with the facts a test
needs to address that architecture. A fifth architecture adds one row here (and its adapter and recipe);
files that run per architecture parametrise with :func:`params` or :data:`NAMES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from torch import nn


@dataclass(frozen=True)
class ArchCase:
    """One architecture's test facts.

    Attributes:
        name: The embedded tiny recipe (``load_recipe(name)``, ``--model name``).
        architecture: The adapter's ``NAME`` (the recipe's ``architecture``).
        probe: For a block of ``adapter.blocks(model)``, the first module the block's image tokens reach
            (a pre-hook there sees how many tokens the unmodified block computes on).
        text_in_probe: ``(block, text_len) -> extra tokens`` that module sees beside the image tokens
            (Flux single-stream blocks: the text is concatenated in front).
        prompt: A prompt its pipeline takes (DiT is class-conditional: a class label).
        bad_generate: ``(generate arguments, message)``: an input ``shiva-export generate`` refuses with
            exit 2 and one line containing the message.
        unsupported_call: A transformer call argument that an exported (static) graph refuses.
        context_keep: The routing implements ``context = "keep"`` (rejected tokens still give keys/values).
    """

    name: str
    architecture: str
    probe: Callable[[nn.Module], nn.Module]
    text_in_probe: Callable[[nn.Module, int], int]
    prompt: str
    bad_generate: tuple[tuple[str, ...], str]
    unsupported_call: dict = field(default_factory=dict)
    context_keep: bool = False

    def __str__(self) -> str:
        return self.name


def _norm1(block: nn.Module) -> nn.Module:
    return block.norm1


def _no_text(block: nn.Module, text_len: int) -> int:
    return 0


_BAD_SIZE = (
    ("--prompt", "a cat", "--height", "100", "--width", "100"),
    "--height 100 is not a positive multiple of 16 px",
)

CASES: tuple[ArchCase, ...] = (
    # SD3 / SD3.5 (MMDiT-X: dual attention, qk-norm; the shipped trained router): norm1 takes the image stream,
    # norm1_context the text.
    ArchCase(
        "sd35-tiny",
        "sd3",
        _norm1,
        _no_text,
        "a red cube",
        _BAD_SIZE,
        {"joint_attention_kwargs": {"scale": 0.5}},
        context_keep=True,
    ),
    # Flux: double-stream blocks (norm1 on the image stream), then single-stream blocks over [text; image] (norm).
    ArchCase(
        "flux-tiny",
        "flux",
        lambda b: b.norm1 if hasattr(b, "norm1") else b.norm,
        lambda b, t: 0 if hasattr(b, "norm1") else t,
        "a red cube",
        (("--prompt", "a cat", "--negative-prompt", "blurry"), "true CFG"),
        {"joint_attention_kwargs": {"scale": 0.5}},
    ),
    ArchCase(
        "pixart-tiny", "pixart", _norm1, _no_text, "a red cube", _BAD_SIZE, {"cross_attention_kwargs": {"scale": 0.5}}
    ),
    ArchCase(
        "dit-tiny",
        "dit",
        _norm1,
        _no_text,
        "cat",
        (("--prompt", "unicorn"), "is not a class label"),
        {"cross_attention_kwargs": {"scale": 0.5}},
    ),
)

NAMES: list[str] = [c.name for c in CASES]
BY_NAME: dict[str, ArchCase] = {c.name: c for c in CASES}


def params(*, exclude: tuple[str, ...] = ()) -> list:
    """The cases as ``pytest.param``s with their names as ids (``exclude``: architectures a test does not cover)."""
    return [pytest.param(c, id=c.name) for c in CASES if c.architecture not in exclude]


def names(*, exclude: tuple[str, ...] = ()) -> list[str]:
    """The case names (``exclude``: architectures to leave out)."""
    return [c.name for c in CASES if c.architecture not in exclude]
