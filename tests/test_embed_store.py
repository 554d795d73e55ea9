"""Embedding the pool at scale (`rlalign.retrieval.embed_store`): shards keyed by image hash and encoder
fingerprint, equal to one forward of everything; the same vectors from 1 and 2 processes; a killed run
that resumes without re-embedding its finished shards; a damaged shard embedded again."""

from __future__ import annotations

import logging
import subprocess
import time

import numpy as np
import psutil
import pytest
import torch
from conftest import BIN, ROOT, TINY, accelerate_cmd, make_env, rlalign, run

from rlalign.config.pairs import EmbedderConfig
from rlalign.config.schema import ModelConfig, TinyModelConfig
from rlalign.data.captions import shapes_dataset
from rlalign.models.builder import load_base
from rlalign.pairs.builder import load_pool
from rlalign.recipe import load_recipe
from rlalign.retrieval.embed_store import Column, embed_pool
from rlalign.retrieval.embedder import ImageEmbedder, build_embedder, image_key, keys_digest
from rlalign.shapes import ShapesConfig


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_base(ModelConfig(tiny=TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400)))


def _shard_files(folder) -> dict[str, np.ndarray]:
    """Finished shard files (never a killed writer's temporary) -> their vectors."""
    out = {}
    for f in sorted(folder.rglob("*.npz")):
        if not f.name.startswith("."):
            with np.load(f, allow_pickle=False) as data:
                out[f.name] = data["vectors"]
    return out


def test_shards_equal_one_forward_and_a_damaged_one_is_embedded_again(tiny, tmp_path, caplog):
    """40 images in shards of 16 (16, 16, 8): the vectors equal one forward of all 40 (batch 40) to 1e-6,
    each shard is one cache file named by its images' keys; a second run embeds nothing but the shard
    whose file was cut short; the pair builder's `embed` reads the same files."""
    pool = shapes_dataset(ShapesConfig(), "train", 40)["image"]
    cfg = EmbedderConfig(cache_dir=str(tmp_path), batch_size=8, shard_size=16)
    first = ImageEmbedder(*tiny, cfg)
    vectors, report = embed_pool(first, pool)
    reference = ImageEmbedder(*tiny, EmbedderConfig(cache_dir=None, batch_size=40)).forward(pool)
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    assert report.embedded_shards == [0, 1, 2] and report.embedded_images == 40 and first.embedded == 40
    names = [
        f"{keys_digest([image_key(im) for im in pool[a:b]])}.npz" for a, b in ((0, 16), (16, 32), (32, 40))
    ]
    assert sorted(_shard_files(tmp_path)) == sorted(names)

    damaged = first.cache_path / names[1]
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])
    assert damaged.stat().st_size == len(whole) // 2
    again = ImageEmbedder(*tiny, cfg)
    with caplog.at_level(logging.WARNING, logger="rlalign.retrieval.embed_store"):
        vectors2, report2 = embed_pool(again, pool)
    assert report2.embedded_shards == [1] and again.embedded == 16
    assert [r.getMessage().split(" unreadable")[0] for r in caplog.records] == [f"embedding: {damaged}"]
    np.testing.assert_array_equal(vectors2, vectors)

    reader = ImageEmbedder(*tiny, cfg)
    np.testing.assert_array_equal(reader.embed(pool[5:9]), vectors[5:9])
    assert reader.embedded == 0 and reader.cache_hits == 4


def _index_args(cache, out, *extra: str) -> list[str]:
    return [
        "index",
        "build",
        TINY,
        "trainer.output_dir=unused",
        f"pairs.embedder.cache_dir={cache}",
        *extra,
        "--out",
        str(out),
    ]


@pytest.mark.distributed
def test_two_processes_embed_what_one_does(tmp_path):
    """48 images in shards of 8 under `accelerate launch` with 2 processes: each rank embeds 3 of the 6
    shards, and the files (names and vectors, to 1e-6) are those of one process."""
    sizes = ["pairs.pool_size=48", "pairs.embedder.shard_size=8"]
    one = rlalign(*_index_args(tmp_path / "one", tmp_path / "index-one", *sizes))
    two = run(
        [
            *accelerate_cmd("ddp-8gpu.yaml", 2, "-m", "rlalign.cli"),
            *_index_args(tmp_path / "two", tmp_path / "index-two", *sizes),
        ]
    )
    assert "embedded 48 " in one.stdout and "in 6 of 6 shards" in one.stdout
    assert "embedded 24 " in two.stdout and "in 3 of 6 shards" in two.stdout  # rank 0's share
    files_one, files_two = _shard_files(tmp_path / "one"), _shard_files(tmp_path / "two")
    assert sorted(files_one) == sorted(files_two) and len(files_one) == 6
    for name, vectors in files_one.items():
        np.testing.assert_allclose(files_two[name], vectors, atol=1e-6)


def test_killed_embedding_resumes_without_re_embedding_finished_shards(tiny, tmp_path):
    """`rlalign index build` over 1024 images in shards of 32, SIGKILLed once two shard files exist: the
    process is dead, no index was written; the rerun embeds only the shards that have no file, leaves the
    finished files untouched, and gives the vectors of an uninterrupted forward (1e-6)."""
    cache, n, size = tmp_path / "cache", 1024, 32
    overrides = [f"data.train_size={n}", f"pairs.embedder.shard_size={size}"]
    cmd = [str(BIN / "rlalign"), *_index_args(cache, tmp_path / "index", *overrides)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=make_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while len(_shard_files(cache)) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.01)
        psutil.Process(proc.pid).suspend()  # no more shards from here on
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -9 and not psutil.pid_exists(proc.pid)
    done = _shard_files(cache)
    assert 2 <= len(done) < n // size and not (tmp_path / "index" / "meta.json").exists()
    mtimes = {f: f.stat().st_mtime_ns for f in cache.rglob("[!.]*.npz")}

    recipe = load_recipe(ROOT / TINY, [*overrides, f"pairs.embedder.cache_dir={cache}"])
    embedder, _, _ = build_embedder(recipe)
    images = Column(load_pool(recipe), "image")
    vectors, report = embed_pool(embedder, images)
    assert report.embedded_shards == list(range(len(done), n // size))  # one process writes in order
    assert embedder.embedded == report.embedded_images == n - size * len(done)
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes
    assert len(_shard_files(cache)) == n // size
    reference = ImageEmbedder(embedder.tower, embedder.image_processor, EmbedderConfig(cache_dir=None))
    np.testing.assert_allclose(vectors, reference.forward(images[0:n]), atol=1e-6)
