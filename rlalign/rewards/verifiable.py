"""Verifiable rewards (VQA, counting, maths): exact answer accuracy and output format.

Both are TRL-signature reward functions, `f(completions, prompts, **columns) -> list[float | None]`, so they
also run unchanged under TRL's `GRPOTrainer`. A completion is a string, or (conversational data) a list of
messages whose last `content` is the text.

`answer_accuracy`: 1.0 when the answer extracted from the completion equals the row's reference answer
(column `solution`, else `answer`, or the one named by `column`; a list: any of them), else 0.0; None for a row without a reference
(the rollout counts it as 0 and logs the share of such rows); with neither column, the references (`refs`,
the data's captions column), any of which may match. Extractors (`extract`):
- `answer_tag`: the text inside the last `<answer>...</answer>` (no tag: no answer, 0.0);
- `last_number`: the last number in the text (`-3`, `2.50`, `1,000`, `3/4`);
- `regex`: group 1 (or the whole match) of the last match of `pattern`;
- `full`: the whole completion.
The reference goes through the same extractor when it holds the tag (datasets often store
`<answer>2</answer>`), else is taken whole. Two answers match when both parse as numbers and are equal within
`tolerance` (relative, 1e-6 by default: `2`, `2.0` and `2.00` match), else when their normalised text is
equal (lowercase, punctuation and surrounding spaces removed, articles kept).

`format`: 1.0 when the completion fully matches `pattern` (by default one `<answer>...</answer>`, optionally
after a `<think>...</think>` block, as in DeepSeek-R1 / EasyR1 format rewards), else 0.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from rlalign.rewards.text import normalize

EXTRACTORS = ("answer_tag", "last_number", "regex", "full")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
FORMAT_PATTERN = r"\s*(?:<think>.*?</think>\s*)?<answer>.+?</answer>\s*"
ANSWER_COLUMNS = ("solution", "answer", "refs")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message's content (string or text parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


def parse_number(text: str) -> float | None:
    """`text` as a number (`1,000` -> 1000, `3/4` -> 0.75), or None."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        return None


def make_extractor(extract: str, pattern: str | None = None) -> Callable[[str], str | None]:
    """The answer extractor named `extract` (see the module docstring); None from it means no answer."""
    if extract not in EXTRACTORS:
        raise ValueError(f"extract must be one of {', '.join(EXTRACTORS)}, got '{extract}'")
    if (extract == "regex") != (pattern is not None):
        raise ValueError("pattern is needed by extract 'regex', and only by it")
    if extract == "answer_tag":
        return lambda text: found[-1].strip() if (found := ANSWER_TAG.findall(text)) else None
    if extract == "last_number":
        return lambda text: found[-1] if (found := NUMBER.findall(text)) else None
    if extract == "full":
        return lambda text: text.strip()
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"pattern '{pattern}' is not a regular expression ({err})") from None

    def by_regex(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if compiled.groups else last.group(0)).strip()

    return by_regex


def answers_match(found: str, reference: str, tolerance: float = 1e-6) -> bool:
    """Numeric equality within `tolerance` (relative) when both are numbers, else equal normalised text."""
    a, b = parse_number(found), parse_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    return normalize(found) == normalize(reference)


class AnswerAccuracy:
    """TRL-signature reward: 1.0 for the reference answer, 0.0 otherwise, None without a reference."""

    def __init__(
        self,
        extract: str = "answer_tag",
        pattern: str | None = None,
        column: str | None = None,
        tolerance: float = 1e-6,
    ) -> None:
        self.extractor = make_extractor(extract, pattern)
        self.column, self.tolerance = column, tolerance
        self.__name__ = "answer_accuracy"

    def references(self, columns: Mapping[str, Any]) -> Sequence[Any]:
        names = [self.column] if self.column else [c for c in ANSWER_COLUMNS if c in columns]
        if not names or names[0] not in columns:
            wanted = self.column or ", ".join(ANSWER_COLUMNS)
            raise KeyError(
                f"answer_accuracy: the data has no column {wanted} (columns: {', '.join(columns)})"
            )
        return columns[names[0]]

    def __call__(self, completions: Sequence[Any], prompts: Sequence[Any] = (), **columns: Any) -> list:
        refs = self.references(columns)
        out: list[float | None] = []
        for completion, ref in zip(completions, refs, strict=True):
            if ref is None or (isinstance(ref, str) and not ref.strip()):
                out.append(None)
                continue
            found = self.extractor(completion_text(completion))
            hit = found is not None and any(
                answers_match(found, _reference(r), self.tolerance)
                for r in (ref if isinstance(ref, list) else [ref])
            )
            out.append(float(hit))
        return out


def _reference(value: Any) -> str:
    """A reference answer: the text inside its last `<answer>` tag when it has one, else all of it."""
    tagged = ANSWER_TAG.findall(str(value))
    return tagged[-1].strip() if tagged else str(value).strip()


class FormatReward:
    """TRL-signature reward: 1.0 when the whole completion matches `pattern`, else 0.0."""

    def __init__(self, pattern: str = FORMAT_PATTERN) -> None:
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"pattern '{pattern}' is not a regular expression ({err})") from None
        self.__name__ = "format"

    def __call__(
        self, completions: Sequence[Any], prompts: Sequence[Any] = (), **columns: Any
    ) -> list[float]:
        return [float(self.pattern.fullmatch(completion_text(c)) is not None) for c in completions]


def answer_accuracy(refs: Mapping[Hashable, Sequence[str]], **options: Any) -> AnswerAccuracy:
    """Registry factory (training references unused)."""
    return AnswerAccuracy(**options)


def format_reward(refs: Mapping[Hashable, Sequence[str]], **options: Any) -> FormatReward:
    """Registry factory (training references unused)."""
    return FormatReward(**options)
