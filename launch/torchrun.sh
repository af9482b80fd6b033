#!/usr/bin/env bash
# Launch blade-pretrain with torchrun; every argument is a pretrain flag.
#
# One node, one rank per GPU (default: every GPU nvidia-smi lists, else 1 CPU rank):
#   launch/torchrun.sh --tensor-model-parallel-size 2 --tokenizer-model tok.model \
#       --data-path data/pool_text_document --save runs/tp2
# One node, 2 CPU ranks (gloo):
#   NPROC_PER_NODE=2 launch/torchrun.sh --tensor-model-parallel-size 2 ...
# Two nodes with 8 GPUs each: run the same line on both, NODE_RANK=0 on the node at MASTER_ADDR:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 launch/torchrun.sh ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=8 launch/torchrun.sh ...
# Print the command instead of running it:
#   DRY_RUN=1 NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh --train-iters 10
#
# Environment: NPROC_PER_NODE, NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500), DRY_RUN (unset). torchrun must be on PATH (activate the venv).
set -euo pipefail

gpu_count() {
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    echo "${n:-0}"
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(gpu_count)
    [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
if [[ "$NNODES" -gt 1 && "$MASTER_ADDR" == 127.0.0.1 ]]; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR set to the address of the NODE_RANK=0 node" >&2
    exit 2
fi

cmd=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     -m blade_mega.pretrain "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
