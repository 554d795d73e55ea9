"""Client for the index service (`rlalign.retrieval.service`), over httpx.

Connection errors, timeouts and 5xx answers are retried a bounded number of times with exponential
backoff; a 4xx is never retried and its server message is surfaced as is. When the retries run out
the error names the URL and the number of attempts, so a dead service fails loudly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np

logger = logging.getLogger(__name__)

BINARY = "application/octet-stream"
TOKEN_ENV = "RLALIGN_INDEX_TOKEN"


class IndexServiceError(RuntimeError):
    """The index service refused a request (`status` set) or could not be reached (`status` None)."""

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class IndexClient:
    """Talks to one index service. Safe to share between threads (httpx.Client pools connections).

    retries: extra attempts after the first, on connection errors, timeouts and 5xx only.
    backoff: seconds before the first retry, doubled for each further one.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(
                f"need retries >= 0, backoff >= 0, timeout > 0; got {retries}, {backoff}, {timeout}"
            )
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IndexClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def stats(self) -> dict:
        return self._request("GET", "/v1/stats").json()

    def knn(
        self,
        name: str,
        queries: np.ndarray,
        k: int,
        exclude_ids: np.ndarray | None = None,
        dedup_threshold: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest neighbours of each query row in index `name`: (scores [Q, k] float32,
        ids [Q, k] int64), padded with -inf / -1. Same semantics as `VectorIndex.search`."""
        q = np.asarray(queries)
        if q.ndim != 2:
            raise ValueError(f"queries must be a 2-D array [Q, D], got shape {q.shape}")
        n_q, dim = q.shape
        body = np.ascontiguousarray(q, dtype="<f4").tobytes()
        params: dict[str, str | int | float] = {"k": k}
        if exclude_ids is not None:
            exclude = np.asarray(exclude_ids)
            if exclude.shape != (n_q,):
                raise ValueError(
                    f"exclude_ids must have shape ({n_q},) (one id per query), got {exclude.shape}"
                )
            body += np.ascontiguousarray(exclude, dtype="<i8").tobytes()
            params["exclude"] = 1
        if dedup_threshold is not None:
            params["dedup"] = repr(float(dedup_threshold))
        response = self._request(
            "POST",
            f"/v1/indexes/{quote(name, safe='')}/knn",
            params=params,
            content=body,
            headers={"X-Dim": str(dim), "Content-Type": BINARY, "Accept": BINARY},
        )
        rows, got_k = int(response.headers["X-Rows"]), int(response.headers["X-K"])
        payload = response.content
        if rows != n_q or len(payload) != rows * got_k * 12:
            raise IndexServiceError(
                f"malformed knn answer from {self.url}: {len(payload)} bytes for {rows}x{got_k} "
                f"(sent {n_q} queries)",
                url=self.url,
                status=response.status_code,
            )
        split = rows * got_k * 4
        scores = np.frombuffer(payload, dtype="<f4", count=rows * got_k).astype(np.float32)
        ids = np.frombuffer(payload, dtype="<i8", offset=split).astype(np.int64)
        return scores.reshape(rows, got_k), ids.reshape(rows, got_k)

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Send with bounded retries on transport errors and 5xx; raise at once on 4xx."""
        attempts = self.retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    return response
                message = _error_message(response)
                if response.status_code < 500:
                    raise IndexServiceError(
                        f"{method} {self.url}{path} -> {response.status_code}: {message}",
                        url=self.url,
                        status=response.status_code,
                        attempts=attempt,
                    )
                last = f"HTTP {response.status_code}: {message}"
            if attempt < attempts:
                delay = self.backoff * 2 ** (attempt - 1)
                where = f"{self.url}{path}"
                logger.warning(
                    "index service %s failed (%s); retry %d/%d in %.2fs",
                    where,
                    last,
                    attempt,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
        raise IndexServiceError(
            f"index service at {self.url} failed {method} {path} after {attempts} attempts; last error: {last}",
            url=self.url,
            attempts=attempts,
        )


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)
    return str(body)


def main_query(argv: list[str]) -> int:
    """`rlalign index query --url URL --index NAME --vectors Q.npy -k 10 [--out result.npz]`."""
    parser = argparse.ArgumentParser(prog="rlalign index query", description="Query a running index service.")
    parser.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8765")
    parser.add_argument("--index", required=True, metavar="NAME", help="index name on the service")
    parser.add_argument("--vectors", required=True, type=Path, help=".npy float array [Q, D]")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--exclude-ids", type=Path, help=".npy int64 array [Q] of ids to drop (-1: none)")
    parser.add_argument("--dedup", type=float, help="near-duplicate threshold (cosine for ip)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"default: ${TOKEN_ENV}")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write scores/ids to this .npz instead of JSON on stdout")
    args = parser.parse_args(argv)
    try:
        queries = np.load(args.vectors, allow_pickle=False)
        exclude = None if args.exclude_ids is None else np.load(args.exclude_ids, allow_pickle=False)
        with IndexClient(args.url, token=args.token, timeout=args.timeout, retries=args.retries) as client:
            scores, ids = client.knn(
                args.index, queries, args.k, exclude_ids=exclude, dedup_threshold=args.dedup
            )
    except (OSError, ValueError, IndexServiceError) as err:
        logger.error("index query: %s", err)
        return 1
    if args.out is not None:
        np.savez(args.out, scores=scores, ids=ids)
        return 0
    json_scores = [[None if np.isinf(s) else s for s in row] for row in scores.tolist()]
    sys.stdout.write(json.dumps({"scores": json_scores, "ids": ids.tolist()}) + "\n")
    return 0
