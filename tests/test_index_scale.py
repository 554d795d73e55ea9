"""Index at scale: the torch kNN against FAISS flat (CPU, float32; and half precision rescored), IVF-PQ,
data-chosen IVF cells, loading through `__init__`, and the GPU paths (`gpu`-marked)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from rlalign.config.pairs import IndexConfig
from rlalign.retrieval.index import VectorIndex
from rlalign.retrieval.knn import TorchKNN

DIM = 48


def _data(n: int = 3000, n_q: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    q = rng.standard_normal((n_q, DIM)).astype(np.float32)
    return x, q, np.arange(n, dtype=np.int64) * 7 + 3


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _float64_exact(x: np.ndarray, q: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "ip":
        x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
        scores = q64 @ x64.T
    else:
        scores = -((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_knn_on_cpu_equals_faiss_flat(metric):
    """The torch backend (float32, CPU) gives FAISS flat's ids exactly and its scores to 1e-5, with
    filtering on top; small chunks (base 700 rows, queries 5) merge to the same answer."""
    x, q, ids = _data()
    faiss_flat = VectorIndex.build(x, ids, IndexConfig(metric=metric, device="cpu", exact_backend="faiss"))
    torch_flat = VectorIndex.build(x, ids, IndexConfig(metric=metric, device="cpu", exact_backend="torch"))
    assert torch_flat.placement == "torch-cpu" and faiss_flat.placement == "cpu"
    for kwargs in ({}, {"exclude_ids": ids[:64]}):
        ref_scores, ref_ids = faiss_flat.search(q, 10, **kwargs)
        scores, got = torch_flat.search(q, 10, **kwargs)
        np.testing.assert_array_equal(got, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)

    chunked = TorchKNN(DIM, metric, "cpu", "float32", base_chunk=700, query_chunk=5)
    chunked.add(_unit(x) if metric == "ip" else x)
    ref_scores, ref_pos = _float64_exact(x, q, metric, 10)
    scores, pos = chunked.search(_unit(q) if metric == "ip" else q, 10)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_half_precision_candidates_are_rescored_in_float32(metric):
    """bfloat16 candidates (8 bits of mantissa: many near-ties swap) rescored in float32 give the float64
    exact ids, and float32 scores; the raw bfloat16 top-10 alone does not."""
    x, q, _ = _data(n=4000, n_q=100)
    if metric == "ip":
        x, q = _unit(x), _unit(q)
    knn = TorchKNN(DIM, metric, "cpu", "bfloat16", base_chunk=1500)
    knn.add(x)
    ref_scores, ref_pos = _float64_exact(x, q, metric, 10)
    scores, pos = knn.search(q, 10)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)
    _, raw = knn._top(torch.from_numpy(q), 10)  # the candidate pass alone, no rescoring
    assert not np.array_equal(raw.numpy(), ref_pos)


def test_index_knows_fewer_vectors_than_k_on_torch():
    x, q, ids = _data(n=5)
    index = VectorIndex.build(x, ids, IndexConfig(exact_backend="torch", device="cpu"))
    scores, got = index.search(q[:2], 8)
    assert (got[:, :5] != -1).all() and (got[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_data_chosen_cells():
    """~2 sqrt(N) rounded to a power of two, at most N/39 (hand-computed)."""
    cfg = IndexConfig(kind="ivf")
    assert [cfg.cells(n) for n in (1_000_000, 100_000, 20_000, 1000, 10)] == [2048, 512, 256, 25, 1]
    assert IndexConfig(kind="ivf", nlist=7, nprobe=3).cells(10**6) == 7
    x, _, ids = _data(n=3000)
    index = VectorIndex.build(x, ids, IndexConfig(kind="ivf", nprobe=4))
    assert index.nlist == 76  # 2 * sqrt(3000) = 110 -> 2^7 = 128, above 3000 // 39 = 76


def test_ivfpq_equals_faiss_and_reloads_through_init(tmp_path):
    """IVF-PQ gives FAISS's own IndexIVFPQ answers (same factory, trained on the same vectors), stores
    pq_m bytes per vector plus its list id and our id (8 + 8), and reloads through `__init__`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6000, DIM)).astype(np.float32)
    q = rng.standard_normal((50, DIM)).astype(np.float32)
    index = VectorIndex.build(x, np.arange(6000) + 100, IndexConfig(kind="ivfpq", nlist=16, nprobe=4, pq_m=8))
    peer = faiss.index_factory(DIM, "IVF16,PQ8np", faiss.METRIC_INNER_PRODUCT)
    xn, qn = _unit(x).astype(np.float32), _unit(q).astype(np.float32)
    peer.train(xn)
    peer.add(xn)
    peer.nprobe = 4
    peer_scores, peer_pos = peer.search(qn, 10)
    scores, got = index.search(q, 10)
    np.testing.assert_array_equal(got, peer_pos + 100)
    np.testing.assert_allclose(scores, peer_scores, rtol=1e-6)
    # codes, list id and id per vector, plus the PQ codebooks and the cell centroids shared by all
    shared = (256 * DIM + 16 * DIM) * 4
    assert index.bytes_per_vector() == pytest.approx(8 + 8 + 8 + shared / 6000, abs=0.1)
    index.save(tmp_path / "pq")

    calls = []

    class Counting(VectorIndex):
        def __init__(self, *args, **kwargs):
            calls.append(kwargs.get("faiss_index") is not None)
            super().__init__(*args, **kwargs)

    loaded = Counting.load(tmp_path / "pq")
    assert calls == [True] and loaded.config == index.config and loaded.nlist == 16
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)


def test_pq_width_must_divide_dim():
    with pytest.raises(ValueError, match=r"pq_m \(10\) must divide the vectors' width \(48\)"):
        VectorIndex(DIM, IndexConfig(kind="ivfpq", pq_m=10))


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gpu_torch_knn_equals_exact_cpu(tmp_path, dtype, metric):
    """Exact search on the GPU is the torch kNN (whatever FAISS build is installed): its ids equal the
    float64 CPU result and its scores match to 1e-3; a save loads on the CPU with the same ids."""
    x, q, ids = _data(n=20_000, n_q=300)
    gpu = VectorIndex.build(x, ids, IndexConfig(metric=metric, device="gpu", gpu_dtype=dtype))
    assert gpu.placement == "torch-gpu" and gpu.on_gpu
    ref_scores, ref_pos = _float64_exact(x, q, metric, 10)
    scores, got = gpu.search(q, 10)
    np.testing.assert_array_equal(got, ids[ref_pos])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-3, atol=1e-3)
    gpu.save(tmp_path / "g")
    cpu = VectorIndex.load(tmp_path / "g", device="cpu")
    assert cpu.placement == "cpu"
    np.testing.assert_array_equal(cpu.search(q, 10)[1], got)


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss sees no GPU")
def test_faiss_gpu_ivf_matches_cpu(tmp_path):
    x, q, ids = _data(n=20_000, n_q=300)
    cfg = {"kind": "ivf", "nlist": 64, "nprobe": 64}  # every cell: exact
    cpu = VectorIndex.build(x, ids, IndexConfig(**cfg, device="cpu"))
    gpu = VectorIndex.build(x, ids, IndexConfig(**cfg, device="gpu"))
    assert gpu.placement == "faiss-gpu" and gpu.on_gpu
    np.testing.assert_array_equal(gpu.search(q, 10)[1], cpu.search(q, 10)[1])
    gpu.save(tmp_path / "g")
    np.testing.assert_array_equal(
        VectorIndex.load(tmp_path / "g", device="cpu").search(q, 10)[1], cpu.search(q, 10)[1]
    )
