"""SCST advantages and loss on hand-computed float64 cases; the combined reward's terms."""

from __future__ import annotations

import pytest
import torch

from rlalign.config.schema import RewardConfig
from rlalign.objectives.grpo import reduce_loss
from rlalign.objectives.scst import scst_token_loss
from rlalign.rewards.combined import CombinedReward, hallucination_penalty
from rlalign.rollout.advantage import greedy_baseline, leave_one_out

D = torch.float64


def test_greedy_baseline_signs():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=D)  # 2 images x 2 samples
    greedy = torch.tensor([2.0, 1.0], dtype=D)
    assert greedy_baseline(rewards, greedy, 2).tolist() == [1.0, -1.0, 1.0, -0.5]
    # one sample per image (the paper's setting): better than greedy -> positive
    assert greedy_baseline(torch.tensor([0.2, 0.9], dtype=D), torch.tensor([0.5, 0.5], dtype=D), 1).tolist() == [
        pytest.approx(-0.3), pytest.approx(0.4)]  # fmt: skip


def test_leave_one_out_baseline_by_hand():
    adv = leave_one_out(torch.tensor([1.0, 2.0, 6.0], dtype=D), 3)
    assert adv.tolist() == [1 - 4.0, 2 - 3.5, 6 - 1.5]
    with pytest.raises(ValueError):
        leave_one_out(torch.tensor([1.0], dtype=D), 1)


def test_scst_gradient_raises_logp_of_better_than_greedy_samples():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]], dtype=D, requires_grad=True)
    adv = torch.tensor([0.5, -2.0], dtype=D)
    loss = reduce_loss(scst_token_loss(logp, adv), torch.tensor([[1, 1], [1, 0]]), "token") / 3
    assert float(loss) == pytest.approx(-(0.5 * -1.0 + 0.5 * -2.0 + -2.0 * -0.5) / 3, abs=1e-15)
    loss.backward()
    assert logp.grad.tolist() == [[-0.5 / 3, -0.5 / 3], [2.0 / 3, 0.0]]  # descent raises row 0, lowers row 1


def test_zero_advantage_gives_no_gradient():
    logp = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    reduce_loss(scst_token_loss(logp, torch.zeros(1, dtype=D)), torch.ones(1, 2), "sequence").backward()
    assert logp.grad.eq(0).all()


def test_hallucination_penalty_and_weighted_terms(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(
        "def length_reward(samples, image_ids, **columns):\n    return [len(s.split()) for s in samples]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # a user's module, importable as `module:function`
    objs = [[{"shape": "circle", "color": "red"}], [{"shape": "square", "color": "blue"}]]
    samples = ["a red circle", "a red disc and a green box"]
    pen = hallucination_penalty(samples, ["a", "b"], objects=objs)
    assert pen.tolist() == [0.0, -0.75]  # red, disc(circle), green wrong; box(square) right
    refs = {"a": ["a red circle in the center"], "b": ["a blue square at the top"]}
    reward = CombinedReward([RewardConfig(name="cider", weight=2.0), RewardConfig(name="hallucination", weight=0.5),
                             RewardConfig(name="user_rewards:length_reward", weight=1.0)], refs)  # fmt: skip
    total, parts = reward(samples, ["a", "b"], objects=objs)
    assert set(parts) == {"cider", "hallucination", "user_rewards:length_reward"}
    assert total.tolist() == pytest.approx(
        (2 * parts["cider"] + 0.5 * pen + parts["user_rewards:length_reward"]).tolist()
    )
    assert parts["user_rewards:length_reward"].tolist() == [3.0, 7.0]
