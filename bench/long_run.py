"""A long run with selection on (thousands of tiny steps): memory must stay flat, and the saved
sidecar must agree with what the log says was kept.

    python bench/long_run.py --data /tmp/dd --steps 3000      # ~8 min on 2 busy cores

Runs ``torchrun --nproc_per_node 2 -m blade_mega.pretrain --selection blade`` (sample level, a
1-layer model, 32-token samples), samples every rank's RSS from /proc twice a second, and checks
at the end:

* RSS growth of every rank after warm-up (median of the last 10 % of the run vs. the median over
  20-30 %) is below 5 %;
* the log has every iteration exactly once, ``consumed`` advances by one block per step;
* the final checkpoint's sidecar counts ``scored`` = steps x block and ``kept`` = the sum of
  ``kept_fraction`` x block over the logged steps.

``--data`` holds tok.model and {pool,target}_text_document.{bin,idx}.  Last line: JSON figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_faults import env, read_log, torchrun, worker_pids  # noqa: E402

GLOBAL_BATCH, KEEP = 4, 0.5
BLOCK = int(GLOBAL_BATCH / KEEP)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workdir", help="keep the run here (default: a temporary directory)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="long_run_")
    os.makedirs(workdir, exist_ok=True)
    log_path, save = os.path.join(workdir, "log.jsonl"), os.path.join(workdir, "ckpt")
    flags = ["--tokenizer-model", os.path.join(args.data, "tok.model"),
             "--data-path", os.path.join(args.data, "pool_text_document"),
             "--target-data-path", os.path.join(args.data, "target_text_document"),
             "--selection", "blade", "--keep-ratio", str(KEEP), "--blade-sync-interval", "50",
             "--blade-ref-steps", "2", "--model-size", "tiny", "--num-layers", "1",
             "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size", "64",
             "--seq-length", "32", "--global-batch-size", str(GLOBAL_BATCH),
             "--micro-batch-size", "2", "--train-iters", str(args.steps), "--log-interval", "1",
             "--eval-interval", "0", "--no-progress", "--save", save,
             "--save-interval", str(max(1, args.steps // 4)), "--log-file", log_path]
    started = time.monotonic()
    job = subprocess.Popen(torchrun() + flags, stdout=subprocess.DEVNULL,
                           stderr=open(os.path.join(workdir, "stderr.txt"), "w"), env=env())
    samples = []  # (iteration, {rank: rss MB})
    iteration = 0
    while job.poll() is None:
        time.sleep(0.5)
        records = read_log(log_path)
        iteration = max((r["iteration"] for r in records[-5:] if r["kind"] == "train"),
                        default=iteration)
        try:
            samples.append((iteration, {rank: rss_mb(pid)
                                        for rank, pid in worker_pids(job.pid).items()}))
        except (OSError, ValueError):  # a worker is exiting
            pass
    seconds = time.monotonic() - started
    if job.returncode:
        sys.exit(f"long run failed ({job.returncode}); see {workdir}/stderr.txt")

    def median_rss(low: float, high: float) -> dict:
        window = [s for it, s in samples if low * args.steps <= it <= high * args.steps and s]
        return {rank: float(np.median([s[rank] for s in window if rank in s]))
                for rank in window[0]}

    warm, end = median_rss(0.2, 0.3), median_rss(0.9, 1.0)
    growth = {rank: end[rank] / warm[rank] - 1.0 for rank in warm}

    records = read_log(log_path)
    train = [r for r in records if r["kind"] == "train"]
    iterations = [r["iteration"] for r in train]
    consumed_ok = all(r["consumed"] == r["iteration"] * BLOCK for r in train)
    sidecar = np.load(os.path.join(save, f"iter_{args.steps:07d}",
                                   "pool_text_document.blade_sidecar.npy"))  # scored rows only
    scored_expected = sum(BLOCK for r in train if r.get("nonfinite_scores", 0) == 0)
    kept_expected = sum(r["kept_fraction"] * BLOCK for r in train)
    figures = {
        "steps": args.steps, "seconds": round(seconds, 1), "ranks": len(warm),
        "rss_mb_after_warmup": {str(k): round(v, 1) for k, v in warm.items()},
        "rss_mb_at_end": {str(k): round(v, 1) for k, v in end.items()},
        "rss_growth_pct": {str(k): round(100 * v, 2) for k, v in growth.items()},
        "rss_flat": all(v < 0.05 for v in growth.values()),
        "log_iterations_complete": iterations == list(range(1, args.steps + 1)),
        "consumed_consistent": consumed_ok,
        "bad_steps": sum(r["kind"] == "bad_step" for r in records),
        "sidecar_scored": float(sidecar["scored"].sum()), "log_scored": float(scored_expected),
        "sidecar_kept": float(sidecar["kept"].sum()), "log_kept": float(kept_expected),
        "checkpoints": sum(r["kind"] == "checkpoint" for r in records),
    }
    figures["sidecar_consistent"] = (figures["sidecar_scored"] == figures["log_scored"]
                                     and abs(figures["sidecar_kept"] - kept_expected) < 1e-6)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
