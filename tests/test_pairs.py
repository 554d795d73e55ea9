"""RE-ALIGN pair builder: masking, constrained refill, tf-idf similarity, and `rlalign pairs build`
killed mid-run (SIGKILL) then restarted giving the same dataset as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import datasets
import pytest
import torch
from conftest import BIN, ROOT, TINY, free_port, make_env, rlalign, run

from rlalign.config import load_recipe
from rlalign.config.schema import ModelConfig, TinyModelConfig
from rlalign.data.shapes import ShapesConfig, make_item
from rlalign.models.builder import load_base
from rlalign.retrieval.pair_report import pair_stats, render_pairs
from rlalign.retrieval.pairs import (
    Slot,
    TfidfSentences,
    build_pairs,
    mask_template,
    refill,
    shapes_vocabulary,
    template_string,
)

VOCAB = shapes_vocabulary()


def test_mask_template_shapes_words_and_phrases():
    t = mask_template("a blue triangle in the center, a green disc in the upper left corner", VOCAB)
    assert template_string(t) == "a [color] [shape] [position], a [color] [shape] [position]"
    slots = [s for s in t if isinstance(s, Slot)]
    assert [s.original for s in slots] == [
        "blue",
        "triangle",
        "in the center,",
        "green",
        "disc",
        "in the upper left corner",
    ]
    assert mask_template("two shapes : nothing here", VOCAB) == ["two", "shapes", ":", "nothing", "here"]
    custom = mask_template("A dog on the sofa", {"object": ["dog", "cat", "sofa"], "relation": ["on the"]})
    assert template_string(custom) == "A [object] [relation] [object]"


def test_tfidf_cosine():
    tf = TfidfSentences(["a red circle at the top", "a blue square on the left", "a red square"], max_n=2)
    assert tf.cosine("a red circle", "a red circle") == pytest.approx(1.0)
    assert tf.cosine("a red circle at the top", "a blue square at the top") < 0.95
    assert (
        tf.cosine("a red circle", "a red circle")
        > tf.cosine("a red circle", "a red square")
        > tf.cosine("a red circle", "blue")
    )


def test_refill_keeps_literals_and_uses_allowed_words():
    torch.set_num_threads(1)
    model, processor = load_base(
        ModelConfig(tiny=TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400))
    )
    model.eval()
    images = [make_item(ShapesConfig(), "train", i).image for i in range(2)]
    templates = [
        mask_template("a red circle in the center, and a blue box", VOCAB),
        mask_template("a green diamond", VOCAB),
    ]
    out = refill(model, processor, images, "", templates, VOCAB)
    assert out == refill(model, processor, images, "", templates, VOCAB)  # deterministic
    assert (
        out[1] == refill(model, processor, images[1:], "", templates[1:], VOCAB)[0]
    )  # batching changes nothing
    for text, template in zip(out, templates):
        assert template_string(mask_template(text, VOCAB)) == template_string(template)


def _args(out, cache):
    return [TINY, "trainer.output_dir=unused", f"pairs.output_dir={out}", "pairs.pool_size=32", "pairs.shard_size=4",
            "pairs.top_k=3", f"pairs.embedder.cache_dir={cache}"]  # fmt: skip


def _rows(path):
    ds = datasets.Dataset.from_parquet(str(path))
    return len(ds), ds.remove_columns(["images", "retrieved_images"]).to_list(), ds


@pytest.mark.e2e
def test_killed_and_restarted_equals_uninterrupted(tmp_path):
    env = make_env()
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    rlalign("pairs", "build", *_args(full, cache), env=env)
    n_full, rows_full, ds_full = _rows(full / "pairs.parquet")
    assert n_full >= 24 and json.loads((full / "stats.json").read_text())["pairs"] == n_full

    part = tmp_path / "part"
    proc = subprocess.Popen([str(BIN / "rlalign"), "pairs", "build", *_args(part, cache)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while len(list((part / "shards").glob("shard-*.parquet"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, "pairs build ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((part / "shards").glob("shard-*.parquet"))
    assert 2 <= len(done) < 8 and not (part / "pairs.parquet").exists()
    for f in done:  # every shard file on disk is whole: it reads back with the rows of the full run's shard
        assert len(datasets.Dataset.from_parquet(str(f))) == len(
            datasets.Dataset.from_parquet(str(full / "shards" / f.name))
        )

    rlalign("pairs", "build", *_args(part, cache), env=env)
    n_part, rows_part, ds_part = _rows(part / "pairs.parquet")
    assert n_part == n_full and rows_part == rows_full
    assert [im.tobytes() for im in ds_part[0]["images"] + ds_part[0]["retrieved_images"]] == [
        im.tobytes() for im in ds_full[0]["images"] + ds_full[0]["retrieved_images"]]  # fmt: skip
    assert not list((part / "shards").glob(".*tmp*"))
    assert json.loads((part / "stats.json").read_text())["embedded_this_run"] == 0  # cache from the first run

    stats = pair_stats(ds_full)
    assert stats["pairs"] == n_full and 0.0 <= stats["rejected_hallucinates"] <= 1.0
    png = render_pairs(ds_full, tmp_path / "pairs.png", n=3)
    assert png.stat().st_size > 1000


def test_resume_in_process_redoes_only_missing_shards(tmp_path):
    """Fast tier: a run whose last shards are missing (and a stale temp file left behind) is completed
    by a rerun that redoes only those shards and ends with the same dataset."""
    torch.set_num_threads(1)
    recipe = load_recipe(
        ROOT / TINY, _args(tmp_path / "run", tmp_path / "cache")[1:] + ["pairs.pool_size=16"]
    )
    path = build_pairs(recipe)
    n, rows, _ = _rows(path)
    shards = tmp_path / "run" / "shards"
    kept = {f.name: f.stat().st_mtime_ns for f in sorted(shards.glob("shard-*.parquet"))[:2]}
    for f in sorted(shards.glob("shard-*.parquet"))[2:]:
        f.unlink()
    (shards / ".shard-00003.tmp-999.parquet").write_bytes(b"half")
    path.unlink()
    assert build_pairs(recipe) == path
    assert _rows(path)[:2] == (n, rows)
    assert {f: (shards / f).stat().st_mtime_ns for f in kept} == kept  # finished shards were not redone
    assert len(list(shards.glob("shard-*.parquet"))) == 4 and not list(shards.glob(".*"))


@pytest.mark.distributed
def test_two_processes_build_the_same_pairs(tmp_path):
    """`accelerate launch` with 2 processes: each rank builds its shards, rank 0 joins them; the
    dataset equals the single-process one."""
    cache = tmp_path / "cache"
    rlalign("pairs", "build", *_args(tmp_path / "one", cache))
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/ddp-8gpu.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "rlalign.cli", "pairs", "build",
           *_args(tmp_path / "two", cache)]  # fmt: skip
    run(cmd)
    n_one, rows_one, _ = _rows(tmp_path / "one" / "pairs.parquet")
    n_two, rows_two, _ = _rows(tmp_path / "two" / "pairs.parquet")
    assert n_two == n_one and rows_two == rows_one
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").glob("shard-*.parquet"))
    assert len(shards) == 8  # 32 images / shards of 4, split over the two ranks
