"""The index service over real HTTP on 127.0.0.1: concurrency, bad requests, auth, client retries."""

from __future__ import annotations

import re
import threading
import time

import httpx
import numpy as np
import pytest

from rlalign.retrieval.client import IndexClient, IndexServiceError, main_query
from rlalign.retrieval.index import IndexConfig, VectorIndex
from rlalign.retrieval.service import ServiceConfig, main_serve, start_in_thread

DIM = 32
MAX_BATCH = 64
N_CLIENTS, N_REQUESTS, BATCH, K = 8, 200, 8, 10


@pytest.fixture(scope="module")
def index_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, DIM)).astype(np.float32)
    ids = rng.permutation(5000).astype(np.int64) * 1_000_003 - 7
    VectorIndex.build(x, ids, IndexConfig(metric="ip"), fingerprint="enc-A").save(root / "imgs")
    y = rng.standard_normal((1000, 16)).astype(np.float32)
    VectorIndex.build(y, np.arange(1000), IndexConfig(kind="hnsw", metric="l2", hnsw_m=8)).save(
        root / "small"
    )
    return {"imgs": root / "imgs", "small": root / "small"}


@pytest.fixture(scope="module")
def server(index_dirs):
    handle = start_in_thread(index_dirs, max_batch=MAX_BATCH, search_workers=2)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def local(index_dirs):
    return VectorIndex.load(index_dirs["imgs"])


def _post(url, name="imgs", body=b"", params=None, headers=None):
    headers = {"X-Dim": str(DIM), **(headers or {})}
    return httpx.post(
        f"{url}/v1/indexes/{name}/knn", content=body, params=params or {"k": K}, headers=headers
    )


def _assert_still_serving(url, local):
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    q = np.random.default_rng(99).standard_normal((3, DIM)).astype(np.float32)
    with IndexClient(url, retries=0) as client:
        scores, ids = client.knn("imgs", q, K)
    ref_scores, ref_ids = local.search(q, K)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)


def test_concurrent_clients_get_in_process_answers(server, local):
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((N_CLIENTS, N_REQUESTS, BATCH, DIM)).astype(np.float32)
    excludes = local.ids[rng.integers(0, local.count, (N_CLIENTS, N_REQUESTS, BATCH))]
    answers: list[list] = [[] for _ in range(N_CLIENTS)]
    latencies_ms: list[list[float]] = [[] for _ in range(N_CLIENTS)]
    errors: list[BaseException] = []
    before = IndexClient(server.url).stats()["indexes"]["imgs"]

    def run(c: int) -> None:
        try:
            with IndexClient(server.url, timeout=30, retries=0) as client:
                for r in range(N_REQUESTS):
                    exclude = excludes[c, r] if r % 2 else None  # half the requests drop an id per query
                    t0 = time.perf_counter()
                    answers[c].append(client.knn("imgs", queries[c, r], K, exclude_ids=exclude))
                    latencies_ms[c].append((time.perf_counter() - t0) * 1000)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(N_CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert not errors, errors[0]
    assert [len(a) for a in answers] == [N_REQUESTS] * N_CLIENTS  # nothing dropped

    for c in range(N_CLIENTS):
        for r, (scores, ids) in enumerate(answers[c]):
            exclude = excludes[c, r] if r % 2 else None
            ref_scores, ref_ids = local.search(queries[c, r], K, exclude_ids=exclude)
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(scores, ref_scores)
            if exclude is not None:
                assert not (ids == exclude[:, None]).any()

    after = IndexClient(server.url).stats()["indexes"]["imgs"]
    n_requests = N_CLIENTS * N_REQUESTS
    assert after["requests"] - before["requests"] == n_requests
    assert after["queries"] - before["queries"] == n_requests * BATCH
    assert after["p50_ms"] is not None and after["p99_ms"] >= after["p50_ms"]
    p50, p99 = np.percentile(np.concatenate(latencies_ms), [50, 99])
    print(
        f"\n{N_CLIENTS} clients x {N_REQUESTS} requests x {BATCH} queries in {wall:.2f}s "
        f"({n_requests / wall:.0f} req/s): client p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
        f"server p50 {after['p50_ms']:.2f} ms, p99 {after['p99_ms']:.2f} ms"
    )


def _rows(n, dim=DIM, fill=None):
    rows = np.random.default_rng(5).standard_normal((n, dim)).astype("<f4")
    if fill is not None:
        rows[-1, 0] = fill
    return rows.tobytes()


BAD_REQUESTS = [
    (
        "wrong dim",
        dict(body=_rows(2, 16), headers={"X-Dim": "16"}),
        400,
        "the index has dim 32, the request says 16",
    ),
    ("no dim", dict(body=_rows(2), headers={"X-Dim": None}), 400, "missing required parameter 'dim"),
    ("dims disagree", dict(body=_rows(2), params={"k": K, "dim": 16}), 400, "disagree"),
    ("NaN", dict(body=_rows(3, fill=np.nan)), 400, r"NaN or inf \(first bad row: 2\)"),
    ("inf", dict(body=_rows(1, fill=np.inf)), 400, "NaN or inf"),
    ("zero norm", dict(body=np.zeros((1, DIM), "<f4").tobytes()), 400, "zero norm"),
    ("empty batch", dict(body=b""), 400, "empty batch"),
    ("oversized", dict(body=_rows(MAX_BATCH + 1)), 413, f"max_batch={MAX_BATCH}"),
    ("ragged payload", dict(body=_rows(2)[:-2]), 400, r"not a multiple of the row size \(4\*dim = 128"),
    ("ragged with exclude", dict(body=_rows(2), params={"k": K, "exclude": 1}), 400, r"4\*dim \+ 8 = 136"),
    ("unknown index", dict(name="nope", body=_rows(1)), 404, r"unknown index 'nope'.*\['imgs', 'small'\]"),
    ("k zero", dict(body=_rows(1), params={"k": 0}), 400, "k must be >= 1, got 0"),
    ("k negative", dict(body=_rows(1), params={"k": -3}), 400, "k must be >= 1, got -3"),
    ("k not a number", dict(body=_rows(1), params={"k": "ten"}), 400, "'k' must be an integer"),
    ("k missing", dict(body=_rows(1), params={}), 400, "missing required parameter 'k'"),
    ("k too large", dict(body=_rows(1), params={"k": 5000}), 400, "max_k=1024"),
    (
        "bad exclude flag",
        dict(body=_rows(1), params={"k": K, "exclude": "yes"}),
        400,
        "'exclude' must be 0 or 1",
    ),
    ("bad dedup", dict(body=_rows(1), params={"k": K, "dedup": "nan"}), 400, "'dedup' must be finite"),
]


@pytest.mark.parametrize(
    ("what", "request_kw", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_4xx_and_server_keeps_serving(server, local, what, request_kw, status, message):
    kw = dict(request_kw)
    headers = {k: v for k, v in {"X-Dim": str(DIM), **kw.pop("headers", {})}.items() if v is not None}
    response = httpx.post(
        f"{server.url}/v1/indexes/{kw.pop('name', 'imgs')}/knn",
        content=kw.pop("body"),
        params=kw.pop("params", {"k": K}),
        headers=headers,
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    assert re.search(message, response.json()["error"]), response.json()["error"]
    _assert_still_serving(server.url, local)


def test_client_surfaces_4xx_without_retrying(server):
    with IndexClient(server.url, retries=3, backoff=5.0) as client:
        with pytest.raises(IndexServiceError, match="400: dimension mismatch") as err:
            client.knn("imgs", np.ones((2, 7), np.float32), K)
        assert err.value.status == 400 and err.value.attempts == 1
        with pytest.raises(IndexServiceError, match="404: unknown index 'nope'") as err:
            client.knn("nope", np.ones((2, DIM), np.float32), K)
        assert err.value.attempts == 1  # a 4xx is never retried


def test_exclude_dedup_and_json_over_http(server, local, index_dirs):
    q = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)
    exclude = local.ids[:4]
    with IndexClient(server.url) as client:
        got = client.knn("imgs", q, K, exclude_ids=exclude, dedup_threshold=0.5)
        assert client.health()["indexes"] == ["imgs", "small"]
        stats = client.stats()["indexes"]
    for a, b in zip(got, local.search(q, K, exclude_ids=exclude, dedup_threshold=0.5)):
        np.testing.assert_array_equal(a, b)
    assert stats["imgs"]["count"] == 5000 and stats["imgs"]["dim"] == DIM and stats["imgs"]["kind"] == "flat"
    assert stats["small"]["kind"] == "hnsw" and stats["small"]["metric"] == "l2"

    # JSON answer (no binary Accept) for curl users; padded slots are null / -1.
    small = VectorIndex.load(index_dirs["small"])
    response = httpx.post(
        f"{server.url}/v1/indexes/small/knn",
        content=np.ones((1, 16), "<f4").tobytes(),
        params={"k": 3, "dim": 16, "dedup": 1e9},  # l2: everything within 1e9 is a "duplicate"
    )
    assert response.status_code == 200
    assert response.json() == {"k": 3, "scores": [[None] * 3], "ids": [[-1] * 3]}
    ref_scores, ref_ids = small.search(np.ones((2, 16), np.float32), 3)
    response = httpx.post(
        f"{server.url}/v1/indexes/small/knn?k=3&dim=16", content=np.ones((2, 16), "<f4").tobytes()
    )
    assert response.json()["ids"] == ref_ids.tolist()
    np.testing.assert_array_equal(np.array(response.json()["scores"], np.float32), ref_scores)


def test_non_loopback_bind_without_token_is_refused(index_dirs, monkeypatch):
    with pytest.raises(ValueError, match="refusing to bind the index service to non-loopback host '0.0.0.0'"):
        start_in_thread(index_dirs, host="0.0.0.0")
    with pytest.raises(ValueError, match="without a token"):
        ServiceConfig(host="10.1.2.3")
    ServiceConfig(host="0.0.0.0", token="t0ken")  # allowed with a token
    ServiceConfig(host="::1")  # loopback is fine without one
    monkeypatch.delenv("RLALIGN_INDEX_TOKEN", raising=False)
    assert main_serve(["--index", f"imgs={index_dirs['imgs']}", "--host", "0.0.0.0"]) == 2


def test_token_auth(index_dirs, local):
    with start_in_thread(index_dirs, token="s3cret") as secured:
        assert httpx.get(f"{secured.url}/healthz").status_code == 401
        wrong = httpx.get(f"{secured.url}/v1/stats", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
        assert _post(secured.url, body=_rows(1)).status_code == 401
        with IndexClient(secured.url, token="wrong", retries=2, backoff=5.0) as client:
            with pytest.raises(IndexServiceError, match="401") as err:
                client.health()
            assert err.value.attempts == 1
        q = np.ones((2, DIM), np.float32)
        with IndexClient(secured.url, token="s3cret") as client:
            assert client.health()["status"] == "ok"
            scores, ids = client.knn("imgs", q, K)
        np.testing.assert_array_equal(ids, local.search(q, K)[1])


def test_client_against_stopped_server_fails_clearly(index_dirs):
    handle = start_in_thread(index_dirs)
    url = handle.url
    handle.stop()
    with (
        IndexClient(url, retries=2, backoff=0.01, timeout=2.0) as client,
        pytest.raises(IndexServiceError, match=rf"index service at {url} failed .* after 3 attempts") as err,
    ):
        client.knn("imgs", np.ones((1, DIM), np.float32), K)
    assert err.value.attempts == 3 and err.value.status is None and err.value.url == url


def test_client_retries_5xx_then_succeeds():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": "warming up"})
        return httpx.Response(200, json={"status": "ok"})

    client = IndexClient("http://index.test", retries=3, backoff=0.001)
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    assert client.health() == {"status": "ok"} and len(calls) == 3
    calls.clear()
    client.retries = 1
    with pytest.raises(IndexServiceError, match="after 2 attempts; last error: HTTP 503: warming up"):
        client.health()


def test_main_query_cli(server, local, tmp_path, capsys):
    q = np.random.default_rng(4).standard_normal((3, DIM)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "res.npz"
    args = ["--url", server.url, "--index", "imgs", "--vectors", str(tmp_path / "q.npy"), "-k", "5"]
    assert main_query([*args, "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as result:
        ref_scores, ref_ids = local.search(q, 5)
        np.testing.assert_array_equal(result["ids"], ref_ids)
        np.testing.assert_array_equal(result["scores"], ref_scores)
    assert main_query(args) == 0
    assert '"ids": [[' in capsys.readouterr().out
    assert main_query([*args[:3], "nope", *args[4:]]) == 1
