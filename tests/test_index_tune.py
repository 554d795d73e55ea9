"""`rlalign index tune`: the chosen settings reach the target recall on held-out queries (recomputed here
against a float64 brute force, and on fresh queries), the choice is the fastest such row, and the CLI
writes the table and the plot beside the index."""

from __future__ import annotations

import json

import numpy as np
from conftest import TINY, rlalign
from PIL import Image

from rlalign.config.pairs import IndexConfig
from rlalign.retrieval.index import VectorIndex, recall_at_k
from rlalign.retrieval.tune import TUNE_JSON, TUNE_PLOT, TUNE_TABLE, tune


def _clustered(n: int, dim: int = 32, clusters: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def _exact_ids(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    b = base.astype(np.float64) / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ b.T), axis=1, kind="stable")[:, :k]


def test_tune_choice_meets_the_target_on_held_out_queries():
    data = _clustered(12_000)
    target = 0.9
    result = tune(data, IndexConfig(target_recall=target), k=10, n_queries=300, reps=1)
    assert {r.kind for r in result.rows} >= {"flat", "ivf", "hnsw"} and any(
        r.recall < target for r in result.rows
    )
    meeting = [r for r in result.rows if r.recall >= target]
    assert result.chosen is max(meeting, key=lambda r: r.queries_per_s)

    # recompute the chosen setting's recall on the same held-out queries, against float64 brute force
    held = result.held_out
    base, queries = data[~held], data[held]
    index = VectorIndex.build(base, np.arange(len(base)), result.chosen.config(IndexConfig(device="cpu")))
    recall = recall_at_k(index.search(queries, 10)[1], _exact_ids(base, queries, 10))
    assert recall >= target and abs(recall - result.chosen.recall) < 1e-3
    fresh = _clustered(12_300)[12_000:]  # new points around the same centres
    assert recall_at_k(index.search(fresh, 10)[1], _exact_ids(base, fresh, 10)) >= target - 0.02


def test_tune_cli_writes_table_and_plot_beside_the_index(tmp_path):
    out = tmp_path / "pairs"
    args = [
        TINY,
        "trainer.output_dir=unused",
        f"pairs.output_dir={out}",
        f"pairs.embedder.cache_dir={tmp_path / 'c'}",
    ]
    done = rlalign("index", "tune", *args, "pairs.index.target_recall=0.9", "--queries", "12", "--reps", "1")
    report = json.loads((out / "index" / TUNE_JSON).read_text())
    assert report["target_recall"] == 0.9 and report["chosen"]["recall"] >= 0.9 and report["queries"] == 12
    assert report["base"] == 64 - 12  # the tiny recipe's 64 training images, less the held-out queries
    table = (out / "index" / TUNE_TABLE).read_text().splitlines()
    assert len([line for line in table if line.startswith("| ") and "---" not in line]) == 1 + len(
        report["rows"]
    )
    assert sum(line.endswith("| chosen |") for line in table) == 1
    with Image.open(out / "index" / TUNE_PLOT) as png:
        assert png.size == (715, 462)  # 6.5 x 4.2 in at 110 dpi
    assert f"use: pairs.index.kind={report['chosen']['kind']}" in done.stdout
