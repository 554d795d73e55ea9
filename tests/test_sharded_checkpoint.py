"""FSDP2 checkpoints through torch.distributed.checkpoint: each of 2 ranks writes its own shards (nothing
gathered: no full `model.safetensors` or `optimizer.pt`, and neither rank's file holds the whole model), a
run resumed from them continues the uninterrupted run to 1e-6, and `rlalign eval` reads the shards into one
process (the weights equal the final export's, saved at the same step)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY, launch_cmd, losses, metrics, run
from safetensors.torch import load_file

from rlalign.evaluation.runner import load_eval_model

pytestmark = pytest.mark.distributed

STEPS = 6
ARGS = [TINY, "trainer.per_device_batch_size=2", "trainer.save_every=3", f"trainer.max_steps={STEPS}"]


def test_fsdp2_sharded_checkpoint_resumes_and_loads(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(launch_cmd("fsdp2-8gpu.yaml", 2, *ARGS, f"trainer.output_dir={full}"))
    ckpt = full / "checkpoints" / "step-0000003"
    names = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"], names
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.pt").exists()
    export = load_file(str(full / "final" / "model.safetensors"))
    model_bytes = sum(t.numel() * t.element_size() for t in export.values())
    # AdamW holds two moments per parameter: a whole model + its optimizer state would be ~3x model_bytes;
    # each rank's file holds about half of that
    for rank in (0, 1):
        size = (ckpt / "sharded" / f"__{rank}_0.distcp").stat().st_size
        assert 1.2 * model_bytes < size < 2.2 * model_bytes, (rank, size, model_bytes)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= manifest["files"].keys()

    # the same run cut after step 3 (its step-3 checkpoint copied in), then resumed
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, cut / "checkpoints" / ckpt.name)
    (cut / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(full)[:3]))
    run(launch_cmd("fsdp2-8gpu.yaml", 2, *ARGS, f"trainer.output_dir={cut}", "trainer.resume=auto"))
    assert [m["step"] for m in metrics(cut)] == list(range(1, STEPS + 1))
    assert losses(cut)[3:] == pytest.approx(losses(full)[3:], abs=1e-6)
    resumed = load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.allclose(resumed[k], export[k], atol=1e-6) for k in export)

    # the last checkpoint (step 6) read whole into one process equals the final export
    model, _ = load_eval_model(str(full / "checkpoints" / "step-0000006"))
    state = model.state_dict()
    assert all(torch.equal(state[k], export[k]) for k in export), "checkpoint shards differ from the export"
