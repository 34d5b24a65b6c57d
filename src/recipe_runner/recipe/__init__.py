"""Recipes: the NxDT-compatible schema, loading with interpolation and overrides, checks."""

from recipe_runner.recipe.load import asset_path, load_recipe, parse_override
from recipe_runner.recipe.schema import Recipe

__all__ = ["Recipe", "asset_path", "load_recipe", "parse_override"]
