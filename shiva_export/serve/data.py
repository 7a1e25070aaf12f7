"""``generate --prompts FILE --ray``: the prompt list mapped over Ray Data actors, one pipeline per actor.

Each actor loads the pipeline once with ``generate``'s ``load_pipeline`` arguments and runs each prompt with
``generate``'s own :func:`~shiva_export.runtime.generate.run_pipeline` (seed ``seed + i``, same file name, same
PNG encoding); the driver writes every PNG (atomically) and ``generate.json`` with the record of the
single-process run (the timings are measured where the image ran). Ray restarts a dead actor and retries its
prompt.

Resumable: each finished image leaves a small state file under ``$SHIVA_CACHE_DIR/ray-generate/<run key>/``
(outside ``--out``, so the output folder holds exactly the single-process files); the run key hashes the
recipe, budget, artifacts, sampling settings and output folder. A rerun skips every prompt whose PNG is
still there with the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shiva_export import errors
from shiva_export.errors import ConfigError, ShivaError
from shiva_export.models import adapter_for_architecture
from shiva_export.recipe import recipe_hash
from shiva_export.runtime.generate import budget_desc, generate_record, run_pipeline, slug
from shiva_export.runtime.pipeline import generation_recipe, load_pipeline
from shiva_export.serve import require_ray
from shiva_export.serve.worker import pipeline_kwargs, png_bytes
from shiva_export.utils.io import (
    atomic_write_bytes,
    atomic_write_json,
    cache_root,
    canonical_json,
    check_writable,
    sha256_file,
)

__all__ = ["generate_ray"]


class _GenerateActor:
    """A Ray Data actor: one pipeline, loaded once; each row ``{"index", "prompt"}`` becomes a PNG and its entry."""

    def __init__(self, load: dict[str, Any], run: dict[str, Any]):
        import torch

        if load.get("threads") is not None:
            torch.set_num_threads(int(load["threads"]))
        self.run, self.error = run, ""
        try:
            self.pipe = load_pipeline(batch=1, **pipeline_kwargs(**load))
        except (
            ShivaError
        ) as err:  # a user error: reported as a row, so the driver raises it in one line (Ray would retry the actor)
            self.error = _error_text(err)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"index": [], "png": [], "entry": [], "head": [], "error": []}
        for i, prompt in zip(batch["index"], batch["prompt"]):
            png, entry, head, error = b"", "", "", self.error
            if not error:
                try:
                    png, entry, head = self._one(int(i), str(prompt))
                except ShivaError as err:
                    error = _error_text(err)
            for key, val in (("index", int(i)), ("png", png), ("entry", entry), ("head", head), ("error", error)):
                out[key].append(val)
        return out

    def _one(self, i: int, prompt: str) -> tuple[bytes, str, str]:
        """PNG, entry and run head (JSON) of prompt ``i``, exactly as ``generate`` makes them."""
        import torch

        r, info = self.run, self.pipe.shiva
        h = info.height if r["height"] is None else r["height"]
        w = info.width if r["width"] is None else r["width"]
        res = run_pipeline(
            self.pipe,
            prompt,
            negative_prompt=r["negative_prompt"],
            steps=r["steps"],
            guidance=r["guidance"],
            seed=r["seed"] + i,
            height=h,
            width=w,
        )
        entry = {
            "prompt": prompt,
            "negative_prompt": r["negative_prompt"],
            "seed": r["seed"] + i,
            "timings_ms": res.times.to_dict(),
            "phase_trace": "".join(n[0].upper() for n in res.times.phase_trace),
            "phase_steps": {k: v["steps"] for k, v in res.times.per_phase().items()},
        }
        head = {
            "pipeline": info.to_dict(),
            "device": str(self.pipe._execution_device),
            "torch_threads": torch.get_num_threads(),
            "height": h,
            "width": w,
            "budget": _budget(info),
        }
        return png_bytes(res.image), json.dumps(entry), json.dumps(head, default=str)


def _error_text(err: BaseException) -> str:
    return json.dumps({"type": type(err).__name__, "message": str(err).splitlines()[0] if str(err) else ""})


def _raise_row_error(text: str) -> None:
    """Raises, in the driver, the ShivaError an actor reported (same class: same exit code)."""
    e = json.loads(text)
    cls = getattr(errors, e["type"], errors.ShivaError)
    raise (cls if isinstance(cls, type) and issubclass(cls, errors.ShivaError) else errors.ShivaError)(e["message"])


def _budget(info) -> str:
    return budget_desc(info)


def _name(i: int, prompt: str) -> str:
    return f"{i:03d}-{slug(prompt)}"


def _run_key(load: dict[str, Any], run: dict[str, Any], out: Path) -> str:
    rec = generation_recipe(load["model"], load["recipe"])
    key = {
        "recipe": recipe_hash(rec),
        "load": {k: str(v) for k, v in load.items()},
        "run": run,
        "out": str(out.resolve()),
    }
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]


def _finished(state: Path, out: Path, prompts: Sequence[str], seed: int) -> dict[int, dict[str, Any]]:
    """Entries of images a previous run finished: state file present, prompt and seed equal, PNG unchanged."""
    done: dict[int, dict[str, Any]] = {}
    for i, prompt in enumerate(prompts):
        f = state / f"{i:06d}.json"
        if not f.is_file():
            continue
        try:
            s = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        png = out / f"{_name(i, prompt)}.png"
        if (
            s.get("entry", {}).get("prompt") == prompt
            and s["entry"].get("seed") == seed + i
            and png.is_file()
            and sha256_file(png) == s.get("png_sha256")
        ):
            done[i] = s
    return done


def _check(
    prompts: Sequence[str], steps: int | None, guidance: float | None, replicas: int, compare_dense: bool
) -> None:
    """generate's own checks, before Ray starts."""
    if compare_dense:
        raise ConfigError(
            "--compare-dense runs two pipelines per image in one process; drop --ray (or --compare-dense)."
        )
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ConfigError(
            "no prompt given (or an empty one); pass --prompt TEXT (repeatable) or --prompts FILE with one prompt per line."
        )
    if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= 1000):
        raise ConfigError(f"--steps {steps} is out of range; expected 1..1000.")
    if guidance is not None and not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"--guidance {guidance} is invalid; expected a finite number >= 0 (<= 1 turns CFG off).")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 1024:
        raise ConfigError(f"--replicas {replicas!r} is out of range; expected a whole number in 1..1024.")


def generate_ray(
    *,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    replicas: int = 1,
    model: str | None = None,
    recipe=None,
    weights=None,
    router=None,
    backend: str = "torch",
    ratio: float | None = None,
    phases: bool = False,
    artifacts=None,
    context: str | None = None,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    dtype: str = "fp32",
    provider: str = "cpu",
    threads: int | None = None,
    device: str = "cpu",
    artifact_root: str | os.PathLike = "engines",
    compare_dense: bool = False,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """What :func:`~shiva_export.runtime.generate.generate` does, over ``replicas`` Ray Data actors; returns the record
    written to ``generate.json``. ``progress(done, total)`` after each image (skipped ones count as done)."""
    prompts = list(prompts)
    _check(prompts, steps, guidance, replicas, compare_dense)
    rec = generation_recipe(model, recipe)
    steps = rec.pipeline.steps if steps is None else steps
    guidance = rec.pipeline.guidance if guidance is None else guidance
    out = Path(out_dir)
    check_writable(out / "generate.json", "--out folder")
    load = dict(
        model=model,
        recipe=None if recipe is None else str(Path(recipe).resolve()),
        weights=None if weights is None else str(Path(weights).resolve()),
        router=None if router is None else str(Path(router).resolve()),
        backend=backend,
        ratio=ratio,
        phases=phases,
        artifacts=[str(Path(a).resolve()) for a in artifacts or []],
        context=context,
        dtype=dtype,
        device=device,
        provider=provider,
        threads=threads,
        artifact_root=str(Path(artifact_root).resolve()),
        height=height,
        width=width,
    )
    run = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed, height=height, width=width)
    state = cache_root() / "ray-generate" / _run_key(load, run, out)
    done = _finished(state, out, prompts, seed)
    tick = progress or (lambda d, n: None)
    tick(len(done), len(prompts))
    pending = [{"index": i, "prompt": p} for i, p in enumerate(prompts) if i not in done]
    if pending:
        for row in _map(pending, load, run, replicas, num_cpus, num_gpus):
            if row["error"]:
                _raise_row_error(str(row["error"]))
            i = int(row["index"])
            png = bytes(row["png"])
            atomic_write_bytes(out / f"{_name(i, prompts[i])}.png", png)
            s = {
                "entry": json.loads(row["entry"]),
                "head": json.loads(row["head"]),
                "png_sha256": hashlib.sha256(png).hexdigest(),
            }
            atomic_write_json(state / f"{i:06d}.json", s)
            done[i] = s
            tick(len(done), len(prompts))
    return _write_record(out, rec, done, prompts, backend, steps, guidance)


def _map(pending: list[dict[str, Any]], load, run, replicas: int, num_cpus: float, num_gpus: float):
    """Rows of results as the actors finish them (one prompt per task, so a restarted actor redoes one image)."""
    ray = require_ray("generate --ray")
    from ray import data as ray_data

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray_data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws one bar over images, not Ray's per-operator bars
    if os.environ.get("SHIVA_DEBUG", "0") in ("", "0", "false"):
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's execution-plan INFO lines
    ds = ray_data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(
        _GenerateActor,
        fn_constructor_kwargs={"load": load, "run": run},
        batch_size=1,
        compute=ray_data.ActorPoolStrategy(size=replicas),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_format="numpy",
    )
    yield from ds.iter_rows()


def _write_record(
    out: Path, rec, done: dict[int, dict[str, Any]], prompts: Sequence[str], backend: str, steps: int, guidance: float
) -> dict[str, Any]:
    """``generate.json`` as the single-process run writes it (``generate``'s keys, images in prompt order)."""
    head = done[0]["head"]
    images = []
    for i, prompt in enumerate(prompts):
        entry = dict(done[i]["entry"])
        entry["png"] = str(out / f"{_name(i, prompt)}.png")
        images.append(entry)
    record = generate_record(
        model=head["pipeline"]["model"],
        backend=backend,
        budget=head["budget"],
        steps=steps,
        guidance=guidance,
        cfg=adapter_for_architecture(rec.architecture).uses_cfg(guidance),
        height=head["height"],
        width=head["width"],
        device=head["device"],
        torch_threads=head["torch_threads"],
        pipeline=head["pipeline"],
        controlnet=None,  # generate --ray refuses --controlnet
        images=images,
        grid=None,
    )
    atomic_write_json(out / "generate.json", record)
    record["record"] = str(out / "generate.json")
    return record
