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

Sharding and resumption: the pool is cut into shards of `shard_size` images; process r of W takes
shards r, r + W, ... (`accelerate launch` sets W); each shard is written to a temp file and renamed,
so a shard file is either complete or absent, and a restart skips finished shards. The dataset is
all shards concatenated in shard order, whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset

from rlalign.data.collate import TOKEN_ALIGNED, encode_prompts
from rlalign.data.shapes import COLORS, POSITION_PHRASES, SHAPE_WORDS
from rlalign.retrieval.config import PairsConfig

log = logging.getLogger(__name__)

INDEX_DIR = "index"
SHARDS_DIR = "shards"
DATASET_FILE = "pairs.parquet"
STATS_FILE = "stats.json"
_IMAGES = [datasets.Image()]
_OBJECTS = [{"shape": datasets.Value("string"), "color": datasets.Value("string"),
             "position": datasets.Value("string"), "box": datasets.Sequence(datasets.Value("int32"), length=4)}]  # fmt: skip


def pair_features(with_objects: bool) -> datasets.Features:
    feats = {
        "images": _IMAGES, "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"), "retrieved_images": _IMAGES, "image_id": datasets.Value("string"),
        "retrieved_id": datasets.Value("string"), "retrieved_ids": [datasets.Value("string")],
        "similarity": datasets.Value("float32"), "text_similarity": datasets.Value("float32"),
        "mask": datasets.Value("string"), "tries": datasets.Value("int32"),
    }  # fmt: skip
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
def response_logprobs(model: torch.nn.Module, processor: Any, images: list, prompt: str,
                      texts: list[str], groups: list[int]) -> torch.Tensor:  # fmt: skip
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
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if not enc["attention_mask"].bool().all():  # prompts of different lengths: positions skip the padding
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    for key, value in enc.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key in TOKEN_ALIGNED:
            value = torch.cat(
                [value, torch.full((len(images), width), TOKEN_ALIGNED[key], dtype=value.dtype)], 1
            )
        if value.shape[0] != len(images):
            raise NotImplementedError(
                f"processor output '{key}' is not one row per image; cannot batch refills"
            )
        inputs[key] = value[g]
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    logits_BTV = model(**inputs).logits[:, p - 1 : -1].float()
    logp_BT = torch.log_softmax(logits_BTV, dim=-1).gather(-1, ids[:, p:, None].to(model.device))[..., 0]
    return (logp_BT * mask[:, p:].to(model.device)).sum(dim=1).cpu()


def refill(model: torch.nn.Module, processor: Any, images: list, prompt: str, templates: list[list[str | Slot]],
           vocab: dict[str, list[str]]) -> list[str]:  # fmt: skip
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


# ------------------------------------------------------------------------------------------ building


def _retriever(cfg: PairsConfig, out: Path, embedder: Any, pool: Dataset, state: Any):
    """A `search(queries, k, exclude_ids)` over the pool: the service, or the saved in-process index
    (built once by rank 0 when `out/index` is missing or was built by another encoder)."""
    if cfg.service_url:
        from rlalign.retrieval.client import IndexClient

        client = IndexClient(cfg.service_url)
        return lambda q, k, ex: client.knn(cfg.service_index, q, k, exclude_ids=ex)
    from rlalign.retrieval.index import IndexMetadataError, VectorIndex

    def load():
        return VectorIndex.load(out / INDEX_DIR, expect_fingerprint=embedder.fingerprint, device="cpu")

    if state.is_main_process:  # every rank meets the barrier below, whether or not rank 0 builds
        try:
            load()
        except (FileNotFoundError, IndexMetadataError):
            build_index(cfg, embedder, pool["image"], out / INDEX_DIR)
    state.wait_for_everyone()
    index = load()
    return lambda q, k, ex: index.search(q, k, exclude_ids=ex)


def build_index(cfg: PairsConfig, embedder: Any, images: list, directory: Path) -> Any:
    """Embed `images` and save a `VectorIndex` of them (ids = pool positions) with the encoder fingerprint."""
    from rlalign.retrieval.index import IndexConfig, VectorIndex

    vectors = embedder.embed(images)
    s = cfg.index
    config = IndexConfig(kind=s.kind, metric=s.metric, nlist=s.nlist, nprobe=s.nprobe, hnsw_m=s.hnsw_m,
                         ef_construction=s.ef_construction, ef_search=s.ef_search, device="cpu")  # fmt: skip
    index = VectorIndex.build(vectors, np.arange(len(images)), config, fingerprint=embedder.fingerprint)
    index.save(directory)
    log.info("index: %d images, dim %d, %s -> %s", len(images), index.dim, s.kind, directory)
    return index


def load_pool(recipe: Any) -> Dataset:
    from rlalign.data.captions import load_split

    pool = load_split(recipe.data, recipe.pairs.split)
    if recipe.pairs.pool_size is not None:
        pool = pool.select(range(min(recipe.pairs.pool_size, len(pool))))
    return pool


def _atomic_parquet(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        ds.to_parquet(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_rows(rows: list[int], pool: Dataset, chosen: list[str], ctx: dict) -> dict[str, list]:
    """The pairs of one shard (pool positions `rows`), as columns. Try t refills, for every row still
    without a rejected answer, its t-th retrieved image, all rows in one batch."""
    cfg: PairsConfig = ctx["cfg"]
    images = [pool[i]["image"] for i in rows]
    sims, hits = ctx["search"](ctx["embedder"].embed(images), cfg.top_k, np.asarray(rows, dtype=np.int64))
    templates = [mask_template(c, ctx["vocab"]) for c in chosen]
    tried = [[int(h) for h in row if h >= 0] for row in hits]
    result: dict[int, tuple[int, str, float]] = {}  # row j -> (try, rejected, text cosine)
    todo = [j for j, t in enumerate(templates) if any(isinstance(s, Slot) for s in t)]
    for t in range(cfg.top_k):
        todo = [j for j in todo if t < len(tried[j])]
        if not todo:
            break
        retrieved = [pool[tried[j][t]]["image"] for j in todo]
        refills = refill(ctx["model"], ctx["processor"], retrieved, ctx["prompt"], [templates[j] for j in todo],
                         ctx["vocab"])  # fmt: skip
        left = []
        for j, rejected in zip(todo, refills):
            text_sim = ctx["sentences"].cosine(chosen[j], rejected)
            if text_sim < cfg.similarity_threshold:
                result[j] = (t, rejected, text_sim)
            else:
                left.append(j)
        todo = left
    cols: dict[str, list] = {name: [] for name in ctx["features"]}
    for j in sorted(result):
        t, rejected, text_sim = result[j]
        i, hit = rows[j], tried[j][t]
        row = {"images": [images[j]], "prompt": ctx["prompt"], "chosen": chosen[j], "rejected": rejected,
               "retrieved_images": [pool[hit]["image"]], "image_id": ctx["ids"][i], "retrieved_id": ctx["ids"][hit],
               "retrieved_ids": [ctx["ids"][h] for h in tried[j]], "similarity": float(sims[j][t]),
               "text_similarity": text_sim, "mask": template_string(templates[j]), "tries": t + 1}  # fmt: skip
        if "objects" in cols:
            row["objects"] = pool[i]["objects"]
        for name, value in row.items():
            cols[name].append(value)
    return cols


def build_pairs(recipe: Any) -> Path:
    """Write the preference dataset of `recipe.pairs` (resuming finished shards); returns its path."""
    from accelerate import PartialState
    from rich.progress import Progress

    from rlalign.evaluate import generate_captions
    from rlalign.retrieval.embedder import ImageEmbedder, build_embedder

    cfg: PairsConfig = recipe.pairs
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(cfg.output_dir)
    shard_dir = out / SHARDS_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    pool = load_pool(recipe)
    ids = pool["image_id"]
    embedder, model, processor = build_embedder(recipe)
    if cfg.embedder.encoder != "policy":  # the refill is always the policy's
        from rlalign.models.builder import load_base

        model, processor = load_base(recipe.model, recipe.data)
        model.eval()
    model.to(state.device)
    assert isinstance(embedder, ImageEmbedder)
    search = _retriever(cfg, out, embedder, pool, state)
    refs = [c if isinstance(c, list) else [c] for c in pool["captions"]]
    sentences = (TfidfSentences([c for cs in refs for c in cs], cfg.tfidf_ngrams)
                 if cfg.sentence_encoder == "tfidf" else HFSentences(cfg.sentence_encoder))  # fmt: skip
    ctx = {"cfg": cfg, "embedder": embedder, "search": search, "model": model, "processor": processor,
           "prompt": recipe.data.prompt, "vocab": vocabulary(cfg), "sentences": sentences, "ids": ids,
           "features": pair_features("objects" in pool.column_names)}  # fmt: skip
    n_shards = math.ceil(len(pool) / cfg.shard_size)
    mine = range(state.process_index, n_shards, state.num_processes)
    todo = [s for s in mine if not (shard_dir / f"shard-{s:05d}.parquet").is_file()]
    log.info("pairs: %d images, %d shards, %d of %d mine to do", len(pool), n_shards, len(todo), len(mine))
    with Progress(disable=not state.is_main_process) as progress:
        task = progress.add_task("pairs", total=len(mine), completed=len(mine) - len(todo))
        for s in todo:
            rows = list(range(s * cfg.shard_size, min((s + 1) * cfg.shard_size, len(pool))))
            if cfg.chosen == "reference":
                chosen = [refs[i][0] for i in rows]
            else:
                chosen = generate_captions(model, processor, [pool[i]["image"] for i in rows], recipe.data.prompt,
                                           max_new_tokens=recipe.data.max_response_tokens)  # fmt: skip
            cols = _shard_rows(rows, pool, chosen, ctx)
            _atomic_parquet(
                Dataset.from_dict(cols, features=ctx["features"]), shard_dir / f"shard-{s:05d}.parquet"
            )
            progress.advance(task)
    state.wait_for_everyone()
    if state.is_main_process:
        _assemble(out, n_shards, len(pool), embedder)
    state.wait_for_everyone()
    return out / DATASET_FILE


def _assemble(out: Path, n_shards: int, pool_size: int, embedder: Any) -> None:
    shard_dir = out / SHARDS_DIR
    for stale in shard_dir.glob(".shard-*.tmp-*"):  # left by a killed run; every process is done now
        stale.unlink(missing_ok=True)
    shards = [Dataset.from_parquet(str(shard_dir / f"shard-{s:05d}.parquet")) for s in range(n_shards)]
    full = datasets.concatenate_datasets(shards)
    _atomic_parquet(full, out / DATASET_FILE)
    stats = {"pool": pool_size, "pairs": len(full), "shards": n_shards, "encoder_fingerprint": embedder.fingerprint,
             "embedded_this_run": embedder.embedded, "mean_tries": float(np.mean(full["tries"])) if len(full) else 0.0}  # fmt: skip
    tmp = out / f".{STATS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, out / STATS_FILE)
    log.info("pairs: %d of %d images gave a pair -> %s", len(full), pool_size, out / DATASET_FILE)
