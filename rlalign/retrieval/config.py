"""Recipe section `pairs:`: the image embedder, the vector index and the RE-ALIGN pair builder.

Plain dataclasses with no heavy imports, so `rlalign.config.schema` can hold them without pulling in
torch or faiss. `IndexSettings` mirrors the build knobs of `rlalign.retrieval.index.IndexConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class EmbedderConfig:
    """Image embeddings for retrieval: pooled, L2-normalised vision-tower features, cached on disk."""

    encoder: str = "policy"
    """`policy`: the recipe's own VLM (model.*); otherwise a local folder / hub id of another VLM."""
    pooling: Literal["mean", "cls"] = "mean"
    """`mean`: mean of the vision tower's last hidden state over patch tokens; `cls`: its pooled output."""
    batch_size: int = 64
    """Images per forward of the vision tower."""
    cache_dir: str | None = "runs/cache/embeddings"
    """Embedding cache (keyed by image content hash and encoder fingerprint); null turns it off."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"embedder.batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class IndexSettings:
    """The FAISS index over the image pool (see `rlalign.retrieval.index.IndexConfig`)."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    """`flat`: exact; `ivf`: inverted lists over k-means cells; `hnsw`: graph search."""
    metric: Literal["ip", "l2"] = "ip"
    """`ip`: cosine similarity; `l2`: squared Euclidean distance."""
    nlist: int = 64
    """IVF: number of k-means cells (needs at least this many pool images)."""
    nprobe: int = 8
    """IVF: cells visited per query."""
    hnsw_m: int = 32
    """HNSW: graph neighbours per node."""
    ef_construction: int = 40
    """HNSW: candidate list size while building."""
    ef_search: int = 64
    """HNSW: candidate list size while searching."""

    def __post_init__(self) -> None:
        for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"index.{name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "ivf" and self.nprobe > self.nlist:
            raise ValueError(f"index.nprobe ({self.nprobe}) cannot exceed index.nlist ({self.nlist})")


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
    index: IndexSettings = field(default_factory=IndexSettings)
    """The vector index over the pool."""
    service_url: str | None = None
    """Query a running `rlalign index serve` at this URL instead of the in-process index."""
    service_index: str = "pool"
    """Index name on the service."""
    top_k: int = 5
    """Retrieved images tried per pool image, most similar first (the image itself is excluded)."""
    chosen: Literal["reference", "greedy"] = "reference"
    """Chosen answer: the first reference caption, or the policy's greedy caption."""
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

    def __post_init__(self) -> None:
        if self.pool_size is not None and self.pool_size < 2:
            raise ValueError(f"pool_size must be >= 2 (or null), got {self.pool_size}")
        if self.top_k < 1 or self.shard_size < 1 or self.tfidf_ngrams < 1:
            raise ValueError("top_k, shard_size and tfidf_ngrams must be >= 1")
        if not 0.0 < self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in (0, 1], got {self.similarity_threshold}")
        if self.vocabulary == "custom" and not any(self.custom_words.values()):
            raise ValueError("vocabulary 'custom' needs pairs.custom_words (category -> words)")
