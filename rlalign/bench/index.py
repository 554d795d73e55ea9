"""`rlalign bench index`: exact and approximate `VectorIndex` kinds against brute-force torch matmul + top-k,
at dataset scale, in one run.

Two parts, both against the same peer (torch float32 matmul + top-k in query chunks, exact):

- speed and memory on clustered synthetic vectors (`--sizes`, default 100k and 1M x 512; quick to make:
  unit cluster centres plus Gaussian spread, then normalised). Per size: FAISS flat (exact), IVF,
  IVF-PQ and (up to `--hnsw-max` vectors) HNSW. IVF cells are `IndexConfig`'s data-chosen default,
  trained on a sample; each approximate kind's search effort (nprobe, efSearch) is the smallest whose
  recall@k on a separate set of tuning queries reaches `--target`, then it is timed on the benchmark
  queries. Reported: queries/s (median of `--reps`, alternating with the peer), recall@k against the
  peer's exact top-k, build seconds, and bytes per vector (the serialised index plus the id map).
- recall on real embeddings: shapes-world images through a small vision tower (CLIP layout, mean-pooled
  and L2-normalised as `ImageEmbedder` does) that is first trained for `--train-steps` to tell which
  shape and colour sits in which cell, so neighbours mean something; queries are held-out images.

    rlalign bench index [--sizes 100000 1000000] [--dim 512] [--queries 1000] [--k 10] [--reps 3]
                        [--shapes 20000] [--train-steps 300] [--hnsw-max 200000]

Ends with one JSON line; `ratio` is the best approximate index's queries/s over the peer's among those at
recall@k >= `--target`, at the largest size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rlalign.config.pairs import IndexConfig
from rlalign.retrieval.index import VectorIndex, recall_at_k

EFFORT = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """`n` unit vectors around `clusters` random unit centres (per-coordinate spread `spread`/sqrt(dim))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= spread / np.sqrt(dim)
        block += centres[rng.integers(0, clusters, stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def torch_topk(base: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 256) -> np.ndarray:
    """The peer: exact float32 top-k by matmul, `chunk` queries at a time."""
    ids = [torch.topk(q @ base.T, k, dim=1).indices for q in queries.split(chunk)]
    return torch.cat(ids).numpy()


def tie_aware_recall(found: np.ndarray, exact: np.ndarray, base: np.ndarray, queries: np.ndarray) -> float:
    """Share of returned ids whose true cosine reaches the exact k-th best (1e-5 slack): near-duplicate
    images tie, and id-set recall would then count an equally close neighbour as a miss."""
    kth = np.einsum("qd,qd->q", queries, base[exact[:, -1]])
    safe = np.where(found >= 0, found, 0)
    score = np.einsum("qd,qkd->qk", queries, base[safe])
    return float(((score >= kth[:, None] - 1e-5) & (found >= 0)).mean())


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _choose_effort(
    index: VectorIndex, tune_q: np.ndarray, tune_exact: np.ndarray, k: int, target: float
) -> int:
    """The smallest nprobe / efSearch whose recall@k on the tuning queries reaches `target`; where the
    kind cannot reach it (IVF-PQ's codes cap its recall), the effort where recall stops rising."""
    hnsw = index.config.kind == "hnsw"
    knob = "ef_search" if hnsw else "nprobe"
    limit = 10**9 if hnsw else (index.nlist or 1)
    efforts = [e for e in EFFORT if e <= limit and (not hnsw or e >= k)]
    previous = -1.0
    for i, effort in enumerate(efforts):
        index.set_search_params(**{knob: effort})
        recall = recall_at_k(index.search(tune_q, k)[1], tune_exact)
        if recall >= target:
            return effort
        if recall < previous + 0.002:  # a plateau: more effort buys nothing
            index.set_search_params(**{knob: efforts[i - 1]})
            return efforts[i - 1]
        previous = recall
    return efforts[-1]


def speed_part(n: int, a: argparse.Namespace) -> dict[str, Any]:
    """Every kind against the peer on `n` clustered vectors."""
    t_make, data = _timed(
        lambda: clustered(n + a.queries + a.tune_queries, a.dim, a.clusters, a.spread, a.seed + n)
    )
    base, queries, tune_q = data[:n], data[n : n + a.queries], data[n + a.queries :]
    tb, tq = torch.from_numpy(base), torch.from_numpy(queries)
    ids = np.arange(n)
    exact = torch_topk(tb, tq, a.k)
    tune_exact = torch_topk(tb, torch.from_numpy(tune_q), a.k)
    kinds = {
        "flat": IndexConfig(kind="flat", device="cpu", exact_backend="faiss"),
        "ivf": IndexConfig(kind="ivf", device="cpu"),
        "ivfpq": IndexConfig(kind="ivfpq", pq_m=a.pq_m, device="cpu"),
    }
    if n <= a.hnsw_max:
        kinds["hnsw"] = IndexConfig(
            kind="hnsw", hnsw_m=a.hnsw_m, ef_construction=a.ef_construction, device="cpu"
        )
    rows: dict[str, dict[str, Any]] = {}
    indexes: dict[str, VectorIndex] = {}
    for name, cfg in kinds.items():
        build_s, index = _timed(lambda cfg=cfg: VectorIndex.build(base, ids, cfg))
        effort = None if name == "flat" else _choose_effort(index, tune_q, tune_exact, a.k, a.target)
        indexes[name] = index
        rows[name] = {
            "build_s": round(build_s, 2),
            "bytes_per_vector": round(index.bytes_per_vector(), 1),
            "nlist": index.nlist,
            "effort": effort,
        }
    times: dict[str, list[float]] = {name: [] for name in ["torch", *kinds]}
    for _ in range(a.reps):  # alternate ours and the peer within each repetition
        times["torch"].append(_timed(lambda: torch_topk(tb, tq, a.k))[0])
        for name, index in indexes.items():
            t, (_, found) = _timed(lambda index=index: index.search(queries, a.k))
            times[name].append(t)
            rows[name]["recall"] = round(recall_at_k(found, exact), 4)
    peer_qps = a.queries / statistics.median(times["torch"])
    for name in kinds:
        qps = a.queries / statistics.median(times[name])
        rows[name].update(queries_per_s=round(qps, 1), ratio=round(qps / peer_qps, 2))
    del indexes
    return {
        "n": n,
        "make_s": round(t_make, 1),
        "torch": {"queries_per_s": round(peer_qps, 1), "bytes_per_vector": 4 * a.dim},
        "kinds": rows,
    }


def _shapes_batch(shapes: Any, split: str, rows: range) -> tuple[list, torch.Tensor]:
    """Images of `rows` and their targets: which shape and which colour sits in each of the 9 cells."""
    from rlalign.shapes import COLORS, POSITIONS, SHAPES, make_item

    colors = list(COLORS)
    items = [make_item(shapes, split, i) for i in rows]
    target = torch.zeros(len(items), len(POSITIONS) * (len(SHAPES) + len(colors)))
    for r, item in enumerate(items):
        for o in item.objects:
            cell = POSITIONS.index(o.position)
            target[r, cell * len(SHAPES) + SHAPES.index(o.shape)] = 1
            target[r, len(POSITIONS) * len(SHAPES) + cell * len(colors) + colors.index(o.color)] = 1
    return [item.image for item in items], target


def trained_tower(a: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict[str, float]]:
    """A small CLIP-layout vision tower trained (mean-pooled patch tokens -> linear head, BCE) to name the
    shape and colour in each cell of shapes-world images; returns (tower, processor, training figures)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from rlalign.shapes import ShapesConfig

    shapes = ShapesConfig(seed=a.seed)
    size = shapes.image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(a.seed)
        config = CLIPVisionConfig(
            hidden_size=a.tower_dim,
            intermediate_size=2 * a.tower_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=size,
            patch_size=size // 6,
        )
        tower = CLIPVisionModel(config)
        _, probe = _shapes_batch(shapes, "train", range(1))
        head = torch.nn.Linear(a.tower_dim, probe.shape[1])
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=2e-3)
    start, losses = time.perf_counter(), []
    batch = 64
    for step in range(a.train_steps):
        # training images come after the benchmark's base and queries, so none of them is seen
        images, target = _shapes_batch(
            shapes, "train", range(a.shapes + step * batch, a.shapes + (step + 1) * batch)
        )
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        pooled = tower(pixel_values=pixels).last_hidden_state[:, 1:].mean(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pooled), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tower.eval()
    first, last = statistics.mean(losses[:10] or [0.0]), statistics.mean(losses[-10:] or [0.0])
    return (
        tower,
        processor,
        {"train_s": round(time.perf_counter() - start, 1), "loss_first": first, "loss_last": last},
    )


def shapes_part(a: argparse.Namespace) -> dict[str, Any]:
    """Recall of each kind on trained-tower embeddings of shapes images (held-out queries)."""
    from rlalign.config.pairs import EmbedderConfig
    from rlalign.retrieval.embedder import ImageEmbedder
    from rlalign.shapes import ShapesConfig, make_item

    tower, processor, training = trained_tower(a)
    embedder = ImageEmbedder(tower, processor, EmbedderConfig(cache_dir=None, batch_size=256))
    shapes = ShapesConfig(seed=a.seed)

    def embed(split: str, count: int) -> np.ndarray:
        parts = []
        for start in range(0, count, 2048):
            rows = range(start, min(start + 2048, count))
            parts.append(embedder.forward([make_item(shapes, split, i).image for i in rows]))
        return np.concatenate(parts)

    t_embed, (base, queries) = _timed(lambda: (embed("train", a.shapes), embed("val", a.shapes_queries)))
    exact = torch_topk(torch.from_numpy(base), torch.from_numpy(queries), a.k)
    ids = np.arange(len(base))
    # the effort is tuned on the first half of the queries and measured on the second
    half = len(queries) // 2
    tune_q, test_q = queries[:half], queries[half:]
    recall, id_recall = {}, {}
    for cfg in (
        IndexConfig(kind="flat", device="cpu"),
        IndexConfig(kind="ivf", device="cpu"),
        IndexConfig(kind="ivfpq", pq_m=max(4, a.tower_dim // 8), device="cpu"),
        IndexConfig(kind="hnsw", hnsw_m=a.hnsw_m, device="cpu"),
    ):
        index = VectorIndex.build(base, ids, cfg)
        if cfg.kind != "flat":
            _choose_effort(index, tune_q, exact[:half], a.k, a.target)
        found = index.search(test_q, a.k)[1]
        recall[cfg.kind] = round(tie_aware_recall(found, exact[half:], base, test_q), 4)
        id_recall[cfg.kind] = round(recall_at_k(found, exact[half:]), 4)
    neighbour = float(np.mean(np.einsum("qd,qd->q", queries, base[exact[:, 0]])))
    tenth = float(np.mean(np.einsum("qd,qd->q", queries, base[exact[:, -1]])))
    random_pair = float(np.mean(np.einsum("qd,qd->q", queries, base[: len(queries)])))
    return {
        "images": a.shapes,
        "queries": len(test_q),
        "dim": a.tower_dim,
        "embed_images_per_s": round((a.shapes + a.shapes_queries) / t_embed, 1),
        "recall": recall,
        "id_recall": id_recall,
        "mean_top1_cosine": round(neighbour, 4),
        "mean_top10_cosine": round(tenth, 4),
        "mean_random_pair_cosine": round(random_pair, 4),
        **training,
    }


def run(args: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rlalign bench index")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--tune-queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--target", type=float, default=0.95, help="recall@k each approximate kind is tuned to")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0, help="cluster spread relative to the centre norm")
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--hnsw-max", type=int, default=200_000, help="largest size HNSW is built for")
    p.add_argument("--shapes", type=int, default=20_000, help="shapes images in the recall part (0: skip)")
    p.add_argument("--shapes-queries", type=int, default=1000)
    p.add_argument("--tower-dim", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(args)
    sizes = [speed_part(n, a) for n in a.sizes]
    out = sys.stdout
    out.write(f"{'n':>9} {'index':8} {'build_s':>8} {'effort':>7} {'queries/s':>10} {'x torch':>8} ")
    out.write(f"{'recall@' + str(a.k):>10} {'bytes/vec':>10}\n")
    for part in sizes:
        out.write(f"{part['n']:9d} {'torch':8} {0:8.2f} {'':>7} {part['torch']['queries_per_s']:10.0f} ")
        out.write(f"{1.0:8.2f} {1.0:10.4f} {part['torch']['bytes_per_vector']:10.0f}\n")
        for name, r in part["kinds"].items():
            effort = "" if r["effort"] is None else str(r["effort"])
            out.write(f"{part['n']:9d} {name:8} {r['build_s']:8.2f} {effort:>7} {r['queries_per_s']:10.0f} ")
            out.write(f"{r['ratio']:8.2f} {r['recall']:10.4f} {r['bytes_per_vector']:10.1f}\n")
    shapes = shapes_part(a) if a.shapes else None
    if shapes:
        out.write(f"shapes ({shapes['images']} images, trained tower, dim {shapes['dim']}): recall@{a.k} ")
        out.write(", ".join(f"{k} {v:.4f}" for k, v in shapes["recall"].items()) + "\n")
    largest = sizes[-1]
    meeting = {n: r for n, r in largest["kinds"].items() if n != "flat" and r["recall"] >= a.target}
    best = max(meeting, key=lambda n: meeting[n]["queries_per_s"]) if meeting else "flat"
    result = {
        "bench": "index",
        "peer": "torch-matmul-topk",
        "ratio": largest["kinds"][best]["ratio"],
        "best_index": best,
        "n": largest["n"],
        f"recall_at_{a.k}": largest["kinds"][best]["recall"],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "dim": a.dim,
        "queries": a.queries,
        "sizes": sizes,
        "shapes": shapes,
    }
    out.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
