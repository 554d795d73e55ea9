"""CHAIR against hand computations (a synonym file, hand-made captions; the shapes world's exact ground
truth), its input errors, and `eval chair` / `eval captions` over a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rlalign.config import RecipeError
from rlalign.config.schema import DataConfig, TinyModelConfig
from rlalign.evaluation.chair import ObjectVocabulary, chair, shapes_truth, shapes_vocabulary
from rlalign.evaluation.runner import main_eval
from rlalign.shapes import ShapesConfig

SYNONYMS = """person, man, woman, people, baby
dog, puppy
hot dog
cat, kitten
bicycle, bike
dining table, table
laptop, computer, laptop computer
bird, baby bird
"""


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads under tmp_path, not in HOME."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def vocab(tmp_path: Path) -> ObjectVocabulary:
    (tmp_path / "synonyms.txt").write_text(SYNONYMS)
    return ObjectVocabulary.from_file(tmp_path / "synonyms.txt")


def test_mentions_follow_chairs_rules(tmp_path):
    v = vocab(tmp_path)

    def found(caption: str) -> list[tuple[str, str]]:
        return [(m.words, m.obj) for m in v.mentions(caption)]

    assert found("A man eats a hot dog.") == [("man", "person"), ("hot dog", "hot dog")]  # not a dog
    # each mention counts; plurals are made singular
    assert found("Two dogs, a dog and puppies!") == [("dog", "dog"), ("dog", "dog"), ("puppy", "dog")]
    assert found("Kittens on the dining table") == [("kitten", "cat"), ("dining table", "dining table")]
    assert found("people near a table") == [("people", "person"), ("table", "dining table")]
    assert found("An empty street") == []
    # the longest listed phrase wins where a shorter one starts the same way
    assert found("a laptop computer") == [("laptop computer", "laptop")]
    assert found("a baby bird and a baby") == [("baby bird", "bird"), ("baby", "person")]
    assert v.canonical("Bikes") == "bicycle" and v.canonical("car") is None


# Hand computation. Ground truth = the objects column + what the references mention (as CHAIR does).
ROWS = [
    # caption, objects column, references, mentions, hallucinated mentions
    ("A man walks two dogs.", ["man", "dog"], ["a photo"], 2, 0),
    ("A woman eats a hot dog at the table.", ["person", "hot dog"], ["a photo"], 3, 1),  # table
    ("Kittens and puppies.", ["cat"], ["a photo"], 2, 1),  # puppies
    ("A dog chases a dog.", ["cat"], ["a photo"], 2, 2),  # both dogs
    ("A bike on an empty street.", [], ["a bicycle by the road"], 1, 0),  # the bicycle is in a reference
]
# mentions 10, hallucinated 4 -> CHAIR-i = 4/10; captions with one: 3 of 5 -> CHAIR-s = 3/5.
# Without the references' objects the bike is hallucinated too: CHAIR-i = 5/10, CHAIR-s = 4/5.


def chair_data(tmp_path: Path, rows: list) -> tuple[Path, Path]:
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    data, preds = tmp_path / "test.jsonl", tmp_path / "captions.jsonl"
    data.write_text(
        "".join(
            json.dumps({"image": "img.png", "image_id": f"im{i}", "captions": r[2], "objects": r[1]}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    preds.write_text(
        "".join(json.dumps({"image_id": f"im{i}", "caption": r[0]}) + "\n" for i, r in enumerate(rows))
    )
    return data, preds


@pytest.mark.parametrize(
    ("flags", "chair_i", "chair_s", "bad"),
    [([], 4 / 10, 3 / 5, 4), (["--no-caption-objects"], 5 / 10, 4 / 5, 5)],
)
def test_eval_chair_on_hand_made_captions_gives_hand_counts(tmp_path, flags, chair_i, chair_s, bad):
    data, preds = chair_data(tmp_path, ROWS)
    (tmp_path / "synonyms.txt").write_text(SYNONYMS)
    out = tmp_path / "out"
    main_eval(
        [
            "chair",
            str(data),
            "--predictions",
            str(preds),
            "--synonyms",
            str(tmp_path / "synonyms.txt"),
            "--out",
            str(out),
            *flags,
        ]
    )
    got = json.loads((out / "chair.json").read_text())
    assert (got["captions"], got["mentions"], got["hallucinated_mentions"]) == (5, 10, bad)
    assert got["chair_i"] == chair_i and got["chair_s"] == chair_s
    per = [json.loads(x) for x in (out / "chair-predictions.jsonl").read_text().splitlines()]
    assert [len(p["mentions"]) for p in per] == [r[3] for r in ROWS]
    assert [len(p["hallucinated"]) for p in per][:4] == [r[4] for r in ROWS][:4]
    assert per[1]["hallucinated"] == [["table", "dining table"]]
    assert f"| {chair_i:.4f} | {chair_s:.4f} | 5 | 10 | {bad} |" in (out / "chair.md").read_text()


def test_chair_on_shapes_uses_the_exact_ground_truth(tmp_path):
    # shapes test items 0..3 hold: 0 blue diamond, red triangle, yellow triangle;
    # 1 green diamond, red triangle; 2 red diamond, red circle, blue triangle; 3 red circle, yellow triangle
    captions = {
        "shapes-test-000000": "a red triangle in the center and a blue diamond",  # 2 mentions, 0 wrong
        "shapes-test-000001": "a green diamond and a blue triangle",  # blue triangle: 1 of 2 wrong
        "shapes-test-000002": "a red disc and a red box and a square",  # red square, square: 2 of 3 wrong
        "shapes-test-000003": "a yellow triangle , a triangle and a circle",  # 3 mentions, 0 wrong
    }
    preds = tmp_path / "captions.jsonl"
    preds.write_text("".join(json.dumps({"image_id": k, "caption": c}) + "\n" for k, c in captions.items()))
    main_eval(
        ["chair", "shapes", "--limit", "4", "--predictions", str(preds), "--out", str(tmp_path / "out")]
    )
    got = json.loads((tmp_path / "out" / "chair.json").read_text())
    assert (got["mentions"], got["hallucinated_mentions"], got["hallucinated_captions"]) == (10, 3, 2)
    assert got["chair_i"] == 3 / 10 and got["chair_s"] == 2 / 4
    per = [json.loads(x) for x in (tmp_path / "out" / "chair-predictions.jsonl").read_text().splitlines()]
    assert per[2]["hallucinated"] == [["red box", "red square"], ["square", "square"]]
    assert per[2]["objects"] == [
        "blue triangle",
        "circle",
        "diamond",
        "red circle",
        "red diamond",
        "triangle",
    ]


def test_chair_function_counts_repeated_mentions():
    v = shapes_vocabulary()
    truth = shapes_truth([{"color": "red", "shape": "circle"}])
    res = chair(["a blue circle , a blue circle and a red disc", "nothing here"], [truth, truth], v)
    assert (res.mentions, res.hallucinated_mentions, res.hallucinated_captions) == (3, 2, 1)
    assert (res.chair_i, res.chair_s) == (2 / 3, 1 / 2)


def test_chair_input_errors(tmp_path):
    data, preds = chair_data(tmp_path, [("a dog", ["dog", "unicorn"], ["a photo"], 0, 0)])
    (tmp_path / "synonyms.txt").write_text(SYNONYMS)
    out = tmp_path / "out"
    base = ["chair", str(data), "--predictions", str(preds), "--out", str(out)]
    with pytest.raises(
        RecipeError, match=rf"{data} row 0, column 'objects': 'unicorn' is not in the synonym list"
    ):
        main_eval([*base, "--synonyms", str(tmp_path / "synonyms.txt")])
    with pytest.raises(RecipeError, match="--synonyms FILE is needed outside the shapes world"):
        main_eval(base)
    with pytest.raises(FileNotFoundError, match="nope.txt: no such synonym file"):
        main_eval([*base, "--synonyms", str(tmp_path / "nope.txt")])
    (tmp_path / "clash.txt").write_text("dog, puppy\ncat, puppy\n")
    with pytest.raises(RecipeError, match="clash.txt line 2: 'puppy' is already a synonym of 'dog'"):
        main_eval([*base, "--synonyms", str(tmp_path / "clash.txt")])
    chair_data(tmp_path, [("a dog", ["dog"], ["a photo"], 0, 0)])
    preds.write_text(json.dumps({"image_id": "other", "caption": "a dog"}) + "\n")
    with pytest.raises(RecipeError, match=rf"{preds}: no prediction for image_id im0"):
        main_eval([*base, "--synonyms", str(tmp_path / "synonyms.txt")])
    assert not out.exists()


# -- the model path ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from rlalign.models.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny")
    model, processor = build_tiny_llava(
        TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400), ShapesConfig()
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_eval_chair_and_captions_with_a_model(tmp_path, tiny_model):
    from rlalign.data.captions import load_split
    from rlalign.evaluation.captions import caption_metrics, generate_captions, load_model

    for bench in ("chair", "captions"):
        main_eval(
            [
                bench,
                str(tiny_model),
                "shapes",
                "--limit",
                "6",
                "--batch-size",
                "4",
                "--max-new-tokens",
                "8",
                "--out",
                str(tmp_path / bench),
            ]
        )
    ds = load_split(DataConfig(test_size=6), "test")
    model, processor = load_model(tiny_model)
    expect = generate_captions(model, processor, ds["image"], "", max_new_tokens=8, batch_size=1)
    for bench in ("chair", "captions"):
        preds = [
            json.loads(x) for x in (tmp_path / bench / f"{bench}-predictions.jsonl").read_text().splitlines()
        ]
        assert [p["caption"] for p in preds] == expect and [p["image_id"] for p in preds] == ds["image_id"]
    got = json.loads((tmp_path / "chair" / "chair.json").read_text())
    expect_chair = chair(
        expect, [shapes_truth(objs) for objs in ds["objects"]], shapes_vocabulary()
    ).metrics()
    assert {k: got[k] for k in expect_chair} == expect_chair
    got = json.loads((tmp_path / "captions" / "captions.json").read_text())
    ref = caption_metrics(expect, ds["image_id"], ds["captions"])
    assert (got["cider_d"], got["bleu4"], got["n"]) == (ref["cider_d"], ref["bleu4"], 6)
