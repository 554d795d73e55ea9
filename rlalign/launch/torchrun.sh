#!/usr/bin/env bash
# Without accelerate's launcher: torchrun starts the processes, rlalign picks the backend from the
# recipe (distributed.backend=ddp|fsdp2; DeepSpeed needs `accelerate launch`). Runs under
# `rlalign launch`, so a SIGTERM checkpoints and exits 0 (RLALIGN_TERM_GRACE seconds, default 300).
#   NPROC=8 bash launch/torchrun.sh RECIPE distributed.backend=fsdp2 [a.b=c ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NPROC=8 bash launch/torchrun.sh RECIPE ...
set -euo pipefail
exec "${RLALIGN:-rlalign}" launch --grace "${RLALIGN_TERM_GRACE:-300}" -- \
  "${TORCHRUN:-torchrun}" \
  --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${NPROC:-8}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" \
  -m rlalign.cli train "$@"
