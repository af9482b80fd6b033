#!/usr/bin/env bash
# Launch blade-pretrain with the DeepSpeed launcher; every argument is a pretrain flag.
#
# One node, one rank per GPU (default: every GPU nvidia-smi lists, else 1 CPU rank):
#   launch/deepspeed.sh --tensor-model-parallel-size 2 --tokenizer-model tok.model \
#       --data-path data/pool_text_document --save runs/tp2
# One node, 2 CPU ranks (gloo):
#   NUM_ACCELERATORS=2 launch/deepspeed.sh --tensor-model-parallel-size 2 ...
# Several nodes: an MPI-style hostfile ("node0 slots=8" per line), passwordless ssh (pdsh) to
# every node, the same venv path everywhere; run once, on the first node:
#   HOSTFILE=hosts.txt launch/deepspeed.sh --tensor-model-parallel-size 2 ...
#   HOSTFILE=hosts.txt NUM_NODES=2 MASTER_ADDR=node0 launch/deepspeed.sh ...
# Print the command instead of running it:
#   DRY_RUN=1 HOSTFILE=hosts.txt launch/deepspeed.sh --train-iters 10
#
# Environment: NUM_ACCELERATORS (GPUs per node; --num_gpus is the older name of the flag),
# HOSTFILE, NUM_NODES, MASTER_ADDR (multi-node default: DeepSpeed uses the first host),
# MASTER_PORT (29500), DRY_RUN. The deepspeed command must be on PATH (activate the venv).
# --no_local_rank: our flags take the rank from the environment, not from --local_rank.
set -euo pipefail

MASTER_PORT=${MASTER_PORT:-29500}
cmd=(deepspeed --master_port "$MASTER_PORT" --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ ! -f "$HOSTFILE" ]]; then
        echo "error: HOSTFILE=$HOSTFILE: no such file; write one 'hostname slots=N' line per node" >&2
        exit 2
    fi
    cmd+=(--hostfile "$HOSTFILE")
    [[ -n "${NUM_NODES:-}" ]] && cmd+=(--num_nodes "$NUM_NODES")
    [[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
    [[ -n "${NUM_ACCELERATORS:-}" ]] && cmd+=(--num_accelerators "$NUM_ACCELERATORS")
else
    if [[ -z "${NUM_ACCELERATORS:-}" ]]; then
        NUM_ACCELERATORS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        [[ "${NUM_ACCELERATORS:-0}" -gt 0 ]] || NUM_ACCELERATORS=1
    fi
    cmd+=(--num_accelerators "$NUM_ACCELERATORS")
fi
cmd+=(--module blade_mega.pretrain "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
