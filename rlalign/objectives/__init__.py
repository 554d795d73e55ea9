"""Objectives by name: one explicit registry; an unknown name lists the valid ones."""

from __future__ import annotations

from rlalign.config.schema import Recipe
from rlalign.objectives.base import Objective
from rlalign.objectives.xe import XEObjective

OBJECTIVES: dict[str, type] = {
    "xe": XEObjective,
}


def build_objective(recipe: Recipe) -> Objective:
    name = recipe.objective.name
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective '{name}' (valid: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name](getattr(recipe.objective, name))


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
