#!/usr/bin/env bash
# The prepared GPU check, for a machine with one or more NVIDIA GPUs (see docs/gpu.md).
#
#   bench/gpu_check.sh            # after the README's set-up (make venv); ~8 minutes at most
#
# Runs the CUDA-marked tests, then bench/gpu_check.py: a 125M-preset bf16 run (tokens/s, model
# FLOPs utilisation against the GPU's peak, peak memory), uniform vs blade step time, and TP2 /
# PP2 when 2+ GPUs are present. Installs nothing beyond the README's set-up. Last line: one JSON
# object. Without CUDA it exits 1 with one line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    make venv >&2   # the README's set-up: .venv with torch and this package
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with NVIDIA GPUs and a CUDA build of torch" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
tests_rc=0
timeout 270 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider >&2 || tests_rc=$?
left=$(( 470 - ($(date +%s) - start) ))
[ "$left" -ge 120 ] || left=120   # the bench always gets its runs; the total stays near 8 min
timeout "$left" "$PY" bench/gpu_check.py --cuda-tests-rc "$tests_rc"
