"""Caption data as HF `datasets`: the shapes world or a local dataset, and the views XE and RL train on.

A caption dataset has one row per image: `image`, `image_id`, `captions` (list of references) and,
for the shapes world, `objects` (the ground truth). Training reads it through `CaptionRows`: every row
is checked up front (captions are UTF-8, non-empty text; the image's header reads, its size within
`data.max_image_pixels`; with `skip_bad_rows` its pixels decode too), a bad row fails with an error naming
the file, the row (counted from 0) and the column, or with `skip_bad_rows` is dropped and counted in the
log. Images are decoded on access only (`CaptionRows.row`). XE trains on (image, one caption) pairs; the
pair view indexes them without copying images.

Why the pixels are decoded up front only under `skip_bad_rows`: decoding a large local dataset on every
rank before the first step costs minutes, while a header catches missing, mistyped, foreign and oversize
images. A row whose pixel data is corrupt behind a good header then fails when its batch is read, with
the same one-line error; a run that asked to skip bad rows has them all found before the first step.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import datasets
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError
from torch.utils.data import Dataset as TorchDataset

from rlalign.config import RecipeError
from rlalign.config.schema import DataConfig
from rlalign.data.collate import message_text
from rlalign.data.images import BadRowError, CellError, ImageReader, bad_row, in_column
from rlalign.shapes import ShapesConfig, make_item, make_vqa_item, make_yes_no_item

log = logging.getLogger(__name__)
T = TypeVar("T")

SPLITS = ("train", "val", "test")
FILE_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
_OBJECT_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "captions": datasets.Sequence(datasets.Value("string")),
        "objects": [
            {
                "shape": datasets.Value("string"),
                "color": datasets.Value("string"),
                "position": datasets.Value("string"),
                "box": datasets.Sequence(datasets.Value("int32"), length=4),
            }
        ],
    }
)


_VQA_FEATURES = datasets.Features(
    {
        **_OBJECT_FEATURES,
        "prompt": datasets.Value("string"),
        "solution": datasets.Value("string"),
        "question_kind": datasets.Value("string"),
    }
)


def _objects(item: Any) -> list[dict]:
    return [
        {"shape": o.shape, "color": o.color, "position": o.position, "box": list(o.box)} for o in item.objects
    ]


def shapes_vqa_dataset(config: ShapesConfig, split: str, size: int) -> Dataset:
    """`size` shapes questions (`rlalign.shapes.vqa_question`) as a `datasets.Dataset`: `image`, `image_id`,
    `prompt` (the question), `solution` (the exact answer), `question_kind`, `captions` (one: the answer as
    `<answer>...</answer>`, the XE target) and `objects`. Deterministic."""
    rows: dict[str, list] = {name: [] for name in _VQA_FEATURES}
    for i in range(size):
        item, kind, text, answer = make_vqa_item(config, split, i)
        rows["image"].append(item.image)
        rows["image_id"].append(f"vqa-{split}-{i:06d}")
        rows["captions"].append([f"<answer>{answer}</answer>"])
        rows["objects"].append(_objects(item))
        rows["prompt"].append(text)
        rows["solution"].append(answer)
        rows["question_kind"].append(kind)
    return Dataset.from_dict(rows, features=_VQA_FEATURES)


def shapes_dataset(config: ShapesConfig, split: str, size: int) -> Dataset:
    """`size` items of a shapes split as a `datasets.Dataset` (deterministic)."""
    rows: dict[str, list] = {"image": [], "image_id": [], "captions": [], "objects": []}
    for i in range(size):
        item = make_item(config, split, i)
        rows["image"].append(item.image)
        rows["image_id"].append(item.image_id)
        rows["captions"].append(item.captions)
        rows["objects"].append(
            [
                {"shape": o.shape, "color": o.color, "position": o.position, "box": list(o.box)}
                for o in item.objects
            ]
        )
    return Dataset.from_dict(rows, features=_OBJECT_FEATURES)


# -- reading files and rows (shared with preference data) -----------------------------------------
def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON-lines file stops being JSON: `row N: ...` (rows count non-blank lines from 0)."""
    row = 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as err:
                return f"row {row}: not valid JSON ({err.msg} at column {err.colno})"
            row += 1
    return None


def read_data_file(path: Path) -> Dataset:
    """A .parquet / .arrow / .jsonl / .json file as a Dataset; a file that does not parse is a BadRowError
    naming the file (and for JSON lines the row)."""
    try:
        return datasets.load_dataset(FILE_KINDS[path.suffix], data_files=str(path))["train"]
    except DatasetGenerationError as err:
        where = _first_bad_json_line(path) if path.suffix in (".jsonl", ".json") else None
        cause = " ".join(str(err.__cause__ or err).split())
        raise BadRowError(
            f"{path}: {where or f'cannot read as {FILE_KINDS[path.suffix]} ({cause})'}"
        ) from None


def read_row(table: Dataset, i: int) -> dict:
    """Row `i` as Python values; text that is not UTF-8 raises CellError naming its column."""
    try:
        return table[i]
    except UnicodeDecodeError:
        for col in table.column_names:
            try:
                table.select_columns([col])[i]
            except UnicodeDecodeError as err:
                detail = f"byte {err.object[err.start]:#04x} at offset {err.start}"
                raise CellError("non-UTF-8 text", detail, column=col) from None
        raise


def scan_rows(
    table: Dataset, check: Callable[[dict], T], *, where: str, first_row: int, skip: bool, what: str
) -> tuple[list[T], list[int], int]:
    """`check` on every row: (results, indexes of the rows kept, number skipped). A CellError is a bad row:
    raised as a BadRowError naming the file, row and column, or with `skip` counted and logged by kind."""
    results, kept, bad = [], [], {}
    for i in range(len(table)):
        try:
            results.append(check(read_row(table, i)))
            kept.append(i)
        except CellError as err:
            if not skip:
                raise bad_row(where, first_row + i, err) from None
            bad[err.kind] = bad.get(err.kind, 0) + 1
    if bad:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
        log.warning("%s: skipped %d bad %s rows of %d: %s", where, sum(bad.values()), what, len(table), kinds)
    return results, kept, sum(bad.values())


# -- splits: local folders and files, saved datasets, the local hub cache -----------------------------
SPLIT_ALIASES = {"val": "validation", "validation": "val"}


def _hub_id(spec: str) -> bool:
    """Whether `spec` reads as a hub dataset id (`name` or `owner/name`) rather than a path."""
    return bool(re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", spec)) and Path(spec).suffix not in FILE_KINDS


def read_splits(spec: str) -> tuple[DatasetDict, dict[str, str], Path | None]:
    """The splits of a dataset: (splits by name, where each was read from, the folder relative image paths
    resolve against). `spec` is a save_to_disk folder (a DatasetDict, or one Dataset: split `train`), a
    .parquet/.arrow/.jsonl/.json file (split `train`), a folder of `<split>.<ext>` files, or a hub dataset id
    read from the local Hugging Face datasets cache, never downloaded."""
    path = Path(spec).expanduser()
    if not path.exists() and _hub_id(spec):
        return _from_hub_cache(spec), {}, None
    root = path if path.is_dir() else path.parent
    if (path / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(path))
        return dd, {name: f"{path} split '{name}'" for name in dd}, root
    if (path / "dataset_info.json").is_file():
        return DatasetDict({"train": datasets.load_from_disk(str(path))}), {"train": str(path)}, root
    if path.is_file():
        if path.suffix not in FILE_KINDS:
            raise RecipeError(f"{path}: not a data file (expected {', '.join(FILE_KINDS)})")
        return DatasetDict({"train": read_data_file(path)}), {"train": str(path)}, root
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found, where = {}, {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in FILE_KINDS and f.stem not in found:
            found[f.stem], where[f.stem] = read_data_file(f), str(f)
    if not found:
        raise FileNotFoundError(
            f"{path}: no dataset found (expected save_to_disk output or <split>.parquet/.arrow/.jsonl files)"
        )
    return DatasetDict(found), where, root


def _from_hub_cache(name: str) -> DatasetDict:
    """A hub dataset from the local cache only (offline whatever the environment says)."""
    from datasets import config as ds_config

    offline = ds_config.HF_HUB_OFFLINE
    ds_config.HF_HUB_OFFLINE = True
    try:
        dd = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - datasets raises ConnectionError, FileNotFoundError, ValueError...
        first = " ".join(str(err).split())[:160]
        raise RecipeError(
            f"data.path: '{name}' is no local path and not in the local Hugging Face datasets cache "
            f"({ds_config.HF_DATASETS_CACHE}); download it first on a machine with access "
            f"(datasets.load_dataset('{name}')) [{type(err).__name__}: {first}]"
        ) from None
    finally:
        ds_config.HF_HUB_OFFLINE = offline
    return dd if isinstance(dd, DatasetDict) else DatasetDict({"train": dd})


def split_name(cfg: DataConfig, available: list[str], role: str, where: str) -> str | None:
    """The split that plays `role` (`train`, `val`, `test`) among `available`: `data.train_split`,
    `data.eval_split` (`val` and `validation` stand for each other) or, unset, `val` / `validation` / `test`;
    None when validation has no split; a missing named split is a one-line error naming the key."""
    key, wanted = {
        "train": ("data.train_split", cfg.train_split),
        "val": ("data.eval_split", cfg.eval_split),
    }.get(role, ("split", role))
    if wanted is None:  # eval_split unset: the first evaluation split present
        found = next((n for n in ("val", "validation", "test") if n in available), None)
        if found == "test":
            log.info("%s: validating on split 'test' (no val/validation split; set data.eval_split)", where)
        return found
    for name in (wanted, SPLIT_ALIASES.get(wanted)):
        if name in available:
            return name
    raise RecipeError(f"{key}: {where} has no split '{wanted}' (splits: {', '.join(available)})")


def _split_table(cfg: DataConfig, split: str) -> tuple[Dataset, str, Path | None]:
    """One split with columns `image` (as stored), `image_id`, `captions` (and any other column, e.g. a
    per-row `prompt`); where it was read from; the folder relative image paths resolve against. A dataset
    with `prompt` / `completion` columns (TRL's prompt-completion format) takes `completion` as its caption."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (valid: {', '.join(SPLITS)})")
    size = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split]
    shapes = ShapesConfig(seed=cfg.seed, image_size=cfg.image_size)
    if cfg.source == "shapes":
        return shapes_dataset(shapes, split, size), f"shapes {split}", None
    if cfg.source == "shapes_vqa":
        return shapes_vqa_dataset(shapes, split, size), f"shapes_vqa {split}", None
    dd, where, root = read_splits(cfg.path)
    label = str(Path(cfg.path).expanduser()) if root is not None else cfg.path
    name = split_name(cfg, list(dd), split, label)
    if name is None:
        raise RecipeError(
            f"data.eval_split: {label} has no validation split (splits: {', '.join(dd)}); name one"
        )
    ds = dd[name]
    captions = cfg.captions_column
    if captions not in ds.column_names and "completion" in ds.column_names:
        captions = "completion"
    for col in (cfg.image_column, captions):
        if col not in ds.column_names:
            raise RecipeError(
                f"{label}: split '{name}' has no column '{col}' (columns: {', '.join(ds.column_names)})"
            )
    if cfg.image_column != "image":
        ds = ds.rename_column(cfg.image_column, "image")
    if captions != "captions":
        ds = ds.rename_column(captions, "captions")
    if "image_id" not in ds.column_names:
        ds = ds.add_column("image_id", [f"{name}-{i:07d}" for i in range(len(ds))])
    return ds, where.get(name, f"{label} split '{name}'"), root


def load_split(cfg: DataConfig, split: str) -> Dataset:
    """One split (`train`, `val` or `test`) with columns `image` (decoded by `datasets`), `image_id`,
    `captions`, unchecked: training reads splits through `load_rows` instead."""
    ds, _, _ = _split_table(cfg, split)
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds


def load_rows(cfg: DataConfig, split: str) -> CaptionRows:
    """The checked rows of one split (see the module docstring)."""
    ds, where, root = _split_table(cfg, split)
    return CaptionRows(ds, cfg, where=where, root=root)


def _captions(value: Any) -> list[str]:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        value = message_text(value)  # a conversational completion: the assistant messages' text
    caps = value if isinstance(value, list) else [value]
    if not caps:
        raise CellError("no captions")
    if not all(isinstance(c, str) for c in caps):
        raise CellError("not text", f"got {', '.join(sorted({type(c).__name__ for c in caps}))}")
    if not all(c.strip() for c in caps):
        raise CellError("empty text")
    return caps


class CaptionRows:
    """The usable rows of a caption split: captions and ids in memory, images read from the table's cells
    (bytes or paths) and decoded on each `row` call, never kept."""

    def __init__(self, table: Dataset, cfg: DataConfig, *, where: str, root: Path | None):
        if isinstance(table.features["image"], datasets.Image):
            table = table.cast_column("image", datasets.Image(decode=False))
        self.table, self.where = table, where
        self.reader = ImageReader.from_config(cfg, root)
        self.columns = {"image": cfg.image_column, "captions": cfg.captions_column}

        def check(raw: dict) -> list[str]:
            with in_column(self.columns["captions"]):
                captions = _captions(raw["captions"])
            with in_column(self.columns["image"]):
                self.reader.check(raw["image"], decode=cfg.skip_bad_rows)
            return captions

        self.captions, self.kept, self.skipped = scan_rows(
            table, check, where=where, first_row=0, skip=cfg.skip_bad_rows, what="caption"
        )
        if not self.kept:
            raise BadRowError(f"{where}: no usable caption rows (all {len(table)} bad)")

    def __len__(self) -> int:
        return len(self.kept)

    def row(self, k: int) -> dict:
        """Row k with its image decoded: `image`, `image_id`, `captions` (a list), and any other column."""
        i = self.kept[k]
        row = self.table[i]
        try:
            with in_column(self.columns["image"]):
                row["image"] = self.reader.read(row["image"])
        except CellError as err:
            raise bad_row(self.where, i, err) from None
        row["captions"] = self.captions[k]
        return row


class CaptionPairs(TorchDataset):
    """(image, one reference caption) pairs: pair k is caption k % C of image k // C."""

    def __init__(self, rows: CaptionRows, prompt: str = ""):
        self.rows = rows
        self.prompt = prompt
        self.index = [(i, j) for i, caps in enumerate(rows.captions) for j in range(len(caps))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, j = self.index[k]
        row = self.rows.row(i)
        return {
            "image": row["image"],
            "image_id": row["image_id"],
            "prompt": row_prompt(row, self.prompt),
            "response": row["captions"][j],
        }


class YesNoQuestions(TorchDataset):
    """`size` yes/no object questions about the shapes split's images (`rlalign.shapes.make_yes_no_item`), in the
    view `CaptionPairs` gives: `image`, `image_id`, `prompt` (the question), `response` (`yes` / `no`)."""

    def __init__(self, config: ShapesConfig, split: str, size: int, images: int):
        self.config, self.split, self.size, self.images = config, split, size, images

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, k: int) -> dict:
        item, question, answer = make_yes_no_item(self.config, self.split, k, self.images)
        return {"image": item.image, "image_id": item.image_id, "prompt": question, "response": answer}


def row_prompt(row: dict, default: str) -> str | list[dict]:
    """The row's own `prompt` (a string or chat messages) when it has one, else the recipe's `data.prompt`."""
    prompt = row.get("prompt")
    return default if prompt is None else prompt
