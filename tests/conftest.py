"""Shared helpers: run the real CLI and the real launcher in subprocesses, read what runs wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = "recipes/test/tiny-xe.yaml"


def make_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    env.pop("WANDB_API_KEY", None)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    cmd: list[str], *, env: dict | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env or make_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def rlalign(*args: str, **kw) -> subprocess.CompletedProcess:
    return run([str(BIN / "rlalign"), *args], **kw)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A refused command: exit 2, one `error:` line holding every needle, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def accelerate_cmd(config: str, nproc: int, *target: str, port: int | None = None) -> list[str]:
    """`accelerate launch` with a shipped launch file on `nproc` CPU processes, running `target` (a script, or
    `-m module ...`)."""
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        f"launch/{config}",
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(port or free_port()),
        *target,
    ]


def launch_cmd(
    config: str, nproc: int, *args: str, port: int | None = None, extra: tuple[str, ...] = ()
) -> list[str]:
    return accelerate_cmd(config, nproc, *extra, "-m", "rlalign.cli", "train", *args, port=port)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc returns freed blocks at once: the resident set then counts live memory only (`utils.memory`)."""


def assert_loaded_partitioned(single: Path, ours: Path, engine: str) -> None:
    """`ours` (2 processes under `engine`) loaded its checkpoint partitioned: each rank peaked at about half
    the parameter bytes for the policy and the reference, where `single` (one process) held them whole;
    then both trained alike, step by step."""
    whole = json.loads((single / "run_info.json").read_text())["loading"]
    info = json.loads((ours / "run_info.json").read_text())
    assert (info["engine"], info["world_size"]) == (engine, 2)
    loading = info["loading"]
    assert (whole["partitioned"], loading["partitioned"]) == (False, True)
    for name in ("policy", "reference"):
        params = loading[name]["parameter_bytes"]
        assert params == whole[name]["parameter_bytes"] > 5e8
        # the probe sees a whole load: one process holds the whole model (and the reference is its copy)
        assert whole[name]["peak_bytes_per_rank"][0] / params > 0.95, whole
        # partitioned: half per rank, plus what is being filled at the time and the loader's own allocations
        fractions = [peak / params for peak in loading[name]["peak_bytes_per_rank"]]
        assert len(fractions) == 2 and all(0.45 < f <= 0.6 for f in fractions), (name, fractions)
    # the partitions hold the checkpoint's weights: the runs agree step by step (margins are 0.1 x differences
    # of log-probs near -130 summed in float32 in another order: 1e-4 absolute is 1e-6 of those)
    keys = ("loss", "grad_norm", "rewards/margins", "val/loss", "val/logps/chosen")
    assert len(metrics(ours)) == 2 and "val/loss" in metrics(ours)[-1]
    for a, b in zip(metrics(ours), metrics(single), strict=True):
        present = [k for k in keys if k in b]
        assert [a.get(k) for k in present] == pytest.approx([b[k] for k in present], rel=1e-4, abs=1e-4)


@pytest.fixture(scope="session")
def single_run(tmp_path_factory) -> Path:
    """The single-process reference: tiny recipe, global batch 4, 5 steps."""
    out = tmp_path_factory.mktemp("single")
    rlalign("train", TINY, f"trainer.output_dir={out}", "trainer.per_device_batch_size=4")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and leaves the other core to whoever shares the machine
    (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
