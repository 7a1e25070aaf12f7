"""Recipes: per-model facts as data, validated by one strict, versioned schema.

A recipe (``recipes/<model>.toml``) says *what* and *how much*, never how: which diffusers checkpoint,
which blocks are routed, the default pruning ratios, router settings, export shapes, and parity
tolerances per dtype. It holds no code. :func:`load_recipe` is the only way in; unknown keys and
out-of-range values raise :class:`~shiva_export.errors.RecipeError` naming the file, the field and the fix.

Terms: ``ratio`` is the fraction of image tokens *pruned* in a routed block (the CLI's ``--ratio``);
``keep_ratio = 1 - ratio`` is what the pruning core uses; ``k`` is the resulting token count.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shiva_export.errors import ModelNotFoundError, RecipeError
from shiva_export.models.base import adapter_for_architecture, supported_architectures
from shiva_export.utils.io import canonical_json, sha256_bytes

__all__ = [
    "SCHEMA_VERSION",
    "Recipe",
    "load_recipe",
    "recipe_path",
    "available_models",
    "recipe_hash",
    "Tolerance",
    "recipes_dir",
]

SCHEMA_VERSION = 1
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Tolerance(BaseModel):
    """Parity thresholds for one dtype (applied to every compared output)."""

    model_config = _STRICT
    atol: Annotated[float, Field(gt=0)] = Field(description="max |pytorch - onnx| allowed")
    rtol: Annotated[float, Field(ge=0)] = Field(0.0, description="relative part: |d| <= atol + rtol*|ref|")
    min_cosine: Annotated[float, Field(ge=-1, le=1)] = Field(0.9999, description="minimum cosine similarity")
    quantile: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="fraction of elements that must be within atol + rtol*|ref|; 1.0 = every element (elementwise)"
    )
    min_index_agreement: Annotated[float, Field(ge=0, le=1)] = Field(
        1.0,
        description="minimum kept-index overlap |A & B| / k in every routed block (1.0 = identical kept sets)",
    )


class ModelSection(BaseModel):
    model_config = _STRICT
    source: Literal["hub", "embedded", "local"] = Field(
        description="'hub': a diffusers repo id; 'embedded': random weights from `config`; 'local': a pipeline or transformer folder at `path`"
    )
    repo_id: str | None = None
    path: str | None = Field(
        None,
        description="source = 'local': a diffusers pipeline folder (model_index.json) or transformer folder (config.json), relative to the recipe file",
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None,
        description="source = 'local': required sha256 of the transformer weights (models.base.weights_sha256); "
        "other weights are refused (e.g. `train --dora` binds its router to the merged transformer)",
    )
    subfolder: str | None = "transformer"
    seed: int = 0
    config: dict[str, Any] | None = Field(
        None, description="diffusers transformer config (the adapter's model class) for embedded models"
    )

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "hub" and not self.repo_id:
            raise ValueError("source = 'hub' needs repo_id (e.g. 'stabilityai/stable-diffusion-3.5-medium')")
        if self.source == "embedded" and not self.config:
            raise ValueError("source = 'embedded' needs a [model.config] table with the transformer config")
        if self.source == "local" and not self.path:
            raise ValueError(
                "source = 'local' needs path (a diffusers pipeline folder relative to the recipe, e.g. 'sd35-shapes/pipeline')"
            )
        if self.source != "local" and self.path:
            raise ValueError(f"path is only for source = 'local' (source is {self.source!r})")
        if self.source != "local" and self.sha256:
            raise ValueError(f"sha256 is only for source = 'local' weights (source is {self.source!r})")
        return self


class PruneSection(BaseModel):
    model_config = _STRICT
    first_routed_block: Annotated[int, Field(ge=1)] = Field(
        1, description="first routed block; block 0 is always dense (paper: First-Block Skip)"
    )
    last_routed_block: int = Field(-1, description="last routed block, inclusive; negative counts from the end")
    ratios: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.4], description="default pruning ratios (fraction of image tokens pruned)"
    )
    context: Literal["drop", "keep"] = Field(
        "drop",
        description="rejected tokens: 'drop' leaves them out of the routed block; 'keep' still gives their keys and values "
        "(attention over all image tokens; queries, attention output and MLP only for the kept ones). SD3/SD3.5 only",
    )

    @field_validator("ratios")
    @classmethod
    def _unique_sorted(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one ratio, e.g. [0.4]")
        if sorted(set(v)) != v:
            raise ValueError(f"must be unique and ascending, got {v}")
        return v


class RouterSection(BaseModel):
    model_config = _STRICT
    bottleneck: Annotated[int, Field(ge=1, le=4096)] = Field(64, description="router bottleneck width d'")
    group_size: Annotated[int, Field(ge=1, le=64)] = Field(
        2, description="adjacent routed blocks sharing one router (2 = the paper's Group-12 on 24 blocks)"
    )
    seed: int = Field(0, description="seed of the random router init (used until a trained router is given)")
    weights: str | None = Field(None, description="router safetensors, relative to the recipe file")
    sha256: str | None = Field(None, description="expected sha256 of `weights`")


class Phase(BaseModel):
    """One static schedule of a learned keep-ratio table: every denoising step whose timestep ``t`` satisfies
    ``t_stop < t <= t_start`` (the last phase, ``t_stop = 0``, also owns ``t = 0``) uses ``keep_ratios``
    (one per routed block, in block order). Each phase is one static graph / engine. Boundaries are
    midpoints between the training sampler's timesteps (``train.outputs.phase_bounds``)."""

    model_config = _STRICT
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = Field(
        description="phase name, e.g. 'early' (a file-name-safe word)"
    )
    t_start: Annotated[float, Field(ge=0)] = Field(description="upper timestep bound of the phase (inclusive)")
    t_stop: Annotated[float, Field(ge=0)] = Field(
        description="lower timestep bound of the phase (exclusive; 0 = to the end)"
    )
    keep_ratios: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        description="keep ratio per routed block, in block order"
    )
    k: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="the exact k per routed block at [shapes], for reference"
    )

    @model_validator(mode="after")
    def _k_matches_keep(self):
        """The recorded k must be about N * keep of one token count N for every block: a k edited apart from its
        keep ratio (k = 9999) would otherwise be silently ignored."""
        if self.k is None:
            return self
        if len(self.k) != len(self.keep_ratios):
            raise ValueError(
                f"phase {self.name!r}: k has {len(self.k)} entries and keep_ratios {len(self.keep_ratios)}; expected one k per keep ratio"
            )
        lo = max(
            (k - 1) / r for k, r in zip(self.k, self.keep_ratios)
        )  # within one of N * keep (floor, round, or a floor of 1)
        hi = min((k + 1) / r for k, r in zip(self.k, self.keep_ratios))
        if math.ceil(lo - 1e-6) > hi + 1e-6:
            raise ValueError(
                f"phase {self.name!r}: k = {self.k} is not N * keep of keep_ratios = {self.keep_ratios} for any one token count N; "
                "fix k or drop it (it is derived from keep_ratios)"
            )
        return self


class ScheduleSection(BaseModel):
    """A learned schedule (written by `shiva-export train`)."""

    model_config = _STRICT
    target_keep: Annotated[float, Field(gt=0, le=1)] = Field(description="training target of the mean keep ratio")
    timesteps: list[float] = Field(default_factory=list, description="sampler timesteps the LUT was evaluated on")
    lut: list[list[float]] = Field(default_factory=list, description="keep[t][routed block] from the ratio policy")
    phases: list[Phase] = Field(default_factory=list)


class ShapesSection(BaseModel):
    model_config = _STRICT
    height: Annotated[int, Field(gt=0, le=16384)] = 1024
    width: Annotated[int, Field(gt=0, le=16384)] = 1024
    text_len: Annotated[int, Field(gt=0, le=8192)] = Field(333, description="text tokens (SD3: 77 CLIP + 256 T5)")
    batch: Annotated[int, Field(ge=1, le=256)] = Field(1, description="prompts per call; CFG doubles the model batch")
    cfg: bool = Field(True, description="batch holds uncond and cond halves that share kept indices")


class Bucket(BaseModel):
    """One image size of ``[[buckets]]``: a static graph and engine per budget in a ``<width>x<height>`` folder."""

    model_config = _STRICT
    width: Annotated[int, Field(gt=0, le=16384)]
    height: Annotated[int, Field(gt=0, le=16384)]

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


class PipelineSection(BaseModel):
    """The full diffusers pipeline around the transformer (``shiva-export generate``): the architecture's
    ``PIPELINE_CLASS`` (SD3, Flux, PixArt-Sigma, DiT).

    Hub models load the diffusers pipeline ``repo_id`` (default: ``model.repo_id``). Embedded models build
    a tiny pipeline offline from the adapter's components (SD3: seeded CLIP x2 + T5; Flux: CLIP + T5; PixArt:
    T5; DiT: none; locally written tokenizers, an ``AutoencoderKL``, the family's scheduler) and save it once
    with ``save_pretrained``. Fields a pipeline does not use are ignored (``clip_max_length`` by PixArt and DiT,
    ``scheduler_shift`` by PixArt and DiT, ``t5`` by all but SD3).
    """

    model_config = _STRICT
    repo_id: str | None = Field(None, description="diffusers pipeline repo id; defaults to model.repo_id")
    clip_max_length: Annotated[int, Field(ge=2, le=512)] = Field(
        77,
        description="CLIP tokenizer model_max_length; SD3: the T5 part of the text is shapes.text_len - clip_max_length (Flux: pooled CLIP only)",
    )
    t5: bool = Field(True, description="embedded pipelines: include a T5 encoder (text_encoder_3)")
    scheduler_shift: Annotated[float, Field(gt=0, le=100)] = Field(
        3.0, description="FlowMatchEulerDiscreteScheduler shift (SD3/SD3.5: 3.0)"
    )
    seed: int = Field(0, description="embedded pipelines: seed of the text encoders' and VAE's random weights")
    steps: Annotated[int, Field(ge=1, le=1000)] = Field(28, description="default denoising steps of `generate`")
    guidance: Annotated[float, Field(ge=0, le=100)] = Field(
        4.5, description="default guidance scale of `generate` (CFG; Flux: the guidance embedding)"
    )
    judge: Literal["shapes"] | None = Field(
        None,
        description="an image judge for `validate quality|frontier`: 'shapes' = the analytic judge of shape captions (sd35-shapes)",
    )


class ExportSection(BaseModel):
    model_config = _STRICT
    opset: Annotated[int, Field(ge=17, le=22)] = Field(
        20, description="ONNX opset; <= 20 parses on TensorRT 10.x; 23 is refused (Attention op, see export/onnx.py)"
    )


class Recipe(BaseModel):
    """A validated recipe. Build it with :func:`load_recipe`."""

    model_config = _STRICT
    schema_version: int
    name: Annotated[str, Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    description: str = ""
    architecture: str = Field(
        description="model adapter key (shiva_export.models), required: sd3 (SD3 and SD3.5), flux, pixart, dit"
    )
    model: ModelSection
    prune: PruneSection = Field(default_factory=PruneSection)
    router: RouterSection = Field(default_factory=RouterSection)
    shapes: ShapesSection = Field(default_factory=ShapesSection)
    export: ExportSection = Field(default_factory=ExportSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    tolerances: dict[Literal["fp32", "fp16", "bf16"], Tolerance]
    schedule: ScheduleSection | None = None
    buckets: list[Bucket] = Field(
        default_factory=list,
        description="[[buckets]] image sizes `onnx` and `trt` build (one <W>x<H> folder each) and `generate` accepts",
    )

    # set by load_recipe, not part of the file
    source_path: Path | None = Field(None, exclude=True)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported; this shiva-export reads schema_version = {SCHEMA_VERSION}"
            )
        return v

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, v: str) -> str:
        known = supported_architectures()
        if v not in known:
            raise ValueError(f"architecture {v!r} has no adapter; choose one of {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _cfg_matches_architecture(self):
        adapter = adapter_for_architecture(self.architecture)
        if self.shapes.cfg and not adapter.BATCHED_CFG:
            raise ValueError(
                f"architecture {self.architecture!r} runs guidance without a batched [uncond; cond] pair; set [shapes] cfg = false"
            )
        if self.prune.context not in adapter.CONTEXT_MODES:
            raise ValueError(
                f'[prune] context = {self.prune.context!r} is not implemented for architecture {self.architecture!r}; set context = "drop"'
            )
        return self

    @field_validator("buckets")
    @classmethod
    def _distinct_buckets(cls, v: list) -> list:
        names = [b.name for b in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"[[buckets]] lists {dup} twice; give each size once")
        return v

    @field_validator("tolerances")
    @classmethod
    def _has_fp32(cls, v: dict) -> dict:
        if "fp32" not in v:
            raise ValueError("needs at least [tolerances.fp32]")
        return v

    def routed_blocks(self, num_layers: int) -> list[int]:
        """Model-aware resolution of the routed block range (second validation phase)."""
        first = self.prune.first_routed_block
        last = self.prune.last_routed_block
        last = last + num_layers if last < 0 else last
        where = self._where()
        if not 1 <= first < num_layers:
            raise RecipeError(
                f"{where}: prune.first_routed_block = {first} is out of range for a {num_layers}-block model; "
                f"expected 1 <= first_routed_block < {num_layers}."
            )
        if not first <= last < num_layers:
            raise RecipeError(
                f"{where}: prune.last_routed_block = {self.prune.last_routed_block} resolves to {last}, out of range "
                f"for a {num_layers}-block model; expected {first} <= last_routed_block < {num_layers} (or negative from the end)."
            )
        return list(range(first, last + 1))

    def phase_keep_ratios(self, phase: str | int, num_layers: int) -> list[float | None]:
        """Per-block keep schedule (``None`` = dense block) of a learned phase, by name or index."""
        where = self._where()
        phases = self.schedule.phases if self.schedule else []
        if not phases:
            raise RecipeError(
                f"{where}: has no [[schedule.phases]]; train one with `shiva-export train` or drop --phase."
            )
        names = [p.name for p in phases]
        if isinstance(phase, str) and phase.isdigit():
            phase = int(phase)
        if isinstance(phase, int):
            if not 0 <= phase < len(phases):
                raise RecipeError(
                    f"--phase {phase} is out of range for {where}; expected 0..{len(phases) - 1} or one of {names}."
                )
            ph = phases[phase]
        else:
            if phase not in names:
                raise RecipeError(f"--phase {phase!r} is not in {where}; choose one of {names} (or an index).")
            ph = phases[names.index(phase)]
        routed = self.routed_blocks(num_layers)
        if len(ph.keep_ratios) != len(routed):
            raise RecipeError(
                f"{where}: phase {ph.name!r} has {len(ph.keep_ratios)} keep ratios but the model routes {len(routed)} blocks; retrain or fix the recipe."
            )
        out: list[float | None] = [None] * num_layers
        for b, r in zip(routed, ph.keep_ratios):
            out[b] = r
        return out

    def max_sequence_length(self, text_len: int | None = None) -> int:
        """T5 tokens the pipeline must encode so that CLIP + T5 tokens equal ``text_len`` (default: the recipe's)."""
        n = (self.shapes.text_len if text_len is None else text_len) - self.pipeline.clip_max_length
        if n < 1:
            raise RecipeError(
                f"{self._where()}: text_len {self.shapes.text_len if text_len is None else text_len} leaves {n} T5 tokens after "
                f"pipeline.clip_max_length = {self.pipeline.clip_max_length}; text_len must exceed clip_max_length."
            )
        return n

    def pipeline_repo_id(self) -> str | None:
        return self.pipeline.repo_id or self.model.repo_id

    def tolerance(self, dtype: str) -> Tolerance:
        if dtype not in self.tolerances:
            raise RecipeError(
                f"{self._where()}: no [tolerances.{dtype}] table; add one (atol, rtol, min_cosine) to validate {dtype} exports."
            )
        return self.tolerances[dtype]

    def router_weights_path(self) -> Path | None:
        if self.router.weights is None:
            return None
        p = Path(self.router.weights)
        if not p.is_absolute() and self.source_path is not None:
            p = self.source_path.parent / p
        return p

    def local_pipeline_path(self) -> Path:
        """The pipeline folder of a ``source = "local"`` recipe (relative paths resolve against the recipe file).

        Raises:
            ModelNotFoundError: The folder or its ``model_index.json`` is missing.
        """
        if self.model.source != "local" or not self.model.path:
            raise RecipeError(
                f"{self._where()}: model.source is {self.model.source!r}, not 'local'; it has no shipped pipeline folder."
            )
        p = Path(self.model.path)
        if not p.is_absolute() and self.source_path is not None:
            p = self.source_path.parent / p
        if not (p / "model_index.json").is_file() and (p / "config.json").is_file():
            raise ModelNotFoundError(
                f"{self._where()}: [model] path {p} is a transformer folder, not a whole pipeline (no model_index.json); "
                "pass --weights PIPELINE_FOLDER whose transformer/ holds exactly these weights."
            )
        if not (p / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{self._where()}: the shipped pipeline folder {p} has no model_index.json. "
                "Restore it from git or rebuild it with scripts/train_shapes.py (see docs/training.md)."
            )
        return p

    def local_model_path(self) -> Path:
        """The transformer weights of a ``source = "local"`` recipe: a pipeline folder (``model_index.json``)
        or a transformer folder (``config.json``, e.g. ``train --dora``'s merged ``transformer/``).

        Raises:
            ModelNotFoundError: The folder is missing or holds neither file.
        """
        if self.model.source != "local" or not self.model.path:
            raise RecipeError(
                f"{self._where()}: model.source is {self.model.source!r}, not 'local'; it has no local weights folder."
            )
        p = Path(self.model.path)
        if not p.is_absolute() and self.source_path is not None:
            p = self.source_path.parent / p
        if (p / "config.json").is_file():
            return p
        if (
            self.model.sha256 and not (p / "model_index.json").is_file()
        ):  # a bound pipeline folder: its transformer/ is checked on load
            raise ModelNotFoundError(
                f"{self._where()}: the transformer folder {p} bound by [model] sha256 is missing (no config.json); "
                "its router and schedule belong to those weights only. Restore the folder written with this recipe."
            )
        return self.local_pipeline_path()

    def _where(self) -> str:
        return str(self.source_path) if self.source_path else f"recipe {self.name!r}"

    def content_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"source_path"})
        if (
            d["prune"]["context"] == "drop"
        ):  # the default: recipes written before the option keep their hash (cache keys)
            del d["prune"]["context"]
        del d["buckets"]  # which sizes get built changes no graph (each graph's shapes are in its own key)
        return d


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 of the recipe's canonical JSON (independent of comments, key order and formatting)."""
    return sha256_bytes(canonical_json(recipe.content_dict()).encode())


def recipes_dir() -> Path:
    """The folder of built-in recipes: ``$SHIVA_RECIPES_DIR`` or ``recipes/`` of the source checkout."""
    env = os.environ.get("SHIVA_RECIPES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "recipes"


def available_models() -> list[str]:
    d = recipes_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def recipe_path(model: str) -> Path:
    """Path of the built-in recipe for ``model``; :class:`ModelNotFoundError` lists the known names."""
    p = recipes_dir() / f"{model}.toml"
    if not p.is_file():
        names = available_models()
        raise ModelNotFoundError(
            f"Unknown model: {model!r}. Known models: {', '.join(names) or '(no recipes found in ' + str(recipes_dir()) + ')'}. "
            "Pass one of them to --model, or --recipe PATH for your own recipe."
        )
    return p


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _check_architecture_given(path: Path, data: dict) -> None:
    """A recipe names its architecture: nothing defaults to SD3, so a Flux or PixArt file that forgot the key
    fails here, before any model is loaded, instead of being read as SD3."""
    if "architecture" not in data:
        known = supported_architectures()
        raise RecipeError(
            f"{path}: architecture is missing; every recipe names its model adapter. Add a top-level "
            f'architecture = one of {", ".join(repr(k) for k in known)} ("sd3" for SD3 and SD3.5).'
        )


def load_recipe(path_or_model: str | os.PathLike) -> Recipe:
    """Loads and validates a recipe from a TOML path or a built-in model name.

    Args:
        path_or_model (str | PathLike): ``recipes/sd35.toml``-style path, or a model name such as ``"sd35-tiny"``.

    Example:
        >>> r = load_recipe("sd35-tiny")
        >>> r.prune.ratios
        [0.2, 0.4, 0.6]
    """
    text = os.fspath(path_or_model)
    p = Path(text)
    if p.suffix != ".toml":
        if "/" in text or os.sep in text or p.exists():
            raise RecipeError(
                f"Recipe file not found or not a recipe: {text}. Recipe files end in .toml; model names are one of "
                f"{', '.join(available_models())}."
            )
        p = recipe_path(text)  # a model name: only built-in recipes, never a path
    if not p.is_file():
        raise RecipeError(f"Recipe file not found: {p}. Pass an existing .toml file to --recipe.")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{p}: not valid TOML ({err}). Fix the syntax.") from None
    except RecursionError:
        raise RecipeError(
            f"{p}: arrays or tables nested too deeply to be a recipe. Pass a recipe shaped like recipes/sd35.toml."
        ) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a UTF-8 text file, so not a recipe. Pass a .toml recipe.") from None
    except OSError as err:
        raise RecipeError(f"{p}: cannot read ({err.strerror}).") from None
    _check_architecture_given(p, data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = _format_loc(e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = f"{p}: unknown field {field!r}. Remove it or check its spelling against `shiva-export recipe schema`."
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" = {got!r}"
            msg = f"{p}: {field}{got_s} is invalid: {e['msg']}. Fix the field (see `shiva-export recipe schema`)."
        more = len(err.errors()) - 1
        if more:
            msg += f" ({more} more problem{'s' if more > 1 else ''} in this file)"
        raise RecipeError(msg) from None
    return recipe.model_copy(update={"source_path": p.resolve()})
