"""Recipe section `pairs:`: the image embedder, the vector index and the RE-ALIGN pair builder.

Plain dataclasses with no heavy imports (no torch, no faiss), so the recipe schema holds them without
loading either. `IndexConfig` is the one index configuration: the recipe's `pairs.index` section and
what `rlalign.retrieval.index.VectorIndex` is built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")


@dataclass(kw_only=True)
class EmbedderConfig:
    """Image embeddings for retrieval: pooled, L2-normalised vision-tower features, cached on disk."""

    encoder: str = "policy"
    """`policy`: the recipe's own VLM (model.*); otherwise a local folder / hub id of another VLM or of a
    CLIP / SigLIP model (its vision tower is used)."""
    pooling: Literal["mean", "cls"] = "mean"
    """`mean`: mean of the vision tower's last hidden state over patch tokens; `cls`: its pooled output."""
    batch_size: int = 64
    """Images per forward of the vision tower (images of one processed size per batch)."""
    shard_size: int = 1024
    """Pool images per embedding shard file: the unit of resumption and of work split across processes."""
    cache_dir: str | None = "runs/cache/embeddings"
    """Embedding cache (keyed by image content hash and encoder fingerprint); null turns it off."""
    center: bool = False
    """Subtract the pool's mean embedding and L2-normalise again before indexing. Pooled features of a small or
    barely trained tower share one large common direction (every cosine near 1); removing it lets cosine
    similarity tell images apart. The cache keeps the raw vectors."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"embedder.batch_size must be >= 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ValueError(f"embedder.shard_size must be >= 1, got {self.shard_size}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"IndexConfig.{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(kw_only=True)
class IndexConfig:
    """How to build and search a vector index (`rlalign.retrieval.index.VectorIndex`)."""

    kind: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    """`flat`: exact search; `ivf`: inverted lists over k-means cells; `ivfpq`: the same with vectors
    stored as product-quantised codes (`pq_m` bytes each); `hnsw`: graph search."""
    metric: Literal["ip", "l2"] = "ip"
    """`ip`: cosine similarity (inputs L2-normalised); `l2`: squared Euclidean distance."""
    nlist: int | None = None
    """IVF / IVF-PQ: number of k-means cells; null picks ~2·sqrt(N) from the data (at most N/39)."""
    nprobe: int = 16
    """IVF / IVF-PQ: cells visited per query (at most nlist); higher is slower and closer to exact."""
    pq_m: int = 64
    """IVF-PQ: bytes per stored vector (sub-quantisers of 8 bits); must divide the vectors' width."""
    train_size: int | None = None
    """IVF / IVF-PQ: k-means trains on a seeded sample of this many vectors (null: 64 per cell)."""
    hnsw_m: int = 32
    """HNSW: graph neighbours per node (FAISS `M`)."""
    ef_construction: int = 40
    """HNSW: candidate list size while building."""
    ef_search: int = 64
    """HNSW: candidate list size while searching (FAISS `efSearch`); raised to k when k is larger."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """`auto`: the GPU when one is present, else CPU; `gpu` fails when there is none; `cpu` never uses one."""
    exact_backend: Literal["auto", "torch", "faiss"] = "auto"
    """Engine of exact (`flat`) search: `auto` is the torch kNN (matmul + top-k in chunks) on a GPU and
    FAISS on the CPU; `torch` / `faiss` force one (torch on the CPU runs in float32)."""
    gpu_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Torch kNN on a GPU: precision of the candidate search; candidates are rescored in float32."""
    gpu_mode: Literal["shard", "replicate"] = "shard"
    """FAISS on several GPUs: `shard` splits the vectors across GPUs (more capacity), `replicate` copies
    them to each GPU and splits the queries (more throughput)."""
    filter_headroom: int = 8
    """Extra results fetched per query when dropping self-matches or near-duplicates, before trimming
    to k; the search widens (doubling) for the few queries that still come up short."""
    target_recall: float = 0.95
    """`rlalign index tune`: the recall@10 on held-out queries the chosen settings must reach."""

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, INDEX_KINDS)
        _check_choice("metric", self.metric, ("ip", "l2"))
        _check_choice("device", self.device, ("auto", "cpu", "gpu"))
        _check_choice("exact_backend", self.exact_backend, ("auto", "torch", "faiss"))
        _check_choice("gpu_dtype", self.gpu_dtype, ("float16", "bfloat16", "float32"))
        _check_choice("gpu_mode", self.gpu_mode, ("shard", "replicate"))
        names = ("nlist", "nprobe", "pq_m", "train_size", "hnsw_m", "ef_construction", "ef_search")
        for name in names:
            value = getattr(self, name)
            if value is None and name in ("nlist", "train_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexConfig.{name} must be a positive int, got {value!r}")
        if self.hnsw_m < 2:
            raise ValueError(f"IndexConfig.hnsw_m must be >= 2, got {self.hnsw_m}")
        if self.kind in ("ivf", "ivfpq") and self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(
                f"IndexConfig.nprobe ({self.nprobe}) cannot exceed nlist ({self.nlist}) for kind '{self.kind}'"
            )
        if self.filter_headroom < 0:
            raise ValueError(f"IndexConfig.filter_headroom must be >= 0, got {self.filter_headroom}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"IndexConfig.target_recall must be in (0, 1], got {self.target_recall}")

    def cells(self, n: int) -> int:
        """The IVF cell count for `n` vectors: `nlist`, or ~2·sqrt(n) rounded to a power of two and capped
        at n/39 (FAISS wants >= 39 training points per cell). Few, large cells keep k-means on a million
        vectors to about a minute on two cores; nprobe then buys the recall back."""
        if self.nlist is not None:
            return self.nlist
        guess = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
        return max(1, min(guess, n // 39))

    def factory_string(self, n: int = 0) -> str:
        """The `faiss.index_factory` description of this index (`n`: training vectors, for the cells)."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "ivf":
            return f"IVF{self.cells(n)},Flat"
        if self.kind == "ivfpq":
            return f"IVF{self.cells(n)},PQ{self.pq_m}np"  # np: no polysemous training (slow, unused)
        return f"HNSW{self.hnsw_m},Flat"


@dataclass(kw_only=True)
class PairsConfig:
    """RE-ALIGN preference pairs: embed the pool, retrieve similar images, refill masked answers."""

    output_dir: str = "runs/pairs"
    """Folder for the index (`index/`), the shard files (`shards/`) and the dataset (`pairs.parquet`)."""
    split: Literal["train", "val", "test"] = "train"
    """Split of `data` whose images form the pool (queries and retrieval candidates alike)."""
    pool_size: int | None = None
    """Use only the first N images of the split (null: all)."""
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    """How pool images are embedded."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """The vector index over the pool."""
    service_url: str | None = None
    """Query a running `rlalign index serve` at this URL instead of the in-process index."""
    service_index: str = "pool"
    """Index name on the service."""
    top_k: int = 5
    """Retrieved images tried per pool image, most similar first (the image itself is excluded)."""
    chosen: Literal["reference", "greedy", "verified"] = "reference"
    """Chosen answer: the first reference caption; the policy's greedy caption; or (`verified`, shapes world)
    the policy's greedy caption where the ground truth confirms it (it names every object of the image, each
    with its colour, shape and position, and nothing else), else the first reference."""
    vocabulary: Literal["shapes", "custom"] = "shapes"
    """Maskable words: the shapes world's (shape, colour, position), or `custom_words`."""
    custom_words: dict[str, list[str]] = field(default_factory=dict)
    """For `custom`: category -> allowed words/phrases, e.g. {object: [dog, cat], attribute: [red]}."""
    similarity_threshold: float = 0.95
    """A refill becomes the rejected answer when its sentence cosine to the chosen one is below this."""
    sentence_encoder: str = "tfidf"
    """`tfidf`: bag of 1..`tfidf_ngrams`-grams with idf over the pool's chosen answers; otherwise a local
    folder of an HF text encoder (mean-pooled last hidden state)."""
    tfidf_ngrams: int = 2
    """Largest n-gram of the tf-idf sentence embedding."""
    shard_size: int = 16
    """Pool images per shard file: the unit of resumption and of work split across processes."""
    device: Literal["auto", "cpu"] = "auto"
    """`auto`: the refill model, the embedder and exact search run on the GPU when one is present;
    `cpu`: never on a GPU."""

    def __post_init__(self) -> None:
        if self.pool_size is not None and self.pool_size < 2:
            raise ValueError(f"pool_size must be >= 2 (or null), got {self.pool_size}")
        if self.top_k < 1 or self.shard_size < 1 or self.tfidf_ngrams < 1:
            raise ValueError("top_k, shard_size and tfidf_ngrams must be >= 1")
        if not 0.0 < self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in (0, 1], got {self.similarity_threshold}")
        if self.vocabulary == "custom" and not any(self.custom_words.values()):
            raise ValueError("vocabulary 'custom' needs pairs.custom_words (category -> words)")
