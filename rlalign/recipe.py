"""A recipe ready to run: `rlalign.config.read_recipe` (shape, types, ranges, files) plus the plug-ins it
names, resolved against their registries: the objective and its settings section, the reward terms.

This module sits above the plug-in packages, so the config layer below knows none of them by import.
"""

from __future__ import annotations

from pathlib import Path

from rlalign.config import Recipe, RecipeError, read_recipe
from rlalign.config.loader import resolve_recipe_path
from rlalign.objectives import resolve_objective
from rlalign.rewards.combined import REWARDS


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, inherit, override, type-check and validate a recipe; every error is one line naming the file
    and the key. `module:name` plug-ins import from the working directory and the recipe's folder."""
    file = resolve_recipe_path(str(path))
    recipe = read_recipe(file, overrides)
    try:
        resolve_plugins(recipe, search_dirs=(str(file.resolve().parent),))
    except RecipeError as err:
        raise RecipeError(f"{file}: {err}") from None
    return recipe


def resolve_plugins(recipe: Recipe, *, search_dirs: tuple[str, ...] = ()) -> None:
    """The objective (settings built into `recipe.objective.settings`) and the names of built-in rewards."""
    resolve_objective(recipe, search_dirs=search_dirs)
    for i, reward in enumerate(recipe.objective.rewards):
        if ":" not in reward.name:
            REWARDS.get(reward.name, where=f"objective.rewards[{i}].name")
