"""Training data by kind: each objective declares the kind it trains on (`data_kind`); each kind registers
here how it builds the train and validation sets and the collator (`build`), and what it can check about a
recipe before anything loads (`check`). A recipe's objective may also name `module:function` returning a
`DataBundle` (a user data kind)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from rlalign.config import RecipeError
from rlalign.config.plugins import Registry
from rlalign.config.schema import Recipe


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    collate: Callable[[list[dict]], dict]
    val_metric: str
    """What validation reports: `loss` (token NLL of the references: `val/loss`) or `objective` (the
    objective's own loss and metrics on the validation items: `val/<metric>`)."""


@dataclass(frozen=True)
class DataKind:
    build: Callable[[Recipe, Any, Any], DataBundle]
    """(recipe, processor, objective) -> the bundle."""
    check: Callable[[Recipe, type], None] = lambda recipe, objective: None
    """(recipe, objective class): raise a one-line RecipeError for what is knowable before loading."""


DATA_KINDS: Registry[DataKind] = Registry("data kind", "rlalign.data")


def caption_data(recipe: Recipe, processor: Any, objective: Any) -> DataBundle:
    """(image, one reference caption) pairs for XE; validation = token NLL of the references."""
    from torch.utils.data import ConcatDataset

    from rlalign.data.captions import CaptionPairs, YesNoQuestions, load_rows
    from rlalign.data.collate import SFTCollator
    from rlalign.shapes import ShapesConfig

    d = recipe.data
    train: Dataset = CaptionPairs(load_rows(d, "train"), d.prompt)
    if d.yes_no_questions:
        shapes = ShapesConfig(seed=d.seed, image_size=d.image_size)
        train = ConcatDataset([train, YesNoQuestions(shapes, "train", d.yes_no_questions, d.train_size)])
    return DataBundle(
        train=train,
        val=CaptionPairs(load_rows(recipe.data, "val"), recipe.data.prompt),
        collate=SFTCollator(processor, recipe.data.max_response_tokens),
        val_metric="loss",
    )


def image_data(recipe: Recipe, processor: Any, objective: Any) -> DataBundle:
    """One row per image (all references, ground truth) for the RL objectives; validation = reference NLL."""
    from rlalign.data.captions import CaptionPairs, load_rows
    from rlalign.data.images import ImageRows, PromptCollator

    return DataBundle(
        train=ImageRows(load_rows(recipe.data, "train"), recipe.data.prompt),
        val=CaptionPairs(load_rows(recipe.data, "val"), recipe.data.prompt),
        collate=PromptCollator(processor, recipe.data.max_response_tokens),
        val_metric="loss",
    )


def preference_data(recipe: Recipe, processor: Any, objective: Any) -> DataBundle:
    """(image, prompt, chosen, rejected[, retrieved image]) pairs for dpo / rdpo, validated up front;
    validation = the objective's loss and reward accuracies on the val pairs."""
    from rlalign.data.preference import PreferenceCollator, load_preferences

    retrieved = bool(getattr(objective, "uses_retrieved", False))
    train, val = load_preferences(recipe.data, processor, retrieved=retrieved)
    d = recipe.data
    # flash-attention kernels take no block mask: packed rows need one
    packed = False if recipe.model.attn_implementation == "flash_attention_2" else None
    collate = PreferenceCollator(
        processor, d.max_response_tokens, d.max_length, retrieved=retrieved, packed=packed
    )
    return DataBundle(train=train, val=val, collate=collate, val_metric="objective")


def check_preferences(recipe: Recipe, objective: type) -> None:
    """The preference file's columns (read from its schema, no rows loaded) hold what the objective needs."""
    d = recipe.data
    if d.pairs_path is None:  # the shapes world's pairs carry every column
        return
    path = Path(d.pairs_path).expanduser()
    if not path.exists():  # a relative path may be an earlier stage's output: checked when the run loads
        return
    need = [d.images_column, "prompt", "chosen", "rejected"]
    if objective.uses_retrieved:
        need.append(d.retrieved_images_column)
    for where, columns in table_columns(path).items():
        missing = [c for c in need if c not in columns]
        if missing:
            key = (
                "data.retrieved_images_column" if d.retrieved_images_column in missing else "data.pairs_path"
            )
            raise RecipeError(
                f"{key}: {where} has no column {', '.join(repr(m) for m in missing)} needed by objective "
                f"'{objective.name}' (columns: {', '.join(columns)})"
            )


def table_columns(path: Path) -> dict[str, list[str]]:
    """Column names of each data file / saved dataset at `path`, from schemas and headers only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def one(file: Path) -> list[str]:
        if file.is_dir():
            info = file / "dataset_info.json"
            return list(json.loads(info.read_text()).get("features", {})) if info.is_file() else []
        if file.suffix == ".parquet":
            return list(pq.read_schema(file).names)
        if file.suffix == ".arrow":
            with pa.memory_map(str(file)) as source:
                try:
                    return list(pa.ipc.open_stream(source).schema.names)
                except pa.ArrowInvalid:
                    return list(pa.ipc.open_file(source).schema.names)
        if file.suffix in (".jsonl", ".json"):
            with file.open(encoding="utf-8", errors="replace") as f:
                first = f.readline().strip()
            try:
                row = json.loads(first) if first else {}
            except json.JSONDecodeError:
                return []  # the loader names the bad line
            return list(row) if isinstance(row, dict) else []
        return []

    if path.is_file():
        return {str(path): one(path)}
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return {f"{path} split '{s}'": one(path / s) for s in splits}
    if (path / "dataset_info.json").is_file():
        return {str(path): one(path)}
    return {
        str(f): one(f)
        for f in sorted(path.iterdir())
        if f.suffix in (".parquet", ".arrow", ".jsonl", ".json")
    }


DATA_KINDS.register("captions", DataKind(build=caption_data))
DATA_KINDS.register("images", DataKind(build=image_data))
DATA_KINDS.register("preferences", DataKind(build=preference_data, check=check_preferences))


def data_kind(spec: str) -> DataKind:
    """A registered kind, or `module:function` (a build function) from outside the package."""
    found = DATA_KINDS.get(spec, where="objective data_kind")
    return found if isinstance(found, DataKind) else DataKind(build=found)


def build_data(kind: str, recipe: Recipe, processor: Any, objective: Any = None) -> DataBundle:
    """The data `kind` builds for `objective` (its class or an instance; None: plain rows, no retrieved images)."""
    return data_kind(kind).build(recipe, processor, objective)
