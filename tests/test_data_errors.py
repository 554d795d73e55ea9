"""Bad data rows by any road: non-UTF-8 text (JSONL and Parquet), an image above `data.max_image_pixels`
(refused from its header, or downscaled with its aspect kept), Pillow's decompression-bomb refusal, a missing
image file, bytes that are no image, a cell that is no image, caption data. Through the CLI each is one line
naming the file, row and column, and exit 2; with `data.skip_bad_rows` the run goes on and logs the count.
Decoded images live no longer than the batch that asked for them."""

from __future__ import annotations

import gc
import io
import json
import re
import struct
import subprocess
import weakref
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIN, ROOT, make_env
from datasets import Dataset
from PIL import Image
from test_cli_errors import one_line_error

from rlalign.config import RecipeError
from rlalign.config.schema import DataConfig, TinyModelConfig
from rlalign.data.preference import PreferencePairs, shapes_preferences
from rlalign.models.tiny import build_tiny_llava
from rlalign.shapes import ShapesConfig, make_item

SHAPES = ShapesConfig(image_size=48)
N, BAD = 8, 2  # rows per file (the last one is split off for validation) and the bad row
DPO, XE = "recipes/test/tiny-dpo.yaml", "recipes/test/tiny-xe.yaml"


def train(tmp_path: Path, recipe: str, *overrides: str) -> subprocess.CompletedProcess:
    """One optimizer step of `recipe` through the real CLI, everything written under tmp_path."""
    cmd = [
        str(BIN / "rlalign"),
        "train",
        recipe,
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
        *overrides,
    ]
    env = make_env(HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ran_one_step(proc: subprocess.CompletedProcess, tmp_path: Path, log_line: str) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = " ".join((proc.stdout + proc.stderr).split())  # the console log wraps long lines
    assert log_line in logged, logged[-4000:]
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x]
    assert [m["step"] for m in steps if "loss" in m] == [1]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads from files under tmp_path, not in HOME."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_llava(TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400), SHAPES)[1]


def pair_rows(tmp_path: Path) -> list[dict]:
    """N shapes preference rows, their images as PNG files under tmp_path/img (relative paths)."""
    (tmp_path / "img").mkdir()
    rows = []
    for i, r in enumerate(shapes_preferences(SHAPES, "train", N)):
        r["images"][0].save(tmp_path / "img" / f"{i}.png")
        rows.append(
            {
                "images": [f"img/{i}.png"],
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def non_utf8_jsonl(tmp_path: Path) -> Path:
    """Row BAD's `chosen` holds the byte 0xff (and the file is not UTF-8 there)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(tmp_path))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[BAD] = lines[BAD].replace(b'"chosen": "', b'"chosen": "\xff', 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().splitlines()[BAD].decode()
    return path


def non_utf8_parquet(tmp_path: Path) -> Path:
    """Row BAD's `chosen` holds the byte 0xff in a Parquet string column (written without validation)."""
    rows = pair_rows(tmp_path)
    chosen = [r["chosen"].encode() for r in rows]
    chosen[BAD] = b"\xff" + chosen[BAD]
    table = pa.table(
        {
            "images": [r["images"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "chosen": pa.array(chosen, type=pa.binary()).view(pa.string()),
            "rejected": [r["rejected"] for r in rows],
        }
    )
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    raw = pq.read_table(path).column("chosen").cast(pa.binary()).to_pylist()
    assert raw[BAD].startswith(b"\xff") and raw[BAD - 1] == rows[BAD - 1]["chosen"].encode()
    return path


@pytest.mark.e2e
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(non_utf8_jsonl, marks=pytest.mark.slow),
        pytest.param(non_utf8_parquet, marks=pytest.mark.slow),
    ],
    ids=["jsonl", "parquet"],
)
def test_non_utf8_text_is_a_bad_row(tmp_path, make):
    path = make(tmp_path)
    err = one_line_error(
        train(tmp_path, DPO, f"data.pairs_path={path}"), str(path), f"row {BAD}, column 'chosen'"
    )
    assert "UTF-8" in err
    assert not (tmp_path / "run").exists(), "nothing is written before the data is read"
    proc = train(tmp_path, DPO, f"data.pairs_path={path}", "data.skip_bad_rows=true")
    ran_one_step(proc, tmp_path, f"skipped 1 bad preference rows of {N - 1}: non-UTF-8 text: 1")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data stops after one row (an unfinished zlib
    stream): decoding it fails, so an error about its size shows the size was read from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    z = zlib.compressobj()
    idat = z.compress(b"\x00" + b"\x80" * 3 * width) + z.flush(zlib.Z_SYNC_FLUSH)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_header_fixture_does_not_decode():
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(png_header(300, 200))).load()


@pytest.mark.e2e
@pytest.mark.slow
def test_oversize_image_refused_from_its_header(tmp_path):
    rows = pair_rows(tmp_path)
    (tmp_path / "img" / "big.png").write_bytes(png_header(5000, 4000))
    assert Image.open(tmp_path / "img" / "big.png").size == (5000, 4000)
    rows[BAD]["images"] = ["img/big.png"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    err = one_line_error(
        train(tmp_path, DPO, f"data.pairs_path={path}"), str(path), f"row {BAD}, column 'images'"
    )
    assert "5000 x 4000 = 20000000 pixels" in err and "max_image_pixels 16777216" in err
    proc = train(tmp_path, DPO, f"data.pairs_path={path}", "data.skip_bad_rows=true")
    ran_one_step(proc, tmp_path, f"skipped 1 bad preference rows of {N - 1}: oversize image: 1")


@pytest.mark.parametrize(
    "size", [(20000, 20000), (12000, 9000)], ids=["over-pillow-limit", "over-pillow-warning"]
)
@pytest.mark.parametrize("oversize", ["error", "downscale"])
def test_decompression_bombs_are_bad_rows(processor, size, oversize):
    """Pillow raises DecompressionBombError above 2 x MAX_IMAGE_PIXELS and only warns above it: both are a
    bad row, under `downscale` too (a bomb is never decoded); the size comes from the header alone."""
    rows = [
        {
            "images": [make_item(SHAPES, "train", i).image],
            "prompt": "",
            "chosen": "a red box",
            "rejected": "a blue box",
        }
        for i in range(4)
    ]
    rows[BAD]["images"] = [{"bytes": png_header(*size), "path": None}]
    table = Dataset.from_list(rows)
    assert Image.MAX_IMAGE_PIXELS < size[0] * size[1] < 2 * Image.MAX_IMAGE_PIXELS or size == (20000, 20000)
    kind = "oversize image" if oversize == "error" and size != (20000, 20000) else "decompression bomb"
    cfg = {"max_image_pixels": 50_000_000, "oversize_images": oversize}
    with pytest.raises(
        RecipeError, match=rf"^train row {BAD}, column 'images': {kind} \(.*\b{size[0] * size[1]} pixels"
    ):
        PreferencePairs(table, processor, DataConfig(**cfg), retrieved=False)
    kept = PreferencePairs(table, processor, DataConfig(**cfg, skip_bad_rows=True), retrieved=False)
    assert kept.skipped == 1 and [r["row"] for r in kept.rows] == [0, 1, 3]


def two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: a crop instead of a resize would lose one colour."""
    im = Image.new("RGB", (width, height), (220, 40, 40))
    im.paste((50, 90, 230), (width // 2, 0, width, height))
    return im


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_oversize_image_downscaled_with_its_aspect(tmp_path, processor, fmt):
    rows = pair_rows(tmp_path)
    big = tmp_path / "img" / f"big.{fmt.lower()}"
    two_colour(300, 200).save(big, format=fmt)
    rows[BAD]["images"] = [str(big)]
    cap = 10_000
    cfg = DataConfig(max_image_pixels=cap, oversize_images="downscale")
    pairs = PreferencePairs(Dataset.from_list(rows), processor, cfg, retrieved=False, root=tmp_path)
    image = pairs[BAD]["image"]
    w, h = image.size
    assert 0.97 * cap <= w * h <= cap, (w, h)  # fits the cap, and not far below it
    assert abs(w - h * 300 / 200) <= 1 and abs(h - w * 200 / 300) <= 1, (w, h)
    left, right = image.getpixel((w // 4, h // 2)), image.getpixel((3 * w // 4, h // 2))
    assert max(abs(a - b) for a, b in zip(left, (220, 40, 40))) < 12, left
    assert max(abs(a - b) for a, b in zip(right, (50, 90, 230))) < 12, right
    assert pairs[BAD - 1]["image"].size == (48, 48)  # images under the cap are left alone
    refused = DataConfig(max_image_pixels=cap)
    with pytest.raises(RecipeError, match=rf"train row {BAD}, column 'images': oversize image \(300 x 200"):
        PreferencePairs(Dataset.from_list(rows), processor, refused, retrieved=False, root=tmp_path)


@pytest.mark.e2e
@pytest.mark.slow
def test_downscaled_run_trains(tmp_path):
    rows = pair_rows(tmp_path)
    two_colour(300, 200).save(tmp_path / "img" / "big.png")
    rows[BAD]["images"] = ["img/big.png"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = (f"data.pairs_path={path}", "data.max_image_pixels=10000")
    one_line_error(train(tmp_path, DPO, *args), str(path), f"row {BAD}, column 'images': oversize image")
    proc = train(tmp_path, DPO, *args, "data.oversize_images=downscale")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipped" not in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_missing_image_file(tmp_path):
    rows = pair_rows(tmp_path)
    rows[BAD]["images"] = ["img/nope.png"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert not (tmp_path / "img" / "nope.png").exists()
    err = one_line_error(
        train(tmp_path, DPO, f"data.pairs_path={path}"), str(path), f"row {BAD}, column 'images'"
    )
    assert "missing image file" in err and str(tmp_path / "img" / "nope.png") in err


@pytest.mark.parametrize(
    ("cell", "needle"),
    [
        ([5], "not an image (expected PIL, bytes or a path, got int)"),
        ([{"bytes": None, "path": None}], "not an image (expected PIL, bytes or a path, got dict)"),
        (["img/text.png"], "unreadable image"),
        ([{"bytes": b"GIF89a\x01\x00 and no more", "path": None}], "unreadable image"),
    ],
    ids=["int", "empty-cell", "text-file", "garbage-bytes"],
)
def test_cells_that_are_no_image(tmp_path, processor, cell, needle):
    """Cells of any type: a `Json` column (as `datasets` reads a JSONL column of mixed types), or every row's
    image embedded as {bytes, path} for the garbage bytes (bytes do not go into JSON)."""
    from datasets import Features, Json, Value

    rows = pair_rows(tmp_path)
    (tmp_path / "img" / "text.png").write_text("this is no image")
    features = Features({"images": Json(), **{c: Value("string") for c in ("prompt", "chosen", "rejected")}})
    if isinstance(cell[0], dict) and cell[0]["bytes"]:
        for r in rows:
            r["images"] = [{"bytes": (tmp_path / r["images"][0]).read_bytes(), "path": None}]
        features = None
    rows[BAD]["images"] = cell
    table = Dataset.from_list(rows, features=features)
    with pytest.raises(RecipeError, match="^" + re.escape(f"train row {BAD}, column 'images': {needle}")):
        PreferencePairs(table, processor, DataConfig(), retrieved=False, root=tmp_path)
    kept = PreferencePairs(table, processor, DataConfig(skip_bad_rows=True), retrieved=False, root=tmp_path)
    assert kept.skipped == 1 and BAD not in [r["row"] for r in kept.rows] and len(kept) == N - 1


def test_decoded_images_are_not_kept(tmp_path, processor):
    rows = pair_rows(tmp_path)
    pairs = PreferencePairs(Dataset.from_list(rows), processor, DataConfig(), retrieved=False, root=tmp_path)
    assert not [v for r in pairs.rows for v in r.values() if isinstance(v, Image.Image)]
    image = pairs[0]["image"]
    assert image.tobytes() == Image.open(tmp_path / "img" / "0.png").convert("RGB").tobytes()
    alive = weakref.ref(image)
    del image
    gc.collect()
    assert alive() is None, "the dataset still holds the decoded image"


def caption_folder(tmp_path: Path) -> Path:
    """A local caption dataset: train.jsonl (row BAD's image file holds no image) and val.jsonl."""
    data = tmp_path / "captions"
    (data / "img").mkdir(parents=True)
    for split, n in (("train", 12), ("val", 4)):
        rows = []
        for i in range(n):
            item = make_item(SHAPES, split, i)
            item.image.save(data / "img" / f"{split}-{i}.png")
            rows.append({"image": f"img/{split}-{i}.png", "captions": item.captions})
        write_jsonl(data / f"{split}.jsonl", rows)
    (data / "img" / f"train-{BAD}.png").write_bytes(b"\x89PNG\r\n\x1a\n but truncated")
    return data


@pytest.mark.e2e
@pytest.mark.slow
def test_caption_data_bad_row(tmp_path):
    data = caption_folder(tmp_path)
    args = ("data.source=local", f"data.path={data}", "trainer.eval_size=4")
    err = one_line_error(train(tmp_path, XE, *args), str(data / "train.jsonl"), f"row {BAD}, column 'image'")
    assert "unreadable image" in err
    proc = train(tmp_path, XE, *args, "data.skip_bad_rows=true")
    ran_one_step(proc, tmp_path, "skipped 1 bad caption rows of 12: unreadable image: 1")


def test_caption_data_non_utf8_and_empty_captions(tmp_path, processor):
    from rlalign.data.captions import CaptionPairs, load_rows

    data = caption_folder(tmp_path)
    (data / "img" / f"train-{BAD}.png").unlink()
    make_item(SHAPES, "train", BAD).image.save(data / "img" / f"train-{BAD}.png")
    lines = (data / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[BAD] = lines[BAD].replace(b'"captions": ["', b'"captions": ["\xff', 1)
    lines[5] = json.dumps({"image": "img/train-5.png", "captions": []}).encode() + b"\n"
    (data / "train.jsonl").write_bytes(b"".join(lines))
    cfg = {"source": "local", "path": str(data)}
    with pytest.raises(RecipeError, match=rf"train.jsonl row {BAD}, column 'captions': non-UTF-8 text"):
        load_rows(DataConfig(**cfg), "train")
    rows = load_rows(DataConfig(**cfg, skip_bad_rows=True), "train")
    assert rows.skipped == 2 and rows.kept == [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]
    pairs = CaptionPairs(rows)
    assert pairs[0]["response"] == make_item(SHAPES, "train", 0).captions[0]


def test_corrupt_pixels_behind_a_good_header(tmp_path):
    """Without skip_bad_rows only headers are read up front: the row fails when its batch reads it, with the
    same named error; with skip_bad_rows the pixels are decoded up front and the row is skipped."""
    from rlalign.data.captions import CaptionPairs, load_rows

    data = caption_folder(tmp_path)
    (data / "img" / f"train-{BAD}.png").write_bytes(png_header(48, 48))
    cfg = {"source": "local", "path": str(data)}
    rows = load_rows(DataConfig(**cfg), "train")
    assert rows.skipped == 0 and len(rows) == 12
    pairs = CaptionPairs(rows)
    first = next(k for k, (i, _) in enumerate(pairs.index) if i == BAD)
    pairs[first - 1]  # the row before reads
    with pytest.raises(
        RecipeError,
        match=rf"train.jsonl row {BAD}, column 'image': unreadable image \(image file is truncated",
    ):
        pairs[first]
    kept = load_rows(DataConfig(**cfg, skip_bad_rows=True), "train")
    assert kept.skipped == 1 and BAD not in kept.kept


def test_jsonl_that_is_not_json_names_the_row(tmp_path):
    from rlalign.data.preference import load_preferences

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(tmp_path))
    lines = path.read_text().splitlines()
    broken = lines[3].replace(', "prompt"', ' "prompt"', 1)  # a missing comma
    assert broken != lines[3]
    path.write_text("\n\n".join(["", *lines[:3], broken, *lines[4:]]))  # blank lines are not rows
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: row 3: not valid JSON"):
        load_preferences(DataConfig(pairs_path=str(path)), None, retrieved=False)
