"""Caption data as HF `datasets`: the shapes world or a local dataset, and the view XE trains on.

A caption dataset has one row per image: `image`, `image_id`, `captions` (list of references) and,
for the shapes world, `objects` (the ground truth). XE trains on (image, one caption) pairs; the
pair view indexes them without copying images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict
from torch.utils.data import Dataset as TorchDataset

from rlalign.config.schema import DataConfig
from rlalign.data.shapes import ShapesConfig, make_item

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
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


def _load_local(path: Path) -> DatasetDict:
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    loaders = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
    if path.is_file():
        return DatasetDict(
            {"train": datasets.load_dataset(loaders[path.suffix], data_files=str(path))["train"]}
        )
    found = {}
    for split, names in {"train": ["train"], "val": ["val", "validation"], "test": ["test"]}.items():
        for name in names:
            for suffix, kind in loaders.items():
                f = path / f"{name}{suffix}"
                if f.is_file():
                    found[split] = datasets.load_dataset(kind, data_files=str(f))["train"]
    if not found:
        raise FileNotFoundError(
            f"{path}: no dataset found (expected save_to_disk output or train/val/test files)"
        )
    return DatasetDict(found)


def load_split(cfg: DataConfig, split: str) -> Dataset:
    """One split (`train`, `val` or `test`) with columns `image`, `image_id`, `captions`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (valid: {', '.join(SPLITS)})")
    if cfg.source == "shapes":
        size = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split]
        return shapes_dataset(ShapesConfig(seed=cfg.seed, image_size=cfg.image_size), split, size)
    path = Path(cfg.path).expanduser()
    dd = _load_local(path)
    name = "validation" if split == "val" and "validation" in dd else split
    if name not in dd:
        raise KeyError(f"{path}: no '{split}' split (found: {', '.join(dd)})")
    ds = dd[name]
    for col in (cfg.image_column, cfg.captions_column):
        if col not in ds.column_names:
            raise KeyError(
                f"{path}: split '{split}' has no column '{col}' (columns: {', '.join(ds.column_names)})"
            )
    if cfg.image_column != "image":
        ds = ds.rename_column(cfg.image_column, "image")
    if cfg.captions_column != "captions":
        ds = ds.rename_column(cfg.captions_column, "captions")
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    if "image_id" not in ds.column_names:
        ds = ds.add_column("image_id", [f"{split}-{i:07d}" for i in range(len(ds))])
    return ds


class CaptionPairs(TorchDataset):
    """(image, one reference caption) pairs: pair k is caption k % C of image k // C."""

    def __init__(self, images: Dataset, prompt: str = ""):
        self.images = images
        self.prompt = prompt
        counts = [len(c) if isinstance(c, list) else 1 for c in images["captions"]]
        self.index = [(i, j) for i, n in enumerate(counts) for j in range(n)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, j = self.index[k]
        row = self.images[i]
        caps = row["captions"] if isinstance(row["captions"], list) else [row["captions"]]
        return {
            "image": row["image"],
            "image_id": row["image_id"],
            "prompt": self.prompt,
            "response": caps[j],
        }
