#!/usr/bin/env python
"""Trains and assembles the shipped ``sd35-shapes`` pipeline (recipes/sd35-shapes/pipeline) on the CPU.

Stages (each deterministic from --seed, each writes into --work and is skipped when its output exists):

    vae          AutoencoderKL, 16 latent channels, 8x down (4 levels), trained on procedural scenes
                 (L1 + MSE + a small KL); its scaling/shift factors are measured on the training latents.
    transformer  SD3Transformer2DModel (MMDiT-X: dual attention in blocks 0-2, qk RMSNorm, patch 1 on a
                 16 x 16 latent = 256 image tokens), rectified-flow loss (v = noise - x0) on logit-normal
                 sigmas with the scheduler's shift, 10% caption dropout (the empty prompt) for CFG, EMA.
                 Text encoders (CLIP x2 + T5 + tokenizers from shiva_export.models.components) stay frozen
                 at their seeded random init.
    transformer2 a second cycle from phase A's EMA weights (lr 5e-4, fresh EMA and noise);
    transformer3 a third from phase B's (lr 3e-4);
    transformer4 a fourth, longer one from phase C's (lr 3e-4, 2400 steps: shape words were still being learned);
    transformer5 a fifth from phase D's (lr 3e-4, 3000 steps). A sixth such cycle was tried and not kept: dense
                 prompt accuracy over the 96 captions stayed at 89.6% (28 steps) and FD rose from 0.076 to 0.098.
    assemble     StableDiffusion3Pipeline.save_pretrained (fp32 safetensors, ~6 MB) into --out/pipeline and the
                 measured training times into --out/training.json.
    latents      512 cached samples (latents, prompt_embeds, pooled) for `shiva-export train --data`.

Run (one CPU thread; docs/training.md quotes this command and the measured times):

    .venv/bin/python scripts/train_shapes.py --seed 0

To continue from the shipped pipeline instead of from scratch (its VAE and transformer are the work folder's
`vae` and last transformer cycle, bit for bit, so this gives the same result as the full run):

    .venv/bin/python scripts/train_shapes.py --seed 0 --from-shipped transformer3
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _train_vae(
    vae, x_all, m_all, steps: int, batch: int, lr0: float, kl_w: float, fg_w: float, seed: int, tag: str, t0: float
) -> float:
    """AdamW with cosine decay on L1 + MSE (foreground pixels weighted 1 + fg_w) + kl_w * KL per latent element."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr0, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    rec = torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = x_all[idx]
        w = 1.0 + fg_w * m_all[idx][:, None]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        y = vae.decode(z).sample
        d = y - x
        rec = ((d.abs() + d.pow(2)) * w).mean() / w.mean()
        kl = post.kl().mean() / z[0].numel()
        loss = rec + kl_w * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            _log(f"vae {tag} step {step}/{steps} rec {rec.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    return float(rec.item())


def stage_vae(args, work: Path) -> None:
    """Two phases: A (uniform pixel loss) then B (foreground-weighted, which brings back the shape colours)."""
    from diffusers import AutoencoderKL

    from shiva_export.shapes.data import render_batch, sample_scenes

    out = work / "vae"
    if (out / "config.json").is_file():
        _log("vae: exists, skipped")
        return
    t0 = time.time()
    x_all, m_all = render_batch(sample_scenes(args.vae_images, args.seed + 100))
    x_all, m_all = torch.from_numpy(x_all), torch.from_numpy(m_all)
    stats = {}
    a_dir = work / "vae_a"
    if (a_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(a_dir)
        stats["a"] = json.loads((work / "vae_a_stats.json").read_text())
        _log("vae phase A: exists, loaded")
    else:
        vae = build_vae(args.seed + 1)
        rec = _train_vae(
            vae, x_all, m_all, args.vae_steps, args.vae_batch, args.vae_lr, args.vae_kl, 0.0, args.seed + 2, "A", t0
        )
        vae.save_pretrained(a_dir, safe_serialization=True)
        stats["a"] = {"seconds": time.time() - t0, "steps": args.vae_steps, "final_rec": rec}
        (work / "vae_a_stats.json").write_text(json.dumps(stats["a"], indent=2))
    t1 = time.time()
    vae.train()
    rec = _train_vae(
        vae,
        x_all,
        m_all,
        args.vae_fg_steps,
        args.vae_batch,
        args.vae_fg_lr,
        args.vae_kl,
        args.vae_fg_weight,
        args.seed + 5,
        "B",
        t1,
    )
    stats["b"] = {"seconds": time.time() - t1, "steps": args.vae_fg_steps, "final_rec": rec}
    vae.eval()
    with torch.no_grad():
        zs = torch.cat([vae.encode(x_all[i : i + 64]).latent_dist.mean for i in range(0, min(len(x_all), 1024), 64)])
    shift, scale = float(zs.mean()), float(1.0 / zs.std())
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    vae.save_pretrained(out, safe_serialization=True)
    stats.update(seconds=stats["a"]["seconds"] + stats["b"]["seconds"], shift=shift, scale=scale)
    (work / "vae_stats.json").write_text(json.dumps(stats, indent=2))
    _log(f"vae: done, phase B {time.time() - t1:.0f}s, shift {shift:.4f} scale {scale:.4f}")


TF_CONFIG = {
    "sample_size": 16,
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0, 1, 2),
    "qk_norm": "rms_norm",
}
CLIP_MAX_LENGTH = 24  # recipes/sd35-shapes.toml [pipeline] clip_max_length; T5 gets text_len 40 - 24
T5_LENGTH = 16
SCHEDULER_SHIFT = 1.0
PIPE_SEED = 0


def build_text_stack():
    """(tokenizer, clip1, tokenizer_2, clip2, tokenizer_3, t5): the embedded runtime's seeded text encoders."""
    from shiva_export.models import components as e

    joint, pooled = TF_CONFIG["joint_attention_dim"], TF_CONFIG["pooled_projection_dim"]
    hidden, heads = e.clip_hidden(joint)
    tok1, tok2 = e.clip_tokenizer(CLIP_MAX_LENGTH), e.clip_tokenizer(CLIP_MAX_LENGTH)
    clip1 = e.clip_encoder(tok1, hidden, heads, pooled // 2, PIPE_SEED + e.SEED_CLIP1)
    clip2 = e.clip_encoder(tok2, hidden, heads, pooled - pooled // 2, PIPE_SEED + e.SEED_CLIP2)
    tok3 = e.t5_tokenizer()
    t5 = e.t5_encoder(tok3, joint, PIPE_SEED + e.SEED_T5)
    return tok1, clip1, tok2, clip2, tok3, t5


def build_pipeline(transformer, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok1, clip1, tok2, clip2, tok3, t5 = build_text_stack()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT),
        vae=vae,
        text_encoder=clip1,
        tokenizer=tok1,
        text_encoder_2=clip2,
        tokenizer_2=tok2,
        text_encoder_3=t5,
        tokenizer_3=tok3,
    )


def build_transformer(seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TF_CONFIG)


@torch.no_grad()
def encode_captions(pipe, captions: list[str]):
    """(prompt_embeds (n, 40, 64), pooled (n, 64)) through the pipeline's own encode_prompt."""
    embeds, pooled = [], []
    for c in captions:
        pe, _, pp, _ = pipe.encode_prompt(
            c, c, c, device="cpu", do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH
        )
        embeds.append(pe)
        pooled.append(pp)
    return torch.cat(embeds), torch.cat(pooled)


def load_vae(work: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(work / "vae").eval()


@torch.no_grad()
def encode_images(vae, x: torch.Tensor) -> torch.Tensor:
    """Scaled latents ((z - shift) * scale) of images in [-1, 1], the posterior mean."""
    out = [vae.encode(x[i : i + 64]).latent_dist.mean for i in range(0, len(x), 64)]
    z = torch.cat(out)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def stage_transformer(args, work: Path) -> None:
    """Phase A: from the seeded init, warm-up + cosine to 0.1x, EMA."""
    _train_transformer(args, work, work / "transformer", None, args.tf_steps, args.tf_lr, args.seed + 4, "transformer")


def stage_transformer2(args, work: Path) -> None:
    """Phase B: from phase A's EMA weights, a second, lower cosine cycle with a fresh EMA and fresh noise."""
    _train_transformer(
        args,
        work,
        work / "transformer2",
        work / "transformer",
        args.tf2_steps,
        args.tf2_lr,
        args.seed + 6,
        "transformer2",
    )


def stage_transformer3(args, work: Path) -> None:
    """Phase C: from phase B's EMA weights, a third, lower cosine cycle (shape words are learned last)."""
    _train_transformer(
        args,
        work,
        work / "transformer3",
        work / "transformer2",
        args.tf3_steps,
        args.tf3_lr,
        args.seed + 7,
        "transformer3",
    )


def stage_transformer4(args, work: Path) -> None:
    """Phase D: from phase C's EMA weights, a fourth, longer cycle at phase C's peak rate."""
    _train_transformer(
        args,
        work,
        work / "transformer4",
        work / "transformer3",
        args.tf4_steps,
        args.tf4_lr,
        args.seed + 8,
        "transformer4",
    )


def stage_transformer5(args, work: Path) -> None:
    """Phase E: from phase D's EMA weights, a fifth cycle (shape and size words kept improving in phase D)."""
    _train_transformer(
        args,
        work,
        work / "transformer5",
        work / "transformer4",
        args.tf5_steps,
        args.tf5_lr,
        args.seed + 9,
        "transformer5",
    )


CYCLES = ("transformer", "transformer2", "transformer3", "transformer4", "transformer5")


def seed_from_shipped(args, work: Path, cycle: str) -> None:
    """Fills --work with the shipped pipeline's VAE and transformer as the outputs of the stages up to `cycle`,
    and its training.json as their stats, so that the later stages continue from the shipped weights."""
    import shutil

    src = args.out / "pipeline"
    stats = json.loads((args.out / "training.json").read_text())
    for name, dest in (("vae", work / "vae"), ("transformer", work / cycle)):
        if (dest / "config.json").is_file():
            continue
        shutil.copytree(src / name, dest)
    for name in ("vae",) + CYCLES[: CYCLES.index(cycle) + 1]:
        f = work / f"{name}_stats.json"
        if name in stats and not f.is_file():
            f.write_text(json.dumps(stats[name], indent=2))
    _log(f"work folder seeded from {src}: vae and {cycle}")


def _train_transformer(
    args, work: Path, out: Path, init: Path | None, steps: int, lr0: float, seed: int, tag: str
) -> None:
    from diffusers import SD3Transformer2DModel

    from shiva_export.shapes.data import all_scenes, caption, render_batch, sample_scenes

    if (out / "config.json").is_file():
        _log(f"{tag}: exists, skipped")
        return
    t0 = time.time()
    vae = load_vae(work)
    scenes = sample_scenes(args.tf_images, args.seed + 200)
    x, _ = render_batch(scenes)
    lat = encode_images(vae, torch.from_numpy(x))
    del x
    _log(f"transformer: {len(lat)} latents {tuple(lat.shape[1:])} std {lat.std():.3f} ({time.time() - t0:.0f}s)")
    names = sorted({caption(s) for s in all_scenes()})
    start = build_transformer(args.seed + 3) if init is None else SD3Transformer2DModel.from_pretrained(init)
    pipe = build_pipeline(start, vae)
    emb, pooled = encode_captions(pipe, names + [""])
    index = {c: i for i, c in enumerate(names)}
    cap_idx = torch.tensor([index[caption(s)] for s in scenes])
    empty = len(names)
    model = pipe.transformer.train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr0, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed)
    batch = args.tf_batch
    losses = []
    for step in range(steps):
        lr = lr0 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(lat), (batch,), generator=g)
        x0 = lat[idx]
        ci = cap_idx[idx].clone()
        ci[torch.rand(batch, generator=g) < args.caption_dropout] = empty
        u = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal(0, 1)
        sigma = SCHEDULER_SHIFT * u / (1 + (SCHEDULER_SHIFT - 1) * u)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        v = model(
            hidden_states=xt, encoder_hidden_states=emb[ci], pooled_projections=pooled[ci], timestep=sigma * 1000
        ).sample
        loss = (v - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e_, p in zip(ema, model.parameters()):
                e_.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            _log(f"{tag} step {step}/{steps} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        if args.tf_checkpoint and step and step % args.tf_checkpoint == 0:
            _save_ema(model, ema, work / f"{tag}_ckpt")
    _save_ema(model, ema, out)
    (work / f"{tag}_stats.json").write_text(
        json.dumps(
            {
                "seconds": time.time() - t0,
                "steps": steps,
                "batch": batch,
                "lr": lr0,
                "final_loss": float(np.mean(losses[-100:])),
            },
            indent=2,
        )
    )
    _log(f"{tag}: done in {time.time() - t0:.0f}s")


def _save_ema(model, ema, out: Path) -> None:
    import copy

    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p, e_ in zip(m.parameters(), ema):
            p.copy_(e_)
    m.save_pretrained(out, safe_serialization=True)


def stage_assemble(args, work: Path) -> None:
    from diffusers import SD3Transformer2DModel

    t0 = time.time()
    vae = load_vae(work)
    src = next(work / n for n in reversed(CYCLES) if (work / n / "config.json").is_file())
    tf = SD3Transformer2DModel.from_pretrained(src).eval()
    _log(f"assemble: transformer from {src.name}")
    pipe = build_pipeline(tf, vae)
    dest = args.out / "pipeline"
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    pipe.save_pretrained(dest, safe_serialization=True)
    for cfg in dest.glob("*/config.json"):  # no local paths of this machine in the shipped configs
        data = json.loads(cfg.read_text())
        if data.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    stats = {}
    for name in ("vae",) + CYCLES:
        f = work / f"{name}_stats.json"
        if f.is_file():
            stats[name] = json.loads(f.read_text())
    (args.out / "training.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    _log(f"assemble: {dest} ({time.time() - t0:.0f}s)")


def stage_latents(args, work: Path) -> None:
    """Cached samples for `shiva-export train --data`: one .safetensors per scene (latents, prompt_embeds, pooled),
    encoded by the *shipped* pipeline (its VAE and frozen text encoders)."""
    from safetensors.torch import save_file

    from shiva_export.models.components import import_pipeline_class
    from shiva_export.runtime.pipeline import quiet_libraries
    from shiva_export.shapes.data import caption, render_batch, sample_scenes

    out = work / "latents"
    if out.is_dir() and len(list(out.glob("*.safetensors"))) == args.latent_samples:
        _log("latents: exist, skipped")
        return
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with quiet_libraries():
        pipe = import_pipeline_class().from_pretrained(str(args.out / "pipeline"), local_files_only=True)
    scenes = sample_scenes(args.latent_samples, args.seed + 300)
    x, _ = render_batch(scenes)
    lat = encode_images(pipe.vae, torch.from_numpy(x))
    emb, pooled = encode_captions(pipe, [caption(s) for s in scenes])
    for i in range(len(scenes)):
        save_file(
            {"latents": lat[i].contiguous(), "prompt_embeds": emb[i].contiguous(), "pooled": pooled[i].contiguous()},
            str(out / f"{i:05d}.safetensors"),
        )
    _log(f"latents: {len(scenes)} samples in {out} ({time.time() - t0:.0f}s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "shapes")
    ap.add_argument("--out", type=Path, default=ROOT / "recipes" / "sd35-shapes")
    ap.add_argument(
        "--stages", default="vae,transformer,transformer2,transformer3,transformer4,transformer5,assemble,latents"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-images", type=int, default=2048)
    ap.add_argument("--vae-steps", type=int, default=700)
    ap.add_argument("--vae-batch", type=int, default=12)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-3)
    ap.add_argument("--vae-fg-steps", type=int, default=450)
    ap.add_argument("--vae-fg-lr", type=float, default=1e-3)
    ap.add_argument("--vae-fg-weight", type=float, default=20.0)
    ap.add_argument("--tf-images", type=int, default=6144)
    ap.add_argument("--tf-steps", type=int, default=1400)
    ap.add_argument("--tf-batch", type=int, default=16)
    ap.add_argument("--tf-lr", type=float, default=1e-3)
    ap.add_argument("--tf2-steps", type=int, default=800)
    ap.add_argument("--tf2-lr", type=float, default=5e-4)
    ap.add_argument("--tf3-steps", type=int, default=800)
    ap.add_argument("--tf3-lr", type=float, default=3e-4)
    ap.add_argument("--tf4-steps", type=int, default=2400)
    ap.add_argument("--tf4-lr", type=float, default=3e-4)
    ap.add_argument("--tf5-steps", type=int, default=3000)
    ap.add_argument("--tf5-lr", type=float, default=3e-4)
    ap.add_argument(
        "--from-shipped",
        choices=CYCLES[:-1],
        default=None,
        help="seed --work from the shipped pipeline as the output of this cycle",
    )
    ap.add_argument("--tf-checkpoint", type=int, default=400)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--latent-samples", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    if args.from_shipped:
        seed_from_shipped(args, args.work, args.from_shipped)
    for name in stages:
        globals()[f"stage_{name}"](args, args.work)


if __name__ == "__main__":
    main()
