"""Cached reference log-probs: the reference runs once per pair, ever.

Entries are keyed by (image hashes + token ids of the packed pair, from the collator) under a
folder named by the reference fingerprint (parameter names, shapes and per-parameter float64 sums
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

log = logging.getLogger(__name__)


def reference_fingerprint(reference: Any) -> str:
    """Stable digest of the reference's weights, the same under any sharding."""
    runtime = reference.runtime
    model = reference.model if reference.mode == "copy" else runtime.unwrap(reference.policy)
    names, stats = [], []
    for name, p in model.named_parameters():
        if reference.mode == "adapter_disabled" and "lora_" in name:
            continue
        local = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        names.append(f"{name.removeprefix('module.')}:{shape}")
        x = local.detach().double().flatten()
        stats.append(torch.stack([x.sum(), (x * x).sum()]))
    total = runtime.all_reduce(torch.stack(stats).cpu() if stats else torch.zeros(0, 2, dtype=torch.float64))
    h = hashlib.sha256("\n".join(names).encode())
    h.update(" ".join(f"{v:.9g}" for v in total.flatten().tolist()).encode())
    return h.hexdigest()[:16]


class RefLogpCache:
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
        for f in sorted(self.dir.glob("*.pt")):
            self.table.update(torch.load(f, weights_only=True))
        log.info("reference log-prob cache %s: %d pairs", self.dir, len(self.table))

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
        tmp = self.dir / f".{name}.tmp"
        torch.save(self.pending, tmp)
        tmp.rename(self.dir / name)
        self.shards_written += 1
        self.pending = {}
