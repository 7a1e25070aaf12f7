"""Prompt accuracy and GFLOPs per image of sd35-shapes routers under context "keep" (validate quality, torch, one thread).

Usage: python scripts/context_router_quality.py OUT.json [PROMPTS] [SEED] [STEPS]   (defaults 96 1 14)
Rows (uniform keep 0.6 and the learned schedule, each with its own recipe's schedule):
  drop-router/drop   recipes/sd35-shapes.toml as shipped (router trained for context drop, routed with drop)
  drop-router/keep   the same recipe routed with context keep
  ctx-router/keep    recipes/sd35-shapes-ctx.toml (router and schedule trained with `train --context keep`)
Writes every row of validate_quality (and the settings) to OUT.json and prints one JSON line per row.
"""

from __future__ import annotations

import json
import sys
import time

from shiva_export.recipe import load_recipe
from shiva_export.utils.io import atomic_write_json
from shiva_export.validate.quality import validate_quality


def _variants():
    shipped = load_recipe("sd35-shapes")
    keep = shipped.model_copy(update={"prune": shipped.prune.model_copy(update={"context": "keep"})})
    return [
        ("drop-router/drop", shipped),
        ("drop-router/keep", keep),
        ("ctx-router/keep", load_recipe("sd35-shapes-ctx")),
    ]


def main(out: str, prompts: int, seed: int, steps: int) -> None:
    result = {"prompts": prompts, "seeds": [seed], "steps": steps, "rows": []}
    for label, rec in _variants():
        t0 = time.perf_counter()
        rep = validate_quality(
            model=rec.name,
            recipe=rec,
            methods=["shiva", "shiva-learned"],
            keeps=[0.6],
            prompts=prompts,
            seeds=[seed],
            steps=steps,
            latency_repeats=0,
            velocity_samples=1,
            threads=1,
        )
        for r in rep.rows:
            row = {
                "variant": label,
                "context": rec.prune.context,
                "router_sha256": rec.router.sha256,
                "method": r["method"],
                "keep": r["keep"],
                "accuracy": r["accuracy"],
                "accuracy_ci": r.get("accuracy_ci"),
                "mean_keep": r.get("mean_keep"),
                "psnr_to_dense": r.get("psnr"),
                "gflops_per_image": r.get("gflops"),
                "fd": r.get("fd"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    atomic_write_json(out, result)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]) if len(a) > 1 else 96, int(a[2]) if len(a) > 2 else 1, int(a[3]) if len(a) > 3 else 14)
