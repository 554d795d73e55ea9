"""POPE on the shapes world: yes/no object questions written in POPE's own file format, so they are
scored by exactly the path that scores real POPE (`rlalign eval pope`).

An object is a coloured shape ("red circle"). As POPE builds its questions (`utils.pope` in its
repository): for each image, each of its objects in turn is asked about (label `yes`) and followed by
one absent object (label `no`), never one the image holds or one already asked about that image. The
absent object is drawn by one of three strategies:
- `random`: uniformly among the objects of the question set;
- `popular`: the most frequent object of the question set (number of images holding it);
- `adversarial`: the object that co-occurs most often with the positive just asked (number of images
  holding both); when every co-occurring object is excluded, a random one, as POPE does.
Ties go to the alphabetically first object (POPE's are broken by dictionary order); the random draws
are seeded per (seed, split, image), so a split is the same on every machine. Where rlalign departs:
POPE keeps only images with at least `sample_num` objects; a shapes image asks about all of its (1-3)
distinct objects, so every image is used and there are as many `yes` as `no` questions.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlalign.evaluation.pope import SPLITS
from rlalign.shapes import ShapesConfig, make_item, pope_question
from rlalign.utils.io import atomic_write_text


@dataclass(frozen=True, kw_only=True)
class ShapesPopeConfig:
    """Which shapes images the questions are about."""

    shapes: ShapesConfig = ShapesConfig()
    """The shapes world (seed, image size, objects per image)."""
    split: str = "test"
    """Shapes split the images come from."""
    images: int = 100
    """Number of images (items 0..images-1 of the split)."""

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"images must be >= 1, got {self.images}")


def image_objects(objects: Sequence[dict] | Sequence[object]) -> list[str]:
    """The distinct objects ("colour shape") of one image, in the image's order."""
    names = [f"{o['color']} {o['shape']}" if isinstance(o, dict) else f"{o.color} {o.shape}" for o in objects]
    return list(dict.fromkeys(names))


def frequencies(images: Sequence[Sequence[str]]) -> Counter:
    """Number of images holding each object."""
    return Counter(obj for objs in images for obj in set(objs))


def co_occurrences(images: Sequence[Sequence[str]]) -> dict[str, Counter]:
    """For each object, the number of images holding it together with each other object."""
    out: dict[str, Counter] = {}
    for objs in images:
        for a in set(objs):
            out.setdefault(a, Counter()).update(b for b in set(objs) if b != a)
    return out


def _ranked(counts: Counter) -> list[str]:
    """Most counted first, ties alphabetical."""
    return sorted(counts, key=lambda obj: (-counts[obj], obj))


def _negative(order: Sequence[str], universe: Sequence[str], excluded: set[str], rng: random.Random) -> str:
    """The first object of `order` not excluded, else a uniform draw among the rest of `universe`."""
    neg = next((obj for obj in order if obj not in excluded), None)
    if neg is not None:
        return neg
    left = [obj for obj in universe if obj not in excluded]
    if not left:
        raise ValueError(f"no absent object left to ask about (all of {len(universe)} excluded)")
    return rng.choice(left)


def sample_questions(
    images: Sequence[Sequence[str]], strategy: str, rngs: Sequence[random.Random]
) -> list[list[tuple[str, str]]]:
    """Per image, the (object, label) pairs of its questions: each positive followed by its negative."""
    if strategy not in SPLITS:
        raise ValueError(f"unknown POPE strategy '{strategy}' (valid: {', '.join(SPLITS)})")
    universe = sorted(frequencies(images))
    popular = _ranked(frequencies(images))
    co = {obj: _ranked(counts) for obj, counts in co_occurrences(images).items()}
    out = []
    for objs, rng in zip(images, rngs):
        asked: list[str] = []
        questions = []
        for pos in objs:
            asked.append(pos)
            order = popular if strategy == "popular" else co.get(pos, []) if strategy == "adversarial" else []
            neg = _negative(order, universe, set(objs) | set(asked), rng)
            asked.append(neg)
            questions += [(pos, "yes"), (neg, "no")]
        out.append(questions)
    return out


def _rng(cfg: ShapesPopeConfig, index: int) -> random.Random:
    digest = hashlib.sha256(f"shapes-pope:{cfg.shapes.seed}:{cfg.split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def question(obj: str) -> str:
    """POPE's template, with "an" before a vowel (the same text XE's yes/no questions train on)."""
    return pope_question(obj)


def question_file(out: Path, strategy: str) -> Path:
    return out / f"shapes_pope_{strategy}.jsonl"


def write_shapes_pope(
    out: Path, cfg: ShapesPopeConfig, strategies: Sequence[str] = SPLITS
) -> dict[str, Path]:
    """Write `images/<image_id>.png` and `shapes_pope_<strategy>.jsonl` (POPE's format: `question_id`,
    `image`, `text`, `label`) under `out`; returns the question file of each strategy."""
    items = [make_item(cfg.shapes, cfg.split, i) for i in range(cfg.images)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for item in items:
        item.image.save(out / "images" / f"{item.image_id}.png")
    objects = [image_objects(item.objects) for item in items]
    files = {}
    for strategy in strategies:
        rngs = [_rng(cfg, i) for i in range(len(items))]
        rows, qid = [], 1
        for item, questions in zip(items, sample_questions(objects, strategy, rngs)):
            for obj, label in questions:
                image = f"images/{item.image_id}.png"
                row = {
                    "question_id": qid,
                    "image": image,
                    "text": question(obj),
                    "label": label,
                    "object": obj,
                }
                rows.append(json.dumps(row))
                qid += 1
        path = question_file(out, strategy)
        atomic_write_text(path, "\n".join(rows) + "\n")
        files[strategy] = path
    return files
