"""``shiva-export recipe``: list, check, show and describe recipes."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from shiva_export.cli._output import result_json, result_text

recipe_app = typer.Typer(
    help="List, check and show model recipes (recipes/<model>.toml).", no_args_is_help=True, rich_markup_mode=None
)


@recipe_app.command("list")
def list_recipes() -> None:
    """List the built-in recipes."""
    from shiva_export.recipe import available_models, load_recipe

    for name in available_models():
        r = load_recipe(name)
        result_text(f"{name:12s} {r.description}")


@recipe_app.command("check")
def check(path: Annotated[str, typer.Argument(help="Recipe TOML path or built-in model name.")]) -> None:
    """Validate a recipe (schema only; model-aware checks run at export)."""
    from shiva_export.recipe import load_recipe, recipe_hash

    r = load_recipe(path)
    result_text(f"OK {r.source_path} (schema_version {r.schema_version}, sha256 {recipe_hash(r)[:16]})")


@recipe_app.command("show")
def show(path: Annotated[str, typer.Argument(help="Recipe TOML path or built-in model name.")]) -> None:
    """Print a recipe as validated JSON, defaults filled in."""
    from shiva_export.recipe import load_recipe, recipe_hash

    r = load_recipe(path)
    result_json({"sha256": recipe_hash(r), **r.content_dict()})


@recipe_app.command("schema")
def schema() -> None:
    """Print the recipe JSON Schema (for editor completion)."""
    from shiva_export.recipe import Recipe

    result_text(json.dumps(Recipe.model_json_schema(), indent=2))
