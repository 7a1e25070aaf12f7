"""Why does stage-3 DoRA damage the sd35-shapes backbone? Small bounded runs (issue 17, part 3).

Every run shares stages 1-2 (router warm-up 300, policy 150 steps, batch 4, seed 0, one thread: deterministic) and
differs only in stage 3 (500 steps by default): a ``prefix`` run stops after stage 2 and each ``stage3`` run resumes a
copy of its checkpoint with its own stage-3 settings. ``eval`` scores a run's written recipe on the fixed prompt set
of ``validate quality`` (24 captions, seed 1, 11 steps, CFG 2.0): prompt accuracy of the merged backbone run dense,
and at uniform keep 0.6 with the run's router; dense accuracy without CFG (guidance 1); and the relative velocity
change of the merged backbone against the base on noised real latents, conditional and unconditional ("") text apart.

    python scripts/dora_diagnosis.py prefix --rank 32
    python scripts/dora_diagnosis.py stage3 r32-lr1e-4 --rank 32 --lr 1e-4
    python scripts/dora_diagnosis.py stage3 r32-dense1 --rank 32 --lr 1e-4 --dense-weight 1
    python scripts/dora_diagnosis.py stage3 nodora --no-dora                 # stages 1-3 without DoRA, from scratch
    python scripts/dora_diagnosis.py prefix --rank 32 --caption-dropout 0.1   # then stage3 NAME --caption-dropout 0.1
    python scripts/dora_diagnosis.py eval r32-lr1e-4          # or: eval base
    python scripts/dora_diagnosis.py table

Outputs: build/dora/<name>/ (training outputs, eval.json). Data: --data (default build/shapes/latents), made by
``scripts/train_shapes.py --stages latents``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "dora"
STAGES = (300, 150)
COMMON = dict(
    batch=4,
    phases=2,
    sampler_steps=28,
    sampler_shift=1.0,
    lr_router=3e-3,
    lr_policy=1e-4,
    seed=0,
    num_threads=1,
    checkpoint_every=10_000,
)


def _data(args) -> str:
    return str(Path(args.data).resolve())


def _config(args, out: Path, dora: bool, rank: int, **extra):
    from shiva_export.train import TrainConfig

    kw = dict(
        COMMON, warmup_steps=STAGES[0], policy_steps=STAGES[1], joint_steps=args.joint, data=args.data, out_dir=out
    )
    if dora:
        kw.update(dora=True, dora_rank=rank, dora_alpha=float(rank))
    return TrainConfig(**kw, **extra)


def _prefix(args) -> Path:
    return OUT / (f"prefix-r{args.rank}" + (f"-cd{args.caption_dropout:g}" if args.caption_dropout else ""))


def _with_null(args) -> str:
    """A copy of the data folder (links) plus null.safetensors: the pipeline's own encoding of "" (CFG's uncond)."""
    import torch
    from safetensors.torch import save_file

    from shiva_export.runtime.pipeline import load_pipeline

    dst = OUT / "latents-null"
    if (dst / "null.safetensors").is_file():
        return str(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(args.data).glob("*.safetensors")):
        if not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    pipe = load_pipeline("sd35-shapes", dense=True)
    with torch.inference_mode():
        pe, _, pp, _ = pipe.encode_prompt(
            "",
            "",
            "",
            device="cpu",
            do_classifier_free_guidance=False,
            max_sequence_length=pipe.shiva.max_sequence_length,
        )
    save_file({"prompt_embeds": pe[0].contiguous(), "pooled": pp[0].contiguous()}, str(dst / "null.safetensors"))
    return str(dst)


def cmd_prefix(args) -> None:
    from shiva_export.train import train

    out = _prefix(args)
    extra = {}
    if args.caption_dropout:  # the data stream differs from the first step on: its own prefix
        args.data = _with_null(args)
        extra["caption_dropout"] = args.caption_dropout
    t0 = time.time()
    res = train("sd35-shapes", _config(args, out, True, args.rank, stop_at_step=sum(STAGES), **extra))
    print(f"prefix r{args.rank}: step {res.step} in {time.time() - t0:.0f} s -> {out}", flush=True)


def cmd_stage3(args) -> None:
    from shiva_export.train import train

    out = OUT / args.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    extra = dict(stage3_keep=args.stage3_keep, flow_weight=args.flow_weight)
    if args.dense_weight:
        extra["dense_weight"] = args.dense_weight
    if args.caption_dropout:  # the null text ("") replaces a sample's caption with this probability
        args.data = _with_null(args)
        extra["caption_dropout"] = args.caption_dropout
    dora = not args.no_dora
    if dora:  # resume a copy of the shared stages 1-2
        extra["lr_dora"] = args.lr
        shutil.copy(_prefix(args) / "checkpoint.pt", out / "checkpoint.pt")
        extra["resume"] = True
    t0 = time.time()
    res = train("sd35-shapes", _config(args, out, dora, args.rank, **extra))
    hist = [h for h in res.history if h["stage"] == "joint"]
    first, last = hist[0], hist[-1]
    summary = {
        "name": args.name,
        "seconds": round(time.time() - t0, 1),
        "joint_steps": len(hist),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "loss_first": first["loss"],
        "loss_last10": sum(h["loss"] for h in hist[-10:]) / min(10, len(hist)),
        "distill_last10": sum(h["distill"] for h in hist[-10:]) / min(10, len(hist)),
        "flow_last10": None if last["flow"] is None else sum(h["flow"] for h in hist[-10:]) / min(10, len(hist)),
        "dense_last10": None if last.get("dense") is None else sum(h["dense"] for h in hist[-10:]) / min(10, len(hist)),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


def _velocity_drift(pipe, base_pipe, n: int = 8):
    """Relative squared change of the merged backbone's velocity against the base's, dense, on noised real latents:
    conditional text, unconditional ("") text, and their CFG combination (guidance 2)."""
    import torch

    from shiva_export.validate.quality import SIGMAS, _velocity_inputs, prompt_scenes, real_like

    scenes = real_like(prompt_scenes(24), n, seed=3000)
    cases, _, _ = _velocity_inputs(base_pipe, scenes, SIGMAS, seed=4000, max_seq=base_pipe.shiva.max_sequence_length)
    with torch.inference_mode():
        pe, _, pp, _ = base_pipe.encode_prompt(
            "",
            "",
            "",
            device="cpu",
            do_classifier_free_guidance=False,
            max_sequence_length=base_pipe.shiva.max_sequence_length,
        )
    sums = {"cond": [0.0, 0.0], "uncond": [0.0, 0.0], "cfg": [0.0, 0.0]}
    with torch.inference_mode():
        for c in cases:
            u = dict(
                c,
                encoder_hidden_states=pe.expand_as(c["encoder_hidden_states"]),
                pooled_projections=pp.expand_as(c["pooled_projections"]),
            )
            vc, vu = pipe.transformer(**c).sample, pipe.transformer(**u).sample
            bc, bu = base_pipe.transformer(**c).sample, base_pipe.transformer(**u).sample
            for key, a, b in (
                ("cond", vc, bc),
                ("uncond", vu, bu),
                ("cfg", vu + 2.0 * (vc - vu), bu + 2.0 * (bc - bu)),
            ):
                sums[key][0] += float(((a - b) ** 2).sum())
                sums[key][1] += float((b**2).sum())
    return {k: v[0] / v[1] for k, v in sums.items()}


def _held_out(pipe, n: int = 16):
    """(latents, prompt_embeds, pooled) of ``n`` freshly rendered real scenes of the prompt set (not training data)."""
    import torch

    from shiva_export.shapes.data import caption, render_batch
    from shiva_export.validate.quality import prompt_scenes, real_like

    scenes = real_like(prompt_scenes(24), n, seed=3000)
    x, _ = render_batch(scenes)
    vae = pipe.vae
    with torch.inference_mode():
        z = vae.encode(torch.from_numpy(x).to(vae.dtype)).latent_dist.mean
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        enc = [
            pipe.encode_prompt(
                caption(s),
                caption(s),
                caption(s),
                device="cpu",
                do_classifier_free_guidance=False,
                max_sequence_length=pipe.shiva.max_sequence_length,
            )
            for s in scenes
        ]
    return z, torch.cat([e[0] for e in enc]), torch.cat([e[2] for e in enc])


def _training(data: str, n: int = 16):
    """The first ``n`` cached training samples."""
    import torch
    from safetensors.torch import load_file

    files = sorted(f for f in Path(data).glob("*.safetensors") if f.name != "null.safetensors")[:n]
    d = [load_file(str(f)) for f in files]
    return tuple(torch.stack([x[k].float() for x in d]) for k in ("latents", "prompt_embeds", "pooled"))


def _flow_loss(transformer, z, pe, pp, sigmas=(0.8, 0.6, 0.4, 0.2), seed: int = 4000) -> float:
    """Mean flow-matching loss ``|v - (eps - x0)|^2`` per element at fixed noise and sigmas (timestep = 1000 sigma)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tot = 0.0
    with torch.inference_mode():
        for sigma in sigmas:
            eps = torch.randn(z.shape, generator=g)
            v = transformer(
                hidden_states=(1 - sigma) * z + sigma * eps,
                encoder_hidden_states=pe,
                pooled_projections=pp,
                timestep=torch.full((len(z),), sigma * 1000.0),
            ).sample
            tot += float(((v - (eps - z)) ** 2).mean())
    return tot / len(sigmas)


def _block_updates(transformer, z, pe, pp, sigmas=(0.8, 0.6, 0.4, 0.2), seed: int = 4000) -> list[float]:
    """Mean norm of each block's update to the image tokens, ``|h_b - h_(b-1)|`` (block 0: none), run dense."""
    import torch

    from shiva_export.models import get_adapter

    adapter = get_adapter(transformer)
    outs: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_hook(lambda m, a, o, b=b: outs.__setitem__(b, adapter.block_image_output(o)))
        for b, blk in enumerate(adapter.blocks(transformer))
    ]
    g = torch.Generator().manual_seed(seed)
    norms: dict[int, float] = {}
    try:
        with torch.inference_mode():
            for sigma in sigmas:
                eps = torch.randn(z.shape, generator=g)
                transformer(
                    hidden_states=(1 - sigma) * z + sigma * eps,
                    encoder_hidden_states=pe,
                    pooled_projections=pp,
                    timestep=torch.full((len(z),), sigma * 1000.0),
                )
                for b in range(1, len(outs)):
                    norms[b] = norms.get(b, 0.0) + float((outs[b] - outs[b - 1]).float().norm(dim=-1).mean()) / len(
                        sigmas
                    )
    finally:
        for h in hooks:
            h.remove()
    return [norms[b] for b in sorted(norms)]


def _flow_table(dense, pruned, base, data: str) -> dict:
    """Flow-matching loss on held-out real scenes and on training samples: base dense, this backbone dense, and this
    backbone at uniform keep 0.6 with its router."""
    out = {}
    for split, batch in (("held_out", _held_out(base)), ("train", _training(data))):
        out[split] = {
            "base_dense": _flow_loss(base.transformer, *batch),
            "dense": _flow_loss(dense.transformer, *batch),
            "keep06": _flow_loss(pruned.transformer, *batch),
        }
    return out


def _accuracy(pipe, scenes, steps: int, guidance: float, seed: int) -> float:
    import numpy as np

    from shiva_export.runtime.generate import run_pipeline
    from shiva_export.shapes.analyze import prompt_correct
    from shiva_export.shapes.data import caption

    ok = [
        prompt_correct(
            np.asarray(
                run_pipeline(pipe, caption(s), steps=steps, guidance=guidance, seed=seed).image, dtype=np.float64
            ),
            s.attributes,
        )["all"]
        for s in scenes
    ]
    return float(np.mean(ok))


def cmd_eval(args) -> None:
    import torch

    from shiva_export.runtime.pipeline import load_pipeline
    from shiva_export.validate.quality import prompt_scenes

    torch.set_num_threads(1)
    t0 = time.time()
    scenes = prompt_scenes(args.prompts)
    recipe = None if args.name == "base" else OUT / args.name / "recipe.toml"
    base = load_pipeline("sd35-shapes", dense=True)
    dense = load_pipeline("sd35-shapes", recipe=recipe, dense=True) if recipe else base
    pruned = load_pipeline("sd35-shapes", recipe=recipe, ratio=0.4)  # base: the shipped router
    res = {
        "name": args.name,
        "prompts": args.prompts,
        "seed": args.seed,
        "steps": args.steps,
        "dense_acc": _accuracy(dense, scenes, args.steps, 2.0, args.seed),
        "keep06_acc": _accuracy(pruned, scenes, args.steps, 2.0, args.seed),
        "dense_acc_cfg1": _accuracy(dense, scenes, args.steps, 1.0, args.seed),
    }
    if recipe is not None and (OUT / args.name / "transformer").is_dir():
        res["drift"] = _velocity_drift(dense, base)
    res["flow"] = _flow_table(dense, pruned, base, args.data)
    if dense is not base:  # how much larger (> 1) or smaller each block's dense update is than the base's
        held = _held_out(base)
        res["update_ratio"] = [
            round(a / b, 4)
            for a, b in zip(_block_updates(dense.transformer, *held), _block_updates(base.transformer, *held))
        ]
    res["seconds"] = round(time.time() - t0, 1)
    (OUT / args.name).mkdir(parents=True, exist_ok=True)
    (OUT / args.name / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res), flush=True)


def cmd_weights(args) -> None:
    """Per block, how far the merged linears moved from the base: relative Frobenius change, the mean relative change of
    the row norms (DoRA's magnitude) and the mean 1 - cosine of the rows (its direction)."""
    import re

    import torch
    from safetensors.torch import load_file

    from shiva_export.recipe import load_recipe

    base = load_file(
        str(load_recipe("sd35-shapes").local_pipeline_path() / "transformer" / "diffusion_pytorch_model.safetensors")
    )
    for name in args.names:
        merged = load_file(str(OUT / name / "transformer" / "diffusion_pytorch_model.safetensors"))
        rows = {}
        for k, w in merged.items():
            m = re.match(r"transformer_blocks\.(\d+)\..*\.weight$", k)
            if not m or w.dim() != 2 or torch.equal(w, base[k].to(w.dtype)):
                continue
            b0, w1 = base[k].float(), w.float()
            r = rows.setdefault(int(m.group(1)), [0.0, 0.0, [], []])
            r[0] += float((w1 - b0).norm() ** 2)
            r[1] += float(b0.norm() ** 2)
            r[2].append(((w1.norm(dim=1) / b0.norm(dim=1)) - 1).abs())
            r[3].append(1 - torch.nn.functional.cosine_similarity(w1, b0, dim=1))
        cells = [
            f"b{b}: {(r[0] / r[1]) ** 0.5:.3f} / {float(torch.cat(r[2]).mean()):.4f} / {float(torch.cat(r[3]).mean()):.5f}"
            for b, r in sorted(rows.items())
        ]
        print(f"{name}: " + "; ".join(cells))


def cmd_table(args) -> None:
    rows = [
        "| run | stage-3 s | loss first -> last 10 | dense acc | keep 0.6 acc | dense acc, CFG 1 | vel. drift cond / uncond | "
        "flow loss dense (base 0.071) | flow loss keep 0.6 | dense update ratio b1..b5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {n: i for i, n in enumerate(args.order)}
    for d in sorted(OUT.iterdir(), key=lambda d: (order.get(d.name, len(order)), d.name)):
        e, s = d / "eval.json", d / "train_summary.json"
        if not e.is_file():
            continue
        ev = json.loads(e.read_text())
        tr = json.loads(s.read_text()) if s.is_file() else None
        loss = f"{tr['loss_first']:.3f} -> {tr['loss_last10']:.3f}" if tr else "-"
        dr = ev.get("drift")
        drift = f"{dr['cond']:.3f} / {dr['uncond']:.3f}" if dr else "0"
        fl = ev["flow"]["held_out"]
        ratio = " ".join(f"{v:.2f}" for v in ev.get("update_ratio") or [1.0] * 5)
        rows.append(
            f"| {d.name} | {tr['seconds'] if tr else '-'} | {loss} | {ev['dense_acc']:.1%} | {ev['keep06_acc']:.1%} | {ev['dense_acc_cfg1']:.1%} | {drift} | "
            f"{fl['dense']:.3f} | {fl['keep06']:.3f} | {ratio} |"
        )
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "build" / "shapes" / "latents"))
    ap.add_argument("--joint", type=int, default=500, help="stage-3 steps")
    sub = ap.add_subparsers(required=True)
    p = sub.add_parser("prefix")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.set_defaults(func=cmd_prefix)
    p = sub.add_parser("stage3")
    p.add_argument("name")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dense-weight", type=float, default=0.0)
    p.add_argument("--stage3-keep", type=float, default=None)
    p.add_argument("--flow-weight", type=float, default=1.0)
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument("--no-dora", action="store_true")
    p.set_defaults(func=cmd_stage3)
    p = sub.add_parser("eval")
    p.add_argument("name")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=11)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("weights")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_weights)
    p = sub.add_parser("table")
    p.add_argument("order", nargs="*", help="run names first, in this order")
    p.set_defaults(func=cmd_table)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
