"""Seeded, offline components of the tiny embedded pipelines: tokenizers, text encoders, VAEs.

Each adapter's :meth:`~shiva_export.models.base.ModelAdapter.embedded_pipeline` assembles its architecture's
pipeline from these builders (which components is an architecture fact, so it lives on the models floor);
``shiva_export.runtime.embedded`` builds, caches and reloads the result. Every builder is seeded (the
component seeds below are offsets from ``[pipeline] seed``), so a build is deterministic.

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

torch, diffusers and transformers are imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from shiva_export.errors import ConfigError

__all__ = [
    "SEED_CLIP1",
    "SEED_CLIP2",
    "SEED_T5",
    "SEED_VAE",
    "import_pipeline_class",
    "seeded",
    "clip_tokenizer",
    "t5_tokenizer",
    "clip_hidden",
    "clip_encoder",
    "clip_text_model",
    "t5_encoder",
    "vae",
]

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


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
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


def clip_tokenizer(max_length: int):
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


def t5_tokenizer():
    """Unigram: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, printable ASCII characters (bare and after ``▁``), words."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [("▁" + c, -8.0) for c in chars] + [(c, -9.0) for c in chars]
    pieces += [("▁" + w, -4.0) for w in _WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


# ------------------------------------------------------------------------------------------- components


def clip_hidden(joint_attention_dim: int) -> tuple[int, int]:
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


def clip_encoder(tokenizer, hidden: int, heads: int, projection_dim: int, seed: int):
    from transformers import CLIPTextModelWithProjection

    cfg = _clip_config(tokenizer, hidden, heads, projection_dim=projection_dim)
    with seeded(seed):
        return CLIPTextModelWithProjection(cfg).eval()


def t5_encoder(tokenizer, d_model: int, seed: int):
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
    with seeded(seed):
        return T5EncoderModel(cfg).eval()


def vae(
    seed: int,
    *,
    latent_channels: int = 16,
    scaling_factor: float = 1.5305,
    shift_factor: float | None = 0.0609,
    quant_convs: bool = False,
):
    """A 4-level ``AutoencoderKL`` (``vae_scale_factor`` 8) with the family's latent channels and scaling
    factors. Defaults are SD3's (16 channels, no quant convs)."""
    from diffusers import AutoencoderKL

    with seeded(seed):
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


def clip_text_model(tokenizer, hidden: int, seed: int):
    """A ``CLIPTextModel`` (no projection: Flux reads its ``pooler_output``, width ``hidden``)."""
    from transformers import CLIPTextModel

    cfg = _clip_config(tokenizer, hidden, _clip_heads(hidden))
    with seeded(seed):
        return CLIPTextModel(cfg).eval()
