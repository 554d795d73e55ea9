"""BLEU: pycocoevalcap's corpus `Bleu(4)`, and a smoothed sentence BLEU for rewards and self-BLEU.

`corpus_bleu` reproduces pycocoevalcap 1.2 (`Bleu(4).compute_score`): per candidate, n-gram
matches clipped by the largest count in any one reference, guesses max(0, L - n + 1), and the
"closest" reference length (ties go to the shorter); these are summed over the corpus and
    BLEU-n = prod_{m<=n} ((matches_m + 1e-15) / (guesses_m + 1e-9)) ** (1/n) * BP,
    BP = exp(1 - 1/ratio) if ratio < 1, ratio = (c + 1e-15) / (r + 1e-9)
with c, r the summed candidate and reference lengths. Its per-image scores (the second value
pycocoevalcap returns) are the same formula on one candidate's statistics. Departures: none in the
arithmetic; inputs are `{id: str}` candidates (not `{id: [str]}`), pre-tokenised like
pycocoevalcap's (see `text.normalize`), and nothing is printed.

`sentence_bleu` is the per-sample score for rewards: geometric mean of the n-gram precisions with
add-one smoothing for n >= 2 (Lin & Och 2004; NLTK's `method2`), so one missing 4-gram does not
zero the reward, times the brevity penalty exp(1 - r/c) for c < r, r the closest reference length.
`self_bleu` averages each sample's sentence BLEU against the others (lower = more diverse).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlalign.rewards.text import normalize

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's guards against 0/0


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _closest(ref_lens: Sequence[int], length: int) -> int:
    """The reference length closest to `length`, the shorter on ties (as pycocoevalcap)."""
    return min((abs(r - length), r) for r in ref_lens)[1]


@dataclass(frozen=True)
class _Stats:
    """Sufficient statistics of one candidate against its references."""

    length: int
    ref_length: int
    correct: list[int]  # clipped matches per order
    guess: list[int]  # candidate n-grams per order


def _stats(candidate: str, references: Sequence[str], n: int) -> _Stats:
    if not references:
        raise ValueError("BLEU needs at least one reference per candidate")
    max_ref: Counter[tuple[str, ...]] = Counter()
    ref_lens = []
    for ref in references:
        words = ref.split()
        ref_lens.append(len(words))
        max_ref |= _ngrams(words, n)  # Counter union keeps the maximum count
    words = candidate.split()
    correct = [0] * n
    for gram, count in _ngrams(words, n).items():
        correct[len(gram) - 1] += min(count, max_ref[gram])
    guess = [max(0, len(words) - k) for k in range(n)]
    return _Stats(len(words), _closest(ref_lens, len(words)), correct, guess)


def _cumulative_bleu(
    correct: Sequence[float], guess: Sequence[float], length: float, ref_length: float
) -> list[float]:
    """pycocoevalcap's BLEU-1..n from (summed) statistics, epsilons included."""
    scores, product = [], 1.0
    for k in range(len(correct)):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (length + _TINY) / (ref_length + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def corpus_bleu(
    cands: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(corpus BLEU-1..n [n], per-image BLEU-1..n [N, n] in `refs` order), as pycocoevalcap's Bleu(n)."""
    if cands.keys() != refs.keys():
        missing = set(refs).symmetric_difference(cands)
        raise ValueError(f"candidates and references differ in image ids, e.g. {next(iter(missing))!r}")
    stats = [_stats(cands[iid], refs[iid], n) for iid in refs]
    per_image = np.array([_cumulative_bleu(s.correct, s.guess, s.length, s.ref_length) for s in stats])
    corpus = _cumulative_bleu(
        [sum(s.correct[k] for s in stats) for k in range(n)],
        [sum(s.guess[k] for s in stats) for k in range(n)],
        sum(s.length for s in stats),
        sum(s.ref_length for s in stats),
    )
    return np.array(corpus), per_image.reshape(len(stats), n)


def sentence_bleu(candidate: str, references: Sequence[str], n: int = 4) -> float:
    """Smoothed BLEU-n of one pre-tokenised candidate (add-one on orders >= 2), in [0, 1]."""
    s = _stats(candidate, references, n)
    if s.length == 0 or s.correct[0] == 0:
        return 0.0
    log_p = math.log(s.correct[0] / s.guess[0])
    log_p += sum(math.log((s.correct[k] + 1) / (s.guess[k] + 1)) for k in range(1, n))
    brevity = min(0.0, 1.0 - s.ref_length / s.length)
    return math.exp(brevity + log_p / n)


def self_bleu(samples: Sequence[str], n: int = 4) -> float:
    """Mean sentence BLEU of each sample against all the others; needs two samples or more."""
    if len(samples) < 2:
        raise ValueError("self-BLEU needs at least two samples")
    return float(
        np.mean([sentence_bleu(s, [*samples[:i], *samples[i + 1 :]], n) for i, s in enumerate(samples)])
    )


class BleuReward:
    """Reward callable: smoothed sentence BLEU-n of each sample against its image's references.

    Samples and references go through `text.normalize`. Called TRL-style with the decoded samples
    and the batch's columns, of which it reads `image_ids`.
    """

    name = "bleu"

    def __init__(self, refs_by_image_id: Mapping[Hashable, Sequence[str]], n: int = 4) -> None:
        self.n = n
        self.refs = {iid: [normalize(r) for r in rs] for iid, rs in refs_by_image_id.items()}

    def __call__(
        self, samples: Sequence[str], image_ids: Sequence[Hashable], **batch_columns: Any
    ) -> np.ndarray:
        try:
            refs = [self.refs[iid] for iid in image_ids]
        except KeyError as e:
            raise KeyError(f"no BLEU references for image id {e.args[0]!r}") from None
        return np.array([sentence_bleu(normalize(s), r, self.n) for s, r in zip(samples, refs)])
