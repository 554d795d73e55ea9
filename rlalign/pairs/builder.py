"""RE-ALIGN preference pairs (arXiv 2502.13146): `rlalign pairs build RECIPE`.

For each pool image v: the chosen answer y_w (its first reference caption, or the policy's greedy
caption); its object, attribute and relation words masked (for the shapes world: shape words,
colour words and position phrases; otherwise `pairs.custom_words`); the images most similar to v
by the policy's own vision tower (v itself excluded); the masks refilled by the policy conditioned
on the most similar image v_l. The refill is the rejected answer y_l when its sentence cosine to
y_w is below `similarity_threshold`, else the next retrieved image is tried; an image with no
maskable word, or no refill far enough from y_w in its top_k, gives no pair.

Where we depart from the paper: our captioners are causal decoders with no infilling, so the refill
is *constrained greedy decoding over the masked template*. We walk the template left to right and
keep the unmasked words; at each masked slot every allowed word/phrase of that slot's category is
appended to the text so far, each candidate sequence is scored by the policy's log-likelihood given
v_l and the prompt, and the best one is kept (ties: the first in vocabulary order). Comparing the
whole-sequence log-likelihood picks the same word as comparing the candidate's conditional one
(the prefix is shared) and sidesteps tokenisation boundaries. Everything is deterministic.

Sentence embeddings default to tf-idf over 1..n-grams of lowercased words, with a smoothed idf
(log((1 + N) / (1 + df)) + 1) over all reference captions of the pool: deterministic, and the same
on every rank.

Devices: the refill model, the image embedder and exact search run on the GPU when one is present
(`rlalign.runtime.Runtime.for_tools`) unless `pairs.device` is `cpu`; the pool is embedded once,
sharded over ranks and cached in shards (`rlalign.retrieval.embed_store`), and its vectors are the
queries too.

Sharding and resumption: the pool is cut into shards of `shard_size` images; process r of W takes
shards r, r + W, ... (`accelerate launch` sets W). Before the first shard, `manifest.json` records
everything the rows depend on (`pair_manifest`); a restart whose manifest differs is refused naming
the first difference, and `overwrite` (`--overwrite`) starts over. Each shard file is written to a
temp name and renamed, then its record (rows, bytes, sha256); a shard counts as done only while its
file matches its record, checked before resuming and again before assembly, and a damaged one is
rebuilt, logged by name (`rlalign.pairs.store`). The dataset is all shards concatenated in
shard order, whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset

from rlalign.config.pairs import IndexConfig, PairsConfig
from rlalign.data.collate import TOKEN_ALIGNED, encode_prompts
from rlalign.models.vision_inputs import take_rows
from rlalign.ops import token_logprobs
from rlalign.pairs.store import (
    DATASET_FILE,
    INDEX_DIR,
    MANIFEST_VERSION,
    MISSING,
    SHARDS_DIR,
    STATS_FILE,
    claim_output,
    manifest_digest,
    model_fingerprint,
    pool_fingerprint,
    shard_paths,
    shard_problem,
    write_shard,
)
from rlalign.retrieval.embed_store import Column, embed_pool
from rlalign.retrieval.embedder import ImageEmbedder
from rlalign.runtime import Runtime
from rlalign.shapes import COLORS, POSITION_PHRASES, SHAPE_WORDS
from rlalign.utils.io import atomic_write
from rlalign.utils.tensors import to_device

log = logging.getLogger(__name__)

_IMAGES = [datasets.Image()]
_OBJECTS = [
    {
        "shape": datasets.Value("string"),
        "color": datasets.Value("string"),
        "position": datasets.Value("string"),
        "box": datasets.Sequence(datasets.Value("int32"), length=4),
    }
]


def pair_features(with_objects: bool) -> datasets.Features:
    feats = {
        "images": _IMAGES,
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "retrieved_images": _IMAGES,
        "image_id": datasets.Value("string"),
        "retrieved_id": datasets.Value("string"),
        "retrieved_ids": [datasets.Value("string")],
        "similarity": datasets.Value("float32"),
        "text_similarity": datasets.Value("float32"),
        "mask": datasets.Value("string"),
        "tries": datasets.Value("int32"),
    }
    if with_objects:
        feats["objects"] = _OBJECTS
    return datasets.Features(feats)


# ------------------------------------------------------------------------------------------ masking


def shapes_vocabulary() -> dict[str, list[str]]:
    """Maskable phrases of the shapes world by category: objects, attributes, relations."""
    return {
        "shape": list(SHAPE_WORDS),
        "color": list(COLORS),
        "position": [p for phrases in POSITION_PHRASES.values() for p in phrases],
    }


def vocabulary(cfg: PairsConfig) -> dict[str, list[str]]:
    if cfg.vocabulary == "shapes":
        return shapes_vocabulary()
    return {cat: [w.lower() for w in words] for cat, words in cfg.custom_words.items() if words}


_PUNCT = ",.;:!?"


@dataclass(frozen=True)
class Slot:
    category: str
    original: str
    suffix: str = ""
    """Punctuation glued to the phrase's last word (`center,`), kept after the refill."""


def mask_template(text: str, vocab: dict[str, list[str]]) -> list[str | Slot]:
    """Words of `text`, with each maskable phrase (longest match first) replaced by a `Slot`."""
    phrases = sorted(
        ((tuple(p.split()), cat) for cat, ps in vocab.items() for p in ps), key=lambda x: -len(x[0])
    )
    words = text.split()
    out: list[str | Slot] = []
    i = 0
    while i < len(words):
        hit = None
        for phrase, cat in phrases:
            span = [w.lower() for w in words[i : i + len(phrase)]]
            # inner words match exactly; the last may carry trailing punctuation
            if (
                len(span) == len(phrase)
                and span[:-1] == list(phrase[:-1])
                and span[-1].rstrip(_PUNCT) == phrase[-1]
            ):
                hit = (phrase, cat)
                break
        if hit is None:
            out.append(words[i])
            i += 1
        else:
            last = words[i + len(hit[0]) - 1]
            suffix = last[len(last.rstrip(_PUNCT)) :]
            out.append(Slot(hit[1], " ".join(words[i : i + len(hit[0])]), suffix))
            i += len(hit[0])
    return out


def template_string(template: list[str | Slot]) -> str:
    return " ".join(s if isinstance(s, str) else f"[{s.category}]{s.suffix}" for s in template)


# ------------------------------------------------------------------------------------------ refill


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module, processor: Any, images: list, prompt: str, texts: list[str], groups: list[int]
) -> torch.Tensor:
    """Sum of token log-probs of each `texts[i]` as the response to (images[groups[i]], prompt): [len(texts)].

    Each distinct image is processed once; sequences are [left-padded prompt | response | right padding].
    """
    tok = processor.tokenizer
    enc = encode_prompts(processor, images, [prompt] * len(images), padding_side="left")
    g = torch.tensor(groups)
    responses = tok(texts, add_special_tokens=False)["input_ids"]
    width = max(len(r) for r in responses)
    n, p = len(texts), enc["input_ids"].shape[1]
    ids = torch.full((n, p + width), tok.pad_token_id, dtype=torch.long)
    ids[:, :p] = enc["input_ids"][g]
    mask = torch.zeros_like(ids)
    mask[:, :p] = enc["attention_mask"][g]
    for i, r in enumerate(responses):
        ids[i, p : p + len(r)] = torch.tensor(r)
        mask[i, p : p + len(r)] = 1
    # image inputs repeated per image whatever the family's layout (patch-major Qwen, tiles, sub-images)
    inputs: dict[str, torch.Tensor] = take_rows(dict(enc), groups)
    inputs.update(input_ids=ids, attention_mask=mask)
    for key in TOKEN_ALIGNED.keys() & inputs.keys():
        value = inputs[key]
        inputs[key] = torch.cat([value, torch.full((n, width), TOKEN_ALIGNED[key], dtype=value.dtype)], 1)
    # prompts of different lengths: 1-D positions skip the padding; M-RoPE families (`mm_token_type_ids`)
    # compute theirs from the attention mask
    if not enc["attention_mask"].bool().all() and "mm_token_type_ids" not in inputs:
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    inputs = to_device(inputs, model.device)
    logp_BT = token_logprobs(model(**inputs).logits[:, p - 1 : -1], inputs["input_ids"][:, p:])
    return (logp_BT * inputs["attention_mask"][:, p:]).sum(dim=1).cpu()


def refill(
    model: torch.nn.Module,
    processor: Any,
    images: list,
    prompt: str,
    templates: list[list[str | Slot]],
    vocab: dict[str, list[str]],
) -> list[str]:
    """Constrained greedy refill of each template's slots, conditioned on its image (see module doc).

    All templates advance one slot per forward pass: every candidate of every unfinished template is
    one sequence of the batch.
    """
    words: list[list[str]] = [[] for _ in templates]
    pos = [0] * len(templates)
    while True:
        for t, template in enumerate(templates):  # copy literals up to the next slot
            while pos[t] < len(template) and isinstance(template[pos[t]], str):
                words[t].append(template[pos[t]])
                pos[t] += 1
        active = [t for t, template in enumerate(templates) if pos[t] < len(template)]
        if not active:
            return [" ".join(w) for w in words]
        texts, groups, spans = [], [], []
        for t in active:
            slot = templates[t][pos[t]]
            cands = vocab[slot.category]
            spans.append((len(texts), cands, slot.suffix))
            texts += [" ".join([*words[t], c + slot.suffix]) for c in cands]
            groups += [t] * len(cands)
        scores = response_logprobs(model, processor, images, prompt, texts, groups)
        for t, (start, cands, suffix) in zip(active, spans):
            words[t].append(cands[int(torch.argmax(scores[start : start + len(cands)]))] + suffix)
            pos[t] += 1


# ------------------------------------------------------------------------------ sentence embeddings


class TfidfSentences:
    """Deterministic bag-of-n-grams tf-idf sentence embeddings (sparse dicts) and their cosine."""

    def __init__(self, corpus: list[str], max_n: int = 2):
        self.max_n = max_n
        df = Counter(g for text in corpus for g in set(self._grams(text)))
        self.n_docs = len(corpus)
        self.idf = {g: math.log((1 + self.n_docs) / (1 + c)) + 1 for g, c in df.items()}

    def _grams(self, text: str) -> list[tuple[str, ...]]:
        words = re.findall(r"[\w']+", text.lower())
        return [tuple(words[i : i + n]) for n in range(1, self.max_n + 1) for i in range(len(words) - n + 1)]

    def embed(self, text: str) -> dict[tuple[str, ...], float]:
        unseen = math.log(1 + self.n_docs) + 1
        return {g: c * self.idf.get(g, unseen) for g, c in Counter(self._grams(text)).items()}

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.embed(a), self.embed(b)
        dot = sum(v * vb.get(g, 0.0) for g, v in va.items())
        norm = math.sqrt(sum(v * v for v in va.values())) * math.sqrt(sum(v * v for v in vb.values()))
        return dot / norm if norm else 0.0


class HFSentences:
    """Mean-pooled last hidden state of a local HF text encoder (`pairs.sentence_encoder: DIR`)."""

    def __init__(self, path: str):
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def cosine(self, a: str, b: str) -> float:
        enc = self.tok([a, b], return_tensors="pt", padding=True)
        hidden = self.model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        return float(emb[0] @ emb[1])


# ------------------------------------------------------------------------------------ the manifest

PLACEMENT_KEYS = ("device", "gpu_mode", "target_recall")
"""`pairs.index` keys that say where or how the index was tuned, not what it returns."""


def index_settings(config: IndexConfig) -> dict[str, Any]:
    """The index settings the rows depend on (all but `PLACEMENT_KEYS`)."""
    return {k: v for k, v in asdict(config).items() if k not in PLACEMENT_KEYS}


def pair_manifest(recipe: Any, pool: Dataset, embedder: Any, model: torch.nn.Module, processor: Any) -> dict:
    """Everything the rows depend on: the settings by recipe key (in the order a difference is reported),
    then fingerprints of the pool, the refilling policy and the image embedder. No seed enters: the build
    draws no random numbers (greedy refill, deterministic index), and the shapes seed is `data.seed`."""
    cfg, data = recipe.pairs, recipe.data
    settings: dict[str, Any] = {
        "pairs.shard_size": cfg.shard_size,
        "pairs.top_k": cfg.top_k,
        "pairs.similarity_threshold": cfg.similarity_threshold,
        "pairs.chosen": cfg.chosen,
        "pairs.vocabulary": cfg.vocabulary,
        "pairs.sentence_encoder": cfg.sentence_encoder,
        "pairs.embedder.encoder": cfg.embedder.encoder,
        "pairs.embedder.pooling": cfg.embedder.pooling,
        "pairs.embedder.center": cfg.embedder.center,
        "pairs.split": cfg.split,
        "pairs.pool_size": cfg.pool_size,
        "model.name_or_path": recipe.model.name_or_path,
        "data.source": data.source,
        "data.prompt": data.prompt,
    }
    if cfg.vocabulary == "custom":
        settings["pairs.custom_words"] = vocabulary(cfg)
    if cfg.sentence_encoder == "tfidf":
        settings["pairs.tfidf_ngrams"] = cfg.tfidf_ngrams
    if cfg.chosen in ("greedy", "verified"):
        settings["data.max_response_tokens"] = data.max_response_tokens
    if data.source == "shapes":
        size_key = f"{cfg.split}_size"
        settings.update(
            {
                "data.seed": data.seed,
                "data.image_size": data.image_size,
                f"data.{size_key}": getattr(data, size_key),
            }
        )
    if cfg.service_url:
        settings["pairs.service_index"] = cfg.service_index
    else:
        settings.update({f"pairs.index.{k}": v for k, v in index_settings(cfg.index).items()})
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings,
        "fingerprints": {
            "pool": pool_fingerprint(pool),
            "policy": model_fingerprint(model, processor),
            "embedder": embedder.fingerprint,
        },
    }
    return json.loads(json.dumps(manifest))  # as it reads back from disk


# ------------------------------------------------------------------------------------------ shards


Search = Callable[[np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""`search(queries [Q, D], k, exclude_ids [Q]) -> (scores [Q, k], pool positions [Q, k])`."""


@dataclass(frozen=True)
class BuildState:
    """What writing a shard needs, fixed for the whole run."""

    recipe: Any
    """The `rlalign.config.Recipe` being built."""
    runtime: Runtime
    """Ranks, collectives and this process's device."""
    device: torch.device
    """Where the refill model runs (the runtime's, or the CPU when `pairs.device` is `cpu`)."""
    pool: Dataset
    refs: list[list[str]]
    ids: list[str]
    embedder: ImageEmbedder
    vectors: np.ndarray
    """The pool's embeddings [N, D], row i = pool image i (queries and index alike)."""
    search: Search
    model: torch.nn.Module
    processor: Any
    sentences: TfidfSentences | HFSentences
    vocab: dict[str, list[str]]
    features: datasets.Features
    shard_dir: Path
    digest: str

    @property
    def cfg(self) -> PairsConfig:
        return self.recipe.pairs


def _shard_rows(rows: list[int], chosen: list[str], b: BuildState) -> dict[str, list]:
    """The pairs of one shard (pool positions `rows`), as columns. Try t refills, for every row still
    without a rejected answer, its t-th retrieved image, all rows in one batch."""
    cfg, pool, prompt = b.cfg, b.pool, b.recipe.data.prompt
    images = [pool[i]["image"] for i in rows]
    sims, hits = b.search(b.vectors[rows], cfg.top_k, np.asarray(rows, dtype=np.int64))
    templates = [mask_template(c, b.vocab) for c in chosen]
    tried = [[int(h) for h in row if h >= 0] for row in hits]
    result: dict[int, tuple[int, str, float]] = {}  # row j -> (try, rejected, text cosine)
    todo = [j for j, t in enumerate(templates) if any(isinstance(s, Slot) for s in t)]
    for t in range(cfg.top_k):
        todo = [j for j in todo if t < len(tried[j])]
        if not todo:
            break
        retrieved = [pool[tried[j][t]]["image"] for j in todo]
        refills = refill(b.model, b.processor, retrieved, prompt, [templates[j] for j in todo], b.vocab)
        left = []
        for j, rejected in zip(todo, refills):
            text_sim = b.sentences.cosine(chosen[j], rejected)
            if text_sim < cfg.similarity_threshold:
                result[j] = (t, rejected, text_sim)
            else:
                left.append(j)
        todo = left
    cols: dict[str, list] = {name: [] for name in b.features}
    for j in sorted(result):
        t, rejected, text_sim = result[j]
        i, hit = rows[j], tried[j][t]
        row = {
            "images": [images[j]],
            "prompt": prompt,
            "chosen": chosen[j],
            "rejected": rejected,
            "retrieved_images": [pool[hit]["image"]],
            "image_id": b.ids[i],
            "retrieved_id": b.ids[hit],
            "retrieved_ids": [b.ids[h] for h in tried[j]],
            "similarity": float(sims[j][t]),
            "text_similarity": text_sim,
            "mask": template_string(templates[j]),
            "tries": t + 1,
        }
        if "objects" in cols:
            row["objects"] = pool[i]["objects"]
        for name, value in row.items():
            cols[name].append(value)
    return cols


def _write_shard(b: BuildState, s: int) -> None:
    """Build shard `s` and write it with its record."""
    from rlalign.evaluation.captions import generate_captions

    data = b.recipe.data
    rows = list(range(s * b.cfg.shard_size, min((s + 1) * b.cfg.shard_size, len(b.pool))))
    if b.cfg.chosen == "reference":
        chosen = [b.refs[i][0] for i in rows]
    else:
        images = [b.pool[i]["image"] for i in rows]
        chosen = generate_captions(
            b.model, b.processor, images, data.prompt, max_new_tokens=data.max_response_tokens
        )
        if b.cfg.chosen == "verified":  # the objects column alone: no image decoded again
            objects = b.pool.select_columns(["objects"])[rows]["objects"]
            chosen = [c if verified(c, o) else b.refs[i][0] for c, o, i in zip(chosen, objects, rows)]
    table = Dataset.from_dict(_shard_rows(rows, chosen, b), features=b.features)
    write_shard(table, b.shard_dir, s, b.digest)


def verified(caption: str, objects: list[dict]) -> bool:
    """The caption names exactly the image's objects: each (colour, shape, position) of the ground truth and
    nothing else (shapes world)."""
    from rlalign.shapes import mentioned, mentioned_objects

    truth = {(o["color"], o["shape"], o["position"]) for o in objects}
    shapes, colors = mentioned(caption)
    said = mentioned_objects(caption)
    return (
        said == truth and shapes == {o["shape"] for o in objects} and colors == {o["color"] for o in objects}
    )


def center(vectors: np.ndarray) -> np.ndarray:
    """Vectors minus their mean, L2-normalised again (a zero row stays zero)."""
    out = vectors - vectors.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def indexed_vectors(cfg: PairsConfig, vectors: np.ndarray, fingerprint: str) -> tuple[np.ndarray, str]:
    """The pool's vectors as the index holds them (centred when `embedder.center`) and their fingerprint (the
    encoder's, marked when centred, so an index of raw vectors is never read for centred ones)."""
    if cfg.embedder.center:
        return center(vectors), fingerprint + ":centered"
    return vectors, fingerprint


def retrieval_stats(vectors: np.ndarray, search: Search, objects: list[list[dict]] | None) -> dict[str, Any]:
    """Can the embeddings tell images apart? Cosine of each pool image to its nearest other image and to a
    fixed other image (image i+N/2: the level of an unrelated pair) as mean and 5/50/95 percentiles; with
    ground truth, the share of nearest neighbours that hold an object of the query (same colour and shape)
    or all of its objects, against the same shares for the unrelated image."""
    n = len(vectors)
    if n < 2:
        return {}
    sims, hits = search(vectors, 1, np.arange(n, dtype=np.int64))
    top = sims[:, 0].astype(np.float64)
    other = (np.arange(n) + n // 2) % n
    unrelated = np.einsum("ij,ij->i", vectors, vectors[other]).astype(np.float64)

    def dist(x: np.ndarray) -> dict[str, float]:
        p5, p50, p95 = np.percentile(x, [5, 50, 95])
        return {"mean": float(x.mean()), "p5": float(p5), "p50": float(p50), "p95": float(p95)}

    out: dict[str, Any] = {"nearest_similarity": dist(top), "unrelated_similarity": dist(unrelated)}
    if objects is not None:
        sets = [{(o["color"], o["shape"]) for o in objs} for objs in objects]

        def shares(partner: np.ndarray) -> dict[str, float]:
            pairs = [(sets[i], sets[int(j)]) for i, j in enumerate(partner) if j >= 0]
            return {
                "shares_an_object": float(np.mean([bool(a & b) for a, b in pairs])),
                "same_objects": float(np.mean([a == b for a, b in pairs])),
            }

        out["nearest"] = shares(hits[:, 0])
        out["unrelated"] = shares(other)
    return out


# ------------------------------------------------------------------------------------------ building


def index_config(cfg: PairsConfig) -> IndexConfig:
    """The recipe's index settings, kept off the GPU when `pairs.device` is `cpu`."""
    return replace(cfg.index, device="cpu") if cfg.device == "cpu" else cfg.index


def _retriever(
    cfg: PairsConfig, out: Path, vectors: np.ndarray, fingerprint: str, runtime: Runtime
) -> Search:
    """A `search(queries, k, exclude_ids)` over the pool: the service, or the saved in-process index
    (built once by rank 0 when `out/index` is missing, or was built by another encoder, over another
    number of images or with other settings), loaded by every rank on its device."""
    if cfg.service_url:
        from rlalign.retrieval.client import IndexClient

        client = IndexClient(cfg.service_url)
        return lambda q, k, ex: client.knn(cfg.service_index, q, k, exclude_ids=ex)
    from rlalign.retrieval.index import IndexMetadataError, VectorIndex

    config = index_config(cfg)

    def load() -> VectorIndex:
        index = VectorIndex.load(out / INDEX_DIR, expect_fingerprint=fingerprint, device=config.device)
        built = index_settings(index.config)
        if index.count != len(vectors) or built != index_settings(config):
            raise IndexMetadataError(f"{out / INDEX_DIR}: {index.count} images, {built}")
        return index

    if runtime.is_main:  # every rank meets the barrier below, whether or not rank 0 builds
        try:
            load()
        except (FileNotFoundError, IndexMetadataError):
            save_index(config, vectors, fingerprint, out / INDEX_DIR)
    runtime.barrier()
    index = load()
    return lambda q, k, ex: index.search(q, k, exclude_ids=ex)


def save_index(config: IndexConfig, vectors: np.ndarray, fingerprint: str, directory: Path) -> Any:
    """Save a `VectorIndex` of `vectors` (ids = pool positions) under the encoder `fingerprint`."""
    from rlalign.retrieval.index import VectorIndex

    index = VectorIndex.build(vectors, np.arange(len(vectors)), config, fingerprint=fingerprint)
    index.save(directory)
    log.info("index: %d images, dim %d, %s -> %s", len(vectors), index.dim, config.kind, directory)
    return index


def build_index(
    cfg: PairsConfig, embedder: ImageEmbedder, images: Any, directory: Path, runtime: Runtime | None = None
) -> Any:
    """Embed `images` (sharded over the runtime's ranks, resumable) and save a `VectorIndex` of them from
    rank 0 (ids = pool positions, with the encoder fingerprint); returns it on rank 0, None elsewhere."""
    vectors, fingerprint = indexed_vectors(
        cfg, embed_pool(embedder, images, runtime)[0], embedder.fingerprint
    )
    index = None
    if runtime is None or runtime.is_main:
        index = save_index(index_config(cfg), vectors, fingerprint, directory)
    if runtime is not None:
        runtime.barrier()
    return index


def load_pool(recipe: Any) -> Dataset:
    from rlalign.data.captions import load_split

    pool = load_split(recipe.data, recipe.pairs.split)
    if recipe.pairs.pool_size is not None:
        pool = pool.select(range(min(recipe.pairs.pool_size, len(pool))))
    return pool


def build_pairs(recipe: Any, overwrite: bool = False) -> Path:
    """Write the preference dataset of `recipe.pairs` into `pairs.output_dir`, resuming the whole shards of
    an earlier run with the same settings and rebuilding damaged ones; returns the dataset's path.

    A folder built with other settings is refused with a `RecipeError` naming the first setting that
    differs, before anything is written; `overwrite` starts over instead.
    """
    from rich.progress import Progress

    from rlalign.retrieval.embedder import build_embedder

    cfg: PairsConfig = recipe.pairs
    runtime = Runtime.for_tools()
    device = runtime.device if cfg.device == "auto" else torch.device("cpu")
    out = Path(cfg.output_dir)
    pool = load_pool(recipe)
    embedder, model, processor = build_embedder(recipe)
    if cfg.embedder.encoder != "policy":  # the refill is always the policy's
        from rlalign.models.builder import load_base

        model, processor = load_base(recipe.model, recipe.data)
        model.eval()
    manifest = pair_manifest(recipe, pool, embedder, model, processor)
    claim_output(out, manifest, overwrite, runtime)
    embedder.tower.to(device)
    raw, _ = embed_pool(embedder, Column(pool, "image"), runtime)
    vectors, fingerprint = indexed_vectors(cfg, raw, embedder.fingerprint)
    model.to(device)
    refs = [c if isinstance(c, list) else [c] for c in pool["captions"]]
    b = BuildState(
        recipe=recipe,
        runtime=runtime,
        device=device,
        pool=pool,
        refs=refs,
        ids=pool["image_id"],
        embedder=embedder,
        vectors=vectors,
        search=_retriever(cfg, out, vectors, fingerprint, runtime),
        model=model,
        processor=processor,
        sentences=_sentences(cfg, refs),
        vocab=vocabulary(cfg),
        features=pair_features("objects" in pool.column_names),
        shard_dir=out / SHARDS_DIR,
        digest=manifest_digest(manifest),
    )
    b.shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(pool) / cfg.shard_size)
    mine = range(runtime.rank, n_shards, runtime.world_size)
    todo = _shards_to_do(b, mine)
    log.info("pairs: %d images, %d shards, %d of %d mine to do", len(pool), n_shards, len(todo), len(mine))
    with Progress(disable=not runtime.is_main) as progress:
        task = progress.add_task("pairs", total=len(mine), completed=len(mine) - len(todo))
        for s in todo:
            _write_shard(b, s)
            progress.advance(task)
    runtime.barrier()
    if runtime.is_main:
        _assemble(b, out, n_shards)
    runtime.barrier()
    return out / DATASET_FILE


def _sentences(cfg: PairsConfig, refs: list[list[str]]) -> TfidfSentences | HFSentences:
    if cfg.sentence_encoder == "tfidf":
        return TfidfSentences([c for cs in refs for c in cs], cfg.tfidf_ngrams)
    return HFSentences(cfg.sentence_encoder)


def _shards_to_do(b: BuildState, shards: Iterable[int]) -> list[int]:
    """The shards that are not whole, logging each one that exists but is damaged (it will be rebuilt)."""
    todo = []
    for s in shards:
        problem = shard_problem(b.shard_dir, s, b.digest)
        if problem is not None:
            todo.append(s)
        if problem not in (None, MISSING):
            log.warning("pairs: rebuilding %s: %s", shard_paths(b.shard_dir, s)[0], problem)
    return todo


def _assemble(b: BuildState, out: Path, n_shards: int) -> None:
    """Verify every shard (rebuilding any that is not whole), then join them in shard order."""
    for stale in b.shard_dir.glob(".shard-*.tmp-*"):  # left by a killed run; every process is done now
        stale.unlink(missing_ok=True)
    for s in _shards_to_do(b, range(n_shards)):
        _write_shard(b, s)
    # pyarrow, not `Dataset.from_parquet`, which refuses a shard where no image gave a pair
    shards = [pq.read_table(shard_paths(b.shard_dir, s)[0]) for s in range(n_shards)]
    full = Dataset(pa.concat_tables(shards))
    atomic_write(out / DATASET_FILE, lambda tmp: full.to_parquet(str(tmp)))
    stats = {
        "pool": len(b.pool),
        "pairs": len(full),
        "shards": n_shards,
        "manifest": b.digest,
        "encoder_fingerprint": b.embedder.fingerprint,
        "embedded_this_run": b.embedder.embedded,
        "mean_tries": float(np.mean(full["tries"])) if len(full) else 0.0,
        "retrieval": retrieval_stats(
            b.vectors, b.search, b.pool["objects"] if "objects" in b.pool.column_names else None
        ),
    }
    if b.cfg.chosen != "reference" and len(full):
        refs = {i: r[0] for i, r in zip(b.ids, b.refs)}
        stats["chosen_from_policy"] = float(
            np.mean([c != refs[i] for c, i in zip(full["chosen"], full["image_id"])])
        )
    atomic_write(out / STATS_FILE, lambda tmp: tmp.write_text(json.dumps(stats, indent=2) + "\n"))
    log.info("pairs: %d of %d images gave a pair -> %s", len(full), len(b.pool), out / DATASET_FILE)
