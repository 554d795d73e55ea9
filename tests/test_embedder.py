"""Image embedder: unit vectors from the vision tower, a fingerprint per encoder, an on-disk cache that
a second build of the same pool never re-embeds, and the demo recipe's index reaching recall@10 >= 0.95
on real (shapes, vision-tower) embeddings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ROOT

from rlalign.config.pairs import EmbedderConfig
from rlalign.config.schema import ModelConfig, TinyModelConfig
from rlalign.data.captions import shapes_dataset
from rlalign.models.builder import load_base
from rlalign.recipe import load_recipe
from rlalign.retrieval.embedder import ImageEmbedder
from rlalign.retrieval.index import IndexConfig, VectorIndex, recall_at_k
from rlalign.shapes import ShapesConfig

TINY = ModelConfig(tiny=TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400))


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_base(TINY)


@pytest.fixture(scope="module")
def pool():
    return shapes_dataset(ShapesConfig(), "train", 48)["image"]


def test_unit_vectors_batched_and_order_free(tiny, pool):
    a = ImageEmbedder(*tiny, EmbedderConfig(cache_dir=None, batch_size=7)).embed(pool)
    b = ImageEmbedder(*tiny, EmbedderConfig(cache_dir=None, batch_size=48)).embed(pool[::-1])
    assert a.shape == (48, 32) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b[::-1], atol=1e-5)
    assert not np.allclose(a[0], a[1])


def test_second_build_embeds_nothing(tiny, pool, tmp_path):
    first = ImageEmbedder(*tiny, EmbedderConfig(cache_dir=str(tmp_path)))
    v1 = first.embed(pool[:32])
    v1b = first.embed(pool)  # 16 new ones only
    assert first.embedded == 48 and first.cache_hits == 32
    second = ImageEmbedder(*tiny, EmbedderConfig(cache_dir=str(tmp_path)))  # a new process would do the same
    v2 = second.embed(pool)
    assert second.embedded == 0 and second.cache_hits == 48
    np.testing.assert_array_equal(v2[:32], v1)
    np.testing.assert_array_equal(v2, v1b)
    files = list((tmp_path / first.fingerprint[:24]).iterdir())
    assert files and all(f.suffix == ".npz" and not f.name.startswith(".") for f in files)  # no temp left
    for f in files:
        with np.load(f, allow_pickle=False) as data:
            assert data["keys"].dtype.kind == "S" and data["vectors"].dtype == np.float32


def test_fingerprint_tracks_weights_and_pooling(tiny, tmp_path, pool):
    model, processor = tiny
    base = ImageEmbedder(model, processor, EmbedderConfig(cache_dir=str(tmp_path)))
    assert ImageEmbedder(model, processor, EmbedderConfig(cache_dir=None)).fingerprint == base.fingerprint
    assert ImageEmbedder(model, processor, EmbedderConfig(pooling="cls")).fingerprint != base.fingerprint
    base.embed(pool[:4])
    other, _ = load_base(
        ModelConfig(tiny=TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400, init_seed=1))
    )
    changed = ImageEmbedder(other, processor, EmbedderConfig(cache_dir=str(tmp_path)))
    assert changed.fingerprint != base.fingerprint
    changed.embed(pool[:4])
    assert changed.embedded == 4  # another encoder never reads this one's vectors


def test_demo_index_choice_recall_on_shapes_embeddings():
    """The demo recipe's index (HNSW) against exact search on 2,000 shapes images embedded by a
    (random-init, demo-sized) vision tower, queries = 200 held-out images."""
    recipe = load_recipe(ROOT / "recipes/demo/shapes-pairs.yaml", ["model.name_or_path=builtin:tiny-llava"])
    model, processor = load_base(recipe.model, recipe.data)
    embed = ImageEmbedder(model, processor, EmbedderConfig(cache_dir=None, batch_size=128))
    vectors = embed.embed(shapes_dataset(ShapesConfig(), "train", 2000)["image"])
    queries = embed.embed(shapes_dataset(ShapesConfig(), "val", 200)["image"])
    ids = np.arange(len(vectors))
    approx = VectorIndex.build(vectors, ids, dataclasses.replace(recipe.pairs.index, device="cpu"))
    exact = VectorIndex.build(vectors, ids, IndexConfig(kind="flat", device="cpu"))
    recall = recall_at_k(approx.search(queries, 10)[1], exact.search(queries, 10)[1])
    assert recall >= 0.95, recall
