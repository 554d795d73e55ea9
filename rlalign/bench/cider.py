"""`rlalign bench cider`: our CIDEr-D against pycocoevalcap's `Cider` on COCO-sized synthetic data.

Both get the same pre-tokenised strings (5,000 images x 5 references + 1 candidate by default;
~10-word captions over a few-thousand-word Zipf vocabulary, part shared within an image so scores
look like COCO's) and compute corpus-mode CIDEr-D in this process, in alternating repetitions;
medians are reported, with the largest per-image difference between the two. Cached mode (df and
reference vectors precomputed once, as in self-critical training) is timed on the same candidates.
Ends with one JSON line.

    rlalign bench cider [--images 5000] [--refs 5] [--reps 3] [--vocab 3000] [--seed 0]
    python -m rlalign.bench.cider ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from rlalign.rewards.cider import CachedCiderD, CiderD

_SYLLABLES = ["ba", "ke", "li", "mo", "nu", "ra", "se", "ti", "vo", "za", "do", "pe", "gu", "sha", "tr", "en"]


def synthetic_captions(
    n_images: int, n_refs: int, vocab_size: int, seed: int
) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Seeded COCO-like captions: ({image: candidate}, {image: references}).

    Words are Zipf-distributed (exponent 1.1) pseudo-words; a caption has 8-13 words (mean ~10.5),
    40% of them drawn from six "content" words of its image, so candidates and references overlap.
    """
    rng = np.random.default_rng(seed)
    vocab = np.array(
        ["".join(rng.choice(_SYLLABLES, rng.integers(1, 4))) + str(i) for i in range(vocab_size)]
    )
    zipf = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    zipf /= zipf.sum()
    content = rng.choice(vocab_size, size=(n_images, 6), p=zipf)
    per_image = n_refs + 1
    lengths = rng.integers(8, 14, size=(n_images, per_image))
    width = int(lengths.max())
    words = rng.choice(vocab_size, size=(n_images, per_image, width), p=zipf)
    own = content[np.arange(n_images)[:, None, None], rng.integers(0, 6, size=words.shape)]
    words = np.where(rng.random(words.shape) < 0.4, own, words)
    text = vocab[words]
    captions = [[" ".join(text[i, j, : lengths[i, j]]) for j in range(per_image)] for i in range(n_images)]
    return {i: c[0] for i, c in enumerate(captions)}, {i: c[1:] for i, c in enumerate(captions)}


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args: list[str]) -> dict:
    """Run the benchmark, print a table and the JSON line, and return the JSON's dict."""
    p = argparse.ArgumentParser(prog="rlalign bench cider", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--refs", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each, alternating")
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(args)
    if a.reps < 1:
        p.error("--reps must be at least 1")

    try:
        from pycocoevalcap.cider.cider import Cider  # the peer; a dev-only dependency
    except ImportError as err:
        raise SystemExit("rlalign bench cider needs pycocoevalcap: pip install 'rlalign[dev]'") from err

    cands, refs = synthetic_captions(a.images, a.refs, a.vocab, a.seed)
    peer_res = {i: [c] for i, c in cands.items()}  # pycocoevalcap's input format, built untimed
    ours, peer = CiderD(), Cider()
    ours_t, peer_t = [], []
    for _ in range(a.reps):  # alternate so that drifts in machine load hit both alike
        t, (_, ours_scores) = _timed(lambda: ours.compute_corpus(cands, refs))
        ours_t.append(t)
        t, (_, peer_scores) = _timed(lambda: peer.compute_score(refs, peer_res))
        peer_t.append(t)
    max_abs_diff = float(np.max(np.abs(np.asarray(ours_scores) - np.asarray(peer_scores))))

    build_s, cached = _timed(lambda: CachedCiderD(refs))
    image_ids, cand_list = list(cands), list(cands.values())
    cached_t = [_timed(lambda: cached.score(image_ids, cand_list))[0] for _ in range(a.reps)]

    ours_s, peer_s, cached_s = map(statistics.median, (ours_t, peer_t, cached_t))
    result = {
        "bench": "cider",
        "peer": "pycocoevalcap",
        "ratio": round(peer_s / ours_s, 1),
        "ours_s": round(ours_s, 4),
        "peer_s": round(peer_s, 4),
        "device": "cpu",
        "cached_s": round(cached_s, 4),
        "max_abs_diff": max_abs_diff,
        "cached_build_s": round(build_s, 4),
        "images": a.images,
        "refs_per_image": a.refs,
        "reps": a.reps,
        "mean_cider": round(float(np.mean(ours_scores)), 6),
    }
    _print_table(result, a.images)
    print(json.dumps(result))
    return result


def _print_table(r: dict, n_images: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CIDEr-D, {n_images:,} images x {r['refs_per_image']} refs, median of {r['reps']}")
    for col in ("", "seconds", "vs pycocoevalcap"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("pycocoevalcap Cider (corpus df)", f"{r['peer_s']:.3f}", "1.0x")
    table.add_row("rlalign CiderD (corpus df)", f"{r['ours_s']:.3f}", f"{r['ratio']:.1f}x faster")
    table.add_row(
        "rlalign CachedCiderD.score (cached df)",
        f"{r['cached_s']:.3f}",
        f"{r['peer_s'] / r['cached_s']:.1f}x faster",
    )
    table.add_row("rlalign CachedCiderD build (once)", f"{r['cached_build_s']:.3f}", "")
    Console().print(table)
    Console().print(
        f"max |ours - peer| per image: {r['max_abs_diff']:.2e}; mean CIDEr-D {r['mean_cider']:.4f}"
    )


if __name__ == "__main__":
    run(sys.argv[1:])
