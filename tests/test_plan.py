"""`rlalign plan`: parameter and optimizer figures equal what a real run measures (run_info.json) on the tiny
model, with and without LoRA; the shipped 7B recipes plan offline in an empty home."""

from __future__ import annotations

import json

import pytest
from conftest import make_env, rlalign

from rlalign.plan import GIB, count, per_rank
from rlalign.recipe import load_recipe

LORA = ["model.lora.r=4", "model.lora.target_modules=[q_proj, v_proj]", "model.freeze_vision=true"]


@pytest.mark.parametrize("extra", [pytest.param([], marks=pytest.mark.slow), LORA], ids=["full", "lora"])
def test_plan_equals_what_the_run_measures(tmp_path, extra):
    overrides = [
        "trainer.max_steps=1",
        "trainer.export_final=false",
        f"trainer.output_dir={tmp_path}",
        *extra,
    ]
    rlalign("train", "recipes/test/tiny-xe.yaml", *overrides)
    info = json.loads((tmp_path / "run_info.json").read_text())
    recipe = load_recipe("recipes/test/tiny-xe.yaml", overrides)
    counts = count(recipe)
    assert (counts.total, counts.trainable) == (info["parameters"], info["trainable_parameters"])
    assert counts.trainable < counts.total if extra else counts.trainable == counts.total
    # one process: the DDP row, AdamW's two float32 moments per trainable parameter. AdamW holds them only
    # for parameters that got a gradient: Llava never uses its vision tower's final layer norm (features come
    # from the penultimate layer), so the run holds exactly that much less when the tower trains.
    from rlalign.models.builder import build_policy

    policy, _ = build_policy(recipe.model, recipe.data)
    unused = sum(p.numel() for n, p in policy.named_parameters() if "post_layernorm" in n and p.requires_grad)
    assert unused == (0 if extra else 64)
    planned = per_rank(recipe, counts, 1, 64)["ddp"]["optimizer"]
    assert planned == 8 * counts.trainable
    assert info["optimizer_state_bytes_per_rank"] == [planned - 8 * unused]


def test_sharding_divides_what_it_shards():
    recipe = load_recipe("recipes/test/tiny-dpo.yaml")
    counts = count(recipe)
    rows = per_rank(recipe, counts, 8, 64)
    assert rows["zero3"]["weights"] == pytest.approx(rows["ddp"]["weights"] / 8)
    assert (
        rows["zero3"]["reference"] == pytest.approx(rows["ddp"]["reference"] / 8)
        and rows["ddp"]["reference"] > 0
    )
    assert rows["zero2"]["weights"] == rows["ddp"]["weights"]
    assert rows["zero2"]["gradients"] == pytest.approx(rows["ddp"]["gradients"] / 8)


def test_shipped_7b_recipe_plans_offline_in_an_empty_home(tmp_path):
    env = make_env(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    out = rlalign("plan", "realign/llava-1.5-7b-rdpo.yaml", "--gpus", "8", env=env).stdout
    # llava-1.5-7b: 7,063,427,072 parameters; LoRA r 128 on the text model's projections adds 319,815,680
    assert "parameters: 7,383,242,752 (319,815,680 trainable), bfloat16; world 8" in " ".join(out.split())
    zero3 = next(line for line in out.splitlines() if "zero3" in line)
    weights = float(zero3.split("│")[2])
    assert weights == pytest.approx(7_383_242_752 * 2 / 8 / GIB, abs=0.01)


class _GPURuntime:
    """What `throughput` asks of the runtime, as 2 ranks of an H100 would answer."""

    world_size = 2

    def peak_memory_bytes(self) -> int:
        return 3 * 2**30

    def device_name(self) -> str:
        return "NVIDIA H100 80GB HBM3"

    def all_reduce(self, t, op="sum"):
        return t


def test_throughput_per_device_and_mfu():
    from rlalign.trainer.loop import throughput

    m = throughput(samples=64, tokens=40_000, elapsed=2.0, runtime=_GPURuntime(), n_params=7_000_000_000)
    assert m["tokens_per_s"] == 20_000 and m["tokens_per_s_per_device"] == 10_000
    assert m["memory/peak_gb"] == 3.0
    # 6 x 7e9 FLOPs per token x 1e4 tokens/s per device over H100's 989 dense bf16 TFLOP/s
    assert m["mfu"] == pytest.approx(6 * 7e9 * 1e4 / 989e12, rel=1e-12)
    cpu = type("CPU", (_GPURuntime,), {"device_name": lambda self: "cpu"})()
    assert "mfu" not in throughput(64, 40_000, 2.0, cpu, 7_000_000_000)
