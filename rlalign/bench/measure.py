"""What the trainer benchmarks report beside time: peak memory of the timed steps and per-device figures.

Peak memory is what the process held at its most while the timed steps ran (the model included): on a
GPU CUDA's max allocated, reset when timing starts; on a CPU the anonymous resident set (`RssAnon`:
memory the process allocated, not the checkpoint files it maps) sampled by a thread every few
milliseconds, since the kernel keeps no high-water mark of it that can be reset. The whole resident set
(`VmRSS`, which also counts the pages of a memory-mapped checkpoint it has touched) is sampled beside it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

STATM = Path("/proc/self/statm")
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> tuple[int, int]:
    """This process's (anonymous, whole) resident memory; zeros where /proc does not say it. From `statm`
    (one short line, cheap to read every few milliseconds): resident minus shared (file-backed and shmem)
    pages is `RssAnon`, resident is `VmRSS`."""
    try:
        resident, shared = (int(x) for x in STATM.read_text().split()[1:3])
    except OSError:
        return 0, 0
    return (resident - shared) * PAGE, resident * PAGE


class PeakProbe:
    """`probe.start()` when the timed steps begin (possibly from a trainer callback), `probe.stop()` when
    they end: the peak bytes in between (`peak`; on a CPU also `peak_rss`, the whole resident set)."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device = device
        self.interval = interval
        self.peak = 0
        self.peak_rss: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.peak, self.peak_rss = resident_bytes()
        self._thread = threading.Thread(target=self._sample, name="rlalign-bench-peak", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            anon, whole = resident_bytes()
            self.peak, self.peak_rss = max(self.peak, anon), max(self.peak_rss or 0, whole)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.peak


def mfu(tokens_per_s: float, n_params: int, device: torch.device) -> float | None:
    """Model FLOPs utilisation as `trainer.loop.throughput` computes it: 6 x parameters x trained tokens per
    second per device over the device's dense bf16 peak (attention not counted); None off a listed GPU."""
    from rlalign.trainer.loop import PEAK_TFLOPS

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return 6 * n_params * tokens_per_s / (peak * 1e12) if peak else None


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
