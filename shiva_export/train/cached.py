"""Cached-latent training sources: what ``shiva-export train --data`` reads.

The layout of a cached sample is a fact of the architecture's adapter (``shiva_export.models``):
``ModelAdapter.CACHE_TEXT_INPUTS`` names the text tensors it holds and the forward arguments they feed (SD3,
Flux: ``prompt_embeds``, ``pooled``; PixArt: ``prompt_embeds``, ``prompt_attention_mask``; DiT:
``class_labels``), ``latents`` are clean latents in the layout of ``hidden_states`` (Flux: packed tokens),
``ModelAdapter.noised_latents`` noises them to the training timesteps (rectified flow, target ``eps - x0``;
DDPM, target ``eps``) and ``ModelAdapter.make_inputs`` gives the static extras (Flux position ids and
guidance). :class:`CachedLayout` applies these facts; it is the one place that turns cached rows into a
:class:`~shiva_export.train.data.Batch`.

Two sources use it, with the same batches:

* :class:`ShardedLatents`: a ``shiva-export train-data`` output (:mod:`shiva_export.train.dataset`: sharded
  safetensors and a manifest), read lazily: shards are memory-mapped (``safetensors.safe_open``) and each
  sample is read on demand (``get_slice``), through a ``torch.utils.data`` DataLoader (optional worker
  processes). Resident memory does not grow with the dataset: the reader holds the null conditioning, one
  epoch permutation (8 bytes per sample) and the batch being built. On open the folder is checked against
  the manifest (file sizes, safetensors headers, sha256 of every shard memoised by
  :func:`~shiva_export.utils.io.sha256_file_cached`, so only the first open reads the shards in full).
  Samples come from a seeded per-epoch permutation (no replacement within an epoch). A text-only folder (no
  images) gives real text conditioning with seeded Gaussian ``x_t`` and no target: distillation only.
* :class:`LatentFolder`: a folder of ``.safetensors`` files, one sample each (``latents`` and the text
  tensors, no batch axis), read wholly into RAM (small folders, e.g. ``recipes/sd35-shapes`` training);
  samples are drawn with replacement. An optional ``null.safetensors`` (the text tensors) gives it the null
  conditioning for caption dropout / CFG pairs.

:func:`make_data` picks the source of ``--data`` (or :class:`~shiva_export.train.data.SyntheticData`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shiva_export.errors import ConfigError, ShapeError
from shiva_export.logging import get_logger
from shiva_export.models import InputSpec, adapter_for_architecture, get_adapter
from shiva_export.train.data import Batch, SyntheticData, check_conditioning, condition_batch, draw_timesteps
from shiva_export.train.dataset import FORMAT, FORMAT_VERSION, MANIFEST_NAME, NULL_NAME
from shiva_export.utils.io import safe_component, sha256_file_cached

__all__ = ["CachedLayout", "LatentFolder", "ShardDataset", "ShardedLatents", "is_train_data", "make_data"]

logger = get_logger(__name__)


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    """float32 for floating tensors (stored in fp16/bf16 too); masks and class ids keep their integer dtype."""
    return t.float() if t.is_floating_point() else t


class CachedLayout:
    """One architecture's cached-latent layout (its adapter's facts, see the module docstring): which tensors a
    cached sample holds, the shapes the model needs, and how cached rows become a :class:`Batch`.

    Args:
        adapter (ModelAdapter): The architecture's adapter.
        config: The transformer config: shape checks and static extras (Flux ids, guidance). Defaults to None (neither).
        height, width (int | None): Training image size in pixels (shape checks, extras). Default to None.
    """

    def __init__(self, adapter, config=None, height: int | None = None, width: int | None = None):
        self.adapter, self.config, self.height, self.width = adapter, config, height, width
        self.text_keys = tuple(adapter.CACHE_TEXT_INPUTS)
        self._extras: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    @classmethod
    def of(cls, model, height: int | None = None, width: int | None = None) -> CachedLayout:
        """The layout of a transformer, a config (``_class_name``) or an architecture key (no shape checks, no extras)."""
        config = None if isinstance(model, str) else getattr(model, "config", model)
        return cls(get_adapter(model), config, height, width)

    def _text_len(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Text tokens of stored per-sample shapes (the tensor that feeds ``encoder_hidden_states``); 1 without text."""
        for key, name in self.adapter.CACHE_TEXT_INPUTS.items():
            if name == "encoder_hidden_states" and key in shapes:
                return int(shapes[key][0])
        return 1

    def expected(self, shapes: dict[str, tuple[int, ...]], height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes the model needs at ``height`` x ``width`` px, at the stored text length."""
        return self.adapter.cache_shapes(self.config, InputSpec(1, height, width, self._text_len(shapes), False))

    def check(self, shapes: dict[str, tuple[int, ...]], where: str, encoded_px: tuple[int, int] | None = None) -> None:
        """Refuses stored per-sample ``shapes`` that do not fit the model at the training size (no-op without a config).
        ``encoded_px`` (width, height): the size the data says it was encoded at, to name a resolution mismatch."""
        if self.config is None or self.height is None or self.width is None:
            return
        want = self.expected(shapes, self.height, self.width)
        for key in self.text_keys:
            if key in shapes and tuple(shapes[key]) != want[key]:
                raise ShapeError(
                    f"{where} holds {key} {tuple(shapes[key])}; the model needs {want[key]}. Encode it for this model (shiva-export train-data --model ...)."
                )
        got = tuple(shapes["latents"])
        if got == want["latents"]:
            return
        if (
            encoded_px is not None and got == self.expected(shapes, encoded_px[1], encoded_px[0])["latents"]
        ):  # the learned k per phase is for the recipe's token count
            raise ShapeError(
                f"{where} was encoded at {encoded_px[0]}x{encoded_px[1]} px (latents {got}); training runs at {self.width}x{self.height} px "
                f"(the recipe's shapes). Re-encode with --width/--height to match, or pass --recipe with those shapes."
            )
        raise ShapeError(
            f"{where} holds latents {got}; the model needs {want['latents']} (channels and latent grid at {self.width}x{self.height} px). Encode it for this model."
        )

    def null_inputs(self, null: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored null conditioning under the transformer's argument names (no batch axis)."""
        return {name: null[key] for key, name in self.adapter.CACHE_TEXT_INPUTS.items()}

    def _static(self, b: int, text_len: int) -> dict[str, torch.Tensor]:
        """The adapter's own values of the inputs a cached sample does not hold (Flux: ids, guidance), per batch size."""
        if self.config is None or self.height is None or self.width is None:
            return {}
        if (b, text_len) not in self._extras:
            spec = InputSpec(b, self.height, self.width, text_len, False)
            held = {"hidden_states", "timestep", *self.adapter.CACHE_TEXT_INPUTS.values()}
            made = self.adapter.make_inputs(self.config, spec, seed=0)
            self._extras[(b, text_len)] = {n: v for n, v in made.items() if n not in held}
        return self._extras[(b, text_len)]

    def _batched(self) -> set[str] | None:
        """Inputs with a batch axis (Flux ``img_ids``/``txt_ids`` have none); None: all."""
        if self.config is None or self.height is None or self.width is None:
            return None

        shapes = self.adapter.input_shapes(self.config, InputSpec(1, self.height, self.width, 1, False))
        return {n for n in shapes if n != "timestep"}

    def batch(
        self,
        rows: dict[str, torch.Tensor],
        timesteps,
        generator: torch.Generator,
        *,
        latent_shape: Sequence[int] | None = None,
        caption_dropout: float = 0.0,
        cfg_pairs: bool = False,
        null: dict[str, torch.Tensor] | None = None,
    ) -> Batch:
        """Cached rows ``{key: [B, ...]}`` noised to ``timesteps`` (``[B]``, 0..1000; default uniform), all random
        numbers from ``generator`` (noise, then timesteps, then caption dropout). Without ``latents`` (text-only
        data) ``x_t`` is seeded Gaussian of ``latent_shape`` and there is no target."""
        b = int(rows[self.text_keys[0]].shape[0])
        if "latents" in rows:
            x0 = rows["latents"]
            eps = torch.randn(x0.shape, generator=generator)
            t = draw_timesteps(b, timesteps, generator)
            xt, target = self.adapter.noised_latents(x0, eps, t)
        else:
            xt = torch.randn((b, *latent_shape), generator=generator)
            t = draw_timesteps(b, timesteps, generator)
            target = None
        inputs = {"hidden_states": xt, **{name: rows[key] for key, name in self.adapter.CACHE_TEXT_INPUTS.items()}}
        text = inputs.get("encoder_hidden_states")
        inputs.update(self._static(b, int(text.shape[1]) if text is not None else 1))
        out = Batch(inputs, t, target=target, timestep_scale=float(self.adapter.TIMESTEP_SCALE))
        if caption_dropout == 0.0 and not cfg_pairs:
            return out
        return condition_batch(
            out,
            self.null_inputs(null),
            caption_dropout=caption_dropout,
            cfg_pairs=cfg_pairs,
            generator=generator,
            batched=self._batched(),
        )


class LatentFolder:
    """Cached samples, one ``.safetensors`` file each (``latents`` and the layout's text tensors, no batch axis;
    see the module docstring), read once at construction and checked for names and shapes; samples are drawn
    with replacement from a seeded generator.

    Args:
        folder (PathLike): Folder holding ``*.safetensors`` files.
        model: The transformer (or its config, or an architecture key) whose layout the files hold; a transformer
            or config also checks the shapes at ``height`` x ``width``.
        seed (int): RNG seed of sampling and noise. Defaults to 0.
        height, width (int | None): Training image size in pixels. Default to None (no shape check).

    Raises:
        ConfigError: The folder is missing, holds no ``.safetensors`` file, or a file lacks a tensor.
        ShapeError: A tensor's shape does not fit the model or the other files.
    """

    has_targets = True

    def __init__(
        self, folder: str | os.PathLike, model, seed: int = 0, *, height: int | None = None, width: int | None = None
    ):
        p = Path(folder).expanduser()
        self.layout = CachedLayout.of(model, height, width)
        self.keys = ("latents", *self.layout.text_keys)
        if not p.is_dir():
            raise ConfigError(
                f"--data folder does not exist: {p}. Pass a folder of .safetensors files ({', '.join(self.keys)}) or omit --data for synthetic inputs."
            )
        files = sorted(f for f in p.glob("*.safetensors") if f.name != NULL_NAME)
        if not files:
            raise ConfigError(
                f"--data folder holds no .safetensors file: {p}. Write one file per sample with tensors {list(self.keys)}."
            )
        self.tensors = self._read(p, files)
        self.layout.check({k: tuple(v.shape[1:]) for k, v in self.tensors.items()}, f"cached samples in {p}")
        self.folder = p
        self.seed = int(seed)
        self._g = torch.Generator(device="cpu").manual_seed(self.seed)
        self.null = self._read_null(p)
        logger.info(
            "loaded %d cached samples from %s (%s)",
            len(files),
            p,
            {k: tuple(v.shape[1:]) for k, v in self.tensors.items()},
        )

    def _read(self, p: Path, files: list[Path]) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        rows: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        for f in files:
            try:
                d = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as err:
                raise ConfigError(
                    f"cannot read cached sample {f}: {str(err).splitlines()[0]}. Re-write it with safetensors.torch.save_file."
                ) from None
            missing = [k for k in self.keys if k not in d]
            if missing:
                raise ConfigError(
                    f"cached sample {f} lacks tensors {missing}; expected {list(self.keys)}. Add them or remove the file."
                )
            for k in self.keys:
                rows[k].append(_as_stored(d[k]))
        for name, ts in rows.items():
            shapes_seen = {tuple(t.shape) for t in ts}
            if len(shapes_seen) > 1:
                raise ShapeError(
                    f"cached {name} differ in shape across files in {p}: {sorted(shapes_seen)}; expected one shape. Use one resolution and text length."
                )
        return {k: torch.stack(v) for k, v in rows.items()}

    def _read_null(self, p: Path) -> dict[str, torch.Tensor] | None:
        """The optional ``null.safetensors``: the text tensors of the null conditioning."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not (p / NULL_NAME).is_file():
            return None
        try:
            nd = load_file(str(p / NULL_NAME))
            null = {k: _as_stored(nd[k]) for k in self.layout.text_keys}
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise ConfigError(
                f"cannot read the null embedding {p / NULL_NAME}: {str(err).splitlines()[0]}. It needs tensors {list(self.layout.text_keys)}."
            ) from None
        if any(null[k].shape != self.tensors[k].shape[1:] for k in self.layout.text_keys):
            raise ShapeError(
                f"the null embedding {p / NULL_NAME} has shapes that differ from the samples' in {p}. Encode it with the same pipeline."
            )
        return null

    @property
    def latents(self) -> torch.Tensor:
        return self.tensors["latents"]

    @property
    def null_text(self) -> dict[str, torch.Tensor] | None:
        """The null conditioning under the transformer's argument names (no batch axis); None without ``null.safetensors``."""
        return None if self.null is None else self.layout.null_inputs(self.null)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __repr__(self) -> str:
        return f"LatentFolder({str(self.folder)!r}, samples={len(self)}, seed={self.seed})"

    def batch(
        self,
        batch: int,
        timesteps: torch.Tensor | None = None,
        *,
        caption_dropout: float = 0.0,
        cfg_pairs: bool = False,
    ) -> Batch:
        """Draws ``batch`` samples with replacement and noises them to ``timesteps`` (the adapter's objective).
        ``caption_dropout`` / ``cfg_pairs`` (see :func:`~shiva_export.train.data.condition_batch`) need ``null.safetensors`` in the folder."""
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        check_conditioning(caption_dropout, cfg_pairs)
        if (caption_dropout > 0.0 or cfg_pairs) and self.null is None:
            raise ConfigError(
                f"caption dropout / CFG pairs need the pipeline's null embedding, and {self.folder} has no {NULL_NAME}. "
                'Encode the data with shiva-export train-data (it stores encode_prompt("")), or add that file.'
            )
        return self._noised(
            torch.randint(0, len(self), (batch,), generator=self._g), timesteps, caption_dropout, cfg_pairs
        )

    def every(self, timesteps: torch.Tensor | None = None, *, cfg_pairs: bool = False) -> Batch:
        """Every sample once, in file order, noised to ``timesteps`` (``[len(self)]``) from this source's RNG:
        a fixed evaluation batch of a held-out split (:meth:`split_off`)."""
        check_conditioning(0.0, cfg_pairs)
        if cfg_pairs and self.null is None:
            raise ConfigError(
                f"CFG pairs need the pipeline's null embedding, and {self.folder} has no {NULL_NAME}. Add that file or train without --cfg-pairs."
            )
        return self._noised(torch.arange(len(self)), timesteps, 0.0, cfg_pairs)

    def _noised(self, ix: torch.Tensor, timesteps, caption_dropout: float, cfg_pairs: bool) -> Batch:
        rows = {k: v[ix] for k, v in self.tensors.items()}
        return self.layout.batch(
            rows, timesteps, self._g, caption_dropout=caption_dropout, cfg_pairs=cfg_pairs, null=self.null
        )

    def split_off(self, n: int, seed: int) -> LatentFolder:
        """Removes the last ``n`` samples (by file name) from this source and returns them as their own
        source with RNG ``seed``: a held-out split that training never draws from.

        Raises:
            ConfigError: ``n`` is not in ``1 .. len(self) - 1``.
        """
        if not isinstance(n, int) or not 1 <= n < len(self):
            raise ConfigError(
                f"held-out split of {n!r} samples from {self.folder} ({len(self)} samples); expected 1 <= n < {len(self)}. Pass fewer --eval-samples."
            )
        import copy

        held = copy.copy(self)
        held.tensors = {k: v[-n:] for k, v in self.tensors.items()}
        held.seed, held._g = int(seed), torch.Generator(device="cpu").manual_seed(int(seed))
        self.tensors = {k: v[:-n] for k, v in self.tensors.items()}
        return held

    def state_dict(self) -> dict:
        return {"kind": "latents", "seed": self.seed, "rng": self._g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._g.set_state(state["rng"])


# ------------------------------------------------------------------------------------ train-data folders
def is_train_data(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a ``train-data`` output (holds ``manifest.json``)."""
    return (Path(folder).expanduser() / MANIFEST_NAME).is_file()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(
            f"--data {folder}: {MANIFEST_NAME} cannot be read ({err.__class__.__name__}). Re-run shiva-export train-data."
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ConfigError(
            f"--data {folder}: {MANIFEST_NAME} is not a {FORMAT} manifest. Re-run shiva-export train-data into a new folder."
        )
    if m.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"--data {folder}: manifest version {m.get('version')!r}; this shiva-export reads version {FORMAT_VERSION}. Re-encode with this version."
        )
    for key in ("samples", "shards", "shapes", "null", "latent_shape"):
        if key not in m:
            raise ConfigError(f"--data {folder}: {MANIFEST_NAME} lacks {key!r}. Re-run shiva-export train-data.")

    def bad(what: str) -> ConfigError:
        return ConfigError(f"--data {folder}: {MANIFEST_NAME} has a malformed {what}. Re-run shiva-export train-data.")

    def ints(v, n: int | None = None) -> bool:
        return (
            isinstance(v, list)
            and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
        )

    def entry_ok(e, samples: bool) -> bool:
        return (
            isinstance(e, dict)
            and isinstance(e.get("file"), str)
            and isinstance(e.get("sha256"), str)
            and ints([e.get("bytes")])
            and (not samples or ints([e.get("samples")]))
        )

    if not ints([m["samples"]]):
        raise bad("samples count")
    if not isinstance(m["shards"], list) or not m["shards"] or not all(entry_ok(e, True) for e in m["shards"]):
        raise bad("shards list")
    if not entry_ok(m["null"], False):
        raise bad("null entry")
    if not isinstance(m["shapes"], dict) or not all(ints(v) for v in m["shapes"].values()):
        raise bad("shapes")
    if not ints(
        m["latent_shape"], len(m["shapes"]["latents"]) if "latents" in m["shapes"] else None
    ):  # the layout's rank (Flux: packed [N, C])
        raise bad("latent_shape")
    return m


def _check_file(folder: Path, entry: dict[str, Any], verify: str) -> Path:
    from safetensors import SafetensorError

    name = safe_component(entry.get("file"), "train-data shard")
    path = folder / name
    fix = "Re-run shiva-export train-data (the folder is damaged)."
    if not path.is_file():
        raise ConfigError(f"--data {folder}: {name} is missing. {fix}")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise ConfigError(
            f"--data {folder}: {name} is {size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced). {fix}"
        )
    if verify == "sha256" and sha256_file_cached(path) != entry.get("sha256"):
        raise ConfigError(f"--data {folder}: {name} does not match its sha256 in the manifest (corrupted). {fix}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(
            f"--data {folder}: {name} is not a readable safetensors file ({str(err).splitlines()[0]}). {fix}"
        ) from None
    return path


def _manifest_layout(m: dict[str, Any], p: Path, model, height: int | None, width: int | None) -> CachedLayout:
    """The layout of the manifest's architecture (manifests before the field were SD3's, the only one then);
    a model of another architecture is refused."""
    arch = m.get("architecture", "sd3")
    if not isinstance(arch, str):
        raise ConfigError(f"--data {p}: {MANIFEST_NAME} has a malformed architecture. Re-run shiva-export train-data.")
    adapter = adapter_for_architecture(arch)
    if model is None:
        return CachedLayout(adapter)
    if get_adapter(model).NAME != arch:
        raise ConfigError(
            f"--data {p} was encoded for architecture {arch!r} (model {m.get('model')!r}); this model is {get_adapter(model).NAME!r}. "
            "Encode the data with shiva-export train-data --model for this model."
        )
    return CachedLayout(adapter, getattr(model, "config", model), height, width)


def _check_shards(
    p: Path, m: dict[str, Any], keys: tuple[str, ...], want: dict[str, tuple[int, ...]], verify: str
) -> tuple[list[Path], list[int]]:
    """Every shard checked against the manifest (size, sha256, header, tensor names and shapes): ``(paths, samples per shard)``."""
    from safetensors import safe_open

    paths, counts = [], []
    for entry in m["shards"]:
        path = _check_file(p, entry, verify)
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if not set(keys) <= names:
                raise ConfigError(
                    f"--data {p}: {path.name} lacks tensors {sorted(set(keys) - names)}. Re-run shiva-export train-data."
                )
            for k in keys:
                got = tuple(f.get_slice(k).get_shape())
                if got != (entry["samples"], *want[k]):
                    raise ShapeError(
                        f"--data {p}: {path.name} holds {k} {got}; the manifest says {(entry['samples'], *want[k])}. Re-run shiva-export train-data."
                    )
        paths.append(path)
        counts.append(int(entry["samples"]))
    if sum(counts) != int(m["samples"]) or not counts:
        raise ConfigError(
            f"--data {p}: the shards hold {sum(counts)} samples, the manifest says {m['samples']}. Re-run shiva-export train-data."
        )
    return paths, counts


def _read_null(p: Path, m: dict[str, Any], text_keys: tuple[str, ...], verify: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    null = load_file(str(_check_file(p, m["null"], verify)))
    missing = [k for k in text_keys if k not in null]
    if missing:
        raise ConfigError(f"--data {p}: {NULL_NAME} lacks tensors {missing}. Re-run shiva-export train-data.")
    return {k: _as_stored(null[k]) for k in text_keys}


class ShardDataset(torch.utils.data.Dataset):
    """Per-sample reads from memory-mapped shards: ``ds[i]`` -> ``{text keys..., ["latents"]}`` (floats as float32,
    no batch axis). Picklable for DataLoader workers: file handles are opened lazily per process.

    Attributes:
        reads (int): Samples read in this process (what the RAM tests count).
    """

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], keys: Sequence[str]):
        self.paths = [str(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.keys = tuple(keys)
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self.reads = 0
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def locate(self, i: int) -> tuple[int, int]:
        import bisect

        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range 0..{len(self) - 1}")
        s = bisect.bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    def _handle(self, s: int):
        f = self._handles.get(s)
        if f is None:
            from safetensors import safe_open

            f = self._handles[s] = safe_open(self.paths[s], framework="pt")
        return f

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, j = self.locate(int(i))
        f = self._handle(s)
        self.reads += 1
        return {k: _as_stored(f.get_slice(k)[j : j + 1][0]) for k in self.keys}

    def close(self) -> None:
        self._handles.clear()


class _IndexStream(torch.utils.data.Sampler):
    """The endless sample order from position ``start``: epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``."""

    def __init__(self, n: int, seed: int, start: int):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        while True:
            e, off = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e)).tolist()
            yield from perm[off:]
            pos = (e + 1) * self.n

    def __len__(self) -> int:  # endless; DataLoader only needs it for warnings
        return 2**62


@dataclass
class _Loader:
    batch: int
    it: Iterator


class ShardedLatents:
    """Lazy reader of a ``shiva-export train-data`` folder with the :class:`LatentFolder` batch interface (see the
    module docstring). The layout is the manifest's ``architecture``'s.

    Args:
        folder (PathLike): The train-data output folder (holds ``manifest.json``).
        model: The transformer (or its config) to train: checks the data was encoded for its architecture and
            fits it at ``height`` x ``width``, and gives the static extras. Defaults to None (no checks, no extras).
        seed (int): Seed of the sample order, noise and caption dropout. Defaults to 0.
        height, width (int | None): Training image size in pixels. Default to None.
        num_workers (int): DataLoader worker processes reading samples (0: in this process). Defaults to 0.
        verify (str): ``sha256`` (sizes + memoised shard hashes) or ``size`` (sizes and headers only). Defaults to ``sha256``.

    Raises:
        ConfigError: The manifest or a shard is missing, damaged or inconsistent, or encoded for another architecture.
        ShapeError: The stored shapes do not fit the model.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        model=None,
        seed: int = 0,
        *,
        height: int | None = None,
        width: int | None = None,
        num_workers: int = 0,
        verify: str = "sha256",
    ):
        if verify not in ("sha256", "size"):
            raise ConfigError(f"verify {verify!r} is unknown; choose sha256 or size.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers {num_workers!r} is out of range; expected an int >= 0.")
        p = Path(folder).expanduser()
        if not p.is_dir():
            raise ConfigError(f"--data folder does not exist: {p}. Pass a shiva-export train-data output folder.")
        m = _read_manifest(p)
        self.manifest, self.folder = m, p
        self.layout = _manifest_layout(m, p, model, height, width)
        self.has_targets = bool(m.get("has_latents"))
        keys = self.layout.text_keys + (("latents",) if self.has_targets else ())
        want = {k: tuple(m["shapes"][k]) for k in keys if k in m["shapes"]}
        if set(want) != set(keys):
            raise ConfigError(
                f"--data {p}: manifest shapes {sorted(m['shapes'])} lack {sorted(set(keys) - set(want))}. Re-run shiva-export train-data."
            )
        paths, counts = _check_shards(p, m, keys, want, verify)
        self.null = _read_null(p, m, self.layout.text_keys, verify)
        self.latent_shape = tuple(int(v) for v in m["latent_shape"])
        size = (m.get("width"), m.get("height"))
        self.layout.check(
            {**want, "latents": self.latent_shape},
            f"--data {p}",
            encoded_px=size if all(isinstance(v, int) for v in size) else None,
        )
        self.seed = int(seed)
        self.num_workers = num_workers
        self.dataset = ShardDataset(paths, counts, keys)
        self._g = torch.Generator(device="cpu").manual_seed(self.seed)
        self._pos = 0
        self._loader: _Loader | None = None
        logger.info("opened %d samples in %d shards from %s (%s)", len(self), len(paths), p, want)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        kind = "latents" if self.has_targets else "text only"
        return f"ShardedLatents({str(self.folder)!r}, samples={len(self)}, shards={len(self.dataset.paths)}, {kind}, seed={self.seed})"

    @property
    def null_text(self) -> dict[str, torch.Tensor]:
        """The stored null conditioning under the transformer's argument names (no batch axis)."""
        return self.layout.null_inputs(self.null)

    def _next_samples(self, batch: int) -> dict[str, torch.Tensor]:
        if self._loader is None or self._loader.batch != batch:
            self.close()
            kw: dict[str, Any] = {}
            if self.num_workers:
                kw = {"num_workers": self.num_workers, "prefetch_factor": 2, "persistent_workers": False}
            dl = torch.utils.data.DataLoader(
                self.dataset, batch_size=batch, sampler=_IndexStream(len(self), self.seed, self._pos), **kw
            )
            self._loader = _Loader(batch, iter(dl))
        out = next(self._loader.it)
        self._pos += batch
        return out

    def batch(
        self,
        batch: int,
        timesteps: torch.Tensor | None = None,
        *,
        caption_dropout: float = 0.0,
        cfg_pairs: bool = False,
    ):
        """The next ``batch`` samples of the seeded order, noised to ``timesteps`` (the adapter's objective).

        Args:
            batch (int): Samples B.
            timesteps (Tensor): ``[B]`` on 0..1000. Defaults to uniform in ``[0, 1000)``.
            caption_dropout (float): Probability per sample that its text is replaced by the null
                embedding. Defaults to 0.
            cfg_pairs (bool): Return ``2B`` rows ``[uncond; cond]`` sharing ``x_t``, timestep and target,
                the uncond half the null conditioning (the pipeline's CFG batch). Defaults to False.

        Returns:
            Batch: ``hidden_states``, the layout's text inputs and static extras, ``timestep``, target.
        """
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch size is {batch!r}; expected an int >= 1.")
        if timesteps is not None:  # checked before any sample is consumed (the stream position stays put)
            draw_timesteps(batch, timesteps, None)
        check_conditioning(caption_dropout, cfg_pairs)
        rows = self._next_samples(batch)
        return self.layout.batch(
            rows,
            timesteps,
            self._g,
            latent_shape=self.latent_shape,
            caption_dropout=caption_dropout,
            cfg_pairs=cfg_pairs,
            null=self.null,
        )

    def state_dict(self) -> dict:
        return {
            "kind": "sharded",
            "seed": self.seed,
            "samples": len(self),
            "position": self._pos,
            "rng": self._g.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sharded" or int(state.get("samples", -1)) != len(self):
            raise ConfigError(
                f"the checkpoint's data state is {state.get('kind')!r} with {state.get('samples')} samples; this --data {self.folder} "
                f"holds {len(self)}. Resume with the original --data."
            )
        self.close()
        self._pos = int(state["position"])
        self._g.set_state(state["rng"])

    def close(self) -> None:
        """Stops the DataLoader (its workers) and closes the shard files; the next batch reopens them."""
        self._loader = None
        self.dataset.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def make_data(
    data: str | os.PathLike | None,
    model,
    height: int,
    width: int,
    text_len: int,
    seed: int = 0,
    *,
    num_workers: int = 0,
):
    """The training source for ``--data``: a ``shiva-export train-data`` output (a folder holding
    ``manifest.json``, or that file) -> :class:`ShardedLatents` (reading with ``num_workers`` DataLoader
    processes); another folder (one ``.safetensors`` per sample) -> :class:`LatentFolder`; None ->
    :class:`~shiva_export.train.data.SyntheticData`. Cached data is checked against ``model`` at ``height`` x
    ``width`` px in the layout of its architecture (its text length is the data's own)."""
    if data is None:
        return SyntheticData(model, height, width, text_len, seed=seed)
    p = Path(data).expanduser()
    if p.is_file() and p.name == MANIFEST_NAME:
        p = p.parent
    if is_train_data(p):
        return ShardedLatents(p, model, seed=seed, height=height, width=width, num_workers=num_workers)
    return LatentFolder(p, model, seed=seed, height=height, width=width)
