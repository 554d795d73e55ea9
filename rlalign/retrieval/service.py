"""The index service: named `VectorIndex`es behind a small HTTP API (FastAPI + uvicorn).

Content types, per route (anything else is answered 415 with JSON {"error": ...} naming the
expected type; the server keeps serving):

    POST /v1/indexes/{name}/knn   request body: application/octet-stream (parameters such as
                                  `; charset=binary` are ignored; a request with no Content-Type is
                                  read as octet-stream). JSON, form (x-www-form-urlencoded,
                                  multipart/form-data) and text bodies are refused: `curl
                                  --data-binary` sends a form type unless given
                                  `-H 'Content-Type: application/octet-stream'`.
                                  Answer: application/octet-stream when `Accept` names it, else
                                  application/json.
    GET  /healthz, GET /v1/stats  no request body (one with a body is refused, whatever its type).
                                  Answer: application/json.

Wire format of `POST /v1/indexes/{name}/knn` (one clean binary design, no JSON arrays of floats):

    query params  k=INT (required, 1..max_k), dim=INT (or header X-Dim; required),
                  exclude=1 (optional: the body carries per-query ids to drop),
                  dedup=FLOAT (optional: near-duplicate threshold, see `VectorIndex.search`)
    body          Q*dim little-endian float32 (the queries, row-major), then, with exclude=1,
                  Q little-endian int64 (one id per query to drop, -1 for none).
                  Q is implied by the length, which must be a multiple of 4*dim (+8 with exclude).
                  Q <= max_batch and Q*k <= max_results, else 413 naming the limit.
    response      with `Accept: application/octet-stream`: Q*k little-endian float32 scores then
                  Q*k little-endian int64 ids, headers X-Rows=Q and X-K=k (what `IndexClient` uses);
                  otherwise JSON {"k": k, "scores": [[...]], "ids": [[...]]} with padded slots as
                  score null / id -1 (JSON has no -inf).
    errors        4xx with JSON {"error": "..."}; the server keeps serving.

`GET /healthz` answers {"status": "ok", "indexes": [...], "limits": {...}}; `GET /v1/stats` gives
per-index count, dim, kind, metric, requests and queries served, and p50/p99 latency (ms) over the
last `latency_window` requests.

Security: binds 127.0.0.1 by default. A non-loopback host needs a token, and with a token set every
request (health included) must carry `Authorization: Bearer TOKEN`, else 401.

Keeping small requests fast next to big ones: the event loop only parses requests and hands over
finished bytes. A request's search *and* the encoding of its answer run in a thread pool (JSON is
encoded a few thousand numbers at a time, so the encoding thread gives the GIL back often).
Requests with more than `bulk_results` result slots (Q*k) go to their own one-thread lane, so big
jobs queue behind each other, never in front of small ones. CPU FAISS indexes are safe to search
concurrently; GPU ones are serialised per index.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
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
    max_results: int = 262_144
    """Most result slots (query rows x k) in one request; larger requests get 413. The default
    (e.g. 256 queries at k=1024, 4096 at k=64) keeps one answer within ~3 MB binary / ~7 MB JSON."""
    bulk_results: int = 16_384
    """Requests with more result slots than this are searched and encoded in a one-thread lane of
    their own, so they never hold up the `search_workers` threads that small requests use."""
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
        positive = ("max_batch", "max_k", "max_results", "bulk_results", "search_workers", "latency_window")
        for name in (*positive, "faiss_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ServiceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_results < self.max_k:
            raise ValueError(
                f"ServiceConfig.max_results={self.max_results} is below max_k={self.max_k}: "
                "a single query at max_k would always be refused"
            )
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

    def answer(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None, dedup: float | None, binary: bool
    ) -> bytes:
        """Search and encode the answer: runs in a worker thread, never on the event loop."""
        try:
            with self.search_lock or nullcontext():
                scores, ids = self.index.search(queries, k, exclude_ids=exclude, dedup_threshold=dedup)
        except ValueError as err:  # e.g. a zero-norm query under cosine
            raise RequestError(400, str(err)) from None
        return (encode_binary if binary else encode_json)(scores, ids, k)


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


def check_results_cap(rows: int, k: int, max_results: int) -> None:
    """413 when `rows` queries at `k` exceed the per-request cap on result slots."""
    if rows * k > max_results:
        raise RequestError(
            413,
            f"{rows} queries x k={k} = {rows * k} results exceeds this server's max_results={max_results}",
        )


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


def media_type(headers: Mapping[str, str]) -> str:
    """The request's media type, lower-cased, without parameters ('' when there is no Content-Type)."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_binary_body(headers: Mapping[str, str], route: str) -> None:
    """415 unless the body is declared octet-stream (or not declared at all)."""
    given = media_type(headers)
    if given not in ("", BINARY):
        raise RequestError(
            415,
            f"{route} takes Content-Type {BINARY} (Q*dim little-endian float32, see the service docs), "
            f"got {given!r}",
        )


def check_no_body(headers: Mapping[str, str], route: str) -> None:
    """415 when a body-less route is sent a body, so a misdirected payload is not silently dropped."""
    length = headers.get("content-length", "0").strip()
    if "transfer-encoding" in headers or length not in ("", "0"):
        given = media_type(headers) or "no Content-Type"
        raise RequestError(415, f"{route} takes no request body, got one ({given!r})")


_JSON_BLOCK = 8192
"""Result slots per `json.dumps` call: each call holds the GIL, so short ones let the event loop in."""


def _json_rows(values: np.ndarray, rows_per_block: int) -> bytes:
    """`values` [Q, k] as the JSON rows `[..],[..]` (no outer brackets), non-finite floats as null."""
    parts = []
    for start in range(0, values.shape[0], rows_per_block):
        text = json.dumps(values[start : start + rows_per_block].tolist(), separators=(",", ":"))[1:-1]
        if values.dtype.kind == "f":
            text = text.replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null")
        parts.append(text.encode())
    return b",".join(parts)


def encode_json(scores: np.ndarray, ids: np.ndarray, k: int) -> bytes:
    """The JSON answer {"k", "scores", "ids"}, built a block of rows at a time."""
    rows_per_block = max(1, _JSON_BLOCK // k)
    return b"".join(
        (
            b'{"k":%d,"scores":[' % k,
            _json_rows(scores, rows_per_block),
            b'],"ids":[',
            _json_rows(ids, rows_per_block),
            b"]}",
        )
    )


def encode_binary(scores: np.ndarray, ids: np.ndarray, k: int) -> bytes:
    """The binary answer: Q*k little-endian float32 scores, then Q*k little-endian int64 ids."""
    return scores.astype("<f4").tobytes() + ids.astype("<i8").tobytes()


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
    bulk_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-bulk")
    limits = {"max_batch": config.max_batch, "max_k": config.max_k, "max_results": config.max_results}
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for executor in (pool, bulk_pool):
            executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="rlalign index service", lifespan=lifespan, docs_url=None, redoc_url=None)

    if config.token:
        app.add_middleware(BearerAuth, token=config.token)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict:
        check_no_body(request.headers, "GET /healthz")
        return {"status": "ok", "indexes": sorted(served), "limits": limits}

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict:
        check_no_body(request.headers, "GET /v1/stats")
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
        check_binary_body(request.headers, f"POST /v1/indexes/{name}/knn")
        dim = entry.index.dim
        k, exclude, dedup, row_bytes = parse_knn_header(request.query_params, request.headers, dim, config)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():  # refuse before reading a body we would not serve
            if int(declared) > config.max_batch * row_bytes:
                raise RequestError(
                    413, f"payload of {declared} bytes exceeds max_batch={config.max_batch} rows of dim {dim}"
                )
            check_results_cap(int(declared) // row_bytes, k, config.max_results)
        body = await request.body()
        queries, exclude_ids = parse_knn_body(body, dim, exclude, row_bytes, config.max_batch)
        rows = queries.shape[0]
        check_results_cap(rows, k, config.max_results)
        binary = BINARY in request.headers.get("accept", "")
        lane = bulk_pool if rows * k > config.bulk_results else pool
        payload = await asyncio.get_running_loop().run_in_executor(
            lane, entry.answer, queries, k, exclude_ids, dedup, binary
        )
        entry.record(rows, (time.perf_counter() - t0) * 1000.0)
        if binary:
            return Response(payload, media_type=BINARY, headers={"X-Rows": str(rows), "X-K": str(k)})
        return Response(payload, media_type="application/json")

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
    parser.add_argument(
        "--max-results", type=int, default=ServiceConfig.max_results, help="most queries x k per request"
    )
    parser.add_argument(
        "--bulk-results",
        type=int,
        default=ServiceConfig.bulk_results,
        help="requests with more queries x k than this run in their own one-thread lane",
    )
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
            max_results=args.max_results,
            bulk_results=args.bulk_results,
            search_workers=args.workers,
            faiss_threads=args.faiss_threads,
        )
    except (ValueError, FileNotFoundError) as err:
        logger.error("index serve: %s", err)
        return 2
    return 0
