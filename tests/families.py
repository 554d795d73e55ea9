"""Tiny random-weight checkpoints of real VLM families, saved the way the hub ships them, offline.

Llava-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3 and Gemma 3: byte-level BPE tokenizers trained here on a
six-line corpus, Pillow image processors (no torchvision), configs of hidden size 32-64 and one layer,
so each builds and runs in well under a second. Shared by the tests of the model layer, the per-family
parity tests and the support matrix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from rlalign.bench.arch import QWEN_SPECIALS

CORPUS = [
    "a red circle on the left",
    "two blue squares at the top",
    "a green triangle in the center",
    "describe the image",
    "what is in the picture",
    "a yellow diamond near the bottom right",
]
PROMPTS = ["describe the image", "what is in the picture"]
RESPONSES = ["a red circle on the left", "two blue squares"]


def images() -> list[Image.Image]:
    """Two pictures of different sizes (Qwen2-VL gives them different numbers of image tokens)."""
    a = Image.new("RGB", (40, 32), (16, 16, 24))
    ImageDraw.Draw(a).ellipse((4, 4, 20, 20), fill=(220, 40, 40))
    b = Image.new("RGB", (32, 48), (16, 16, 24))
    ImageDraw.Draw(b).rectangle((8, 20, 28, 40), fill=(50, 90, 230))
    return [a, b]


def rows() -> list[dict]:
    return [{"image": im, "prompt": p, "response": r} for im, p, r in zip(images(), PROMPTS, RESPONSES)]


def bpe(specials: list[str], **roles: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on CORPUS; `specials` get the first ids, `roles` name bos/eos/pad/unk."""
    tok = Tokenizer(models.BPE(unk_token=roles["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **roles)


# -- tiny checkpoints of real families, saved as the hub ships them ----------------------------------

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def save_llava(path: Path) -> None:
    tok = bpe(
        ["<pad>", "<s>", "</s>", "<unk>", "<image>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return bpe(list(QWEN_SPECIALS), pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>")


def qwen_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def save_qwen_parts(path: Path, tok: PreTrainedTokenizerFast) -> None:
    """Tokenizer, preprocessor_config.json and chat template, as on the hub (no processor object:
    the stock Qwen2-VL processor cannot be constructed without torchvision)."""
    tok.save_pretrained(path)
    # patch 4, merge 2: a 40x32 image is 10x8 patches = 20 image tokens, a 32x48 one 24.
    Qwen2VLImageProcessorPil(
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=64,
        max_pixels=4096,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))


def save_qwen2_vl(path: Path) -> None:
    tok = qwen_tokenizer()
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **qwen_ids(tok),
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    save_qwen_parts(path, tok)


def save_qwen2_5_vl(path: Path) -> None:
    tok = qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[0],
        ),
        **qwen_ids(tok),
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    save_qwen_parts(path, tok)


def save_idefics3(path: Path, split: bool = False) -> None:
    """Idefics3; `split`: images resized to a longest edge of 64 and cut into 32-pixel crops plus a global
    view, as the hub's processors do (so a batch's rows hold different numbers of sub-images)."""
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<unk>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        "<end_of_utterance>",
    ]
    tok = bpe(
        specials,
        bos_token="<|begin_of_text|>",
        pad_token="<|end_of_text|>",
        eos_token="<end_of_utterance>",
        unk_token="<unk>",
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64 if split else 32},
        max_image_size={"longest_edge": 32},
        do_image_splitting=split,
    )
    # image 32, patch 8: 16 patches, pixel-shuffled by scale_factor 2 into 4 image tokens.
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        ),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


def save_llava_next(path: Path, pinpoints: list[list[int]] | None = None) -> None:
    """LLaVA-NeXT (1.6): each image is tiled at the best of two grid resolutions, so the two images()
    get different numbers of tiles (pixel_values padded per image, `image_sizes` says the real size)
    and of image tokens. `pinpoints`: other grid resolutions ([[32, 32], [64, 32]] gives a square-ish
    image one tile besides its base view and a wide one two)."""
    tok = bpe(
        ["<pad>", "<s>", "</s>", "<unk>", "<image>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    pinpoints = pinpoints or [[32, 64], [64, 32]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def save_gemma3(path: Path) -> None:
    """Gemma 3: image tokens attend to each other both ways (`token_type_ids` marks them) and most layers
    see a sliding window; a packed row's 4D mask would replace that window, so its pairs are not packed."""
    specials = [
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    roles = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tok = bpe(
        specials,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        unk_token="<unk>",
        extra_special_tokens=roles,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    # image 32, patch 8: 4 x 4 patches, average-pooled into 2 x 2 = 4 image tokens.
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4
    )
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=len(tok),
            # a window shorter than a prompt: the sliding layer's mask differs from a plain causal one
            sliding_window=16,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises its image projection to zero: image tokens would enter the text model as zero
    # vectors (a degenerate point of its RMSNorm), unlike any trained checkpoint.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    model.save_pretrained(path)
    processor.save_pretrained(path)


FAMILIES: dict[str, Callable[[Path], None]] = {
    "llava": save_llava,
    "llava_next": save_llava_next,
    "qwen2_vl": save_qwen2_vl,
    "qwen2_5_vl": save_qwen2_5_vl,
    "idefics3": save_idefics3,
    "gemma3": save_gemma3,
}
"""model_type -> builder writing a tiny checkpoint of that family into a folder."""
