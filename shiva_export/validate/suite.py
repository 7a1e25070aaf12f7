"""Declarative validation suites: ``validate/<name>.toml`` lists cases (model x ratios x backends x shapes)
and ``shiva-export validate suite <name>`` runs them all, writing one report folder.

Suite files are data (strict schema, unknown keys rejected), like recipes::

    schema_version = 1
    name = "cpu"
    [[case]]
    kind = "parity"            # or "speed"
    model = "sd3-tiny"
    ratios = [0.0, 0.2, 0.4, 0.6]
    backends = ["ort-cpu"]
    cases = 3
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shiva_export.errors import ConfigError, RecipeError
from shiva_export.runtime.benchmark import benchmark_e2e
from shiva_export.utils.io import atomic_write_json, atomic_write_text
from shiva_export.validate.compare import validate_parity
from shiva_export.validate.speed import benchmark_speed

__all__ = ["Suite", "SuiteCase", "load_suite", "run_suite", "suites_dir", "available_suites"]

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SuiteCase(BaseModel):
    model_config = _STRICT
    kind: Literal["parity", "speed", "e2e"]
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    ratios: list[Annotated[float, Field(ge=0, lt=1)]] = Field(description="fractions of image tokens pruned")
    backends: list[str] = Field(
        default_factory=list, description="parity: ort-cpu|ort-cuda|engine; speed: torch|ort; e2e: torch|ort|trt"
    )
    height: int | None = None
    width: int | None = None
    batch: int | None = None
    cfg: bool | None = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    cases: Annotated[int, Field(ge=1, le=8)] = 3
    warmup: Annotated[int, Field(ge=0)] = 2
    repeats: Annotated[int, Field(ge=1)] = 10
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    # e2e (whole pipelines): steps, learned phases, guidance, device, torch.compile
    steps: list[Annotated[int, Field(ge=1, le=1000)]] = Field(
        default_factory=list, description="e2e: step counts, one run each (default: the recipe's)"
    )
    phases: bool = False
    guidance: Annotated[float, Field(ge=0, le=100)] | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    compile: bool = False
    requires: Literal["none", "cuda", "tensorrt"] = Field(
        "none", description="skip the case (reported) unless this is available"
    )


class Suite(BaseModel):
    model_config = _STRICT
    schema_version: Literal[1]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    description: str = ""
    case: list[SuiteCase]


def suites_dir() -> Path:
    env = os.environ.get("SHIVA_SUITES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "validate"


def available_suites() -> list[str]:
    d = suites_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Loads ``validate/<name>.toml`` (or a path) into the strict :class:`Suite` schema."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = suites_dir() / f"{name_or_path}.toml"
    if not p.is_file():
        raise ConfigError(
            f"Unknown suite: {name_or_path!r}. Known suites: {', '.join(available_suites()) or '(none)'}; or pass a .toml path."
        )
    try:
        return Suite.model_validate(tomllib.loads(p.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{p}: not valid TOML ({err}). Fix the syntax.") from None
    except RecursionError:
        raise RecipeError(
            f"{p}: arrays or tables nested too deeply to be a suite. Pass a suite shaped like validate/*.toml."
        ) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a UTF-8 text file, so not a suite. Pass a .toml suite.") from None
    except OSError as err:
        raise RecipeError(f"{p}: cannot read ({err.strerror}).") from None
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        got = (
            f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
        )  # name the bad value
        raise RecipeError(f"{p}: {loc} is invalid{got}: {e['msg']}. Fix the suite file.") from None


def _missing_requirement(req: str) -> str | None:
    if req == "cuda":
        import torch

        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    if req == "tensorrt":
        import importlib.util

        return None if importlib.util.find_spec("tensorrt") else "needs the tensorrt module and a supported GPU"
    return None


def run_suite(
    suite: str | os.PathLike | Suite,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs every case; returns ``{"suite", "passed", "results": [...]}`` and writes reports to ``out_dir``.

    Speed cases never fail the suite (timings are reported, not asserted); parity cases do.
    """
    s = suite if isinstance(suite, Suite) else load_suite(suite)
    say = progress or (lambda m: None)
    out = Path(out_dir) if out_dir else Path("validate") / "reports" / s.name
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, c in enumerate(s.case):
        tag = f"{i:02d}-{c.kind}-{c.model}"
        say(f"[{i + 1}/{len(s.case)}] {c.kind} {c.model} ratios {c.ratios}")
        missing = _missing_requirement(c.requires)
        if missing:
            results.append(
                {"case": tag, "kind": c.kind, "passed": True, "skipped": True, "summary": f"SKIPPED ({missing})"}
            )
            continue
        if c.kind == "e2e":
            for st in c.steps or [None]:
                sub = f"{tag}-{st}steps" if st else tag
                rep = benchmark_e2e(
                    model=c.model,
                    backends=c.backends or ["ort"],
                    ratios=c.ratios,
                    phases=c.phases,
                    steps=st,
                    guidance=c.guidance,
                    warmup=c.warmup,
                    repeats=c.repeats,
                    threads=c.threads,
                    device=c.device,
                    dtype=c.dtype,
                    compile=c.compile,
                    out_dir=out / sub,
                    progress=say,
                )
                best = max(
                    (r for r in rep.rows() if r["budget"] != "dense"), key=lambda r: r["e2e_speedup"], default=None
                )
                note = f"; best e2e {best['e2e_speedup']:.2f}x ({best['backend']} {best['budget']})" if best else ""
                results.append(
                    {
                        "case": sub,
                        "kind": "e2e",
                        "passed": True,
                        "summary": f"e2e table in {out / sub / 'e2e.md'}{note}",
                    }
                )
            continue
        if c.kind == "parity":
            rep = validate_parity(
                model=c.model,
                ratios=c.ratios,
                dtype=c.dtype,
                backends=c.backends or None,
                cases=c.cases,
                height=c.height,
                width=c.width,
                batch=c.batch,
                cfg=c.cfg,
                report_md=out / f"{tag}.md",
            )
            atomic_write_json(out / f"{tag}.json", rep.to_dict())
            results.append({"case": tag, "kind": "parity", "passed": rep.passed, "summary": rep.summary_line()})
        else:
            rep = benchmark_speed(
                model=c.model,
                ratios=c.ratios,
                backends=c.backends or ["torch", "ort"],
                height=c.height,
                width=c.width,
                batch=c.batch or 1,
                cfg=bool(c.cfg),
                warmup=c.warmup,
                repeats=c.repeats,
                threads=c.threads,
                out_dir=out / tag,
            )
            results.append(
                {"case": tag, "kind": "speed", "passed": True, "summary": f"speed table in {out / tag / 'speed.md'}"}
            )
    summary = {"suite": s.name, "passed": all(r["passed"] for r in results), "results": results, "out_dir": str(out)}
    atomic_write_json(out / "suite.json", summary)
    lines = [f"# Suite {s.name}", "", s.description, ""] + [f"- {r['case']}: {r['summary']}" for r in results]
    atomic_write_text(out / "suite.md", "\n".join(lines) + "\n")
    return summary
