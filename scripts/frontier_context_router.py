"""The context-kept rows of docs/quality.md: `sd35-shapes-ctx` (router + schedule trained with kept context) against
the dense reference, 8 steps and TaylorSeer on the same 96 captions x held-out seeds 2, 3 as the main frontier.

    python scripts/frontier_context_router.py      # 7 min on one thread; writes /tmp/frontier-ctx
"""

from shiva_export.validate.frontier import FrontierConfig as C
from shiva_export.validate.frontier import validate_frontier

cfgs = [
    C("dense", 14),
    C("dense", 8),
    C("cache", 14, cache=("taylorseer", (("cache_interval", 5), ("disable_cache_before_step", 3)))),
    C("shiva", 14, keep=0.6, context="keep"),
    C("shiva", 14, keep=0.8, context="keep"),
    C("shiva", 14, learned=True, context="keep"),
    C("stack", 8, keep=0.8, context="keep"),
    C(
        "stack",
        14,
        keep=0.8,
        context="keep",
        cache=("taylorseer", (("cache_interval", 5), ("disable_cache_before_step", 3))),
    ),
]
rep = validate_frontier(
    model="sd35-shapes-ctx",
    prompts=96,
    seeds=[2, 3],
    configs=cfgs,
    latency_repeats=2,
    out_dir="/tmp/frontier-ctx",
    progress=lambda m: print(m, flush=True),
)
print(rep.to_markdown())
