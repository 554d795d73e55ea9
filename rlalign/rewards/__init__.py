"""Caption rewards and metrics: CIDEr-D (fast, corpus or cached df) and BLEU.

Metrics take pre-tokenised strings (`text.normalize`); reward callables normalise for you and are
called TRL-style as `reward(samples, image_ids, **batch_columns)`.
"""

from rlalign.rewards.bleu import BleuReward, corpus_bleu, self_bleu, sentence_bleu
from rlalign.rewards.cider import CachedCiderD, CiderD, CiderReward
from rlalign.rewards.text import normalize, tokenize

__all__ = [
    "BleuReward",
    "CachedCiderD",
    "CiderD",
    "CiderReward",
    "corpus_bleu",
    "normalize",
    "self_bleu",
    "sentence_bleu",
    "tokenize",
]
