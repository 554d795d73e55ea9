"""SCST advantages and loss on hand-computed float64 cases, one SCST step with its greedy baseline on the
tiny model against a hand computation; the combined reward's terms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rlalign.config.schema import RewardConfig
from rlalign.objectives.grpo import reduce_loss
from rlalign.objectives.scst import scst_token_loss
from rlalign.recipe import load_recipe
from rlalign.rewards.combined import CombinedReward, hallucination_penalty
from rlalign.rollout.advantage import greedy_baseline, leave_one_out

D = torch.float64


def test_greedy_baseline_signs():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=D)  # 2 images x 2 samples
    greedy = torch.tensor([2.0, 1.0], dtype=D)
    assert greedy_baseline(rewards, greedy, 2).tolist() == [1.0, -1.0, 1.0, -0.5]
    # one sample per image (the paper's setting): better than greedy -> positive
    assert greedy_baseline(
        torch.tensor([0.2, 0.9], dtype=D), torch.tensor([0.5, 0.5], dtype=D), 1
    ).tolist() == [pytest.approx(-0.3), pytest.approx(0.4)]


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
    reward = CombinedReward(
        [
            RewardConfig(name="cider", weight=2.0),
            RewardConfig(name="hallucination", weight=0.5),
            RewardConfig(name="user_rewards:length_reward", weight=1.0),
        ],
        refs,
    )
    total, parts = reward(samples, ["a", "b"], objects=objs)
    assert set(parts) == {"cider", "hallucination", "user_rewards:length_reward"}
    assert total.tolist() == pytest.approx(
        (2 * parts["cider"] + 0.5 * pen + parts["user_rewards:length_reward"]).tolist()
    )
    assert parts["user_rewards:length_reward"].tolist() == [3.0, 7.0]


def char_reward(texts, image_ids, **columns):
    """A reward that tells captions apart: their length in characters."""
    total = np.array([float(len(t)) for t in texts])
    return total, {"chars": total}


def greedy_by_hand(model, prompt_ids, pixel_values, tok, max_new: int) -> str:
    """Argmax decoding, one full forward per token, special tokens other than EOS banned (as the rollout)."""
    banned = [i for i in tok.all_special_ids if i != tok.eos_token_id]
    ids = prompt_ids[None]
    for _ in range(max_new):
        logits = model(input_ids=ids, pixel_values=pixel_values).logits[0, -1]
        logits[banned] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == tok.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return tok.decode(ids[0, prompt_ids.shape[0] :], skip_special_tokens=True).strip()


def test_scst_step_with_greedy_baseline_by_hand(tmp_path):
    """Advantages = reward(sample) - reward(greedy decode of the same image); the loss
    -sum_i A_i sum_t log pi(token_it) / tokens and its gradients against separate float64 sequences."""
    from rlalign.data import build_data
    from rlalign.models.builder import build_policy
    from rlalign.objectives import build_objective
    from rlalign.runtime import Runtime

    recipe = load_recipe(
        "recipes/test/tiny-grpo.yaml",
        [
            f"trainer.output_dir={tmp_path}",
            "objective.name=scst",
            "objective.scst.baseline=greedy",
            "objective.scst.num_samples=2",
            "model.reference=none",
        ],
    )
    runtime = Runtime.create(recipe.distributed)
    policy, processor = build_policy(recipe.model, recipe.data)
    objective = build_objective(recipe, processor)
    objective.engine.reward = char_reward
    data = build_data(objective.data_kind, recipe, processor)
    batch = data.collate([data.train[i] for i in range(3)])
    assert batch["attention_mask"].all()  # equal prompts: no padding to strip below
    buffer, m = objective.rollout(policy, [batch], step=0, runtime=runtime)
    mb, tok, G = buffer[0], processor.tokenizer, 2
    policy64 = copy.deepcopy(policy).double()
    L = mb["completion_mask"].shape[1]
    samples = []
    # the tiny Llava's buffer has one shared-prefix row per image: [prompt | c1 | ... | cG]
    assert mb["input_ids"].shape[0] == 3 and "segment_ids" in mb
    completions = mb["input_ids"][:, mb["prompt_len"] :].reshape(-1, L)
    for ids, mask in zip(completions, mb["completion_mask"]):
        samples.append(ids[mask.bool()])
    with torch.no_grad():
        greedy = [
            greedy_by_hand(
                policy64,
                batch["input_ids"][b],
                batch["pixel_values"][b : b + 1].double(),
                tok,
                recipe.objective.rollout.max_new_tokens,
            )
            for b in range(3)
        ]
    texts = [tok.decode(s, skip_special_tokens=True).strip() for s in samples]
    adv = [len(texts[i]) - len(greedy[i // G]) for i in range(len(texts))]
    assert mb["advantages"].tolist() == adv
    assert min(adv) < 0 < max(adv)  # samples better and worse than the greedy decode
    assert m["greedy_reward_mean"] == pytest.approx(sum(len(g) for g in greedy) / 3, abs=1e-12)

    n_tokens = float(mb["completion_mask"].sum())
    loss, _ = objective.loss(policy, mb, items_per_micro=n_tokens)
    loss.backward()
    hand = torch.zeros((), dtype=D)
    for i, completion in enumerate(samples):
        prompt = batch["input_ids"][i // G]
        ids = torch.cat([prompt, completion])[None]
        pixels = batch["pixel_values"][i // G : i // G + 1].double()
        logp = policy64(input_ids=ids, pixel_values=pixels).logits[0].log_softmax(-1)
        P = prompt.shape[0]
        seq = sum(logp[t - 1, ids[0, t]] for t in range(P, ids.shape[1]))
        hand = hand - adv[i] * seq / n_tokens
    hand.backward()
    assert float(loss) == pytest.approx(float(hand), rel=1e-6)  # float32 policy, |loss| ~ 50
    grads = dict(policy64.named_parameters())
    scale = max(float(g.grad.abs().max()) for g in grads.values() if g.grad is not None)
    worst = max(
        float((p.grad.double() - grads[n].grad).abs().max())
        for n, p in policy.named_parameters()
        if p.grad is not None
    )
    assert worst < 1e-5 * scale, (worst, scale)  # float32 sums: about 1e-6 of the largest gradient
