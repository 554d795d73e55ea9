"""The index service over real HTTP on 127.0.0.1: concurrency, bad requests, auth, client retries."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import numpy as np
import pytest

from rlalign.retrieval.client import BINARY, IndexClient, IndexServiceError, main_query
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


JSON_BODY = json.dumps({"queries": [[0.25] * DIM] * 3}).encode()
JSON_BODY += b" " * (-len(JSON_BODY) % (4 * DIM))  # a whole number of float32 rows: parses as one
FORM = "application/x-www-form-urlencoded"  # what `curl --data-binary` sends unless told otherwise
WRONG_TYPES = [
    ("json to binary route", "knn", "application/json", JSON_BODY, {"Accept": "application/octet-stream"}),
    ("json, json answer", "knn", "application/json; charset=utf-8", JSON_BODY, {}),
    ("form to binary route", "knn", FORM, _rows(2), {"Accept": "application/octet-stream"}),
    ("form, json answer", "knn", FORM, _rows(2), {}),
    ("multipart form", "knn", "multipart/form-data; boundary=x", _rows(2), {}),
    ("text", "knn", "text/plain", _rows(2), {}),
    ("form to stats", "stats", FORM, b"k=10&dim=32", {}),
    ("form to healthz", "healthz", FORM, b"k=10&dim=32", {}),
]


@pytest.mark.parametrize(
    ("what", "route", "content_type", "body", "headers"), WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES]
)
def test_wrong_content_type_gets_415_and_server_keeps_serving(
    server, local, what, route, content_type, body, headers
):
    headers = {"Content-Type": content_type, **headers}
    if route == "knn":
        response = _post(server.url, body=body, headers=headers)
        expected = "application/octet-stream"
    else:
        path = {"stats": "/v1/stats", "healthz": "/healthz"}[route]
        response = httpx.request("GET", f"{server.url}{path}", content=body, headers=headers)
        expected = "no request body"
    assert response.status_code == 415, (response.status_code, response.text[:200])
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert expected in error and content_type.split(";")[0] in error, error
    _assert_still_serving(server.url, local)
    # The documented type passes whatever its case and parameters.
    q = np.random.default_rng(8).standard_normal((2, DIM)).astype("<f4")
    ok = _post(server.url, body=q.tobytes(), headers={"Content-Type": "Application/Octet-Stream; x=1"})
    assert ok.status_code == 200 and ok.json()["ids"] == local.search(q, K)[1].tolist()


def test_results_cap_gets_413_naming_it(index_dirs, local):
    cap = 2048  # query rows x k
    q = np.random.default_rng(9).standard_normal((205, DIM)).astype("<f4")
    with start_in_thread(index_dirs, max_results=cap) as capped:
        for rows, k in ((204, 10), (2, 1024)):  # 2040 and 2048 result slots: at or under the cap
            ok = _post(capped.url, body=q[:rows].tobytes(), params={"k": k})
            assert ok.status_code == 200, ok.text
            assert ok.json()["ids"] == local.search(q[:rows], k)[1].tolist()
        for rows, k, body_kw in (
            (205, 10, {}),  # Content-Length known: refused before the body is read
            (3, 1024, {}),
            (205, 10, {"chunked": True}),  # no Content-Length: refused once the body is in
        ):
            body = q[:rows].tobytes()
            content = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if body_kw else body
            response = httpx.post(
                f"{capped.url}/v1/indexes/imgs/knn", content=content, params={"k": k, "dim": DIM}
            )
            assert response.status_code == 413, response.text[:200]
            assert response.json()["error"] == (
                f"{rows} queries x k={k} = {rows * k} results exceeds this server's max_results={cap}"
            )
        _assert_still_serving(capped.url, local)
    with pytest.raises(ValueError, match="max_results=100 is below max_k=1024"):
        ServiceConfig(max_results=100)


def _blocking_search(monkeypatch, rows: int) -> tuple[threading.Event, threading.Event]:
    """Make `VectorIndex.search` of a `rows`-row batch signal `started`, then wait for `release`."""
    started, release = threading.Event(), threading.Event()
    original = VectorIndex.search

    def search(self, queries, k, **kw):
        if np.asarray(queries).shape[0] == rows:
            started.set()
            release.wait(timeout=30)
        return original(self, queries, k, **kw)

    monkeypatch.setattr(VectorIndex, "search", search)
    return started, release


def _small_requests_during_huge(url: str, huge: dict, huge_started: threading.Event, local) -> list:
    """Send one huge request and, once `huge_started` is set, 16 small ones from 8 threads (connected
    beforehand). Returns the order in which answers arrived: ("small", i) for each small answer,
    "huge" when the huge one's response headers came."""
    arrivals: list = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    small_q = np.random.default_rng(12).standard_normal((16, 4, DIM)).astype(np.float32)
    clients = [IndexClient(url, retries=0, timeout=60) for _ in range(8)]
    for client in clients:
        client.health()  # connect now, so that the small requests start at once

    def send_huge() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/indexes/imgs/knn", timeout=60, **huge) as response:
                with lock:
                    arrivals.append("huge")
                assert response.status_code == 200
                response.read()
        except BaseException as err:
            errors.append(err)

    def send_small(t: int) -> None:
        try:
            assert huge_started.wait(timeout=30), "the huge request never reached the search"
            for i in (2 * t, 2 * t + 1):
                scores, ids = clients[t].knn("imgs", small_q[i], K)
                with lock:
                    arrivals.append(("small", i))
                np.testing.assert_array_equal(ids, local.search(small_q[i], K)[1])
        except BaseException as err:
            errors.append(err)

    smalls = [threading.Thread(target=send_small, args=(t,)) for t in range(8)]
    for t in smalls:
        t.start()
    huge_thread = threading.Thread(target=send_huge)
    huge_thread.start()
    return arrivals, errors, smalls, huge_thread


def test_small_requests_overtake_a_huge_search(index_dirs, local, monkeypatch):
    """One search thread, held by a huge (legal) request: small requests still get answered."""
    huge_rows = 256
    started, release = _blocking_search(monkeypatch, huge_rows)
    q = np.random.default_rng(11).standard_normal((huge_rows, DIM)).astype("<f4")
    huge = dict(content=q.tobytes(), params={"k": 1024, "dim": DIM}, headers={"Accept": BINARY})
    with start_in_thread(index_dirs, search_workers=1) as svc:
        arrivals, errors, smalls, huge_thread = _small_requests_during_huge(svc.url, huge, started, local)
        deadline = time.monotonic() + 10
        for t in smalls:  # the huge search is still held: small answers must come anyway
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        release.set()
        huge_thread.join(timeout=60)
    assert not errors, errors[0]
    assert started.is_set()
    assert len(arrivals) == 17 and arrivals[-1] == "huge", arrivals


def test_huge_json_answer_is_built_off_the_event_loop(index_dirs, local, monkeypatch):
    """The search of a huge JSON request is done; while its answer is encoded, small ones pass.
    (2048 x 1024 results: ~70 MB of JSON, long enough to encode that 16 small requests fit in.)"""
    huge_rows, k = 2048, 1024
    searched = threading.Event()
    original = VectorIndex.search

    def search(self, queries, k, **kw):
        out = original(self, queries, k, **kw)
        if np.asarray(queries).shape[0] == huge_rows:
            searched.set()
        return out

    monkeypatch.setattr(VectorIndex, "search", search)
    q = np.random.default_rng(13).standard_normal((huge_rows, DIM)).astype("<f4")
    huge = dict(content=q.tobytes(), params={"k": k, "dim": DIM})
    with start_in_thread(index_dirs, max_results=huge_rows * k) as svc:
        arrivals, errors, smalls, huge_thread = _small_requests_during_huge(svc.url, huge, searched, local)
        for t in [*smalls, huge_thread]:
            t.join(timeout=60)
    assert not errors, errors[0]
    assert len(arrivals) == 17 and arrivals[-1] == "huge", arrivals
