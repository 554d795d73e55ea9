"""Preemption under a real launcher: `rlalign launch -- accelerate launch ...` on 2 CPU processes. A SIGTERM
(to the wrapper, as a container runtime sends it, or to every process of the job, as SLURM does) ends with a
complete checkpoint at the stopping step, every process gone and exit 0; resume then continues to the
uninterrupted run's losses."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, ROOT, TINY, launch_cmd, losses, make_env, metrics, run

ARGS = [TINY, "trainer.max_steps=12", "trainer.save_every=0", "trainer.per_device_batch_size=1"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    run(launch_cmd("ddp-8gpu.yaml", 2, *ARGS, f"trainer.output_dir={out}"))
    return out


def alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.distributed
@pytest.mark.parametrize(
    "target",
    ["wrapper", pytest.param("every-process", marks=pytest.mark.slow)],
    ids=["wrapper", "every-process"],
)
def test_sigterm_checkpoints_exits_zero_and_resumes(full_run, tmp_path, target):
    out = tmp_path / "run"
    cmd = [
        str(BIN / "rlalign"),
        "launch",
        "--grace",
        "120",
        "--",
        *launch_cmd("ddp-8gpu.yaml", 2, *ARGS, f"trainer.output_dir={out}"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=make_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before the signal:\n{proc.stdout.read()[-3000:]}"
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    workers = [p for p in tree if "rlalign.cli" in " ".join(p.cmdline()) and "launch" not in p.cmdline()]
    assert len(workers) >= 2, [p.cmdline() for p in tree]
    for p in tree if target == "every-process" else tree[:1]:
        p.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=240)
    log = proc.stdout.read()
    assert code == 0, log[-4000:]
    assert not alive(tree), "no process of the run may survive"
    last = metrics(out)[-1]["step"]
    assert 3 <= last < 12, "the run must really stop early"
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == [f"step-{last:07d}"], "one complete checkpoint at the stopping step"
    assert json.loads((ckpts[0] / "COMPLETE").read_text())["step"] == last
    assert not (out / "final").exists()
    assert "Traceback" not in log and "SignalException" not in log, log[-4000:]
    run(launch_cmd("ddp-8gpu.yaml", 2, *ARGS, f"trainer.output_dir={out}", "trainer.resume=auto"))
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))
    assert losses(out) == pytest.approx(losses(full_run), abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_plain_accelerate_launch_reports_sigterm_as_failure(tmp_path):
    """Why the wrapper exists: torch elastic under plain `accelerate launch` turns SIGTERM into exit 1
    even though the workers checkpoint (if this starts passing, the wrapper may be dropped)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        launch_cmd("ddp-8gpu.yaml", 2, *ARGS, f"trainer.output_dir={out}"),
        cwd=ROOT,
        env=make_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) != 0
    assert "SignalException" in proc.stderr.read()


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_distributed_rank_leaves_without_interpreter_teardown(world_size):
    """A rank of a launched run (WORLD_SIZE > 1) exits through `os._exit` once its command is done: the
    gloo abort at interpreter teardown cannot happen, since teardown (here, an atexit hook) never runs;
    yet its output is flushed (stdout is a pipe, block-buffered) and its exit code is the command's."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('teardown ran', flush=True))\n"
        "from rlalign.cli import main\n"
        "sys.argv = ['rlalign', 'validate', sys.argv[1]]\n"
        "sys.exit(main())\n"
    )
    env = make_env(WORLD_SIZE=world_size, RANK="0", LOCAL_RANK="0")
    env.pop("PYTHONUNBUFFERED")
    proc = subprocess.run(
        [str(BIN / "python"), "-c", code, TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ok  {TINY}" in proc.stdout
    assert ("teardown ran" in proc.stdout) == (world_size == "1")
