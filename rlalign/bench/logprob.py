"""`rlalign bench logprob`: our log-prob path against the full-logits path, forward + backward.

The full-logits path is what a plain HF forward gives: logits at every position (prompt and image tokens
included), then the completion positions' log-softmax. Ours keeps the hidden states of the scored positions
only (`logits_to_keep`), applies the LM head there and takes chunked log-probs with a custom backward
(`rlalign.ops.token_logprobs`). Both start from the same decoder output (random hidden states [1, prompt +
response, hidden]) and the same LM head, so the difference is the log-prob path alone. Each (case, path) runs
in a fresh process: peak memory is the rise of the peak resident set over its size before the first pass
(CPU; Linux resets the peak through /proc/self/clear_refs) or of `max_memory_allocated`
(CUDA) over the inputs, time the median of `--reps` forward + backward passes. Ends with one JSON line.

    rlalign bench logprob [--vocab 32000 151936] [--prompt 600 2000] [--response 32] [--hidden 256]
                          [--reps 3] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from rlalign.ops import token_logprobs


def _inputs(vocab: int, prompt: int, response: int, hidden: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, prompt + response, hidden, generator=g).to(device, dtype).requires_grad_()
    # the head is frozen (as under LoRA): its weight gradient is the same on both paths and not the path's
    head = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (1, response), generator=g).to(device)
    return h, head, targets


def full_path(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits at every position, then the response positions' float32 log-softmax (the plain HF way)."""
    logits = torch.nn.functional.linear(h, head)
    r = targets.shape[1]
    logp_all = logits[:, -r - 1 : -1].float().log_softmax(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1)


def our_path(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hidden states of the scored positions only, then chunked log-probs."""
    r = targets.shape[1]
    return token_logprobs(torch.nn.functional.linear(h[:, -r - 1 : -1], head), targets)


def _reset_rss_peak() -> None:
    """Linux: reset the process's peak resident set (VmHWM) to its current size, so the next reading is the
    peak of what follows alone (writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: str, vocab: int, prompt: int, response: int, hidden: int, reps: int, device: str) -> dict:
    """One (case, path) in this process: peak memory over the inputs, median time, the outputs."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, head, targets = _inputs(vocab, prompt, response, hidden, device, dtype)
    fn = full_path if path == "full" else our_path
    # warm-up on a tiny case: one-time allocations (autograd threads, kernels) are not the path's memory
    small = _inputs(64, 4, 2, 8, device, dtype)
    fn(*small).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_rss_peak()
        base = _rss_peak_bytes()
    times = []
    for rep in range(reps + 1):
        h.grad = None
        start = time.perf_counter()
        logp = fn(h, head, targets)
        logp.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if rep == 0:
            peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_peak_bytes()) - base
    return {
        "peak_mb": peak / 2**20,
        "time_s": statistics.median(times[1:]),
        "logp": logp.detach().float().tolist(),
        "grad_h": h.grad[0, -response - 1 : -1].float().flatten()[:4096].tolist(),
    }


def _child(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "rlalign.bench.logprob", "--child", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rlalign bench logprob")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--prompt", type=int, nargs="+", default=[600, 2000])
    p.add_argument("--response", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.child:
        path, case = a.child
        vocab, prompt = map(int, case.split("x"))
        print(json.dumps(measure(path, vocab, prompt, a.response, a.hidden, a.reps, device)))
        return {}
    rows = []
    common = [
        "--response",
        str(a.response),
        "--hidden",
        str(a.hidden),
        "--reps",
        str(a.reps),
        "--device",
        device,
    ]
    for vocab in a.vocab:
        for prompt in a.prompt:
            case = f"{vocab}x{prompt}"
            full = _child(["full", case, *common])
            ours = _child(["ours", case, *common])
            diff = max(abs(x - y) for x, y in zip(full["logp"][0], ours["logp"][0]))
            grad_diff = max(abs(x - y) for x, y in zip(full["grad_h"], ours["grad_h"]))
            rows.append(
                {
                    "vocab": vocab,
                    "prompt": prompt,
                    "response": a.response,
                    "full_peak_mb": round(full["peak_mb"], 1),
                    "ours_peak_mb": round(ours["peak_mb"], 1),
                    "memory_ratio": round(ours["peak_mb"] / max(full["peak_mb"], 1e-9), 4),
                    "full_s": round(full["time_s"], 4),
                    "ours_s": round(ours["time_s"], 4),
                    "speedup": round(full["time_s"] / ours["time_s"], 2),
                    "max_abs_diff_logp": diff,
                    "max_abs_diff_grad": grad_diff,
                }
            )
    _print_table(rows, device, a)
    result = {
        "bench": "logprob",
        "peer": "full-logits log-softmax",
        "device": device,
        "hidden": a.hidden,
        "reps": a.reps,
        "cases": rows,
        "ratio": max(r["memory_ratio"] for r in rows),
    }
    print(json.dumps(result))
    return result


def _print_table(rows: list[dict], device: str, a: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"log-probs + backward, response {a.response}, hidden {a.hidden}, {device}, median of {a.reps}"
    )
    for col in ("vocab", "prompt", "full MB", "ours MB", "ours/full", "full s", "ours s", "max |dlogp|"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["vocab"]),
            str(r["prompt"]),
            f"{r['full_peak_mb']:.0f}",
            f"{r['ours_peak_mb']:.0f}",
            f"{r['memory_ratio']:.3f}",
            f"{r['full_s']:.3f}",
            f"{r['ours_s']:.3f}",
            f"{r['max_abs_diff_logp']:.1e}",
        )
    Console().print(table)


if __name__ == "__main__":
    run(sys.argv[1:])
