"""Micro-batches sized by a token budget (`trainer.max_tokens_per_micro`): the same rows per step as the
fixed layout, grouped by length, so the losses and gradient norms are the fixed layout's while the
padding share drops; every rank runs as many micro-batches as the rank that needs most (2 processes,
DDP through `accelerate launch` and FSDP2 through torchrun, against one process with fixed micro-batches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, free_port, launch_cmd, make_env, metrics, one_line_error, rlalign, run

from rlalign.trainer.data import budget_groups, split_to
from rlalign.trainer.loop import budget_window

# yes/no questions beside the captions: rows of different lengths
VARIED = ["data.yes_no_questions=64", "trainer.grad_accum_steps=2"]
BUDGET = 120


def test_groups_by_hand():
    lengths = [10, 40, 25, 40, 5, 12]
    # longest first: 40 (row 1), 40 (row 3) -> 2 x 40 = 80 <= 90; 25 -> 3 x 40 > 90, new group;
    # 12, 10 -> 3 x 25 = 75 <= 90; 5 -> 4 x 25 > 90, new group
    assert budget_groups(lengths, 90) == [[1, 3], [2, 5, 0], [4]]
    assert budget_groups(lengths, 30) == [[1], [3], [2], [5, 0], [4]]  # a row over budget alone
    assert budget_groups([7, 7, 7], 100) == [[0, 1, 2]]
    # the group with most rows is halved in place until the count is reached
    assert split_to([[0, 1, 2], [3]], 3) == [[0], [1, 2], [3]]
    assert split_to([[0, 1, 2], [3]], 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="cannot make 5 micro-batches of 4 rows"):
        split_to([[0, 1, 2], [3]], 5)


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixed")
    rlalign("train", TINY, f"trainer.output_dir={out}", *VARIED)
    return out


def check_same_steps(ours: list[dict], ref: list[dict], tol: float) -> None:
    assert len(ours) == len(ref) == 5
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in ours] == pytest.approx([m[key] for m in ref], abs=tol), key
    # fewer padded slots on every step, and the micro-batch count follows the lengths, not the recipe
    assert all(a["padding_share"] < b["padding_share"] for a, b in zip(ours, ref))
    assert {m["micro_batches"] for m in ours} != {2.0}


def test_budget_equals_fixed_micro_batches(tmp_path, fixed_run):
    out = tmp_path / "budget"
    rlalign("train", TINY, f"trainer.output_dir={out}", *VARIED, f"trainer.max_tokens_per_micro={BUDGET}")
    ours, ref = metrics(out), metrics(fixed_run)
    check_same_steps(ours, ref, 1e-5)
    print(
        "micro-batches",
        [m["micro_batches"] for m in ours],
        "padding",
        [round(m["padding_share"], 3) for m in ours],
    )


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_two_processes_with_a_budget_equal_one_with_fixed_micro_batches(tmp_path, fixed_run, backend):
    out = tmp_path / backend
    args = [TINY, f"trainer.output_dir={out}", *VARIED, "trainer.per_device_batch_size=2"]
    args.append(f"trainer.max_tokens_per_micro={BUDGET // 2}")
    if backend == "ddp":
        run(launch_cmd("ddp-8gpu.yaml", 2, *args))
    else:
        env = make_env(NPROC="2", MASTER_PORT=str(free_port()))
        run(["bash", "launch/torchrun.sh", *args, "distributed.backend=fsdp2"], env=env)
    check_same_steps(metrics(out), metrics(fixed_run), 1e-5)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["objective.name=grpo", "model.reference=copy"], "builds its micro-batches from rollouts"),
        (["distributed.backend=deepspeed"], "DeepSpeed fixes the accumulation length"),
    ],
)
def test_budget_refused_where_it_cannot_work(tmp_path, overrides, needle):
    out = tmp_path / "run"
    proc = rlalign(
        "train", TINY, f"trainer.output_dir={out}", "trainer.max_tokens_per_micro=64", *overrides, check=False
    )
    one_line_error(proc, "trainer.max_tokens_per_micro", needle)
    assert not out.exists()  # refused before anything was written


class OtherRankNeedsFour:
    """A runtime whose other rank needs 4 micro-batches this step (the all-reduced maximum)."""

    def all_reduce(self, values, op="sum"):
        assert op == "max"
        return torch.maximum(values.double(), torch.tensor([4.0], dtype=torch.float64))


def test_every_rank_runs_as_many_micro_batches_as_the_rank_needing_most():
    rows = [[1] * n for n in (9, 3, 8, 2, 4)]  # token lists; collated: rows x longest, right-padded

    def collate(batch):
        width = max(len(r) for r in batch)
        return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in batch])}

    # alone, this rank needs 2: [9, 8] (2 x 9 = 18 <= 20) and [4, 3, 2] (3 x 4 = 12)
    assert budget_groups([len(r) for r in rows], 20) == [[0, 2], [4, 1, 3]]
    window = budget_window(rows, collate, 20, OtherRankNeedsFour())
    assert [b["input_ids"].shape for b in window] == [(1, 9), (1, 8), (1, 4), (2, 3)]
