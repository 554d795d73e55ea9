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

Speed comes from never looping in Python over n-grams: words become integer ids, n-grams of order
k become integer keys (id of the (k-1)-gram prefix * vocabulary size + last word), one argsort per
order groups them into (sentence, n-gram) counts, and the clipped products are a sorted-key join
followed by `np.bincount`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
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
    cid: np.ndarray  # [T] label of the n-gram starting at each token; junk where none starts
    sent: np.ndarray  # [E] sentence of each (sentence, n-gram) entry
    gid: np.ndarray  # [E] label of the entry's n-gram
    tf: np.ndarray  # [E] count of the n-gram in the sentence


def _count_ngrams(
    ids: np.ndarray,
    lengths: np.ndarray,
    n: int,
    base: int,
    relabel: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> list[_Order]:
    """(sentence, n-gram) counts for orders 1..n.

    The key of a (k+1)-gram is label(its k-gram prefix) * base + id(last word); `base` exceeds every
    word id, so keys are unique per order and a unigram's key is its word id. An n-gram's label is
    the rank of its key, or `relabel(k, sorted unique keys)` (k = n-gram length - 1), which must
    give distinct labels. Sorting (key, token position) also sorts by (key, sentence), since a
    sentence's tokens are contiguous: one np.sort per order does all the grouping.
    """
    n_tok = ids.size
    sent_of_tok = np.repeat(np.arange(lengths.size), lengths)
    remaining = np.repeat(np.cumsum(lengths), lengths) - np.arange(n_tok)  # tokens left from i on
    orders: list[_Order] = []
    key_bound = base
    for k in range(n):
        pos = np.flatnonzero(remaining > k)
        if pos.size == 0:
            empty = np.zeros(0, np.int64)
            orders.append(_Order(empty, np.zeros(n_tok, np.int64), empty, empty, empty))
            continue
        key = ids[pos] if k == 0 else orders[-1].cid[pos] * base + ids[pos + k]
        if key_bound * n_tok < _INT64_LIMIT:  # pack (key, position) into one int64: sort, not argsort
            packed = np.sort(key * n_tok + pos)
            key = packed // n_tok
            pos = packed - key * n_tok
        else:  # huge corpus and vocabulary
            o = np.lexsort((pos, key))
            key, pos = key[o], pos[o]
        sent = sent_of_tok[pos]
        new_key = np.ones(key.size, bool)
        np.not_equal(key[1:], key[:-1], out=new_key[1:])
        label = np.cumsum(new_key) - 1
        uniq = key[new_key]
        if relabel is not None:
            label = relabel(k, uniq)[label]
        cid = np.empty(n_tok, np.int64)
        cid[pos] = label
        new_entry = new_key
        new_entry[1:] |= sent[1:] != sent[:-1]
        starts = np.flatnonzero(new_entry)
        tf = np.diff(np.append(starts, key.size))
        orders.append(_Order(uniq, cid, sent[starts], label[starts], tf))
        key_bound = (int(label[-1]) + 1 if relabel is None else int(label.max()) + 1) * base
    return orders


class CachedCiderD:
    """CIDEr-D against fixed references: df, log N and reference vectors computed once.

    `score(image_ids, candidates)` rates a batch of candidates (several may share an image, as in
    GRPO groups) against the cached references of their images, in float64.
    """

    def __init__(self, refs: Mapping[Hashable, Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if not refs:
            raise ValueError("CachedCiderD needs at least one image with references")
        self.n, self.sigma = n, sigma
        image_ids = list(refs)
        self._index = {iid: i for i, iid in enumerate(image_ids)}
        counts = np.array([len(refs[iid]) for iid in image_ids], np.int64)
        if (counts == 0).any():
            raise ValueError(f"image id {image_ids[int(np.argmin(counts))]!r} has no references")
        sents = [r for iid in image_ids for r in refs[iid]]
        self._vocab = _Vocab({_SEP: 0})
        ids, lengths = _encode(sents, self._vocab)
        n_img = len(image_ids)
        self._ref_count, self._ref_start = counts, np.cumsum(counts) - counts
        self._ref_len_words = lengths
        self.log_n = float(np.log(float(n_img)))  # pycocoevalcap's `ref_len`
        img_of_sent = np.repeat(np.arange(n_img), counts)

        tables, weights, norm2 = [], [], np.zeros(len(sents) * n)
        join_keys, join_start, entry_sent, entry_val = [], [], [], []
        offset = n_entries = 0
        self._base = len(self._vocab)  # word ids of the references are < base
        for k, order in enumerate(_count_ngrams(ids, lengths, n, base=self._base)):
            img = img_of_sent[order.sent]
            # entries run by (gid, sentence) and sentences by image: the first entry of each
            # (n-gram, image) pair counts one document for df, and starts one join-table row
            first = np.ones(order.sent.size, bool)
            first[1:] = (order.gid[1:] != order.gid[:-1]) | (img[1:] != img[:-1])
            df = np.bincount(order.gid[first], minlength=order.keys.size)
            w = self.log_n - np.log(np.maximum(1.0, df))
            val = order.tf * w[order.gid]
            norm2 += np.bincount(order.sent * n + k, val * val, minlength=norm2.size)
            tables.append(order.keys)
            weights.append(w)
            join_keys.append((order.gid[first] + offset) * n_img + img[first])
            join_start.append(np.flatnonzero(first) + n_entries)
            entry_sent.append(order.sent)
            entry_val.append(val)
            offset += order.keys.size
            n_entries += order.sent.size
        self._tables, self._offsets = tables, np.cumsum([0] + [t.size for t in tables[:-1]])
        self._weights = np.concatenate(weights)
        self._ref_norm = np.sqrt(norm2).reshape(len(sents), n)
        self._join_keys = np.concatenate(join_keys)  # sorted: gid offsets grow with the order
        self._join_start = np.concatenate(join_start)
        self._join_count = np.diff(np.append(self._join_start, n_entries))
        self._entry_sent = np.concatenate(entry_sent)
        self._entry_val = np.concatenate(entry_val)

    @property
    def num_images(self) -> int:
        return len(self._index)

    def _image_index(self, image_ids: Sequence[Hashable]) -> np.ndarray:
        try:
            return np.fromiter(map(self._index.__getitem__, image_ids), np.int64, len(image_ids))
        except KeyError as e:
            raise KeyError(f"no cached CIDEr-D references for image id {e.args[0]!r}") from None

    def score(self, image_ids: Sequence[Hashable], candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D [len(candidates)] float64 of each candidate against its image's references."""
        if len(image_ids) != len(candidates):
            raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
        c_img = self._image_index(image_ids)
        ids, lengths = _encode(candidates, _Vocab(self._vocab))
        n, n_cand = self.n, len(candidates)
        norm2 = np.zeros(n_cand * n)
        base = int(ids.max(initial=0)) + 1
        q_cand, q_gid, q_val, q_order = [], [], [], []
        for k, order in enumerate(_count_ngrams(ids, lengths, n, base, partial(self._relabel, base=base))):
            known = order.gid < self._tables[k].size
            g = order.gid + self._offsets[k]
            w = np.where(known, self._weights[np.where(known, g, 0)], self.log_n)
            val = order.tf * w
            norm2 += np.bincount(order.sent * n + k, val * val, minlength=norm2.size)
            q_cand.append(order.sent[known])
            q_gid.append(g[known])
            q_val.append(val[known])
            q_order.append(np.full(int(known.sum()), k))
        cand_norm = np.sqrt(norm2).reshape(n_cand, n)
        cand, gid, val_c, order_k = map(np.concatenate, (q_cand, q_gid, q_val, q_order))
        return self._similarity(c_img, lengths, cand_norm, cand, gid, val_c, order_k)

    def _relabel(self, k: int, keys: np.ndarray, base: int) -> np.ndarray:
        """Label candidate n-grams by their cached gid; those absent from the references by U + rank.

        `keys` are sorted candidate keys (prefix label * base + word id) of (k+1)-grams; a prefix
        label below the cached count U' of k-grams is a cached gid. Known n-grams map to sorted
        cached keys, so the search runs over sorted queries.
        """
        table = self._tables[k]
        if k == 0:
            cached_key, ok = keys, keys < self._base
        else:
            prefix, last = np.divmod(keys, base)
            cached_key = prefix * self._base + last
            ok = (prefix < self._tables[k - 1].size) & (last < self._base)
        unseen = table.size + np.arange(keys.size)
        if table.size == 0:
            return unseen
        j = np.minimum(np.searchsorted(table, cached_key), table.size - 1)
        return np.where(ok & (table[j] == cached_key), j, unseen)

    def _similarity(
        self,
        c_img: np.ndarray,
        cand_len: np.ndarray,
        cand_norm: np.ndarray,
        cand: np.ndarray,
        gid: np.ndarray,
        val_c: np.ndarray,
        order_k: np.ndarray,
    ) -> np.ndarray:
        """Clipped tf-idf products of candidate entries with the cached reference entries."""
        n, n_cand = self.n, c_img.size
        per_cand = self._ref_count[c_img]
        n_pairs = int(per_cand.sum())
        pair_base = np.cumsum(per_cand) - per_cand
        pair_cand = np.repeat(np.arange(n_cand), per_cand)
        pair_ref = np.repeat(self._ref_start[c_img] - pair_base, per_cand) + np.arange(n_pairs)

        # rows of the join table matching (n-gram, image of the candidate)
        q = gid * self.num_images + c_img[cand]
        row = np.minimum(np.searchsorted(self._join_keys, q), self._join_keys.size - 1)
        hit = np.flatnonzero(self._join_keys[row] == q)
        count = self._join_count[row[hit]]
        e = np.repeat(hit, count)  # one per (candidate entry, matching reference entry)
        run_start = np.cumsum(count) - count
        ref_e = np.repeat(self._join_start[row[hit]] - run_start, count) + np.arange(e.size)
        ref_sent = self._entry_sent[ref_e]
        c = cand[e]
        pair = pair_base[c] + ref_sent - self._ref_start[c_img[c]]
        val_r = self._entry_val[ref_e]
        dot = np.bincount(pair * n + order_k[e], np.minimum(val_c[e], val_r) * val_r, minlength=n_pairs * n)
        dot = dot.reshape(n_pairs, n)

        denom = cand_norm[pair_cand] * self._ref_norm[pair_ref]
        sim = np.divide(dot, denom, out=dot.copy(), where=denom != 0)
        delta = (cand_len[pair_cand] - self._ref_len_words[pair_ref]).astype(np.float64)
        sim *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        return np.bincount(pair_cand, sim.mean(axis=1), minlength=n_cand) / per_cand * 10.0


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

    def __init__(self, refs_by_image_id: Mapping[Hashable, Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        refs = {iid: [normalize(r) for r in rs] for iid, rs in refs_by_image_id.items()}
        self.scorer = CachedCiderD(refs, n=n, sigma=sigma)

    def __call__(self, samples: Sequence[str], image_ids: Sequence[Hashable], **batch_columns: Any) -> np.ndarray:
        return self.scorer.score(image_ids, [normalize(s) for s in samples])
