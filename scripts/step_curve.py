#!/usr/bin/env python
"""Dense prompt accuracy and FD of ``sd35-shapes`` against the number of sampler steps (the step curve).

The dense pipeline is loaded once and every caption of the fixed prompt set (``validate quality``'s) runs at
every step count with one seed; FD is measured against the same real reference ``validate quality`` uses
(256 rendered scenes of the same prompts, seed 1000), so the numbers are comparable to its table.

The knee is the fewest steps whose accuracy is within ``--tolerance`` points of the plateau, the plateau being
the mean accuracy of the step counts at or above the median of the curve's step counts (the top half: one
caption is 1.04 points at 96 captions, so the maximum alone would pick the luckiest count).

Run (one CPU thread, ~4 min for the default curve):

    .venv/bin/python scripts/step_curve.py --seed 1 --out docs/quality/step-curve.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(pipe, scenes, steps: int, seed: int, guidance: float, ref_feat) -> dict:
    import numpy as np

    from shiva_export.runtime.generate import run_pipeline
    from shiva_export.shapes.analyze import features, frechet_distance, prompt_correct
    from shiva_export.shapes.data import caption

    t0 = time.perf_counter()
    imgs = [
        np.asarray(run_pipeline(pipe, caption(s), steps=steps, guidance=guidance, seed=seed).image, dtype=np.float64)
        for s in scenes
    ]
    correct = [prompt_correct(im, s.attributes) for im, s in zip(imgs, scenes)]
    return {
        "steps": steps,
        "accuracy": float(np.mean([c["all"] for c in correct])),
        "correct": int(sum(c["all"] for c in correct)),
        "attributes": {a: float(np.mean([c[a] for c in correct])) for a in ("color", "shape", "size", "position")},
        "fd": frechet_distance(np.stack([features(im) for im in imgs]), ref_feat),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def knee(rows: list[dict], tolerance: float) -> tuple[int, float]:
    """(knee steps, plateau accuracy): plateau = mean accuracy of the top half of the step counts."""
    cut = statistics.median(r["steps"] for r in rows)
    plateau = statistics.mean(r["accuracy"] for r in rows if r["steps"] >= cut)
    ok = [r["steps"] for r in rows if r["accuracy"] >= plateau - tolerance / 100.0]
    return min(ok), plateau


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd35-shapes")
    ap.add_argument("--steps", type=int, nargs="+", default=[6, 8, 10, 12, 14, 17, 20, 28])
    ap.add_argument("--seed", type=int, default=1, help="the validation seed (seed 0 and 2+ are held out for reports)")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument(
        "--tolerance", type=float, default=1.0, help="points of accuracy below the plateau the knee may lose"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from shiva_export.recipe import load_recipe
    from shiva_export.runtime.pipeline import load_pipeline
    from shiva_export.shapes.analyze import features
    from shiva_export.shapes.data import render
    from shiva_export.utils.io import atomic_write_json
    from shiva_export.validate.quality import prompt_scenes, real_like

    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, dense=True)
    guidance = float(load_recipe(args.model).pipeline.guidance)
    scenes = prompt_scenes(args.prompts)
    ref_feat = np.stack(
        [features(render(s)[0]) for s in real_like(scenes, 256, seed=1000)]
    )  # validate quality's reference
    rows = []
    for n in sorted(args.steps):
        rows.append(measure(pipe, scenes, n, args.seed, guidance, ref_feat))
        r = rows[-1]
        print(
            f"steps {n:3d}: accuracy {r['accuracy']:.1%} ({r['correct']}/{len(scenes)}) FD {r['fd']:.3f} ({r['seconds']:.0f} s)",
            flush=True,
        )
    k, plateau = knee(rows, args.tolerance)
    print(
        f"plateau {plateau:.1%} (mean of the top half of the step counts); knee (within {args.tolerance:g} point) = {k} steps"
    )
    if args.out is not None:
        atomic_write_json(
            args.out,
            {
                "model": args.model,
                "method": "dense",
                "seed": args.seed,
                "prompts": len(scenes),
                "guidance": guidance,
                "n_ref": 256,
                "plateau": plateau,
                "plateau_rule": "mean accuracy of the step counts >= the median step count",
                "tolerance_points": args.tolerance,
                "knee_steps": k,
                "rows": rows,
                "torch": torch.__version__,
                "command": f"scripts/step_curve.py --seed {args.seed} --prompts {args.prompts} --steps {' '.join(map(str, args.steps))}",
            },
        )


if __name__ == "__main__":
    main()
