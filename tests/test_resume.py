"""Resume continues the same run: SIGKILL every process of a run after some step, flip a byte in its
newest checkpoint, resume: verification names the file, falls back to the previous checkpoint, and the
losses equal an uninterrupted run's (bitwise in one process; 1e-6 over 2 processes, ZeRO-3 included).
SIGTERM writes a complete checkpoint and exits 0."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, ROOT, TINY, launch_cmd, losses, make_env, metrics, rlalign, run
from safetensors.torch import load_file

MAX_STEPS = 10
ARGS = [
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.save_every=1",
    "trainer.keep_last=2",
    "trainer.per_device_batch_size=2",
]
WIDE = make_env(COLUMNS="1000")  # log lines unwrapped, so that a path is one word


def start_and_signal(cmd: list[str], out: Path, sig: int, after_step: int) -> tuple[int, int]:
    """Start a run, send `sig` to it once `after_step` is logged; (exit code, last logged step)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=make_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_step(proc, out, after_step, ranks=0)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    return code, metrics(out)[-1]["step"]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, ranks: int) -> None:
    """Until `step` is logged and the first `ranks` ranks wrote their pid files; the run must be alive."""
    pid_files = [out / "pids" / f"rank-{r}.pid" for r in range(ranks)]
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (
            (out / "metrics.jsonl").is_file()
            and len(metrics(out)) >= step
            and all(p.is_file() for p in pid_files)
        ):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before the signal:\n{proc.stderr.read()[-3000:]}"


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_run(cmd: list[str], out: Path, after_step: int, ranks: int) -> None:
    """Start a run, SIGKILL every worker (pids from `out/pids`) and the launcher once `after_step` is logged,
    and check that no process of the run survived and that the run had not reached its end."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=make_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    wait_for_step(proc, out, after_step, ranks)
    launcher = psutil.Process(proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]
    workers = [psutil.Process(int((out / "pids" / f"rank-{r}.pid").read_text())) for r in range(ranks)]
    assert {w.pid for w in workers} <= {p.pid for p in tree}, "the pid files name processes of this run"
    for victim in [*workers, *tree]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    proc.wait(timeout=60)
    deadline = time.time() + 10
    while time.time() < deadline and not all(gone(p) for p in tree + workers):
        time.sleep(0.05)
    assert [p.pid for p in tree + workers if not gone(p)] == [], "a process of the killed run survived"
    assert not (out / "checkpoints" / f"step-{MAX_STEPS:07d}").exists() and not (out / "final").exists(), (
        "the run must really be interrupted"
    )


def complete_checkpoints(out: Path) -> list[Path]:
    return sorted(p.parent for p in (out / "checkpoints").glob("step-*/COMPLETE"))


def assert_manifest(ck: Path, world: int) -> None:
    """The manifest lists every file of the checkpoint (every rank's) with its size and sha256, computed here
    independently; COMPLETE holds the manifest's own sha256."""
    manifest = json.loads((ck / "manifest.json").read_text())
    on_disk = sorted(
        p.relative_to(ck).as_posix()
        for p in ck.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", "COMPLETE")
    )
    assert sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (ck / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert {f"rng/rank-{r}.safetensors" for r in range(world)} <= set(on_disk)
    assert manifest["step"] == int(ck.name.removeprefix("step-"))
    assert manifest["data_order"]["world_size"] == world and manifest["data_order"]["seed"] == 0
    assert manifest["recipe"]["trainer"]["max_steps"] == MAX_STEPS
    marker = json.loads((ck / "COMPLETE").read_text())
    assert marker["manifest_sha256"] == hashlib.sha256((ck / "manifest.json").read_bytes()).hexdigest()


def flip_byte(path: Path) -> None:
    """Bit rot: one byte in the middle of the file inverted, same size."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    before = data[i]
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    after = path.read_bytes()
    assert len(after) == len(data) and after[i] != before and after[i] == before ^ 0xFF


def corrupt_newest(out: Path, pattern: str, world: int) -> tuple[Path, Path, str]:
    """Flip a byte in the file matching `pattern` of the newest complete checkpoint; (newest, previous,
    the file's path relative to the checkpoint)."""
    *_, previous, newest = complete_checkpoints(out)
    assert_manifest(previous, world)
    (target,) = newest.glob(pattern)
    flip_byte(target)
    return newest, previous, target.relative_to(newest).as_posix()


def assert_fell_back(log: str, newest: Path, previous: Path, name: str) -> None:
    assert f"checkpoint {newest} fails verification: {name}: sha256" in log
    assert f"falling back to {previous}" in log and f"resumed from {previous}" in log


def test_sigkill_resume_is_bitwise_single_process(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    rlalign("train", TINY, f"trainer.output_dir={full}", *ARGS)
    kill_run([str(BIN / "rlalign"), "train", TINY, f"trainer.output_dir={cut}", *ARGS], cut, 4, ranks=1)
    newest, previous, name = corrupt_newest(cut, "model.safetensors", world=1)
    proc = rlalign("train", TINY, f"trainer.output_dir={cut}", *ARGS, "trainer.resume=auto", env=WIDE)
    assert_fell_back(proc.stdout + proc.stderr, newest, previous, name)
    assert [m["step"] for m in metrics(cut)] == list(range(1, MAX_STEPS + 1))
    assert losses(cut) == losses(full)  # bitwise
    a, b = load_file(full / "final/model.safetensors"), load_file(cut / "final/model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        pytest.param("ddp-8gpu.yaml", "optimizer.pt", marks=pytest.mark.slow),
        ("zero3-8gpu.yaml", "deepspeed/state/*rank_1*optim_states.pt"),
        pytest.param("fsdp2-8gpu.yaml", "sharded/__1_0.distcp", marks=pytest.mark.slow),
        pytest.param("zero2-8gpu.yaml", "rng/rank-1.safetensors", marks=pytest.mark.slow),
    ],
    ids=["ddp", "zero3", "fsdp2", "zero2"],
)
def test_sigkill_resume_two_processes(tmp_path, config, pattern):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [TINY, *ARGS, "trainer.per_device_batch_size=1"]
    run(launch_cmd(config, 2, *args, f"trainer.output_dir={full}"))
    kill_run(launch_cmd(config, 2, *args, f"trainer.output_dir={cut}"), cut, 4, ranks=2)
    newest, previous, name = corrupt_newest(cut, pattern, world=2)
    proc = run(launch_cmd(config, 2, *args, f"trainer.output_dir={cut}", "trainer.resume=auto"), env=WIDE)
    assert_fell_back(proc.stdout + proc.stderr, newest, previous, name)
    assert [m["step"] for m in metrics(cut)] == list(range(1, MAX_STEPS + 1))
    assert losses(cut) == pytest.approx(losses(full), abs=1e-6)


@pytest.mark.slow
def test_sigterm_writes_complete_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "term"
    args = [
        TINY,
        f"trainer.output_dir={out}",
        "trainer.max_steps=40",
        "trainer.save_every=0",
        "trainer.per_device_batch_size=2",
    ]
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


@pytest.mark.slow
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
