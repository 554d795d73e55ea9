"""The pieces of the RE-ALIGN miniature and the demo's hallucination report, each against a hand count:
the shapes world's yes/no training questions, template collapse (the reward-hacking measure), the sampled
KL to the XE start, embedding centring and retrieval statistics, and the `verified` chosen answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlalign.config import read_recipe
from rlalign.config.schema import ModelConfig, TinyModelConfig
from rlalign.data import DATA_KINDS
from rlalign.data.captions import YesNoQuestions
from rlalign.evaluation.captions import caption_template, template_collapse
from rlalign.evaluation.pope import normalize_answer
from rlalign.evaluation.shapes_pope import question
from rlalign.models.builder import load_base
from rlalign.pairs.builder import center, response_logprobs, retrieval_stats, verified
from rlalign.shapes import OBJECTS, ShapesConfig, make_item, make_yes_no_item

SHAPES = ShapesConfig()


def test_yes_no_questions_are_balanced_true_and_in_popes_template():
    """Even indices ask about an object of the image (yes), odd ones about an object it lacks (no); the text
    is exactly the question `rlalign eval pope` asks on the shapes world."""
    answers = []
    for k in range(40):
        item, text, answer = make_yes_no_item(SHAPES, "train", k, 10)
        assert item.image_id == make_item(SHAPES, "train", k % 10).image_id
        held = {f"{o.color} {o.shape}" for o in item.objects}
        obj = next(o for o in OBJECTS if question(o) == text)
        assert (obj in held) == (answer == "yes"), (text, answer, held)
        assert normalize_answer(answer) == answer
        answers.append(answer)
    assert answers == ["yes", "no"] * 20
    assert make_yes_no_item(SHAPES, "train", 7, 10)[1:] == make_yes_no_item(SHAPES, "train", 7, 10)[1:]


def test_xe_trains_on_the_questions_and_validates_on_captions_only():
    recipe = read_recipe(
        "demo/shapes-xe.yaml",
        ["data.train_size=6", "data.val_size=4", "data.yes_no_questions=5"],
    )
    processor = SimpleNamespace(tokenizer=None)  # the collator is not used here
    bundle = DATA_KINDS.get("captions", where="test").build(recipe, processor, None)
    assert len(bundle.train) == 6 * 5 + 5  # 5 references per image, then the questions
    assert len(bundle.val) == 4 * 5
    last = bundle.train[len(bundle.train) - 1]
    item, text, answer = make_yes_no_item(SHAPES, "train", 4, 6)
    assert (last["prompt"], last["response"], last["image_id"]) == (text, answer, item.image_id)
    assert bundle.train[0]["prompt"] == "" and bundle.train[0]["response"] == item_caption(0)
    assert isinstance(bundle.train.datasets[1], YesNoQuestions)
    with pytest.raises(ValueError, match="yes_no_questions needs data.source 'shapes'"):
        read_recipe("demo/shapes-xe-vqa.yaml", ["data.yes_no_questions=5"])


def item_caption(i: int) -> str:
    return make_item(SHAPES, "train", i, draw=False).captions[0]


def test_caption_template_and_collapse_by_hand():
    assert caption_template("There is a red disc in the upper left corner , a blue box on the right") == (
        "there is a <color> <shape> <where> , a <color> <shape> <where>"
    )
    assert caption_template("two shapes : a red circle and a green square") == (
        "<n> shapes : a <color> <shape> and a <color> <shape>"
    )
    captions = [
        "an image of a red circle and a blue box",  # position-free; object lists fold to one template
        "an image of a green diamond",
        "an image of a green diamond , a red circle and a blue box",
        "a red circle in the middle",
        "there is a red circle at the top",
    ]
    # folded templates: "an image of <objects>" x3, "<objects>", "there is <objects>"
    assert template_collapse(captions) == {"top_template_share": 3 / 5, "position_free_share": 3 / 5}
    assert template_collapse([]) == {"top_template_share": 0.0, "position_free_share": 0.0}


def test_sampled_kl_is_the_mean_log_ratio_of_whole_captions():
    """The demo's KL estimate: mean over captions of log p(caption) - log q(caption), each computed here
    one caption at a time on its own unpadded sequence (float64 sums), against the batched path."""
    from rlalign.demo import sampled_kl

    torch.manual_seed(0)
    cfg = ModelConfig(tiny=TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400))
    p_model, processor = load_base(cfg)
    q_model, _ = load_base(cfg)
    with torch.no_grad():  # another model: the same weights, perturbed
        for w in q_model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    p_model.eval(), q_model.eval()
    images = [make_item(SHAPES, "test", i).image for i in range(3)]
    caps = ["a red circle", "there is a blue box on the left and a green diamond", "two shapes"]
    got = sampled_kl(p_model, q_model, processor, images, caps, batch_size=2)
    want = []
    for image, cap in zip(images, caps):
        lp = [float(response_logprobs(m, processor, [image], "", [cap], [0])[0]) for m in (p_model, q_model)]
        want.append(np.float64(lp[0]) - np.float64(lp[1]))
    assert abs(np.mean(want)) > 0.1  # the two models differ
    assert got == pytest.approx(float(np.mean(want)), abs=1e-5)
    assert sampled_kl(p_model, p_model, processor, images, caps) == 0.0


def test_center_removes_the_common_direction():
    """Three vectors sharing one large component: cosines near 1 before, the differences after."""
    raw = np.array([[10.0, 1.0, 0.0], [10.0, 0.0, 1.0], [10.0, -1.0, 0.0]], dtype=np.float32)
    raw /= np.sqrt(101.0)  # every row has norm sqrt(101)
    assert (raw @ raw.T).min() > 0.97
    c = center(raw)
    # mean (10, 0, 1/3) / sqrt(101); centred rows ~ (0, 1, -1/3), (0, 0, 2/3), (0, -1, -1/3), then unit length
    r = 1 / np.sqrt(10)
    want = np.array([[0, 3 * r, -r], [0, 0, 1], [0, -3 * r, -r]])
    np.testing.assert_allclose(c, want, atol=1e-6)


def test_retrieval_stats_by_hand():
    """Four images, exact search: 0 and 1 are near (cos 0.8), 2 and 3 are near (cos 0.6). Images 0 and 1
    share an object, 2 and 3 share none. The unrelated partner of i is i + 2 (mod 4)."""
    v = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1], [0, 0.8, 0.6]], dtype=np.float32)

    def search(q, k, exclude):
        sims = q @ v.T
        sims[np.arange(len(q)), exclude] = -np.inf
        order = np.argsort(-sims, axis=1)[:, :k]
        return np.take_along_axis(sims, order, 1), order

    def objs(*names):
        return [{"color": n.split()[0], "shape": n.split()[1]} for n in names]

    objects = [objs("red circle"), objs("red circle", "blue box"), objs("green diamond"), objs("red box")]
    stats = retrieval_stats(v, search, objects)
    # nearest: 0->1 (0.8), 1->0 (0.8, before 3 at 0.48), 2->3 (0.6), 3->2 (0.6, before 1 at 0.48)
    assert stats["nearest_similarity"]["mean"] == pytest.approx((0.8 + 0.8 + 0.6 + 0.6) / 4)
    # unrelated pairs (0,2), (1,3), (2,0), (3,1): cos 0, 0.48, 0, 0.48
    assert stats["unrelated_similarity"]["mean"] == pytest.approx(0.24)
    # nearest pairs (0,1) share red circle, (1,0) too, (2,3) and (3,2) share nothing; none the same set
    assert stats["nearest"] == {"shares_an_object": 0.5, "same_objects": 0.0}
    # unrelated (0,2) no, (1,3) no (red box is not red circle / blue box), (2,0) no, (3,1) no
    assert stats["unrelated"] == {"shares_an_object": 0.0, "same_objects": 0.0}


def test_verified_caption_names_exactly_the_objects():
    objects = [
        {"color": "red", "shape": "circle", "position": "top left"},
        {"color": "blue", "shape": "square", "position": "center"},
    ]
    assert verified("a red disc in the top left and a blue box in the middle", objects)
    assert verified("there is a blue square at the center , a red circle at the top left", objects)
    assert not verified("a red disc in the top left", objects)  # misses the square
    assert not verified("a red disc in the top left and a blue box on the right", objects)  # wrong cell
    assert not verified("a red disc in the top left and a green box in the middle", objects)  # wrong colour
    assert not verified("an image of a red circle and a blue square", objects)  # no positions
    three = [*objects, {"color": "red", "shape": "square", "position": "right"}]
    # every colour and shape of the image is named, but the red square is not
    assert not verified("a red disc in the top left and a blue box in the middle", three)
