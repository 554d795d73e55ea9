"""`rlalign bench grpo|dpo --arch qwen2-vl`: the real-architecture config has Qwen2-VL-7B's widths (checked on the
meta device, no weights), and both benchmarks run end to end through the CLI at toy widths (hidden
`--test-dims`), ours against TRL, each ending with its JSON line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rlalign
from transformers import Qwen2VLForConditionalGeneration

from rlalign.bench.arch import LORA, LORA_TARGETS, QWEN2_VL_7B, TEST_DIMS, qwen2_vl_config, qwen_tokenizer
from rlalign.shapes import ShapesConfig


def meta_model(dims, text_layers: int, vision_layers: int):
    config = qwen2_vl_config(dims, text_layers, vision_layers, qwen_tokenizer(ShapesConfig()))
    with torch.device("meta"):
        return config, Qwen2VLForConditionalGeneration(config)


def test_qwen2_vl_config_has_7b_widths():
    config, model = meta_model(QWEN2_VL_7B, text_layers=2, vision_layers=3)
    text, vision = config.text_config, config.vision_config
    assert text.hidden_size == 3584
    assert text.num_attention_heads == 28
    assert text.num_key_value_heads == 4
    assert text.intermediate_size == 18944
    assert text.vocab_size == 152064
    assert text.rope_parameters["rope_theta"] == 1_000_000.0
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rms_norm_eps == 1e-6
    assert text.num_hidden_layers == 2
    assert not config.tie_word_embeddings
    assert (vision.embed_dim, vision.num_heads, vision.patch_size, vision.spatial_merge_size) == (
        1280,
        16,
        14,
        2,
    )
    assert vision.hidden_size == 3584  # the merger's output: the text width
    assert vision.depth == 3
    h, kv = 3584, 512  # 4 KV heads of 128
    by_hand = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * 18944 + 2 * h
    layers = model.model.language_model.layers
    assert len(layers) == 2
    assert all(sum(p.numel() for p in layer.parameters()) == by_hand for layer in layers)
    assert QWEN2_VL_7B.text_layer_parameters() == by_hand
    assert (
        tuple(model.lm_head.weight.shape)
        == tuple(model.get_input_embeddings().weight.shape)
        == (152064, 3584)
    )
    assert all(p.device.type == "meta" for p in model.parameters())


def lora_parameters(model, r: int) -> int:
    """LoRA A and B of rank r on every text projection named in LORA_TARGETS."""
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.model.language_model.named_modules()
        if name.split(".")[-1] in LORA_TARGETS
    )


TOY = ["--arch", "qwen2-vl", "--layers", "1", "--vision-layers", "1", "--test-dims", "--reps", "1"]
TOY += ["--steps", "1", "--image-size", "56"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("bench", "extra"),
    [("grpo", ["--images", "1", "--group", "2", "--max-new-tokens", "2"]), ("dpo", ["--batch", "2"])],
)
def test_bench_real_arch_runs(bench, extra):
    proc = rlalign("bench", bench, *TOY, *extra, timeout=240)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["bench"], result["peer"], result["arch"]) == (bench, "trl", "qwen2-vl")
    assert (result["layers"], result["vision_layers"], result["image_size"]) == (1, 1, 56)
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # the model both sides trained: the saved toy Qwen2-VL of one text and one vision layer, plus our adapters
    _, model = meta_model(TEST_DIMS, text_layers=1, vision_layers=1)
    base = sum(p.numel() for p in model.parameters())
    assert result["params"] == base + lora_parameters(model, LORA["r"])
    for side in ("ours", "peer"):
        assert result[f"{side}_samples_per_s"] > 0
        assert result[f"{side}_tokens_per_s_per_device"] > 0
        assert result[f"{side}_peak_mem_bytes"] > 0
    assert result["ratio"] == pytest.approx(
        result["ours_samples_per_s"] / result["peer_samples_per_s"], rel=0.05
    )
