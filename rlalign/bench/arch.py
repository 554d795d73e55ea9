"""Real-architecture models for `rlalign bench grpo|dpo --arch qwen2-vl`: Qwen2-VL-7B at its real width.

The text model has Qwen2-VL-7B's hidden size, heads, KV heads, MLP width, vocabulary and M-RoPE, the
vision tower its patch embedding, width, heads and merger (out to the text width); only the depths
are chosen (`--layers`, `--vision-layers`: a few on a CPU, the full 28 and 32 on a GPU). Weights are
random (built from the config, seeded), saved with `save_pretrained` beside a byte-level BPE tokenizer
trained on the shapes captions, a Pillow image processor and Qwen's chat template, so both trainers
of a benchmark load the same folder the way they load a hub checkpoint. Nothing is downloaded.

Full fine-tuning at this width does not fit a small machine (embeddings and LM head alone are 1.1B
parameters), so both sides train the same LoRA adapters (`LORA`) with the adapter-disabled model as
reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from rlalign.shapes import ShapesConfig, corpus

ARCHES = ("tiny", "qwen2-vl")
"""`tiny`: the built-in tiny Llava (the benchmarks' historical figures); `qwen2-vl`: Qwen2-VL-7B's widths."""


@dataclass(kw_only=True, frozen=True)
class Qwen2VLDims:
    """Widths of a Qwen2-VL model (the defaults are Qwen2-VL-7B's config.json); depths are chosen apart."""

    hidden: int = 3584
    """Text hidden size (also the vision merger's output)."""
    heads: int = 28
    """Text attention heads (head dim 128)."""
    kv_heads: int = 4
    """Text key/value heads (grouped-query attention)."""
    intermediate: int = 18944
    """Text MLP width."""
    vocab: int = 152064
    """Rows of the embedding and the LM head (the tokenizer is far smaller: ids past it decode to nothing)."""
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    """M-RoPE split of half the head dim over (time, height, width)."""
    rms_norm_eps: float = 1e-6
    max_positions: int = 32768
    vision_embed: int = 1280
    """Vision tower width."""
    vision_heads: int = 16
    patch: int = 14
    merge: int = 2
    """Spatial merge: 2 x 2 patches become one image token."""

    def __post_init__(self) -> None:
        head_dim = self.hidden // self.heads
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden {self.hidden}, heads {self.heads}, kv heads {self.kv_heads} do not divide"
            )
        if 2 * sum(self.mrope_section) != head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to half the head dim {head_dim}")

    def text_layer_parameters(self) -> int:
        """Parameters of one text decoder layer, by hand: q (with bias), k and v (with bias), o, the gated MLP
        and two RMSNorm weights."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h


QWEN2_VL_7B = Qwen2VLDims()
TEST_DIMS = Qwen2VLDims(
    hidden=64,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=1024,
    mrope_section=(2, 3, 3),
    vision_embed=32,
    vision_heads=2,
)
"""Same structure at toy widths, for the test of the `--arch qwen2-vl` path (hidden `--test-dims`)."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The text model's attention and MLP projections (the vision tower's are named qkv/proj/fc1/fc2)."""
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer(shapes: ShapesConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's special tokens, trained on the shapes captions (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(QWEN_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(shapes), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def qwen2_vl_config(
    dims: Qwen2VLDims, text_layers: int, vision_layers: int, tok: PreTrainedTokenizerFast
) -> Qwen2VLConfig:
    ids = tok.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(
            hidden_size=dims.hidden,
            intermediate_size=dims.intermediate,
            num_hidden_layers=text_layers,
            num_attention_heads=dims.heads,
            num_key_value_heads=dims.kv_heads,
            vocab_size=dims.vocab,
            max_position_embeddings=dims.max_positions,
            rms_norm_eps=dims.rms_norm_eps,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": dims.rope_theta,
                "mrope_section": list(dims.mrope_section),
            },
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(
            depth=vision_layers,
            embed_dim=dims.vision_embed,
            hidden_size=dims.hidden,
            num_heads=dims.vision_heads,
            mlp_ratio=4,
            patch_size=dims.patch,
            spatial_merge_size=dims.merge,
            temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def save_qwen2_vl(
    path: Path,
    *,
    text_layers: int,
    vision_layers: int,
    dtype: torch.dtype,
    shapes: ShapesConfig,
    dims: Qwen2VLDims = QWEN2_VL_7B,
    seed: int = 0,
    device: str = "cpu",
) -> None:
    """A random-weight Qwen2-VL checkpoint in `path`, saved as the hub ships one (no processor object: the
    stock one needs torchvision; `rlalign.models.families.load_processor` assembles it from these files).
    A `shapes.image_size` multiple of patch x merge (28) is kept as is: 112 pixels -> 16 image tokens.
    The weights are drawn on `device` (a GPU draws a full-depth model in seconds)."""
    tok = qwen_tokenizer(shapes)
    config = qwen2_vl_config(dims, text_layers, vision_layers, tok)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    del model
    tok.save_pretrained(path)
    side = dims.patch * dims.merge
    Qwen2VLImageProcessorPil(
        patch_size=dims.patch,
        merge_size=dims.merge,
        temporal_patch_size=2,
        min_pixels=side * side,
        max_pixels=max(shapes.image_size, side) ** 2,
    ).save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))


def lora_overrides(path: Path, dtype: str, image_size: int) -> list[str]:
    """Recipe overrides pointing a test recipe at the saved checkpoint: LoRA on `LORA_TARGETS`, the
    adapter-disabled reference, the weights' dtype and the image size the checkpoint was saved for."""
    return [
        f"model.name_or_path={path}",
        "model.tiny=null",
        f"model.dtype={dtype}",
        f"model.lora.r={LORA['r']}",
        f"model.lora.alpha={LORA['alpha']}",
        f"model.lora.dropout={LORA['dropout']}",
        f"model.lora.target_modules=[{','.join(LORA_TARGETS)}]",
        "model.reference=adapter_disabled",
        f"data.image_size={image_size}",
    ]


def peft_lora():
    """The same adapters for TRL's `peft_config`."""
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=list(LORA_TARGETS)
    )


def bench_checkpoint(a: Any, folder: Path) -> Path:
    """The checkpoint a benchmark's `--arch` asks for (attributes `layers`, `vision_layers`, `dtype`,
    `image_size`, `test_dims` of its parsed arguments), saved under `folder`."""
    from rlalign.models.builder import DTYPES

    path = folder / a.arch
    save_qwen2_vl(
        path,
        text_layers=a.layers,
        vision_layers=a.vision_layers,
        dtype=DTYPES[a.dtype],
        shapes=ShapesConfig(image_size=a.image_size),
        dims=TEST_DIMS if a.test_dims else QWEN2_VL_7B,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    return path
