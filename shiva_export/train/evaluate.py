"""Router evaluation: trained, untrained and L2-norm routing against the dense model on held-out seeds, at
one uniform keep ratio (:func:`evaluate_router`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError, RouterError
from shiva_export.models import InputSpec, load_transformer, make_inputs, num_blocks, router_dims
from shiva_export.prune.api import ShivaConfig, apply_shiva_, remove_shiva_, set_route_override
from shiva_export.prune.router import RouterBank, load_routers
from shiva_export.train.config import resolve_recipe
from shiva_export.train.ste import DifferentiableTopK
from shiva_export.train.student import RouteState, make_override

__all__ = ["RouterEvaluation", "evaluate_router"]


@dataclass
class RouterEvaluation:
    """Relative output error ``||y - y_dense|| / ||y_dense||`` (mean over held-out seeds) per router.

    Attributes:
        keep (float): Uniform keep ratio of every routed block.
        errors (dict[str, float]): ``trained``, ``random`` (untrained, recipe seed) and ``l2`` (score ``||x_i||``).
        per_seed (dict[str, list[float]]): The same per held-out seed.
        seeds (list[int]): Held-out input seeds.
        lut_mean_keep (float | None): Mean of the recipe's learned LUT (None without a schedule).
        target_keep (float | None): The schedule's target.
    """

    keep: float
    errors: dict[str, float]
    per_seed: dict[str, list[float]]
    seeds: list[int]
    lut_mean_keep: float | None = None
    target_keep: float | None = None

    @property
    def ratio_vs_random(self) -> float:
        return self.errors["trained"] / self.errors["random"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio_vs_random"] = self.ratio_vs_random
        return d


def evaluate_router(
    recipe_or_model,
    router: str | os.PathLike | Any | None = None,
    keep: float = 0.6,
    seeds: Sequence[int] = tuple(range(1000, 1008)),
    weights: str | os.PathLike | None = None,
) -> RouterEvaluation:
    """Compares trained, untrained and L2-norm routing against the dense model on held-out seeds.

    Args:
        recipe_or_model (str | PathLike | Recipe): Recipe (e.g. the trained ``recipe.toml``) or model name.
        router (PathLike | RouterBank | None): Trained router weights. Defaults to the recipe's ``[router] weights``.
        keep (float): Keep ratio of every routed block. Defaults to 0.6.
        seeds (Sequence[int]): Held-out input seeds (one sample each, random timestep). Defaults to 1000..1007.
        weights (PathLike): Local diffusers folder of the backbone. Defaults to None.

    Raises:
        RouterError: No trained router is given and the recipe has none.
    """
    rec = resolve_recipe(recipe_or_model)
    if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
        raise ConfigError(f"keep is {keep!r}; expected 0 < keep <= 1 (fraction of image tokens kept).")
    transformer = load_transformer(recipe=rec, weights=weights, dtype="fp32")
    n_layers = num_blocks(transformer)
    routed = rec.routed_blocks(n_layers)
    scfg = ShivaConfig.uniform(
        n_layers,
        1.0 - keep,
        routed,
        bottleneck=rec.router.bottleneck,
        group_size=rec.router.group_size,
        context=rec.prune.context,
    )  # the routing the recipe deploys
    rc = scfg.router_config(*router_dims(transformer))
    if isinstance(router, RouterBank):
        trained = router
    else:
        path = Path(router) if router is not None else rec.router_weights_path()
        if path is None:
            raise RouterError(
                f"{rec.name}: no trained router to evaluate; the recipe has no [router] weights. Pass router=PATH."
            )
        trained, _ = load_routers(path, rc)
    spec = InputSpec(batch=1, height=rec.shapes.height, width=rec.shapes.width, text_len=rec.shapes.text_len, cfg=False)
    cases = [make_inputs(transformer, spec, seed=s) for s in seeds]
    with torch.no_grad():
        dense = [transformer(**x).sample for x in cases]

        def run(bank, mode: str) -> list[float]:
            apply_shiva_(transformer, scfg, routers=bank, seed=rec.router.seed)
            try:
                if mode == "l2":
                    st = RouteState(routed, DifferentiableTopK(), set())
                    st.mode, st.keep = "l2", keep
                    set_route_override(transformer, make_override(st))
                errs = []
                for x, ref in zip(cases, dense):
                    y = transformer(**x).sample
                    errs.append(float((y - ref).norm() / ref.norm()))
                return errs
            finally:
                remove_shiva_(transformer)

        per = {"trained": run(trained.eval(), "hard"), "random": run(None, "hard"), "l2": run(None, "l2")}
    errors = {k: sum(v) / len(v) for k, v in per.items()}
    lut_mean = None
    if rec.schedule is not None and rec.schedule.lut:
        flat = [v for row in rec.schedule.lut for v in row]
        lut_mean = sum(flat) / len(flat)
    return RouterEvaluation(
        keep=float(keep),
        errors=errors,
        per_seed=per,
        seeds=list(seeds),
        lut_mean_keep=lut_mean,
        target_keep=rec.schedule.target_keep if rec.schedule is not None else None,
    )
