"""Peak host memory per rank while the model is built and initialised, TP1 vs TP2 (CPU, gloo).

Each rank samples its resident set (/proc/self/statm) every 5 ms while ``build_gpt`` runs; the
model part is that peak minus the resident set just before (imports and process groups done).
Presets 125m and 350m with GPT-2's vocab (50257, padded). Goal: TP2 <= 0.6 x TP1 per rank for
the model part (each rank draws and holds only its shards).

    python bench/init_memory.py [--presets 125m 350m]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from blade_mega.testing import run_distributed  # noqa: E402

GPT2_VOCAB = 50257
GOAL = 0.6


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_in_rank(preset: str, tp: int) -> dict:
    from megatron.core import tensor_parallel

    from blade_mega.engine import cpu_compat
    from blade_mega.engine.model import PRESETS, build_gpt, padded_vocab_size
    from blade_mega.engine.parallel import init_distributed, shutdown

    cpu_compat.install()
    init_distributed(tp, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    try:
        before = _rss()
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        model = build_gpt(PRESETS[preset], padded_vocab_size(GPT2_VOCAB, tp), seed=0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        peak[0] = max(peak[0], _rss())
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"model_part_bytes": peak[0] - before, "param_bytes": param_bytes,
                "seconds": seconds}
    finally:
        shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["125m", "350m"])
    args = parser.parse_args()
    out = {"goal_tp2_over_tp1": GOAL}
    for preset in args.presets:
        row = {}
        for tp in (1, 2):
            ranks = run_distributed(build_in_rank, tp, preset, tp, timeout=900)
            row[f"tp{tp}"] = {
                "model_part_gib_per_rank": max(r["model_part_bytes"] for r in ranks) / 2**30,
                "param_gib_per_rank": max(r["param_bytes"] for r in ranks) / 2**30,
                "init_seconds": max(r["seconds"] for r in ranks)}
            print(preset, f"TP{tp}", json.dumps(row[f"tp{tp}"]), flush=True)
        row["tp2_over_tp1"] = (row["tp2"]["model_part_gib_per_rank"]
                               / row["tp1"]["model_part_gib_per_rank"])
        row["goal_met"] = row["tp2_over_tp1"] <= GOAL
        out[preset] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
