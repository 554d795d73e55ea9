"""Text normalisation shared by the caption metrics.

The metrics in this package (CIDEr-D, BLEU) never tokenise: like pycocoevalcap they take
*pre-tokenised* strings and split them on whitespace. `normalize` is the one tokeniser used to
produce those strings: lowercase, apostrophes dropped ("man's" -> "mans"), every other ASCII
punctuation character (and NUL, which the metrics reserve) turned into a space, whitespace
collapsed. Rewards apply it to decoded samples and references alike, and the benchmark and tests
feed the same normalised strings to both our metrics and pycocoevalcap, so any difference between
the two is in the metric, never in the tokenisation. (pycocoevalcap's own PTBTokenizer needs Java;
this is a simpler, close stand-in.)
"""

from __future__ import annotations

import string

_TABLE = str.maketrans({c: (None if c == "'" else " ") for c in string.punctuation} | {"\x00": " "})


def normalize(text: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace; returns space-joined tokens."""
    return " ".join(tokenize(text))


def tokenize(text: str) -> list[str]:
    """The tokens of `normalize(text)`."""
    return text.lower().translate(_TABLE).split()
