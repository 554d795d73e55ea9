"""Rewards as TRL calls them: the verifiable rewards by hand, how a term's signature picks its call, None
scores, options checked at load, and a TRL-signature reward in the working directory (no PYTHONPATH) seeing
every column of a GRPO rollout through the real CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import BIN, ROOT, make_env, metrics

from rlalign.config import RecipeError
from rlalign.config.schema import RewardConfig
from rlalign.rewards.combined import CombinedReward, call_style, check_reward
from rlalign.rewards.verifiable import AnswerAccuracy, FormatReward, make_extractor


def test_answer_extractors_by_hand():
    assert make_extractor("answer_tag")("<answer>1</answer> so <answer> 2 </answer>") == "2"
    assert make_extractor("answer_tag")("2") is None
    assert make_extractor("last_number")("3 apples, then 1,250.5 pears") == "1,250.5"
    assert make_extractor("last_number")("-3/4 of it") == "-3/4"
    assert make_extractor("regex", r"answer is (\w+)")("answer is red, no: answer is blue.") == "blue"
    assert make_extractor("full")("  red ") == "red"
    with pytest.raises(ValueError, match="extract must be one of"):
        make_extractor("first_word")


def test_answer_accuracy_by_hand():
    acc = AnswerAccuracy(extract="answer_tag")
    completions = [
        "<answer>2</answer>",
        "<answer>2.00</answer>",
        "<answer> Red. </answer>",
        "red",
        "<answer>3</answer>",
        "x",
    ]
    solutions = ["2", "<answer>2</answer>", "red", "red", "2", None]
    assert acc(completions, solution=solutions) == [1.0, 1.0, 1.0, 0.0, 0.0, None]
    numbers = AnswerAccuracy(extract="last_number", column="answer")
    assert numbers(["it is 0.75", "about 1,000", "3/4"], answer=["3/4", "1000", "0.75"]) == [1.0, 1.0, 1.0]
    conversational = [[{"role": "assistant", "content": "<answer>blue</answer>"}]]
    assert acc(conversational, solution=["blue"]) == [1.0]
    assert acc(["<answer>2</answer>", "3"], refs=[["1", "<answer>2</answer>"], ["2"]]) == [
        1.0,
        0.0,
    ]  # any reference
    with pytest.raises(KeyError, match="no column solution, answer, refs"):
        acc(["2"], objects=[[]])


def test_format_reward_by_hand():
    fmt = FormatReward()
    got = fmt(
        [
            "<answer>2</answer>",
            "<think>count</think> <answer>2</answer>",
            "2",
            "<answer></answer>",
            "<answer>2</answer> more",
        ]
    )
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]


def trl_style(completions, prompts, **kwargs):
    return [len(c) for c in completions]


def trl_style_keyword_only(*, prompts, completions, **kwargs):
    return [1.0] * len(completions)


def original(samples, image_ids, **columns):
    return [0.0] * len(samples)


class TrlCallable:
    def __call__(self, completions, **kwargs):
        return [1.0] * len(completions)


def test_call_style_from_the_signature():
    assert call_style(trl_style) == call_style(trl_style_keyword_only) == call_style(TrlCallable()) == "trl"
    assert call_style(original) == call_style(len) == "rlalign"


def test_trl_terms_get_prompts_and_columns_and_none_counts_zero(tmp_path, monkeypatch):
    seen = {}
    (tmp_path / "my_rewards.py").write_text(
        "SEEN = {}\n"
        "def graded(completions, prompts, solution, **kwargs):\n"
        "    SEEN.update(completions=completions, prompts=prompts, solution=solution, keys=sorted(kwargs))\n"
        "    return [None if s is None else float(c[0]['content'] == s) for c, s in zip(completions, solution)]\n"
    )
    monkeypatch.chdir(tmp_path)  # the working directory is importable as for a script
    reward = CombinedReward(
        [RewardConfig(name="my_rewards:graded", weight=2.0), RewardConfig(name="format", weight=0.5)], {}
    )
    import my_rewards

    seen = my_rewards.SEEN
    messages = [{"role": "user", "content": "how many ?"}]
    total, parts = reward(
        ["2", "<answer>3</answer>", "1"],
        ["a", "b", "c"],
        prompt=[messages, messages, messages],
        solution=["2", "3", None],
        objects=[[], [], []],
        completion_ids=[[5], [6], [7]],
    )
    assert seen["completions"][0] == [{"role": "assistant", "content": "2"}]  # conversational prompts
    assert seen["prompts"] == [messages] * 3 and seen["solution"] == ["2", "3", None]
    assert seen["keys"] == ["completion_ids", "image_ids", "objects"]
    assert parts["my_rewards:graded"].tolist() == [1.0, 0.0, 0.0]  # "<answer>3</answer>" != "3"; None -> 0
    assert parts["my_rewards:graded_none"].tolist() == [0.0, 0.0, 1.0]
    assert parts["format"].tolist() == [0.0, 1.0, 0.0] and "format_none" not in parts
    assert total.tolist() == [2.0, 0.5, 0.0]


def test_reward_options_checked_at_load():
    check_reward(RewardConfig(name="answer_accuracy", options={"extract": "last_number"}), where="r")
    with pytest.raises(RecipeError, match=r"^r\.options: reward 'answer_accuracy': extract must be one of"):
        check_reward(RewardConfig(name="answer_accuracy", options={"extract": "first"}), where="r")
    with pytest.raises(
        RecipeError, match=r"^r\.options: reward 'format': got an unexpected keyword argument 'col'"
    ):
        check_reward(RewardConfig(name="format", options={"col": 1}), where="r")
    with pytest.raises(RecipeError, match=r"^r\.options: .*pattern is needed by extract 'regex'"):
        check_reward(RewardConfig(name="answer_accuracy", options={"extract": "regex"}), where="r")


REWARD_MODULE = '''
import json, os

def vqa_reward(completions, prompts, solution, **kwargs):
    """TRL's signature; records what it was given, scores the first sample of each group None."""
    with open(os.path.join(os.path.dirname(__file__), "seen.jsonl"), "a") as f:
        f.write(json.dumps({"prompts": prompts, "solution": solution, "image_ids": kwargs["image_ids"],
                            "keys": sorted(kwargs), "n": len(completions)}) + "\\n")
    return [None if i % 4 == 0 else float(len(c) % 2) for i, c in enumerate(completions)]
'''


@pytest.mark.e2e
def test_trl_reward_in_the_working_directory_sees_every_column(tmp_path):
    """GRPO on the shapes questions through the CLI, run from a folder holding the reward module (no
    PYTHONPATH): the reward gets each row's own question as its prompt (not `data.prompt`), the row's
    `solution` and `objects`, repeated per sample; the share of None scores is logged."""
    from rlalign.data.captions import shapes_vqa_dataset
    from rlalign.shapes import ShapesConfig

    (tmp_path / "vqa_rewards.py").write_text(REWARD_MODULE)
    out = tmp_path / "run"
    cmd = [
        str(BIN / "rlalign"),
        "train",
        str(ROOT / "recipes/test/tiny-grpo.yaml"),
        f"trainer.output_dir={out}",
        "data.source=shapes_vqa",
        "data.prompt=IGNORED",
        "trainer.max_steps=1",
        "trainer.export_final=false",
        "objective.rewards=[{name: vqa_rewards:vqa_reward}]",
    ]
    env = make_env(HF_DATASETS_CACHE=str(tmp_path / "hf"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = [json.loads(x) for x in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["n"] == 16  # 4 questions x 4 samples
    data = shapes_vqa_dataset(ShapesConfig(image_size=48), "train", 64)
    by_id = {iid: (q, s) for iid, q, s in zip(data["image_id"], data["prompt"], data["solution"])}
    call = calls[0]
    assert [by_id[i] for i in call["image_ids"]] == list(zip(call["prompts"], call["solution"]))
    assert all(call["image_ids"][k] == call["image_ids"][k - k % 4] for k in range(16))  # repeated per sample
    assert {"objects", "refs", "question_kind", "completion_ids"} <= set(call["keys"])
    step = next(m for m in metrics(out) if "reward_mean" in m)
    assert step["reward/vqa_rewards:vqa_reward_none_mean"] == pytest.approx(0.25)
    assert np.isfinite(step["loss"])
