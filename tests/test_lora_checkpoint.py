"""LoRA checkpoints hold the adapters only (the frozen base is referenced by name and fingerprint): a small
fraction of a full checkpoint, resuming exactly, and refusing another base."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import metrics, one_line_error, rlalign
from safetensors.torch import load_file

LORA = ["model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]", "model.freeze_vision=true"]
RUN = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=2", "trainer.export_final=false"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    rlalign("train", "recipes/test/tiny-xe.yaml", *LORA, *RUN, f"trainer.output_dir={out}")
    return out


def test_adapter_only_checkpoint_is_small(lora_run, tmp_path):
    full = tmp_path / "full"
    rlalign(
        "train",
        "recipes/test/tiny-xe.yaml",
        "trainer.max_steps=1",
        "trainer.export_final=false",
        f"trainer.output_dir={full}",
    )
    ckpt = lora_run / "checkpoints/step-0000002"
    adapter = (ckpt / "model.safetensors").stat().st_size
    whole = (full / "checkpoints/step-0000001/model.safetensors").stat().st_size
    assert adapter <= 0.1 * whole, (adapter, whole)
    names = set(load_file(str(ckpt / "model.safetensors")))
    assert names and all("lora_" in n for n in names)
    base = json.loads((ckpt / "base.json").read_text())
    info = json.loads((lora_run / "run_info.json").read_text())
    assert base["parameters"] == info["parameters"] - info["trainable_parameters"]


def test_adapter_checkpoint_resumes_exactly(lora_run, tmp_path):
    """Resuming from the step-2 adapters (the base rebuilt by the run) gives the uninterrupted steps 3 and 4."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(lora_run / "checkpoints/step-0000002", out / "checkpoints/step-0000002")
    rlalign(
        "train", "recipes/test/tiny-xe.yaml", *LORA, *RUN, f"trainer.output_dir={out}", "trainer.resume=auto"
    )
    resumed = {m["step"]: m["loss"] for m in metrics(out)}
    whole = {m["step"]: m["loss"] for m in metrics(lora_run)}
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)], abs=1e-6)


def test_adapter_checkpoint_refuses_another_base(lora_run, tmp_path):
    out = tmp_path / "other"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(lora_run / "checkpoints/step-0000002", out / "checkpoints/step-0000002")
    proc = rlalign(
        "train",
        "recipes/test/tiny-xe.yaml",
        *LORA,
        *RUN,
        "model.tiny.init_seed=1",
        f"trainer.output_dir={out}",
        "trainer.resume=auto",
        check=False,
    )
    one_line_error(
        proc, "trainer.resume", "adapter weights over base 'builtin:tiny-llava'", "must name the same base"
    )
