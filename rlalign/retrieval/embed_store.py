"""The image pool embedded once: sharded over ranks, cached on disk in shards, resumable.

The pool is cut into shards of `embedder.shard_size` images; rank r of W embeds shards r, r + W, ...
Each shard is one file of the embedder's cache (`<cache_dir>/<fingerprint[:24]>/<sha256 of the
shard's image keys>.npz`, keys and vectors), written atomically once the shard is embedded. So the
cache is keyed by (image hash, embedder fingerprint): a run killed midway resumes with the shards
whose files exist (their keys are checked), another encoder or other images never match, and the
pair builder's `ImageEmbedder.embed` reads the same files. Every rank then reads all shards, in
order, to the same [N, D] matrix; with no cache folder the vectors travel between ranks instead.

Vectors do not depend on the number of ranks: a shard is the same images in the same batches
whichever rank embeds it.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlalign.retrieval.embedder import ImageEmbedder, image_key, keys_digest

log = logging.getLogger(__name__)


@dataclass
class EmbedReport:
    """What one `embed_pool` call did on this rank."""

    images: int
    """Pool size."""
    shards: int
    """Shards in the pool."""
    embedded_shards: list[int]
    """Shards this rank ran through the tower (the others it found on disk or left to other ranks)."""
    embedded_images: int
    """Images this rank ran through the tower."""
    seconds: float
    """Wall time of this rank's embedding (hashing, forward and writing)."""

    @property
    def images_per_s(self) -> float:
        return self.embedded_images / self.seconds if self.seconds > 0 else 0.0


class Column:
    """A lazy, sliceable view of one column of a `datasets.Dataset` (images decoded per slice)."""

    def __init__(self, dataset: Any, name: str) -> None:
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: slice) -> list:
        return self.dataset[rows][self.name]


def _read_shard(path: Path, keys: list[bytes]) -> np.ndarray | None:
    """The vectors of a shard file whose keys are exactly `keys`; None if it is missing or not that."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["keys"].tolist() != keys:
                log.warning("embedding: %s holds other images; embedding that shard again", path)
                return None
            return np.asarray(data["vectors"], dtype=np.float32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("embedding: %s unreadable (%s); embedding that shard again", path, err)
        return None


def embed_pool(
    embedder: ImageEmbedder, images: Sequence, runtime: Any = None, *, shard_size: int | None = None
) -> tuple[np.ndarray, EmbedReport]:
    """Unit vectors [N, D] of every image of `images` (a list or a `Column`), on every rank.

    `runtime`: a `rlalign.runtime.Runtime` (ranks and collectives), or None for one process.
    """
    rank, world = (runtime.rank, runtime.world_size) if runtime is not None else (0, 1)
    size = shard_size or embedder.config.shard_size
    n = len(images)
    n_shards = math.ceil(n / size)
    mine = range(rank, n_shards, world)
    names: dict[int, str] = {}
    held: dict[int, np.ndarray] = {}
    done: list[int] = []
    start = time.perf_counter()
    embedded = 0
    for s in mine:
        shard_images = images[s * size : min((s + 1) * size, n)]
        keys = [image_key(im) for im in shard_images]
        names[s] = keys_digest(keys)
        path = embedder.cache_path / f"{names[s]}.npz" if embedder.cache_path else None
        vectors = _read_shard(path, keys) if path is not None else None
        if vectors is None:
            vectors = embedder.forward(shard_images)
            embedder.save(keys, vectors)
            done.append(s)
            embedded += len(keys)
            elapsed = time.perf_counter() - start
            log.info(
                "embedding: shard %d of %d (%d images), %.1f images/s",
                s + 1,
                n_shards,
                len(keys),
                embedded / elapsed if elapsed > 0 else 0.0,
            )
        if path is None:
            held[s] = vectors
    seconds = time.perf_counter() - start
    report = EmbedReport(n, n_shards, done, embedded, seconds)
    if runtime is not None and world > 1:
        for part in runtime.all_gather_object((names, held)):
            names.update(part[0])
            held.update(part[1])
    out = None
    for s in range(n_shards):
        vectors = held.get(s)
        if vectors is None:
            assert embedder.cache_path is not None
            path = embedder.cache_path / f"{names[s]}.npz"
            with np.load(path, allow_pickle=False) as data:
                vectors = np.asarray(data["vectors"], dtype=np.float32)
        if out is None:
            out = np.empty((n, vectors.shape[1]), dtype=np.float32)
        out[s * size : s * size + len(vectors)] = vectors
    if out is None:
        out = np.empty((0, 0), dtype=np.float32)
    log.info(
        "embedding: %d images in %d shards; this rank embedded %d (%.1f images/s), read the rest",
        n,
        n_shards,
        embedded,
        report.images_per_s,
    )
    return out, report
