"""Images read from data rows, and the `images` data kind of the RL objectives.

Reading: an image cell holds PIL, bytes, `{"bytes", "path"}` or a file path (a relative one resolves against
the dataset's folder). `ImageReader` opens it lazily, so the size comes from the header before any pixel is
decoded: above `data.max_image_pixels` the image is refused (`oversize_images: error`) or decoded at reduced
size (`downscale`: JPEG decodes at 1/2..1/8 scale, then a resize keeps the aspect to one pixel). Pillow's own
decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) bounds it too, under either setting: Pillow raises above
twice the limit and only warns above it; here both refuse the image. A cell that cannot be read raises
`CellError` with a short kind ("missing image file", "unreadable image", ...); the datasets turn it into a
`BadRowError` naming the file, the row and the column.

Datasets keep cells (bytes in the Arrow table, or paths), never decoded images: each `__getitem__` decodes,
so a decoded image lives as long as the batch that asked for it.

The `images` data kind: one row per image (the image, its id, all its reference captions, its own prompt when
the data has a `prompt` column, and any other column: the shapes world's ground-truth objects, a VQA
`solution`...); the collator encodes the prompts (left-padded, ready for `generate`) and passes every other
column on as lists for the rewards. Validation keeps the reference-caption
NLL of `xe`: rows that carry a `response` (the `CaptionPairs` view) are collated for it.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset as TorchDataset

from rlalign.config import RecipeError
from rlalign.config.schema import DataConfig
from rlalign.data.collate import SFTCollator, encode_prompts

if TYPE_CHECKING:
    from rlalign.data.captions import CaptionRows


class BadRowError(RecipeError):
    """A data row that cannot train; the one-line message names the file, the row and the column.
    `kind` is the short reason counted when bad rows are skipped."""

    def __init__(self, message: str, kind: str = "bad row"):
        super().__init__(message)
        self.kind = kind


class CellError(ValueError):
    """One cell that cannot be read: `kind` is the short reason, `column` is filled in by `in_column`."""

    def __init__(self, kind: str, detail: str = "", column: str | None = None):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind, self.column = kind, column


@contextmanager
def in_column(column: str) -> Iterator[None]:
    """CellErrors raised inside name `column` (unless they already name one)."""
    try:
        yield
    except CellError as err:
        err.column = err.column or column
        raise


def bad_row(where: str, row: int, err: CellError) -> BadRowError:
    return BadRowError(f"{where} row {row}, column '{err.column}': {err}", err.kind)


def fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size of at most `max_pixels` pixels with the aspect of width x height (to one pixel)."""
    scale = math.sqrt(max_pixels / (width * height))
    w = max(1, math.floor(width * scale))
    h = max(1, min(math.floor(height * scale), max_pixels // w))
    return min(w, max_pixels // h), h


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not a format Pillow reads"
    return " ".join(str(err).split()) or type(err).__name__


def _one(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) and len(value) == 1 else value


@dataclass(frozen=True)
class ImageReader:
    """Image cells -> RGB images under the recipe's size cap (see the module docstring)."""

    max_pixels: int
    oversize: str = "error"
    root: Path | None = None
    """Folder that relative image paths resolve against (the dataset's)."""

    @classmethod
    def from_config(cls, cfg: DataConfig, root: Path | None) -> ImageReader:
        return cls(cfg.max_image_pixels, cfg.oversize_images, root)

    def source(self, value: Any) -> bytes | Path:
        """The bytes or the file behind a cell, without reading the file."""
        value = _one(value)
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue()
        if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            value = value["bytes"] if value.get("bytes") is not None else value["path"]
        if isinstance(value, bytes):
            return value
        if isinstance(value, str | Path) and str(value):
            path = Path(value).expanduser()
            if not path.is_absolute() and self.root is not None:
                path = self.root / path
            if not path.is_file():
                raise CellError("missing image file", str(path))
            return path
        raise CellError("not an image", f"expected PIL, bytes or a path, got {type(value).__name__}")

    @staticmethod
    def data(source: bytes | Path) -> bytes:
        """The raw bytes (for hashing)."""
        if isinstance(source, bytes):
            return source
        try:
            return source.read_bytes()
        except OSError as err:
            raise CellError("unreadable image", f"{source}: {_reason(err)}") from None

    def open(self, source: bytes | Path) -> Image.Image:
        """The image opened lazily (header only), its size checked; decoding is `decode`'s."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Image.DecompressionBombError as err:
            raise CellError("decompression bomb", _reason(err)) from None
        except Exception as err:  # noqa: BLE001 - whatever Pillow raises on bytes that are no image
            raise CellError("unreadable image", _reason(err)) from None
        w, h = image.size
        size = f"{w} x {h} = {w * h} pixels"
        if w * h > self.max_pixels and self.oversize == "error":
            image.close()
            raise CellError("oversize image", f"{size}, over data.max_image_pixels {self.max_pixels}")
        if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
            image.close()
            raise CellError("decompression bomb", f"{size}, over Pillow's limit {Image.MAX_IMAGE_PIXELS}")
        return image

    def decode(self, source: bytes | Path) -> Image.Image:
        """RGB pixels, downscaled to fit `max_pixels` when the recipe says so."""
        with self.open(source) as image:
            try:
                if image.width * image.height <= self.max_pixels:
                    return image.convert("RGB")
                size = fit(image.width, image.height, self.max_pixels)
                image.draft("RGB", size)  # JPEG: decoded at the smallest 1/2^k scale still >= size
                image.load()
                rgb = image if image.mode == "RGB" else image.convert("RGB")  # no full-size copy when RGB
                return rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            except Exception as err:  # noqa: BLE001 - truncated or corrupt pixel data
                raise CellError("unreadable image", _reason(err)) from None

    def read(self, value: Any) -> Image.Image:
        return self.decode(self.source(value))

    def check(self, value: Any, *, decode: bool) -> None:
        """Raise CellError if the cell is no usable image: the header (size included), and with `decode`
        the pixels too. Nothing decoded is kept."""
        source = self.source(value)
        if decode:
            self.decode(source).close()
        else:
            self.open(source).close()


# -- the `images` data kind -----------------------------------------------------------------------
class ImageRows(TorchDataset):
    """One item per usable row of a caption split: image (decoded here), image_id, captions, every other column
    of the row, and the prompt: the row's own `prompt` column (string or chat messages) when it has one,
    else `data.prompt`."""

    def __init__(self, rows: CaptionRows, prompt: str = ""):
        self.rows, self.prompt = rows, prompt

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows.row(i)
        prompt = row.get("prompt")
        return {**row, "prompt": self.prompt if prompt is None else prompt}


COLUMN_NAMES = {"image_id": "image_ids", "captions": "refs"}
"""Row fields renamed in the batch (the names the rewards have always read)."""


class PromptCollator:
    """Image rows -> input_ids, attention_mask, pixel inputs (prompts only), and every other field of the rows
    as a list per field for the rewards: `image_ids`, `refs` (the captions), `prompt`, `objects`, `solution`..."""

    def __init__(self, processor: Any, max_response_tokens: int):
        self.processor = processor
        self.sft = SFTCollator(processor, max_response_tokens)

    def __call__(self, rows: list[dict]) -> dict:
        if "response" in rows[0]:
            return self.sft(rows)
        batch = dict(encode_prompts(self.processor, [r["image"] for r in rows], [r["prompt"] for r in rows]))
        for key in rows[0]:
            if key != "image" and key not in batch:
                batch[COLUMN_NAMES.get(key, key)] = [r[key] for r in rows]
        return batch
