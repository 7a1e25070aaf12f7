"""DoRA adapters on the backbone for stage 3 (joint tuning) of ``shiva-export train --dora``.

Shiva-DiT tunes the backbone together with the routers and the policy in its last stage, with DoRA
(weight-decomposed low-rank adaptation, Liu et al. 2024) on the attention and FFN linears only. Here:

- :func:`add_dora` injects peft DoRA layers (``LoraConfig(use_dora=True, r, lora_alpha)``) into the
  linears the architecture's adapter names (:meth:`~shiva_export.models.base.ModelAdapter.dora_target_modules`),
  fp32 adapters on a frozen base. At init (``B = 0``, magnitude ``= ||W||`` per row) the adapted model is
  the base model.
- :func:`teacher_mode` runs the model with the adapters disabled: the distillation teacher stays the
  frozen base, whatever the adapters have learnt.
- :func:`adapter_state_dict` / :func:`load_adapter_state_dict` carry the adapters through the training
  checkpoint (plain tensors, read back with ``weights_only``).
- :func:`merge_and_save` merges the adapters into the base weights in fp32, checks merged against
  unmerged outputs, removes every peft layer and saves the plain transformer with ``save_pretrained``
  (atomically). Its :func:`~shiva_export.models.base.weights_sha256` is what the written recipe binds
  the router and schedule to (``[model] source = "local"``, ``path``, ``sha256``).

After the merge the weights are ordinary ``nn.Linear`` weights: export, ONNX and TensorRT need no change.
``peft`` (``pip install 'shiva-export[train]'``) is imported on first use only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shiva_export._imports import INSTALL_HINTS, is_available, lazy_import
from shiva_export.errors import ConfigError, MissingDependencyError, ShivaInternalError
from shiva_export.logging import get_logger
from shiva_export.models import InputSpec, get_adapter, make_inputs
from shiva_export.models.base import weights_sha256
from shiva_export.prune.api import is_shiva_applied
from shiva_export.utils.io import temp_prefix

__all__ = [
    "DORA_RANK",
    "DORA_ALPHA",
    "TRANSFORMER_DIR",
    "DoRAMergeResult",
    "dora_target_modules",
    "dora_targets",
    "add_dora",
    "has_dora",
    "dora_parameters",
    "set_dora_trainable",
    "dora_enabled",
    "set_dora_enabled",
    "teacher_mode",
    "check_dora_settings",
    "load_checkpoint_state",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "merge_and_save",
]

logger = get_logger(__name__)

peft = lazy_import("peft", purpose="DoRA adapters (shiva-export train --dora)")

#: Defaults of the paper's stage-3 DoRA (review §4): rank 32, alpha = rank (scaling 1).
DORA_RANK = 32
DORA_ALPHA = 32
#: Folder (inside the training output) of the merged transformer.
TRANSFORMER_DIR = "transformer"
#: Merged vs unmerged outputs: largest accepted ``||y_merged - y_adapted|| / ||y_adapted||`` (fp32). The
#: merge only reassociates the same fp32 products; sd35-tiny after a training run measures ~1e-7.
MERGE_RTOL = 1e-4
_ADAPTER = "default"
_DORA_ATTR = "_shiva_dora"  # {"r", "alpha", "target_modules", "modules"} of the injected adapters
_ADAPTER_KEYS = ("lora_A", "lora_B", "lora_magnitude_vector")


@dataclass
class DoRAMergeResult:
    """What :func:`merge_and_save` wrote and measured.

    Attributes:
        path (Path): The saved transformer folder (``out_dir/transformer``).
        sha256 (str): :func:`~shiva_export.models.base.weights_sha256` of its weights.
        files (list[str]): Its weight files.
        modules (int): Merged linears.
        max_abs_error (float | None): ``max |y_merged - y_adapted|`` on the check inputs (None: not checked).
        rel_error (float | None): ``||y_merged - y_adapted|| / ||y_adapted||`` (None: not checked).
        seconds (float): Merge + check + save wall time.
    """

    path: Path
    sha256: str
    files: list[str] = field(default_factory=list)
    modules: int = 0
    max_abs_error: float | None = None
    rel_error: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ------------------------------------------------------------------------------------------------ targets
def dora_target_modules(transformer: nn.Module) -> str:
    """The architecture's DoRA target regex (peft ``target_modules``, ``re.fullmatch`` on module names)."""
    return get_adapter(transformer).dora_target_modules()


def dora_targets(transformer: nn.Module, target_modules: str | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``target_modules`` (default: the architecture's) selects,
    matched exactly as peft matches a regex string (``re.fullmatch`` on the full module name).

    Example:
        >>> names = dora_targets(load_transformer(recipe=load_recipe("sd35-tiny")))
        >>> "transformer_blocks.0.attn2.to_q" in names, "transformer_blocks.0.norm1.linear" in names
        (True, False)
    """
    pattern = target_modules or dora_target_modules(transformer)
    return [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]


# ------------------------------------------------------------------------------------------------ inject
def has_dora(transformer: nn.Module) -> bool:
    """Whether :func:`add_dora` adapters are in ``transformer`` (and not merged yet)."""
    return getattr(transformer, _DORA_ATTR, None) is not None


def _tuner_layers(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    base = peft.tuners.tuners_utils.BaseTunerLayer
    return [(n, m) for n, m in transformer.named_modules() if isinstance(m, base)]


def add_dora(
    transformer: nn.Module,
    r: int = DORA_RANK,
    alpha: float = DORA_ALPHA,
    *,
    target_modules: str | None = None,
    trainable: bool = False,
    seed: int = 0,
) -> list[str]:
    """Injects DoRA adapters (in place) into the architecture's attention and FFN linears.

    The adapted linears' base weights are frozen; every other parameter keeps its ``requires_grad``.
    Adapters are fp32 whatever the base dtype, initialised so that the model is unchanged (``B = 0``,
    magnitude = the base weight's row norms).

    Args:
        transformer (nn.Module): A diffusers transformer with a registered adapter.
        r (int): Adapter rank. Defaults to 32.
        alpha (float): ``lora_alpha`` (scaling ``alpha / r``). Defaults to 32.
        target_modules (str | None): Regex overriding the architecture's targets. Defaults to None.
        trainable (bool): Adapters start trainable (else frozen until :func:`set_dora_trainable`).
            Defaults to False.
        seed (int): Seed of the random ``A`` init (the global RNG is left as it was). Defaults to 0.

    Returns:
        list[str]: The adapted module names.

    Raises:
        ConfigError: Bad rank/alpha, adapters already present, or no module matches.

    Example:
        >>> names = add_dora(transformer, r=32, alpha=32)        # frozen adapters, identity at init
        >>> set_dora_trainable(transformer, True)                  # stage 3
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"DoRA rank is {r!r}; expected an int >= 1 (paper: 32).")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ConfigError(f"DoRA alpha is {alpha!r}; expected a float > 0 (default: the rank, scaling 1).")
    if has_dora(transformer):
        raise ConfigError(
            "the transformer already has DoRA adapters; merge them (merge_and_save) before adding new ones."
        )
    pattern = target_modules or dora_target_modules(transformer)
    names = dora_targets(transformer, pattern)
    other = [
        n for n, m in transformer.named_modules() if n and not isinstance(m, nn.Linear) and re.fullmatch(pattern, n)
    ]
    if other:
        raise ConfigError(
            f"DoRA target pattern {pattern!r} also matches non-linear modules ({', '.join(other[:3])}); DoRA here adapts nn.Linear only. Narrow the pattern."
        )
    if not names:
        raise ConfigError(
            f"DoRA target pattern {pattern!r} matches no linear of this {type(transformer).__name__}; check the adapter's dora_target_modules."
        )
    grads = {id(p): p.requires_grad for p in transformer.parameters()}
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, use_dora=True, lora_dropout=0.0, init_lora_weights=True, target_modules=pattern
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # reproducible A (kaiming) init: a resumed run and a fresh one add the same adapters
        peft.inject_adapter_in_model(cfg, transformer, adapter_name=_ADAPTER)
    layers = _tuner_layers(transformer)
    if sorted(n for n, _ in layers) != sorted(names):
        raise ShivaInternalError(f"peft adapted {len(layers)} modules, the pattern selects {len(names)}")
    object.__setattr__(
        transformer,
        _DORA_ATTR,
        {"r": r, "alpha": float(alpha), "target_modules": pattern, "modules": names, "enabled": True},
    )
    adapter_ids = {id(p) for p in dora_parameters(transformer)}
    base_ids = {id(p) for _, layer in layers for p in layer.get_base_layer().parameters()}
    for p in transformer.parameters():  # peft marks only adapters trainable; the others get their flags back
        if id(p) in base_ids:
            p.requires_grad_(False)
        elif id(p) not in adapter_ids and id(p) in grads:
            p.requires_grad_(grads[id(p)])
    with torch.no_grad():
        for p in dora_parameters(transformer):
            p.data = p.data.float()
    set_dora_trainable(transformer, trainable)
    n = sum(p.numel() for p in dora_parameters(transformer))
    logger.info("DoRA r=%d alpha=%g on %d linears: %d adapter parameters", r, alpha, len(names), n)
    return names


def dora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A, B and the DoRA magnitude of every adapted linear), in module order."""
    if not has_dora(transformer):
        return []
    out = []
    for _, layer in _tuner_layers(transformer):
        for key in _ADAPTER_KEYS:
            holder = getattr(layer, key, None)
            if holder is not None and _ADAPTER in holder:
                out.extend(holder[_ADAPTER].parameters())
    return out


def set_dora_trainable(transformer: nn.Module, trainable: bool) -> None:
    """Freezes (False) or unfreezes (True) the adapters; the base stays frozen."""
    for p in dora_parameters(transformer):
        p.requires_grad_(bool(trainable))


def dora_enabled(transformer: nn.Module) -> bool:
    """Whether the adapters take part in the forward (False: the model runs as its base)."""
    return has_dora(transformer) and bool(getattr(transformer, _DORA_ATTR).get("enabled", True))


def set_dora_enabled(transformer: nn.Module, enabled: bool) -> None:
    """Switches the adapters on or off in the forward; their ``requires_grad`` is left as it is.

    Training keeps them off before stage 3: there they are still at init, where the adapted model *is*
    the base (bit for bit on sd35-tiny), so switching them off changes no number and saves DoRA's
    per-forward ``||W + BA||``."""
    if not has_dora(transformer):
        raise ConfigError("the transformer has no DoRA adapters; add them with add_dora.")
    flags = [(p, p.requires_grad) for p in dora_parameters(transformer)]
    for _, layer in _tuner_layers(transformer):
        layer.enable_adapters(bool(enabled))
    for p, flag in flags:  # peft's enable_adapters also sets requires_grad; keep the caller's choice
        p.requires_grad_(flag)
    getattr(transformer, _DORA_ATTR)["enabled"] = bool(enabled)


@contextlib.contextmanager
def teacher_mode(transformer: nn.Module) -> Iterator[nn.Module]:
    """Runs ``transformer`` as its frozen base: adapters disabled inside, restored (with their
    ``requires_grad``) on exit. A no-op for a model without DoRA adapters.

    Example:
        >>> with torch.no_grad(), teacher_mode(transformer):
        ...     teacher = transformer(**inputs).sample              # == the base model's output, exactly
    """
    if not has_dora(transformer):
        yield transformer
        return
    was = dora_enabled(transformer)
    set_dora_enabled(transformer, False)
    try:
        yield transformer
    finally:
        set_dora_enabled(transformer, was)


# -------------------------------------------------------------------------------------------- checkpoint
def adapter_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (peft ``get_peft_model_state_dict``), detached CPU copies: a plain
    ``{name: tensor}`` dict that ``torch.load(weights_only=True)`` and safetensors both take."""
    if not has_dora(transformer):
        raise ConfigError("the transformer has no DoRA adapters to save; add them with add_dora.")
    sd = peft.get_peft_model_state_dict(transformer, adapter_name=_ADAPTER)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def load_adapter_state_dict(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads :func:`adapter_state_dict` output into the (already added) adapters; keys and shapes must match.

    Raises:
        ConfigError: No adapters, or the state belongs to other adapters (rank, architecture, targets).
    """
    if not has_dora(transformer):
        raise ConfigError(
            "the transformer has no DoRA adapters to load into; call add_dora first (same rank and targets)."
        )
    have = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(transformer, adapter_name=_ADAPTER).items()}
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if have != got:
        diff = sorted(set(have) ^ set(got)) or [k for k in have if have[k] != got[k]]
        raise ConfigError(
            f"DoRA state does not fit these adapters ({len(got)} tensors for {len(have)}; first difference: {diff[0] if diff else '?'}); "
            "resume with the same --dora-rank and model, or use another --out-dir."
        )
    res = peft.set_peft_model_state_dict(transformer, state, adapter_name=_ADAPTER)
    bad = list(getattr(res, "unexpected_keys", []) or [])
    if bad:
        raise ConfigError(
            f"DoRA state has {len(bad)} tensors that fit no adapter (first: {bad[0]}); resume with the same --dora-rank and model."
        )


def check_dora_settings(rank: int, alpha: float, lr: float, joint_steps: int) -> None:
    """:class:`~shiva_export.train.loop.TrainConfig` checks of ``dora_rank``, ``dora_alpha``, ``lr_dora``."""
    import math

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"dora_rank is {rank!r}; expected an int >= 1 (paper: 32).")
    for name, v in (("dora_alpha", alpha), ("lr_dora", lr)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} is {v!r}; expected a finite float > 0.")

    if not is_available("peft"):
        raise MissingDependencyError(f"--dora needs peft, which is not installed. Install: {INSTALL_HINTS['peft']}.")
    if joint_steps < 1:
        raise ConfigError(
            "--dora trains its adapters in stage 3 (joint), which has 0 steps; expected at least 1. Pass 3 --steps values with a joint stage."
        )


def load_checkpoint_state(transformer: nn.Module, ck: dict, enabled: bool, path) -> None:
    """Resume: restores the adapters from a training checkpoint's ``"dora"`` entry, refusing a checkpoint
    written with(out) ``--dora`` when this run is the other way (its optimizer has another param group)."""
    has = "dora" in ck
    if has != bool(enabled):
        flag = "with" if has else "without"
        raise ConfigError(
            f"checkpoint {path} was written {flag} --dora, this run is {'without' if has else 'with'} it; expected the same. Resume with the original settings or use another --out-dir."
        )
    if not has:
        return
    old = (ck.get("config") or {}).get("dora_rank")
    rank = getattr(transformer, _DORA_ATTR)["r"]
    if old != rank:
        raise ConfigError(
            f"checkpoint {path} has dora_rank = {old!r}, this run {rank!r}; expected the same. Resume with --dora-rank {old} or use another --out-dir."
        )
    load_adapter_state_dict(transformer, ck["dora"])


# ------------------------------------------------------------------------------------------------- merge
def _check_inputs(transformer: nn.Module, check_inputs) -> dict[str, Any]:
    if isinstance(check_inputs, InputSpec):
        check_inputs = make_inputs(transformer, check_inputs, seed=0)
    device = next(transformer.parameters()).device
    return {
        k: (
            v.to(device=device, dtype=torch.float32)
            if torch.is_tensor(v) and v.is_floating_point()
            else v.to(device)
            if torch.is_tensor(v)
            else v
        )
        for k, v in check_inputs.items()
    }


def merge_and_save(
    transformer: nn.Module, out_dir: str | os.PathLike, check_inputs=None, *, rtol: float = MERGE_RTOL
) -> DoRAMergeResult:
    """Merges the DoRA adapters into the base weights in fp32, removes every peft layer and saves the plain
    transformer to ``out_dir/transformer`` (``save_pretrained``, safetensors; written to a temporary folder
    and renamed, so an interrupted save never leaves a complete-looking folder).

    The model is cast to fp32 first (a bf16/fp16 run's base included) and stays fp32; the saved weights are
    fp32. With ``check_inputs``, the merged model's output is compared with the adapted model's before
    anything is saved.

    Args:
        transformer (nn.Module): A transformer with :func:`add_dora` adapters and no Shiva routing applied
            (``remove_shiva_`` first: the saved folder must hold the transformer's own weights only).
        out_dir (PathLike): Training output folder.
        check_inputs (dict | InputSpec | None): Forward keyword arguments (or an ``InputSpec`` for seeded
            ones) of the merged-vs-unmerged check. Defaults to None (no check).
        rtol (float): Largest accepted relative L2 error of that check. Defaults to 1e-4.

    Returns:
        DoRAMergeResult: Path, sha256, files and the measured merge error.

    Raises:
        ConfigError: No adapters, or Shiva routing still applied.
        ShivaInternalError: Merged and unmerged outputs disagree beyond ``rtol`` (nothing is saved).

    Example:
        >>> remove_shiva_(transformer)
        >>> res = merge_and_save(transformer, "runs/sd35", check_inputs=InputSpec(1, 256, 256, 77, False))
        >>> res.sha256, res.rel_error                                # bound in recipe.toml [model]
    """
    if not has_dora(transformer):
        raise ConfigError("the transformer has no DoRA adapters to merge; add them with add_dora and train stage 3.")
    if is_shiva_applied(transformer):
        raise ConfigError(
            "merge_and_save needs the transformer without Shiva routing (its routers would be saved as transformer weights); call remove_shiva_ first."
        )
    t0 = time.perf_counter()
    was_training = transformer.training
    transformer.eval()
    transformer.float()
    set_dora_enabled(transformer, True)
    inputs = None if check_inputs is None else _check_inputs(transformer, check_inputs)
    ref = None
    if inputs is not None:
        with torch.no_grad():
            ref = transformer(**inputs).sample.float()
    layers = _tuner_layers(transformer)
    with torch.no_grad():
        for name, layer in layers:
            layer.merge(safe_merge=True, adapter_names=[_ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, layer.get_base_layer())
    object.__setattr__(transformer, _DORA_ATTR, None)
    if "peft_config" in transformer.__dict__:
        del transformer.peft_config
    leftover = [n for n, m in transformer.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
    if leftover:
        raise ShivaInternalError(f"peft layers left after the merge: {leftover[:3]}")
    max_abs = rel = None
    if inputs is not None:
        with torch.no_grad():
            out = transformer(**inputs).sample.float()
        max_abs = float((out - ref).abs().max())
        rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
        if not rel <= rtol:
            raise ShivaInternalError(
                f"DoRA merge changed the output: relative error {rel:.3g} (max abs {max_abs:.3g}) > {rtol:g}; nothing was saved"
            )
        logger.info("DoRA merge check: max abs %.3g, relative %.3g", max_abs, rel)
    transformer.train(was_training)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / TRANSFORMER_DIR
    tmp = out / temp_prefix(TRANSFORMER_DIR)
    old = out / temp_prefix(TRANSFORMER_DIR + "-old")
    try:
        transformer.save_pretrained(str(tmp), safe_serialization=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
    files = sorted(p.name for p in dest.glob("*.safetensors"))
    sha = weights_sha256(dest)
    return DoRAMergeResult(
        path=dest,
        sha256=sha,
        files=files,
        modules=len(layers),
        max_abs_error=max_abs,
        rel_error=rel,
        seconds=time.perf_counter() - t0,
    )
