"""`export_final` of a LoRA run, through the real CLI: `final/` is a plain HF checkpoint whose outputs are the
adapter model's (the adapters merged into the base weights), loadable by `from_pretrained` alone."""

from __future__ import annotations

import torch
from conftest import TINY, rlalign
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from rlalign.data import build_data
from rlalign.models.builder import build_policy
from rlalign.recipe import load_recipe


def test_lora_export_equals_unmerged_adapter_model(tmp_path):
    out = tmp_path / "lora"
    args = [f"trainer.output_dir={out}", "model.lora.r=4", "trainer.max_steps=3", "optim.lr=1e-2"]
    rlalign("train", TINY, *args)
    final = out / "final"
    assert not any("lora" in k for k in load_file(final / "model.safetensors"))
    merged = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)

    recipe = load_recipe(TINY, args)
    adapter, _ = build_policy(recipe.model, recipe.data)  # peft model, adapters unmerged
    # the checkpoint holds the adapters only (the base is the recipe's own): they fill every LoRA weight
    result = adapter.load_state_dict(
        load_file(out / "checkpoints/step-0000003/model.safetensors"), strict=False
    )
    assert not result.unexpected_keys and all("lora_" not in k for k in result.missing_keys)
    base, _ = build_policy(load_recipe(TINY, args[:1]).model, recipe.data)
    data = build_data("captions", recipe, processor)
    batch = data.collate([data.val[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = adapter.eval()(**inputs).logits
        got = merged(**inputs).logits
        untrained = base.eval()(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - untrained).abs().max() > 1e-2  # the adapters trained: merging them changes the outputs
