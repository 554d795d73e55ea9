#!/usr/bin/env bash
# Every GPU check of the retrieval / pairs work, in one call on a GPU machine:
#   bash scripts/gpu_checks_retrieval.sh
# 1. the gpu-marked tests: torch kNN (float16 / bfloat16, rescored) = exact CPU result, FAISS GPU IVF = CPU,
#    saved GPU indexes load on the CPU, the pair builder runs on the GPU and equals a CPU build;
# 2. queries/s on the GPU against the CPU: exact search (torch kNN, and FAISS GPU flat where FAISS sees a
#    GPU) and IVF, on 1M x 512 clustered vectors; one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_index.py tests/test_index_scale.py tests/test_pairs.py
"$PY" - <<'PYEOF'
import json, statistics, time

import faiss
import numpy as np
import torch

from rlalign.bench.index import clustered, torch_topk
from rlalign.config.pairs import IndexConfig
from rlalign.retrieval.index import VectorIndex, recall_at_k

n, dim, nq, k = 1_000_000, 512, 10_000, 10
data = clustered(n + nq, dim, 1000, 1.0, 0)
base, queries = data[:n], data[n:]
exact = torch_topk(torch.from_numpy(base).cuda(), torch.from_numpy(queries).cuda(), k).cpu().numpy()
ids = np.arange(n)
kinds = {
    "flat-cpu-faiss": IndexConfig(device="cpu", exact_backend="faiss"),
    "flat-gpu-torch-fp16": IndexConfig(device="gpu", gpu_dtype="float16"),
    "flat-gpu-torch-bf16": IndexConfig(device="gpu", gpu_dtype="bfloat16"),
    "ivf-cpu": IndexConfig(kind="ivf", nprobe=16, device="cpu"),
}
if faiss.get_num_gpus():
    kinds["flat-gpu-faiss"] = IndexConfig(device="gpu", exact_backend="faiss")
    kinds["ivf-gpu-faiss"] = IndexConfig(kind="ivf", nprobe=16, device="gpu")
out = {"bench": "index-gpu", "n": n, "dim": dim, "queries": nq, "faiss_gpus": faiss.get_num_gpus(),
       "device": torch.cuda.get_device_name(0), "kinds": {}}
for name, cfg in kinds.items():
    index = VectorIndex.build(base, ids, cfg)
    q = queries if "cpu" not in name else queries[:1000]
    index.search(q[:100], k)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        _, found = index.search(q, k)
        times.append(time.perf_counter() - start)
    out["kinds"][name] = {"placement": index.placement, "queries_per_s": round(len(q) / statistics.median(times), 1),
                          "recall_at_10": round(recall_at_k(found, exact[: len(q)]), 4)}
    del index
cpu = out["kinds"]["flat-cpu-faiss"]["queries_per_s"]
for row in out["kinds"].values():
    row["x_cpu_flat"] = round(row["queries_per_s"] / cpu, 1)
print(json.dumps(out))
PYEOF
