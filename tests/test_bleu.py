"""BLEU: corpus BLEU-1..4 equals pycocoevalcap's Bleu(4); smoothed sentence BLEU by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlalign.rewards import BleuReward, corpus_bleu, self_bleu, sentence_bleu

pycoco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")

VOCAB = [f"w{i}" for i in range(30)]
ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1)
ZIPF /= ZIPF.sum()


def _sentence(rng: np.random.Generator, lo: int) -> str:
    length = int(rng.integers(lo, 16))
    if rng.random() < 0.1:
        return " ".join([str(rng.choice(VOCAB))] * length)  # repeats: clipping matters
    return " ".join(rng.choice(VOCAB, length, p=ZIPF))


@pytest.mark.parametrize("seed", range(6))
def test_corpus_bleu_equals_pycocoevalcap(seed: int):
    rng = np.random.default_rng(seed)
    n_images = int(rng.choice([1, 2, 5, 50, 300]))
    refs = {i: [_sentence(rng, 1) for _ in range(int(rng.integers(1, 7)))] for i in range(n_images)}
    cands = {i: _sentence(rng, 0 if rng.random() < 0.05 else 1) for i in range(n_images)}  # some empty
    peer, peer_per_image = pycoco_bleu.Bleu(4).compute_score(
        refs, {i: [c] for i, c in cands.items()}, verbose=0
    )
    ours, per_image = corpus_bleu(cands, refs)
    np.testing.assert_allclose(ours, peer, rtol=0, atol=1e-9)
    np.testing.assert_allclose(per_image, np.asarray(peer_per_image).T, rtol=0, atol=1e-9)


def test_closest_reference_length_ties_go_to_the_shorter():
    # candidate of 3 words, references of 2 and 4 words: r = 2, so no brevity penalty
    cands, refs = {0: "a b c"}, {0: ["a b", "a b c d"]}
    peer, _ = pycoco_bleu.Bleu(4).compute_score(refs, {0: ["a b c"]}, verbose=0)
    np.testing.assert_allclose(corpus_bleu(cands, refs)[0], peer, rtol=0, atol=1e-12)
    assert corpus_bleu(cands, refs)[0][0] == pytest.approx(1.0)


def test_sentence_bleu_by_hand():
    assert sentence_bleu("a b c d", ["a b c d"]) == pytest.approx(1.0)
    assert sentence_bleu("x y z", ["a b c d"]) == 0.0
    assert sentence_bleu("", ["a b"]) == 0.0
    # p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1); same length, no penalty
    assert sentence_bleu("a b c e", ["a b c d"]) == pytest.approx((0.75 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    # brevity: c = 2 against r = 4 (closest), p1 = 1, p2 = (1+1)/(1+1), p3 = p4 = 1/1
    assert sentence_bleu("a b", ["a b c d", "a b c d e f"]) == pytest.approx(math.exp(1 - 4 / 2))


def test_self_bleu_and_reward():
    assert self_bleu(["a b c d", "a b c d"]) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    with pytest.raises(ValueError):
        self_bleu(["a b"])
    reward = BleuReward({1: ["A dog runs."], 2: ["Two cats!"]})
    out = reward(["a DOG runs", "a bird"], image_ids=[1, 2], prompt=["p", "p"])
    np.testing.assert_allclose(out, [1.0, 0.0])
    with pytest.raises(KeyError, match="99"):
        reward(["a"], image_ids=[99])
