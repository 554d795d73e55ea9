#!/usr/bin/env bash
# One node's share of a multi-node run: `accelerate launch` under `rlalign launch`, so a SIGTERM
# (preemption, the time limit) checkpoints and exits 0 (see rlalign/launcher.py).
# launch/slurm.sbatch calls it once per node; the tests call it twice on one machine.
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=host0 MASTER_PORT=29500 \
#   ACCELERATE_CONFIG=launch/multinode-2x8-zero2.yaml bash launch/multinode.sh RECIPE [a.b=c ...]
# RLALIGN_TERM_GRACE: seconds the workers get to checkpoint after SIGTERM (default 300).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/multinode-2x8-zero2.yaml}
exec "${RLALIGN:-rlalign}" launch --grace "${RLALIGN_TERM_GRACE:-300}" -- \
  "${ACCELERATE:-accelerate}" launch \
  --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$NNODES" \
  --machine_rank "$NODE_RANK" \
  --num_processes $((NNODES * GPUS_PER_NODE)) \
  --main_process_ip "$MASTER_ADDR" \
  --main_process_port "$MASTER_PORT" \
  -m rlalign.cli train "$@"
