"""Exact k-nearest-neighbour search in torch: matmul + top-k in chunks, on a GPU or the CPU.

The base vectors live on the device in the search precision (float16 / bfloat16 on a GPU, float32
otherwise). Queries are scored against base chunks of `base_chunk` rows, each chunk's best candidates
merged into a running top list, so no [Q, N] score matrix is ever held. In half precision a query's
best `candidates` (more than k) are rescored in float32 from a float32 copy and re-sorted: the result
equals float32 exact search unless more than `candidates - k` vectors lie within half-precision
rounding (~1e-3 of the score) of the k-th neighbour.

Scores read "higher is closer": the inner product for `ip`, the negative squared distance for `l2`.
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TorchKNN:
    """Exact search over float32 vectors added in order; results are positions 0..N-1."""

    def __init__(
        self,
        dim: int,
        metric: str,
        device: torch.device | str = "cpu",
        dtype: str = "float32",
        *,
        base_chunk: int = 131_072,
        query_chunk: int = 1024,
    ) -> None:
        self.dim = dim
        self.metric = metric
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.base_chunk = base_chunk
        self.query_chunk = query_chunk
        self._base = torch.empty((0, dim), dtype=self.dtype, device=self.device)
        self._exact = torch.empty((0, dim), dtype=torch.float32, device=self.device) if self.half else None
        self._sq_norms = torch.empty(0, dtype=torch.float32, device=self.device)

    @property
    def half(self) -> bool:
        return self.dtype != torch.float32

    @property
    def count(self) -> int:
        return int(self._base.shape[0])

    def add(self, vectors: np.ndarray) -> None:
        """Append float32 vectors [N, D] (already normalised for `ip`)."""
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
        self._base = torch.cat([self._base, x.to(self.dtype)])
        if self._exact is not None:
            self._exact = torch.cat([self._exact, x])
        self._sq_norms = torch.cat([self._sq_norms, (x * x).sum(1)])

    @torch.no_grad()
    def search(
        self, queries: np.ndarray, k: int, candidates: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, positions [Q, k] int64), best first; -inf / -1 past the stored count."""
        n_q = queries.shape[0]
        scores = np.full((n_q, k), -np.inf, dtype=np.float32)
        positions = np.full((n_q, k), -1, dtype=np.int64)
        take = min(k, self.count)
        if take == 0:
            return scores, positions
        fetch = min(self.count, candidates or (max(2 * k, k + 32) if self.half else k))
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        for start in range(0, n_q, self.query_chunk):
            q = q_all[start : start + self.query_chunk]
            cand_scores, cand_pos = self._top(q, fetch)
            if self.half:
                cand_scores, cand_pos = self._rescore(q, cand_pos, take)
            rows = slice(start, start + q.shape[0])
            scores[rows, :take] = cand_scores[:, :take].float().cpu().numpy()
            positions[rows, :take] = cand_pos[:, :take].cpu().numpy()
        return scores, positions

    def _chunk_scores(self, q: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Scores of queries `q` against base rows lo..hi in the search precision, as float32."""
        dots = (q.to(self.dtype) @ self._base[lo:hi].T).float()
        if self.metric == "ip":
            return dots
        return 2 * dots - self._sq_norms[lo:hi] - (q * q).sum(1, keepdim=True)

    def _top(self, q: torch.Tensor, fetch: int) -> tuple[torch.Tensor, torch.Tensor]:
        best_s = torch.empty((q.shape[0], 0), dtype=torch.float32, device=self.device)
        best_p = torch.empty((q.shape[0], 0), dtype=torch.long, device=self.device)
        for lo in range(0, self.count, self.base_chunk):
            hi = min(lo + self.base_chunk, self.count)
            s = self._chunk_scores(q, lo, hi)
            top_s, top_p = torch.topk(s, min(fetch, hi - lo), dim=1)
            merged_s, merged_p = torch.cat([best_s, top_s], 1), torch.cat([best_p, top_p + lo], 1)
            best_s, order = torch.topk(merged_s, min(fetch, merged_s.shape[1]), dim=1)
            best_p = merged_p.gather(1, order)
        return best_s, best_p

    def _rescore(self, q: torch.Tensor, pos: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 scores of the candidates `pos` [Q, C], re-sorted; the best `take` kept."""
        assert self._exact is not None
        vecs = self._exact[pos]  # [Q, C, D]
        if self.metric == "ip":
            exact = torch.einsum("qd,qcd->qc", q, vecs)
        else:
            exact = -((vecs - q[:, None, :]) ** 2).sum(-1)
        best, order = torch.topk(exact, take, dim=1)
        return best, pos.gather(1, order)
