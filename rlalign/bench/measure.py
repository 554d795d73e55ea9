"""What the trainer benchmarks report beside time: peak memory of the timed steps and per-device figures.

Peak memory is what the process held at its most while the timed steps ran, the model included
(`rlalign.utils.memory.PeakMemory`: CUDA's max allocated, or the sampled anonymous resident set on a CPU).
"""

from __future__ import annotations

import torch


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
