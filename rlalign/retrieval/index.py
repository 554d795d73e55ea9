"""A FAISS vector index with its own id map, exclusion/dedup filtering and atomic save/load.

One class, `VectorIndex`, over four kinds (`flat` exact, `ivf`, `ivfpq`, `hnsw`) and two metrics:
`ip` is cosine similarity (vectors and queries are L2-normalised on the way in) and `l2` is squared
Euclidean distance. Scores always read "higher is closer": `ip` returns the cosine, `l2` returns the
*negative* squared distance, so a padded slot (score -inf, id -1) is the worst score under both.

FAISS only ever sees positions 0..N-1; the external int64 ids live in a numpy array next to it. That
keeps arbitrary ids working for every kind and on GPUs, where `add_with_ids` is not always supported.

On a machine with a GPU (`device` "auto" or "gpu"), exact search runs as a torch kNN on the GPU
(`rlalign.retrieval.knn`: matmul + top-k in chunks, half precision rescored in float32), whatever
FAISS build is installed; IVF / IVF-PQ indexes are cloned onto all GPUs FAISS sees, sharded or
replicated; HNSW has no GPU implementation in FAISS and stays on the CPU. IVF cells are trained on a
seeded sample (`train_size`), so a million vectors train in seconds. Saved indexes are always CPU
FAISS indexes, so a directory written on a GPU box loads anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from rlalign.config.pairs import IndexConfig
from rlalign.utils.io import atomic_write

logger = logging.getLogger(__name__)

FORMAT_NAME = "rlalign.vector_index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
PAD_ID = -1
# FAISS GPU k-selection is limited to 2048 results per query.
_GPU_MAX_K = 2048
TRAIN_PER_CELL = 64
"""Training vectors per IVF cell when `train_size` is unset (FAISS asks for 39 at least, uses 256 at most)."""
PQ_TRAIN = 256 * 39
"""IVF-PQ trains its 256-centroid codebooks on at least this many vectors (FAISS's minimum)."""
TRAIN_SEED = 1234

__all__ = ["IndexConfig", "IndexMetadataError", "VectorIndex", "recall_at_k"]


class IndexMetadataError(ValueError):
    """A saved index directory does not match what the caller expects, or is inconsistent."""


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _torch_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _placement(config: IndexConfig) -> Literal["cpu", "faiss-gpu", "torch-gpu", "torch-cpu"]:
    """Where searches run. Exact search on a GPU is the torch kNN unless `exact_backend` is `faiss`;
    approximate kinds go to FAISS's GPU when it sees one (HNSW has none in FAISS), else the CPU."""
    faiss_gpus = faiss.get_num_gpus() > 0
    flat = config.kind == "flat"
    torch_gpu = flat and config.exact_backend != "faiss" and config.device != "cpu" and _torch_gpu()
    if torch_gpu:
        return "torch-gpu"
    if config.device != "cpu" and faiss_gpus and config.kind != "hnsw":
        return "faiss-gpu"
    if config.device == "gpu":
        raise ValueError(
            f"IndexConfig.device='gpu' but there is no GPU for kind '{config.kind}' (faiss sees no GPU"
            f"{'' if flat else '; only kind flat runs on a GPU through torch'}; is faiss-cpu installed?)"
        )
    return "torch-cpu" if flat and config.exact_backend == "torch" else "cpu"


def _to_all_gpus(cpu_index: faiss.Index, gpu_mode: str) -> faiss.Index:
    """Clone a trained CPU index onto every visible GPU (sharded or replicated)."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = gpu_mode == "shard"
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options)


class VectorIndex:
    """Nearest-neighbour search over float32 vectors with arbitrary int64 ids.

    Searches may run concurrently from several threads; `add`/`train` must not overlap a search.
    `faiss_index` / `ids` wrap an existing CPU FAISS index (what `load` reads) instead of a new one.
    """

    def __init__(
        self,
        dim: int,
        config: IndexConfig | None = None,
        *,
        fingerprint: str = "",
        faiss_index: faiss.Index | None = None,
        ids: np.ndarray | None = None,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.config = config or IndexConfig()
        if self.config.kind == "ivfpq" and dim % self.config.pq_m:
            raise ValueError(f"IndexConfig.pq_m ({self.config.pq_m}) must divide the vectors' width ({dim})")
        self.fingerprint = fingerprint
        self.placement = _placement(self.config)
        self.on_gpu = False
        self._torch = None
        self._ids = np.empty(0, dtype=np.int64) if ids is None else ids
        # IVF kinds with a data-chosen cell count are made when the first vectors arrive (`train`).
        self._index: faiss.Index | None = faiss_index
        if self._index is None and (self.config.kind not in ("ivf", "ivfpq") or self.config.nlist):
            self._index = self._new_faiss_index(0)
        if self._index is not None:
            self._apply_search_params()
            self._place()

    def _new_faiss_index(self, n: int) -> faiss.Index:
        index = faiss.index_factory(
            self.dim, self.config.factory_string(n), _faiss_metric(self.config.metric)
        )
        if self.config.kind == "hnsw":
            index.hnsw.efConstruction = self.config.ef_construction
        return index

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
        return self._index is not None and bool(self._index.is_trained)

    @property
    def nlist(self) -> int | None:
        """IVF cells of the built index (None for flat / HNSW, or before training)."""
        if self.config.kind not in ("ivf", "ivfpq") or self._index is None:
            return None
        return int(faiss.extract_index_ivf(self._cpu_index()).nlist)

    def train(self, vectors: np.ndarray) -> None:
        """Train IVF cells (and PQ codebooks) on a seeded sample of `vectors` (a no-op for flat and HNSW)."""
        if self.is_trained:
            return
        x = self._prepare(vectors, "vectors")
        self._train_prepared(x)

    def _train_prepared(self, x: np.ndarray) -> None:
        cells = self.config.cells(x.shape[0])
        if x.shape[0] < cells:
            raise ValueError(
                f"IVF training needs at least nlist={cells} vectors, got {x.shape[0]}; "
                "lower IndexConfig.nlist or train on more data"
            )
        if self._index is None:
            self._index = self._new_faiss_index(x.shape[0])
        size = self.config.train_size or TRAIN_PER_CELL * cells
        if self.config.kind == "ivfpq" and not self.config.train_size:
            size = max(size, PQ_TRAIN)
        if x.shape[0] > size:
            rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(x.shape[0], size, replace=False))
            x = x[rows]
        self._index.train(x)
        self._apply_search_params()
        self._place()

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add `vectors` [N, D] under `ids` [N] (unique int64, never -1). Trains IVF on first use."""
        x = self._prepare(vectors, "vectors")
        ids = self._check_ids(ids, x.shape[0])
        if not self.is_trained:
            self._train_prepared(x)
        assert self._index is not None
        self._index.add(x)
        if self._torch is not None:
            self._torch.add(x)
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
        cap = min(self.count, _GPU_MAX_K) if self.placement == "faiss-gpu" else self.count
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
        """Search mapped to external ids and "higher is closer" scores."""
        if self._torch is not None:
            scores, pos = self._torch.search(q, fetch)
        else:
            assert self._index is not None
            dist, pos = self._index.search(q, fetch)
            scores = dist if self.config.metric == "ip" else -dist
        ids = np.where(pos >= 0, self._ids[np.clip(pos, 0, None)], PAD_ID)
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
        if self._index is None:
            return
        space = faiss.GpuParameterSpace() if self.on_gpu and self._torch is None else faiss.ParameterSpace()
        if self.config.kind in ("ivf", "ivfpq"):
            nprobe = min(self.config.nprobe, self.nlist or self.config.nprobe)
            space.set_index_parameter(self._index, "nprobe", nprobe)
        elif self.config.kind == "hnsw":
            space.set_index_parameter(self._index, "efSearch", self.config.ef_search)

    def _place(self) -> None:
        """Put a trained index where `placement` says: a torch kNN beside the CPU store, or FAISS GPUs."""
        if self.on_gpu or self._torch is not None or not self.is_trained or self.placement == "cpu":
            return
        assert self._index is not None
        if self.placement.startswith("torch"):
            from rlalign.retrieval.knn import TorchKNN

            on_gpu = self.placement == "torch-gpu"
            dtype = self.config.gpu_dtype if on_gpu else "float32"
            self._torch = TorchKNN(self.dim, self.config.metric, "cuda" if on_gpu else "cpu", dtype)
            if self._index.ntotal:  # a loaded index: its stored vectors, read without a copy
                stored = faiss.rev_swig_ptr(self._index.get_xb(), self._index.ntotal * self.dim)
                self._torch.add(stored.reshape(-1, self.dim))
            self.on_gpu = on_gpu
            logger.info("exact search: torch kNN on %s (%s)", self._torch.device, dtype)
            return
        self._index = _to_all_gpus(self._index, self.config.gpu_mode)
        self.on_gpu = True
        self._apply_search_params()
        logger.info("index moved to %d GPU(s), mode %s", faiss.get_num_gpus(), self.config.gpu_mode)

    def _cpu_index(self) -> faiss.Index:
        assert self._index is not None
        return faiss.index_gpu_to_cpu(self._index) if self.on_gpu and self._torch is None else self._index

    def bytes_per_vector(self) -> float:
        """Serialised size of the FAISS index plus the id map, per stored vector (what `save` writes)."""
        if self.count == 0:
            return 0.0
        return (faiss.serialize_index(self._cpu_index()).nbytes + self._ids.nbytes) / self.count

    # ----------------------------------------------------------------- save/load

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `index.faiss`, `ids.npy` and `meta.json` into `directory`, each atomically.

        meta.json goes last and records the count, so a reader that races a save (or a save that
        died halfway) is caught by the consistency checks in `load` instead of loading a mix.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self._index is None:  # an empty IVF index whose cells are not chosen yet
            raise ValueError("cannot save an untrained IVF index with no vectors (nothing chose its nlist)")
        cpu_index = self._cpu_index()
        atomic_write(out / INDEX_FILE, lambda tmp: faiss.write_index(cpu_index, str(tmp)))
        atomic_write(out / IDS_FILE, lambda tmp: np.save(tmp, self._ids, allow_pickle=False))
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
        atomic_write(out / META_FILE, lambda tmp: tmp.write_text(text))
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
        known = {f.name for f in dataclasses.fields(IndexConfig)}
        unknown = sorted(set(meta["config"]) - known)
        if unknown:
            raise IndexMetadataError(
                f"{meta_path}: unknown config key '{unknown[0]}' (written by a newer rlalign?)"
            )
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
        return cls(int(meta["dim"]), config, fingerprint=meta["fingerprint"], faiss_index=cpu_index, ids=ids)


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
