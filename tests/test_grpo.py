"""GRPO on hand-computed float64 cases, the real rollout path on the tiny model (its reward statistics
against a hand computation), and `minibatches` through the real CLI."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from conftest import metrics, rlalign
from safetensors.torch import load_file

from rlalign.objectives.grpo import grpo_token_loss, reduce_loss
from rlalign.recipe import load_recipe
from rlalign.rollout.advantage import group_normalized
from rlalign.rollout.engine import RolloutEngine

D = torch.float64


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=D)
    adv = group_normalized(r, 3, eps=1e-5)
    # group 1: mean 2, sample std 1; group 2: std 0 -> 0 / eps = 0
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-5), 0.0, 1 / (1 + 1e-5), 0.0, 0.0, 0.0], abs=1e-15)
    assert group_normalized(r, 3, scale_by_std=False).tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert group_normalized(torch.tensor([4.0], dtype=D), 1).tolist() == [0.0]  # NaN std -> 0


def test_grpo_token_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=D)
    old = torch.tensor([[-1.5, -2.0], [-0.4, -2.0]], dtype=D)
    ref = torch.tensor([[-1.2, -2.5], [-0.5, -2.9]], dtype=D)
    adv = torch.tensor([2.0, -1.0], dtype=D)
    eps, beta = 0.2, 0.04
    loss, st = grpo_token_loss(logp, old, ref, adv, eps, beta)
    expected, clipped, kls = [], [], []
    for i in range(2):
        for j in range(2):
            rho = math.exp(logp[i, j] - old[i, j])
            a = float(adv[i])
            pg = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            d = float(ref[i, j] - logp[i, j])
            k3 = math.exp(d) - d - 1
            expected.append(-(pg - beta * k3))
            clipped.append(float((rho > 1 + eps and a > 0) or (rho < 1 - eps and a < 0)))
            kls.append(k3)
    assert loss.flatten().tolist() == pytest.approx(expected, abs=1e-14)
    assert st["kl"].flatten().tolist() == pytest.approx(kls, abs=1e-14)
    # rho(0,0) = e^0.5 > 1.2 with A > 0: clipped; rho(1,1) = e^-1 < 0.8 with A < 0: clipped
    assert st["clipped"].flatten().tolist() == clipped == [1.0, 0.0, 0.0, 1.0]
    mask = torch.tensor([[1, 1], [1, 0]])
    assert float(reduce_loss(loss, mask, "token")) == pytest.approx(sum(expected[:3]), abs=1e-14)
    seq = (expected[0] + expected[1]) / 2 + expected[2]
    assert float(reduce_loss(loss, mask, "sequence")) == pytest.approx(seq, abs=1e-14)


def test_policy_equal_to_reference_gives_zero_kl_and_unit_ratio_exactly():
    logp = torch.tensor([[-1.0, -2.0, -0.1]], dtype=D)
    loss, st = grpo_token_loss(logp, logp.clone(), logp.clone(), torch.tensor([0.7], dtype=D), 0.2, 0.04)
    assert st["kl"].eq(0).all() and st["ratio"].eq(1).all()
    assert loss.flatten().tolist() == [-0.7, -0.7, -0.7]


def test_zero_std_group_contributes_no_gradient():
    rewards = torch.tensor([3.0, 3.0, 3.0, 1.0, 2.0, 4.0], dtype=D)  # group 1 all equal
    adv = group_normalized(rewards, 3)
    logp = torch.tensor(
        [[-1.0, -0.3], [-2.0, -0.2], [-0.7, -1.1], [-1.0, -0.3], [-2.0, -0.2], [-0.7, -1.1]],
        dtype=D,
        requires_grad=True,
    )
    ref = logp.detach() - 0.0  # policy = reference: the k3 gradient vanishes too
    loss, _ = grpo_token_loss(logp, logp.detach(), ref, adv, 0.2, 0.04)
    reduce_loss(loss, torch.ones(6, 2), "token").backward()
    assert logp.grad[:3].eq(0).all()
    assert logp.grad[3:].abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from rlalign.data import build_data
    from rlalign.models.builder import ReferenceModel, build_policy
    from rlalign.objectives import build_objective
    from rlalign.runtime import Runtime

    recipe = load_recipe(
        "recipes/test/tiny-grpo.yaml", [f"trainer.output_dir={tmp_path_factory.mktemp('grpo')}"]
    )
    runtime = Runtime.create(recipe.distributed)
    policy, processor = build_policy(recipe.model, recipe.data)
    objective = build_objective(recipe, processor)
    reference = ReferenceModel.build("copy", policy, runtime)
    data = build_data(objective.data_kind, recipe, processor)
    window = [data.collate([data.train[i] for i in range(4)])]
    return policy, objective, reference, runtime, window


def test_first_inner_step_has_zero_kl_and_unit_ratio_on_the_tiny_model(tiny_setup):
    policy, objective, reference, runtime, window = tiny_setup
    buffer, metrics = objective.rollout(policy, window, step=0, runtime=runtime, reference=reference)
    G = objective.cfg.group_size
    # the tiny Llava packs each group into one row: [prompt | c1 | ... | cG], its image once
    assert len(buffer) == 1 and buffer[0]["completion_mask"].shape[0] == 4 * G
    assert buffer[0]["input_ids"].shape[0] == buffer[0]["pixel_values"].shape[0] == 4
    n_tokens = float(buffer[0]["completion_mask"].sum())
    loss, m = objective.loss(policy, buffer[0], items_per_micro=n_tokens, reference=reference)
    assert float(m["kl"]) == 0.0 and float(m["ratio_mean"]) == 1.0 and float(m["clip_frac"]) == 0.0
    assert metrics["advantage_mean"] == pytest.approx(0.0, abs=1e-12)
    assert {
        "reward_mean",
        "reward_std",
        "reward/cider_mean",
        "zero_std_groups",
        "gen_length_mean",
        "time/rollout_s",
        "time/reference_s",
    } <= set(metrics)
    loss.backward()


def test_sampling_is_seeded_per_image_not_per_batch(tiny_setup):
    """4 images in one batch or as 2 + 2 give the same samples; the vision tower sees each image once."""
    from rlalign.rollout.sampling import row_seed, sample_groups

    policy, objective, _, _, window = tiny_setup
    batch, cfg, tok, G = window[0], objective.engine.cfg, objective.engine.tok, 3
    seeds = [row_seed(0, 1, iid, g) for iid in batch["image_ids"] for g in range(G)]
    seen = []
    hook = policy.model.vision_tower.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    whole = sample_groups(policy, batch, seeds, G, cfg, tok)
    hook.remove()
    assert seen == [4]  # one encoder pass over the 4 images for 12 samples
    halves = []
    for sl in (slice(0, 2), slice(2, 4)):
        part = {k: v[sl] for k, v in batch.items()}
        halves.append(sample_groups(policy, part, seeds[sl.start * G : sl.stop * G], G, cfg, tok))
    width = max(h.shape[1] for h in halves + [whole])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=tok.pad_token_id)  # noqa: E731
    assert torch.equal(pad(whole), torch.cat([pad(h) for h in halves]))
    repeated = {k: v.repeat_interleave(G, 0) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    assert torch.equal(
        whole, sample_groups(policy, repeated, seeds, 1, cfg, tok)
    )  # same as G-times pixel values


# Rewards per sample of the 4 images x 4 samples: only image 0's are all equal (no GRPO signal).
GROUP_REWARDS = [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0], [2.0, 2.0, 3.0, 2.0], [5.0, 1.0, 1.0, 1.0]]


def fixed_reward(texts, image_ids, **columns):
    """The rollout's reward callable, returning GROUP_REWARDS in sample order whatever was sampled."""
    total = np.array([r for group in GROUP_REWARDS for r in group])
    assert len(texts) == len(image_ids) == total.size
    return total, {"fixed": total}


def test_rollout_advantages_and_reward_statistics_by_hand(tiny_setup):
    """What the loop logs and trains on: advantages in the buffer and the rollout's reward / advantage
    means, stds and zero-std group share, against statistics computed here in float64."""
    policy, objective, _, runtime, window = tiny_setup
    engine = RolloutEngine(objective.engine.cfg, fixed_reward, objective.engine.tok, 0)
    G, eps = objective.cfg.group_size, objective.cfg.std_eps
    assert G == 4
    buffer, m = engine(
        policy,
        window,
        runtime=runtime,
        group_size=G,
        with_greedy=False,
        advantage=objective.advantage,
        old_logp=False,
        step=0,
    )
    adv = []
    for group in GROUP_REWARDS:
        mean, std = statistics.fmean(group), statistics.stdev(group)  # sample std
        adv += [(r - mean) / (std + eps) if std > 0 else 0.0 for r in group]
    rewards = [r for group in GROUP_REWARDS for r in group]
    assert buffer[0]["advantages"].tolist() == pytest.approx(adv, abs=1e-6)
    assert m["zero_std_groups"] == 0.25
    assert m["reward_mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-12)
    assert m["reward_std"] == pytest.approx(statistics.pstdev(rewards), abs=1e-12)
    assert m["reward/fixed_mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-12)
    assert m["advantage_mean"] == pytest.approx(statistics.fmean(adv), abs=1e-12)
    assert m["advantage_std"] == pytest.approx(statistics.pstdev(adv), abs=1e-12)
    lengths = buffer[0]["completion_mask"].sum(1).double()
    assert m["gen_length_mean"] == pytest.approx(float(lengths.mean()), abs=1e-12)


GRPO = "recipes/test/tiny-grpo.yaml"


@pytest.mark.slow
def test_minibatches_equal_accumulated_minibatches(tmp_path):
    """`minibatches: 2` on a micro-batch of 4 images (two updates of 2 images each) equals micro-batches of 2
    images x 2 accumulation steps (each update = one rollout micro-batch, accumulated over its 2 parts):
    same losses and parameters; and it is not the single update of `minibatches: 1`."""
    # Adam eps 1: updates proportional to the gradient, so float noise on a near-zero gradient stays noise
    common = [
        "trainer.export_final=true",
        "trainer.max_steps=2",
        "objective.grpo.inner_epochs=1",
        "optim.lr=1e-3",
        "optim.eps=1.0",
    ]
    runs = {
        "split": ["trainer.per_device_batch_size=4", "objective.grpo.minibatches=2"],
        "accumulated": [
            "trainer.per_device_batch_size=2",
            "trainer.grad_accum_steps=2",
            "objective.grpo.minibatches=2",
        ],
        "one_update": ["trainer.per_device_batch_size=4", "objective.grpo.minibatches=1"],
    }
    for name, args in runs.items():
        rlalign("train", GRPO, f"trainer.output_dir={tmp_path / name}", *common, *args)
    split, acc = metrics(tmp_path / "split"), metrics(tmp_path / "accumulated")
    for key in ("loss", "reward_mean", "advantage_std", "grad_norm"):
        assert [x[key] for x in split] == pytest.approx([x[key] for x in acc], abs=1e-6), key
    assert all(x["loss"] != 0.0 for x in split)
    params = {name: load_file(tmp_path / name / "final/model.safetensors") for name in runs}
    worst = max(float((params["split"][k] - params["accumulated"][k]).abs().max()) for k in params["split"])
    assert worst < 1e-6, worst
    moved = max(float((params["split"][k] - params["one_update"][k]).abs().max()) for k in params["split"])
    assert moved > 1e-5, moved


def test_schedule_advances_once_per_loop_step(tmp_path):
    """GRPO makes inner_epochs x minibatches updates per loop step; the learning-rate schedule is sized in loop
    steps (trainer.max_steps), so it advances once per step: the logged lr is the hand-computed linear decay
    lr0 * (1 - 0.9 * (s - 1) / max_steps) at every update of step s."""
    out = tmp_path / "run"
    rlalign(
        "train",
        "recipes/test/tiny-grpo.yaml",
        f"trainer.output_dir={out}",
        "trainer.max_steps=3",
        "optim.scheduler=linear",
        "optim.warmup_steps=0",
        "optim.lr=1e-3",
        "objective.grpo.minibatches=2",
    )
    logged = [m["lr"] for m in metrics(out)]
    assert logged == pytest.approx([1e-3 * (1 - 0.9 * s / 3) for s in range(3)], rel=1e-12)
