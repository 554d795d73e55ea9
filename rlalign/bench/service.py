"""`rlalign bench service`: do huge legal requests slow down small ones at the index service?

The service runs in its own process (`rlalign index serve`, one FAISS thread per search) over a
seeded random flat index. 32 client threads send k-NN requests through `IndexClient` (binary
answers), each pausing `--think-ms` between requests so that run A measures service time rather
than a saturated queue. Run A sends only small requests; run B makes 10 % of them huge (just under the
server's `max_results` cap, k = 1024, JSON answer: the heaviest legal request). Runs alternate,
A then B, and the medians over the repetitions of the small requests' p50 / p99 latencies are
reported; `ratio` is p99_B / p99_A (1.0: huge requests cost small ones nothing; the acceptance bar
is 2.0). Ends with one JSON line.

    rlalign bench service [--clients 32] [--requests 25] [--huge-share 0.1] [--reps 3] [--n 20000]
                          [--dim 64] [--small-rows 8] [--k 10] [--think-ms 100] [--max-results 262144]
                          [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from rlalign.retrieval.client import IndexClient
from rlalign.retrieval.index import IndexConfig, VectorIndex

HUGE_K = 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_service(index_dir: Path, max_results: int) -> tuple[subprocess.Popen, str]:
    """`rlalign index serve` in a child process; returns it and its URL once /healthz answers."""
    port = _free_port()
    code = "import sys; from rlalign.retrieval.service import main_serve; sys.exit(main_serve(sys.argv[1:]))"
    args = ["--index", f"bench={index_dir}", "--port", str(port), "--faiss-threads", "1"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--max-results", str(max_results)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the index service exited with code {proc.returncode} during startup")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the index service at {url} did not answer /healthz within 60 s")


def _one_run(url: str, a: argparse.Namespace, huge_share: float, rep: int) -> dict:
    """All clients, one run; returns the small requests' latencies (ms) and the huge count."""
    rng = np.random.default_rng([a.seed, rep, int(huge_share * 1000)])
    small = rng.standard_normal((a.clients, a.requests, a.small_rows, a.dim)).astype(np.float32)
    is_huge = rng.random((a.clients, a.requests)) < huge_share
    huge_rows = a.max_results // HUGE_K - 1
    huge_body = rng.standard_normal((huge_rows, a.dim)).astype("<f4").tobytes()
    latencies: list[list[float]] = [[] for _ in range(a.clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(a.clients)

    def client(c: int) -> None:
        try:
            with IndexClient(url, retries=0, timeout=300) as ic, httpx.Client(timeout=300) as raw:
                ic.health()
                start.wait()
                for r in range(a.requests):
                    time.sleep(a.think_ms / 1000.0)
                    if is_huge[c, r]:
                        response = raw.post(
                            f"{url}/v1/indexes/bench/knn",
                            content=huge_body,
                            params={"k": HUGE_K, "dim": a.dim},
                            headers={"Content-Type": "application/octet-stream"},
                        )
                        if response.status_code != 200:
                            raise RuntimeError(
                                f"huge request -> {response.status_code}: {response.text[:200]}"
                            )
                        continue
                    t0 = time.perf_counter()
                    ic.knn("bench", small[c, r], a.k)
                    latencies[c].append((time.perf_counter() - t0) * 1000.0)
        except BaseException as err:  # surfaced below
            errors.append(err)
            start.abort()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    ms = np.concatenate([np.asarray(x) for x in latencies])
    p50, p99 = np.percentile(ms, [50, 99])
    return {
        "p50": float(p50),
        "p99": float(p99),
        "small": ms.size,
        "huge": int(is_huge.sum()),
        "wall_s": time.perf_counter() - t0,
    }


def run(args: list[str]) -> dict:
    """Run the benchmark, print a table and the JSON line, and return the JSON's dict."""
    p = argparse.ArgumentParser(prog="rlalign bench service", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=25, help="requests per client per run")
    p.add_argument("--huge-share", type=float, default=0.1, help="share of huge requests in run B")
    p.add_argument("--reps", type=int, default=3, help="repetitions of A and B, alternating")
    p.add_argument("--n", type=int, default=20_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--small-rows", type=int, default=8, help="queries per small request")
    p.add_argument("--k", type=int, default=10, help="k of the small requests")
    p.add_argument(
        "--think-ms",
        type=float,
        default=100.0,
        help="pause between a client's requests (run A stays unsaturated)",
    )
    p.add_argument("--max-results", type=int, default=262_144, help="the server's queries x k cap")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(args)
    if a.reps < 1 or a.clients < 1 or a.requests < 1 or not 0 < a.huge_share < 1:
        p.error("need --reps, --clients, --requests >= 1 and 0 < --huge-share < 1")
    if a.max_results < 2 * HUGE_K:
        p.error(f"--max-results must be at least {2 * HUGE_K} (huge requests use k={HUGE_K})")

    runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="rlalign-bench-service-") as tmp:
        x = np.random.default_rng(a.seed).standard_normal((a.n, a.dim)).astype(np.float32)
        VectorIndex.build(x, np.arange(a.n), IndexConfig(metric="ip")).save(Path(tmp) / "index")
        proc, url = _start_service(Path(tmp) / "index", a.max_results)
        try:
            _one_run(url, a, 0.0, a.reps)  # warm-up: connections, FAISS, allocator
            for rep in range(a.reps):
                runs["A"].append(_one_run(url, a, 0.0, rep))
                runs["B"].append(_one_run(url, a, a.huge_share, rep))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    med = {
        run_: {key: statistics.median(r[key] for r in rs) for key in ("p50", "p99")}
        for run_, rs in runs.items()
    }
    result = {
        "bench": "service",
        "peer": "small requests only (run A)",
        "ratio": round(med["B"]["p99"] / med["A"]["p99"], 2),
        "small_p50_ms_a": round(med["A"]["p50"], 2),
        "small_p99_ms_a": round(med["A"]["p99"], 2),
        "small_p50_ms_b": round(med["B"]["p50"], 2),
        "small_p99_ms_b": round(med["B"]["p99"], 2),
        "device": "cpu",
        "huge_requests_b": [r["huge"] for r in runs["B"]],
        "huge_shape": [a.max_results // HUGE_K - 1, HUGE_K],
        "clients": a.clients,
        "reps": a.reps,
        "wall_s_b": round(statistics.median(r["wall_s"] for r in runs["B"]), 2),
    }
    _print_table(result, runs)
    print(json.dumps(result))
    return result


def _print_table(r: dict, runs: dict[str, list[dict]]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows, k = r["huge_shape"]
    table = Table(
        title=f"index service, {r['clients']} clients, small-request latency, median of {r['reps']}"
    )
    for col in ("run", "p50 ms", "p99 ms", "small requests / run"):
        table.add_column(col, justify="right" if col != "run" else "left")
    table.add_row(
        "A: small only",
        f"{r['small_p50_ms_a']:.2f}",
        f"{r['small_p99_ms_a']:.2f}",
        str(runs["A"][0]["small"]),
    )
    table.add_row(
        f"B: + huge ({rows}x{k}, JSON)",
        f"{r['small_p50_ms_b']:.2f}",
        f"{r['small_p99_ms_b']:.2f}",
        str(runs["B"][0]["small"]),
    )
    Console().print(table)
    Console().print(f"p99 B / p99 A = {r['ratio']:.2f} (acceptance: <= 2)")


if __name__ == "__main__":
    run(sys.argv[1:])
