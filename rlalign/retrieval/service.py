"""The index service: named `VectorIndex`es behind a small HTTP API (FastAPI + uvicorn).

Wire format of `POST /v1/indexes/{name}/knn` (one clean binary design, no JSON arrays of floats):

    query params  k=INT (required, 1..max_k), dim=INT (or header X-Dim; required),
                  exclude=1 (optional: the body carries per-query ids to drop),
                  dedup=FLOAT (optional: near-duplicate threshold, see `VectorIndex.search`)
    body          Q*dim little-endian float32 (the queries, row-major), then, with exclude=1,
                  Q little-endian int64 (one id per query to drop, -1 for none).
                  Q is implied by the length, which must be a multiple of 4*dim (+8 with exclude).
    response      with `Accept: application/octet-stream`: Q*k little-endian float32 scores then
                  Q*k little-endian int64 ids, headers X-Rows=Q and X-K=k (what `IndexClient` uses);
                  otherwise JSON {"k": k, "scores": [[...]], "ids": [[...]]} with padded slots as
                  score null / id -1 (JSON has no -inf).
    errors        4xx with JSON {"error": "..."}; the server keeps serving.

`GET /healthz` answers {"status": "ok"}; `GET /v1/stats` gives per-index count, dim, kind, metric,
requests and queries served, and p50/p99 latency (ms) over the last `latency_window` requests.

Security: binds 127.0.0.1 by default. A non-loopback host needs a token, and with a token set every
request (health included) must carry `Authorization: Bearer TOKEN`, else 401.

FAISS searches are CPU/GPU-bound and run in a small thread pool so the event loop keeps accepting;
CPU FAISS indexes are safe to search concurrently, GPU ones are serialised per index.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from rlalign.retrieval.client import BINARY, TOKEN_ENV
from rlalign.retrieval.index import VectorIndex

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1; names other than `localhost` count as non-loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(kw_only=True)
class ServiceConfig:
    """Where and how the index service listens."""

    host: str = "127.0.0.1"
    """Interface to bind. Anything but loopback requires `token`."""
    port: int = 8765
    """TCP port; 0 picks a free one (see `start_in_thread`)."""
    token: str | None = None
    """Shared secret; when set, every request needs `Authorization: Bearer <token>`."""
    max_batch: int = 4096
    """Most query rows in one request; larger requests get 413."""
    max_k: int = 1024
    """Largest k a request may ask for."""
    search_workers: int = 2
    """Threads running FAISS searches (each may use OpenMP inside)."""
    latency_window: int = 10_000
    """How many recent request latencies the p50/p99 in /v1/stats are computed over."""
    faiss_threads: int | None = None
    """OpenMP threads per FAISS search, set process-wide by `serve` (None: FAISS's default, all
    cores). On small CPU boxes serving small batches, 1 avoids OpenMP spin-waits stealing the
    cores the event loop needs."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServiceConfig.port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_k", "search_workers", "latency_window", "faiss_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ServiceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.token is not None and not self.token.strip():
            raise ValueError("ServiceConfig.token is empty; pass a real token or none at all")
        if not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"refusing to bind the index service to non-loopback host {self.host!r} without a token: "
                f"pass --token (or set {TOKEN_ENV}) so clients must authenticate, or bind 127.0.0.1"
            )


class RequestError(Exception):
    """A bad request: becomes a 4xx JSON answer carrying `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Served:
    """One named index and its counters."""

    name: str
    index: VectorIndex
    latency_window: int
    requests: int = 0
    queries: int = 0
    latencies_ms: deque[float] = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # GPU FAISS indexes must not be searched from two threads at once; CPU ones may.
    search_lock: threading.Lock | None = field(init=False)

    def __post_init__(self) -> None:
        self.latencies_ms = deque(maxlen=self.latency_window)
        self.search_lock = threading.Lock() if self.index.on_gpu else None

    def record(self, rows: int, latency_ms: float) -> None:
        with self.lock:
            self.requests += 1
            self.queries += rows
            self.latencies_ms.append(latency_ms)

    def stats(self) -> dict:
        with self.lock:
            latencies = np.fromiter(self.latencies_ms, dtype=np.float64)
            requests, queries = self.requests, self.queries
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies.size else (None, None)
        return {
            "count": self.index.count,
            "dim": self.index.dim,
            "kind": self.index.config.kind,
            "metric": self.index.config.metric,
            "fingerprint": self.index.fingerprint,
            "on_gpu": self.index.on_gpu,
            "requests": requests,
            "queries": queries,
            "p50_ms": None if p50 is None else round(float(p50), 3),
            "p99_ms": None if p99 is None else round(float(p99), 3),
        }

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None, dedup: float | None):
        with self.search_lock or nullcontext():
            return self.index.search(queries, k, exclude_ids=exclude, dedup_threshold=dedup)


def _int_param(raw: str | None, name: str) -> int:
    if raw is None:
        raise RequestError(400, f"missing required parameter '{name}'")
    try:
        return int(raw)
    except ValueError:
        raise RequestError(400, f"parameter '{name}' must be an integer, got {raw!r}") from None


def parse_knn_header(
    params: Mapping[str, str], headers: Mapping[str, str], dim: int, config: ServiceConfig
) -> tuple[int, bool, float | None, int]:
    """Check k, dim, exclude and dedup before the body is read; returns (k, exclude, dedup, row_bytes)."""
    k = _int_param(params.get("k"), "k")
    if k < 1:
        raise RequestError(400, f"k must be >= 1, got {k}")
    if k > config.max_k:
        raise RequestError(400, f"k={k} exceeds this server's max_k={config.max_k}")
    header_dim, param_dim = headers.get("x-dim"), params.get("dim")
    if header_dim is not None and param_dim is not None and header_dim.strip() != param_dim.strip():
        raise RequestError(400, f"X-Dim header ({header_dim}) and dim parameter ({param_dim}) disagree")
    req_dim = _int_param(header_dim if header_dim is not None else param_dim, "dim (or header X-Dim)")
    if req_dim != dim:
        raise RequestError(400, f"dimension mismatch: the index has dim {dim}, the request says {req_dim}")
    exclude_flag = params.get("exclude", "0")
    if exclude_flag not in ("0", "1"):
        raise RequestError(400, f"parameter 'exclude' must be 0 or 1, got {exclude_flag!r}")
    dedup = None
    if "dedup" in params:
        try:
            dedup = float(params["dedup"])
        except ValueError:
            raise RequestError(400, f"parameter 'dedup' must be a number, got {params['dedup']!r}") from None
        if not math.isfinite(dedup):
            raise RequestError(400, f"parameter 'dedup' must be finite, got {params['dedup']!r}")
    exclude = exclude_flag == "1"
    return k, exclude, dedup, 4 * dim + (8 if exclude else 0)


def parse_knn_body(
    body: bytes, dim: int, exclude: bool, row_bytes: int, max_batch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Split a request body into float32 queries [Q, dim] and optional int64 exclude ids [Q]."""
    if not body:
        raise RequestError(400, "empty batch: the request body holds no query rows")
    if len(body) % row_bytes:
        layout = f"4*dim{' + 8' if exclude else ''} = {row_bytes}"
        raise RequestError(
            400,
            f"payload is {len(body)} bytes, not a multiple of the row size ({layout} bytes for dim {dim})",
        )
    rows = len(body) // row_bytes
    if rows > max_batch:
        raise RequestError(413, f"batch of {rows} rows exceeds this server's max_batch={max_batch}")
    queries = np.frombuffer(body, dtype="<f4", count=rows * dim).reshape(rows, dim)
    finite = np.isfinite(queries).all(axis=1)
    if not finite.all():
        raise RequestError(400, f"queries contain NaN or inf (first bad row: {int(np.argmin(finite))})")
    exclude_ids = np.frombuffer(body, dtype="<i8", offset=rows * dim * 4) if exclude else None
    return queries, exclude_ids


class BearerAuth:
    """ASGI middleware: 401 unless the request carries `Authorization: Bearer <token>`.

    Plain ASGI rather than `@app.middleware("http")`, whose per-request stream plumbing costs
    about a millisecond on small requests.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(
                    {"error": "missing or wrong bearer token (send 'Authorization: Bearer TOKEN')"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(indexes: Mapping[str, VectorIndex], config: ServiceConfig) -> FastAPI:
    """The ASGI app serving `indexes` by name."""
    served = {name: _Served(name, index, config.latency_window) for name, index in indexes.items()}
    pool = ThreadPoolExecutor(max_workers=config.search_workers, thread_name_prefix="index-search")
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="rlalign index service", lifespan=lifespan, docs_url=None, redoc_url=None)

    if config.token:
        app.add_middleware(BearerAuth, token=config.token)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "indexes": sorted(served)}

    @app.get("/v1/stats")
    async def stats() -> dict:
        return {
            "uptime_s": round(time.monotonic() - started, 3),
            "indexes": {name: entry.stats() for name, entry in served.items()},
        }

    @app.post("/v1/indexes/{name}/knn")
    async def knn(name: str, request: Request) -> Response:
        t0 = time.perf_counter()
        entry = served.get(name)
        if entry is None:
            raise RequestError(404, f"unknown index {name!r}; this server has {sorted(served)}")
        dim = entry.index.dim
        k, exclude, dedup, row_bytes = parse_knn_header(request.query_params, request.headers, dim, config)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_batch * row_bytes:
            raise RequestError(
                413, f"payload of {declared} bytes exceeds max_batch={config.max_batch} rows of dim {dim}"
            )
        body = await request.body()
        queries, exclude_ids = parse_knn_body(body, dim, exclude, row_bytes, config.max_batch)
        loop = asyncio.get_running_loop()
        try:
            scores, ids = await loop.run_in_executor(pool, entry.search, queries, k, exclude_ids, dedup)
        except ValueError as err:  # e.g. a zero-norm query under cosine
            raise RequestError(400, str(err)) from None
        entry.record(queries.shape[0], (time.perf_counter() - t0) * 1000.0)
        if BINARY in request.headers.get("accept", ""):
            payload = scores.astype("<f4").tobytes() + ids.astype("<i8").tobytes()
            headers = {"X-Rows": str(scores.shape[0]), "X-K": str(k)}
            return Response(payload, media_type=BINARY, headers=headers)
        json_scores = [[None if math.isinf(s) else s for s in row] for row in scores.tolist()]
        return JSONResponse({"k": k, "scores": json_scores, "ids": ids.tolist()})

    return app


def load_indexes(index_dirs: Mapping[str, str | os.PathLike]) -> dict[str, VectorIndex]:
    """Load each saved index directory under its name."""
    if not index_dirs:
        raise ValueError("no indexes to serve: give at least one NAME=DIR")
    indexes = {}
    for name, directory in index_dirs.items():
        if not name or "/" in name:
            raise ValueError(f"index name {name!r} must be non-empty and contain no '/'")
        indexes[name] = VectorIndex.load(directory)
        logger.info("loaded index %r from %s (%d vectors)", name, directory, indexes[name].count)
    return indexes


def _make_server(index_dirs: Mapping[str, str | os.PathLike], config: ServiceConfig) -> uvicorn.Server:
    app = create_app(load_indexes(index_dirs), config)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="warning", access_log=False, lifespan="on"
    )
    return uvicorn.Server(uv_config)


def serve(
    index_dirs: Mapping[str, str | os.PathLike],
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    max_batch: int = 4096,
    **options,
) -> None:
    """Serve the indexes in `index_dirs` until interrupted. `options` go to `ServiceConfig`."""
    config = ServiceConfig(host=host, port=port, token=token, max_batch=max_batch, **options)
    if config.faiss_threads is not None:
        faiss.omp_set_num_threads(config.faiss_threads)
    server = _make_server(index_dirs, config)
    logger.info("index service on http://%s:%d serving %s", host, port, sorted(index_dirs))
    server.run()


@dataclass
class ServiceHandle:
    """A service running in a background thread; `stop()` shuts it down."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            logger.warning("index service thread did not stop within %.1fs", timeout)

    def __enter__(self) -> ServiceHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _bind_tcp(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (host, port).

    The protocol is given explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose
    proto is IPPROTO_TCP, and uvicorn's own `bind_socket` leaves it 0, which costs every
    keep-alive response a ~40 ms Nagle/delayed-ACK stall.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def start_in_thread(
    index_dirs: Mapping[str, str | os.PathLike],
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_batch: int = 4096,
    startup_timeout: float = 20.0,
    **options,
) -> ServiceHandle:
    """Start the service in a daemon thread and return once /healthz answers.

    The socket is bound here (port 0 = a free port chosen by the OS), so the URL is known
    up front and there is no race between picking a port and binding it.
    """
    config = ServiceConfig(host=host, port=port, token=token, max_batch=max_batch, **options)
    server = _make_server(index_dirs, config)
    sock = _bind_tcp(config.host, config.port)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="index-service", daemon=True
    )
    thread.start()
    handle = ServiceHandle(url=url, server=server, thread=thread, sock=sock)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"index service at {url} exited during startup (see the log above)")
        try:
            if httpx.get(f"{url}/healthz", headers=headers, timeout=1.0).status_code == 200:
                return handle
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"index service at {url} did not answer /healthz within {startup_timeout:.0f}s")


def _parse_index_args(values: list[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            parser.error(f"--index expects NAME=DIR, got {value!r}")
        if name in dirs:
            parser.error(f"--index name {name!r} given twice")
        dirs[name] = Path(directory)
    return dirs


def main_serve(argv: list[str]) -> int:
    """`rlalign index serve --index NAME=DIR [--index ...] [--host H] [--port P] [--token T]`."""
    parser = argparse.ArgumentParser(prog="rlalign index serve", description="Serve saved vector indexes.")
    parser.add_argument("--index", action="append", required=True, metavar="NAME=DIR", help="repeatable")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs a token)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token (default: ${TOKEN_ENV})"
    )
    parser.add_argument("--max-batch", type=int, default=4096, help="most query rows per request")
    parser.add_argument("--max-k", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2, help="search threads")
    parser.add_argument("--faiss-threads", type=int, help="OpenMP threads per search (default: all cores)")
    args = parser.parse_args(argv)
    index_dirs = _parse_index_args(args.index, parser)
    try:
        serve(
            index_dirs,
            host=args.host,
            port=args.port,
            token=args.token,
            max_batch=args.max_batch,
            max_k=args.max_k,
            search_workers=args.workers,
            faiss_threads=args.faiss_threads,
        )
    except (ValueError, FileNotFoundError) as err:
        logger.error("index serve: %s", err)
        return 2
    return 0
