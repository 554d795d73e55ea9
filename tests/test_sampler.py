"""Data order is a pure function of the step: layouts that share a global batch see the same samples; the
rollout sampler moves nothing between host and device per token."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlalign.trainer.data import StepSampler, eval_shard


def _step_samples(n, micro, world, accum, step, seed=0):
    out = []
    for rank in range(world):
        s = StepSampler(
            n, micro=micro, world=world, rank=rank, accum=accum, seed=seed, start_step=0, end_step=10
        )
        for j in range(accum):
            out += s.indices(step, j)
    return sorted(out)


def test_same_global_batch_for_every_layout():
    for step in range(7):
        ref = _step_samples(50, 8, 1, 1, step)
        assert _step_samples(50, 4, 2, 1, step) == ref
        assert _step_samples(50, 1, 1, 8, step) == ref
        assert _step_samples(50, 2, 2, 2, step) == ref


def test_epochs_are_permutations_and_resume_is_a_suffix():
    s = StepSampler(12, micro=4, world=1, rank=0, accum=1, seed=5, start_step=0, end_step=6)
    batches = list(s)
    assert sorted(sum(batches[:3], [])) == list(range(12)) and sorted(sum(batches[3:], [])) == list(range(12))
    assert sum(batches[:3], []) != sum(batches[3:], [])  # a new order each epoch
    resumed = StepSampler(12, micro=4, world=1, rank=0, accum=1, seed=5, start_step=4, end_step=6)
    assert list(resumed) == batches[4:]


def test_eval_shard_pads_to_equal_forward_counts():
    shards = [eval_shard(5, 2, r) for r in range(2)]
    assert [len(i) for i, _ in shards] == [3, 3]
    assert sorted(i for idx, w in shards for i, wt in zip(idx, w) if wt) == list(range(5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_draws_on_the_device_without_copies():
    """On CUDA the noise and the banned-token index live on the device: no host-device copy per token (the
    profiler's memcpy events over ten calls)."""
    from torch.profiler import ProfilerActivity, profile

    from rlalign.config.schema import RolloutConfig
    from rlalign.rollout.sampling import SeededSampler

    scores = torch.randn(6, 5000, device="cuda")
    ids = torch.zeros(6, 3, dtype=torch.long, device="cuda")
    sampler = SeededSampler(list(range(6)), RolloutConfig(), banned=[0])
    sampler(ids, scores)  # creates the generators
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            out = sampler(ids, scores)
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.events()]
    copies = [n for n in names if "memcpy" in n and ("htod" in n or "dtoh" in n)]
    assert not copies, copies
    assert out.shape == scores.shape


class DeviceTraffic(TorchDispatchMode):
    """Every op that moves data between devices or to the host: copies whose source and destination devices
    differ, a tensor created off the scores' device, a scalar read back (`.item()`, a Python `bool`)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.moves = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        tensors = [
            t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)
        ]
        if "_local_scalar_dense" in name or any(t.device != self.device for t in tensors):
            self.moves.append(name)
        return out


@pytest.mark.parametrize("top", [{}, {"top_k": 50, "top_p": 0.9}], ids=["plain", "top-k-top-p"])
def test_sampler_moves_nothing_between_devices_per_token(top):
    """The CPU check of the same property: with the process's default device elsewhere (meta), ten sampling
    calls create every tensor on the scores' device and read nothing back to the host. Noise drawn with the
    default device and moved to the scores (what the sampler did before) is caught here."""
    from rlalign.config.schema import RolloutConfig
    from rlalign.rollout.sampling import SeededSampler

    scores = torch.randn(6, 500)
    ids = torch.zeros(6, 3, dtype=torch.long)
    sampler = SeededSampler(list(range(6)), RolloutConfig(**top), banned=[0, 7])
    first = sampler(ids, scores)  # creates the generators and the banned-token index, once
    traffic = DeviceTraffic(scores.device)
    with torch.device("meta"), traffic:
        for _ in range(10):
            out = sampler(ids, scores)
    assert traffic.moves == []
    assert out.device == scores.device and (out == 0).sum(1).tolist() == [1] * 6
    assert (first == 0).sum(1).tolist() == [1] * 6
