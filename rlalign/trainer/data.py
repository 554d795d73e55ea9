"""Data order as a pure function of the step: exact resume, and the same global batch on any layout.

The training stream is the concatenation of per-epoch permutations of the dataset (seeded by
(seed, epoch)). Optimizer step s consumes stream positions [s*G, (s+1)*G) with G = micro batch x
ranks x accumulation steps; micro-batch j of rank r takes the slice starting at (j*ranks + r) x
micro. So 2 ranks x batch 4 sees exactly the samples of 1 rank x batch 8, batch 4 x 1 accumulation
exactly those of batch 1 x 4, and resuming at step s needs nothing but s.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset


class StepSampler:
    """Batch sampler yielding this rank's micro-batches from `start_step` to `end_step`."""

    def __init__(
        self,
        n: int,
        *,
        micro: int,
        world: int,
        rank: int,
        accum: int,
        seed: int,
        start_step: int,
        end_step: int,
    ):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.micro, self.world, self.rank, self.accum = n, micro, world, rank, accum
        self.seed, self.start_step, self.end_step = seed, start_step, end_step
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int, micro_index: int) -> list[int]:
        global_batch = self.micro * self.world * self.accum
        start = step * global_batch + (micro_index * self.world + self.rank) * self.micro
        return [int(self._perm(pos // self.n)[pos % self.n]) for pos in range(start, start + self.micro)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            for j in range(self.accum):
                yield self.indices(step, j)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accum


def step_loader(
    dataset: Dataset,
    collate,
    *,
    micro: int,
    world: int,
    rank: int,
    accum: int,
    seed: int,
    start_step: int,
    end_step: int,
    num_workers: int = 0,
) -> DataLoader:
    sampler = StepSampler(
        len(dataset),
        micro=micro,
        world=world,
        rank=rank,
        accum=accum,
        seed=seed,
        start_step=start_step,
        end_step=end_step,
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


def eval_shard(n: int, world: int, rank: int) -> tuple[list[int], list[float]]:
    """This rank's share of `n` eval items, padded so every rank runs the same number of forwards
    (ZeRO-3 and FSDP2 forwards are collective); padded items weigh 0."""
    per_rank = -(-n // world)
    idx = list(range(rank, n, world))
    weights = [1.0] * len(idx)
    while len(idx) < per_rank:
        idx.append(idx[-1] if idx else 0)
        weights.append(0.0)
    return idx, weights


def budget_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Rows (indices into `lengths`, token counts) grouped into micro-batches of at most `budget` padded
    tokens (rows x the group's longest row): longest rows first, each group filled in that order while it
    fits; a row longer than the budget forms a group alone. Deterministic (ties keep row order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def split_to(groups: list[list[int]], count: int) -> list[list[int]]:
    """`groups` split until there are `count` of them (every rank must run as many micro-batches): the
    group with most rows (the first such) is halved, the halves kept in place. Needs count <= rows."""
    groups = [list(g) for g in groups]
    if count > sum(len(g) for g in groups):
        raise ValueError(f"cannot make {count} micro-batches of {sum(len(g) for g in groups)} rows")
    while len(groups) < count:
        k = max(range(len(groups)), key=lambda j: (len(groups[j]), -j))
        g = groups[k]
        groups[k : k + 1] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups
