"""Training data by kind: each objective declares the kind it trains on (`data_kind`), and this one
explicit registry builds the train and validation sets, the collator and the validation metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from rlalign.config.schema import Recipe


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    collate: Callable[[list[dict]], dict]
    val_metric: str
    """Name of the validation metric `evaluate` computes (logged as `val/<name>`)."""


def caption_data(recipe: Recipe, processor: Any) -> DataBundle:
    """(image, one reference caption) pairs for XE; validation = token NLL of the references."""
    from rlalign.data.captions import CaptionPairs, load_rows
    from rlalign.data.collate import SFTCollator

    return DataBundle(
        train=CaptionPairs(load_rows(recipe.data, "train"), recipe.data.prompt),
        val=CaptionPairs(load_rows(recipe.data, "val"), recipe.data.prompt),
        collate=SFTCollator(processor, recipe.data.max_response_tokens),
        val_metric="loss",
    )


def image_data(recipe: Recipe, processor: Any) -> DataBundle:
    """One row per image (all references, ground truth) for the RL objectives; validation = reference NLL."""
    from rlalign.data.captions import CaptionPairs, load_rows
    from rlalign.data.images import ImageRows, PromptCollator

    return DataBundle(
        train=ImageRows(load_rows(recipe.data, "train"), recipe.data.prompt),
        val=CaptionPairs(load_rows(recipe.data, "val"), recipe.data.prompt),
        collate=PromptCollator(processor, recipe.data.max_response_tokens),
        val_metric="loss",
    )


def preference_data(recipe: Recipe, processor: Any) -> DataBundle:
    """(image, prompt, chosen, rejected[, retrieved image]) pairs for dpo / rdpo, validated up front;
    validation = the objective's loss and reward accuracies on the val pairs."""
    from rlalign.data.preference import PreferenceCollator, load_preferences

    retrieved = recipe.objective.name == "rdpo"
    train, val = load_preferences(recipe.data, processor, retrieved=retrieved)
    d = recipe.data
    collate = PreferenceCollator(processor, d.max_response_tokens, d.max_length, retrieved=retrieved)
    return DataBundle(train=train, val=val, collate=collate, val_metric="objective")


DATA_KINDS: dict[str, Callable[[Recipe, Any], DataBundle]] = {
    "captions": caption_data,
    "preferences": preference_data,
    "images": image_data,
}


def build_data(kind: str, recipe: Recipe, processor: Any) -> DataBundle:
    if kind not in DATA_KINDS:
        raise KeyError(f"unknown data kind '{kind}' (valid: {', '.join(sorted(DATA_KINDS))})")
    return DATA_KINDS[kind](recipe, processor)
