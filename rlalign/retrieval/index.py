"""A FAISS vector index with its own id map, exclusion/dedup filtering and atomic save/load.

One class, `VectorIndex`, over three FAISS kinds (`flat` exact, `ivf`, `hnsw`) and two metrics:
`ip` is cosine similarity (vectors and queries are L2-normalised on the way in) and `l2` is squared
Euclidean distance. Scores always read "higher is closer": `ip` returns the cosine, `l2` returns the
*negative* squared distance, so a padded slot (score -inf, id -1) is the worst score under both.

FAISS only ever sees positions 0..N-1; the external int64 ids live in a numpy array next to it. That
keeps arbitrary ids working for every kind and on GPUs, where `add_with_ids` is not always supported.

With `faiss.get_num_gpus() > 0` (and `device` "auto" or "gpu") flat and IVF indexes are cloned onto
all visible GPUs, sharded or replicated; HNSW has no GPU implementation in FAISS and stays on the CPU.
Saved indexes are always CPU indexes, so a directory written on a GPU box loads anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

logger = logging.getLogger(__name__)

FORMAT_NAME = "rlalign.vector_index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
PAD_ID = -1
# FAISS GPU k-selection is limited to 2048 results per query.
_GPU_MAX_K = 2048


class IndexMetadataError(ValueError):
    """A saved index directory does not match what the caller expects, or is inconsistent."""


@dataclass(kw_only=True)
class IndexConfig:
    """How to build and search a `VectorIndex`."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    """`flat`: exact search; `ivf`: inverted lists over k-means cells; `hnsw`: graph search."""
    metric: Literal["ip", "l2"] = "ip"
    """`ip`: cosine similarity (inputs L2-normalised); `l2`: squared Euclidean distance."""
    nlist: int = 1024
    """IVF only: number of k-means cells. Training needs at least this many vectors (ideally 39x)."""
    nprobe: int = 16
    """IVF only: cells visited per query; higher is slower and closer to exact."""
    hnsw_m: int = 32
    """HNSW only: graph neighbours per node (FAISS `M`)."""
    ef_construction: int = 40
    """HNSW only: candidate list size while building."""
    ef_search: int = 64
    """HNSW only: candidate list size while searching (FAISS `efSearch`); raised to k when k is larger."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """`auto`: all visible GPUs when faiss sees any, else CPU; `gpu` fails when there is none."""
    gpu_mode: Literal["shard", "replicate"] = "shard"
    """Multi-GPU layout: `shard` splits the vectors across GPUs (more capacity), `replicate` copies
    them to each GPU and splits the queries (more throughput)."""
    filter_headroom: int = 8
    """Extra results fetched per query when dropping self-matches or near-duplicates, before trimming
    to k; the search widens (doubling) for the few queries that still come up short."""

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ("flat", "ivf", "hnsw"))
        _check_choice("metric", self.metric, ("ip", "l2"))
        _check_choice("device", self.device, ("auto", "cpu", "gpu"))
        _check_choice("gpu_mode", self.gpu_mode, ("shard", "replicate"))
        for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexConfig.{name} must be a positive int, got {value!r}")
        if self.hnsw_m < 2:
            raise ValueError(f"IndexConfig.hnsw_m must be >= 2, got {self.hnsw_m}")
        if self.kind == "ivf" and self.nprobe > self.nlist:
            raise ValueError(
                f"IndexConfig.nprobe ({self.nprobe}) cannot exceed nlist ({self.nlist}) for kind 'ivf'"
            )
        if self.filter_headroom < 0:
            raise ValueError(f"IndexConfig.filter_headroom must be >= 0, got {self.filter_headroom}")

    def factory_string(self) -> str:
        """The `faiss.index_factory` description of this index."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf":
            return f"IVF{self.nlist},Flat"
        return f"HNSW{self.hnsw_m},Flat"


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"IndexConfig.{name} must be one of {list(allowed)}, got {value!r}")


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _use_gpu(config: IndexConfig) -> bool:
    num_gpus = faiss.get_num_gpus()
    if config.device == "gpu" and num_gpus == 0:
        raise ValueError("IndexConfig.device='gpu' but faiss sees no GPU (is faiss-cpu installed?)")
    return config.device != "cpu" and num_gpus > 0


def _to_all_gpus(cpu_index: faiss.Index, gpu_mode: str) -> faiss.Index:
    """Clone a trained CPU index onto every visible GPU (sharded or replicated)."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = gpu_mode == "shard"
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class VectorIndex:
    """Nearest-neighbour search over float32 vectors with arbitrary int64 ids.

    Searches may run concurrently from several threads; `add`/`train` must not overlap a search.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None, *, fingerprint: str = "") -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.config = config or IndexConfig()
        self.fingerprint = fingerprint
        self.on_gpu = False
        self._want_gpu = _use_gpu(self.config)
        self._ids = np.empty(0, dtype=np.int64)
        self._index = faiss.index_factory(
            dim, self.config.factory_string(), _faiss_metric(self.config.metric)
        )
        if self.config.kind == "hnsw":
            self._index.hnsw.efConstruction = self.config.ef_construction
        self._apply_search_params()
        self._maybe_move_to_gpu()

    # ----------------------------------------------------------------- building

    @classmethod
    def build(
        cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig | None = None, *, fingerprint: str = ""
    ) -> VectorIndex:
        """Make an index of `vectors`' width, train it if it needs training, and add everything."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array [N, D], got shape {vectors.shape}")
        index = cls(int(vectors.shape[1]), config, fingerprint=fingerprint)
        index.add(vectors, ids)
        return index

    @property
    def count(self) -> int:
        return int(self._ids.size)

    def __len__(self) -> int:
        return self.count

    @property
    def ids(self) -> np.ndarray:
        """The stored ids in insertion order (a read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train IVF cells on `vectors` (a no-op for flat and HNSW)."""
        if self.is_trained:
            return
        x = self._prepare(vectors, "vectors")
        if x.shape[0] < self.config.nlist:
            raise ValueError(
                f"IVF training needs at least nlist={self.config.nlist} vectors, got {x.shape[0]}; "
                "lower IndexConfig.nlist or train on more data"
            )
        self._index.train(x)
        self._maybe_move_to_gpu()

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add `vectors` [N, D] under `ids` [N] (unique int64, never -1). Trains IVF on first use."""
        x = self._prepare(vectors, "vectors")
        ids = self._check_ids(ids, x.shape[0])
        if not self.is_trained:
            self.train(x)
        self._index.add(x)
        self._ids = np.concatenate([self._ids, ids])

    def _check_ids(self, ids: np.ndarray, n: int) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},) to match the vectors, got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if (ids == PAD_ID).any():
            raise ValueError(f"id {PAD_ID} is reserved for 'no result' and cannot be added")
        unique = np.unique(ids)
        if unique.size != n:
            raise ValueError("ids within one add() call must be unique")
        clash = np.intersect1d(unique, self._ids, assume_unique=True)
        if clash.size:
            raise ValueError(f"{clash.size} ids are already in the index (first: {int(clash[0])})")
        return ids

    # ---------------------------------------------------------------- searching

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall knobs of a built index (e.g. after `load`)."""
        changes = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        self.config = dataclasses.replace(self.config, **changes)
        self._apply_search_params()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude_ids: np.ndarray | None = None,
        dedup_threshold: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored vectors of each query, as (scores [Q, k] float32, ids [Q, k] int64).

        exclude_ids: one id per query to drop from its results (the query's own id for
            self-retrieval); -1 drops nothing for that query.
        dedup_threshold: drop near-duplicates of the query. For `ip`, hits with cosine >= threshold
            (e.g. 0.999); for `l2`, hits with squared distance <= threshold.
        Rows with fewer than k surviving hits are padded with id -1 and score -inf.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = int(k)
        q = self._prepare(queries, "queries")
        n_q = q.shape[0]
        exclude = self._check_exclude(exclude_ids, n_q)
        min_skip_score = None
        if dedup_threshold is not None:
            if not np.isfinite(dedup_threshold):
                raise ValueError(f"dedup_threshold must be finite, got {dedup_threshold!r}")
            min_skip_score = float(dedup_threshold) if self.config.metric == "ip" else -float(dedup_threshold)

        scores = np.full((n_q, k), -np.inf, dtype=np.float32)
        ids = np.full((n_q, k), PAD_ID, dtype=np.int64)
        if self.count == 0:
            return scores, ids
        filtering = exclude is not None or min_skip_score is not None
        cap = min(self.count, _GPU_MAX_K) if self.on_gpu else self.count
        fetch = min(k + (1 + self.config.filter_headroom if filtering else 0), cap)
        todo = np.arange(n_q)
        while todo.size:
            raw_scores, raw_ids = self._raw_search(q[todo], fetch)
            keep = raw_ids != PAD_ID
            if exclude is not None:
                keep &= raw_ids != exclude[todo, None]
            if min_skip_score is not None:
                keep &= raw_scores < min_skip_score
            # A row is final once it has k survivors, or once asking for more cannot find more:
            # the whole index was fetched, or FAISS already ran out of candidates (IVF cells, HNSW).
            exhausted = (raw_ids == PAD_ID).any(axis=1) | (fetch >= cap)
            done = (keep.sum(axis=1) >= k) | exhausted
            rows = todo[done]
            kept_scores, kept_ids = _compact(raw_scores[done], raw_ids[done], keep[done], k)
            scores[rows], ids[rows] = kept_scores, kept_ids
            todo = todo[~done]
            fetch = min(fetch * 2, cap)
        return scores, ids

    def _raw_search(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search mapped to external ids and "higher is closer" scores."""
        dist, pos = self._index.search(q, fetch)
        ids = np.where(pos >= 0, self._ids[np.clip(pos, 0, None)], PAD_ID)
        scores = dist if self.config.metric == "ip" else -dist
        scores = np.where(pos >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids

    def _check_exclude(self, exclude_ids: np.ndarray | None, n_q: int) -> np.ndarray | None:
        if exclude_ids is None:
            return None
        exclude = np.asarray(exclude_ids)
        if exclude.shape != (n_q,):
            raise ValueError(f"exclude_ids must have shape ({n_q},) (one id per query), got {exclude.shape}")
        if not np.issubdtype(exclude.dtype, np.integer):
            raise ValueError(f"exclude_ids must be integers, got dtype {exclude.dtype}")
        return exclude.astype(np.int64)

    # ------------------------------------------------------------------ helpers

    def _prepare(self, vectors: np.ndarray, what: str) -> np.ndarray:
        """Validate a [N, D] batch and return a contiguous float32 copy (L2-normalised for `ip`)."""
        x = np.asarray(vectors)
        if x.ndim != 2:
            raise ValueError(f"{what} must be a 2-D array [N, {self.dim}], got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"{what} is an empty batch (0 rows)")
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have dim {x.shape[1]}, but the index has dim {self.dim}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")
        x = np.array(x, dtype=np.float32, order="C", copy=True)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            raise ValueError(f"{what} contain NaN or inf (first bad row: {int(np.argmin(finite))})")
        if self.config.metric == "ip":
            norms = np.linalg.norm(x, axis=1)
            if (norms == 0).any():
                raise ValueError(
                    f"{what} row {int(np.argmin(norms))} has zero norm and cannot be normalised for "
                    "metric 'ip' (cosine)"
                )
            faiss.normalize_L2(x)
        return x

    def _apply_search_params(self) -> None:
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        if self.config.kind == "ivf":
            space.set_index_parameter(self._index, "nprobe", self.config.nprobe)
        elif self.config.kind == "hnsw":
            space.set_index_parameter(self._index, "efSearch", self.config.ef_search)

    def _maybe_move_to_gpu(self) -> None:
        if not self._want_gpu or self.on_gpu or not self.is_trained:
            return
        if self.config.kind == "hnsw":
            logger.info("FAISS has no GPU HNSW; keeping the hnsw index on the CPU")
            return
        self._index = _to_all_gpus(self._index, self.config.gpu_mode)
        self.on_gpu = True
        self._apply_search_params()
        logger.info("index moved to %d GPU(s), mode %s", faiss.get_num_gpus(), self.config.gpu_mode)

    # ----------------------------------------------------------------- save/load

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `index.faiss`, `ids.npy` and `meta.json` into `directory`, each atomically.

        meta.json goes last and records the count, so a reader that races a save (or a save that
        died halfway) is caught by the consistency checks in `load` instead of loading a mix.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        cpu_index = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        _atomic_write(out / INDEX_FILE, lambda tmp: faiss.write_index(cpu_index, str(tmp)))
        _atomic_write(out / IDS_FILE, lambda tmp: np.save(tmp, self._ids, allow_pickle=False))
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "metric": self.config.metric,
            "kind": self.config.kind,
            "count": self.count,
            "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "device"},
        }
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        _atomic_write(out / META_FILE, lambda tmp: tmp.write_text(text))
        return out

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        expect_fingerprint: str | None = None,
        expect_dim: int | None = None,
        device: Literal["auto", "cpu", "gpu"] = "auto",
    ) -> VectorIndex:
        """Read an index written by `save`, checking it against what the caller expects."""
        src = Path(directory)
        meta_path = src / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no index metadata (not a saved VectorIndex directory?)")
        meta = json.loads(meta_path.read_text())

        def mismatch(field: str, found: object, expected: object) -> IndexMetadataError:
            return IndexMetadataError(f"{meta_path}: field '{field}' is {found!r}, expected {expected!r}")

        if meta.get("format") != FORMAT_NAME:
            raise mismatch("format", meta.get("format"), FORMAT_NAME)
        if meta.get("version") != FORMAT_VERSION:
            raise mismatch("version", meta.get("version"), FORMAT_VERSION)
        if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
            raise mismatch("fingerprint", meta["fingerprint"], expect_fingerprint)
        if expect_dim is not None and meta["dim"] != expect_dim:
            raise mismatch("dim", meta["dim"], expect_dim)
        config = IndexConfig(**meta["config"], device=device)
        for field in ("metric", "kind"):
            if meta[field] != getattr(config, field):
                raise mismatch(field, meta[field], getattr(config, field))

        cpu_index = faiss.read_index(str(src / INDEX_FILE))
        ids = np.load(src / IDS_FILE, allow_pickle=False)
        checks = (
            (INDEX_FILE, "dim", cpu_index.d, meta["dim"]),
            (INDEX_FILE, "count", cpu_index.ntotal, meta["count"]),
            (INDEX_FILE, "metric", cpu_index.metric_type, _faiss_metric(meta["metric"])),
            (IDS_FILE, "count", ids.shape, (meta["count"],)),
            (IDS_FILE, "dtype", str(ids.dtype), "int64"),
        )
        for file, field, found, expected in checks:
            if found != expected:
                raise IndexMetadataError(
                    f"{src / file}: {field} is {found!r} but {meta_path.name} says {expected!r} "
                    "(partial or mixed save?)"
                )

        index = cls.__new__(cls)
        index.dim = int(meta["dim"])
        index.config = config
        index.fingerprint = meta["fingerprint"]
        index.on_gpu = False
        index._want_gpu = _use_gpu(config)
        index._ids = ids
        index._index = cpu_index
        index._apply_search_params()
        index._maybe_move_to_gpu()
        return index


def _compact(scores: np.ndarray, ids: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first k kept (score, id) pairs in their original order; -inf/-1 padding after."""
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out_scores = np.take_along_axis(scores, order, axis=1)
    out_ids = np.take_along_axis(ids, order, axis=1)
    valid = np.take_along_axis(keep, order, axis=1)
    out_scores = np.where(valid, out_scores, -np.inf).astype(np.float32)
    out_ids = np.where(valid, out_ids, PAD_ID)
    if out_ids.shape[1] < k:  # fewer candidates than k in the whole index
        pad = k - out_ids.shape[1]
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=PAD_ID)
    return out_scores, out_ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact neighbours (ignoring -1 padding) that the approximate
    search also returned. k is `exact_ids.shape[1]`; `approx_ids` may return more or fewer."""
    approx = np.asarray(approx_ids)
    exact = np.asarray(exact_ids)
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise ValueError(f"need two [Q, k] id arrays with the same Q, got {approx.shape} and {exact.shape}")
    valid = exact != PAD_ID
    found = (exact[:, :, None] == approx[:, None, :]).any(axis=2) & valid
    per_query = valid.sum(axis=1)
    rows = per_query > 0
    if not rows.any():
        raise ValueError("exact_ids holds no neighbours (all -1); recall is undefined")
    return float((found.sum(axis=1)[rows] / per_query[rows]).mean())
