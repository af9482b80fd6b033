"""Benchmark tools/preprocess_data.py: tokens/s and peak RSS of its whole process tree, at 1 and
2 workers and at 1x and 2x corpus size.

Examples:
    python bench/preprocess.py
    python bench/preprocess.py --size-mb 16 --repeats 5 --workdir /tmp/bench

The corpus is the demo pool (stdlib sources + noise) repeated up to --size-mb (1x) and 2x that.
Each configuration runs --repeats times; the best tokens/s and the highest peak RSS are kept,
since other load on the machine can only slow a run down. The last line printed is one JSON
object with the figures and whether the goals are met:
    speedup  tokens/s with 2 workers >= 1.7x tokens/s with 1 worker (1x corpus)
    memory   peak RSS at 2x corpus within 10% of peak RSS at 1x corpus (per worker count)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus
from blade_mega.prepare.inputs import iter_texts
from blade_mega.data.tokenizer import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEEDUP_GOAL = 1.7
RSS_GROWTH_LIMIT = 1.10
POLL_SECONDS = 0.05


def _children(pid: int) -> List[int]:
    """Children of every thread of `pid` (a Pool may fork from a helper thread)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(child) for child in f.read().split())
    except OSError:  # the process or thread has just exited
        pass
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over `root` and all its descendants."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss_bytes(pid)
        stack.extend(_children(pid))
    return total


def run_preprocess(source: str, tokenizer_model: str, workers: int, output_prefix: str) -> Dict[str, float]:
    """One subprocess run: its summary figures plus the peak RSS of its process tree."""
    command = [
        sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", source,
        "--output-prefix", output_prefix, "--tokenizer-model", tokenizer_model,
        "--append-eod", "--workers", str(workers), "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        time.sleep(POLL_SECONDS)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"preprocess_data.py failed ({process.returncode}): {stderr.strip()}")
    summary = dict(item.split("=") for item in stdout.strip().splitlines()[-1].split()[1:])
    return {"tokens": int(summary["tokens"]), "tokens_per_s": float(summary["tokens_per_s"]),
            "peak_rss_mb": peak / 2**20}


def make_corpus(workdir: str, size_mb: float) -> Dict[str, str]:
    """The demo pool, a tokenizer trained on it, and 1x / 2x input files built by repetition."""
    splits, labels = build_demo_corpus(size_mb=min(size_mb, 4.0), seed=0)
    write_demo_corpus(os.path.join(workdir, "demo"), splits, labels)
    pool = os.path.join(workdir, "demo", "pool.jsonl")
    tokenizer = train_tokenizer(iter_texts([pool], ["text"], skip_invalid=False),
                                os.path.join(workdir, "tok"), vocab_size=8000)
    with open(pool, "rb") as f:
        pool_bytes = f.read()
    copies = max(1, round(size_mb * 2**20 / len(pool_bytes)))
    paths = {"tokenizer": tokenizer.model_path}
    for scale in (1, 2):
        paths[f"{scale}x"] = os.path.join(workdir, f"corpus_{scale}x.jsonl")
        with open(paths[f"{scale}x"], "wb") as f:
            for _ in range(copies * scale):
                f.write(pool_bytes)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=8.0, help="1x corpus size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="default: a temporary directory, removed afterwards")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        paths = make_corpus(workdir, args.size_mb)
        configs = [(scale, workers) for scale in ("1x", "2x") for workers in (1, 2)]
        runs = {config: [] for config in configs}
        # Rounds over all configurations, so that a burst of outside load hits them alike.
        for _ in range(args.repeats):
            for scale, workers in configs:
                output_prefix = os.path.join(workdir, "out")
                runs[(scale, workers)].append(run_preprocess(paths[scale], paths["tokenizer"], workers, output_prefix))
        results = {
            config: {
                "tokens": config_runs[0]["tokens"],
                "tokens_per_s": max(r["tokens_per_s"] for r in config_runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in config_runs),
            }
            for config, config_runs in runs.items()
        }

    print(f"{'corpus':>6} {'workers':>7} {'tokens':>11} {'tokens/s':>11} {'peak RSS MB':>12}")
    for (scale, workers), r in results.items():
        print(f"{scale:>6} {workers:>7} {r['tokens']:>11} {r['tokens_per_s']:>11.0f} {r['peak_rss_mb']:>12.1f}")
    speedup = {s: results[(s, 2)]["tokens_per_s"] / results[(s, 1)]["tokens_per_s"] for s in ("1x", "2x")}
    rss_growth = {w: results[("2x", w)]["peak_rss_mb"] / results[("1x", w)]["peak_rss_mb"] for w in (1, 2)}
    print(json.dumps({
        "size_mb_1x": args.size_mb,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_before": round(load_before, 2),  # other work on the machine skews figures
        "tokens_per_s": {f"{s}_w{w}": round(r["tokens_per_s"]) for (s, w), r in results.items()},
        "peak_rss_mb": {f"{s}_w{w}": round(r["peak_rss_mb"], 1) for (s, w), r in results.items()},
        "speedup_1_to_2_workers": {s: round(x, 3) for s, x in speedup.items()},
        "rss_2x_over_1x": {f"w{w}": round(g, 3) for w, g in rss_growth.items()},
        "goal_speedup_met": speedup["1x"] >= SPEEDUP_GOAL,
        "goal_memory_met": all(g <= RSS_GROWTH_LIMIT for g in rss_growth.values()),
    }))


if __name__ == "__main__":
    main()
