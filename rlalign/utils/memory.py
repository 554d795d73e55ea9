"""The peak memory a block of work holds: what "holds at most X at every moment" is measured with.

On a GPU it is CUDA's max allocated, reset when the block starts. On the CPU it is the anonymous resident
set (`RssAnon`: memory the process allocated, not the files it maps; a memory-mapped safetensors
checkpoint does not count until it is copied), sampled by a thread every `interval` seconds, since the
kernel keeps no high-water mark of it that can be reset. Sampling can miss a peak shorter than the
interval; the figures it is used for (whole models, model partitions, training steps) last far longer.
glibc keeps freed blocks for reuse, and the resident set counts them: set `MALLOC_MMAP_THRESHOLD_=65536`
for figures of live memory only. The whole resident set (`VmRSS`, which also counts the touched pages of
a mapped checkpoint) is sampled beside it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

import torch

STATM = Path("/proc/self/statm")
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> tuple[int, int]:
    """This process's (anonymous, whole) resident memory; zeros where /proc does not say it. From `statm`
    (one short line, cheap to read every millisecond): resident minus shared (file-backed and shmem)
    pages is `RssAnon`, resident is `VmRSS`."""
    try:
        resident, shared = (int(x) for x in STATM.read_text().split()[1:3])
    except OSError:
        return 0, 0
    return (resident - shared) * PAGE, resident * PAGE


class PeakMemory:
    """`with PeakMemory(device) as probe: ...`, or `probe.start()` ... `probe.stop()` (from trainer
    callbacks): `peak`, the most this process held in between (the model included); `added`, that peak
    above what it held at the start; on a CPU also `peak_rss`, the whole resident set."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.start_bytes = 0
        self.peak = 0
        self.peak_rss: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def added(self) -> int:
        return max(self.peak - self.start_bytes, 0)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = self.peak = torch.cuda.memory_allocated(self.device)
            return
        self.start_bytes, self.peak_rss = resident_bytes()
        self.peak = self.start_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rlalign-peak-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            anon, whole = resident_bytes()
            self.peak, self.peak_rss = max(self.peak, anon), max(self.peak_rss or 0, whole)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> int:
        """The peak (bytes), once the block is over."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            anon, whole = resident_bytes()
            self.peak, self.peak_rss = max(self.peak, anon), max(self.peak_rss or 0, whole)
        return self.peak

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
