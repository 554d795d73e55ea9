"""Resume continues the same run: SIGKILL after some step, resume, same losses (bitwise in one
process; 1e-6 over 2 processes, ZeRO-3 included). SIGTERM writes a complete checkpoint and exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, TINY, launch_cmd, losses, make_env, metrics, rlalign, run
from safetensors.torch import load_file

ARGS = [
    "trainer.max_steps=14",
    "trainer.save_every=1",
    "trainer.keep_last=2",
    "trainer.per_device_batch_size=2",
]


def start_and_signal(cmd: list[str], out: Path, sig: int, after_step: int) -> tuple[int, int]:
    """Start a run, send `sig` to its process group once `after_step` is logged; (exit code, last logged step)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=make_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(metrics(out)) >= after_step:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before the signal:\n{proc.stderr.read()[-3000:]}"
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    code = proc.wait(timeout=120)
    return code, metrics(out)[-1]["step"]


def test_sigkill_resume_is_bitwise_single_process(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    rlalign("train", TINY, f"trainer.output_dir={full}", *ARGS)
    cmd = [str(BIN / "rlalign"), "train", TINY, f"trainer.output_dir={cut}", *ARGS]
    code, last = start_and_signal(cmd, cut, signal.SIGKILL, after_step=4)
    assert code == -signal.SIGKILL and last < 14, "the run must really be interrupted"
    rlalign("train", TINY, f"trainer.output_dir={cut}", *ARGS, "trainer.resume=auto")
    assert [m["step"] for m in metrics(cut)] == list(range(1, 15))
    assert losses(cut) == losses(full)  # bitwise
    a, b = load_file(full / "final/model.safetensors"), load_file(cut / "final/model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "config",
    [
        "ddp-8gpu.yaml",
        "zero3-8gpu.yaml",
        pytest.param("fsdp2-8gpu.yaml", marks=pytest.mark.slow),
        pytest.param("zero2-8gpu.yaml", marks=pytest.mark.slow),
    ],
    ids=["ddp", "zero3", "fsdp2", "zero2"],
)
def test_sigkill_resume_two_processes(tmp_path, config):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [TINY, *ARGS, "trainer.per_device_batch_size=1"]
    run(launch_cmd(config, 2, *args, f"trainer.output_dir={full}"))
    code, last = start_and_signal(
        launch_cmd(config, 2, *args, f"trainer.output_dir={cut}"), cut, signal.SIGKILL, 4
    )
    assert code != 0 and last < 14, "the run must really be interrupted"
    run(launch_cmd(config, 2, *args, f"trainer.output_dir={cut}", "trainer.resume=auto"))
    assert [m["step"] for m in metrics(cut)] == list(range(1, 15))
    assert losses(cut) == pytest.approx(losses(full), abs=1e-6)


def test_sigterm_writes_complete_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "term"
    args = [TINY, f"trainer.output_dir={out}", "trainer.max_steps=40", "trainer.save_every=0",
            "trainer.per_device_batch_size=2"]  # fmt: skip
    code, last = start_and_signal([str(BIN / "rlalign"), "train", *args], out, signal.SIGTERM, after_step=3)
    assert code == 0 and last < 40
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == [f"step-{last:07d}"], (
        "one complete checkpoint at the stopping step, no .tmp"
    )
    ck = ckpts[0]
    assert json.loads((ck / "COMPLETE").read_text())["step"] == last
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == last
    for name in ("model.safetensors", "optimizer.pt", "scheduler.json", "recipe.yaml", "rng/rank-0.json"):
        assert (ck / name).is_file(), name
    assert not (out / "final").exists()
    rlalign("train", *args, "trainer.resume=auto", "trainer.max_steps=40")
    assert [m["step"] for m in metrics(out)] == list(range(1, 41))


def test_partial_checkpoint_is_ignored(tmp_path):
    """A crash mid-save leaves a .tmp folder (or a folder without COMPLETE): resume never picks it."""
    out = tmp_path / "run"
    rlalign("train", TINY, f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.save_every=1")
    ck = out / "checkpoints"
    (ck / "step-0000003.tmp").mkdir()
    (ck / "step-0000003.tmp" / "model.safetensors").write_bytes(b"partial")
    (ck / "step-0000004").mkdir()  # no COMPLETE marker
    proc = rlalign("train", TINY, f"trainer.output_dir={out}", "trainer.max_steps=3", "trainer.resume=auto")
    assert "resumed from" in proc.stdout + proc.stderr and "step-0000002" in proc.stdout + proc.stderr
    assert not (ck / "step-0000003.tmp").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_rollout_objective_resume_draws_the_same_samples(tmp_path):
    """GRPO: samples are seeded by the step, so re-running steps 3-4 from the step-2 checkpoint gives
    the uninterrupted run's losses and rewards bitwise."""
    out = tmp_path / "grpo"
    args = [
        "recipes/test/tiny-grpo.yaml",
        f"trainer.output_dir={out}",
        "trainer.max_steps=4",
        "trainer.save_every=2",
    ]
    rlalign("train", *args)
    full = metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    proc = rlalign("train", *args, "trainer.resume=auto")
    assert "step-0000002" in proc.stdout + proc.stderr
    again = metrics(out)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    assert [(m["loss"], m["reward_mean"]) for m in again] == [(m["loss"], m["reward_mean"]) for m in full]
