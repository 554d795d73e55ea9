"""The pair builder's two family-dependent steps on every family's tiny checkpoint (tests/families.py):
the vision-tower embedding of the pool, and the refill's batched log-likelihoods; and a build with no pair."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from families import FAMILIES, images, save_idefics3, save_llava_next
from PIL import Image, ImageDraw

from rlalign.models.families import load_processor
from rlalign.models.vision_features import pooled_image_features
from rlalign.pairs.builder import response_logprobs
from rlalign.retrieval.embedder import find_vision_tower

NAMES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3")
BUILDERS = {
    **FAMILIES,
    # grids at which pool()'s images get 1, 2 and 1 tiles besides their base view: a batch pads tiles
    "llava_next": partial(save_llava_next, pinpoints=[[32, 32], [64, 32]]),
    # crops: pool()'s images get 4, 4 and 2 crops besides their global view: a batch pads sub-images
    "idefics3": partial(save_idefics3, split=True),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory, request) -> tuple:
    from transformers import AutoModelForImageTextToText

    path: Path = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](path)
    return AutoModelForImageTextToText.from_pretrained(path).eval(), load_processor(str(path))


def pool() -> list[Image.Image]:
    """Three pictures of three sizes (three numbers of Qwen patches; padding in a batch of them)."""
    wide = Image.new("RGB", (56, 24), (240, 240, 240))
    ImageDraw.Draw(wide).polygon([(4, 20), (20, 4), (36, 20)], fill=(30, 160, 60))
    return [*images(), wide]


def own_pipeline_features(model: torch.nn.Module, processor, image: Image.Image) -> torch.Tensor:
    """The oracle: the model's own `get_image_features` on one image, with the tower's output (and, for
    Idefics3, its patch mask) caught by a hook; its mean over patch tokens (CLIP's CLS left out)."""
    tower = find_vision_tower(model)
    caught = {}

    def hook(module, args, kwargs, output):
        caught.update(hidden=output.last_hidden_state, mask=kwargs.get("patch_attention_mask"))

    enc = processor.image_processor([[image]], return_tensors="pt")
    handle = tower.register_forward_hook(hook, with_kwargs=True)
    try:
        model.model.get_image_features(**enc)
    finally:
        handle.remove()
    hidden = caught["hidden"]
    if caught["mask"] is not None:  # Idefics3: sub-images without a CLS token, padded patches masked
        return hidden[caught["mask"].flatten(1)].mean(dim=0)
    if hidden.ndim == 2:  # Qwen: patch-major, one image
        return hidden.mean(dim=0)
    return hidden[:, 1:].flatten(0, 1).mean(dim=0)  # each tile's first token (CLIP's CLS) left out


@pytest.mark.parametrize("family", NAMES, indirect=True)
@torch.no_grad()
def test_pooled_features_are_the_towers_own_per_image(family):
    """A batch of three sizes gives each image the mean of the patch features the model's own image path
    computes for it alone (Qwen: patches cut per image by its grid; LLaVA-NeXT: real tiles only; Idefics3:
    padded patches masked)."""
    model, processor = family
    images = pool()
    batch = pooled_image_features(find_vision_tower(model), processor.image_processor, images, "mean")
    assert batch.shape[0] == 3 and batch.dtype == torch.float32
    for i, image in enumerate(images):
        expected = own_pipeline_features(model, processor, image).float()
        torch.testing.assert_close(batch[i], expected, atol=1e-5, rtol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # different images, different vectors


@pytest.mark.parametrize("family", ["qwen2_vl"], indirect=True)
def test_cls_pooling_is_refused_where_there_is_no_pooled_vector(family):
    model, processor = family
    with pytest.raises(ValueError, match="pooling 'cls'.*use 'mean'"):
        pooled_image_features(find_vision_tower(model), processor.image_processor, pool()[:1], "cls")


@pytest.mark.parametrize("family", NAMES, indirect=True)
@torch.no_grad()
def test_refill_logprobs_equal_each_sequence_alone(family):
    """`response_logprobs` batches prompts of different lengths (left padding: images of different
    sizes give Qwen different numbers of image tokens) with each image's inputs repeated per candidate;
    every sum equals a forward of that prompt + response alone, with no padding."""
    from rlalign.data.collate import encode_prompts
    from rlalign.ops import token_logprobs

    model, processor = family
    images, prompt = pool(), "describe the image"
    texts = ["a red circle", "two blue squares at the top", "a green triangle", "a red circle on the left"]
    groups = [0, 1, 2, 1]
    got = response_logprobs(model, processor, images, prompt, texts, groups)
    for text, g, value in zip(texts, groups, got):
        enc = dict(encode_prompts(processor, [images[g]], [prompt]))
        response = torch.tensor([processor.tokenizer(text, add_special_tokens=False)["input_ids"]])
        p = enc["input_ids"].shape[1]
        enc["input_ids"] = torch.cat([enc["input_ids"], response], 1)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in enc:
                enc[key] = torch.cat([enc[key], torch.zeros_like(response)], 1)
        logits = model(**enc).logits[:, p - 1 : -1]
        expected = token_logprobs(logits, response).sum()
        assert float(value) == pytest.approx(float(expected), abs=1e-4)


def test_a_build_where_no_image_gives_a_pair_writes_an_empty_dataset(tmp_path):
    """No chosen answer holds a maskable word (a custom vocabulary the shapes captions never use): every
    shard is empty, and the dataset is an empty table with the pair columns, not an error."""
    import json

    import pyarrow.parquet as pq
    from conftest import TINY, make_env, rlalign

    out = tmp_path / "pairs"
    rlalign(
        "pairs",
        "build",
        TINY,
        "trainer.output_dir=unused",
        f"pairs.output_dir={out}",
        f"pairs.embedder.cache_dir={tmp_path / 'cache'}",
        "pairs.pool_size=8",
        "pairs.shard_size=4",
        "pairs.vocabulary=custom",
        "pairs.custom_words={object: [zebra]}",
        env=make_env(HF_HOME=str(tmp_path / "hf-home")),
    )
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["pool"], stats["pairs"], stats["shards"]) == (8, 0, 2)
    table = pq.read_table(out / "pairs.parquet")
    assert table.num_rows == 0
    assert {"images", "prompt", "chosen", "rejected", "retrieved_images"} <= set(table.column_names)
