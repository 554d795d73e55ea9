"""DPO under ZeRO-3 for real: 2 CPU processes (accelerate launch + the real CLI) match one process with
the same global batch; the reference is a frozen ZeRO-3 copy."""

from __future__ import annotations

import json

import pytest
from conftest import launch_cmd, losses, metrics, rlalign, run

pytestmark = pytest.mark.distributed

RECIPE = "recipes/test/tiny-dpo.yaml"


@pytest.mark.slow
def test_zero3_dpo_matches_single(tmp_path):
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    rlalign("train", RECIPE, f"trainer.output_dir={single}", "trainer.per_device_batch_size=4")
    run(
        launch_cmd(
            "zero3-8gpu.yaml", 2, RECIPE, f"trainer.output_dir={zero3}", "trainer.per_device_batch_size=2"
        )
    )
    info = json.loads((zero3 / "run_info.json").read_text())
    assert (info["engine"], info["world_size"], info["model_class"]) == ("zero3", 2, "DeepSpeedEngine")
    assert all(0.45 < f < 0.56 for f in info["param_fraction_per_rank"]), info
    assert len(losses(zero3)) == 3
    assert losses(zero3) == pytest.approx(losses(single), abs=1e-5)
    for key in ("rewards/margins", "rewards/accuracies", "val/loss"):
        assert [m.get(key) for m in metrics(zero3)] == pytest.approx(
            [m.get(key) for m in metrics(single)], abs=1e-5
        )
