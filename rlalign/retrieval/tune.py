"""`rlalign index tune`: pick index settings from the data by a small recall-vs-speed sweep.

A seeded sample of the vectors is held out as queries and the rest is the base. Exact search on the
base gives each query's true k nearest neighbours. Then every candidate is built once per structure
(IVF cells, PQ code size, HNSW M) and searched at rising search effort (nprobe, efSearch) until its
recall@k reaches the target (one step past it, to show the curve bend). The choice is the fastest row
whose measured recall meets `target_recall`; exact search always meets it, so on small pools (or
when nothing approximate is faster) the choice is `flat`. Written beside the index: `tune.json`
(every row and the choice), `tune.md` (the table) and `tune.png` (recall against queries/s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlalign.config.pairs import IndexConfig
from rlalign.retrieval.index import VectorIndex, recall_at_k
from rlalign.utils.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

TUNE_JSON, TUNE_TABLE, TUNE_PLOT = "tune.json", "tune.md", "tune.png"
EFFORT = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Search effort steps: nprobe for IVF kinds, efSearch for HNSW (clipped to what the index allows)."""


@dataclass
class TuneRow:
    """One measured setting."""

    kind: str
    settings: dict[str, int]
    recall: float
    queries_per_s: float
    build_s: float
    bytes_per_vector: float

    def config(self, base: IndexConfig) -> IndexConfig:
        return dataclasses.replace(base, kind=self.kind, **self.settings)  # type: ignore[arg-type]

    def label(self) -> str:
        return self.kind + "".join(f" {k}={v}" for k, v in self.settings.items())


@dataclass
class TuneResult:
    """The sweep and its choice."""

    rows: list[TuneRow]
    chosen: TuneRow
    target_recall: float
    k: int
    base: int
    queries: int
    held_out: np.ndarray = field(repr=False)
    """Which input vectors were the queries (bool [N]); the rest was the base."""

    def overrides(self) -> list[str]:
        """The recipe overrides that select the chosen settings."""
        return [f"pairs.index.kind={self.chosen.kind}"] + [
            f"pairs.index.{k}={v}" for k, v in self.chosen.settings.items()
        ]


def _timed_search(index: VectorIndex, queries: np.ndarray, k: int, reps: int) -> tuple[float, np.ndarray]:
    times, found = [], None
    for _ in range(reps):
        start = time.perf_counter()
        _, found = index.search(queries, k)
        times.append(time.perf_counter() - start)
    assert found is not None
    return len(queries) / statistics.median(times), found


def _structures(n: int, dim: int, base: IndexConfig) -> list[tuple[str, dict[str, int]]]:
    """Index structures worth building for `n` vectors of width `dim` (search effort is swept apart)."""
    cells = base.cells(n)
    out: list[tuple[str, dict[str, int]]] = [("flat", {})]
    for nlist in sorted({max(1, cells // 2), cells}):
        if n >= 39 * nlist and nlist >= 4:
            out.append(("ivf", {"nlist": nlist}))
    pq = [m for m in (dim // 4, dim // 8) if m >= 4 and dim % m == 0]
    if n >= 39 * cells and cells >= 4 and n >= 256 * 8:  # PQ codebooks train on 256 points each
        out += [("ivfpq", {"nlist": cells, "pq_m": m}) for m in pq]
    out += [("hnsw", {"hnsw_m": m}) for m in (16, 32)]
    return out


def tune(
    vectors: np.ndarray,
    base: IndexConfig | None = None,
    *,
    k: int = 10,
    n_queries: int = 500,
    reps: int = 3,
    seed: int = 0,
) -> TuneResult:
    """Sweep index settings over `vectors` [N, D] and choose the fastest meeting `base.target_recall`."""
    base = dataclasses.replace(base or IndexConfig(), device="cpu")
    n_all, dim = vectors.shape
    n_queries = min(n_queries, n_all // 5)
    if n_queries < 1 or n_all - n_queries <= k:
        raise ValueError(f"index tune needs more than {k} vectors plus held-out queries, got {n_all}")
    held = np.zeros(n_all, dtype=bool)
    held[np.random.default_rng(seed).choice(n_all, n_queries, replace=False)] = True
    queries, data = vectors[held], vectors[~held]
    ids = np.arange(len(data))
    rows: list[TuneRow] = []
    exact_ids = None
    for kind, structure in _structures(len(data), dim, base):
        config = dataclasses.replace(base, kind=kind, exact_backend="faiss", **structure)  # type: ignore[arg-type]
        start = time.perf_counter()
        index = VectorIndex.build(data, ids, config)
        build_s = time.perf_counter() - start
        size = index.bytes_per_vector()
        if kind == "flat":
            qps, exact_ids = _timed_search(index, queries, k, reps)
            rows.append(TuneRow(kind, {}, 1.0, qps, build_s, size))
            continue
        assert exact_ids is not None
        knob = "ef_search" if kind == "hnsw" else "nprobe"
        limit = 10**9 if kind == "hnsw" else (index.nlist or 1)
        for effort in [e for e in EFFORT if e <= limit]:
            index.set_search_params(**{knob: effort})
            qps, found = _timed_search(index, queries, k, reps)
            recall = recall_at_k(found, exact_ids)
            rows.append(TuneRow(kind, {**structure, knob: effort}, round(recall, 4), qps, build_s, size))
            log.info("tune: %-36s recall@%d %.4f  %9.0f queries/s", rows[-1].label(), k, recall, qps)
            if recall >= base.target_recall + (1 - base.target_recall) / 2 or recall >= 1.0:
                break
    meeting = [r for r in rows if r.recall >= base.target_recall]
    chosen = max(meeting, key=lambda r: r.queries_per_s)
    return TuneResult(rows, chosen, base.target_recall, k, len(data), n_queries, held)


def table(result: TuneResult) -> str:
    """The sweep as a Markdown table, the chosen row marked."""
    lines = [
        f"index tune: {result.base} vectors, {result.queries} held-out queries, recall@{result.k} target "
        f"{result.target_recall}",
        "",
        f"| setting | recall@{result.k} | queries/s | build s | bytes/vector | |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result.rows:
        mark = "chosen" if r is result.chosen else ""
        lines.append(
            f"| {r.label()} | {r.recall:.4f} | {r.queries_per_s:.0f} | {r.build_s:.2f} | "
            f"{r.bytes_per_vector:.1f} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: TuneResult, path: Path) -> Path:
    """Recall@k against queries/s per kind, the target as a line, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind in dict.fromkeys(r.kind for r in result.rows):
        rows = [r for r in result.rows if r.kind == kind]
        ax.plot([r.queries_per_s for r in rows], [r.recall for r in rows], "o-", ms=3, label=kind)
    ax.axhline(result.target_recall, color="gray", ls="--", lw=1, label=f"target {result.target_recall}")
    ax.plot(
        result.chosen.queries_per_s, result.chosen.recall, "o", ms=12, mfc="none", mec="red", label="chosen"
    )
    ax.set_xscale("log")
    ax.set_xlabel("queries / s")
    ax.set_ylabel(f"recall@{result.k}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_report(result: TuneResult, directory: Path) -> dict[str, Path]:
    """`tune.json`, `tune.md` and `tune.png` in `directory` (beside the index)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "target_recall": result.target_recall,
        "k": result.k,
        "base": result.base,
        "queries": result.queries,
        "chosen": dataclasses.asdict(result.chosen),
        "overrides": result.overrides(),
        "rows": [dataclasses.asdict(r) for r in result.rows],
    }
    return {
        "json": atomic_write_text(directory / TUNE_JSON, json.dumps(payload, indent=2) + "\n"),
        "table": atomic_write_text(directory / TUNE_TABLE, table(result)),
        "plot": plot(result, directory / TUNE_PLOT),
    }
