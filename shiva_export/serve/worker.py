"""One loaded Shiva pipeline per Ray replica or actor, and the batched call of it (no Ray import here).

:class:`ImageWorker` loads through the same :func:`~shiva_export.runtime.pipeline.load_pipeline` as
``generate`` (same artifacts, caches and sha256 checks). A static graph (``ort``/``trt``) fixes its batch, so
the worker loads the batch-1 graph ``generate`` runs and, with ``max_batch`` B > 1, the batch-B graph of the
same phases; the torch backend takes any batch in one pipeline. A group of requests is run in calls of sizes
that exist (greedy: B, then 1s); only requests of one shape key share a call. A request alone goes through
``generate``'s own :func:`~shiva_export.runtime.generate.run_pipeline`, so its PNG is ``generate``'s byte for
byte; a batched call seeds each row with its own generator, as ``generate`` seeds each image.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

from shiva_export._version import __version__
from shiva_export.errors import ConfigError, ShapeError, ShivaError
from shiva_export.export.onnx import package_versions
from shiva_export.models import adapter_for_architecture
from shiva_export.runtime.generate import (
    StageTimes,
    budget_desc,
    check_pipeline_call,
    pipeline_adapter,
    run_pipeline,
    timed_call,
    to_pil,
    trace_of,
)
from shiva_export.runtime.pipeline import generation_recipe, load_pipeline, quiet_libraries
from shiva_export.serve.requests import GenerateRequest, Limits, RequestError

__all__ = ["ImageWorker", "run_batch", "png_bytes", "pipeline_kwargs"]

_TEXT_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def pipeline_kwargs(
    *,
    model,
    recipe,
    weights,
    router,
    backend,
    ratio,
    phases,
    artifacts,
    context,
    dtype,
    device,
    provider,
    threads,
    artifact_root,
    height=None,
    width=None,
) -> dict[str, Any]:
    """``load_pipeline`` keyword arguments exactly as ``generate`` builds them (CFG from the recipe's guidance)."""
    rec = generation_recipe(model, recipe)
    cfg = adapter_for_architecture(rec.architecture).uses_cfg(rec.pipeline.guidance)
    return dict(
        recipe=rec,
        weights=weights,
        height=height,
        width=width,
        cfg=cfg,
        dtype=dtype,
        provider=provider,
        threads=threads,
        device=device,
        artifact_root=artifact_root,
        backend=backend,
        ratio=ratio,
        phases=phases,
        router=router,
        artifacts=list(artifacts) or None,
        context=context,
    )


def png_bytes(image) -> bytes:
    """The PNG ``generate`` writes for a float image in [0, 1] (same conversion, same encoder)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def _merge_calls(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline call for several single-prompt calls: prompts and generators become lists (one per row),
    DiT's class labels are concatenated; every other argument must already agree."""
    out: dict[str, Any] = {}
    for key in calls[0]:
        vals = [c[key] for c in calls]
        if key in ("prompt", "generator"):
            out[key] = vals
        elif key == "negative_prompt":
            out[key] = None if all(v is None for v in vals) else vals
        elif key == "class_labels":
            out[key] = [x for v in vals for x in v]
        elif all(v == vals[0] for v in vals):
            out[key] = vals[0]
        else:
            raise ConfigError(f"cannot batch requests that differ in {key}; batch only requests of one shape.")
    return out


def run_batch(
    pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float, height: int, width: int
):
    """Several prompts in one pipeline call (row i seeded with ``seeds[i]``); returns (images, StageTimes of the call)."""
    import torch

    info, adapter = pipe.shiva, pipeline_adapter(pipe)
    max_seq = info.max_sequence_length
    check_pipeline_call(
        pipe, batch=len(prompts), height=height, width=width, guidance=guidance, max_sequence_length=max_seq
    )
    calls = [
        adapter.pipeline_call(
            pipe,
            p,
            negative_prompt=None,
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            max_sequence_length=max_seq,
            generator=torch.Generator(device="cpu").manual_seed(int(s)),
        )
        for p, s in zip(prompts, seeds)
    ]
    kwargs = _merge_calls(calls)
    times, store = StageTimes(), {}
    trace_of(pipe)  # drop calls made before this run
    out = timed_call(pipe, kwargs, times, store)
    return list(out.images), times


def _field_of(message: str) -> str:
    """The request field a shape-contract or model message is about."""
    if "CFG is" in message:
        return "guidance"
    for name in ("height", "width"):
        if message.startswith(f"--{name}") or f": {name} is" in message:
            return name
    return "prompt"


class ImageWorker:
    """Loads the pipeline(s) once; checks requests against them; runs groups of requests.

    Args:
        opts (ServeOptions): Validated serve options.
        progress (Callable): ``progress(stage)`` while loading. Defaults to None.
    """

    def __init__(self, opts, progress=None):
        import torch

        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        self.opts = opts
        kw = pipeline_kwargs(
            model=opts.model,
            recipe=opts.recipe,
            weights=opts.weights,
            router=opts.router,
            backend=opts.backend,
            ratio=opts.ratio,
            phases=opts.phases,
            artifacts=opts.artifacts,
            context=opts.context,
            dtype=opts.dtype,
            device=opts.device,
            provider=opts.provider,
            threads=opts.threads,
            artifact_root=opts.artifact_root,
        )
        self.pipes: dict[int, Any] = {1: load_pipeline(batch=1, progress=progress, **kw)}
        self.dynamic = opts.backend == "torch"  # a torch transformer takes any batch in one pipeline
        if not self.dynamic and opts.batch > 1:
            self.pipes[opts.batch] = load_pipeline(batch=opts.batch, progress=progress, **kw)
        self.max_batch = opts.batch
        self.info = self.pipes[1].shiva
        self.versions = package_versions()
        self.replica = {"pid": os.getpid(), "host": os.uname().nodename}
        self.limits = Limits(
            steps=self.info.recipe.pipeline.steps,
            guidance=float(self.info.recipe.pipeline.guidance),
            height=self.info.height,
            width=self.info.width,
        )

    # ------------------------------------------------------------------------------------------- checks
    def check(self, req: GenerateRequest) -> None:
        """What needs the loaded pipeline: size and the graphs' shape contract (``generate``'s message),
        the prompt's length in tokens, DiT's class labels. Raises :class:`RequestError` (422)."""
        import torch

        pipe = self.pipes[1]
        adapter = pipeline_adapter(pipe)
        try:
            adapter.check_image_size(pipe.transformer.config, req.height, req.width)
            check_pipeline_call(
                pipe,
                batch=1,
                height=req.height,
                width=req.width,
                guidance=req.guidance,
                max_sequence_length=self.info.max_sequence_length,
            )
            adapter.pipeline_call(
                pipe,
                req.prompt,
                negative_prompt=None,
                steps=req.steps,
                guidance=req.guidance,
                height=req.height,
                width=req.width,
                max_sequence_length=self.info.max_sequence_length,
                generator=torch.Generator(),
            )
        except (ShapeError, ConfigError) as err:
            msg = str(err).splitlines()[0]
            raise RequestError(422, _field_of(msg), msg) from None
        self._check_tokens(req.prompt)

    def _check_tokens(self, prompt: str) -> None:
        """A prompt must reach the model whole: no tokenizer of the pipeline may truncate it (CLIP at its
        ``model_max_length``, T5 at the graph's ``max_sequence_length``)."""
        pipe = self.pipes[1]
        for attr in _TEXT_TOKENIZERS:
            tok = getattr(pipe, attr, None)
            if tok is None:
                continue
            clip = "CLIP" in type(tok).__name__
            limit = int(
                tok.model_max_length if clip or self.info.max_sequence_length is None else self.info.max_sequence_length
            )
            with quiet_libraries():  # the tokenizer warns about the very length this check refuses
                n = len(tok(prompt, truncation=False, add_special_tokens=True).input_ids)
            if n > limit:
                raise RequestError(
                    422,
                    "prompt",
                    f"prompt: {n} tokens ({attr}, {type(tok).__name__}) exceed the text length; allowed 1..{limit} tokens.",
                )

    # --------------------------------------------------------------------------------------------- runs
    def chunks(self, n: int) -> list[int]:
        """Call sizes for ``n`` requests of one shape: the largest size that exists first."""
        sizes = sorted(self.pipes, reverse=True)
        out = []
        while n > 0:
            c = min(n, self.max_batch) if self.dynamic else next(s for s in sizes if s <= n)
            out.append(c)
            n -= c
        return out

    def run(self, reqs: Sequence[GenerateRequest]) -> list[dict[str, Any] | ShivaError | Exception]:
        """Runs requests (any shapes), grouped by shape key; one result per request, in order: a dict with
        ``png`` (bytes) and ``record``, or the exception of the call it was in."""
        results: list[Any] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.shape_key, []).append(i)
        for idx in groups.values():
            start = 0
            for c in self.chunks(len(idx)):
                part = idx[start : start + c]
                start += c
                try:
                    for i, res in zip(part, self._call([reqs[i] for i in part])):
                        results[i] = res
                except Exception as err:  # noqa: BLE001 - reported per request (HTTP 500 with a request id)
                    for i in part:
                        results[i] = err
        return results

    def _call(self, reqs: list[GenerateRequest]) -> list[dict[str, Any]]:
        r0 = reqs[0]
        if len(reqs) == 1:  # exactly generate's call
            res = run_pipeline(
                self.pipes[1],
                r0.prompt,
                steps=r0.steps,
                guidance=r0.guidance,
                seed=r0.seed,
                height=r0.height,
                width=r0.width,
            )
            images, times = [res.image], res.times
        else:
            pipe = self.pipes[1] if self.dynamic else self.pipes[len(reqs)]
            images, times = run_batch(
                pipe,
                [r.prompt for r in reqs],
                [r.seed for r in reqs],
                steps=r0.steps,
                guidance=r0.guidance,
                height=r0.height,
                width=r0.width,
            )
        return [self._result(r, img, times, len(reqs)) for r, img in zip(reqs, images)]

    def _result(self, req: GenerateRequest, image, times, batch: int) -> dict[str, Any]:
        """The PNG and its record: what ``generate.json`` holds for the image and its run, plus the batch."""
        import torch

        data = png_bytes(image)
        info = self.info
        entry = {
            "prompt": req.prompt,
            "negative_prompt": None,
            "seed": req.seed,
            "png_sha256": hashlib.sha256(data).hexdigest(),
            "timings_ms": times.to_dict(),
            "phase_trace": "".join(n[0].upper() for n in times.phase_trace),
            "phase_steps": {k: v["steps"] for k, v in times.per_phase().items()},
        }
        cfg = self._adapter_cfg(req.guidance)
        record = {
            "tool": f"shiva-export {__version__}",
            "model": info.model,
            "backend": info.backend,
            "budget": budget_desc(info),
            "steps": req.steps,
            "guidance": req.guidance,
            "cfg": cfg,
            "height": req.height,
            "width": req.width,
            "device": str(self.pipes[1]._execution_device),
            "torch_threads": torch.get_num_threads(),
            "pipeline": info.to_dict(),
            "image": entry,
            "batch_size": batch,
            "replica": dict(self.replica),
            "versions": self.versions,
        }
        return {"png": data, "record": record}

    def _adapter_cfg(self, guidance: float) -> bool:
        return bool(pipeline_adapter(self.pipes[1]).uses_cfg(guidance))
