"""Bounded-memory export: the transformer is traced with fake weights and its weights are written to the
ONNX external-data file one tensor at a time.

Why (issue 12): the eager path holds the fp32 model, an fp16 copy and the exporter's own references at
once (SD3.5-Medium shape: 20.6 GB peak RSS for 4.97 GB written), so 8-12 B-parameter models cannot be
exported on a workstation. Here no full-size weight tensor exists while tracing, and each is materialised,
cast to the export dtype, written and freed at save time (docs/benchmarks.md §5 has the numbers).

Two pieces:

- :func:`build_embedded_lazy` builds a seeded-random (embedded recipe) transformer whose large tensors
  are **recipes instead of data**, bit-identical to :meth:`ModelAdapter.build_embedded`. diffusers/torch
  modules initialise from the global CPU generator in construction order, so the construction itself is
  run, under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that turns each large
  ``aten.empty`` into a ``meta`` tensor and, for each random in-place init on it (``uniform_``,
  ``normal_``), saves the generator state, advances the generator exactly as the real op would (the same
  op on a scratch view of the same shape and stride over one reused buffer) and records the op. Replaying
  the recorded ops from the saved states gives the same bits as the eager build. Any other op on a
  placeholder (a post-init edit the recorder does not understand) stops the build with
  :class:`~shiva_export.errors.ShivaInternalError` instead of writing wrong weights.
- Streamed initializers (an ``onnx_ir`` lazy tensor per weight): the ONNX optimizer sees a zero-byte
  stand-in of the right shape for tensors above its folding limit (it only ever folds ``Transpose`` of
  such weights, recorded as a lazy transpose; anything else raises), and ``ir.save`` writes the real
  bytes tensor by tensor, so the graph and the bytes are those of the eager path.

Checkpoints (``--weights`` folders, shipped local pipelines, cached hub snapshots) take the same path through
:func:`load_checkpoint_lazy`: the skeleton is built on ``meta`` and each tensor is read from the memory-mapped
safetensors when written.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shiva_export.checks import check_finite
from shiva_export.errors import ConfigError, ShivaInternalError, WeightsError
from shiva_export.logging import get_logger
from shiva_export.models.base import adapter_for_architecture, check_weights_sha256, get_adapter, read_class_name

__all__ = [
    "LazyWeights",
    "build_embedded_lazy",
    "load_checkpoint_lazy",
    "lazy_transformer",
    "checkpoint_files",
    "is_lazy",
    "fake_placeholders_",
    "materialize_",
    "stream_initializers_",
    "standing_in",
    "resolve_stand_ins_",
    "DEFAULT_LAZY_NUMEL",
]

logger = get_logger(__name__)

#: Tensors with at least this many elements are built as recipes (smaller ones stay real: a few MB in all).
DEFAULT_LAZY_NUMEL = 1 << 16

_aten = torch.ops.aten
_RANDOM_INPLACE = {_aten.uniform_.default, _aten.normal_.default}
_DETERMINISTIC_INPLACE = {_aten.fill_.Scalar, _aten.zero_.default}
# ops that read only metadata or alias a placeholder whole (the alias stays the same recipe)
_ALIAS = {_aten.detach.default, _aten.alias.default}


@dataclass
class _Recipe:
    """How to rebuild one tensor: an empty tensor of ``shape``/``stride``/``dtype``, then ``ops`` in order."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    ops: list[tuple[Any, ...]] = field(default_factory=list)

    def materialize(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for kind, func, args, kwargs, state in self.ops:
                if kind == "rng":
                    torch.set_rng_state(state)
                func(t, *args, **kwargs)
        return t


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _LazyInitMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Records large tensors as :class:`_Recipe` (see the module docstring)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.recipes: dict[int, _Recipe] = {}  # storage key of the meta placeholder -> recipe
        self._buffer: torch.Tensor | None = None

    def _scratch(self, recipe: _Recipe) -> torch.Tensor:
        """A tensor of the recipe's shape, stride and dtype over one reused buffer: the same kernel (and
        generator draws) as on a fresh tensor, without a fresh allocation per weight (glibc keeps freed
        20-30 MB chunks on its heap: 2 GB of fragments for SD3.5-Medium)."""
        nbytes = (1 + sum((n - 1) * st for n, st in zip(recipe.shape, recipe.stride))) * recipe.dtype.itemsize
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes].view(recipe.dtype).as_strided(recipe.shape, recipe.stride)

    def _tracked(self, args: Any, kwargs: dict) -> list[torch.Tensor]:
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        return [a for a in flat if isinstance(a, torch.Tensor) and a.is_meta and _storage_key(a) in self.recipes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.empty.memory_format:
            size = tuple(args[0])
            device = kwargs.get("device")
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            if (
                (device is None or torch.device(device).type == "cpu")
                and dtype.is_floating_point
                and math.prod(size) >= self.min_numel
            ):
                t = func(*args, **{**kwargs, "device": torch.device("meta")})
                self.recipes[_storage_key(t)] = _Recipe(size, tuple(t.stride()), dtype)
                return t
            return func(*args, **kwargs)
        tracked = self._tracked(args, kwargs)
        if not tracked:
            return func(*args, **kwargs)
        if func in _ALIAS:
            return func(*args, **kwargs)
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        recipe = self.recipes.get(_storage_key(target)) if target is not None and target.is_meta else None
        whole = (
            recipe is not None
            and tuple(target.shape) == recipe.shape
            and tuple(target.stride()) == recipe.stride
            and target.storage_offset() == 0
        )
        if whole and len(tracked) == 1 and func in _RANDOM_INPLACE and kwargs.get("generator") is None:
            state = torch.get_rng_state()
            func(self._scratch(recipe), *args[1:], **kwargs)  # advance the generator exactly as the eager init does
            recipe.ops.append(("rng", func, tuple(args[1:]), dict(kwargs), state))
            return target
        if whole and len(tracked) == 1 and func in _DETERMINISTIC_INPLACE:
            recipe.ops.append(("det", func, tuple(args[1:]), dict(kwargs), None))
            return target
        raise _Unsupported(f"{func} on a {list(tracked[0].shape)} placeholder")


class _Unsupported(Exception):
    pass


def is_lazy(t: torch.Tensor) -> bool:
    """True for a placeholder weight (meta or fake): its bytes come from :class:`LazyWeights`."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.is_meta or isinstance(t, FakeTensor)


class LazyWeights:
    """Materialisers of a transformer's placeholder tensors, by state-dict name.

    Args:
        makers (dict[str, Callable[[], torch.Tensor]]): ``name -> () -> tensor`` in the source dtype.
        dtype (torch.dtype): Export dtype; floating tensors are cast to it when materialised. Defaults to None (as made).
    """

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]], dtype: torch.dtype | None = None):
        self.makers = dict(makers)
        self.dtype = dtype
        self.materialized = 0  # how many tensors were made (tests: each once per save)

    def __contains__(self, name: str) -> bool:
        return name in self.makers

    def __len__(self) -> int:
        return len(self.makers)

    def names(self) -> list[str]:
        return list(self.makers)

    def get(self, name: str) -> torch.Tensor:
        t = self.makers[name]()
        self.materialized += 1
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def with_dtype(self, dtype: torch.dtype) -> LazyWeights:
        return LazyWeights(self.makers, dtype)

    def state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every placeholder tensor, made one at a time (for tests and small models)."""
        for name in self.makers:
            yield name, self.get(name)


def build_embedded_lazy(
    adapter, config: dict[str, Any], seed: int = 0, *, min_numel: int | None = None
) -> tuple[nn.Module, LazyWeights]:
    """The transformer of :meth:`ModelAdapter.build_embedded` with its large tensors as placeholders.

    Args:
        adapter (ModelAdapter): The architecture's adapter.
        config (dict): The recipe's ``[model.config]``.
        seed (int): Global seed of the construction, as in ``build_embedded``. Defaults to 0.
        min_numel (int): Tensors with at least this many elements become placeholders. Defaults to
            :data:`DEFAULT_LAZY_NUMEL`.

    Returns:
        (nn.Module, LazyWeights): the module (placeholders on the ``meta`` device, fp32) and the
        materialisers of those placeholders, bit-identical to the eager build's tensors.

    Raises:
        ShivaInternalError: construction did something to a placeholder the recorder cannot replay.
    """
    cls = adapter.model_class()
    adapter.check_config_ranges(config)
    mode = _LazyInitMode(DEFAULT_LAZY_NUMEL if min_numel is None else min_numel)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with mode:
                model = cls(**adapter.normalize_config(dict(config)))
    except _Unsupported as err:
        raise ShivaInternalError(
            f"{adapter.MODEL_CLASS}: its construction does {err} that the lazy builder cannot replay; "
            "export it with `shiva-export onnx --eager` (loads the whole model). Please report this."
        ) from None
    except TypeError as err:
        raise ConfigError(f"Invalid {adapter.MODEL_CLASS} config: {err}. Check [model.config] in the recipe.") from None
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            recipe = mode.recipes.get(_storage_key(t))
            if recipe is None or tuple(t.shape) != recipe.shape:
                raise ShivaInternalError(
                    f"{adapter.MODEL_CLASS}: tensor {name} is on the meta device without a recipe. Please report this."
                )
            makers[name] = recipe.materialize
    logger.debug("lazy build: %d placeholders of %d tensors", len(makers), len(model.state_dict()))
    return model.eval(), LazyWeights(makers)


_SAFETENSORS = "diffusion_pytorch_model.safetensors"
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def checkpoint_files(folder: Path) -> dict[str, Path] | None:
    """``{tensor name: safetensors file}`` of a diffusers transformer folder (single file or sharded with an
    index), or None when it holds no plain ``diffusion_pytorch_model*.safetensors`` (variants, .bin)."""
    import json

    single, index = folder / _SAFETENSORS, folder / (_SAFETENSORS + ".index.json")
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        files = {k: folder / v for k, v in weight_map.items()}
        return files if all(p.is_file() for p in set(files.values())) else None
    return None


def load_checkpoint_lazy(adapter, folder: Path, where: str) -> tuple[nn.Module, LazyWeights] | None:
    """The transformer of a diffusers folder (``config.json`` + safetensors) with **every** state-dict tensor a
    placeholder read from the memory-mapped safetensors on demand (as ``from_pretrained(torch_dtype=float32)``
    gives it: floating tensors cast to fp32). None when the folder's layout is not one this reads (the caller
    then loads eagerly).

    Raises:
        WeightsError: the checkpoint has missing, unexpected or mismatched tensors (as the eager loader).
    """
    import json

    try:
        files = checkpoint_files(folder)
    except Exception:  # noqa: BLE001 - an unreadable or hostile file: the eager loader reports it in its words
        return None
    if files is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(
            f"{where}: config.json is unreadable ({err}). Pass the folder written by save_pretrained."
        ) from None
    cls = adapter.model_class()
    mode = _LazyInitMode(1)
    try:
        with torch.random.fork_rng(devices=[]), mode:
            model = cls.from_config(config)
    except _Unsupported:
        return None
    except TypeError as err:
        raise WeightsError(
            f"{where}: config.json does not fit {adapter.MODEL_CLASS} ({err}). Pass the folder written by save_pretrained."
        ) from None
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
    except Exception:  # noqa: BLE001 - as above
        return None
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    problems = {
        "missing keys": [k for k in expected if k not in shapes],
        "unexpected keys": [k for k in shapes if k not in expected],
        "mismatched keys": [k for k in expected if k in shapes and shapes[k][0] != expected[k]],
    }
    for kind, bad in problems.items():
        if bad:
            names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise WeightsError(
                f"{where}: the checkpoint does not match {adapter.MODEL_CLASS} ({kind}: {names}); "
                "nothing is exported from uninitialised parameters. Pass the complete folder written by save_pretrained."
            )

    def maker(name: str, target: torch.dtype) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            with safe_open(str(files[name]), framework="pt") as f:
                t = f.get_tensor(name)

            check_finite({name: t}, f"weights {files[name]}", WeightsError)
            return t.to(target) if t.dtype != target else t

        return make

    makers: dict[str, Callable[[], torch.Tensor]] = {}
    state = model.state_dict()
    for mod, attr, is_param, t in _placeholders(model, list(state)):
        name = next(n for n, m in model.named_modules(remove_duplicate=False) if m is mod)
        full = f"{name}.{attr}" if name else attr
        src = _ST_DTYPES.get(shapes[full][1], t.dtype)
        target = torch.float32 if src.is_floating_point else src
        meta = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=target, device="meta")
        if is_param:
            mod._parameters[attr] = nn.Parameter(meta, requires_grad=t.requires_grad)
        else:
            mod._buffers[attr] = meta
        makers[full] = maker(full, target)
    logger.debug(
        "lazy checkpoint: %d tensors from %d safetensors file(s) in %s", len(makers), len(set(files.values())), folder
    )
    return model.eval(), LazyWeights(makers)


def lazy_transformer(recipe, weights=None) -> tuple[nn.Module, LazyWeights] | None:
    """The recipe's transformer with placeholders (see :func:`build_embedded_lazy`, :func:`load_checkpoint_lazy`),
    from the same source :func:`~shiva_export.models.load_transformer` would use. None where this cannot
    read the source (no plain safetensors, not cached, an invalid folder): the caller loads eagerly, which
    also reports any error in its usual words."""
    if weights is None and recipe.model.source == "embedded":
        return build_embedded_lazy(
            adapter_for_architecture(recipe.architecture), recipe.model.config, recipe.model.seed
        )
    if weights is None and recipe.model.source == "local":
        weights = recipe.local_pipeline_path()
    if weights is not None:
        p = Path(weights).expanduser()
        folder = p if (p / "config.json").is_file() else p / "transformer"
        cls_name = read_class_name(folder) if (folder / "config.json").is_file() else None
        if cls_name is None:
            return None
        try:
            adapter = get_adapter(cls_name)
        except ConfigError as err:  # name the folder and the fix, not only the class
            raise ConfigError(
                f"--weights {p} holds a {cls_name} ({folder / 'config.json'}): {err} Pass a diffusers DiT transformer or pipeline folder."
            ) from None
        if adapter.NAME != recipe.architecture:
            return None

        check_weights_sha256(folder, recipe)  # a recipe bound to its weights loads only those, lazily too
        return load_checkpoint_lazy(adapter, folder, str(p))
    repo, sub = recipe.model.repo_id, recipe.model.subfolder
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub library): the eager path explains
        return None
    folder = snap / sub if sub else snap
    if not (folder / "config.json").is_file():
        return None
    return load_checkpoint_lazy(
        adapter_for_architecture(recipe.architecture), folder, f"{repo}{'/' + sub if sub else ''}"
    )


def _placeholders(module: nn.Module, names) -> Iterator[tuple[nn.Module, str, bool, torch.Tensor]]:
    """``(owner module, attribute, is_parameter, tensor)`` of each named parameter/buffer in ``names``."""
    wanted = set(names)
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for attr, t in list(store.items()):
                full = f"{mod_name}.{attr}" if mod_name else attr
                if t is not None and full in wanted:
                    yield mod, attr, is_param, t


def fake_placeholders_(module: nn.Module, weights: LazyWeights) -> nn.Module:
    """Replaces ``module``'s meta placeholders by fake CPU tensors (same shape, stride, dtype): the exporter
    traces them like real weights (``device`` reads ``cpu``) and never sees data. In place; returns ``module``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fm = FakeTensorMode()
    for mod, attr, is_param, t in _placeholders(module, weights.names()):
        if not t.is_meta:
            continue
        with fm:
            f = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
        if is_param:
            mod._parameters[attr] = nn.Parameter(f, requires_grad=t.requires_grad)
        else:
            mod._buffers[attr] = f
    return module


def materialize_(module: nn.Module, weights: LazyWeights) -> nn.Module:
    """Replaces ``module``'s placeholders (meta or fake) by their real tensors, in the placeholder's dtype.
    In place; returns ``module`` (a normal eager model afterwards, e.g. the fp32 parity reference)."""
    for mod, attr, is_param, t in _placeholders(module, weights.names()):
        if not is_lazy(t):
            continue
        prefix = next(n for n, m in module.named_modules(remove_duplicate=False) if m is mod)
        real = weights.makers[f"{prefix}.{attr}" if prefix else attr]().to(t.dtype)
        if is_param:
            mod._parameters[attr] = nn.Parameter(real, requires_grad=t.requires_grad)
        else:
            mod._buffers[attr] = real
    return module


# -- onnx_ir side: streamed initializers ------------------------------------------------------------------
#: Tensors above this many elements are shown to the ONNX optimizer as zero-byte stand-ins. It equals
#: onnxscript's constant-folding input limit, above which the folder only ever folds ``Transpose``.
STAND_IN_NUMEL = 8192


class _StandIn(np.ndarray):
    """A zero-strided, zero-byte array of a weight's shape and dtype; ``source`` says what it stands for."""

    source: Callable[[], torch.Tensor] | None

    def __array_finalize__(self, obj):
        self.source = getattr(obj, "source", None)


def _stand_in(shape: tuple[int, ...], dtype: np.dtype, source: Callable[[], torch.Tensor]) -> _StandIn:
    base = np.zeros((), dtype=dtype).view(_StandIn)
    arr = np.broadcast_to(base, shape, subok=True)
    arr.source = source
    return arr


_STANDING_IN = False


@functools.cache
def _streamed_tensor_class():
    import onnx_ir as ir

    class _Streamed(ir.LazyTensor):
        """An initializer whose bytes are made when written (``ir.save`` writes tensor by tensor)."""

        __slots__ = ("source",)

        def __init__(self, source: Callable[[], torch.Tensor], dtype, shape, name: str, metadata_props=None):
            from torch.onnx._internal.exporter._core import TorchTensor

            self.source = source
            super().__init__(
                lambda: TorchTensor(source(), name), dtype=dtype, shape=shape, name=name, metadata_props=metadata_props
            )

        def numpy(self):
            if _STANDING_IN and self.size > STAND_IN_NUMEL:
                return _stand_in(tuple(self.shape.numpy()), self.dtype.numpy(), self.source)
            return self._evaluate().numpy()

        def tobytes(self) -> bytes:
            return self._evaluate().tobytes()

    return _Streamed


def stream_initializers_(model, weights: LazyWeights, prefix: str = "") -> int:
    """Replaces fake initializer values of an ``onnx_ir`` model by streamed tensors of ``weights``
    (initializer ``prefix + name``). Returns how many were replaced; a fake left over is an error."""
    from torch._subclasses.fake_tensor import FakeTensor

    cls = _streamed_tensor_class()
    n = 0
    for value in model.graph.initializers.values():
        cv = value.const_value
        raw = getattr(cv, "raw", None)
        if not isinstance(raw, FakeTensor):
            continue
        name = value.name[len(prefix) :] if value.name.startswith(prefix) else None
        if name is None or name not in weights:
            raise ShivaInternalError(
                f"initializer {value.name} holds a fake tensor that no weight source makes. Please report this."
            )
        value.const_value = cls(
            lambda name=name: weights.get(name), cv.dtype, cv.shape, cv.name, dict(cv.metadata_props)
        )
        n += 1
    return n


def _folded(source: Callable[[], torch.Tensor], perm: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    return lambda: source().permute(perm).contiguous()


@contextlib.contextmanager
def standing_in() -> Iterator[None]:
    """While active, the ONNX optimizer sees stand-ins for large streamed tensors, and a ``Transpose`` it
    folds over one becomes a lazy transpose (exactly what the eager folder computes: ``np.transpose``, C order).
    Any other evaluation over a stand-in raises :class:`ShivaInternalError` (never a silently zero weight)."""
    global _STANDING_IN
    from onnxscript.optimizer import _constant_folding as cf

    original = cf._reference_evaluator

    class _Evaluator:
        def evaluate(self, domain, op, version, *args, **kwargs):
            ins = [a for a in args if isinstance(a, _StandIn)]
            if not ins:
                return original.evaluate(domain, op, version, *args, **kwargs)
            if domain == "" and op == "Transpose" and len(args) == 1:
                x = args[0]
                perm = tuple(kwargs.get("perm") or reversed(range(x.ndim)))
                return _stand_in(tuple(x.shape[p] for p in perm), x.dtype, _folded(x.source, perm))
            raise ShivaInternalError(
                f"the ONNX optimizer folds {op} over a streamed weight of shape {list(ins[0].shape)}; not supported. Please report this."
            )

    _STANDING_IN, cf._reference_evaluator = True, _Evaluator()
    try:
        yield
    finally:
        _STANDING_IN, cf._reference_evaluator = False, original


def resolve_stand_ins_(model) -> int:
    """After optimizing under :func:`standing_in`: folded initializers over stand-ins become streamed tensors."""
    cls = _streamed_tensor_class()
    n = 0
    for value in model.graph.initializers.values():
        cv = value.const_value
        raw = getattr(cv, "raw", None)
        if isinstance(raw, _StandIn):
            value.const_value = cls(raw.source, cv.dtype, cv.shape, cv.name, dict(cv.metadata_props))
            n += 1
    return n
