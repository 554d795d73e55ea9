"""The training reward of `scst` / `grpo`: weighted terms from the recipe, each logged apart.

Every term is a callable `fn(samples, image_ids, **columns) -> [N]` (TRL-style); built-in terms
are CIDEr-D with df cached from the training references, smoothed sentence BLEU-4 and the
shapes-world hallucination penalty; user terms are given as `package.module:function`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from rlalign.config import RecipeError
from rlalign.config.schema import RewardConfig
from rlalign.data.shapes import mentioned
from rlalign.preflight import load_callable
from rlalign.rewards.bleu import BleuReward
from rlalign.rewards.cider import CiderReward


def hallucination_penalty(samples: Sequence[str], image_ids: Sequence[Hashable], *, objects: Sequence[list[dict]],
                          **columns: Any) -> np.ndarray:  # fmt: skip
    """Minus the share of a sample's mentioned shape and colour words absent from its image (0 if none mentioned)."""
    out = np.zeros(len(samples))
    for i, (text, objs) in enumerate(zip(samples, objects)):
        shapes, colors = mentioned(text)
        wrong = len(shapes - {o["shape"] for o in objs}) + len(colors - {o["color"] for o in objs})
        out[i] = -wrong / max(len(shapes) + len(colors), 1)
    return out


class CombinedReward:
    """Sum of weighted reward terms; `__call__` returns the total [N] and each term [N] by name."""

    def __init__(self, cfgs: Sequence[RewardConfig], refs_by_image_id: Mapping[Hashable, Sequence[str]]):
        if not cfgs:
            raise ValueError("objective.rewards: at least one reward term is needed")
        builtins = {"cider": lambda: CiderReward(refs_by_image_id), "bleu": lambda: BleuReward(refs_by_image_id),
                    "hallucination": lambda: hallucination_penalty}  # fmt: skip
        self.terms = [(c.name, c.weight, builtins[c.name]() if c.name in builtins
                       else load_callable(c.name, where=f"objective.rewards: '{c.name}'"))
                      for c in cfgs]  # fmt: skip

    def __call__(self, samples: Sequence[str], image_ids: Sequence[Hashable], **columns: Any
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
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
