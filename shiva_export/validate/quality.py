"""``shiva-export validate quality``: the paper's quality-at-a-budget table (Table 1 / Table 3) in miniature.

For a trained model with procedural ground truth (``sd35-shapes``), a fixed prompt set and fixed seeds run
through the runtime (:func:`~shiva_export.runtime.generate.run_pipeline`) for every method at every keep
budget, and each row reports

- **FD**: the Fréchet distance of the images' analytic features (:func:`shiva_export.shapes.analyze.features`)
  to real rendered scenes of the same prompts (the FID analogue); ``real`` is the same distance for held-out
  real images of the same count, raw and after a round trip through the pipeline's VAE (the floor a perfect
  transformer would reach through this decoder);
- **prompt accuracy**: share of images whose colour, shape, size and position, read back by the analytic
  judge, all match the prompt (the CLIP-score analogue), and each attribute alone;
- **PSNR** and **MAD** (mean abs difference, 0-255 scale) to the dense image of the same prompt and seed;
- **latency**: median ms per image (the whole pipeline) over interleaved rounds of every configuration (so a
  busy machine slows all rows alike), **speedup** vs dense, and transformer FLOPs;
- **velocity error**: ``|v - v_dense|^2 / |v_dense|^2`` of one transformer call on noised *real* latents at
  fixed noise levels, and **FG kept**: the share of ground-truth foreground tokens that the selection keeps
  (chance = the keep ratio). The ``foreground`` oracle (a :class:`~shiva_export.prune.baselines.MaskScorer` on
  the true mask) is measured here only: it needs the mask, which a generated image does not have.

Methods: ``dense``; ``shiva`` (uniform keep, the recipe's router: trained when the recipe ships one);
``shiva-learned`` (the recipe's learned phase schedule, at its own mean keep); ``random``; ``l2norm``;
``spatial`` (a fixed ordered-dither spatial subset, training-free). All pruned methods share the same
static-k top-k path; only the token scores differ (:mod:`shiva_export.prune.baselines`).

Writes ``quality.json``, ``quality.md``, ``pareto.png`` and ``grid.png`` (one row per method and budget,
one column per prompt).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError

__all__ = ["METHODS", "KEEPS", "QualityReport", "validate_quality", "prompt_scenes"]

METHODS = ("dense", "shiva", "shiva-learned", "random", "l2norm", "spatial")
KEEPS = (0.8, 0.6, 0.4)
SIGMAS = (0.8, 0.6, 0.4, 0.2)
_FG_TOKEN = 0.25  # a token is foreground when at least a quarter of its pixels are


def prompt_scenes(n: int):
    """The first ``n`` of a fixed seeded permutation of every attribute combination (no jitter)."""
    import numpy as np

    from shiva_export.shapes.data import all_scenes

    scenes = all_scenes()
    if not 1 <= n <= len(scenes):
        raise ConfigError(f"--prompts {n} is out of range; choose 1..{len(scenes)} (every attribute combination once).")
    order = np.random.default_rng(0).permutation(len(scenes))
    return [scenes[i] for i in order[:n]]


def _real_like(prompts, n: int, seed: int):
    """``n`` real scenes cycling through ``prompts``, each with fresh jitter (seeded)."""
    from shiva_export.shapes.data import sample_scenes

    jit = sample_scenes(n, seed)
    return [dataclasses.replace(j, color=p.color, shape=p.shape, size=p.size, position=p.position) for j, p in zip(jit, (prompts[i % len(prompts)] for i in range(n)))]


@dataclasses.dataclass
class QualityReport:
    model: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]]
    real: dict[str, Any]
    velocity: list[dict[str, Any]]
    prompts: list[str]
    out_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "real": self.real, "rows": self.rows, "velocity": self.velocity,
                "prompts": self.prompts, "out_dir": self.out_dir}

    def oracle_ratio(self, keep: float = 0.6) -> float | None:
        """Velocity error of the foreground oracle over that of random selection at ``keep``."""
        err = {(v["method"], v["keep"]): v["velocity_error"] for v in self.velocity}
        a, b = err.get(("foreground", keep)), err.get(("random", keep))
        return None if a is None or not b else a / b

    def to_markdown(self) -> str:
        s = self.settings
        lines = [
            f"# Quality at a budget: {self.model}",
            "",
            f"{len(self.prompts)} prompts x {len(s['seeds'])} seed(s), {s['steps']} steps, CFG {s['guidance']}, {s['height']}x{s['width']} px, "
            f"torch {s['threads']} thread(s). FD: Fréchet distance of analytic features to {s['n_ref']} real scenes of the same prompts; "
            f"real held-out images of the same count reach FD {self.real['fd']:.3f} and prompt accuracy {self.real['accuracy']:.1%}; "
            f"after a round trip through the pipeline's VAE (the floor for any generated image) FD {self.real.get('vae_fd', math.nan):.3f} "
            f"and accuracy {self.real.get('vae_accuracy', math.nan):.1%}. "
            "Vel. err: relative velocity error of one call on noised real latents (sigmas "
            f"{', '.join(str(x) for x in s['sigmas'])}); FG kept: share of true foreground tokens kept (chance = keep).",
            "",
            "| Method | Keep | FD↓ | Prompt acc↑ | colour / shape / size / pos | PSNR↑ (dB) | MAD↓ | Vel. err↓ | FG kept↑ | FLOPs (G) | Latency (ms) | Speedup | ΔFLOPs (%) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            a = r["attributes"]
            keep = "1.00" if r["method"] == "dense" else f"{r['keep']:.2f}" + (f" (mean {r['mean_keep']:.2f})" if r["method"] == "shiva-learned" else "")
            lines.append(
                f"| {r['label']} | {keep} | {r['fd']:.3f} | {r['accuracy']:.1%} | {a['color']:.0%} / {a['shape']:.0%} / {a['size']:.0%} / {a['position']:.0%} | "
                f"{_fmt(r['psnr'], '.1f')} | {_fmt(r['mad'], '.2f')} | {_fmt(r.get('velocity_error'), '.4f')} | {_fmt(r.get('fg_kept'), '.1%')} | "
                f"{r['gflops']:.2f} | {r['latency_ms']:.0f} | {r['speedup']:.2f}x | {r['delta_flops']:.1f} |"
            )
        lines += ["", "Velocity error and foreground recall of every selection (including the ground-truth foreground oracle):", "",
                  "| Selection | Keep | Vel. err↓ | vs random | FG kept↑ |", "|---|---|---|---|---|"]
        rnd = {v["keep"]: v["velocity_error"] for v in self.velocity if v["method"] == "random"}
        for v in self.velocity:
            rel = v["velocity_error"] / rnd[v["keep"]] if rnd.get(v["keep"]) else math.nan
            lines.append(f"| {v['method']} | {v['keep']:.2f} | {v['velocity_error']:.4f} | {rel:.2f}x | {v['fg_kept']:.1%} |")
        ratio = self.oracle_ratio(0.6)
        if ratio is not None:
            lines += ["", f"Foreground oracle / random velocity error at keep 0.6: **{ratio:.2f}x** (target <= 0.6x: {'met' if ratio <= 0.6 else 'missed'})."]
        lines += ["", f"Router: {s['router']}."]
        return "\n".join(lines) + "\n"


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _route_phase(rec, n_layers: int, keep: float):
    from shiva_export.prune.schedule import uniform_phase

    return (uniform_phase(n_layers, round(1.0 - keep, 6), rec.routed_blocks(n_layers)),)


def _scorer(method: str, bank, seed: int):
    from shiva_export.prune.baselines import NormScorer, RandomScorer, SpatialScorer

    if method in ("shiva", "shiva-learned"):
        return bank
    if method == "random":
        return RandomScorer(seed)
    if method == "l2norm":
        return NormScorer()
    if method == "spatial":
        return SpatialScorer()
    raise ConfigError(f"--method {method!r} is unknown; choose from {', '.join(METHODS)}.")


def _mean_keep(phases, trace: Sequence[str]) -> float:
    by = {p.name: p for p in phases}
    vals = []
    for name in trace:
        ks = [k for k in by[name].keep_ratios if k is not None]
        vals.append(sum(ks) / len(ks))
    return sum(vals) / len(vals) if vals else math.nan


def _gflops(config, n_tokens: int, text_len: int, phases, trace: Sequence[str], bottleneck: int, model_batch: int) -> float:
    """Transformer GFLOPs of one image: the sum over its denoising steps (phase per step from the trace)."""
    from shiva_export.validate.flops import count_flops

    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if not phases:
        return len(trace) * float(count_flops(cfg, n_tokens, text_len, None, batch=model_batch).total) / 1e9
    by = {p.name: p for p in phases}
    cache: dict[str, float] = {}
    total = 0.0
    for name in trace:
        if name not in cache:
            cache[name] = float(count_flops(cfg, n_tokens, text_len, by[name].keep_ratios, batch=model_batch, bottleneck=bottleneck).total)
        total += cache[name]
    return total / 1e9


def _velocity_inputs(pipe, scenes, sigmas, seed: int, max_seq: int):
    """Noised real latents, their text conditioning and token masks, for the one-call velocity check."""
    import numpy as np
    import torch

    from shiva_export.shapes.data import caption, render_batch, token_mask

    x, masks = render_batch(scenes)
    vae = pipe.vae
    with torch.inference_mode():
        z = vae.encode(torch.from_numpy(x).to(vae.dtype)).latent_dist.mean
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        embeds, pooled = [], []
        for s in scenes:
            c = caption(s)
            pe, _, pp, _ = pipe.encode_prompt(c, c, c, device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_seq)
            embeds.append(pe)
            pooled.append(pp)
    grid = z.shape[-1] // pipe.transformer.config.patch_size
    tm = torch.from_numpy(token_mask(masks, grid))
    g = torch.Generator().manual_seed(seed)
    cases = []
    for sigma in sigmas:
        noise = torch.randn(z.shape, generator=g)
        xt = (1 - sigma) * z + sigma * noise
        cases.append({"hidden_states": xt, "encoder_hidden_states": torch.cat(embeds), "pooled_projections": torch.cat(pooled),
                      "timestep": torch.full((len(scenes),), sigma * 1000.0)})
    return cases, tm, np.asarray(masks)


def _velocity(transformer, cases, tm, dense_out):
    """(relative velocity error, foreground recall) of the transformer's current selection."""
    import torch

    from shiva_export.prune.api import record_selection

    errs, recalls = [], []
    fg = tm >= _FG_TOKEN
    with torch.inference_mode():
        for case, ref in zip(cases, dense_out):
            with record_selection(transformer) as rec:
                out = transformer(**case).sample
            errs.append(float(((out - ref) ** 2).sum() / (ref**2).sum()))
            for r in rec:
                idx = r["indices"]  # (B, k)
                kept = torch.zeros_like(fg)
                kept.scatter_(1, idx, True)
                n_fg = fg.sum(1).clamp(min=1)
                recalls.append(float(((kept & fg).sum(1).float() / n_fg.float()).mean()))
    return sum(errs) / len(errs), (sum(recalls) / len(recalls) if recalls else math.nan)


def validate_quality(
    *,
    model: str = "sd35-shapes",
    recipe=None,
    weights=None,
    methods: Sequence[str] | None = None,
    keeps: Sequence[float] | None = None,
    prompts: int = 24,
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    guidance: float | None = None,
    n_ref: int = 256,
    velocity_samples: int = 16,
    sigmas: Sequence[float] = SIGMAS,
    threads: int | None = 1,
    latency_repeats: int = 3,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> QualityReport:
    """Runs the quality table (see the module docstring) and writes its files to ``out_dir``.

    Args:
        model (str): A model whose prompts are shape captions (``sd35-shapes``). Defaults to ``sd35-shapes``.
        weights (PathLike): A transformer or pipeline folder, loaded as ``generate --weights`` loads it (a recipe
            bound by sha256, e.g. ``train --dora``'s, takes only its own weights). Defaults to the recipe's.
        methods (list[str]): Subset of :data:`METHODS`. Defaults to all.
        keeps (list[float]): Keep budgets of the uniform methods. Defaults to :data:`KEEPS`.
        prompts (int): How many prompts of the fixed set. Defaults to 24.
        seeds (list[int]): Seeds per prompt. Defaults to (0,).
        steps (int): Denoising steps. Defaults to the recipe's.
        guidance (float): CFG scale. Defaults to the recipe's.
        n_ref (int): Real scenes of the FD reference. Defaults to 256.
        velocity_samples (int): Real scenes of the velocity / foreground check. Defaults to 16.
        threads (int): torch CPU threads. Defaults to 1.
        latency_repeats (int): Interleaved timing rounds of every configuration (one prompt each) after
            generation; 0 keeps the median of the generation calls. Defaults to 3.
        out_dir (PathLike): Where to write quality.{json,md}, pareto.png, grid.png. Defaults to None.
    """
    import numpy as np
    import torch

    from shiva_export.prune.api import set_shiva_phases_
    from shiva_export.prune.baselines import MaskScorer, RandomScorer, set_scorer_
    from shiva_export.prune.schedule import phases_from_recipe
    from shiva_export.runtime.generate import psnr, run_pipeline
    from shiva_export.runtime.pipeline import _recipe, load_pipeline
    from shiva_export.shapes.analyze import features, frechet_distance, prompt_correct
    from shiva_export.shapes.data import caption, render

    say = progress or (lambda m: None)
    methods = list(methods or METHODS)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--method {m!r} is unknown; choose from {', '.join(METHODS)}.")
    if "dense" not in methods:
        methods.insert(0, "dense")  # PSNR, MAD and the speedup are relative to dense
    keeps = [float(k) for k in (keeps or KEEPS)]
    for k in keeps:
        if not 0.0 < k <= 1.0:
            raise ConfigError(f"--keep {k} is out of range; expected 0 < keep <= 1 (fraction of image tokens kept).")
    if not seeds:
        raise ConfigError("--seed needs at least one value.")
    if latency_repeats < 0:
        raise ConfigError(f"--latency-repeats {latency_repeats} is negative; expected >= 0.")
    if n_ref < 2 or velocity_samples < 1:
        raise ConfigError("--n-ref must be >= 2 and --velocity-samples >= 1.")
    if threads:
        torch.set_num_threads(int(threads))
    rec = _recipe(model, recipe)
    scenes = prompt_scenes(prompts)
    texts = [caption(s) for s in scenes]
    steps = int(steps or rec.pipeline.steps)
    guidance = float(rec.pipeline.guidance if guidance is None else guidance)

    say("load pipelines")
    dense_pipe = load_pipeline(rec.name, recipe=rec, weights=weights, dense=True)
    pipe = load_pipeline(rec.name, recipe=rec, weights=weights, ratio=round(1.0 - keeps[0], 6))
    tf = pipe.transformer
    from shiva_export.prune.api import _ROUTERS_ATTR

    bank = tf._modules[_ROUTERS_ATTR]
    n_layers = len(tf.transformer_blocks)
    config = dict(tf.config)
    info = pipe.shiva
    n_tokens = (info.height // 8 // tf.config.patch_size) * (info.width // 8 // tf.config.patch_size)
    model_batch = 2 if guidance > 1.0 else 1
    router_desc = info.router.get("source", "?") if isinstance(info.router, dict) else str(info.router)
    trained = rec.router.weights is not None
    learned = rec.schedule is not None and bool(rec.schedule.phases)

    # ------------------------------------------------------------------ configurations (method, keep, phases)
    configs: list[tuple[str, float, Any]] = [("dense", 1.0, None)]
    for m in methods:
        if m == "dense":
            continue
        if m == "shiva-learned":
            if learned:
                configs.append((m, float(rec.schedule.target_keep), phases_from_recipe(rec, n_layers)))
            continue
        for k in keeps:
            configs.append((m, k, _route_phase(rec, n_layers, k)))

    # ------------------------------------------------------------------ real references
    say("real reference features")
    ref_scenes = _real_like(scenes, n_ref, seed=1000)
    ref_feat = np.stack([features(render(s)[0]) for s in ref_scenes])
    n_gen = len(scenes) * len(seeds)
    held = _real_like(scenes, max(2, n_gen), seed=2000)
    held_imgs = [render(s)[0] for s in held]
    held_feat = np.stack([features(im) for im in held_imgs])
    real = {"fd": frechet_distance(held_feat, ref_feat), "accuracy": float(np.mean([prompt_correct(im, s.attributes)["all"] for im, s in zip(held_imgs, held)])), "n": len(held)}
    # The same held-out images after a round trip through the pipeline's VAE: the floor a generator can reach.
    vae = pipe.vae
    with torch.inference_mode():
        xb = torch.from_numpy(np.stack(held_imgs).transpose(0, 3, 1, 2).astype(np.float32) * 2.0 - 1.0).to(vae.dtype)
        rt = vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1).float().numpy()
    rt_imgs = list((rt.transpose(0, 2, 3, 1) + 1.0) / 2.0)
    real["vae_fd"] = frechet_distance(np.stack([features(im) for im in rt_imgs]), ref_feat)
    real["vae_accuracy"] = float(np.mean([prompt_correct(im, s.attributes)["all"] for im, s in zip(rt_imgs, held)]))

    # ------------------------------------------------------------------ velocity error and foreground recall on real latents
    say("velocity check")
    vel_scenes = _real_like(scenes, velocity_samples, seed=3000)
    cases, tm, _ = _velocity_inputs(pipe, vel_scenes, sigmas, seed=4000, max_seq=info.max_sequence_length)
    with torch.inference_mode():
        dense_out = [dense_pipe.transformer(**c).sample for c in cases]
    velocity: list[dict[str, Any]] = []
    vel_of: dict[tuple[str, float], tuple[float, float]] = {}
    vel_methods = [m for m in methods if m not in ("dense",)] + ["foreground"]
    for m in vel_methods:
        if m == "shiva-learned":
            if not learned:
                continue
            set_shiva_phases_(tf, phases_from_recipe(rec, n_layers), auto_cfg=True)
            set_scorer_(tf, bank)
            e, r = _velocity(tf, cases, tm, dense_out)
            k = float(rec.schedule.target_keep)
        for k in ([float(rec.schedule.target_keep)] if m == "shiva-learned" else keeps):
            if m != "shiva-learned":
                set_shiva_phases_(tf, _route_phase(rec, n_layers, k), auto_cfg=True)
                if m == "foreground":
                    jitter = torch.rand(tm.shape, generator=torch.Generator().manual_seed(5000)) * 1e-3
                    set_scorer_(tf, MaskScorer(tm + jitter))
                else:
                    set_scorer_(tf, _scorer(m, bank, seed=6000))
                e, r = _velocity(tf, cases, tm, dense_out)
            velocity.append({"method": m, "keep": k, "velocity_error": e, "fg_kept": r})
            vel_of[(m, k)] = (e, r)
    set_scorer_(tf, bank)

    # ------------------------------------------------------------------ generation
    rows: list[dict[str, Any]] = []
    images: dict[tuple[str, float], list] = {}
    dense_imgs: list = []
    for ci, (m, k, phases) in enumerate(configs):
        label = "Dense" if m == "dense" else {"shiva": "Shiva (uniform)", "shiva-learned": "Shiva (learned schedule)", "random": "Random router",
                                               "l2norm": "L2-norm heuristic", "spatial": "Spatial downsample"}[m]
        say(f"generate {label} keep {k:.2f} ({ci + 1}/{len(configs)})")
        if m == "dense":
            p = dense_pipe
        else:
            p = pipe
            set_shiva_phases_(tf, phases, auto_cfg=True)
            set_scorer_(tf, _scorer(m, bank, seed=7000))
        imgs, lat, traces = [], [], []
        for s_i, text in enumerate(texts):
            for seed in seeds:
                if m == "random":
                    tf._modules[_ROUTERS_ATTR] = RandomScorer(7000 + 131 * s_i + seed)
                res = run_pipeline(p, text, steps=steps, guidance=guidance, seed=int(seed))
                imgs.append(np.asarray(res.image, dtype=np.float64))
                lat.append(res.times.total)
                traces.append(res.times.phase_trace if m != "dense" else ["dense"] * steps)
        if m == "dense":
            dense_imgs = imgs
        feats = np.stack([features(im) for im in imgs])
        correct = [prompt_correct(im, sc.attributes) for im, sc in zip(imgs, (s for s in scenes for _ in seeds))]
        gfl = _gflops(config, n_tokens, info.text_len, phases, traces[0], rec.router.bottleneck, model_batch) if m != "dense" else \
            _gflops(config, n_tokens, info.text_len, None, traces[0], rec.router.bottleneck, model_batch)
        row: dict[str, Any] = {
            "method": m, "label": label + ("" if m in ("dense", "random", "l2norm", "spatial") or trained else " [untrained router]"),
            "keep": k, "fd": frechet_distance(feats, ref_feat) if len(feats) >= 2 else math.nan,
            "accuracy": float(np.mean([c["all"] for c in correct])),
            "attributes": {a: float(np.mean([c[a] for c in correct])) for a in ("color", "shape", "size", "position")},
            "latency_ms": statistics.median(lat), "gflops": gfl,
        }
        if m == "shiva-learned":
            row["mean_keep"] = _mean_keep(phases, traces[0])
        if m != "dense":
            ps = [psnr(a, b) for a, b in zip(imgs, dense_imgs)]
            finite = [v for v in ps if math.isfinite(v)]
            row["psnr"] = statistics.mean(finite) if finite else math.inf
            row["mad"] = float(np.mean([np.abs(a - b).mean() * 255.0 for a, b in zip(imgs, dense_imgs)]))
            e_r = vel_of.get((m, k))
            if e_r:
                row["velocity_error"], row["fg_kept"] = e_r
        else:
            row["psnr"], row["mad"], row["velocity_error"], row["fg_kept"] = None, None, 0.0, 1.0
        rows.append(row)
        images[(m, k)] = imgs
    # ------------------------------------------------------------------ latency: every configuration, interleaved (round robin)
    say(f"latency ({latency_repeats} interleaved rounds)")
    timed: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    for _ in range(latency_repeats):
        for ci, (m, k, phases) in enumerate(configs):
            if m == "dense":
                p = dense_pipe
            else:
                p = pipe
                set_shiva_phases_(tf, phases, auto_cfg=True)
                set_scorer_(tf, _scorer(m, bank, seed=8000))
            timed[ci].append(run_pipeline(p, texts[0], steps=steps, guidance=guidance, seed=int(seeds[0])).times.total)
    for ci, r in enumerate(rows):
        r["generation_latency_ms"] = r["latency_ms"]
        if timed[ci]:
            r["latency_ms"] = statistics.median(timed[ci])
    set_scorer_(tf, bank)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["latency_ms"] / r["latency_ms"] if r["latency_ms"] else math.nan
        r["delta_flops"] = 100.0 * (1.0 - r["gflops"] / base["gflops"]) if base["gflops"] else 0.0

    settings = {"steps": steps, "guidance": guidance, "seeds": [int(s) for s in seeds], "keeps": keeps, "methods": methods,
                "height": info.height, "width": info.width, "threads": threads, "n_ref": n_ref, "velocity_samples": velocity_samples,
                "sigmas": [float(s) for s in sigmas], "latency_repeats": latency_repeats,
                "router": f"{'trained' if trained else 'seeded random init (no trained router in the recipe)'} ({router_desc})",
                "learned_schedule": learned, "torch": torch.__version__}
    report = QualityReport(model=rec.name, settings=settings, rows=rows, real=real, velocity=velocity, prompts=texts)
    if out_dir is not None:
        _write(report, Path(out_dir), images, configs, texts, len(seeds))
    return report


def _pareto_png(report: QualityReport) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"dense": "black", "shiva": "#d62728", "shiva-learned": "#ff7f0e", "random": "#7f7f7f", "l2norm": "#1f77b4", "spatial": "#2ca02c"}
    for ax, key, name, better_low in ((axes[0], "fd", "Fréchet distance (analytic features) ↓", True), (axes[1], "accuracy", "prompt accuracy ↑", False)):
        pts = sorted(((r["latency_ms"], r[key]) for r in report.rows if math.isfinite(r[key])))
        front, best = [], None
        for x, y in pts:
            if best is None or (y < best if better_low else y > best):
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="#bbbbbb", zorder=0, label="Pareto front")
        seen = set()
        for r in report.rows:
            lab = r["method"] if r["method"] not in seen else None
            seen.add(r["method"])
            ax.scatter(r["latency_ms"], r[key], color=colors.get(r["method"], "purple"), label=lab, s=36)
            ax.annotate(f"{r['keep']:.1f}", (r["latency_ms"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "fd":
            ax.axhline(report.real["fd"], color="#9467bd", lw=0.8, ls=":", label="real held-out")
        ax.set_xlabel("median latency per image (ms)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{report.model}: quality vs latency (labels: keep ratio)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _write(report: QualityReport, out: Path, images, configs, texts, n_seeds: int) -> None:
    import io

    from shiva_export.runtime.generate import _to_pil, image_grid
    from shiva_export.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable

    check_writable(out / "quality.json", "quality report")
    report.out_dir = str(out)
    rows, labels = [], []
    for (m, k, _), r in zip(configs, report.rows):
        imgs = images[(m, k)][::n_seeds]  # the first seed of every prompt
        rows.append([_to_pil(im) for im in imgs])
        labels.append(f"{m} {k:.2f}")
    grid = image_grid(rows, labels=[f"p{i}" for i in range(len(texts))], row_labels=labels)
    buf = io.BytesIO()
    grid.quantize(colors=256, method=2).save(buf, format="PNG", optimize=True)  # flat scenes: 256 colours lose little
    atomic_write_bytes(out / "grid.png", buf.getvalue())
    atomic_write_bytes(out / "pareto.png", _pareto_png(report))
    md = report.to_markdown() + "\nPrompts (grid columns): " + "; ".join(f"p{i} {t}" for i, t in enumerate(texts)) + "\n"
    atomic_write_text(out / "quality.md", md)
    atomic_write_json(out / "quality.json", _finite(report.to_dict()) | {"generated_unix": int(time.time())})


def _finite(obj):
    """JSON-safe copy: inf/nan floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
