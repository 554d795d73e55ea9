"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"): of the objects a caption
mentions, which are not in the image.

    CHAIR-i = hallucinated object mentions / all object mentions      (over the whole set)
    CHAIR-s = captions with at least one hallucinated mention / all captions

Objects are found as the reference `chair.py` finds them: every word (or multi-word phrase) of the
caption that is in the synonym list counts as one mention of that list's object, repeated mentions
counted again; a mention is hallucinated when its object is not among the image's ground-truth objects.
The synonym file has CHAIR's format: one object per line, `canonical, synonym, synonym, ...` (COCO's 80
objects where the user has the list). On the shapes world the objects are the coloured shapes ("red
circle", with every shape paraphrase) and the bare shapes ("circle"), and the ground truth is exact.

Where rlalign departs from the reference script, and why:
- Tokens are `rewards.text.normalize`d (lowercase, punctuation dropped) instead of NLTK-tokenised, and a
  plural is made singular by rule (-ies/-ves/-es/-s and a few irregular nouns) when that gives a word of
  the list, instead of with `pattern.en` (neither package is a dependency).
- Multi-word objects come from the synonym file itself (the longest phrase wins: "hot dog" is not a
  dog), instead of a fixed list of COCO double words; CHAIR's other hard-coded COCO rules ("baby bird"
  -> bird, "passenger jet" -> jet, "toilet seat" -> toilet) are written as synonyms in the file when
  wanted (`bird, baby bird, adult bird`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlalign.data.images import BadRowError
from rlalign.rewards.text import tokenize
from rlalign.shapes import COLORS, SHAPE_SYNONYMS

_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
}


@dataclass(frozen=True)
class Mention:
    words: str
    """The caption's words that name the object (after singularisation)."""
    obj: str
    """The canonical object."""


class ObjectVocabulary:
    """Surface phrases -> canonical objects, and the object mentions of a caption."""

    def __init__(self, groups: Iterable[Sequence[str]], *, where: str = "synonyms"):
        self.phrases: dict[tuple[str, ...], str] = {}
        for line, group in enumerate(groups):
            names = [tuple(tokenize(name)) for name in group]
            if not names or not names[0]:
                raise BadRowError(f"{where} line {line + 1}: no object name")
            canonical = " ".join(names[0])
            for name in filter(None, names):
                if self.phrases.get(name, canonical) != canonical:
                    clash = f"'{' '.join(name)}' is already a synonym of '{self.phrases[name]}'"
                    raise BadRowError(f"{where} line {line + 1}: {clash}")
                self.phrases[name] = canonical
        if not self.phrases:
            raise BadRowError(f"{where}: no objects")
        self.objects = frozenset(self.phrases.values())
        self.words = frozenset(w for phrase in self.phrases for w in phrase)
        self.longest = max(len(p) for p in self.phrases)

    @classmethod
    def from_file(cls, path: Path) -> ObjectVocabulary:
        """CHAIR's synonym file: one object per line, `canonical, synonym, ...`; blank lines ignored."""
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such synonym file")
        lines = [line.split(",") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return cls(lines, where=str(path))

    def singular(self, word: str) -> str:
        """`word`, or its singular when the word is not in the list and the singular is."""
        if word in self.words:
            return word
        candidates = [_IRREGULAR.get(word, "")]
        if word.endswith("ies"):
            candidates.append(word[:-3] + "y")
        if word.endswith("ves"):
            candidates += [word[:-3] + "f", word[:-3] + "fe"]
        if word.endswith("es"):
            candidates.append(word[:-2])
        if word.endswith("s"):
            candidates.append(word[:-1])
        return next((c for c in candidates if c in self.words), word)

    def mentions(self, caption: str) -> list[Mention]:
        """Every object mention, in caption order; at each word the longest listed phrase wins."""
        words = [self.singular(w) for w in tokenize(caption)]
        out, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                obj = self.phrases.get(tuple(words[i : i + n]))
                if obj is not None:
                    out.append(Mention(" ".join(words[i : i + n]), obj))
                    i += n
                    break
            else:
                i += 1
        return out

    def canonical(self, name: str) -> str | None:
        """The object a ground-truth name stands for, or None if the list lacks it."""
        return self.phrases.get(tuple(self.singular(w) for w in tokenize(name)))


def shapes_vocabulary() -> ObjectVocabulary:
    """The shapes world's objects: each colour with each shape (all paraphrases), and each bare shape."""
    groups = [
        [f"{color} {shape}"] + [f"{color} {w}" for w in words if w != shape]
        for color in COLORS
        for shape, words in SHAPE_SYNONYMS.items()
    ]
    return ObjectVocabulary(groups + [list(words) for words in SHAPE_SYNONYMS.values()], where="shapes world")


def shapes_truth(objects: Sequence[dict]) -> set[str]:
    """The ground-truth objects of a shapes image in `shapes_vocabulary` terms."""
    return {f"{o['color']} {o['shape']}" for o in objects} | {o["shape"] for o in objects}


@dataclass(frozen=True)
class ChairResult:
    chair_i: float
    chair_s: float
    captions: int
    mentions: int
    hallucinated_mentions: int
    hallucinated_captions: int
    per_caption: list[dict]
    """Per caption: its mentions (`[words, object]`) and the hallucinated ones."""

    def metrics(self) -> dict[str, float | int]:
        return {k: v for k, v in self.__dict__.items() if k != "per_caption"}


def chair(captions: Sequence[str], truths: Sequence[set[str]], vocab: ObjectVocabulary) -> ChairResult:
    """CHAIR-i and CHAIR-s of `captions` against each image's ground-truth objects (canonical names)."""
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions for {len(truths)} images")
    mentions = bad_mentions = bad_captions = 0
    per_caption = []
    for caption, truth in zip(captions, truths):
        found = vocab.mentions(caption)
        bad = [m for m in found if m.obj not in truth]
        mentions += len(found)
        bad_mentions += len(bad)
        bad_captions += bool(bad)
        per_caption.append(
            {"mentions": [[m.words, m.obj] for m in found], "hallucinated": [[m.words, m.obj] for m in bad]}
        )
    return ChairResult(
        chair_i=bad_mentions / mentions if mentions else 0.0,
        chair_s=bad_captions / len(captions) if captions else 0.0,
        captions=len(captions),
        mentions=mentions,
        hallucinated_mentions=bad_mentions,
        hallucinated_captions=bad_captions,
        per_caption=per_caption,
    )


def shapes_chair(captions: Sequence[str], objects: Sequence[Sequence[dict]]) -> ChairResult:
    """CHAIR of captions of shapes images against each image's exact ground truth (its `objects`)."""
    return chair(captions, [shapes_truth(o) for o in objects], shapes_vocabulary())
