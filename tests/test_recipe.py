"""Recipes: every built-in one validates; bad files are rejected with file, field and fix."""

from __future__ import annotations

import pytest

from shiva_export.errors import ModelNotFoundError, RecipeError
from shiva_export.recipe import available_models, load_recipe, recipe_hash

BUILT_IN = ["sd3", "sd35", "sd35-large", "sd35-tiny", "sd3-tiny", "sd3-mid"]

GOOD = """
schema_version = 1
name = "mine"
architecture = "sd3"
[model]
source = "hub"
repo_id = "org/repo"
[tolerances.fp32]
atol = 1e-4
"""


def test_builtins_load():
    assert set(BUILT_IN) <= set(available_models())
    for name in BUILT_IN:
        r = load_recipe(name)
        assert r.name == name and r.tolerance("fp32").atol > 0
    assert load_recipe("sd35").model.repo_id == "stabilityai/stable-diffusion-3.5-medium"
    assert load_recipe("sd3").model.repo_id == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert load_recipe("sd35-large").model.repo_id == "stabilityai/stable-diffusion-3.5-large"
    cfg = load_recipe("sd35-tiny").model.config
    assert cfg["qk_norm"] == "rms_norm" and cfg["dual_attention_layers"]


def test_hash_ignores_formatting(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(GOOD)
    b.write_text("# comment\n" + GOOD.replace("atol = 1e-4", "atol = 0.0001"))
    assert recipe_hash(load_recipe(a)) == recipe_hash(load_recipe(b))


@pytest.mark.parametrize(
    "mutation,match",
    [
        (lambda s: s + "\n[prune]\nratios = [0.4]\nbogus = 1\n", r"unknown field 'prune\.bogus'"),
        (lambda s: s + "\n[prune]\nratios = [1.5]\n", r"prune\.ratios\[0\] = 1.5 is invalid"),
        (lambda s: s + "\n[prune]\nratios = [0.4, 0.2]\n", r"unique and ascending"),
        (
            lambda s: s.replace("schema_version = 1", "schema_version = 9"),
            r"schema_version = 9 is invalid.*reads schema_version = 1",
        ),
        (lambda s: s.replace('source = "hub"', 'source = "http"'), r"model\.source = 'http' is invalid"),
        (lambda s: s + "\n[export]\nopset = 23\n", r"export\.opset = 23 is invalid"),
        (lambda s: s.replace("[model]", "[model]\nrepo = 1"), r"unknown field 'model\.repo'"),
        (lambda s: s + "\nname2 = [", r"not valid TOML"),
    ],
)
def test_bad_recipes_name_file_and_field(tmp_path, mutation, match):
    p = tmp_path / "bad.toml"
    p.write_text(mutation(GOOD))
    with pytest.raises(RecipeError, match=match) as ei:
        load_recipe(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_architecture_is_required(tmp_path):
    """No silent SD3: a recipe without ``architecture`` is refused with the file and the allowed values."""
    p = tmp_path / "noarch.toml"
    p.write_text(GOOD.replace('architecture = "sd3"\n', ""))
    with pytest.raises(RecipeError, match=r"architecture is missing.*one of 'dit', 'flux', 'pixart', 'sd3'") as ei:
        load_recipe(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)
    p.write_text(GOOD.replace('architecture = "sd3"', 'architecture = "unet"'))
    with pytest.raises(RecipeError, match=r"architecture = 'unet' is invalid: .*has no adapter; choose one of"):
        load_recipe(p)


def test_model_aware_block_range(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(GOOD + "\n[prune]\nfirst_routed_block = 5\n")
    r = load_recipe(p)
    with pytest.raises(RecipeError, match="first_routed_block = 5 is out of range for a 4-block model"):
        r.routed_blocks(4)
    assert load_recipe("sd35").routed_blocks(24) == list(range(1, 24))


def test_unknown_model_lists_known():
    with pytest.raises(ModelNotFoundError, match="Known models: .*sd35-tiny"):
        load_recipe("sd99")
