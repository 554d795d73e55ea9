"""The demo policy: a tiny Llava-architecture VLM (CLIP-style vision tower + Llama text model).

Built from a config with random weights, a byte-level BPE tokenizer trained on the shapes corpus in
milliseconds, and a Pillow image processor (no torchvision). It is an ordinary
`LlavaForConditionalGeneration` + `LlavaProcessor`, so `save_pretrained` / `from_pretrained` and
every code path that serves real checkpoints serve it too.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from rlalign.config.schema import TinyModelConfig
from rlalign.shapes import ShapesConfig, corpus

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (deterministic for the same texts)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llava(
    config: TinyModelConfig, shapes: ShapesConfig | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Random-initialised tiny Llava and its processor for `shapes` images (tokenizer trained on its
    captions), identical on every call with the same configs."""
    shapes = shapes or ShapesConfig()
    image_size = shapes.image_size
    if image_size % config.patch_size:
        raise ValueError(
            f"image size {image_size} must be a multiple of model.tiny.patch_size {config.patch_size}"
        )
    tokenizer = train_tokenizer(corpus(shapes), config.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    n_image_tokens = (image_size // config.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 2,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.heads,
        image_size=image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
        initializer_range=config.init_std,
    )
    text = LlamaConfig(
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * 2,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=config.init_std,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    llava.pad_token_id = tokenizer.pad_token_id
    llava.eos_token_id = tokenizer.eos_token_id
    llava.bos_token_id = tokenizer.bos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor
