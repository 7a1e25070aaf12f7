"""Tiny, complete diffusers pipelines for embedded recipes, built offline and cached.

Embedded recipes (``[model] source = "embedded"``) have a seeded random transformer and no checkpoint.
:func:`build_embedded_pipeline` puts the rest of the architecture's pipeline around it, from nothing on disk
and with no network; *which* components is the adapter's fact (``ModelAdapter.embedded_pipeline``), built
from the seeded helpers of this module:

============  =========================  =============================================================
recipe        pipeline                   components
============  =========================  =============================================================
sd3 / sd35    StableDiffusion3Pipeline   CLIP x2 (with projection) + T5 (unless ``[pipeline] t5 =
                                         false``), 16-channel VAE, flow matching (``scheduler_shift``)
flux          FluxPipeline               CLIP (pooled output = ``pooled_projection_dim``) + T5
                                         (``joint_attention_dim``), ``in_channels / 4``-channel VAE
                                         (Flux scaling/shift), flow matching with dynamic shifting
pixart        PixArtSigmaPipeline        T5 (``caption_channels``), 4-channel VAE (SDXL scaling, quant
                                         convs), DPM-Solver++
dit           DiTPipeline                no text encoder: 4-channel VAE (SD scaling), DDIM, ``id2label``
                                         (written into ``model_index.json``: ``save_pretrained`` drops it)
============  =========================  =============================================================

All weights are seeded with ``[pipeline] seed`` (the transformer with ``[model] seed``), so the build is
deterministic. :func:`ensure_embedded_pipeline` saves it once with ``save_pretrained`` under the cache folder
(``$SHIVA_CACHE_DIR`` or ``~/.cache/shiva-export``) and :func:`load_embedded_pipeline` reloads it with
``from_pretrained(local_files_only=True)``, the same code path as a real checkpoint.

For SD3 (``pipeline_stable_diffusion_3.py``) the builder derives every size from the transformer config so
that these hold:

=============================================================  ==============================================
constraint                                                     how it is met
=============================================================  ==============================================
``clip1.hidden + clip2.hidden <= joint_attention_dim``         hidden = min(joint_attention_dim // 2, 256),
(the CLIP concat is zero-padded to T5's width with ``F.pad``;  rounded down to a multiple of the head count
a wider concat would be *silently cropped*)
``clip1.projection_dim + clip2.projection_dim ==               pooled_projection_dim split in two halves
pooled_projection_dim``
T5 ``d_model == joint_attention_dim``                          T5EncoderModel, 2 layers, 2 heads, d_kv 16,
                                                               d_ff 128 (a few M params even at 4096 wide)
text_len = CLIP ``model_max_length`` + T5                      ``tokenizer.model_max_length =
``max_sequence_length``                                        [pipeline] clip_max_length``; pass
                                                               ``max_sequence_length=recipe.max_sequence_length()``
CLIP ``max_position_embeddings >= model_max_length``           equal to clip_max_length
CLIP ``eos_token_id`` = the tokenizer's eos id                 set from the tokenizer (2 would select the
                                                               legacy argmax pooling)
``vae_scale_factor = 2 ** (len(block_out_channels) - 1) == 8``  AutoencoderKL with 4 levels (8, 16, 16, 16),
                                                               16 latent channels, SD3 scaling/shift factors,
                                                               no quant convs
scheduler                                                      FlowMatchEulerDiscreteScheduler(1000,
                                                               shift=[pipeline] scheduler_shift)
=============================================================  ==============================================

Tokenizers use the transformers 5 constructors (``CLIPTokenizer(vocab=, merges=)`` byte-level BPE and
``T5TokenizerFast(vocab=[(piece, score)])`` Unigram) over a small character vocabulary plus a few whole
words, so any English prompt tokenizes. ``save_pretrained`` writes ``tokenizer.json``; reloading needs no
sentencepiece.

Pitfalls handled here: a pipeline saved without T5 reloads only when ``text_encoder_3=None,
tokenizer_3=None`` are passed again; ``from_pretrained(transformer=obj)`` with a wrapper logs "Expected
types for transformer" and importing the pipeline logs "SiglipImageProcessor requires torchvision": both
are silenced (library loggers set to error around the calls). Bit-identity holds within one loaded
pipeline; a built and a reloaded pipeline may differ by float rounding (safetensors tensor alignment).

torch, diffusers and transformers are imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError, OutputPathError, RecipeError
from shiva_export.utils.io import canonical_json, sha256_bytes

__all__ = [
    "build_embedded_pipeline",
    "import_pipeline_class",
    "embedded_pipeline_dir",
    "ensure_embedded_pipeline",
    "load_embedded_pipeline",
]

_BUILDER_VERSION = 1
_STAMP = "shiva_pipeline.json"

# Component seed offsets from [pipeline] seed (fixed: changing them changes every cached pipeline).
SEED_CLIP1, SEED_CLIP2, SEED_T5, SEED_VAE = 1, 2, 3, 4

# Whole words on top of the character vocabulary: common prompt words, so short prompts map to few tokens.
_WORDS = (
    "a an the of on in with and at to is by for from"
    " red green blue yellow orange purple pink black white gray grey brown gold silver"
    " cube sphere ball box cone cylinder pyramid circle square triangle star shape shapes"
    " cat dog bird fish horse cow tree flower house car boat city mountain river sea sky sun moon"
    " photo painting picture image portrait landscape small big large tiny bright dark light"
    " standing sitting sleeping wooden metal glass stone table floor wall background"
).split()

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MAX_HIDDEN = 256
_CLIP_HEADS = (4, 2, 1)
_T5 = {"num_layers": 2, "num_heads": 2, "d_kv": 16, "d_ff": 128}


# ----------------------------------------------------------------------------------------------- helpers


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("diffusers", "transformers", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def _check_embedded(recipe) -> None:
    if recipe.model.source != "embedded":
        raise RecipeError(
            f"Embedded pipeline requested for recipe {recipe.name!r}: model.source = {recipe.model.source!r}. "
            "Only recipes with source = 'embedded' are built offline; load hub pipelines from their repo id."
        )
    _adapter(recipe).check_embedded_recipe(recipe)  # e.g. SD3: RecipeError when text_len <= clip_max_length


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers and transformers loggers at error, progress bars off and Python warnings ignored, restored after."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    d_bar, t_bar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bar:
            dlog.enable_progress_bar()
        if t_bar:
            tlog.enable_progress_bar()


def import_pipeline_class(name: str = "StableDiffusion3Pipeline"):
    """Imports a diffusers pipeline class with transformers' import-time warnings (torchvision) silenced."""
    import transformers.utils.logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import diffusers

            cls = getattr(diffusers, name)
    finally:
        tlog.set_verbosity(level)
    return cls


def _saved_none_components(folder: Path) -> dict[str, None]:
    """Components saved as ``[null, null]`` (e.g. SD3 without T5): ``from_pretrained`` reloads the folder only
    when they are passed as None again."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}


_pipeline_class = import_pipeline_class


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_tokenizer(max_length: int):
    """Byte-level BPE: the 256 byte characters, the same with ``</w>``, merges that form :data:`_WORDS`."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in (_CLIP_BOS, _CLIP_EOS):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _t5_tokenizer():
    """Unigram: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, printable ASCII characters (bare and after ``▁``), words."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [("▁" + c, -8.0) for c in chars] + [(c, -9.0) for c in chars]
    pieces += [("▁" + w, -4.0) for w in _WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


# ------------------------------------------------------------------------------------------- components


def _clip_hidden(joint_attention_dim: int) -> tuple[int, int]:
    """(hidden, heads): two CLIPs of this width fit in ``joint_attention_dim``; heads divide hidden."""
    target = min(joint_attention_dim // 2, _CLIP_MAX_HIDDEN)
    for heads in _CLIP_HEADS:  # the most heads that keep a head width >= 8
        if target // heads >= 8:
            return (target // heads) * heads, heads
    if target >= 1:
        return target, 1
    raise ConfigError(
        f"Embedded pipeline: joint_attention_dim {joint_attention_dim} is too small for two CLIP text encoders. "
        "Use a [model.config] joint_attention_dim >= 2."
    )


def _clip_config(tokenizer, hidden: int, heads: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _clip_encoder(tokenizer, hidden: int, heads: int, projection_dim: int, seed: int):
    from transformers import CLIPTextModelWithProjection

    cfg = _clip_config(tokenizer, hidden, heads, projection_dim=projection_dim)
    with _seeded(seed):
        return CLIPTextModelWithProjection(cfg).eval()


def _t5_encoder(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **_T5,
    )
    with _seeded(seed):
        return T5EncoderModel(cfg).eval()


def _vae(seed: int, *, latent_channels: int = 16, scaling_factor: float = 1.5305, shift_factor: float | None = 0.0609,
         quant_convs: bool = False):
    """A 4-level ``AutoencoderKL`` (``vae_scale_factor`` 8) with the family's latent channels and scaling
    factors. Defaults are SD3's (16 channels, no quant convs)."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=256,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=quant_convs,
            use_post_quant_conv=quant_convs,
        )
    return vae.eval()


def _clip_heads(hidden: int) -> int:
    """The most heads of :data:`_CLIP_HEADS` that divide ``hidden`` with a head width >= 8 (else 1)."""
    return next((h for h in _CLIP_HEADS if hidden % h == 0 and hidden // h >= 8), 1)


def _clip_text_model(tokenizer, hidden: int, seed: int):
    """A ``CLIPTextModel`` (no projection: Flux reads its ``pooler_output``, width ``hidden``)."""
    from transformers import CLIPTextModel

    cfg = _clip_config(tokenizer, hidden, _clip_heads(hidden))
    with _seeded(seed):
        return CLIPTextModel(cfg).eval()


# ---------------------------------------------------------------------------------------------- public


def _adapter(recipe):
    from shiva_export.models import adapter_for_architecture

    return adapter_for_architecture(recipe.architecture)


def build_embedded_pipeline(recipe):
    """Builds the tiny pipeline of an embedded recipe in memory, offline and deterministically.

    The components are the architecture adapter's (:meth:`~shiva_export.models.base.ModelAdapter.embedded_pipeline`),
    assembled from the builders of this module, every one seeded from ``[pipeline] seed``.

    Args:
        recipe (Recipe): A recipe with ``[model] source = "embedded"``.

    Returns:
        DiffusionPipeline: The adapter's ``PIPELINE_CLASS`` (``StableDiffusion3Pipeline``, ``FluxPipeline``,
        ``PixArtSigmaPipeline``, ``DiTPipeline``) around the seeded transformer.
    """
    _check_embedded(recipe)
    adapter = _adapter(recipe)
    adapter.pipeline_class()  # one line when the architecture has no pipeline
    with _quiet_libraries():
        from shiva_export.models import load_transformer

        transformer = load_transformer(recipe=recipe)
        return adapter.embedded_pipeline(transformer, recipe)


def _cache_key(recipe) -> str:
    payload = {
        "architecture": recipe.architecture,
        "model": recipe.model.model_dump(mode="json"),
        "pipeline": recipe.pipeline.model_dump(mode="json"),
        "text_len": recipe.shapes.text_len,
        "builder_version": _BUILDER_VERSION,
        "versions": _versions(),
    }
    return sha256_bytes(canonical_json(payload).encode())


def _cache_root() -> Path:
    env = os.environ.get("SHIVA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shiva-export"


def embedded_pipeline_dir(recipe) -> Path:
    """The cache folder of a recipe's embedded pipeline: ``<cache>/pipelines/<name>-<sha12>``.

    ``<cache>`` is ``$SHIVA_CACHE_DIR`` or ``~/.cache/shiva-export``; ``sha12`` hashes everything the build
    depends on (the architecture, ``[model]``, ``[pipeline]``, ``shapes.text_len``, the builder and library versions).
    """
    return _cache_root() / "pipelines" / f"{recipe.name}-{_cache_key(recipe)[:12]}"


def _is_complete(folder: Path, key: str) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(stamp, dict) and stamp.get("key") == key and (folder / "model_index.json").is_file()):
        return False
    return _digests(folder) == stamp.get("files")  # reused by content: an edited weight file means a rebuild


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a saved pipeline but its stamp (memoised on size, mtime, ctime and inode)."""
    from shiva_export.utils.io import sha256_file_cached

    return {str(f.relative_to(folder)): sha256_file_cached(f) for f in sorted(folder.rglob("*")) if f.is_file() and f.name != _STAMP}


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def ensure_embedded_pipeline(recipe) -> Path:
    """Returns the cached pipeline folder of an embedded recipe, building and saving it first if needed.

    The build is saved into a temporary sibling folder, stamped (``shiva_pipeline.json``) and moved into
    place with :func:`os.replace`, so a crash never leaves a folder that looks complete. If another
    process finishes first, its folder is kept and this one discarded.
    """
    _check_embedded(recipe)
    key = _cache_key(recipe)
    final = embedded_pipeline_dir(recipe)
    if _is_complete(final, key):
        return final
    parent = final.parent
    fix = "Set SHIVA_CACHE_DIR to a writable folder."
    try:
        parent.mkdir(parents=True, exist_ok=True)
        from shiva_export.utils.io import sweep_stale_temps, temp_prefix

        sweep_stale_temps(parent)  # half-built pipelines of killed runs
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name + "."), suffix=".tmp", dir=parent))
    except OSError as err:
        raise OutputPathError(f"Cannot create the pipeline cache folder: {parent} ({err.strerror or err}). {fix}") from None
    try:
        pipe = build_embedded_pipeline(recipe)
        with _quiet_libraries():
            pipe.save_pretrained(tmp, safe_serialization=True)
        index_extras = _adapter(recipe).pipeline_index_extras(pipe)
        if index_extras:  # e.g. DiT's id2label, which DiTPipeline takes at __init__ but save_pretrained does not write
            index = json.loads((tmp / "model_index.json").read_text())
            index.update(index_extras)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        stamp = {"recipe": recipe.name, "key": key, "versions": _versions(), "builder_version": _BUILDER_VERSION, "files": _digests(tmp)}
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        if final.exists() and not _is_complete(final, key):  # stale or half-broken: move aside, then drop
            trash = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name + "."), suffix=".old", dir=parent))
            try:
                os.replace(final, trash / "old")
            except FileNotFoundError:
                pass
            _remove(trash)
        try:
            os.replace(tmp, final)
        except OSError:
            if _is_complete(final, key):  # another process won the race
                _remove(tmp)
                return final
            raise
    except OSError as err:
        _remove(tmp)
        raise OutputPathError(f"Cannot write the pipeline cache folder: {final} ({err.strerror or err}). {fix}") from None
    except BaseException:
        _remove(tmp)
        raise
    return final


def load_embedded_pipeline(recipe, *, transformer=None, torch_dtype=None):
    """Loads an embedded recipe's pipeline from its cache folder (building it once), offline.

    Args:
        recipe (Recipe): A recipe with ``[model] source = "embedded"``.
        transformer (ModelMixin): A transformer to use instead of the saved one (e.g. an ONNX Runtime or
            TensorRT wrapper); passed into ``from_pretrained`` so the default size follows its config.
            Defaults to None (the saved seeded transformer).
        torch_dtype (torch.dtype): Load dtype. Defaults to None (fp32).

    Returns:
        StableDiffusion3Pipeline: Call it with ``max_sequence_length=recipe.max_sequence_length()``.
    """
    folder = ensure_embedded_pipeline(recipe)
    adapter = _adapter(recipe)
    pipe_cls = adapter.pipeline_class()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if transformer is not None:
        kwargs["transformer"] = transformer
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    kwargs.update(_saved_none_components(folder))
    with _quiet_libraries():
        return pipe_cls.from_pretrained(str(folder), **kwargs)

