#!/usr/bin/env bash
# Launch blade-pretrain with mpiexec (MPICH/Hydra or Open MPI); every argument is a pretrain flag.
# Ranks find their place from PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH) or OMPI_COMM_WORLD_*
# (Open MPI); MPI itself only starts the processes, torch.distributed rendezvous at MASTER_ADDR.
#
# One node, 2 ranks:
#   NP=2 launch/mpiexec.sh --tensor-model-parallel-size 2 --tokenizer-model tok.model \
#       --data-path data/pool_text_document --save runs/tp2
# Several nodes, 8 ranks per node (hostfile: one hostname per line, MPICH "host:8" or Open MPI
# "host slots=8" style); MASTER_ADDR defaults to the hostfile's first host:
#   NP=16 PPN=8 HOSTFILE=hosts.txt launch/mpiexec.sh --tensor-model-parallel-size 2 ...
#   NP=16 PPN=8 HOSTFILE=hosts.txt MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 launch/mpiexec.sh ...
# Print the command instead of running it:
#   DRY_RUN=1 NP=16 PPN=8 HOSTFILE=hosts.txt launch/mpiexec.sh --train-iters 10
#
# Environment: NP (total ranks, required), PPN (ranks per node), HOSTFILE, MASTER_ADDR,
# MASTER_PORT (29500), PYTHON (python), DRY_RUN. mpiexec must be on PATH.
set -euo pipefail

if [[ -z "${NP:-}" ]]; then
    echo "error: set NP to the total number of ranks, e.g. NP=2 launch/mpiexec.sh ..." >&2
    exit 2
fi
PYTHON=${PYTHON:-python}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ ! -f "$HOSTFILE" ]]; then
        echo "error: HOSTFILE=$HOSTFILE: no such file; write one hostname per line" >&2
        exit 2
    fi
    # First host of the first non-comment line, without ":slots" or " slots=N".
    first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE" | cut -d: -f1)
    MASTER_ADDR=${MASTER_ADDR:-$first_host}
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

# Both MPIs start remote ranks without our shell's environment: pass the rendezvous explicitly.
if mpiexec --version 2>/dev/null | grep -qi 'open mpi\|open-mpi\|openrte'; then
    cmd=(mpiexec -n "$NP" -x "MASTER_ADDR=$MASTER_ADDR" -x "MASTER_PORT=$MASTER_PORT")
    [[ -n "${HOSTFILE:-}" ]] && cmd+=(--hostfile "$HOSTFILE")
    [[ -n "${PPN:-}" ]] && cmd+=(--map-by "ppr:$PPN:node")
else
    cmd=(mpiexec -n "$NP" -genv MASTER_ADDR "$MASTER_ADDR" -genv MASTER_PORT "$MASTER_PORT")
    [[ -n "${HOSTFILE:-}" ]] && cmd+=(-f "$HOSTFILE")
    [[ -n "${PPN:-}" ]] && cmd+=(-ppn "$PPN")
fi
cmd+=("$PYTHON" -m blade_mega.pretrain "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
