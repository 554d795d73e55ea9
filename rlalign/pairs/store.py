"""What makes a pairs folder resumable: the manifest of everything its rows depend on, written before
the first shard, and a record of each shard (rows, bytes, sha256, manifest digest) written after it.

A build refuses a folder whose manifest differs from its own, naming the first difference, and
counts a shard done only when its file matches its record; see `rlalign.pairs.builder`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset

from rlalign.config import RecipeError
from rlalign.retrieval.embedder import encoder_fingerprint
from rlalign.utils.io import atomic_write

log = logging.getLogger(__name__)

INDEX_DIR = "index"
SHARDS_DIR = "shards"
DATASET_FILE = "pairs.parquet"
STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
MISSING = "missing"
"""`shard_problem` of a shard that was never written (nothing to log: it is simply to do)."""

_UNSET = object()
_START_OVER = "--overwrite starts over (or set pairs.output_dir to a new folder)"
_FINGERPRINTS = {
    "pool": "the image pool (pairs.split, pairs.pool_size, data.*)",
    "policy": "the policy's weights, config or tokenizer (model.*)",
    "embedder": "the image embedder's weights or pooling (pairs.embedder.*)",
}


def _hash_value(h: Any, value: Any) -> None:
    """Feed one cell to a sha256 without ambiguity: bytes length-prefixed, containers walked in order."""
    if isinstance(value, bytes):
        h.update(b"b%d:" % len(value))
        h.update(value)
    elif isinstance(value, dict):
        h.update(b"{%d:" % len(value))
        for key in sorted(value):
            _hash_value(h, key)
            _hash_value(h, value[key])
    elif isinstance(value, list | tuple):
        h.update(b"[%d:" % len(value))
        for item in value:
            _hash_value(h, item)
    else:
        h.update(json.dumps(value, default=str).encode() + b"\n")


def pool_fingerprint(pool: Dataset) -> dict[str, Any]:
    """The pool's size and a sha256 over all its cells, images as stored (encoded bytes, or the path of a
    file: a file changed in place under the same path is not seen), never decoded."""
    raw = pool.cast_column("image", datasets.Image(decode=False))
    h = hashlib.sha256(json.dumps(raw.column_names).encode())
    for batch in raw.iter(batch_size=512):
        for name in raw.column_names:
            for value in batch[name]:
                _hash_value(h, value)
    return {"images": len(pool), "sha256": h.hexdigest()}


def model_fingerprint(model: torch.nn.Module, processor: Any) -> str:
    """sha256 of what the refill's scores depend on: the model's config and weights (hashed as the image
    embedder hashes a vision tower), the processor's config and the tokenizer's vocabulary."""
    h = hashlib.sha256(encoder_fingerprint(model, processor, pooling="").encode())
    h.update(json.dumps(sorted(processor.tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def manifest_difference(stored: dict, current: dict) -> str | None:
    """The first thing `current` changes in `stored`, as a phrase naming it; None when they agree."""
    if stored.get("version") != current["version"]:
        return f"manifest version {stored.get('version')!r}, this build writes {current['version']}"
    old, new = stored.get("settings", {}), current["settings"]
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key, _UNSET) != new.get(key, _UNSET):
            was, now = (json.dumps(d[key]) if key in d else "unset" for d in (old, new))
            return f"{key} is {now}, but this folder was built with {was}"
    for key, what in _FINGERPRINTS.items():
        if stored.get("fingerprints", {}).get(key) != current["fingerprints"][key]:
            return f"{what} differs from the one this folder was built with"
    return None


def read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecipeError(f"{path}: unreadable ({err}); {_START_OVER}") from None
    if not isinstance(manifest, dict):
        raise RecipeError(f"{path}: not a pairs manifest; {_START_OVER}")
    return manifest


def holds_pairs(out: Path) -> bool:
    """Shards, a dataset or stats in `out` (an index alone may come from `rlalign index build`)."""
    shards = out / SHARDS_DIR
    return (
        (out / DATASET_FILE).exists()
        or (out / STATS_FILE).exists()
        or (shards.is_dir() and any(shards.glob("shard-*")))
    )


def claim_output(out: Path, manifest: dict, overwrite: bool, runtime: Any) -> None:
    """Make `out` this build's before anything is written there. Every rank decides alike whether to refuse
    (a folder built with other settings, or holding pairs but no manifest), from files only rank 0 changes;
    rank 0 empties the folder when `overwrite`, and writes the manifest before any shard."""
    path = out / MANIFEST_FILE
    stored = None
    if not overwrite:
        stored = read_manifest(path)
        if stored is None and holds_pairs(out):
            raise RecipeError(
                f"{out}: holds pairs but no {MANIFEST_FILE} saying how they were built; {_START_OVER}"
            )
        if stored is not None and (difference := manifest_difference(stored, manifest)):
            raise RecipeError(f"{path}: {difference}; {_START_OVER}")
    if runtime.is_main and stored is None:
        if overwrite:
            for name in (SHARDS_DIR, INDEX_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (DATASET_FILE, STATS_FILE, MANIFEST_FILE):
                (out / name).unlink(missing_ok=True)
            log.info("pairs: --overwrite: starting over in %s", out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    runtime.barrier()


# ------------------------------------------------------------------------------------------ shards


def shard_paths(shard_dir: Path, s: int) -> tuple[Path, Path]:
    """Shard `s`'s data file and its record (rows, bytes, sha256 and manifest digest of the data file)."""
    return shard_dir / f"shard-{s:05d}.parquet", shard_dir / f"shard-{s:05d}.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_problem(shard_dir: Path, s: int, digest: str) -> str | None:
    """Why shard `s` cannot be counted done (`MISSING` when it was never written), None when it is whole:
    its data file matches the record written with it (size, sha256, row count) under this manifest."""
    data, record = shard_paths(shard_dir, s)
    if not data.is_file():
        return MISSING
    try:
        rec = json.loads(record.read_text())
    except FileNotFoundError:
        return f"no {record.name} (its writer stopped before recording it)"
    except (OSError, ValueError) as err:
        return f"{record.name} unreadable ({err})"
    if rec.get("manifest") != digest:
        return f"{record.name} belongs to another manifest"
    if (size := data.stat().st_size) != rec.get("bytes"):
        return f"{size} bytes, {rec.get('bytes')} recorded"
    if file_sha256(data) != rec.get("sha256"):
        return "content differs from its recorded sha256"
    try:
        rows = pq.read_metadata(data).num_rows
    except (OSError, pa.ArrowException) as err:
        return f"unreadable ({' '.join(str(err).split())})"
    return None if rows == rec.get("rows") else f"{rows} rows, {rec.get('rows')} recorded"


def write_shard(table: Dataset, shard_dir: Path, s: int, digest: str) -> None:
    """Write shard `s` atomically, then its record, hashed from the very bytes that were renamed."""
    path, record_path = shard_paths(shard_dir, s)
    record = {"shard": s, "rows": len(table), "manifest": digest}

    def write(tmp: Path) -> None:
        table.to_parquet(str(tmp))
        record.update(bytes=tmp.stat().st_size, sha256=file_sha256(tmp))

    record_path.unlink(missing_ok=True)
    atomic_write(path, write)
    atomic_write(record_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
