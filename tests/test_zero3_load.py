"""A checkpoint loads partitioned under ZeRO-3: every rank holds about half the weights at every moment of
loading, for the policy and for the `copy` reference, and trains exactly as the whole model in one process;
with LoRA too (adapter-only checkpoints, the merged export).

The checkpoint: the built-in Llava widened to 143M parameters (text 768 wide, 24 layers), stored in bfloat16
and loaded as float32, so a whole load must allocate every parameter (a float32 checkpoint would be
memory-mapped, and a mapped file is not counted). Memory is the peak anonymous resident set while the
model loads (`rlalign.utils.memory.PeakMemory`, in run_info.json), with glibc told to return freed
blocks at once (`MALLOC_MMAP_THRESHOLD_`): by default it keeps them, and the resident set then counts
every module gathered and released since the start as if it were still held.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LIVE_MEMORY, assert_loaded_partitioned, launch_cmd, make_env, metrics, rlalign, run
from safetensors.torch import load_file

from rlalign.config.schema import TinyModelConfig
from rlalign.models.tiny import build_tiny_llava
from rlalign.shapes import ShapesConfig

pytestmark = pytest.mark.distributed

RECIPE = "recipes/test/tiny-dpo.yaml"


def single_and_zero3(tmp_path: Path, common: list[str], env: dict) -> tuple[Path, Path]:
    """The recipe in one process (4 rows a step) and under 2-process ZeRO-3 (2 rows each): the same steps."""
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    rlalign("train", RECIPE, *common, f"trainer.output_dir={single}", env=env)
    args = (*common, f"trainer.output_dir={zero3}", "trainer.per_device_batch_size=2")
    run(launch_cmd("zero3-8gpu.yaml", 2, RECIPE, *args), env=env)
    return single, zero3


@pytest.mark.slow
def test_zero3_loads_partitioned_and_trains_as_the_whole_model(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny = TinyModelConfig(vision_hidden=32, text_hidden=768, text_layers=24, vocab_size=400)
    model, processor = build_tiny_llava(tiny, ShapesConfig(seed=0, image_size=48))
    model.to(torch.bfloat16).save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    del model
    # lr 1e-5: Adam turns float-noise gradient differences on near-zero gradients into lr-sized updates
    common = [f"model.name_or_path={ckpt}", "trainer.max_steps=2", "optim.lr=1e-5"]
    single, zero3 = single_and_zero3(tmp_path, common, make_env(**LIVE_MEMORY))
    assert_loaded_partitioned(single, zero3, "zero3")


def test_lora_from_a_checkpoint_under_zero3_matches_one_process(tmp_path):
    """LoRA on a partitioned checkpoint, `copy` reference loaded again: the adapter-only checkpoint (gathered
    from the partitions, adapters only) and the merged export equal the single process's."""
    ckpt = tmp_path / "ckpt"
    model, processor = build_tiny_llava(TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400))
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    common = [
        f"model.name_or_path={ckpt}",
        "model.lora.r=4",
        "model.lora.target_modules=[q_proj, v_proj]",
        "trainer.max_steps=2",
        "trainer.export_final=true",
    ]
    single, zero3 = single_and_zero3(tmp_path, common, make_env())
    assert json.loads((zero3 / "run_info.json").read_text())["loading"]["partitioned"] is True
    assert [m["loss"] for m in metrics(zero3)] == pytest.approx(
        [m["loss"] for m in metrics(single)], abs=1e-5
    )
    for path in ("checkpoints/step-0000002/model.safetensors", "final/model.safetensors"):
        ours, whole = load_file(str(zero3 / path)), load_file(str(single / path))
        assert sorted(ours) == sorted(whole)
        if "checkpoints" in path:
            assert ours and all("lora_" in name for name in ours)
        for name, value in whole.items():
            torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-5, msg=f"{path}: {name}")
