"""`model.attn_implementation`: the kernel reaches the model, eager and SDPA give the same DPO numbers on packed
rows, flash-attention (no block masks) runs preference pairs unpacked, and a missing kernel is one line."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import metrics, one_line_error, rlalign

from rlalign.data import build_data
from rlalign.models.builder import build_policy
from rlalign.objectives.dpo import DPOObjective
from rlalign.recipe import load_recipe


@pytest.mark.slow
def test_eager_and_sdpa_give_the_same_dpo_run(tmp_path):
    runs = {}
    for impl in ("sdpa", "eager"):
        out = tmp_path / impl
        rlalign(
            "train",
            "recipes/test/tiny-dpo.yaml",
            f"model.attn_implementation={impl}",
            f"trainer.output_dir={out}",
            "trainer.max_steps=2",
        )
        runs[impl] = metrics(out)
    for key in ("loss", "rewards/margins", "val/loss"):
        assert [m.get(key) for m in runs["eager"]] == pytest.approx(
            [m.get(key) for m in runs["sdpa"]], abs=1e-5
        )


def test_kernel_reaches_the_model_and_flash_runs_pairs_unpacked():
    recipe = load_recipe("recipes/test/tiny-dpo.yaml", ["model.attn_implementation=eager"])
    model, processor = build_policy(recipe.model, recipe.data)
    assert model.config._attn_implementation == "eager"
    packed = build_data("preferences", recipe, processor, DPOObjective).collate
    recipe.model.attn_implementation = "flash_attention_2"
    unpacked = build_data("preferences", recipe, processor, DPOObjective).collate
    assert (packed.packed, unpacked.packed) == (True, False)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_missing_flash_attention_is_one_line(tmp_path):
    proc = rlalign(
        "validate",
        "recipes/test/tiny-dpo.yaml",
        "--set",
        "model.attn_implementation=flash_attention_2",
        check=False,
    )
    one_line_error(proc, "model.attn_implementation", "flash-attn")
