"""Prompt accuracy and GFLOPs per image of sd35-shapes, context "drop" vs "keep" (torch backend, one thread).

Usage: python scripts/context_kept_accuracy.py CAPTIONS STEPS SEED SPEC [SPEC ...]
  SPEC = drop:RATIO | keep:RATIO | dense   (RATIO is the fraction of image tokens pruned; 0.4 keeps 60%)
  e.g. python scripts/context_kept_accuracy.py 24 11 1 drop:0.4 keep:0.4 dense
Captions are validate quality's (the first CAPTIONS of its fixed permutation), judged by shapes.analyze.prompt_correct.
Prints one JSON line per SPEC.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from shiva_export.models import get_adapter
from shiva_export.runtime.generate import run_pipeline
from shiva_export.runtime.pipeline import load_pipeline
from shiva_export.shapes.analyze import prompt_correct
from shiva_export.shapes.data import caption
from shiva_export.validate.quality import prompt_scenes


def main(n_captions: int, steps: int, seed: int, specs: list[str]) -> None:
    torch.set_num_threads(1)
    scenes = prompt_scenes(n_captions)
    for spec in specs:
        context, _, r = spec.partition(":")
        dense = context == "dense"
        t0 = time.perf_counter()
        pipe = load_pipeline(
            "sd35-shapes", dense=dense, ratio=None if dense else float(r), context=None if dense else context
        )
        info = pipe.shiva
        correct = [
            prompt_correct(
                run_pipeline(pipe, caption(s), steps=steps, guidance=info.recipe.pipeline.guidance, seed=seed).image,
                s.attributes,
            )
            for s in scenes
        ]
        cfg = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
        keeps = None if dense else info.phases[0].keep_ratios
        n_tokens = get_adapter("sd3").num_image_tokens(pipe.transformer.config, info.height, info.width)
        flops = get_adapter("sd3").count_flops(
            cfg,
            n_tokens,
            info.text_len,
            keeps,
            batch=2,
            bottleneck=info.recipe.router.bottleneck,
            context=info.context or "drop",
        )
        print(
            json.dumps(
                {
                    "spec": spec,
                    "captions": n_captions,
                    "steps": steps,
                    "seed": seed,
                    "accuracy": float(np.mean([c["all"] for c in correct])),
                    "attributes": {
                        a: float(np.mean([c[a] for c in correct])) for a in ("color", "shape", "size", "position")
                    },
                    "gflops_per_image": steps * flops.total / 1e9,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
