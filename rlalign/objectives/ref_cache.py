"""Cached reference log-probs: the reference runs once per pair, ever.

Entries are keyed by `pair_cache_keys`: the collator's pair key (raw image hashes + token ids of the
packed pair) and a digest of the pair's processed image inputs (pixel values, grid sizes, ...), so
another image processor (resolution, crop, normalisation) or another image pipeline misses instead of
serving stale log-probs. They live under a folder named by the reference fingerprint (parameter names, shapes and per-parameter float64 sums
and squared sums, reduced over ranks so ZeRO-3 / FSDP2 shards give the same value; LoRA adapter
weights excluded for the adapter-disabled reference). A batch whose pairs are all cached runs no
reference forward; otherwise the reference runs on the batch and its rows are stored. Each rank
writes its own shard files; every rank reads all shards when it first needs the cache, so later
epochs and later runs (any layout) reuse them.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from rlalign.models.vision_inputs import split_rows
from rlalign.utils.io import atomic_write

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "pred_pos", "is_retrieved")
"""Batch tensors already covered by the collator's pair key (token ids) or derived from it."""


def _digest(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _row_parts(batch: dict[str, Any], name: str, value: torch.Tensor, rows: int) -> list[torch.Tensor] | None:
    """`value` (= `batch[name]`) split into one part per row, for every family's image layout (see
    `rlalign.models.vision_inputs`); None when it does not split."""
    return split_rows({**batch, name: value}, name, rows)


def pair_cache_keys(batch: dict[str, Any]) -> list[str]:
    """One cache key per pair: the collator's `pair_keys` and the processed image inputs of the
    pair's rows (row i, and row B + i, the retrieved image, when the batch has 2B rows).

    An input that cannot be split per row is hashed whole into every key of the batch: such keys
    only hit for the same batch, never serve another image's log-probs."""
    pair_keys = batch["pair_keys"]
    B, N = len(pair_keys), batch["input_ids"].shape[0]
    hashes = [hashlib.sha256(k.encode()) for k in pair_keys]
    for name in sorted(batch):
        value = batch[name]
        if name in TEXT_INPUTS or not isinstance(value, torch.Tensor):
            continue
        parts = _row_parts(batch, name, value, N)
        for i, h in enumerate(hashes):
            if parts is None:
                _digest(h, name, value)
                continue
            for row in range(i, N, B):
                _digest(h, name, parts[row])
    return [h.hexdigest() for h in hashes]


def reference_fingerprint(reference: Any) -> str:
    """Stable digest of the reference's weights, the same under any sharding."""
    runtime = reference.runtime
    model = reference.model if reference.mode == "copy" else runtime.unwrap(reference.policy)
    adapter_off = reference.mode == "adapter_disabled"
    names, total = runtime.parameter_sums(model, skip=lambda name: adapter_off and "lora_" in name)
    h = hashlib.sha256("\n".join(names).encode())
    h.update(" ".join(f"{v:.9g}" for v in total.flatten().tolist()).encode())
    return h.hexdigest()[:16]


class RefLogpCache:
    """Reference log-probs by `pair_cache_keys`, under a folder per (reference fingerprint, reduction)."""

    def __init__(self, root: str, reduction: str, flush_rows: int = 512):
        self.root = Path(root).expanduser()
        self.reduction = reduction
        self.flush_rows = flush_rows
        self.dir: Path | None = None
        self.table: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.shards_written = 0
        self.rank = 0
        atexit.register(self.flush)

    def _open(self, reference: Any) -> None:
        self.dir = self.root / f"{reference_fingerprint(reference)}-{self.reduction}"
        self.rank = reference.runtime.rank
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.dir.glob("[!.]*.pt")):  # not another writer's temporary
            self.table.update(torch.load(f, weights_only=True))
        log.info("reference log-prob cache %s: %d pairs", self.dir, len(self.table))

    @staticmethod
    def keys(batch: dict[str, Any]) -> list[str]:
        """The batch's cache keys (see `pair_cache_keys`), for `lookup` and `store`."""
        return pair_cache_keys(batch)

    def lookup(self, keys: list[str], reference: Any) -> torch.Tensor | None:
        """(N, 2) cached log-probs of the batch's rows (pair rows, then retrieved rows), or None."""
        if self.dir is None:
            self._open(reference)
        if not all(k in self.table for k in keys):
            return None
        rows = torch.stack([self.table[k] for k in keys])  # (B, 2 or 4)
        return torch.cat([rows[:, :2], rows[:, 2:]], 0) if rows.shape[1] == 4 else rows

    def store(self, keys: list[str], logps: torch.Tensor) -> None:
        B = len(keys)
        logps = logps.detach().float().cpu()
        rows = torch.cat([logps[:B], logps[B:]], 1) if logps.shape[0] == 2 * B else logps
        for k, row in zip(keys, rows):
            self.table[k] = self.pending[k] = row.clone()
        if len(self.pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write pending entries as one shard file (atomic rename)."""
        if not self.pending or self.dir is None:
            return
        name = f"rank{self.rank}-pid{os.getpid()}-{self.shards_written:05d}.pt"
        atomic_write(self.dir / name, lambda tmp: torch.save(self.pending, tmp), fsync=False)
        self.shards_written += 1
        self.pending = {}
