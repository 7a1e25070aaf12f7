"""The student and the teacher of router distillation: one transformer behind one route override.

The **teacher** is the frozen backbone run exactly dense: the route override calls every routed block on
all tokens (the same call the unrouted path makes). The **student** routes each block through
:class:`~shiva_export.train.ste.DifferentiableTopK` and an estimator (:func:`~shiva_export.train.ste.route_with_ste`
or ``route_output_gated``), so the forward is the exported hard top-k and gradients reach the routers and
the keep ratios. :class:`RouteState` is what the override reads during one forward (the mode, the keep
ratios, the taps it records); the losses compare the student's taps and output with the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiva_export.models import get_adapter
from shiva_export.prune.topk import gather_tokens, scatter_tokens, select_topk, static_k
from shiva_export.train import dora as _dora
from shiva_export.train.distributed import sample_noise
from shiva_export.train.ste import DifferentiableTopK, Selection, route_output_gated, route_with_ste

__all__ = [
    "RouteState",
    "make_override",
    "tap_hook",
    "forward_with_taps",
    "distill_loss",
    "importance_loss",
    "heldout_loss",
]


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],))


class RouteState:
    """Mutable state read by the route override during one forward."""

    def __init__(self, routed: list[int], topk: DifferentiableTopK, taps: set[int], estimator: str = "output-gated"):
        self.mode = "dense"  # dense | student | hard | l2
        self.col = {b: i for i, b in enumerate(routed)}
        self.topk = topk
        self.estimator = estimator
        self.keep: torch.Tensor | None = None  # [B, L] (student) or a float (hard / l2)
        self.generator: torch.Generator | None = None
        self.tap_blocks = taps
        self.taps: dict[int, torch.Tensor] = {}
        self.record_importance = False
        self.importance: dict[int, torch.Tensor] = {}  # dense pass: per-token relative update norm [B, N]
        self.record_updates = False
        self.updates: dict[int, torch.Tensor] = {}  # dense pass: the teacher's update f(x) - x [B, N, D] (output-gated)
        self.scores: dict[int, torch.Tensor] = {}  # student pass: router scores [B, N]
        self.cfg = False  # the batch is [uncond; cond] pairs (row i and i + B/2 share kept indices)
        self.samples: torch.Tensor | None = None  # [B] global sample id of each row (score noise per sample)
        self.noise_key: tuple[int, int] | None = None  # (seed, step): score noise derived per sample and block
        self.checkpointing = False


def make_override(state: RouteState):
    """The route override of one training run (protocol: ``prune.api.set_route_override``): dense teacher,
    student (differentiable top-k + an estimator), or hard routing with the trained router (``hard``) or
    ``||x||`` (``l2``)."""

    def override(index_block, hidden_states, temb, pooled, run_block, shared, routers):
        mode = state.mode
        if mode == "dense":
            ehs, out = run_block(hidden_states, None)
            if state.record_importance:
                state.importance[index_block] = (out - hidden_states).float().norm(dim=-1) / hidden_states.float().norm(
                    dim=-1
                ).clamp_min(1e-6)
            if state.record_updates and index_block in state.col:
                state.updates[index_block] = (out - hidden_states).detach()
        elif mode in ("hard", "l2"):
            n = int(hidden_states.shape[1])
            k = static_k(n, float(state.keep))
            if mode == "l2":
                scores = hidden_states.float().norm(dim=-1)
            else:
                scores = routers(index_block, hidden_states, temb, pooled)
            if shared and scores.shape[0] > 1:
                idx = select_topk(scores.amax(dim=0, keepdim=True), k).expand(scores.shape[0], k)
            else:
                idx = select_topk(scores, k, cfg=state.cfg)
            ehs, kept = run_block(gather_tokens(hidden_states, idx), idx)
            out = scatter_tokens(hidden_states, idx, kept)
        else:
            ehs, out = _student_block(state, index_block, hidden_states, temb, pooled, run_block, shared, routers)
        if index_block in state.tap_blocks:
            state.taps[index_block] = out
        return ehs, out

    return override


def _shared_selection(sel, rows: int):
    """One selection (made on the rows' max scores) expanded to ``rows`` rows (blocks whose per-token side
    inputs have no batch axis, e.g. Flux RoPE, need one index set per call)."""
    if rows == 1:
        return sel
    ex = lambda t: t.expand(rows, *t.shape[1:])  # noqa: E731
    return Selection(ex(sel.indices), ex(sel.rejected), ex(sel.pi), ex(sel.pi_sel), ex(sel.pi_rej), sel.k, sel.k_soft)


def _score_noise(state: RouteState, ids: list[int], block: int, n: int):
    if state.noise_key is None or state.samples is None or not state.topk.training or state.topk.noise_std <= 0:
        return None

    seed, step = state.noise_key
    return sample_noise(seed, step, [int(state.samples[i]) for i in ids], block, n)


def _student_block(state, index_block, hs, temb, pooled, run_block, shared, routers):
    scores = routers(index_block, hs, temb, pooled)  # [B, N] fp32
    state.scores[index_block] = scores
    keep = state.keep[:, state.col[index_block]]  # [B]
    values = keep.detach().tolist()
    b = int(hs.shape[0])
    groups: dict[float, list[int]] = {}
    if (
        state.cfg
    ):  # pairs (i, i + B/2) share one keep and one selection; a group lists its uncond rows, then its cond rows
        half = b // 2
        for i in range(half):
            groups.setdefault(values[i], []).append(i)
        groups = {v: ids + [i + half for i in ids] for v, ids in groups.items()}
    else:
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
    n = int(hs.shape[1])
    outs_h, outs_e, order = [], [], []
    for ids in groups.values():
        ix = torch.as_tensor(ids, dtype=torch.long, device=hs.device)
        rows = None if len(ids) == b else ix
        sub = (lambda t: t) if rows is None else (lambda t: t.index_select(0, ix))
        s = sub(scores)
        if shared and len(ids) > 1:
            noise = _score_noise(state, ids[:1], index_block, n)
            sel = _shared_selection(
                state.topk.select(s.amax(dim=0, keepdim=True), keep[ids[0]], generator=state.generator, noise=noise),
                len(ids),
            )
        else:
            noise = _score_noise(state, ids[len(ids) // 2 :] if state.cfg else ids, index_block, n)
            sel = state.topk.select(s, keep[ids[0]], cfg=state.cfg, generator=state.generator, noise=noise)
        holder: list = []

        def fn(kept, _sel=sel, _rows=rows):
            if state.checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                e, o = checkpoint(lambda x: run_block(x, _sel.indices, _rows), kept, use_reentrant=False)
            else:
                e, o = run_block(kept, _sel.indices, _rows)
            holder.append(e)
            return o

        if state.estimator == "output-gated":
            outs_h.append(route_output_gated(sub(hs), sel, fn, sub(state.updates[index_block])))
        else:
            outs_h.append(route_with_ste(sub(hs), sel, fn))
        outs_e.append(holder[0])
        order.extend(ids)
    if len(outs_h) == 1 and order == list(range(b)):
        return outs_e[0], outs_h[0]
    inv = torch.argsort(torch.as_tensor(order, dtype=torch.long, device=hs.device))
    out = torch.cat(outs_h, 0).index_select(0, inv)
    e_out = None if outs_e[0] is None else torch.cat(outs_e, 0).index_select(0, inv)
    return e_out, out


def forward_with_taps(transformer, state: RouteState, inputs: dict) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward in ``state.mode``: the output and the hidden states tapped after the tap blocks."""
    state.taps, state.scores = {}, {}
    out = transformer(**inputs).sample
    return out, dict(state.taps)


def heldout_loss(transformer, state: RouteState, batch, keep: torch.Tensor, cfg, device, bdtype, chunk: int) -> float:
    """Mean quality loss (weighted distillation + flow matching) of the student on a fixed batch: no grad,
    no score noise, no draw from any training RNG (the training stream is the same with and without it)."""
    pairs = 2 if batch.cfg else 1
    n = len(batch) // pairs
    was = state.topk.training
    state.topk.eval()
    state.noise_key = None
    total = 0.0
    try:
        with torch.no_grad():
            for lo in range(0, n, chunk):
                ids = list(range(lo, min(n, lo + chunk)))
                mb = batch.rows(ids)
                inputs = {
                    k: (v.to(device, bdtype) if v.is_floating_point() and k != "timestep" else v.to(device))
                    for k, v in mb.model_inputs().items()
                }
                with _dora.teacher_mode(transformer):
                    state.mode, state.record_updates, state.updates = "dense", cfg.estimator == "output-gated", {}
                    t_out, t_taps = forward_with_taps(transformer, state, inputs)
                    state.record_updates = False
                state.mode, state.keep = "student", keep[ids].repeat(pairs, 1)
                s_out, s_taps = forward_with_taps(transformer, state, inputs)
                loss = cfg.distill_weight * float(distill_loss(s_out, s_taps, t_out, t_taps))
                if mb.target is not None and cfg.flow_weight > 0:
                    pred = get_adapter(transformer).training_prediction(transformer.config, s_out)
                    loss += cfg.flow_weight * float(F.mse_loss(pred.float(), mb.target.to(device).float()))
                total += loss * len(ids)
    finally:
        state.topk.train(was)
        state.updates = {}
    return total / n


def distill_loss(s_out, s_taps, t_out, t_taps) -> torch.Tensor:
    """Normalised feature distillation ``mean_l ||LN(h_s^l) - LN(h_t^l)||^2`` over the taps and the output."""
    terms = [F.mse_loss(_layer_norm(s_taps[b]), _layer_norm(t_taps[b])) for b in sorted(t_taps)]
    # per-token features: [B, C, H, W] outputs (SD3, PixArt, DiT) -> [B, HW, C]; [B, N, C] (Flux) as is
    so = s_out.flatten(2).transpose(1, 2) if s_out.dim() == 4 else s_out
    to = t_out.flatten(2).transpose(1, 2) if t_out.dim() == 4 else t_out
    terms.append(F.mse_loss(_layer_norm(so), _layer_norm(to)))
    return torch.stack(terms).mean()


def importance_loss(scores: dict[int, torch.Tensor], importance: dict[int, torch.Tensor]) -> torch.Tensor:
    """``mean_l (1 - corr(s^l, imp^l))``: per-sample Pearson correlation of router scores with the teacher's
    per-token relative update norm ``||f(x_i) - x_i|| / ||x_i||`` at the same block."""
    terms = []
    for b, s in scores.items():
        imp = importance[b]
        s = s - s.mean(dim=1, keepdim=True)
        i = imp - imp.mean(dim=1, keepdim=True)
        corr = (s * i).sum(1) / (s.norm(dim=1) * i.norm(dim=1)).clamp_min(1e-8)
        terms.append(1.0 - corr.mean())
    return torch.stack(terms).mean()


def tap_hook(state: RouteState, b: int, adapter):
    """Forward hook of an unrouted tap block: records its image tokens (routed blocks record in the override)."""

    def hook(module, args, output):
        if state.mode in ("dense", "student", "hard", "l2"):
            state.taps[b] = adapter.block_image_output(output)

    return hook
