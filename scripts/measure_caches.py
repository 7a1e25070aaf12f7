"""Fraction of dense compute and PSNR vs dense of diffusers' caches (``runtime.caches.DEFAULT_GRID``) on a
torch pipeline, optionally stacked on Shiva routing; prints one JSON line per setting.

    PYTHONPATH=. python scripts/measure_caches.py --model sd35-shapes --prompts 8 --steps 28 [--ratio 0.4]

Prompts: every 12th caption of the 96 shapes captions (all attributes covered); seed 1; the recipe's
guidance. Single-threaded (shared CPU).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd35-shapes")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--ratio", type=float, default=None, help="Shiva ratio under the caches (default: dense model)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from shiva_export.runtime import caches as C
    from shiva_export.runtime.generate import psnr, run_pipeline
    from shiva_export.runtime.pipeline import load_pipeline
    from shiva_export.shapes.data import all_scenes, caption

    torch.set_num_threads(1)
    prompts = [caption(s) for s in all_scenes()[:: max(1, 96 // args.prompts)]][: args.prompts]
    dense = load_pipeline(args.model, backend="torch", dense=True)
    pipe = dense if args.ratio is None else load_pipeline(args.model, backend="torch", ratio=args.ratio)
    guidance = dense.shiva.recipe.pipeline.guidance

    def run(p):
        images, records = [], []
        for prompt in prompts:
            with C.count_executed_blocks(p) as rec:
                images.append(run_pipeline(p, prompt, steps=args.steps, guidance=guidance, seed=1).image)
            records += rec
        return images, C.executed_flops(records, p)

    t0 = time.perf_counter()
    ref, _ = run(dense)
    print(json.dumps({"setting": "dense", "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    rows = [(None, {})] if args.ratio is not None else []
    for kind, settings in rows + list(C.DEFAULT_GRID):
        extra = {"num_inference_steps": args.steps} if kind == "magcache" else {}
        t0 = time.perf_counter()
        info = C.enable_cache(pipe, kind, **settings, **extra) if kind else {}
        try:
            images, f = run(pipe)
        finally:
            if kind:
                C.disable_cache(pipe)
        psnrs = [psnr(a, b) for a, b in zip(images, ref)]
        print(
            json.dumps(
                {
                    "kind": kind or "shiva",
                    "settings": settings,
                    "ratio": args.ratio,
                    "flop_fraction": round(f.fraction, 4),
                    "block_fraction": round(f.block_fraction, 4),
                    "psnr_mean": round(float(np.mean(psnrs)), 2),
                    "psnr_min": round(float(np.min(psnrs)), 2),
                    "calibrated": "calibration" in info,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
