"""Checkpoints that prove themselves, and runs that stop on non-finite numbers.

A truncated or missing file in a checkpoint is named and skipped (`resume=auto` falls back) or refused
(`resume=PATH`, or no valid checkpoint left) with a one-line error that loses nothing. A non-finite loss
or gradient norm stops the run with a one-line error naming the step, before anything of that step is
saved; `skip_step` drops exactly that update, on every rank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import BIN, TINY, accelerate_cmd, losses, make_env, metrics, rlalign, run
from safetensors.torch import load_file

WIDE = make_env(COLUMNS="1000")  # log lines unwrapped, so that a path is one word

# Runs the real CLI with `XEObjective.loss` patched at its NAN_AT_CALL-th call (on rank NAN_RANK only):
# NAN_KIND=loss adds NaN to the loss (its gradients stay finite), NAN_KIND=grad makes its gradients NaN
# (the loss stays finite).
HOOK = """
import os
import sys

from rlalign import cli
from rlalign.objectives.xe import XEObjective

AT, KIND = int(os.environ["NAN_AT_CALL"]), os.environ["NAN_KIND"]
ON_RANK = os.environ.get("NAN_RANK", "0") == os.environ.get("RANK", "0")
original, calls = XEObjective.loss, []


def loss(self, *args, **kwargs):
    value, metrics = original(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == AT and ON_RANK:
        if KIND == "loss":
            value = value + float("nan")
        else:
            value.register_hook(lambda grad: grad * float("nan"))
    return value, metrics


XEObjective.loss = loss
sys.exit(cli.main())
"""


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def tensors(path: Path) -> dict:
    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_truncated_and_missing_files_fall_back_or_refuse(tmp_path):
    out = tmp_path / "run"
    ck = out / "checkpoints"
    args = [
        TINY,
        f"trainer.output_dir={out}",
        "trainer.max_steps=3",
        "trainer.save_every=1",
        "trainer.keep_last=3",
    ]
    rlalign("train", *args)
    full = losses(out)
    opt = ck / "step-0000003" / "optimizer.pt"
    size = opt.stat().st_size
    opt.write_bytes(opt.read_bytes()[:-100])  # truncated
    assert opt.stat().st_size == size - 100
    rng = ck / "step-0000002" / "rng" / "rank-0.safetensors"
    rng.unlink()
    assert not rng.exists()

    # an explicit path that fails verification: one line naming the checkpoint, the file and what differs
    proc = rlalign("train", *args, f"trainer.resume={ck / 'step-0000003'}", check=False)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"error: trainer.resume={ck / 'step-0000003'}: checkpoint fails verification: "
        f"optimizer.pt: size {size - 100} bytes, the manifest says {size}"
    ]
    assert metrics(out) and losses(out) == full, "a refused resume loses nothing"

    # auto: both bad checkpoints named, fallback to step 1, the same losses as the uninterrupted run
    proc = rlalign("train", *args, "trainer.resume=auto", env=WIDE)
    log = proc.stdout + proc.stderr
    assert (
        f"checkpoint {ck / 'step-0000003'} fails verification: optimizer.pt: size {size - 100} bytes" in log
    )
    assert f"checkpoint {ck / 'step-0000002'} fails verification: rng/rank-0.safetensors: missing" in log
    assert f"resumed from {ck / 'step-0000001'} at step 1" in log
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and losses(out) == full  # bitwise

    # no valid checkpoint left: one line naming the folder and each checkpoint's bad file; nothing deleted
    (ck / "step-0000003" / "model.safetensors").unlink()
    sched = ck / "step-0000002" / "scheduler.json"
    sched_size = sched.stat().st_size
    sched.write_text("{}")
    (ck / "step-0000001" / "manifest.json").write_text("{}")
    proc = rlalign("train", *args, "trainer.resume=auto", check=False)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        f"error: trainer.resume=auto: no valid checkpoint in {ck}: step-0000003/model.safetensors: missing; "
        f"step-0000002/scheduler.json: size 2 bytes, the manifest says {sched_size}; "
        "step-0000001/manifest.json: sha256 differs from the one recorded in COMPLETE"
    ]
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000001", "step-0000002", "step-0000003"]
    assert losses(out) == full


def test_nonfinite_loss_stops_before_anything_is_saved(tmp_path):
    """lr 1e30: step 1 is finite, its update blows the weights up, step 2's loss and gradients are not."""
    out = tmp_path / "run"
    proc = rlalign(
        "train",
        TINY,
        f"trainer.output_dir={out}",
        "trainer.max_steps=4",
        "trainer.save_every=1",
        "optim.lr=1e30",
        check=False,
    )
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith("error: step 2: non-finite loss or gradient norm")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    assert [m["step"] for m in metrics(out)] == [1] and math.isfinite(metrics(out)[0]["loss"])
    assert not (out / "final").exists()


def test_skip_step_drops_exactly_that_update(tmp_path):
    """Step 3's gradients are NaN (its loss is finite): under skip_step the step-3 checkpoint holds the
    step-2 weights and optimizer state bitwise, step 4 trains again, the final weights are finite."""
    out, script = tmp_path / "run", tmp_path / "hook.py"
    script.write_text(HOOK)
    cmd = [
        str(BIN / "python"),
        str(script),
        "train",
        TINY,
        f"trainer.output_dir={out}",
        "trainer.max_steps=4",
        "trainer.save_every=1",
        "trainer.keep_last=4",
        "trainer.on_nonfinite=skip_step",
    ]
    proc = run(cmd, env=make_env(COLUMNS="1000", NAN_AT_CALL="3", NAN_KIND="grad"))
    assert (
        "step 3: non-finite loss or gradient norm (grad norm nan); update dropped"
        in proc.stdout + proc.stderr
    )
    assert [m.get("skipped_updates", 0) for m in metrics(out)] == [0, 0, 1, 0]
    step = {s: out / "checkpoints" / f"step-{s:07d}" for s in (2, 3, 4)}
    assert same_tensors(tensors(step[2] / "model.safetensors"), tensors(step[3] / "model.safetensors"))
    assert not same_tensors(tensors(step[3] / "model.safetensors"), tensors(step[4] / "model.safetensors"))
    opt2, opt3 = (torch.load(step[s] / "optimizer.pt", weights_only=True) for s in (2, 3))
    assert opt2["state"].keys() == opt3["state"].keys()
    assert all(
        opt2["state"][k][n].equal(opt3["state"][k][n]) for k in opt2["state"] for n in opt2["state"][k]
    )
    final = tensors(out / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.mark.slow
@pytest.mark.distributed
def test_skip_step_agrees_across_ranks(tmp_path):
    """DDP: step 3's loss is NaN on rank 1 only (its gradients are finite, so the all-reduced gradient norm
    is too): both ranks must drop the update, or their replicas part."""
    out, script = tmp_path / "run", tmp_path / "hook.py"
    script.write_text(HOOK)
    cmd = [
        *accelerate_cmd("ddp-8gpu.yaml", 2),
        str(script),
        "train",
        TINY,
        f"trainer.output_dir={out}",
        "trainer.max_steps=4",
        "trainer.save_every=1",
        "trainer.keep_last=4",
        "trainer.per_device_batch_size=2",
        "trainer.on_nonfinite=skip_step",
        "trainer.export_final=false",
    ]
    run(cmd, env=make_env(NAN_AT_CALL="3", NAN_KIND="loss", NAN_RANK="1"))
    assert [m.get("skipped_updates", 0) for m in metrics(out)] == [0, 0, 1, 0]
    step = {s: out / "checkpoints" / f"step-{s:07d}" for s in (2, 3, 4)}
    assert same_tensors(tensors(step[2] / "model.safetensors"), tensors(step[3] / "model.safetensors"))
    assert not same_tensors(tensors(step[3] / "model.safetensors"), tensors(step[4] / "model.safetensors"))
