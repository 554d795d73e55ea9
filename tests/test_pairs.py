"""RE-ALIGN pair builder: masking, constrained refill, tf-idf similarity, the pair report, and
`rlalign pairs build` on two processes. Restarts and faults: tests/test_pairs_faults.py."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY, accelerate_cmd, rlalign, run
from PIL import Image

from rlalign.config.schema import ModelConfig, TinyModelConfig
from rlalign.models.builder import load_base
from rlalign.pairs.builder import (
    Slot,
    TfidfSentences,
    mask_template,
    refill,
    shapes_vocabulary,
    template_string,
)
from rlalign.pairs.report import pair_stats, render_pairs
from rlalign.shapes import ShapesConfig, make_item

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
    return [
        TINY,
        "trainer.output_dir=unused",
        f"pairs.output_dir={out}",
        "pairs.pool_size=32",
        "pairs.shard_size=4",
        "pairs.top_k=3",
        f"pairs.embedder.cache_dir={cache}",
    ]


def _rows(path):
    ds = datasets.Dataset.from_parquet(str(path))
    return len(ds), ds.remove_columns(["images", "retrieved_images"]).to_list(), ds


def _hand_pairs() -> datasets.Dataset:
    """Four pairs whose figures are counted by hand in `test_pair_stats_exact_on_hand_counted_pairs`."""

    def obj(color, shape, position):
        return {"shape": shape, "color": color, "position": position, "box": [0, 0, 1, 1]}

    return datasets.Dataset.from_list(
        [
            {
                "chosen": "a red circle in the top left",
                "rejected": "a blue circle in the top left",
                "objects": [obj("red", "circle", "top left")],
                "similarity": 0.5,
                "text_similarity": 0.5,
                "tries": 1,
            },
            {
                "chosen": "a green square in the center and a red triangle on the right",
                "rejected": "a red square in the center and a green triangle on the right",
                "objects": [obj("green", "square", "center"), obj("red", "triangle", "right")],
                "similarity": 0.75,
                "text_similarity": 0.25,
                "tries": 2,
            },
            {
                "chosen": "a yellow diamond at the bottom",
                "rejected": "a yellow diamond at the top",
                "objects": [obj("yellow", "diamond", "bottom")],
                "similarity": 0.25,
                "text_similarity": 0.5,
                "tries": 1,
            },
            {
                "chosen": "a purple disc on the left",
                "rejected": "a purple disc at the left",
                "objects": [obj("purple", "circle", "left")],
                "similarity": 1.0,
                "text_similarity": 0.75,
                "tries": 3,
            },
        ]
    )


def test_pair_stats_exact_on_hand_counted_pairs():
    """Rejected answers, by hand: row 0 names a colour not in the image (blue); row 1 only misplaces its
    words (red square, green triangle: every word is in the image, no pair is); row 2 puts the diamond at
    the top, not the bottom; row 3 says the same as the chosen. Mentions: 2 + 4 + 2 + 2 = 10 words, of
    which 1 (blue) is absent. Every chosen answer is right."""
    stats = pair_stats(_hand_pairs())
    assert stats == {
        "pairs": 4,
        # absent (colour, shape): row 0's blue circle, row 1's red square and green triangle
        "rejected_absent_object": 2 / 4,
        "chosen_absent_object": 0.0,
        # the same objects as the chosen answer, positions aside: rows 2 and 3
        "rejected_only_positions": 2 / 4,
        "rejected_wrong_object": 3 / 4,
        "chosen_wrong_object": 0.0,
        "rejected_hallucinates": 1 / 4,
        "chosen_hallucinates": 0.0,
        "rejected_hallucination_rate": 1 / 10,
        "chosen_hallucination_rate": 0.0,
        "mean_image_similarity": (0.5 + 0.75 + 0.25 + 1.0) / 4,
        "mean_text_similarity": (0.5 + 0.25 + 0.5 + 0.75) / 4,
        "mean_tries": (1 + 2 + 1 + 3) / 4,
    }


def test_render_pairs_draws_one_row_per_pair(tmp_path):
    """A row of 2.2 in per pair, 11 in wide, at 110 dpi: 1210 x (242 n) pixels."""
    image = Image.new("RGB", (8, 8), "white")
    rows = [
        {
            **row,
            "images": [image],
            "retrieved_images": [image],
            "image_id": f"a{k}",
            "retrieved_id": f"b{k}",
            "mask": "a [color] [shape]",
        }
        for k, row in enumerate(_hand_pairs().to_list())
    ]
    for n in (1, 3):
        with Image.open(render_pairs(rows, tmp_path / f"pairs-{n}.png", n=n)) as png:
            assert png.size == (1210, 242 * n)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_build_the_same_pairs(tmp_path):
    """`accelerate launch` with 2 processes: each rank builds its shards, rank 0 joins them; the
    dataset equals the single-process one."""
    cache = tmp_path / "cache"
    rlalign("pairs", "build", *_args(tmp_path / "one", cache))
    cmd = [
        *accelerate_cmd("ddp-8gpu.yaml", 2),
        "-m",
        "rlalign.cli",
        "pairs",
        "build",
        *_args(tmp_path / "two", cache),
    ]
    run(cmd)
    n_one, rows_one, _ = _rows(tmp_path / "one" / "pairs.parquet")
    n_two, rows_two, _ = _rows(tmp_path / "two" / "pairs.parquet")
    assert n_two == n_one and rows_two == rows_one
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").glob("shard-*.parquet"))
    assert len(shards) == 8  # 32 images / shards of 4, split over the two ranks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_pair_build_runs_on_the_gpu(tmp_path, monkeypatch):
    """With a GPU present the refill model and exact search run there (no recipe key needed), and the
    dataset equals a `pairs.device=cpu` build of the same recipe."""
    from rlalign.pairs import builder
    from rlalign.recipe import load_recipe
    from rlalign.retrieval.index import VectorIndex

    seen = []
    write = builder._write_shard

    def record(b, s):
        seen.append((b.device.type, next(b.model.parameters()).device.type))
        write(b, s)

    placements = []
    load = VectorIndex.load.__func__

    def load_and_record(cls, *args, **kwargs):
        index = load(cls, *args, **kwargs)
        placements.append(index.placement)
        return index

    monkeypatch.setattr(builder, "_write_shard", record)
    monkeypatch.setattr(VectorIndex, "load", classmethod(load_and_record))
    gpu = builder.build_pairs(load_recipe(TINY, _args(tmp_path / "gpu", tmp_path / "cache")[1:]))
    assert seen and set(seen) == {("cuda", "cuda")} and "torch-gpu" in placements
    cpu = builder.build_pairs(
        load_recipe(TINY, [*_args(tmp_path / "cpu", tmp_path / "cache")[1:], "pairs.device=cpu"])
    )
    rows_gpu, rows_cpu = _rows(gpu)[1], _rows(cpu)[1]
    drop = ("similarity", "text_similarity")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_gpu] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows_cpu
    ]
    for key in drop:
        np.testing.assert_allclose([r[key] for r in rows_gpu], [r[key] for r in rows_cpu], atol=1e-4)
