"""What the trainer benchmarks report beside time: peak memory of the timed steps and per-device figures.

Peak memory is what the process held at its most while the timed steps ran, the model included
(`rlalign.utils.memory.PeakMemory`: CUDA's max allocated, or the sampled anonymous resident set on a CPU).
"""

from __future__ import annotations

import statistics

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


def summary(reps: list[dict], n_params: int, device: torch.device, trained_per_token: int = 1) -> dict:
    """One trainer's repetitions: medians of samples/s, tokens/s per device and peak memory (and on a CPU
    the whole resident set), every rep's samples/s, and MFU from the median tokens/s, each token trained
    on `trained_per_token` times."""
    out = {k: statistics.median(r[k] for r in reps) for k in ("samples_per_s", "tokens_per_s", "peak_bytes")}
    out["peak_rss"] = statistics.median(r["peak_rss"] for r in reps) if device.type == "cpu" else None
    out["runs"] = [r["samples_per_s"] for r in reps]
    out["mfu"] = mfu(trained_per_token * out["tokens_per_s"], n_params, device)
    return out


def compared(mine: dict, theirs: dict, digits: int) -> dict:
    """The JSON fields both trainer benchmarks report: the ratio and each side's figures (`summary`)."""
    return {
        "ratio": round(mine["samples_per_s"] / theirs["samples_per_s"], 3),
        "ours_samples_per_s": round(mine["samples_per_s"], digits),
        "peer_samples_per_s": round(theirs["samples_per_s"], digits),
        "ours_tokens_per_s_per_device": round(mine["tokens_per_s"], 1),
        "peer_tokens_per_s_per_device": round(theirs["tokens_per_s"], 1),
        "ours_peak_mem_bytes": int(mine["peak_bytes"]),
        "peer_peak_mem_bytes": int(theirs["peak_bytes"]),
        "ours_peak_rss_bytes": mine["peak_rss"] and int(mine["peak_rss"]),
        "peer_peak_rss_bytes": theirs["peak_rss"] and int(theirs["peak_rss"]),
        "ours_mfu": mine["mfu"] and round(mine["mfu"], 4),
        "peer_mfu": theirs["mfu"] and round(theirs["mfu"], 4),
    }
