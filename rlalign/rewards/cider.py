"""CIDEr-D, vectorised with numpy, with two document-frequency modes.

The metric (Vedantam et al. 2015, "D" variant as in coco-caption / pycocoevalcap 1.2): for each
order n = 1..4 a sentence becomes the vector tf(g) * (log N - log max(1, df(g))) over its n-grams g,
where df(g) is the number of images whose reference set contains g and N the number of images. A
candidate c and a reference r of its image score, per order,
    sum_g min(v_c(g), v_r(g)) * v_r(g) / (|v_c| |v_r|) * exp(-(len_c - len_r)^2 / (2 sigma^2)),
sigma = 6; the image's score is the mean over orders, then over its references, times 10.

Modes:
- corpus (`CiderD.compute_corpus`): df and N from the evaluated set, as pycocoevalcap's `Cider`.
- cached (`CachedCiderD`): df, N and the references' tf-idf vectors computed once from the training
  references and reused for every batch, as self-critical training does. A candidate n-gram that
  never occurs in those references has df 0 and so the largest weight, log N.

Where this departs from pycocoevalcap's `Cider`:
- Arithmetic: nowhere. Sums run in another order, so per-image scores agree to ~1e-15, not bitwise.
- Lengths for the Gaussian penalty: pycocoevalcap counts bigrams (its `if n == 1` tests the 0-based
  order index), i.e. max(L - 1, 0); we count words. The two differ only when one of the two
  sentences is empty, and then all of that pair's similarities are already 0: same scores.
- Inputs: candidates are `{id: str}` rather than `{id: [str]}`; strings are pre-tokenised (see
  `text.normalize`) and split on whitespace, like pycocoevalcap. They must not contain NUL, which
  we reserve as the sentence separator.

Speed comes from never looping in Python over n-grams: one str.split() and one dict lookup per
word turn the corpus into integer ids; an n-gram of order k becomes an integer key (label of its
(k-1)-gram prefix * vocabulary size + last word id); one np.sort per order groups the keys into
(sentence, n-gram) counts; the clipped products are a sorted-key join (np.searchsorted) followed
by np.bincount. Large temporaries are kept few, as fresh memory is costly to fault in.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from rlalign.rewards.text import normalize

_SEP = "\x00"  # joins sentences so that one str.split() tokenises a whole corpus
_INT64_LIMIT = 2**63


class _Vocab(dict):
    """Word -> id; an unseen word gets the next free id on first lookup (dict.__missing__)."""

    def __missing__(self, word: str) -> int:
        self[word] = i = len(self)
        return i


def _encode(sents: Sequence[str], vocab: _Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Word ids [T] of all sentences concatenated, and words per sentence [S].

    `vocab` maps the separator to 0; words it lacks are added with the next free ids (pass a copy
    to keep it unchanged: distinct unknown words must still get distinct ids).
    """
    if not sents:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    text = f" {_SEP} ".join(sents)
    if text.count(_SEP) != len(sents) - 1:
        raise ValueError("captions must not contain the NUL character (use text.normalize)")
    words = text.split()
    ids = np.fromiter(map(vocab.__getitem__, words), np.int64, len(words))
    sep = np.flatnonzero(ids == 0)
    lengths = np.diff(np.concatenate(([-1], sep, [ids.size]))) - 1
    return ids[ids != 0], lengths


@dataclass(frozen=True)
class _Order:
    """The n-grams of one order in a set of sentences; entries sorted by (label, sentence)."""

    keys: np.ndarray  # [U] sorted unique keys of the n-grams present
    sent: np.ndarray  # [E] sentence of each (sentence, n-gram) entry
    gid: np.ndarray  # [E] label of the entry's n-gram
    tf: np.ndarray  # [E] count of the n-gram in the sentence


def _count_ngrams(
    ids: np.ndarray,
    lengths: np.ndarray,
    n: int,
    base: int,
    relabel: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Iterator[_Order]:
    """(sentence, n-gram) counts for orders 1..n, one order at a time.

    The key of a (k+1)-gram is label(its k-gram prefix) * base + id(last word); `base` exceeds every
    word id, so keys are unique per order and a unigram's key is its word id. An n-gram's label is
    the rank of its key, or `relabel(k, sorted unique keys)` (k = n-gram length - 1), which must
    give distinct labels. Sorting (key, token position) also sorts by (key, sentence), since a
    sentence's tokens are contiguous: one np.sort per order does all the grouping.
    """
    n_tok = ids.size
    sent_of_tok = np.repeat(np.arange(lengths.size, dtype=np.int32), lengths)
    remaining = np.repeat(np.cumsum(lengths), lengths)  # tokens left in the sentence from i on
    remaining -= np.arange(n_tok)
    cid = np.zeros(n_tok, np.int64)  # label of the n-gram of the previous order at each token
    label_bound = 1  # keys of order 1 (word ids) are below base
    shift = max(n_tok - 1, 0).bit_length()  # bits for a token position
    for k in range(n):
        pos = np.flatnonzero(remaining > k)
        if pos.size == 0:
            empty = np.zeros(0, np.int64)
            yield _Order(empty, empty, empty, empty)
            continue
        if k == 0:
            key = ids[pos]
        else:
            key = cid[pos]
            key *= base
            key += ids[k:][pos]
        if (label_bound * base) << shift < _INT64_LIMIT:  # pack (key, position) in one int64: no argsort
            key <<= shift
            key |= pos
            key.sort()
            pos = key & (1 << shift) - 1
            key >>= shift
        else:  # huge corpus and vocabulary
            o = np.lexsort((pos, key))
            key, pos = key[o], pos[o]
        sent = sent_of_tok[pos]
        new_key = np.ones(key.size, bool)
        np.not_equal(key[1:], key[:-1], out=new_key[1:])
        label = np.cumsum(new_key)
        label -= 1
        uniq = key[new_key]
        if relabel is not None:
            label = relabel(k, uniq)[label]
        cid[pos] = label  # entries at tokens where no n-gram of this order starts are stale, unread
        new_key[1:] |= sent[1:] != sent[:-1]  # now: a new (n-gram, sentence) entry starts here
        starts = np.flatnonzero(new_key)
        tf = np.diff(starts, append=key.size).astype(np.int32)
        label_bound = int(label.max()) + 1
        yield _Order(uniq, sent[starts], label[starts], tf)


@dataclass(frozen=True)
class _RefOrder:
    """Cached references, one n-gram order. Rows: (n-gram, image) pairs; entries: (n-gram, ref)."""

    keys: np.ndarray  # [U] sorted n-gram keys; an n-gram's gid is its index here
    weight: np.ndarray  # [U] log N - log max(1, df)
    row_key: np.ndarray  # [J] sorted gid * num_images + image
    row_start: np.ndarray  # [J + 1] first entry of each row, then E: one entry per reference of
    # the image holding the n-gram
    entry_sent: np.ndarray  # [E] reference sentence of the entry (int32)
    entry_tf: np.ndarray  # [E] count of the n-gram in it (int32)


class CachedCiderD:
    """CIDEr-D against fixed references: df, log N and reference vectors computed once.

    `score(image_ids, candidates)` rates a batch of candidates (several may share an image, as in
    GRPO groups) against the cached references of their images, in float64.
    """

    def __init__(self, refs: Mapping[Hashable, Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if not refs:
            raise ValueError("CachedCiderD needs at least one image with references")
        self.n, self.sigma = n, sigma
        self._index = {iid: i for i, iid in enumerate(refs)}
        counts = np.fromiter(map(len, refs.values()), np.int64, len(refs))
        if (counts == 0).any():
            raise ValueError(f"image id {list(refs)[int(np.argmin(counts))]!r} has no references")
        self._vocab = _Vocab({_SEP: 0})
        ids, lengths = _encode([r for rs in refs.values() for r in rs], self._vocab)
        self._base = len(self._vocab)  # every reference word id is below it
        self._ref_count, self._ref_start = counts, np.cumsum(counts) - counts
        self._ref_len = lengths
        n_img = len(refs)
        self.log_n = float(np.log(float(n_img)))  # pycocoevalcap's `ref_len`
        img_of_sent = np.repeat(np.arange(n_img), counts)
        norm2 = np.zeros((lengths.size, n))
        self._orders: list[_RefOrder] = []
        for k, order in enumerate(_count_ngrams(ids, lengths, n, self._base)):
            # entries run by (gid, sentence), sentences by image: the first entry of each
            # (n-gram, image) pair counts one document for df, and starts one row
            img = img_of_sent[order.sent]
            first = np.ones(img.size, bool)
            first[1:] = (order.gid[1:] != order.gid[:-1]) | (img[1:] != img[:-1])
            rows = np.flatnonzero(first)
            df = np.bincount(order.gid[rows], minlength=order.keys.size)
            weight = self.log_n - np.log(np.maximum(1.0, df))
            val = weight[order.gid]
            val *= order.tf
            norm2[:, k] = np.bincount(order.sent, val * val, minlength=lengths.size)
            row_key = order.gid[rows] * n_img + img[rows]
            row_start = np.append(rows, img.size).astype(np.int32 if img.size < 2**31 else np.int64)
            self._orders.append(_RefOrder(order.keys, weight, row_key, row_start, order.sent, order.tf))
        self._ref_norm = np.sqrt(norm2)

    @property
    def num_images(self) -> int:
        return len(self._index)

    def score(self, image_ids: Sequence[Hashable], candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D [len(candidates)] float64 of each candidate against its image's references."""
        if len(image_ids) != len(candidates):
            raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
        try:
            c_img = np.fromiter(map(self._index.__getitem__, image_ids), np.int64, len(image_ids))
        except KeyError as e:
            raise KeyError(f"no cached CIDEr-D references for image id {e.args[0]!r}") from None
        ids, cand_len = _encode(candidates, _Vocab(self._vocab))
        n, n_cand = self.n, len(candidates)
        # (candidate, reference of its image) pairs
        per_cand = self._ref_count[c_img]
        n_pairs = int(per_cand.sum())
        pair_base = np.cumsum(per_cand) - per_cand
        pair_cand = np.repeat(np.arange(n_cand), per_cand)
        pair_ref = np.repeat(self._ref_start[c_img] - pair_base, per_cand) + np.arange(n_pairs)

        base = int(ids.max(initial=0)) + 1
        orders = _count_ngrams(ids, cand_len, n, base, partial(self._relabel, base=base))
        norm2 = np.zeros((n_cand, n))
        dot = np.zeros((n_pairs, n))
        for k, (cand, ref) in enumerate(zip(orders, self._orders)):
            known = cand.gid < ref.keys.size
            weight = np.full(cand.gid.size, self.log_n)  # unseen n-grams: df 0
            weight[known] = ref.weight[cand.gid[known]]
            val = weight * cand.tf
            norm2[:, k] = np.bincount(cand.sent, val * val, minlength=n_cand)
            dot[:, k] = self._dot(
                ref, cand.sent[known], cand.gid[known], val[known], c_img, pair_base, n_pairs
            )

        denom = np.sqrt(norm2)[pair_cand] * self._ref_norm[pair_ref]
        sim = np.divide(dot, denom, out=dot, where=denom != 0)
        delta = (cand_len[pair_cand] - self._ref_len[pair_ref]).astype(np.float64)
        sim *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        return np.bincount(pair_cand, sim.mean(axis=1), minlength=n_cand) / per_cand * 10.0

    def _relabel(self, k: int, keys: np.ndarray, base: int) -> np.ndarray:
        """Label candidate n-grams by their cached gid; those absent from the references by U + rank.

        `keys` are sorted candidate keys (prefix label * base + word id) of (k+1)-grams; a prefix
        label below the cached count of k-grams is a cached gid. Known n-grams map to cached keys
        in sorted order, so the search runs over sorted queries.
        """
        table = self._orders[k].keys
        if k == 0:
            cached_key, ok = keys, keys < self._base
        else:
            prefix, last = np.divmod(keys, base)
            cached_key = prefix * self._base + last
            ok = (prefix < self._orders[k - 1].keys.size) & (last < self._base)
        unseen = table.size + np.arange(keys.size)
        if table.size == 0:
            return unseen
        j = np.minimum(np.searchsorted(table, cached_key), table.size - 1)
        return np.where(ok & (table[j] == cached_key), j, unseen)

    def _dot(
        self,
        ref: _RefOrder,
        cand: np.ndarray,
        gid: np.ndarray,
        val_c: np.ndarray,
        c_img: np.ndarray,
        pair_base: np.ndarray,
        n_pairs: int,
    ) -> np.ndarray:
        """Clipped products sum_g min(v_c, v_r) * v_r [n_pairs] of one order, by sorted-key join.

        `cand`, `gid`, `val_c`: candidate entries whose n-gram occurs in the references.
        """
        if ref.row_key.size == 0 or cand.size == 0:
            return np.zeros(n_pairs)
        query = gid * self.num_images + c_img[cand]
        row = np.minimum(np.searchsorted(ref.row_key, query), ref.row_key.size - 1)
        hit = np.flatnonzero(ref.row_key[row] == query)
        row = row[hit]
        first = ref.row_start[row]
        count = ref.row_start[row + 1] - first
        e = np.repeat(hit, count)  # one per (candidate entry, matching reference entry)
        ref_e = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(e.size)
        c = cand[e]
        pair = pair_base[c] + ref.entry_sent[ref_e] - self._ref_start[c_img[c]]
        val_r = ref.entry_tf[ref_e] * ref.weight[gid[e]]
        return np.bincount(pair, np.minimum(val_c[e], val_r) * val_r, minlength=n_pairs)


class CiderD:
    """CIDEr-D with df from the evaluated set: pycocoevalcap's `Cider`, vectorised."""

    def __init__(self, n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma

    def compute_corpus(
        self, cands: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]]
    ) -> tuple[float, np.ndarray]:
        """(mean, per-image scores in `refs` order); `cands` and `refs` need the same image ids."""
        if cands.keys() != refs.keys():
            missing = set(refs).symmetric_difference(cands)
            raise ValueError(f"candidates and references differ in image ids, e.g. {next(iter(missing))!r}")
        image_ids = list(refs)
        per_image = self.from_references(refs).score(image_ids, [cands[i] for i in image_ids])
        return float(per_image.mean()), per_image

    def from_references(self, refs: Mapping[Hashable, Sequence[str]]) -> CachedCiderD:
        """Cached mode: df, log N and reference vectors from `refs` (e.g. all training captions)."""
        return CachedCiderD(refs, n=self.n, sigma=self.sigma)


class CiderReward:
    """Reward callable: CIDEr-D of each sample against its image's training references.

    df comes from `refs_by_image_id` once (cached mode). Samples and references go through
    `text.normalize`. Called TRL-style with the decoded samples and the batch's columns, of which
    it reads `image_ids`; several samples may share an image (GRPO groups, SCST greedy baselines).
    """

    name = "cider"

    def __init__(
        self, refs_by_image_id: Mapping[Hashable, Sequence[str]], n: int = 4, sigma: float = 6.0
    ) -> None:
        refs = {iid: [normalize(r) for r in rs] for iid, rs in refs_by_image_id.items()}
        self.scorer = CachedCiderD(refs, n=n, sigma=sigma)

    def __call__(
        self, samples: Sequence[str], image_ids: Sequence[Hashable], **batch_columns: Any
    ) -> np.ndarray:
        return self.scorer.score(image_ids, [normalize(s) for s in samples])
