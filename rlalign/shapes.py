"""The shapes world: the embedded default data that runs anywhere.

Each item is an image with 1-3 coloured shapes, each in its own cell of a 3x3 grid, at least five
reference captions from a small grammar with paraphrases, and the ground truth (shape, colour,
grid position, pixel box) of every object, so hallucination can be measured exactly.

Everything is generated from `(seed, split, index)`: the same item comes back on every machine,
every run, in every process, with no file on disk.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
}
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# Paraphrases of each canonical word; every surface form maps back to one canonical word.
SHAPE_SYNONYMS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond",),
}
POSITION_PHRASES = {
    "top left": ("in the top left", "at the top left", "in the upper left corner"),
    "top": ("at the top", "in the top middle", "near the top"),
    "top right": ("in the top right", "at the top right", "in the upper right corner"),
    "left": ("on the left", "at the left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "in the bottom middle", "near the bottom"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the lower right corner"),
}
SHAPE_WORDS = {w: canon for canon, ws in SHAPE_SYNONYMS.items() for w in ws}
COLOR_WORDS = {c: c for c in COLORS}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUND = (16, 16, 24)


@dataclass(frozen=True, kw_only=True)
class ShapesConfig:
    """How the shapes world is drawn."""

    seed: int = 0
    """Base seed; item i of a split is drawn from a hash of (seed, split, i)."""
    image_size: int = 48
    """Side of the square image in pixels."""
    min_objects: int = 1
    """Fewest shapes in one image."""
    max_objects: int = 3
    """Most shapes in one image (at most 9, one per grid cell)."""
    captions_per_image: int = 5
    """Reference captions per image (distinct paraphrases)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 9, got {self.min_objects}..{self.max_objects}"
            )
        if self.image_size < 24:
            raise ValueError(f"image_size must be at least 24 pixels, got {self.image_size}")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {self.captions_per_image}")


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    position: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass
class ShapesItem:
    image_id: str
    image: Image.Image
    captions: list[str]
    objects: list[ShapeObject] = field(default_factory=list)


def _rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"shapes:{seed}:{split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _draw(objects: list[ShapeObject], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return image


def _phrase(obj: ShapeObject, rng: random.Random, with_position: bool) -> str:
    words = f"a {obj.color} {rng.choice(SHAPE_SYNONYMS[obj.shape])}"
    return f"{words} {rng.choice(POSITION_PHRASES[obj.position])}" if with_position else words


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_for(objects: list[ShapeObject], rng: random.Random, count: int) -> list[str]:
    """At least `count` distinct captions from the grammar (templates x order x synonyms)."""
    n = len(objects)
    plural = "shape" if n == 1 else "shapes"
    templates = [
        lambda objs: _join([_phrase(o, rng, True) for o in objs]),
        lambda objs: "there is " + _join([_phrase(o, rng, True) for o in objs]),
        lambda objs: f"{NUMBER_WORDS[n]} {plural} : " + _join([_phrase(o, rng, False) for o in objs]),
        lambda objs: "an image of " + _join([_phrase(o, rng, False) for o in objs]),
        lambda objs: _join([_phrase(o, rng, True) for o in objs]) + " on a dark background",
        lambda objs: (
            f"a picture with {NUMBER_WORDS[n]} {plural} , " + _join([_phrase(o, rng, True) for o in objs])
        ),
    ]
    out: list[str] = []
    for attempt in range(200):
        order = list(objects)
        rng.shuffle(order)
        caption = templates[attempt % len(templates)](order)
        if caption not in out:
            out.append(caption)
        if len(out) == count:
            break
    return out


def make_item(config: ShapesConfig, split: str, index: int, *, draw: bool = True) -> ShapesItem:
    """Item `index` of `split`: the same every time for the same config (`draw=False`: no pixels)."""
    rng = _rng(config.seed, split, index)
    n = rng.randint(config.min_objects, config.max_objects)
    cells = rng.sample(range(len(POSITIONS)), n)
    cell = config.image_size / 3
    objects = []
    for c in sorted(cells):
        row, col = divmod(c, 3)
        half = int(cell * rng.uniform(0.3, 0.45))
        cx = int(col * cell + cell / 2 + rng.uniform(-1.5, 1.5))
        cy = int(row * cell + cell / 2 + rng.uniform(-1.5, 1.5))
        objects.append(
            ShapeObject(
                shape=rng.choice(SHAPES),
                color=rng.choice(list(COLORS)),
                position=POSITIONS[c],
                box=(cx - half, cy - half, cx + half, cy + half),
            )
        )
    captions = captions_for(objects, rng, config.captions_per_image)
    return ShapesItem(
        image_id=f"shapes-{split}-{index:06d}",
        image=_draw(objects, config.image_size) if draw else Image.new("RGB", (1, 1)),
        captions=captions,
        objects=objects,
    )


def mentioned(text: str) -> tuple[set[str], set[str]]:
    """Canonical shapes and colours a caption mentions."""
    words = text.lower().replace(",", " ").split()
    return {SHAPE_WORDS[w] for w in words if w in SHAPE_WORDS}, {w for w in words if w in COLOR_WORDS}


# longest first, so "at the top left" is not read as "at the top"
_PHRASE_TO_POSITION = dict(
    sorted(((ph, pos) for pos, phs in POSITION_PHRASES.items() for ph in phs), key=lambda kv: -len(kv[0]))
)


def mentioned_objects(text: str) -> set[tuple[str, str, str | None]]:
    """(colour, shape, position or None) of every "a <colour> <shape> [<position phrase>]" in a caption."""
    words = text.lower().replace(",", " ").split()
    found = set()
    for i in range(len(words) - 1):
        if words[i] in COLOR_WORDS and words[i + 1] in SHAPE_WORDS:
            rest = " ".join(words[i + 2 : i + 7])
            position = next((pos for ph, pos in _PHRASE_TO_POSITION.items() if rest.startswith(ph)), None)
            found.add((words[i], SHAPE_WORDS[words[i + 1]], position))
    return found


def corpus(config: ShapesConfig, n_items: int = 500) -> list[str]:
    """Captions of the first `n_items` training items, plus every grammar word, for the tokenizer."""
    texts = [c for i in range(n_items) for c in make_item(config, "train", i, draw=False).captions]
    vocab = list(SHAPE_WORDS) + list(COLORS) + [p for ps in POSITION_PHRASES.values() for p in ps]
    return texts + [" ".join(vocab)]


# -- questions with exact answers (the `shapes_vqa` data source) ----------------------------------
VQA_KINDS = ("count", "count_color", "color_of")


def vqa_question(objects: list[ShapeObject], rng: random.Random) -> tuple[str, str, str]:
    """(kind, question, exact answer) about an item's objects:
    - `how many shapes are there ?` -> the number of shapes (`1`..`3`);
    - `how many <colour> shapes are there ?` -> how many have that colour (`0`..`3`: any of the five colours
      is asked about, absent ones too);
    - `what color is the <shape> ?` -> its colour, asked only when exactly one shape of that kind is present
      (otherwise the item asks the first question)."""
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    kind = rng.choice(VQA_KINDS)
    unique = sorted(s for s in set(shapes) if shapes.count(s) == 1)
    if kind == "color_of" and unique:
        shape = rng.choice(unique)
        return kind, f"what color is the {shape} ?", colors[shapes.index(shape)]
    if kind == "count_color":
        color = rng.choice(list(COLORS))
        return kind, f"how many {color} shapes are there ?", str(colors.count(color))
    return "count", "how many shapes are there ?", str(len(objects))


def make_vqa_item(config: ShapesConfig, split: str, index: int) -> tuple[ShapesItem, str, str, str]:
    """Shapes item `index` of `split` and its question: (item, kind, question, answer), the same every time."""
    item = make_item(config, split, index)
    kind, text, answer = vqa_question(item.objects, _rng(config.seed, f"vqa-{split}", index))
    return item, kind, text, answer


# -- yes/no object questions (POPE's template; XE's `data.yes_no_questions`) ---------------------------
POPE_TEMPLATE = "Is there a {} in the image?"
OBJECTS = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
"""Every object of the world: a coloured shape ("red circle"), the unit POPE and CHAIR count."""


def pope_question(obj: str) -> str:
    """POPE's question about `obj`, with "an" before a vowel."""
    return POPE_TEMPLATE.format(obj) if obj[0] not in "aeiou" else f"Is there an {obj} in the image?"


def yes_no_question(objects: list[ShapeObject], rng: random.Random, answer: str) -> tuple[str, str]:
    """(question, answer) about one object: for `yes` one of the image's objects, for `no` one of the
    world's objects the image does not hold, each drawn uniformly (POPE's `random` negatives)."""
    present = sorted({f"{o.color} {o.shape}" for o in objects})
    if answer == "yes":
        return pope_question(rng.choice(present)), "yes"
    if answer != "no":
        raise ValueError(f"answer must be 'yes' or 'no', got {answer!r}")
    return pope_question(rng.choice([o for o in OBJECTS if o not in present])), "no"


def make_yes_no_item(config: ShapesConfig, split: str, index: int, size: int) -> tuple[ShapesItem, str, str]:
    """Question `index` about the items 0..size-1 of `split`: item `index % size`, answer `yes` for even
    indices and `no` for odd ones (as many of each); (item, question, answer), the same every time."""
    item = make_item(config, split, index % size)
    question, answer = yes_no_question(
        item.objects, _rng(config.seed, f"yes-no-{split}", index), "yes" if index % 2 == 0 else "no"
    )
    return item, question, answer
