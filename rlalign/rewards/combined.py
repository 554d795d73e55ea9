"""The training reward of `scst` / `grpo`: weighted terms from the recipe, each logged apart.

Every term is a callable `fn(samples, image_ids, **columns) -> [N]` (TRL-style); built-in terms
are CIDEr-D with df cached from the training references, smoothed sentence BLEU-4 and the
shapes-world hallucination penalty; user terms are given as `package.module:function`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from rlalign.config import RecipeError
from rlalign.config.plugins import Registry, load_callable
from rlalign.config.schema import RewardConfig
from rlalign.shapes import mentioned
from rlalign.rewards.bleu import BleuReward
from rlalign.rewards.cider import CiderReward

RewardFactory = Callable[[Mapping[Hashable, Sequence[str]]], Callable[..., Any]]
REWARDS: Registry[RewardFactory] = Registry("reward", "rlalign.rewards")
"""Built-in reward terms by name: a factory taking the training references by image id and returning the
reward callable. `module:function` names a user callable instead (used as is)."""


def hallucination_penalty(
    samples: Sequence[str], image_ids: Sequence[Hashable], *, objects: Sequence[list[dict]], **columns: Any
) -> np.ndarray:
    """Minus the share of a sample's mentioned shape and colour words absent from its image (0 if none mentioned)."""
    out = np.zeros(len(samples))
    for i, (text, objs) in enumerate(zip(samples, objects)):
        shapes, colors = mentioned(text)
        wrong = len(shapes - {o["shape"] for o in objs}) + len(colors - {o["color"] for o in objs})
        out[i] = -wrong / max(len(shapes) + len(colors), 1)
    return out


REWARDS.register("cider", CiderReward)
REWARDS.register("bleu", BleuReward)
REWARDS.register("hallucination", lambda refs: hallucination_penalty)


def build_reward(name: str, refs_by_image_id: Mapping[Hashable, Sequence[str]]) -> Callable[..., Any]:
    """A registered reward built over the training references, or a user `module:function` as is."""
    where = f"objective.rewards: '{name}'"
    if ":" in name:
        return load_callable(name, where=where)
    return REWARDS.get(name, where=where)(refs_by_image_id)


class CombinedReward:
    """Sum of weighted reward terms; `__call__` returns the total [N] and each term [N] by name."""

    def __init__(self, cfgs: Sequence[RewardConfig], refs_by_image_id: Mapping[Hashable, Sequence[str]]):
        if not cfgs:
            raise ValueError("objective.rewards: at least one reward term is needed")
        self.terms = [(c.name, c.weight, build_reward(c.name, refs_by_image_id)) for c in cfgs]

    def __call__(
        self, samples: Sequence[str], image_ids: Sequence[Hashable], **columns: Any
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parts = {
            name: _scores(name, fn(samples, image_ids, **columns), len(samples)) for name, _, fn in self.terms
        }
        total = sum(w * parts[name] for name, w, _ in self.terms)
        return total, parts


def _scores(name: str, value: Any, n: int) -> np.ndarray:
    """A reward's return value as [n] finite floats, or a one-line error naming the reward."""
    try:
        out = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RecipeError(
            f"objective.rewards: '{name}' returned {type(value).__name__}, expected {n} numbers"
        ) from None
    if out.shape != (n,):
        raise RecipeError(f"objective.rewards: '{name}' returned {out.size} values for {n} completions")
    if not np.isfinite(out).all():
        raise RecipeError(f"objective.rewards: '{name}' returned a non-finite value")
    return out
