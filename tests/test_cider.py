"""CIDEr-D: corpus mode equals pycocoevalcap per image; cached mode equals the formula in plain Python."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from rlalign.rewards import CachedCiderD, CiderD, CiderReward, cider, normalize

pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")

VOCAB = [f"w{i}" for i in range(30)]
OTHER = [f"x{i}" for i in range(10)]  # never in any reference: zero-overlap candidates
ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1)
ZIPF /= ZIPF.sum()


def _sentence(rng: np.random.Generator, words: list[str] = VOCAB, lo: int = 1, hi: int = 15) -> str:
    length = int(rng.integers(lo, hi + 1))
    if rng.random() < 0.1:  # one word repeated: clipping matters
        return " ".join([str(rng.choice(words))] * length)
    p = ZIPF if words is VOCAB else None
    return " ".join(rng.choice(words, length, p=p))


def _candidate(rng: np.random.Generator, refs: list[str]) -> str:
    r = rng.random()
    if r < 0.1:
        return _sentence(rng, OTHER)
    if r < 0.15:
        return str(rng.choice(VOCAB))  # empty-ish: one word
    if r < 0.3:  # a reference with one word over-repeated
        words = str(rng.choice(refs)).split()
        return " ".join(words + [words[0]] * int(rng.integers(1, 4)))
    if r < 0.35:  # mixes known and unknown words
        return _sentence(rng) + " " + _sentence(rng, OTHER)
    return _sentence(rng)


def _random_corpus(rng: np.random.Generator, n_images: int) -> tuple[dict, dict]:
    refs = {}
    for i in range(n_images):
        rs = [_sentence(rng) for _ in range(int(rng.integers(1, 7)))]
        if len(rs) > 1 and rng.random() < 0.1:
            rs[1] = rs[0]  # a duplicated reference
        refs[i if i % 2 else f"img{i}"] = rs  # mixed id types
    cands = {iid: _candidate(rng, rs) for iid, rs in refs.items()}
    return cands, refs


def _pycoco(cands: dict, refs: dict) -> tuple[float, np.ndarray]:
    score, scores = pycoco_cider.Cider().compute_score(refs, {iid: [c] for iid, c in cands.items()})
    return float(score), np.asarray(scores)


def test_corpus_mode_equals_pycocoevalcap_per_image():
    rng = np.random.default_rng(0)
    n_checked = 0
    for n_images in (1, 2, 3, 7, 40, 150, 300, 500):
        cands, refs = _random_corpus(rng, n_images)
        mean, per_image = CiderD().compute_corpus(cands, refs)
        peer_mean, peer_per_image = _pycoco(cands, refs)
        assert per_image.dtype == np.float64 and per_image.shape == (n_images,)
        np.testing.assert_allclose(per_image, peer_per_image, rtol=0, atol=1e-9)
        assert mean == pytest.approx(peer_mean, abs=1e-9)
        n_checked += n_images
    assert n_checked >= 1000


def test_corpus_mode_handles_empty_and_duplicate_sentences():
    refs = {"a": ["w1 w2 w3", ""], "b": ["w2 w2 w2 w2", "w2 w2 w2 w2"], "c": ["w4"]}
    cands = {"a": "", "b": "w2 w2", "c": "w4 w4 w4 w4 w4 w4"}
    np.testing.assert_allclose(
        CiderD().compute_corpus(cands, refs)[1], _pycoco(cands, refs)[1], rtol=0, atol=1e-9
    )


def test_corpus_mode_without_packed_keys(monkeypatch: pytest.MonkeyPatch):
    # the lexsort path taken when (key, position) would not fit in an int64 (huge corpus and vocabulary)
    monkeypatch.setattr(cider, "_INT64_LIMIT", 0)
    cands, refs = _random_corpus(np.random.default_rng(3), 80)
    np.testing.assert_allclose(
        CiderD().compute_corpus(cands, refs)[1], _pycoco(cands, refs)[1], rtol=0, atol=1e-9
    )


def _reference_cider(
    train_refs: dict, image_ids: list, cands: list[str], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """CIDEr-D straight from the formula: tf-idf over n = 1..4 with df over the training reference
    sets and N = number of training images, clipped products, Gaussian length penalty, x10."""

    def grams(s: str) -> Counter:
        w = s.split()
        return Counter(tuple(w[i : i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    df: Counter = Counter()
    for rs in train_refs.values():
        df.update(set().union(*(grams(r) for r in rs)))
    log_n = math.log(len(train_refs))

    def vec(s: str) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        for g, tf in grams(s).items():
            v[len(g) - 1][g] = tf * (log_n - math.log(max(1, df[g])))
        return v, [math.sqrt(sum(x * x for x in vk.values())) for vk in v], len(s.split())

    out = []
    for iid, cand in zip(image_ids, cands):
        vc, nc, lc = vec(cand)
        total = 0.0
        for ref in train_refs[iid]:
            vr, nr, lr = vec(ref)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vc[k].items())
                total += (dot / (nc[k] * nr[k]) if nc[k] and nr[k] else 0.0) * penalty / n
        out.append(10.0 * total / len(train_refs[iid]))
    return out


def test_cached_mode_equals_plain_python_formula():
    rng = np.random.default_rng(1)
    _, train_refs = _random_corpus(rng, 300)
    cached = CachedCiderD(train_refs)
    ids = list(train_refs)
    for _ in range(3):  # several batches against the same cache, GRPO-like groups of 5
        image_ids = [ids[i] for i in rng.choice(len(ids), 40) for _ in range(5)]
        cands = [_candidate(rng, train_refs[iid]) for iid in image_ids]
        cands[:3] = ["", "w0", "x1 x2 w0"]
        got = cached.score(image_ids, cands)
        assert got.dtype == np.float64 and got.shape == (len(cands),)
        np.testing.assert_allclose(got, _reference_cider(train_refs, image_ids, cands), rtol=0, atol=1e-9)


def test_cached_mode_empty_batch():
    assert CachedCiderD({"a": ["w1 w2"]}).score([], []).shape == (0,)


def test_cached_on_the_evaluated_set_equals_corpus_mode():
    cands, refs = _random_corpus(np.random.default_rng(2), 100)
    cached = CiderD().from_references(refs).score(list(refs), [cands[i] for i in refs])
    np.testing.assert_allclose(cached, CiderD().compute_corpus(cands, refs)[1], rtol=0, atol=1e-12)


def test_hand_computed_values():
    # Two images, disjoint captions: every n-gram has df 1, so weight log 2, and the candidate equals
    # its one reference: cosine 1 for every order that has n-grams, no length penalty.
    four = {"a": "w1 w2 w3 w4", "b": "w5 w6 w7 w8"}
    _, scores = CiderD().compute_corpus(four, {k: [v] for k, v in four.items()})
    np.testing.assert_allclose(scores, [10.0, 10.0], rtol=0, atol=1e-12)  # mean of 4 ones, x10
    two = {"a": "w1 w2", "b": "w5 w6"}
    _, scores = CiderD().compute_corpus(two, {k: [v] for k, v in two.items()})
    np.testing.assert_allclose(scores, [5.0, 5.0], rtol=0, atol=1e-12)  # no 3-, 4-grams: (1+1+0+0)/4
    # A single image: log N = 0 and df = 1 make every weight 0 (pycocoevalcap agrees).
    assert CiderD().compute_corpus({"a": "w1 w2"}, {"a": ["w1 w2"]})[0] == 0.0


def test_length_penalty_hand_computed():
    # Candidate "w1 w2" vs reference "w1 w2 w3" (image a) with a disjoint image b: weights log 2.
    # order 1: dot 2 L^2, norms sqrt(2) L and sqrt(3) L -> 2/sqrt(6); order 2: 1/sqrt(2); 3, 4: 0.
    refs = {"a": ["w1 w2 w3"], "b": ["w5"]}
    _, scores = CiderD().compute_corpus({"a": "w1 w2", "b": "w5"}, refs)
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert scores[0] == pytest.approx(expected, abs=1e-12)


def test_errors_name_the_image_id():
    cached = CachedCiderD({"img1": ["w1 w2"], "img2": ["w3"]})
    with pytest.raises(KeyError, match="img42"):
        cached.score(["img1", "img42"], ["w1", "w2"])
    with pytest.raises(ValueError, match="2 image ids for 1 candidates"):
        cached.score(["img1", "img2"], ["w1"])
    with pytest.raises(ValueError, match="'b'"):
        CachedCiderD({"a": ["w1"], "b": []})
    with pytest.raises(ValueError, match="image ids"):
        CiderD().compute_corpus({"a": "w1"}, {"a": ["w1"], "b": ["w2"]})
    with pytest.raises(ValueError, match="NUL"):
        cached.score(["img1"], ["w1 \x00 w2"])


def test_reward_normalises_and_takes_batch_columns():
    refs = {1: ["A dog runs on the grass.", "The dog's running!"], 2: ["Two cats, sleeping."]}
    reward = CiderReward(refs)
    out = reward(["a DOG runs,  on grass", "two cats"], image_ids=[1, 2], prompt=["p", "p"], extra=[0, 0])
    expected = reward.scorer.score([1, 2], ["a dog runs on grass", "two cats"])
    np.testing.assert_array_equal(out, expected)
    assert out[0] > 0 and out[1] > 0
    assert normalize("  The dog's ball-game, \x00 OK? ") == "the dogs ball game ok"
