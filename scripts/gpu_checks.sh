#!/usr/bin/env bash
# Every GPU check in one call on a GPU machine (the device tool's one command):
#   bash scripts/gpu_checks.sh [OUT_DIR]
# 1. every gpu-marked test (sampler without host-device copies, torch kNN and FAISS GPU = CPU, pairs on GPU);
# 2. `rlalign bench logprob` on CUDA (bf16): peak memory and time of our log-prob path against full logits;
# 3. `rlalign bench prefix` on CUDA (bf16): the GRPO update on shared-prefix rows against unpacked rows;
# 4. `rlalign bench grpo|dpo --arch qwen2-vl` on CUDA: Qwen2-VL-7B at full depth in bf16 with random weights and
#    LoRA, ours against TRL: tokens/s per GPU, peak memory, MFU;
# 5. the retrieval GPU benchmark (scripts/gpu_checks_retrieval.sh, its benchmark part).
# Each step's output goes to OUT_DIR (default: $OUT, else gpu-checks/); a failing step does not stop the others.
# The GPU machine lacks deepspeed, datasets, faiss and wandb: install their wheels first (pip install --no-index
# --find-links wheels/ ...), as the device tool's README says.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-gpu-checks}}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/gpu-tests.txt" || status=1
"$PY" -m rlalign.bench.logprob --device cuda --hidden 3584 2>&1 | tee "$OUT_DIR/bench-logprob.txt" || status=1
"$PY" -m rlalign.bench.prefix --device cuda --images 8 --text-hidden 1024 --text-layers 8 --heads 8 2>&1 \
  | tee "$OUT_DIR/bench-prefix.txt" || status=1
"$PY" -m rlalign.bench.grpo --arch qwen2-vl --reps 3 2>&1 | tee "$OUT_DIR/bench-grpo-qwen2-vl.txt" || status=1
"$PY" -m rlalign.bench.dpo --arch qwen2-vl --reps 3 2>&1 | tee "$OUT_DIR/bench-dpo-qwen2-vl.txt" || status=1
bash scripts/gpu_checks_retrieval.sh 2>&1 | tee "$OUT_DIR/retrieval.txt" || status=1
exit $status
