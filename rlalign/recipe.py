"""A recipe ready to run: `rlalign.config.read_recipe` (shape, types, ranges, files) plus the plug-ins it
names, resolved against their registries: the objective and its settings section, the reward terms (user
callables imported from the working directory or the recipe's folder, built-in terms' `options` checked), and
the defaults that depend on the objective (`model.disable_dropout`).

This module sits above the plug-in packages, so the config layer below knows none of them by import.
"""

from __future__ import annotations

from pathlib import Path

from rlalign.config import Recipe, RecipeError, read_recipe
from rlalign.config.loader import resolve_recipe_path
from rlalign.objectives import is_rollout_class, resolve_objective
from rlalign.rewards.combined import check_reward


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
    """The objective (settings built into `recipe.objective.settings`), the reward terms, and
    `model.disable_dropout` when the recipe leaves it unset: on for objectives that score against a
    reference or roll out (their log-probs must not carry dropout noise the reference's lack)."""
    cls = resolve_objective(recipe, search_dirs=search_dirs)
    if recipe.model.disable_dropout is None:
        recipe.model.disable_dropout = bool(
            cls.requires_reference(recipe.objective.settings)
        ) or is_rollout_class(cls)
    for i, reward in enumerate(recipe.objective.rewards):
        check_reward(reward, where=f"objective.rewards[{i}]", search_dirs=search_dirs)
