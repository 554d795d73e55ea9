"""POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models"): yes/no
questions "Is there a <object> in the image?" about objects that are in the image (label `yes`) and
objects that are not (label `no`, drawn at random, among the most frequent objects, or among those
that co-occur most with the image's objects).

The file format is POPE's own: JSON lines (POPE names them `.json`) with `image` (a file name, resolved
against an image folder), `text` (the question), `label` (`yes` / `no`) and usually `question_id`.

Answers are read as POPE's `evaluate.py` reads them, rule for rule, so figures compare with published
ones: keep the text before the first '.', delete commas, split on single spaces; the answer is `no` if
one of the pieces is exactly `No`, `no` or `not`, and `yes` otherwise (so "NO", "Nope" and "No!" count
as yes, and an empty answer too). Metrics: `yes` is the positive class; accuracy, precision, recall,
F1 and the share of `yes` answers. Where rlalign departs: a precision or recall whose denominator is
zero is 0 (POPE's script divides by zero), and F1 is 0 when both are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset

from rlalign.data.captions import read_data_file
from rlalign.data.images import BadRowError

LABELS = ("yes", "no")
SPLITS = ("random", "popular", "adversarial")
_NO_WORDS = frozenset({"No", "not", "no"})


def normalize_answer(text: str) -> str:
    """`yes` or `no`, by POPE's rules (see the module docstring)."""
    first = text.split(".")[0].replace(",", "")
    return "no" if _NO_WORDS.intersection(first.split(" ")) else "yes"


@dataclass(frozen=True)
class PopeScore:
    """Counts with `yes` as the positive class, and the metrics they give."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict[str, float | int]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "n": self.n,
            "accuracy": (self.tp + self.tn) / self.n if self.n else 0.0,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (self.tp + self.fp) / self.n if self.n else 0.0,
            **asdict(self),
        }


def score(answers: Sequence[str], labels: Sequence[str]) -> PopeScore:
    """POPE counts of raw `answers` (normalised here) against `labels` (`yes` / `no`)."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} questions")
    tp = fp = tn = fn = 0
    for answer, label in zip(answers, labels):
        said_yes, is_yes = normalize_answer(answer) == "yes", label == "yes"
        tp += said_yes and is_yes
        fp += said_yes and not is_yes
        tn += not said_yes and not is_yes
        fn += not said_yes and is_yes
    return PopeScore(tp=tp, fp=fp, tn=tn, fn=fn)


def split_name(path: Path) -> str:
    """`random` / `popular` / `adversarial` when the file name says so (POPE's `coco_pope_random.json`),
    else the file's stem."""
    found = [s for s in SPLITS if s in path.stem.lower()]
    return found[0] if len(found) == 1 else path.stem


def load_pope(path: Path) -> Dataset:
    """A POPE question file as a Dataset (columns `question_id`, `image`, `text`, `label`), every row
    checked: a missing column or a label other than yes/no is an error naming the file, row and column."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such POPE file")
    ds = read_data_file(path)
    if len(ds) == 0:
        raise BadRowError(f"{path}: no questions")
    for col in ("image", "text", "label"):
        if col not in ds.column_names:
            raise BadRowError(f"{path}: no column '{col}' (columns: {', '.join(ds.column_names)})")
    for row, (text, label) in enumerate(zip(ds["text"], ds["label"])):
        if label not in LABELS:
            raise BadRowError(f"{path} row {row}, column 'label': expected 'yes' or 'no', got {label!r}")
        if not isinstance(text, str) or not text.strip():
            raise BadRowError(f"{path} row {row}, column 'text': no question")
    if "question_id" not in ds.column_names:
        ds = ds.add_column("question_id", list(range(1, len(ds) + 1)))
    return ds.select_columns(["question_id", "image", "text", "label"])
