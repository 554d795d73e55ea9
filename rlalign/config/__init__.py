"""Recipes: typed configs, YAML loading, `base:` inheritance and `a.b.c=value` overrides."""

from rlalign.config.loader import RecipeError, dump_recipe, read_recipe, recipe_to_dict
from rlalign.config.schema import Recipe

__all__ = ["Recipe", "RecipeError", "dump_recipe", "read_recipe", "recipe_to_dict"]
