"""The ``POST /generate`` body: parsed and checked field by field, before anything reaches a pipeline.

Every refusal is a :class:`RequestError` with an HTTP status (400 malformed, 413 too large, 422 a bad field)
and one line naming the field and what is allowed. Defaults and bounds come from :class:`Limits`
(built by the worker); what needs the loaded pipeline (the graphs' shape contract, the text length in tokens,
DiT class labels) is the worker's check. No Ray import here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["RequestError", "Limits", "GenerateRequest", "parse_request", "FIELDS"]

#: the fields of the body, in the order the error messages list them
FIELDS = ("prompt", "seed", "steps", "guidance", "height", "width", "batch")
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 4096


class RequestError(Exception):
    """A refused request: ``status`` (4xx), the ``field`` at fault (None for the body) and a one-line message."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status = status
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


@dataclass(frozen=True)
class Limits:
    """What a request may ask of the loaded pipeline (defaults are the recipe's, as in ``generate``)."""

    steps: int
    guidance: float
    height: int
    width: int
    max_steps: int = 1000
    max_guidance: float = 100.0
    max_side: int = 4096


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    seed: int
    steps: int
    guidance: float
    height: int
    width: int

    @property
    def shape_key(self) -> tuple[int, int, int, float]:
        """Requests with equal keys can share one pipeline call (one size, step count and guidance)."""
        return (self.height, self.width, self.steps, self.guidance)


def parse_request(body: bytes, limits: Limits, max_body_bytes: int) -> GenerateRequest:
    """Checks a raw body; raises :class:`RequestError` on the first fault."""
    if len(body) > max_body_bytes:
        raise RequestError(413, None, f"body: {len(body)} bytes exceeds the limit of {max_body_bytes} bytes.")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(
            400,
            None,
            f'body: not a UTF-8 JSON object ({err.__class__.__name__}); send e.g. {{"prompt": "a red cube"}}.',
        ) from None
    if not isinstance(data, dict):
        raise RequestError(
            400,
            None,
            f'body: a JSON {type(data).__name__} where an object is expected; send e.g. {{"prompt": "a red cube"}}.',
        )
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(422, unknown[0], f"{unknown[0]}: unknown field; allowed fields: {', '.join(FIELDS)}.")
    prompt = data.get("prompt")
    if prompt is None:
        raise RequestError(422, "prompt", "prompt: required; a non-empty string.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(422, "prompt", f"prompt: {_show(prompt)} is not a non-empty string.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            422,
            "prompt",
            f"prompt: {len(prompt)} characters; allowed 1..{MAX_PROMPT_CHARS} (and the text length in tokens).",
        )
    _int_field(data, "batch", 1, 1, 1, why=" (one image per request; the server batches concurrent requests)")
    seed = _int_field(data, "seed", 0, 0, MAX_SEED)
    steps = _int_field(data, "steps", limits.steps, 1, limits.max_steps)
    guidance = _guidance(data.get("guidance", limits.guidance), limits)
    height, width = _size(data, limits)
    return GenerateRequest(prompt=prompt, seed=seed, steps=steps, guidance=guidance, height=height, width=width)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int_field(data: dict, name: str, default: int, lo: int, hi: int, why: str = "") -> int:
    v = data.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(422, name, f"{name}: {_show(v)} is not a whole number in {lo}..{hi}{why}.")
    return v


def _guidance(v: Any, limits: Limits) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or not 0.0 <= v <= limits.max_guidance
    ):
        raise RequestError(
            422,
            "guidance",
            f"guidance: {_show(v)} is not a finite number in 0..{limits.max_guidance:g} (<= 1 turns CFG off).",
        )
    return float(v)


def _size(data: dict, limits: Limits) -> tuple[int, int]:
    """Bounds only: whether the size fits the model and the graphs is the worker's check (generate's message)."""
    h = _int_field(data, "height", limits.height, 1, limits.max_side)
    w = _int_field(data, "width", limits.width, 1, limits.max_side)
    return h, w
