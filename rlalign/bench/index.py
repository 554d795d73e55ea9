"""`rlalign bench index`: FAISS Flat / IVF / HNSW (through `VectorIndex`) against brute-force torch
matmul + top-k on the same embeddings, in one run.

Embeddings are real: the vision tower (random init, CLIP-style, hidden = --dim) of generated shapes
images, pooled and L2-normalised like `ImageEmbedder`; queries are held-out shapes images
(`--source random` uses Gaussian vectors instead, for quick runs). Each index is built once (build
time reported), then searched in alternating repetitions with the torch peer; medians are reported.
Recall@k of each index is measured against the exact torch top-k, tie-aware (a hit is any id as
close as the exact k-th neighbour; `id_recall` is the strict id-set figure). Ends with one JSON line; `ratio` is
exact FAISS (flat) queries/s over torch's, `ratio_by_index` gives every kind's.

    rlalign bench index [--n 100000] [--dim 512] [--queries 1000] [--k 10] [--reps 3] [--source shapes]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from rlalign.retrieval.index import IndexConfig, VectorIndex, recall_at_k


def shapes_embeddings(n: int, n_queries: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from rlalign.data.shapes import ShapesConfig, make_item
    from rlalign.retrieval.config import EmbedderConfig
    from rlalign.retrieval.embedder import ImageEmbedder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                                                 num_attention_heads=8, image_size=48, patch_size=16))  # fmt: skip
    proc = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    embedder = ImageEmbedder(tower, proc, EmbedderConfig(cache_dir=None, batch_size=256))
    shapes = ShapesConfig(seed=seed)

    def embed(split: str, count: int) -> np.ndarray:
        out = []
        for start in range(0, count, 2048):
            out.append(
                embedder.embed(
                    [make_item(shapes, split, i).image for i in range(start, min(start + 2048, count))]
                )
            )
        return np.concatenate(out)

    return embed("train", n), embed("val", n_queries)


def torch_topk(base: torch.Tensor, queries: torch.Tensor, k: int) -> np.ndarray:
    ids = [torch.topk(q @ base.T, k, dim=1).indices for q in queries.split(1024)]
    return torch.cat(ids).numpy()


def tie_aware_recall(found: np.ndarray, exact: np.ndarray, base: np.ndarray, queries: np.ndarray) -> float:
    """Share of returned ids whose true cosine reaches the exact k-th best (1e-5 slack): near-duplicate
    images tie, and id-set recall would then count an equally close neighbour as a miss."""
    kth = np.einsum("qd,qd->q", queries, base[exact[:, -1]])
    safe = np.where(found >= 0, found, 0)
    score = np.einsum("qd,qkd->qk", queries, base[safe])
    return float(((score >= kth[:, None] - 1e-5) & (found >= 0)).mean())


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rlalign bench index")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--source", choices=("shapes", "random"), default="shapes")
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(args)
    t_embed, (base, queries) = _timed(
        lambda: shapes_embeddings(a.n, a.queries, a.dim, a.seed) if a.source == "shapes" else (
            np.random.default_rng(a.seed).standard_normal((a.n, a.dim), dtype=np.float32),
            np.random.default_rng(a.seed + 1).standard_normal((a.queries, a.dim), dtype=np.float32)))  # fmt: skip
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    tb, tq = torch.from_numpy(base), torch.from_numpy(queries)
    ids = np.arange(a.n)
    configs = {
        "flat": IndexConfig(kind="flat", device="cpu"),
        "ivf": IndexConfig(
            kind="ivf", nlist=min(a.nlist, a.n // 39 or 1), nprobe=min(a.nprobe, a.nlist), device="cpu"
        ),
        "hnsw": IndexConfig(kind="hnsw", hnsw_m=a.hnsw_m, ef_search=a.ef_search, device="cpu"),
    }
    build_s, indexes = {}, {}
    for name, cfg in configs.items():
        build_s[name], indexes[name] = _timed(lambda cfg=cfg: VectorIndex.build(base, ids, cfg))
    exact = torch_topk(tb, tq, a.k)
    times: dict[str, list[float]] = {name: [] for name in ["torch", *configs]}
    recall, id_recall = {}, {}
    for _ in range(a.reps):  # alternate ours and the peer within each repetition
        times["torch"].append(_timed(lambda: torch_topk(tb, tq, a.k))[0])
        for name, index in indexes.items():
            t, (_, found) = _timed(lambda index=index: index.search(queries, a.k))
            times[name].append(t)
            recall[name] = round(tie_aware_recall(found, exact, base, queries), 4)
            id_recall[name] = round(recall_at_k(found, exact), 4)
    qps = {name: a.queries / statistics.median(ts) for name, ts in times.items()}
    rows = [("torch-matmul-topk", 0.0, qps["torch"], 1.0)] + [
        (n, build_s[n], qps[n], recall[n]) for n in configs
    ]
    sys.stdout.write(f"{'index':20} {'build_s':>9} {'queries/s':>11} {'recall@' + str(a.k):>10}\n")
    for name, b, q, r in rows:
        sys.stdout.write(f"{name:20} {b:9.3f} {q:11.0f} {r:10.4f}\n")
    result = {
        "bench": "index", "peer": "torch-matmul-topk", "ratio": round(qps["flat"] / qps["torch"], 3), "device": "cpu",
        "recall_at_10" if a.k == 10 else f"recall_at_{a.k}": recall,
        "id_recall": id_recall, "ratio_by_index": {n: round(qps[n] / qps["torch"], 3) for n in configs},
        "queries_per_s": {n: round(v, 1) for n, v in qps.items()}, "build_s": {n: round(v, 3) for n, v in build_s.items()},
        "n": a.n, "dim": a.dim, "queries": a.queries, "k": a.k, "source": a.source, "embed_s": round(t_embed, 2),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    sys.stdout.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
