"""The shapes world: deterministic, >= 5 distinct captions, ground truth that matches the pixels."""

from __future__ import annotations

import datasets

from rlalign.config.schema import DataConfig
from rlalign.data.captions import load_split
from rlalign.evaluation.captions import grounding
from rlalign.shapes import COLORS, POSITIONS, ShapesConfig, make_item, mentioned, mentioned_objects


def test_items_are_deterministic_and_splits_differ():
    cfg = ShapesConfig(seed=3)
    a, b = make_item(cfg, "train", 7), make_item(cfg, "train", 7)
    assert a.captions == b.captions and a.objects == b.objects and a.image.tobytes() == b.image.tobytes()
    assert make_item(cfg, "val", 7).image.tobytes() != a.image.tobytes()
    assert make_item(ShapesConfig(seed=4), "train", 7).image.tobytes() != a.image.tobytes()


def test_captions_and_ground_truth():
    cfg = ShapesConfig()
    counts = set()
    for i in range(300):
        item = make_item(cfg, "train", i)
        counts.add(len(item.objects))
        assert len(set(item.captions)) == len(item.captions) >= 5
        cells = [o.position for o in item.objects]
        assert len(cells) == len(set(cells)) and set(cells) <= set(POSITIONS)
        truth_shapes = {o.shape for o in item.objects}
        truth_colors = {o.color for o in item.objects}
        for caption in item.captions:
            shapes, colors = mentioned(caption)
            assert shapes == truth_shapes and colors == truth_colors, caption  # references never hallucinate
        for o in item.objects:  # the centre pixel of each object has its colour
            x0, y0, x1, y1 = o.box
            assert item.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLORS[o.color]
    assert counts == {1, 2, 3}


def test_served_as_hf_datasets():
    ds = load_split(DataConfig(train_size=12), "train")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 12
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[5]
    item = make_item(ShapesConfig(), "train", 5)
    assert row["image_id"] == item.image_id and row["captions"] == item.captions
    assert [o["shape"] for o in row["objects"]] == [o.shape for o in item.objects]
    assert row["image"].tobytes() == item.image.tobytes()


def test_grounding_metrics_hand_computed():
    objects = [[{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}]]
    m = grounding(["a red circle and a green box and a blue disc"], objects)
    # mentioned shapes {circle, square}, colours {red, green, blue}: 1 of 5 mentions absent (green)
    assert m["hallucination_rate"] == 1 / 5
    assert m["shape_precision"] == 1.0 and m["shape_recall"] == 1.0
    # pairs (red, circle) yes, (green, square) no, (blue, circle) no
    assert m["object_precision"] == 1 / 3


def test_mentioned_objects_reads_positions_longest_first():
    text = "a red circle at the top left, a blue box in the middle and a green diamond"
    assert mentioned_objects(text) == {
        ("red", "circle", "top left"),
        ("blue", "square", "center"),
        ("green", "diamond", None),
    }
    for i in range(50):  # every reference caption names exactly the image's objects
        item = make_item(ShapesConfig(), "val", i)
        truth = {(o.color, o.shape, o.position) for o in item.objects}
        for caption in item.captions:
            found = mentioned_objects(caption)
            assert {(c, s) for c, s, _ in found} == {(c, s) for c, s, _ in truth}
            assert all(p is None or (c, s, p) in truth for c, s, p in found), caption
