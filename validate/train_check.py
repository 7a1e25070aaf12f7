"""Benchmark of `shiva-export train` on sd35-tiny: trains (CPU), then prints the issue-5 measures.

Usage: python validate/train_check.py [--out-dir DIR] [--steps W P J] [--threads N] [--keep 0.6]

Prints: training time, relative output error vs the dense model on held-out seeds for the trained router,
the untrained (random, recipe seed) router and the L2-norm heuristic (score = ||x_i||) at a uniform keep,
the learned LUT's mean keep vs the target, and the keep table keep[t][block].
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from shiva_export.train import TrainConfig, evaluate_router, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd35-tiny")
    ap.add_argument("--out-dir", default="/tmp/shiva-train-check")
    ap.add_argument("--steps", type=int, nargs=3, default=(300, 150, 100))
    ap.add_argument("--lr-router", type=float, default=3e-3)
    ap.add_argument("--lr-policy", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--phases", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    cfg = TrainConfig(
        warmup_steps=a.steps[0], policy_steps=a.steps[1], joint_steps=a.steps[2], lr_router=a.lr_router, lr_policy=a.lr_policy,
        target_keep=a.keep, phases=a.phases, out_dir=a.out_dir, num_threads=a.threads,
    )
    t0 = time.perf_counter()
    res = train(a.model, cfg, progress=lambda ev: ev["event"] == "step" and ev["step"] % 50 == 0 and print(
        f"  step {ev['step']}/{ev['total']} {ev['stage']} loss {ev['loss']:.5f} keep {ev['mean_keep']:.3f}", file=sys.stderr, flush=True))
    train_s = time.perf_counter() - t0
    ev = evaluate_router(res.recipe_path, keep=a.keep)
    out = {
        "train_seconds": round(train_s, 1),
        "errors": ev.errors,
        "trained_vs_random": ev.ratio_vs_random,
        "trained_vs_l2": ev.errors["trained"] / ev.errors["l2"],
        "mean_keep": res.mean_keep,
        "raw_mean_keep": res.raw_mean_keep,
        "quantized_mean_keep": res.quantized_mean_keep,
        "target_keep": a.keep,
        "phases": res.phases,
    }
    if a.json:
        print(json.dumps(dict(out, lut=res.lut, timesteps=res.timesteps, layers=res.layers), indent=2))
        return 0
    print(f"training        {train_s:.1f} s ({res.step} steps, CPU)")
    print(f"rel. error @keep {a.keep}: trained {ev.errors['trained']:.5f} | untrained {ev.errors['random']:.5f} | L2 {ev.errors['l2']:.5f}")
    print(f"trained/untrained {out['trained_vs_random']:.3f} (issue asks <= 0.5) | trained/L2 {out['trained_vs_l2']:.3f} (asks < 1)")
    print(f"mean keep       {res.mean_keep:.4f} (target {a.keep}; raw {res.raw_mean_keep:.4f}; quantised k/N {res.quantized_mean_keep:.4f})")
    print("keep LUT  t       " + " ".join(f"b{b:<6d}" for b in res.layers))
    for t, row in zip(res.timesteps, res.lut):
        print(f"          {t:7.1f} " + " ".join(f"{v:.4f} " for v in row))
    for p in res.phases:
        print(f"phase {p['name']:<6} t {p['t_start']:.1f} -> {p['t_stop']:.1f}: k {p['k']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
