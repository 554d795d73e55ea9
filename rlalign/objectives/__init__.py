"""Objectives by name: every module of this package registers its objectives (`@register_objective`);
a recipe may also name `module:Class` from outside the package. An unknown name lists the valid ones."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from rlalign.config import Recipe, RecipeError
from rlalign.config.loader import build_section
from rlalign.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveBase,
    ObjectiveContext,
    RolloutObjective,
    is_rollout,
    is_rollout_class,
    objective_class,
    register_objective,
)


def resolve_objective(recipe: Recipe, *, search_dirs: tuple[str, ...] = ()) -> type:
    """Check `objective.name` and build its settings from `objective.<name>` (`recipe.objective.settings`).
    Sections of other registered objectives are checked against their own classes too (a base recipe may
    carry them); any other section is an unknown key."""
    o = recipe.objective
    cls = objective_class(o.name, search_dirs=search_dirs)
    for key, raw in o.sections.items():
        if key == cls.name:
            continue
        if key not in OBJECTIVES:
            valid = ["name", "rollout", "rewards", cls.name, *OBJECTIVES.names()]
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(dict.fromkeys(valid))})"
            raise RecipeError(f"objective.{key}: unknown key{hint}")
        build_section(OBJECTIVES.get(key, where="objective").config_class, raw, f"objective.{key}")
    o.settings = build_section(cls.config_class, o.sections.get(cls.name), f"objective.{cls.name}")
    o.sections[cls.name] = dataclasses.asdict(o.settings)
    return cls


def build_objective(recipe: Recipe, processor: Any = None) -> Objective:
    """The recipe's objective, built with its settings and the context (recipe, processor)."""
    cls = objective_class(recipe.objective.name)
    settings = recipe.objective.settings
    if settings is None:  # a recipe built by hand, not through `load_recipe`
        resolve_objective(recipe)
        settings = recipe.objective.settings
    return cls(settings, ObjectiveContext(recipe=recipe, processor=processor))


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveBase",
    "ObjectiveContext",
    "RolloutObjective",
    "build_objective",
    "is_rollout",
    "is_rollout_class",
    "objective_class",
    "register_objective",
    "resolve_objective",
]
