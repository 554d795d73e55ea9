"""The objective interface: what the trainer knows about any objective, and how objectives plug in.

An objective gets a micro-batch, the policy and (when it declares it needs one) the reference
handle, and returns `(loss, metrics)`. It never touches the launcher, the tracker or checkpoints.
A `RolloutObjective` also turns a window of prompt batches into a buffer of training micro-batches
(`rollout`), reused for `inner_epochs` passes of updates.

Plugging in: a class with the attributes below, decorated `@register_objective` in a module of this
package (one new file), or named `module:Class` in a recipe (no edit inside the package). Its settings
are the recipe section `objective.<name>`, validated against its `config_class` when the recipe loads.

Normalisation: the trainer counts the objective's items (tokens, sequences...) over the whole
optimizer step on every rank and passes `items_per_micro` = that total / (micro-batches x ranks).
An objective divides its summed loss by it, so after accelerate's division by the accumulation
steps and the ranks' gradient averaging the step optimises sum / total: batch 4 x 1 accumulation
and batch 1 x 4 accumulation give the same gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from rlalign.config import RecipeError
from rlalign.config.plugins import Registry
from rlalign.config.schema import Recipe


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may read when it is built: the whole recipe and the model's processor."""

    recipe: Recipe
    processor: Any = None


@runtime_checkable
class Objective(Protocol):
    name: ClassVar[str]
    """Registry name, and the recipe section (`objective.<name>`) holding the settings."""
    config_class: ClassVar[type]
    """Dataclass of the settings."""
    data_kind: ClassVar[str]
    """Registered data kind (`rlalign.data.DATA_KINDS`) or `module:function`: what the objective trains on."""
    needs_reference: ClassVar[bool]
    """Whether the objective can score against a reference policy (see `requires_reference`)."""
    uses_retrieved: ClassVar[bool]
    """Whether each training row carries a retrieved image (rDPO)."""

    def __init__(self, cfg: Any, ctx: ObjectiveContext) -> None: ...

    @classmethod
    def requires_reference(cls, cfg: Any) -> bool:
        """Whether a run with these settings scores against a reference policy (checked by `validate`)."""
        ...

    def count_items(self, batch: dict[str, Any]) -> float:
        """The number this micro-batch contributes to the step's normaliser."""
        ...

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        *,
        items_per_micro: float,
        reference: Any = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to backpropagate and detached metrics (averaged over micro-batches and ranks)."""
        ...


@runtime_checkable
class RolloutObjective(Objective, Protocol):
    inner_epochs: int
    """Passes of optimizer updates over each rollout buffer."""

    def rollout(
        self, model: Any, window: list[dict], *, step: int, runtime: Any, reference: Any = None
    ) -> tuple[list[dict], dict[str, float]]:
        """This rank's buffer of training micro-batches for loop step `step` (0-based), and rollout metrics."""
        ...


class ObjectiveBase:
    """Defaults for the optional parts of `Objective`: no reference, no retrieved images."""

    needs_reference: ClassVar[bool] = False
    uses_retrieved: ClassVar[bool] = False

    def __init__(self, cfg: Any, ctx: ObjectiveContext | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx

    @classmethod
    def requires_reference(cls, cfg: Any) -> bool:
        return cls.needs_reference


OBJECTIVES: Registry[type] = Registry("objective", "rlalign.objectives")
REQUIRED = ("name", "config_class", "data_kind", "count_items", "loss")


def register_objective(cls: type) -> type:
    """Class decorator: make `cls` available by its `name` in recipes."""
    return OBJECTIVES.register(cls.name, cls)


def objective_class(spec: str, *, search_dirs: tuple[str, ...] = ()) -> type:
    """The class a recipe's `objective.name` names, checked to have the parts the trainer calls."""
    where = "objective.name"
    cls = OBJECTIVES.get(spec, where=where, search_dirs=search_dirs)
    if not isinstance(cls, type):
        raise RecipeError(f"{where}: '{spec}' is not a class (it is {type(cls).__name__})")
    missing = [a for a in REQUIRED if not hasattr(cls, a)]
    if missing:
        raise RecipeError(f"{where}: '{spec}' is not an objective: it lacks {', '.join(missing)}")
    if not dataclasses.is_dataclass(cls.config_class):
        raise RecipeError(f"{where}: '{spec}'.config_class must be a dataclass")
    return cls


def is_rollout(objective: Any) -> bool:
    """Whether the loop must call `rollout` before the updates."""
    return isinstance(objective, RolloutObjective)


def is_rollout_class(cls: type) -> bool:
    """Whether instances of `cls` are rollout objectives (checked on the class, before building one)."""
    return callable(getattr(cls, "rollout", None))
