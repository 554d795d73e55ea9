"""The training reward of `scst` / `grpo`: weighted terms from the recipe, each logged apart.

A term is called one of two ways, told apart by its signature (`call_style`):
- TRL's: `fn(completions=..., prompts=..., completion_ids=..., **columns) -> list[float | None]`, chosen when
  the callable has a parameter named `completions` (TRL calls by keyword, so its position does not matter).
  `completions` are strings, or `[{"role": "assistant", "content": text}]` for rows whose prompt is chat
  messages (as TRL gives them); `prompts` are the rows' prompts as written in the data (`data.prompt` when the
  row has none);
- rlalign's: `fn(samples, image_ids, **columns) -> [N]`, any other signature.
`columns` are every non-image column of the batch (`image_ids`, `refs`, `objects`, `solution`, ...), repeated
once per sample. A None score means "no score for this sample" and counts 0 in the sum, as TRL's `nansum`
over reward functions does; the share of Nones is logged as the term `<name>_none`.

Built-in terms (`REWARDS`): CIDEr-D with df cached from the training references, smoothed sentence BLEU-4,
the shapes-world hallucination penalty, and the verifiable `answer_accuracy` and `format`
(`rlalign.rewards.verifiable`); their `options` are checked when the recipe loads. User terms are
`package.module:function`, imported from the working directory or the recipe's folder (no PYTHONPATH).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rlalign.config import RecipeError
from rlalign.config.plugins import Registry, load_callable
from rlalign.config.schema import RewardConfig
from rlalign.rewards.bleu import BleuReward
from rlalign.rewards.cider import CiderReward
from rlalign.rewards.verifiable import answer_accuracy, format_reward
from rlalign.shapes import mentioned

RewardFactory = Callable[..., Callable[..., Any]]
REWARDS: Registry[RewardFactory] = Registry("reward", "rlalign.rewards")
"""Built-in reward terms by name: a factory taking the training references by image id (and the term's
`options` as keywords) and returning the reward callable. `module:function` names a user callable instead
(used as is)."""


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
REWARDS.register("answer_accuracy", answer_accuracy)
REWARDS.register("format", format_reward)


def call_style(fn: Callable[..., Any]) -> str:
    """`trl` when `fn` has a parameter named `completions`, else `rlalign` (see the module docstring)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without an inspectable signature: the original interface
        return "rlalign"
    return "trl" if "completions" in params else "rlalign"


def check_reward(cfg: RewardConfig, *, where: str, search_dirs: Iterable[str | os.PathLike] = ()) -> None:
    """A term's name resolves (a user callable imports, from the working directory or `search_dirs`) and a
    built-in term accepts its `options`; one RecipeError line otherwise."""
    if ":" in cfg.name:
        load_callable(cfg.name, where=f"{where}.name: '{cfg.name}'", search_dirs=search_dirs)
        if cfg.options:
            raise RecipeError(f"{where}.options: only built-in reward terms take options")
        return
    factory = REWARDS.get(cfg.name, where=f"{where}.name")
    if (
        cfg.options
    ):  # names and values checked by building the term (cheap: terms with options need no references)
        try:
            factory({}, **cfg.options)
        except (TypeError, ValueError) as err:
            detail = str(err).rpartition("() ")[2] if isinstance(err, TypeError) else str(err)
            raise RecipeError(f"{where}.options: reward '{cfg.name}': {detail}") from None


def build_reward(
    name: str,
    refs_by_image_id: Mapping[Hashable, Sequence[str]],
    options: Mapping[str, Any] | None = None,
    *,
    search_dirs: Iterable[str | os.PathLike] = (),
) -> Callable[..., Any]:
    """A registered reward built over the training references, or a user `module:function` as is."""
    where = f"objective.rewards: '{name}'"
    if ":" in name:
        return load_callable(name, where=where, search_dirs=search_dirs)
    return REWARDS.get(name, where=where)(refs_by_image_id, **(options or {}))


class CombinedReward:
    """Sum of weighted reward terms; `__call__` returns the total [N] and each term [N] by name (plus
    `<name>_none`, the share of None scores, for terms that gave any)."""

    def __init__(
        self,
        cfgs: Sequence[RewardConfig],
        refs_by_image_id: Mapping[Hashable, Sequence[str]],
        *,
        search_dirs: Iterable[str | os.PathLike] = (),
    ):
        if not cfgs:
            raise ValueError("objective.rewards: at least one reward term is needed")
        self.terms = []
        for c in cfgs:
            fn = build_reward(c.name, refs_by_image_id, c.options, search_dirs=search_dirs)
            self.terms.append((c.name, c.weight, fn, call_style(fn)))

    def __call__(
        self, samples: Sequence[str], image_ids: Sequence[Hashable], **columns: Any
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`columns` are the batch's columns repeated per sample; TRL-style terms get `prompt` (the rows'
        prompts) as `prompts` and the sampled token ids as `completion_ids`."""
        prompts = columns.pop("prompt", None)
        completion_ids = columns.pop("completion_ids", None)
        n = len(samples)
        parts: dict[str, np.ndarray] = {}
        for name, _, fn, style in self.terms:
            if style == "trl":
                conversational = prompts is not None and any(isinstance(p, list) for p in prompts)
                completions = (
                    [[{"role": "assistant", "content": s}] for s in samples]
                    if conversational
                    else list(samples)
                )
                value = fn(
                    completions=completions,
                    prompts=list(prompts) if prompts is not None else [""] * n,
                    completion_ids=completion_ids,
                    image_ids=image_ids,
                    **columns,
                )
            else:
                value = fn(samples, image_ids, **columns, **({} if prompts is None else {"prompt": prompts}))
            parts[name], missing = _scores(name, value, n)
            if missing.any():
                parts[f"{name}_none"] = missing.astype(np.float64)
        total = sum(w * parts[name] for name, w, _, _ in self.terms)
        return total, parts


def _scores(name: str, value: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A reward's return value as [n] finite floats (None -> 0) and which were None, or a one-line error
    naming the reward."""
    values = list(value) if isinstance(value, list | tuple) else value
    missing = np.zeros(n, dtype=bool)
    if isinstance(values, list):
        missing = np.array([v is None for v in values], dtype=bool)
        values = [0.0 if v is None else v for v in values]
    try:
        out = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RecipeError(
            f"objective.rewards: '{name}' returned {type(value).__name__}, expected {n} numbers"
        ) from None
    if out.shape != (n,):
        raise RecipeError(f"objective.rewards: '{name}' returned {out.size} values for {n} completions")
    if not np.isfinite(out).all():
        raise RecipeError(f"objective.rewards: '{name}' returned a non-finite value")
    return out, missing if missing.shape == (n,) else np.zeros(n, dtype=bool)
