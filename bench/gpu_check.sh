#!/usr/bin/env bash
# The prepared GPU check, for a machine with one or more NVIDIA GPUs (see docs/gpu.md).
#
#   bench/gpu_check.sh            # ~8 minutes at most
#
# Runs the CUDA-marked tests, then bench/gpu_check.py: a 125M-preset bf16 run (tokens/s, model
# FLOPs utilisation against the GPU's peak, peak memory), uniform vs blade step time, and TP2 /
# PP2 when 2+ GPUs are present. Python: $PY, else the README's .venv, else the machine's own
# python3 (a GPU image's torch); it installs nothing and needs no network. Logs and
# summary.json go under $OUT when set. Last line: one JSON object. Without CUDA, or without
# megatron-core / DeepSpeed in that Python, it exits 1 with one line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here ($PY: torch.cuda.is_available() is False); run it on a machine with NVIDIA GPUs and a CUDA build of torch" >&2
    exit 1
fi
if ! "$PY" -c 'import megatron.core, deepspeed' 2>/dev/null; then
    echo "gpu_check: $PY lacks megatron-core or DeepSpeed; install the package's dependencies into it (pip install -e .) or point PY at a Python that has them" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
tests_rc=0
timeout 270 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider >&2 || tests_rc=$?
left=$(( 470 - ($(date +%s) - start) ))
[ "$left" -ge 120 ] || left=120   # the bench always gets its runs; the total stays near 8 min
# The stages keep to the budget themselves; the outer limit only stops a hang outside them.
timeout $((left + 60)) "$PY" bench/gpu_check.py --cuda-tests-rc "$tests_rc" --budget-s "$left"
