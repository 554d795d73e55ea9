"""DDP, ZeRO-2, ZeRO-3 and FSDP2 for real: 2 CPU processes over gloo, launched with `accelerate launch`
and the files in launch/, against the single-process run with the same global batch."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, TINY, free_port, launch_cmd, losses, make_env, metrics, run

pytestmark = pytest.mark.distributed

CASES = [
    ("ddp-8gpu.yaml", "ddp", "DistributedDataParallel", False),
    pytest.param("zero2-8gpu.yaml", "zero2", "DeepSpeedEngine", False, marks=pytest.mark.slow),
    ("zero3-8gpu.yaml", "zero3", "DeepSpeedEngine", True),
    pytest.param(
        "fsdp2-8gpu.yaml", "fsdp2", "FSDPModule", True, marks=pytest.mark.slow
    ),  # torchrun FSDP2 stays
]


@pytest.mark.parametrize(
    ("config", "engine", "model_class", "sharded"), CASES, ids=["ddp", "zero2", "zero3", "fsdp2"]
)
def test_two_processes_match_single(tmp_path, single_run, config, engine, model_class, sharded):
    out = tmp_path / engine
    run(launch_cmd(config, 2, TINY, f"trainer.output_dir={out}", "trainer.per_device_batch_size=2"))
    info = json.loads((out / "run_info.json").read_text())
    assert info["engine"] == engine and info["world_size"] == 2
    assert info["model_class"] == model_class
    if sharded:  # each rank holds about half of the parameters
        assert all(0.45 < f < 0.56 for f in info["param_fraction_per_rank"]), info
        assert sum(info["param_fraction_per_rank"]) == pytest.approx(1.0, abs=0.02)
    else:
        assert info["param_fraction_per_rank"] == [1.0, 1.0]
    ours, ref = losses(out), losses(single_run)
    assert len(ours) == len(ref) == 5
    assert ours == pytest.approx(ref, abs=1e-5)
    # throughput per device is the whole run's over the 2 ranks; the busiest rank's peak memory is its own
    for m in metrics(out):
        assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2, rel=1e-9)
        assert 0.05 < m["memory/peak_gb"] < 24


@pytest.mark.slow
def test_simulated_two_nodes_match_two_processes(tmp_path):
    """launch/multinode.sh on two 'nodes' (machine ranks 0 and 1, main process on 127.0.0.1), as the
    SLURM script runs it, trains together and gives the 2-process single-node losses."""
    port = free_port()
    out_nodes, out_single = tmp_path / "nodes", tmp_path / "single-node"
    common = dict(
        NNODES="2",
        GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_CONFIG="launch/multinode-2x8-ddp.yaml",
    )
    args = [
        "bash",
        "launch/multinode.sh",
        TINY,
        f"trainer.output_dir={out_nodes}",
        "trainer.per_device_batch_size=2",
    ]
    procs = [
        subprocess.Popen(
            args,
            cwd=ROOT,
            env=make_env(NODE_RANK=str(r), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    info = json.loads((out_nodes / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["engine"] == "ddp"
    run(
        launch_cmd(
            "ddp-8gpu.yaml", 2, TINY, f"trainer.output_dir={out_single}", "trainer.per_device_batch_size=2"
        )
    )
    assert losses(out_nodes) == pytest.approx(losses(out_single), abs=1e-6)


def test_torchrun_fsdp2_matches_single(tmp_path, single_run):
    """launch/torchrun.sh (no accelerate launcher) with distributed.backend=fsdp2."""
    out = tmp_path / "torchrun"
    env = make_env(NPROC="2", MASTER_PORT=str(free_port()))
    run(
        [
            "bash",
            "launch/torchrun.sh",
            TINY,
            f"trainer.output_dir={out}",
            "trainer.per_device_batch_size=2",
            "distributed.backend=fsdp2",
        ],
        env=env,
    )
    info = json.loads((out / "run_info.json").read_text())
    assert (info["engine"], info["world_size"], info["model_class"]) == ("fsdp2", 2, "FSDPModule")
    assert losses(out) == pytest.approx(losses(single_run), abs=1e-5)
