"""The training reward of `scst` / `grpo`: weighted terms from the recipe, each logged apart.

Every term is a callable `fn(samples, image_ids, **columns) -> [N]` (TRL-style); built-in terms
are CIDEr-D with df cached from the training references, smoothed sentence BLEU-4 and the
shapes-world hallucination penalty; user terms are given as `package.module:function`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from rlalign.config.schema import RewardConfig
from rlalign.data.shapes import mentioned
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


def load_callable(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward '{spec}': cannot import ({err})") from None


class CombinedReward:
    """Sum of weighted reward terms; `__call__` returns the total [N] and each term [N] by name."""

    def __init__(self, cfgs: Sequence[RewardConfig], refs_by_image_id: Mapping[Hashable, Sequence[str]]):
        if not cfgs:
            raise ValueError("objective.rewards: at least one reward term is needed")
        builtins = {"cider": lambda: CiderReward(refs_by_image_id), "bleu": lambda: BleuReward(refs_by_image_id),
                    "hallucination": lambda: hallucination_penalty}  # fmt: skip
        self.terms = [(c.name, c.weight, builtins[c.name]() if c.name in builtins else load_callable(c.name))
                      for c in cfgs]  # fmt: skip

    def __call__(self, samples: Sequence[str], image_ids: Sequence[Hashable], **columns: Any
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
        parts = {
            name: np.asarray(fn(samples, image_ids, **columns), dtype=np.float64)
            for name, _, fn in self.terms
        }
        total = sum(w * parts[name] for name, w, _ in self.terms)
        return total, parts
