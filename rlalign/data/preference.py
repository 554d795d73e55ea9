"""Preference data for DPO / rDPO: TRL-compatible columns, validated up front, packed so each image
is encoded once.

A dataset has TRL's columns `images` (one image, or a list of one or more), `prompt`, `chosen`, `rejected`
and, for rDPO, `retrieved_images`; images are PIL, bytes, `{"bytes", "path"}` or file paths
(relative ones resolve against the dataset's folder), each decoded and encoded once per row. Text is plain
strings or TRL's conversational form: `prompt` a list of `{"role", "content"}` messages (rendered by the
chat template, `{"type": "image"}` parts placing the images, added to the first user message when absent),
`chosen` / `rejected` the assistant's messages. A string prompt already rendered for the model (it holds the
family's image placeholder or ends with the generation prompt) is not templated again. It is read from a
save_to_disk folder, a .parquet/.arrow/.jsonl file, a folder of `<split>.<ext>` files, a hub dataset id in
the local cache (`rlalign.data.captions.read_splits`), or generated from the shapes world; the splits are
`data.train_split` and `data.eval_split`. Rows with several images need a family whose preference rows
pack, and not rDPO (a one-line error names the row otherwise).

Every row is checked before training (text UTF-8, chosen / rejected not empty, images readable to the
last pixel and within `max_image_pixels`, prompt with its image tokens fitting `max_length`); a bad row
raises a `BadRowError` naming the file, the row (counted from 0) and the column, or with `skip_bad_rows`
is dropped and counted in the log. The dataset keeps text and image hashes; images are decoded from the
table's cells on each access (see `rlalign.data.images`).

Packing (`PreferenceCollator`): one row holds [prompt with image | chosen | rejected]; chosen and
rejected both attend to the prompt but not to each other (a 4D mask) and both get the positions of the
unpacked sequence prompt + response (1-D, or the family's M-RoPE positions: `rlalign.models.packing`).
So the image is encoded once and the prompt (image tokens included) runs once for the pair, through
the model's ordinary root forward (pixel_values + input_ids), which keeps DDP, ZeRO-2/3 and FSDP2 hooks
intact. rDPO adds one row [prompt with retrieved image | chosen] per pair. A family that does not pack
gets one row per response instead (said in the log; `PreferenceCollator.packed` is False).
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import Dataset as TorchDataset

from rlalign.config.schema import DataConfig
from rlalign.data.captions import read_splits, scan_rows, split_name
from rlalign.data.collate import TOKEN_ALIGNED, encode_prompts, image_slots, message_text
from rlalign.data.images import BadRowError, CellError, ImageReader, bad_row, in_column
from rlalign.models.packing import packs_preferences
from rlalign.models.vision_inputs import take_rows
from rlalign.shapes import COLORS, SHAPE_WORDS, ShapesConfig, make_item

__all__ = ["BadRowError", "PreferenceCollator", "PreferencePairs", "load_preferences", "shapes_preferences"]

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
PAD_SEGMENT, PROMPT, FIRST, SECOND = -1, 0, 1, 2


# -- loading and validation -----------------------------------------------------------------------
def _load_table(
    cfg: DataConfig,
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, str], Path | None]:
    """(train split, validation split or None, where each was read from, folder of relative image paths)."""
    dd, where, root = read_splits(cfg.pairs_path)
    label = str(Path(cfg.pairs_path).expanduser()) if root is not None else cfg.pairs_path
    train_name = split_name(cfg, list(dd), "train", label)
    val_name = split_name(cfg, list(dd), "val", label)
    found = {"train": where.get(train_name, f"{label} split '{train_name}'")}
    if val_name is not None:
        found["val"] = where.get(val_name, f"{label} split '{val_name}'")
    return dd[train_name], (dd[val_name] if val_name else None), found, root


def _raw_images(table: datasets.Dataset, col: str) -> datasets.Dataset:
    """Image features read as raw {bytes, path}: hashed as stored, decoded on each access."""
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
    features = datasets.Features(
        {
            "images": [datasets.Image()],
            "prompt": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "retrieved_images": [datasets.Image()],
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


class PreferencePairs(TorchDataset):
    """Checked preference rows; each item has `image`, `prompt`, `chosen`, `rejected`, `image_hash` (and
    `retrieved_image`, `retrieved_image_hash`). `rows` keeps the text, the raw-image hashes and the row
    number in the file (`row`, from 0; `first_row` is the file row of table row 0); images are decoded from
    the table's cells on each access, never kept."""

    def __init__(
        self,
        table: datasets.Dataset,
        processor: Any,
        cfg: DataConfig,
        *,
        retrieved: bool,
        root: Path | None = None,
        name: str = "train",
        first_row: int = 0,
    ):
        cols = {"images": cfg.images_column, "prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
        if retrieved:
            cols["retrieved_image"] = cfg.retrieved_images_column
        missing = [c for c in cols.values() if c not in table.column_names]
        if missing:
            raise BadRowError(
                f"{name}: preference data has no column {missing} (columns: {table.column_names})"
            )
        self.image_columns = {("image" if f == "images" else f): c for f, c in cols.items() if "image" in f}
        for col in self.image_columns.values():
            table = _raw_images(table, col)
        self.images = table.select_columns(list(self.image_columns.values()))
        self.reader = ImageReader.from_config(cfg, root)
        self.name = name
        self.multi_image: str | None = None
        """Why rows with several images cannot train here (None: they can)."""
        if retrieved:
            self.multi_image = "rDPO swaps one true image for one retrieved image"
        elif not packs_preferences(processor):
            self.multi_image = f"{type(processor).__name__} rows are unpacked (images repeated per response)"

        def check(raw: dict) -> dict:
            return self._check(raw, cols, processor, cfg)

        checked, kept, self.skipped = scan_rows(
            table, check, where=name, first_row=first_row, skip=cfg.skip_bad_rows, what="preference"
        )
        self.rows = [{**row, "row": first_row + i, "index": i} for row, i in zip(checked, kept)]
        if not self.rows:
            raise BadRowError(f"{name}: no usable preference rows (all {len(table)} bad)")

    def _check(self, raw: dict, cols: dict, processor: Any, cfg: DataConfig) -> dict:
        """The row's text and raw-image hashes; its images decoded for the checks only."""
        row: dict[str, Any] = {}
        for field in TEXT_COLUMNS:
            with in_column(cols[field]):
                row[field] = _text_cell(raw[cols[field]], field)
        decoded = {}
        for key, col in self.image_columns.items():
            with in_column(col):
                cells = _image_cells(raw[col])
                if len(cells) > 1 and self.multi_image is not None:
                    raise CellError("multi-image row", f"{len(cells)} images, but {self.multi_image}")
                sources = [self.reader.source(c) for c in cells]
                digests = [hashlib.sha1(self.reader.data(source)).hexdigest() for source in sources]
                one = len(digests) == 1
                row[f"{key}_hash"] = (
                    digests[0] if one else hashlib.sha1("".join(digests).encode()).hexdigest()
                )
                decoded[key] = [self.reader.decode(source) for source in sources]
        with in_column(cols["prompt"]):
            _check_slots(row["prompt"], len(decoded["image"]))
        if cfg.max_length is not None:
            n = int(encode_prompts(processor, [decoded["image"]], [row["prompt"]])["attention_mask"].sum())
            if n >= cfg.max_length:
                detail = f"prompt with image tokens is {n} tokens, max_length {cfg.max_length}"
                raise CellError("image tokens would be truncated", detail, column="prompt")
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        row = self.rows[k]
        cells = self.images[row["index"]]
        item = dict(row)
        for key, col in self.image_columns.items():
            try:
                with in_column(col):
                    images = [self.reader.read(c) for c in _image_cells(cells[col])]
            except CellError as err:
                raise bad_row(self.name, row["row"], err) from None
            item[key] = images[0] if len(images) == 1 else images
        return item


def _text_cell(value: Any, field: str) -> str | list[dict]:
    """A prompt / chosen / rejected cell: a string, or TRL's conversational form (a list of {role, content}
    messages; `content` a string or a list of {type, text} parts). A response becomes its messages' text;
    a prompt stays messages (the chat template renders it)."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        bad = next((m for m in value if "role" not in m or "content" not in m), None)
        if bad is not None or (field != "prompt" and not value):
            raise CellError("not chat messages", "each message needs 'role' and 'content'")
        if field == "prompt":
            return value
        roles = sorted({m["role"] for m in value} - {"assistant"})
        if roles:
            detail = f"a conversational {field} holds the assistant's messages only, got role {roles[0]!r}"
            raise CellError("not a response", detail)
        value = message_text(value)
    if not isinstance(value, str):
        raise CellError("not text", f"got {type(value).__name__} (expected a string or chat messages)")
    if field != "prompt" and not value.strip():
        raise CellError("empty text")
    return value


def _image_cells(value: Any) -> list:
    """The image cells of a row: one image, or a list of one or more."""
    cells = list(value) if isinstance(value, list | tuple) else [value]
    if not cells:
        raise CellError("no image", "empty image list")
    return cells


def _check_slots(prompt: str | list[dict], n_images: int) -> None:
    """Chat messages that place images themselves must place exactly the row's images."""
    if isinstance(prompt, list):
        slots = image_slots(prompt)
        if slots and slots != n_images:
            raise CellError("image count", f"the messages have {slots} image parts for {n_images} images")


def load_preferences(
    cfg: DataConfig, processor: Any, *, retrieved: bool
) -> tuple[PreferencePairs, PreferencePairs]:
    """Train and validation pairs (splits chosen by `data.train_split` / `data.eval_split`); without a
    validation split the last 5% (at least one row) of the training split is held out."""
    first_val_row = 0
    if cfg.pairs_path is None:
        shapes = ShapesConfig(seed=cfg.seed, image_size=cfg.image_size)
        train = shapes_preferences(shapes, "train", cfg.train_size, cfg.prompt)
        val = shapes_preferences(shapes, "val", cfg.val_size, cfg.prompt)
        root, where = None, {"train": "shapes train", "val": "shapes val"}
    else:
        train, val, where, root = _load_table(cfg)
        if val is None:
            where["val"] = where["train"]
            n_val = max(1, len(train) // 20) if len(train) > 1 else 0
            first_val_row = len(train) - n_val
            train, val = train.select(range(first_val_row)), train.select(range(first_val_row, len(train)))
            if n_val == 0:
                val, first_val_row = train, 0
            log.info("%s: no validation split; the last %d rows are held out", where["train"], len(val))
    return (
        PreferencePairs(train, processor, cfg, retrieved=retrieved, root=root, name=where["train"]),
        PreferencePairs(
            val, processor, cfg, retrieved=retrieved, root=root, name=where["val"], first_row=first_val_row
        ),
    )


# -- collation ------------------------------------------------------------------------------------
class PreferenceCollator:
    """Pairs -> model rows. Output: `input_ids`, `attention_mask` (2D, real tokens), `position_ids`,
    `segment_ids` (-1 pad, 0 prompt, 1 first response, 2 second response), `pred_pos` (position whose
    logits predict each token), the processor's pixel inputs and token-aligned outputs (e.g.
    `mm_token_type_ids`) laid out like `input_ids`, `logp_row` (which log-prob row each model row
    fills), `packed`, `is_retrieved` (log-prob rows of the visual term) and `pair_keys` (cache keys: image
    hashes + token ids).

    Log-prob rows are the pairs (chosen, rejected), then with rDPO the retrieved-image rows (chosen).
    Packed (families of `rlalign.models.packing.PACKED_PROCESSORS`, unless `packed=False`): one model row
    per log-prob row, [prompt | first | second]. Unpacked: one model row per response, [prompt | response],
    first responses of every log-prob row, then the second ones; each row's image inputs repeated."""

    def __init__(
        self,
        processor: Any,
        max_response_tokens: int,
        max_length: int | None,
        *,
        retrieved: bool,
        packed: bool | None = None,
    ):
        self.processor, self.tok = processor, processor.tokenizer
        self.max_response_tokens, self.max_length, self.retrieved = max_response_tokens, max_length, retrieved
        self.packed = packs_preferences(processor) if packed is None else packed
        if not self.packed:
            log.warning(
                "%s: preference pairs are not packed for this family: each response is its own row and "
                "its image is encoded once per response",
                type(processor).__name__,
            )

    def _response(self, ids: list[int], room: int) -> list[int]:
        return ids[: max(0, min(self.max_response_tokens, room - 1))] + [self.tok.eos_token_id]

    def __call__(self, pairs: list[dict]) -> dict[str, Any]:
        images = [p["image"] for p in pairs] + (
            [p["retrieved_image"] for p in pairs] if self.retrieved else []
        )
        prompts = [p["prompt"] for p in pairs] * (2 if self.retrieved else 1)
        enc = encode_prompts(self.processor, images, prompts)
        real = enc["attention_mask"].bool()
        prompt_ids = [ids[m].tolist() for ids, m in zip(enc["input_ids"], real)]
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
        if self.packed:
            seqs = [(j, p, c, r) for j, (p, c, r) in enumerate(rows)]
        else:
            firsts = [(j, p, c, []) for j, (p, c, _) in enumerate(rows)]
            seqs = firsts + [(j, p, [], r) for j, (p, _, r) in enumerate(rows) if r]
        out = _layout(seqs, self.tok.pad_token_id)
        source = [j for j, *_ in seqs]
        # rows in the prompts' order (packed): the processor's own layout, multi-image rows included
        picked = dict(enc) if source == list(range(len(rows))) else take_rows(dict(enc), source)
        for key, value in picked.items():
            if key in ("input_ids", "attention_mask") or key in TOKEN_ALIGNED:
                continue
            if isinstance(value, torch.Tensor) and value.shape == (len(seqs), enc["input_ids"].shape[1]):
                raise ValueError(
                    f"processor output '{key}' has one value per prompt token: add it to TOKEN_ALIGNED"
                )
            out[key] = value
        for key, fill in TOKEN_ALIGNED.items():
            if key in enc:
                values = [v[m].tolist() for v, m in zip(enc[key], real)]
                out[key] = torch.full_like(out["input_ids"], fill)
                for n, j in enumerate(source):
                    out[key][n, : len(values[j])] = torch.tensor(values[j])
        out["logp_row"] = source  # a list: not a model input, not part of the cache keys
        out["packed"] = self.packed
        out["is_retrieved"] = torch.arange(len(rows)) >= len(pairs)
        out["pair_keys"] = keys
        return out


def _layout(seqs: list[tuple[int, list[int], list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token tensors of the model rows (source, prompt, first, second): right-padded; both responses
    start at the prompt's length and are predicted from the prompt's last position onwards."""
    width = max(len(p) + len(c) + len(r) for _, p, c, r in seqs)
    out = {
        name: torch.full((len(seqs), width), fill, dtype=torch.long)
        for name, fill in (
            ("input_ids", pad_id),
            ("attention_mask", 0),
            ("position_ids", 0),
            ("segment_ids", PAD_SEGMENT),
            ("pred_pos", 0),
        )
    }
    for n, (_, p, c, r) in enumerate(seqs):
        P, C, R = len(p), len(c), len(r)
        out["input_ids"][n, : P + C + R] = torch.tensor(p + c + r)
        out["attention_mask"][n, : P + C + R] = 1
        out["position_ids"][n, : P + C + R] = torch.tensor([*range(P), *range(P, P + C), *range(P, P + R)])
        out["segment_ids"][n, : P + C + R] = torch.tensor([PROMPT] * P + [FIRST] * C + [SECOND] * R)
        # token t of a response is predicted at t-1, its first token at the prompt's last position
        out["pred_pos"][n, P : P + C] = torch.arange(P - 1, P + C - 1)
        out["pred_pos"][n, P + C : P + C + R] = torch.tensor([P - 1, *range(P + C, P + C + R - 1)][:R])
    return out
