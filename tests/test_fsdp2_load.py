"""A checkpoint loads sharded under FSDP2: the model is built on the meta device, `fully_shard`ed, and only
each rank's shards are allocated and filled from the checkpoint (`rlalign.models.sharded_load`), for the
policy and for the `copy` reference; the runs equal the whole model in one process (full and LoRA: losses,
exports) and resume from their sharded checkpoints.

The slow test mirrors tests/test_zero3_load.py (its notes on the checkpoint and on memory apply here): the
143M-parameter checkpoint stored in bfloat16 and loaded as float32, so a whole load must allocate every
parameter, while rank 0 broadcasts the memory-mapped tensors one at a time.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import LIVE_MEMORY, assert_loaded_partitioned, launch_cmd, make_env, metrics, rlalign, run
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from rlalign.config.schema import TinyModelConfig
from rlalign.models.sharded_load import checkpoint_sources, empty_model, shard_and_fill
from rlalign.models.tiny import build_tiny_llava
from rlalign.runtime import shard_fsdp2
from rlalign.shapes import ShapesConfig

RECIPE = "recipes/test/tiny-dpo.yaml"
LORA = ["model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]"]


def save_checkpoint(folder: Path, tiny: TinyModelConfig, dtype: torch.dtype = torch.float32) -> None:
    model, processor = build_tiny_llava(tiny, ShapesConfig(seed=0, image_size=48))
    model.to(dtype).save_pretrained(folder)
    processor.save_pretrained(folder)


def single_and_fsdp2(
    tmp_path: Path, name: str, common: list[str], env: dict | None = None
) -> tuple[Path, Path]:
    """The recipe in one process (4 rows a step) and under 2-process FSDP2 (2 rows each): the same steps."""
    single, fsdp2 = tmp_path / f"{name}-single", tmp_path / f"{name}-fsdp2"
    rlalign("train", RECIPE, *common, f"trainer.output_dir={single}", env=env)
    args = (*common, f"trainer.output_dir={fsdp2}", "trainer.per_device_batch_size=2")
    run(launch_cmd("fsdp2-8gpu.yaml", 2, RECIPE, *args), env=env)
    return single, fsdp2


def assert_same_export(ours: Path, whole: Path) -> None:
    a, b = (load_file(str(out / "final" / "model.safetensors")) for out in (ours, whole))
    assert sorted(a) == sorted(b)
    for name, value in b.items():
        torch.testing.assert_close(a[name], value, rtol=0, atol=1e-5, msg=name)


def common_args(ckpt: Path) -> list[str]:
    return [f"model.name_or_path={ckpt}", "trainer.max_steps=2", "trainer.export_final=true"]


def test_sharded_load_equals_from_pretrained(tmp_path):
    """One rank, in this process: a bfloat16 checkpoint with tied embeddings (saved once) loaded sharded as
    float32 equals `from_pretrained`'s model, every parameter and buffer (non-persistent `inv_freq` and
    `position_ids` included), and the tie survives."""
    model, _ = build_tiny_llava(TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400))
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    tied = type(model)(config)
    tied.load_state_dict(model.state_dict())
    tied.to(torch.bfloat16).save_pretrained(tmp_path)
    whole = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    assert whole.lm_head.weight is whole.model.language_model.embed_tokens.weight
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ours = empty_model(str(tmp_path), torch.float32, trust_remote_code=False, attn="eager")
        sources = checkpoint_sources(ours, str(tmp_path))

        def shard(m: torch.nn.Module) -> None:
            shard_fsdp2(m, 1, torch.device("cpu"), reshard=True, mixed_precision="no")
            m.to_empty(device="cpu")

        shard_and_fill(ours, sources, shard)
        assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
        full = {n: t.full_tensor() for n, t in ours.named_parameters()}
        buffers = dict(ours.named_buffers())
    finally:
        dist.destroy_process_group()
    assert sorted(full) == sorted(n for n, _ in whole.named_parameters())
    for name, value in whole.named_parameters():
        assert full[name].dtype == torch.float32 and torch.equal(full[name], value), name
    assert sorted(buffers) == sorted(n for n, _ in whole.named_buffers()) and buffers
    for name, value in whole.named_buffers():
        assert torch.equal(buffers[name], value), name


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    save_checkpoint(tmp_path / "ckpt", TinyModelConfig(vision_hidden=32, text_hidden=64, vocab_size=400))
    return tmp_path / "ckpt"


def assert_sharded_and_equal(tmp_path: Path, name: str, args: list[str]) -> Path:
    """The run under FSDP2 loads sharded and equals the single process: losses and the final export."""
    single, fsdp2 = single_and_fsdp2(tmp_path, name, args)
    info = json.loads((fsdp2 / "run_info.json").read_text())
    assert (info["engine"], info["loading"]["partitioned"]) == ("fsdp2", True), info
    assert [m["loss"] for m in metrics(fsdp2)] == pytest.approx(
        [m["loss"] for m in metrics(single)], abs=1e-5
    )
    assert_same_export(fsdp2, single)
    return fsdp2


@pytest.mark.distributed
def test_lora_from_a_checkpoint_under_fsdp2_matches_one_process(tmp_path, tiny_checkpoint):
    """The adapters, drawn on the CPU beside the meta base, are rank 0's seeded ones: the merged export
    equals the single process's."""
    assert_sharded_and_equal(tmp_path, "lora", [*common_args(tiny_checkpoint), *LORA])


@pytest.mark.distributed
def test_full_model_from_a_checkpoint_under_fsdp2_matches_one_process_and_resumes(tmp_path, tiny_checkpoint):
    # lr 1e-6: Adam moves a weight whose gradient is zero up to float noise (k_proj biases) by about lr a
    # step, either way; the exports' 1e-5 then still catches any weight loaded wrong
    args = [*common_args(tiny_checkpoint), "trainer.save_every=1", "optim.lr=1e-6"]
    full = assert_sharded_and_equal(tmp_path, "full", args)
    # the run cut after step 1 (its sharded step-1 checkpoint copied in) and resumed: the model loaded
    # sharded again, then the checkpoint's shards put in
    cut, step1 = tmp_path / "cut", full / "checkpoints" / "step-0000001"
    assert (step1 / "sharded").is_dir()
    shutil.copytree(step1, cut / "checkpoints" / step1.name)
    (cut / "metrics.jsonl").write_text(json.dumps(metrics(full)[0]) + "\n")
    args = [*args, f"trainer.output_dir={cut}", "trainer.per_device_batch_size=2", "trainer.resume=auto"]
    run(launch_cmd("fsdp2-8gpu.yaml", 2, RECIPE, *args))
    assert [m["step"] for m in metrics(cut)] == [1, 2]
    assert metrics(cut)[1]["loss"] == pytest.approx(metrics(full)[1]["loss"], abs=1e-6)
    assert_same_export(cut, full)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_loads_sharded_and_trains_as_the_whole_model(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny = TinyModelConfig(vision_hidden=32, text_hidden=768, text_layers=24, vocab_size=400)
    save_checkpoint(ckpt, tiny, torch.bfloat16)
    # lr 1e-5: Adam turns float-noise gradient differences on near-zero gradients into lr-sized updates
    common = [f"model.name_or_path={ckpt}", "trainer.max_steps=2", "optim.lr=1e-5"]
    single, fsdp2 = single_and_fsdp2(tmp_path, "big", common, make_env(**LIVE_MEMORY))
    assert_loaded_partitioned(single, fsdp2, "fsdp2")
