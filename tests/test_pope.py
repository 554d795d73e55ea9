"""POPE: answer normalisation by POPE's published rules, counts and metrics against hand computations, the
shapes world's POPE splits and their sampling properties, `eval pope` over a tiny model on 1 and 2 ranks."""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, accelerate_cmd, make_env
from PIL import Image

from rlalign.config import RecipeError
from rlalign.config.schema import TinyModelConfig
from rlalign.evaluation.pope import normalize_answer, score
from rlalign.evaluation.runner import load_eval_model, main_eval, shard_bounds
from rlalign.evaluation.shapes_pope import ShapesPopeConfig, sample_questions, write_shapes_pope
from rlalign.shapes import ShapesConfig, make_item


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads under tmp_path, not in HOME."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


# -- normalisation: POPE's evaluate.py keeps the text before the first '.', deletes commas, splits on ' ',
# and says `no` iff a piece is exactly 'No', 'no' or 'not'.
TRICKY = [
    ("Yes", "yes"),
    ("No", "no"),
    ("No.", "no"),
    ("no, there is not.", "no"),
    ("There is no dog in the image.", "no"),
    ("I do not see one", "no"),
    (" no", "no"),  # the leading space gives an empty piece, then 'no'
    ("Yes, no doubt", "no"),  # any piece counts, not only the first
    ("NO", "yes"),  # case matters: only 'No' and 'no'
    ("Not at all", "yes"),  # 'Not' is not 'not'
    ("No!", "yes"),  # the piece is 'No!'
    ("Nope", "yes"),
    ("I don't think so", "yes"),
    ("No,it is not there", "no"),  # comma deleted: 'Noit' ... but 'not' is a piece
    ("No,it is", "yes"),  # comma deleted: 'Noit is'
    ("Yes. No cat.", "yes"),  # only the first sentence counts
    ("3.5 no", "yes"),  # the first '.' ends the first "sentence": '3'
    ("no\nthere is", "yes"),  # split on ' ' only: 'no\nthere'
    ("no\tway", "yes"),
    ("", "yes"),  # an empty answer is a yes
    (".no", "yes"),  # nothing before the first '.'
    ("none", "yes"),
]


@pytest.mark.parametrize(("answer", "expected"), TRICKY)
def test_answers_normalise_as_popes_script_does(answer, expected):
    assert normalize_answer(answer) == expected


# -- a hand-made 12-question file --------------------------------------------------------------------
LABELS = ["yes", "no", "yes", "no", "yes", "no", "yes", "no", "yes", "no", "yes", "yes"]
ANSWERS = [
    "Yes, there is.",  # yes / yes: TP
    "No.",  # no / no: TN
    "There is not.",  # no / yes: FN
    "NO",  # yes (case) / no: FP
    "yes",  # TP
    "no, there is no cat",  # TN
    "I see one. No doubt.",  # yes (first sentence) / yes: TP
    "Nope",  # yes / no: FP
    "no",  # FN
    "There is no such thing",  # TN
    "",  # yes / yes: TP
    "Yes, no",  # no / yes: FN
]
# By hand: TP = 4 (rows 0, 4, 6, 10), FP = 2 (3, 7), TN = 3 (1, 5, 9), FN = 3 (2, 8, 11).
TP, FP, TN, FN = 4, 2, 3, 3


def write_pope_file(path: Path, labels: list[str], images: list[str]) -> None:
    rows = [
        {"question_id": i + 1, "image": im, "text": f"Is there a thing {i} in the image?", "label": lab}
        for i, (lab, im) in enumerate(zip(labels, images))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def expected_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, Fraction]:
    p, r = Fraction(tp, tp + fp), Fraction(tp, tp + fn)
    return {
        "accuracy": Fraction(tp + tn, tp + fp + tn + fn),
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / (p + r),
        "yes_ratio": Fraction(tp + fp, tp + fp + tn + fn),
    }


def test_eval_pope_on_hand_made_file_gives_hand_counts(tmp_path):
    questions = tmp_path / "coco_pope_random.json"  # POPE's own name: JSON lines in a .json file
    write_pope_file(questions, LABELS, [f"COCO_val2014_{i:012d}.jpg" for i in range(12)])
    answers = tmp_path / "answers.jsonl"  # POPE's answer format: one {"answer": ...} per question, in order
    answers.write_text("".join(json.dumps({"question": "q", "answer": a}) + "\n" for a in ANSWERS))
    out = tmp_path / "out"
    assert main_eval(["pope", str(questions), "--predictions", str(answers), "--out", str(out)]) == 0
    got = json.loads((out / "pope.json").read_text())["splits"]["random"]
    assert (got["tp"], got["fp"], got["tn"], got["fn"], got["n"]) == (TP, FP, TN, FN, 12)
    for key, value in expected_metrics(TP, FP, TN, FN).items():
        assert got[key] == pytest.approx(float(value), rel=1e-15, abs=0), key
    assert got["accuracy"] == 7 / 12 and got["precision"] == 4 / 6 and got["recall"] == 4 / 7
    table = (out / "pope.md").read_text()
    assert "| random | 0.5833 | 0.6667 | 0.5714 | 0.6154 | 0.5000 | 12 | 4 | 2 | 3 | 3 |" in table
    preds = [json.loads(x) for x in (out / "pope-random-predictions.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in preds] == ANSWERS and [p["label"] for p in preds] == LABELS


def test_answers_matched_by_question_id_not_order(tmp_path):
    questions = tmp_path / "my_pope_popular.jsonl"
    write_pope_file(questions, LABELS, ["a.jpg"] * 12)
    rows = [{"question_id": i + 1, "text": a} for i, a in enumerate(ANSWERS)]  # LLaVA's answer format
    random.Random(0).shuffle(rows)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main_eval(["pope", str(questions), "--predictions", str(answers), "--out", str(tmp_path / "out")])
    got = json.loads((tmp_path / "out" / "pope.json").read_text())["splits"]["popular"]
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (TP, FP, TN, FN)


def test_zero_denominators_give_zero_not_an_error():
    # every answer "no": no predicted positives, so precision (and F1) are 0/0 in POPE's script
    m = score(["no"] * 4, ["yes", "no", "yes", "no"]).metrics()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 2, 2)
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.5, 0.0)


def test_bad_label_names_file_row_and_column_and_keeps_earlier_results(tmp_path):
    questions = tmp_path / "coco_pope_adversarial.json"
    write_pope_file(questions, ["yes", "no", "yes", "maybe"], ["a.jpg"] * 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pope.json").write_text("earlier")
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"answer": "yes"}\n' * 4)
    with pytest.raises(
        RecipeError, match=rf"{questions} row 3, column 'label': expected 'yes' or 'no', got 'maybe'"
    ):
        main_eval(["pope", str(questions), "--predictions", str(answers), "--out", str(out)])
    assert (out / "pope.json").read_text() == "earlier"


def test_missing_image_names_file_row_and_column(tmp_path, tiny_model):
    questions = tmp_path / "coco_pope_random.json"
    Image.new("RGB", (48, 48)).save(tmp_path / "there.png")
    write_pope_file(questions, ["yes", "no"], ["there.png", "gone.png"])
    with pytest.raises(RecipeError, match=rf"{questions} row 1, column 'image': missing image file"):
        main_eval(["pope", str(tiny_model), str(questions), "--out", str(tmp_path / "out")])


# -- shapes-world POPE ---------------------------------------------------------------------------------
def test_popular_and_adversarial_pick_by_hand():
    images = [["cat", "dog"], ["cat", "dog"], ["cat", "bird"], ["dog", "fish"], ["ant"]]
    # images holding each: cat 3, dog 3, bird 1, fish 1, ant 1 -> popular order cat, dog, ant, bird, fish
    # co-occurrence: cat {dog 2, bird 1}; dog {cat 2, fish 1}; bird {cat 1}; fish {dog 1}; ant {}
    rngs = [random.Random(i) for i in range(len(images))]
    popular = sample_questions(images, "popular", rngs)
    assert popular[0] == [("cat", "yes"), ("ant", "no"), ("dog", "yes"), ("bird", "no")]
    assert popular[2] == [("cat", "yes"), ("dog", "no"), ("bird", "yes"), ("ant", "no")]
    assert popular[4] == [("ant", "yes"), ("cat", "no")]
    adversarial = sample_questions(images, "adversarial", [random.Random(i) for i in range(len(images))])
    assert adversarial[0] == [("cat", "yes"), ("bird", "no"), ("dog", "yes"), ("fish", "no")]  # dog, cat held
    assert adversarial[2][:3] == [("cat", "yes"), ("dog", "no"), ("bird", "yes")]
    assert adversarial[3][:3] == [("dog", "yes"), ("cat", "no"), ("fish", "yes")]
    # what bird (cat) and fish (dog) co-occur with is held or asked already: a random absent object
    assert adversarial[2][3] in {("ant", "no"), ("fish", "no")} and adversarial[3][3] in {
        ("ant", "no"),
        ("bird", "no"),
    }
    assert adversarial[4][1] in {("bird", "no"), ("cat", "no"), ("dog", "no"), ("fish", "no")}  # ant: none
    again = sample_questions(images, "adversarial", [random.Random(i) for i in range(len(images))])
    assert again == adversarial


SHAPES_POPE = ShapesPopeConfig(images=40)


@pytest.fixture(scope="module")
def shapes_pope(tmp_path_factory) -> dict[str, Path]:
    return write_shapes_pope(tmp_path_factory.mktemp("shapes-pope"), SHAPES_POPE)


def questions_by_image(path: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        assert row["text"] == f"Is there a {row['object']} in the image?"
        out.setdefault(row["image"], []).append((row["object"], row["label"]))
    return out


def test_shapes_pope_splits_have_the_sampling_properties(shapes_pope):
    items = [make_item(SHAPES_POPE.shapes, "test", i, draw=False) for i in range(SHAPES_POPE.images)]
    truth = [list(dict.fromkeys(f"{o.color} {o.shape}" for o in it.objects)) for it in items]
    freq = Counter(obj for objs in truth for obj in objs)
    co = Counter((a, b) for objs in truth for a in objs for b in objs if a != b)
    mean_freq, mean_co = {}, {}
    for strategy, path in shapes_pope.items():
        asked = questions_by_image(path)
        assert list(asked) == [f"images/{it.image_id}.png" for it in items]
        freqs, cos = [], []
        for objs, qs in zip(truth, asked.values()):
            assert [o for o, lab in qs if lab == "yes"] == objs  # every object of the image, in order
            assert [lab for _, lab in qs] == ["yes", "no"] * len(objs)
            assert len({o for o, _ in qs}) == len(qs)  # nothing asked twice about one image
            for k in range(0, len(qs), 2):
                pos, neg = qs[k][0], qs[k + 1][0]
                assert neg not in objs
                allowed = [o for o in freq if o not in objs and o not in {q for q, _ in qs[: k + 1]}]
                if strategy == "popular":  # the most frequent absent object not asked yet
                    assert freq[neg] == max(freq[o] for o in allowed)
                if strategy == "adversarial":  # the absent object co-occurring most with the positive
                    assert co[pos, neg] == max(co[pos, o] for o in allowed)
                freqs.append(freq[neg])
                cos.append(co[pos, neg])
        mean_freq[strategy], mean_co[strategy] = np.mean(freqs), np.mean(cos)
    assert mean_freq["popular"] > mean_freq["random"] and mean_co["adversarial"] > mean_co["random"]


def test_shapes_pope_images_are_the_shapes_images(shapes_pope):
    folder = shapes_pope["random"].parent
    for i in (0, SHAPES_POPE.images - 1):
        item = make_item(SHAPES_POPE.shapes, "test", i)
        on_disk = np.asarray(Image.open(folder / "images" / f"{item.image_id}.png"))
        assert np.array_equal(on_disk, np.asarray(item.image))


# -- the model path: tiny model, 1 and 2 ranks -------------------------------------------------------------
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


def test_eval_pope_on_shapes_with_a_model(tmp_path, tiny_model, shapes_pope):
    from rlalign.evaluation.captions import generate_captions

    out = tmp_path / "out"
    files = [str(shapes_pope[s]) for s in ("random", "adversarial")]
    main_eval(
        [
            "pope",
            str(tiny_model),
            *files,
            "--out",
            str(out),
            "--limit",
            "10",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "5",
        ]
    )
    result = json.loads((out / "pope.json").read_text())
    assert list(result["splits"]) == ["random", "adversarial"] and result["world_size"] == 1
    model, processor = load_eval_model(str(tiny_model))
    for split in ("random", "adversarial"):
        preds = [json.loads(x) for x in (out / f"pope-{split}-predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 10
        # one question at a time through the caption generator: the same greedy answers
        for p in preds[:4]:
            image = Image.open(shapes_pope[split].parent / p["image"]).convert("RGB")
            expect = generate_captions(model, processor, [image], p["question"], max_new_tokens=5)
            assert p["answer"] == expect[0]
        m = score([p["answer"] for p in preds], [p["label"] for p in preds]).metrics()
        assert result["splits"][split] == {"file": str(shapes_pope[split]), **m}
    # questions of different lengths in one batch (left padding) get the answers they get alone
    mixed = tmp_path / "mixed_pope.jsonl"
    texts = [
        "Is there a red circle?",
        "Is there a blue diamond in the top left corner of the image, or not?",
        "Circle?",
        "Is there a yellow triangle in the image?",
    ]
    image = shapes_pope["random"].parent / "images" / "shapes-test-000000.png"
    write_pope_file(mixed, ["yes", "no", "yes", "no"], [str(image)] * 4)
    rows = [json.loads(x) | {"text": t} for x, t in zip(mixed.read_text().splitlines(), texts)]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main_eval(
        ["pope", str(tiny_model), str(mixed), "--out", str(tmp_path / "mixed"), "--max-new-tokens", "5"]
    )
    got = [
        json.loads(x)["answer"]
        for x in (tmp_path / "mixed" / "pope-mixed_pope-predictions.jsonl").read_text().splitlines()
    ]
    pil = Image.open(image).convert("RGB")
    assert got == [generate_captions(model, processor, [pil], t, max_new_tokens=5)[0] for t in texts]
    # the written answers score the same through the predictions path
    main_eval(
        [
            "pope",
            *files,
            "--predictions",
            str(out / "pope-random-predictions.jsonl"),
            str(out / "pope-adversarial-predictions.jsonl"),
            "--out",
            str(tmp_path / "again"),
            "--limit",
            "10",
        ]
    )
    again = json.loads((tmp_path / "again" / "pope.json").read_text())
    assert again["splits"] == result["splits"]


def test_eval_pope_shapes_writes_the_splits_then_reads_them_as_pope_files(tmp_path, tiny_model):
    out = tmp_path / "out"
    main_eval(
        [
            "pope",
            str(tiny_model),
            "shapes",
            "--shapes-images",
            "4",
            "--out",
            str(out),
            "--max-new-tokens",
            "3",
        ]
    )
    written = write_shapes_pope(tmp_path / "ref", ShapesPopeConfig(images=4))
    result = json.loads((out / "pope.json").read_text())
    assert list(result["splits"]) == ["random", "popular", "adversarial"]
    for split, path in written.items():
        assert (out / "shapes-pope" / path.name).read_text() == path.read_text()
        assert result["splits"][split]["n"] == len(path.read_text().splitlines())


def test_shards_cover_every_item_once_in_order():
    for n in range(0, 23):
        for world in range(1, 6):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_single_rank_answers(tmp_path, tiny_model, shapes_pope):
    args = [
        str(tiny_model),
        str(shapes_pope["popular"]),
        "--limit",
        "11",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "5",
    ]
    main_eval(["pope", *args, "--out", str(tmp_path / "one")])
    cmd = [
        *accelerate_cmd("ddp-8gpu.yaml", 2),
        "-m",
        "rlalign.evaluation.runner",
        "pope",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=make_env(HF_DATASETS_CACHE=str(tmp_path / "hf")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "pope.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["splits"] == two["splits"]
    preds = "pope-popular-predictions.jsonl"
    assert (tmp_path / "one" / preds).read_text() == (tmp_path / "two" / preds).read_text()


def test_training_checkpoint_loads_with_its_weights(tmp_path):
    from rlalign.config.loader import dump_recipe
    from rlalign.models.builder import build_policy
    from rlalign.recipe import load_recipe
    from rlalign.trainer.checkpoint import save_tensors

    recipe = load_recipe("recipes/test/tiny-xe.yaml")
    model, _ = build_policy(recipe.model, recipe.data)
    state = {k: v + 0.5 if k.endswith("lm_head.weight") else v for k, v in model.state_dict().items()}
    save_tensors(state, tmp_path / "model.safetensors")
    (tmp_path / "recipe.yaml").write_text(dump_recipe(recipe))
    with pytest.raises(RecipeError, match="not a model folder"):
        load_eval_model(str(tmp_path))
    (tmp_path / "COMPLETE").write_text("{}")
    loaded, _ = load_eval_model(str(tmp_path))
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
