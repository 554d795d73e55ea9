"""Objectives by name: one explicit registry; an unknown name lists the valid ones."""

from __future__ import annotations

from typing import Any

from rlalign.config.schema import Recipe
from rlalign.objectives.base import Objective
from rlalign.objectives.dpo import DPOObjective
from rlalign.objectives.grpo import GRPOObjective
from rlalign.objectives.rdpo import RDPOObjective
from rlalign.objectives.scst import SCSTObjective
from rlalign.objectives.xe import XEObjective

OBJECTIVES: dict[str, type] = {
    "xe": XEObjective,
    "scst": SCSTObjective,
    "grpo": GRPOObjective,
    "dpo": DPOObjective,
    "rdpo": RDPOObjective,
}


def build_objective(recipe: Recipe, processor: Any = None) -> Objective:
    """Rollout objectives also get the recipe (rewards, sampling, seed) and the processor (decoding)."""
    name = recipe.objective.name
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective '{name}' (valid: {', '.join(sorted(OBJECTIVES))})")
    cls = OBJECTIVES[name]
    if cls.needs_rollout:
        return cls(getattr(recipe.objective, name), recipe=recipe, processor=processor)
    return cls(getattr(recipe.objective, name))


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
