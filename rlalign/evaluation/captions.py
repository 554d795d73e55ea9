"""Caption evaluation: greedy captions of a split, CIDEr-D / BLEU-4 against the references and, on the
shapes world, exact grounding metrics against the ground truth.

Grounding on the shapes world (words are mapped to canonical shapes and colours):
- `hallucination_rate`: share of mentioned shape and colour words absent from the image;
- `shape_precision` / `shape_recall`: mentioned shapes that are in the image / shapes of the image mentioned;
- `object_precision`: mentioned (colour, shape) pairs that exist as one object.
`chance/*` scores each image against the caption of another image (a fixed derangement), the level a
model that ignores its input would reach.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlalign.config.schema import DataConfig
from rlalign.data.captions import load_split
from rlalign.data.collate import encode_prompts
from rlalign.rewards import CiderD, corpus_bleu, normalize, self_bleu
from rlalign.shapes import COLOR_WORDS, NUMBER_WORDS, POSITION_PHRASES, SHAPE_WORDS, mentioned
from rlalign.utils.tensors import to_device

log = logging.getLogger(__name__)
NUMBER_NAMES = frozenset(NUMBER_WORDS.values())


@dataclass
class CaptionEval:
    metrics: dict[str, float]
    captions: list[str]
    image_ids: list[str]
    samples: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def generate_captions(
    model: torch.nn.Module,
    processor: Any,
    images: list,
    prompt: str = "",
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[str]:
    """Greedy (or sampled) captions, decoded without special tokens and stripped."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        enc = encode_prompts(processor, chunk, [prompt] * len(chunk), padding_side="left")
        enc = to_device(enc, model.device)
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
        if do_sample:
            kwargs["temperature"] = temperature
        ids = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return out


def _pairs(text: str) -> set[tuple[str, str]]:
    words = text.lower().replace(",", " ").split()
    return {
        (words[i], SHAPE_WORDS[words[i + 1]])
        for i in range(len(words) - 1)
        if words[i] in COLOR_WORDS and words[i + 1] in SHAPE_WORDS
    }


def grounding(captions: list[str], objects: list[list[dict]]) -> dict[str, float]:
    """Exact hallucination and recall figures of captions against shapes-world ground truth."""
    halluc = mentions = shape_hit = shape_said = shape_true = shape_found = pair_hit = pair_said = 0
    for caption, objs in zip(captions, objects):
        shapes, colors = mentioned(caption)
        true_shapes = {o["shape"] for o in objs}
        true_colors = {o["color"] for o in objs}
        true_pairs = {(o["color"], o["shape"]) for o in objs}
        halluc += len(shapes - true_shapes) + len(colors - true_colors)
        mentions += len(shapes) + len(colors)
        shape_hit += len(shapes & true_shapes)
        shape_said += len(shapes)
        shape_true += len(true_shapes)
        shape_found += len(shapes & true_shapes)
        pairs = _pairs(caption)
        pair_hit += len(pairs & true_pairs)
        pair_said += len(pairs)
    return {
        "hallucination_rate": halluc / max(mentions, 1),
        "shape_precision": shape_hit / max(shape_said, 1),
        "shape_recall": shape_found / max(shape_true, 1),
        "object_precision": pair_hit / max(pair_said, 1),
    }


def caption_metrics(captions: list[str], image_ids: list[str], refs: list[list[str]]) -> dict[str, float]:
    """CIDEr-D (df from the evaluated set, as pycocoevalcap) and BLEU-4 on normalised text."""
    cands = {i: normalize(c) for i, c in zip(image_ids, captions)}
    ref_map = {i: [normalize(r) for r in rs] for i, rs in zip(image_ids, refs)}
    cider, _ = CiderD().compute_corpus(cands, ref_map)
    bleu = corpus_bleu(cands, ref_map)
    return {"cider_d": float(cider), "bleu4": float(bleu[0][3])}


def load_model(path: str | Path) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(path))
    return model.eval(), AutoProcessor.from_pretrained(str(path))


def evaluate_captioner(
    model_or_path: str | Path | tuple[torch.nn.Module, Any],
    data: DataConfig,
    *,
    split: str = "test",
    limit: int | None = None,
    n_samples: int = 8,
) -> CaptionEval:
    """Greedy captions of `split` with CIDEr-D, BLEU-4 and (shapes world) grounding metrics."""
    model, processor = load_model(model_or_path) if isinstance(model_or_path, str | Path) else model_or_path
    ds = load_split(data, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    images, ids, refs = ds["image"], ds["image_id"], ds["captions"]
    captions = generate_captions(
        model, processor, images, data.prompt, max_new_tokens=data.max_response_tokens
    )
    metrics = caption_metrics(captions, ids, refs)
    if "objects" in ds.column_names:
        objects = ds["objects"]
        metrics.update(grounding(captions, objects))
        shift = np.roll(np.arange(len(refs)), 1)  # image i gets the first reference of image i-1
        metrics.update({f"chance/{k}": v for k, v in grounding([refs[j][0] for j in shift], objects).items()})
    samples = [
        {"image": images[i], "image_id": ids[i], "caption": captions[i], "refs": refs[i]}
        for i in range(min(n_samples, len(ids)))
    ]
    return CaptionEval(metrics=metrics, captions=captions, image_ids=list(ids), samples=samples)


def sample_captions(
    model: torch.nn.Module,
    processor: Any,
    data: DataConfig,
    *,
    split: str = "test",
    limit: int = 50,
    samples: int = 5,
    temperature: float = 1.0,
) -> tuple[list, list[str]]:
    """`samples` sampled captions of each of the first `limit` images of `split` (seeded, so reruns agree):
    (the images, each repeated `samples` times; the captions)."""
    ds = load_split(data, split)
    ds = ds.select(range(min(limit, len(ds))))
    images = [im for im in ds["image"] for _ in range(samples)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        caps = generate_captions(
            model,
            processor,
            images,
            data.prompt,
            max_new_tokens=data.max_response_tokens,
            do_sample=True,
            temperature=temperature,
        )
    return images, caps


def diversity_of(caps: list[str], samples: int) -> dict[str, float]:
    """distinct-1/2 (unique n-grams / n-grams over all captions) and mean self-BLEU within each group of
    `samples` consecutive captions (the samples of one image)."""
    out = {}
    for n in (1, 2):
        grams = [tuple(w[i : i + n]) for c in caps for w in [c.split()] for i in range(len(w) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / max(len(grams), 1)
    groups = [caps[i : i + samples] for i in range(0, len(caps), samples)]
    out["self_bleu"] = float(np.mean([self_bleu(g) for g in groups]))
    return out


# -- reward hacking: collapse onto one template, distance from the start --------------------------------
_POSITION_PATTERN = re.compile(
    "|".join(
        re.escape(p)
        for p in sorted({p for ps in POSITION_PHRASES.values() for p in ps}, key=len, reverse=True)
    )
)


def caption_template(text: str) -> str:
    """A caption with its content masked: position phrases -> `<where>`, colours -> `<color>`, shape words ->
    `<shape>`, number words -> `<n>`; what is left is the grammar template the caption was written in."""
    text = _POSITION_PATTERN.sub("<where>", " ".join(text.lower().split()))
    words = []
    for w in text.split():
        if w in COLOR_WORDS:
            w = "<color>"
        elif w in SHAPE_WORDS:
            w = "<shape>"
        elif w in NUMBER_NAMES:
            w = "<n>"
        words.append(w)
    return " ".join(words)


def template_collapse(captions: list[str]) -> dict[str, float]:
    """How far captions collapsed onto one way of saying things (reward hacking of CIDEr-D shows as this):
    `top_template_share`, the share of the most common `caption_template` once object lists are folded
    (`<color> <shape> and <color> <shape>` counts as one object list whatever its length), and
    `position_free_share`, the share of captions that name objects but no position ("an image of a red
    circle and a blue square": the references' n-grams without their varied position phrases)."""
    if not captions:
        return {"top_template_share": 0.0, "position_free_share": 0.0}
    templates = [caption_template(c) for c in captions]
    folded = [_fold_objects(t) for t in templates]
    top = max(folded.count(t) for t in set(folded))
    free = [("<shape>" in t and "<where>" not in t) for t in templates]
    return {"top_template_share": top / len(captions), "position_free_share": float(np.mean(free))}


def _fold_objects(template: str) -> str:
    """One `<objects>` for every run of objects (`a <color> <shape> [<where>]` joined by `,` / `and`)."""
    obj = r"an? <color> <shape>(?: <where>)?"
    return re.sub(rf"{obj}(?:(?: ,| and) {obj})*", "<objects>", template)
