"""Preference data for DPO / rDPO: TRL-compatible columns, validated up front, packed so each image
is encoded once.

A dataset has columns `images` (one image, or a list holding one), `prompt`, `chosen`, `rejected`
and, for rDPO, `retrieved_images`; images are PIL, bytes, `{"bytes", "path"}` or file paths
(relative ones resolve against the dataset's folder). It is read from a save_to_disk folder, a
.parquet/.arrow/.jsonl file or a folder of train/val files, or generated from the shapes world.

Every row is checked before training (image readable, chosen / rejected not empty, prompt with its
image tokens fitting `max_length`); a bad row raises an error naming its row and column, or with
`skip_bad_rows` is dropped and counted in the log.

Packing (`PreferenceCollator`): one row holds [prompt with image | chosen | rejected]; chosen and
rejected both attend to the prompt but not to each other (a 4D mask) and both start at the same
position ids. So the image is encoded once and the prompt (image tokens included) runs once for the
pair, through the model's ordinary root forward (pixel_values + input_ids), which keeps DDP,
ZeRO-2/3 and FSDP2 hooks intact. rDPO adds one row [prompt with retrieved image | chosen] per pair.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from rlalign.config.schema import DataConfig
from rlalign.data.collate import encode_prompts
from rlalign.data.shapes import COLORS, SHAPE_WORDS, ShapesConfig, make_item

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
PAD_SEGMENT, PROMPT, FIRST, SECOND = -1, 0, 1, 2


class BadRowError(ValueError):
    """A preference row that cannot train; the message names the row and the column."""


# -- images ---------------------------------------------------------------------------------------
def _one(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) and len(value) == 1 else value


def image_bytes(value: Any, root: Path | None) -> bytes:
    """Raw bytes of an image cell (for hashing and decoding); raises FileNotFoundError / ValueError."""
    value = _one(value)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return path.read_bytes()
    raise ValueError(f"not an image (expected PIL, bytes or a path, got {type(value).__name__})")


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# -- loading and validation -----------------------------------------------------------------------
def _load_table(path: Path) -> datasets.DatasetDict:
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if (path / "dataset_info.json").is_file():
        return datasets.DatasetDict({"train": datasets.load_from_disk(str(path))})
    kinds = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
    if path.is_file():
        return datasets.DatasetDict(
            {"train": datasets.load_dataset(kinds[path.suffix], data_files=str(path))["train"]}
        )
    found = {}
    for split, names in {"train": ["train"], "val": ["val", "validation"]}.items():
        for name in names:
            for suffix, kind in kinds.items():
                if (path / f"{name}{suffix}").is_file() and split not in found:
                    found[split] = datasets.load_dataset(kind, data_files=str(path / f"{name}{suffix}"))[
                        "train"
                    ]
    if not found:
        raise FileNotFoundError(f"{path}: no preference data found (save_to_disk folder or train/val files)")
    return datasets.DatasetDict(found)


def _raw_images(table: datasets.Dataset, col: str) -> datasets.Dataset:
    """Image features read as raw {bytes, path} (hashed as stored, decoded once here)."""
    feature = table.features[col]
    inner = getattr(feature, "feature", feature[0] if isinstance(feature, list) else None)
    if isinstance(feature, datasets.Image):
        return table.cast_column(col, datasets.Image(decode=False))
    if isinstance(inner, datasets.Image):
        return table.cast_column(col, [datasets.Image(decode=False)])
    return table


def swap_word(caption: str, rng: random.Random) -> str:
    """The caption with one colour or shape word replaced by another (a hallucinated rejected answer)."""
    words = caption.split()
    spots = [i for i, w in enumerate(words) if w in COLORS or w in SHAPE_WORDS]
    i = rng.choice(spots)
    pool = (
        list(COLORS)
        if words[i] in COLORS
        else sorted({c for c in SHAPE_WORDS.values()} - {SHAPE_WORDS[words[i]]})
    )
    words[i] = rng.choice([w for w in pool if w != words[i]])
    return " ".join(words)


def shapes_preferences(cfg: ShapesConfig, split: str, size: int, prompt: str = "") -> datasets.Dataset:
    """Synthetic pairs: chosen = a reference caption, rejected = one colour/shape word swapped,
    retrieved image = the next image of the split."""
    items = [make_item(cfg, split, i) for i in range(size)]
    rng = random.Random(f"pairs:{cfg.seed}:{split}")
    rows: dict[str, list] = {"images": [], "prompt": [], "chosen": [], "rejected": [], "retrieved_images": []}
    for i, item in enumerate(items):
        chosen = item.captions[i % len(item.captions)]
        rows["images"].append([item.image])
        rows["prompt"].append(prompt)
        rows["chosen"].append(chosen)
        rows["rejected"].append(swap_word(chosen, rng))
        rows["retrieved_images"].append([items[(i + 1) % size].image])
    features = datasets.Features({"images": [datasets.Image()], "prompt": datasets.Value("string"),
                                  "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
                                  "retrieved_images": [datasets.Image()]})  # fmt: skip
    return datasets.Dataset.from_dict(rows, features=features)


class PreferencePairs(TorchDataset):
    """Validated preference rows: each item has `image`, `prompt`, `chosen`, `rejected`, `key`
    (and `retrieved_image`), images decoded and hashed once."""

    def __init__(self, table: datasets.Dataset, processor: Any, cfg: DataConfig, *, retrieved: bool,
                 root: Path | None = None, name: str = "train"):  # fmt: skip
        self.rows: list[dict] = []
        cols = {"images": cfg.images_column, "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
        if retrieved:
            cols["retrieved_image"] = cfg.retrieved_images_column
        missing = [c for c in cols.values() if c not in table.column_names]
        if missing:
            raise BadRowError(
                f"{name}: preference data has no column {missing} (columns: {table.column_names})"
            )
        for field in ("images", "retrieved_image"):
            if field in cols:
                table = _raw_images(table, cols[field])
        bad: dict[str, int] = {}
        for i in range(len(table)):
            raw = table[i]
            try:
                self.rows.append(self._check(raw, i, cols, processor, cfg, root, name))
            except BadRowError as err:
                if not cfg.skip_bad_rows:
                    raise
                kind = str(err).split(": ", 2)[-1].split(" (")[0]
                bad[kind] = bad.get(kind, 0) + 1
        if bad:
            log.warning("%s: skipped %d bad preference rows of %d: %s", name, sum(bad.values()), len(table),
                        ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())))  # fmt: skip
        self.skipped = sum(bad.values())
        if not self.rows:
            raise BadRowError(f"{name}: no usable preference rows")

    @staticmethod
    def _check(
        raw: dict, i: int, cols: dict, processor: Any, cfg: DataConfig, root: Path | None, name: str
    ) -> dict:
        row: dict[str, Any] = {}
        for field, col in cols.items():
            value = raw[col]
            if field in ("images", "retrieved_image"):
                try:
                    data = image_bytes(value, root)
                    image = decode(data)
                except FileNotFoundError as err:
                    raise BadRowError(f"{name} row {i}, column '{col}': missing image file ({err})") from None
                except Exception as err:  # noqa: BLE001 - any decoding failure is a bad row
                    raise BadRowError(f"{name} row {i}, column '{col}': unreadable image ({err})") from None
                key = "image" if field == "images" else field
                row[key], row[f"{key}_hash"] = image, hashlib.sha1(data).hexdigest()
            elif not isinstance(value, str) or (field != "prompt" and not value.strip()):
                raise BadRowError(f"{name} row {i}, column '{col}': empty text")
            else:
                row[field] = value
        if cfg.max_length is not None:
            n = int(encode_prompts(processor, [row["image"]], [row["prompt"]])["attention_mask"].sum())
            if n >= cfg.max_length:
                raise BadRowError(f"{name} row {i}, column 'prompt': image tokens would be truncated "
                                  f"(prompt with image tokens is {n} tokens, max_length {cfg.max_length})")  # fmt: skip
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        return self.rows[k]


def load_preferences(
    cfg: DataConfig, processor: Any, *, retrieved: bool
) -> tuple[PreferencePairs, PreferencePairs]:
    """Train and validation pairs; without a val split the last 5% (at least one row) is held out."""
    if cfg.pairs_path is None:
        shapes = ShapesConfig(seed=cfg.seed, image_size=cfg.image_size)
        train = shapes_preferences(shapes, "train", cfg.train_size, cfg.prompt)
        val = shapes_preferences(shapes, "val", cfg.val_size, cfg.prompt)
        root = None
    else:
        path = Path(cfg.pairs_path).expanduser()
        dd = _load_table(path)
        root = path if path.is_dir() else path.parent
        train = dd["train"]
        if "val" in dd or "validation" in dd:
            val = dd["val" if "val" in dd else "validation"]
        else:
            n_val = max(1, len(train) // 20) if len(train) > 1 else 0
            train, val = (
                train.select(range(len(train) - n_val)),
                train.select(range(len(train) - n_val, len(train))),
            )
            if n_val == 0:
                val = train
    return (PreferencePairs(train, processor, cfg, retrieved=retrieved, root=root, name="train"),
            PreferencePairs(val, processor, cfg, retrieved=retrieved, root=root, name="val"))  # fmt: skip


# -- collation ------------------------------------------------------------------------------------
class PreferenceCollator:
    """Pairs -> packed rows. Output: `input_ids`, `attention_mask` (2D, real tokens), `position_ids`,
    `segment_ids` (-1 pad, 0 prompt, 1 first response, 2 second response), `pred_pos` (position whose
    logits predict each token), the processor's pixel inputs (one image per row), `is_retrieved`
    (rows of the visual term) and `pair_keys` (cache keys: image hashes + token ids)."""

    def __init__(self, processor: Any, max_response_tokens: int, max_length: int | None, *, retrieved: bool):
        self.processor, self.tok = processor, processor.tokenizer
        self.max_response_tokens, self.max_length, self.retrieved = max_response_tokens, max_length, retrieved

    def _response(self, ids: list[int], room: int) -> list[int]:
        return ids[: max(0, min(self.max_response_tokens, room - 1))] + [self.tok.eos_token_id]

    def __call__(self, pairs: list[dict]) -> dict[str, Any]:
        images = [p["image"] for p in pairs] + (
            [p["retrieved_image"] for p in pairs] if self.retrieved else []
        )
        prompts = [p["prompt"] for p in pairs] * (2 if self.retrieved else 1)
        enc = encode_prompts(self.processor, images, prompts)
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
        chosen = self.tok([p["chosen"] for p in pairs], add_special_tokens=False)["input_ids"]
        rejected = self.tok([p["rejected"] for p in pairs], add_special_tokens=False)["input_ids"]
        rows, keys = [], []
        for j, prompt in enumerate(prompt_ids):
            i = j % len(pairs)
            room = (self.max_length - len(prompt)) if self.max_length else 1 << 30
            c = self._response(chosen[i], room)
            r = self._response(rejected[i], room) if j < len(pairs) else []
            rows.append((prompt, c, r))
            if j < len(pairs):
                h = hashlib.sha1(repr((prompt, c, r)).encode())
                h.update(pairs[i]["image_hash"].encode())
                if self.retrieved:
                    h.update(pairs[i]["retrieved_image_hash"].encode())
                keys.append(h.hexdigest())
        width = max(len(p) + len(c) + len(r) for p, c, r in rows)
        out = {name: torch.full((len(rows), width), fill, dtype=torch.long)
               for name, fill in (("input_ids", self.tok.pad_token_id), ("attention_mask", 0), ("position_ids", 0),
                                  ("segment_ids", PAD_SEGMENT), ("pred_pos", 0))}  # fmt: skip
        for n, (p, c, r) in enumerate(rows):
            P, C, R = len(p), len(c), len(r)
            out["input_ids"][n, : P + C + R] = torch.tensor(p + c + r)
            out["attention_mask"][n, : P + C + R] = 1
            out["position_ids"][n, : P + C + R] = torch.tensor(
                [*range(P), *range(P, P + C), *range(P, P + R)]
            )
            out["segment_ids"][n, : P + C + R] = torch.tensor([PROMPT] * P + [FIRST] * C + [SECOND] * R)
            # token t of a response is predicted at t-1, its first token at the prompt's last position
            out["pred_pos"][n, P : P + C] = torch.arange(P - 1, P + C - 1)
            out["pred_pos"][n, P + C : P + C + R] = torch.tensor([P - 1, *range(P + C, P + C + R - 1)][:R])
        for key, value in enc.items():
            if key not in ("input_ids", "attention_mask"):
                if isinstance(value, torch.Tensor) and value.shape == enc["input_ids"].shape:
                    raise ValueError(
                        f"processor output '{key}' is token-aligned: not supported by packed preferences"
                    )
                out[key] = value
        out["is_retrieved"] = torch.arange(len(rows)) >= len(pairs)
        out["pair_keys"] = keys
        return out
