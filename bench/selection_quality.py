"""Selection quality: does each method make the model better per training step on the target?

Demo corpus (stdlib code, half the pool labelled noise), the same model, steps and seeds for
every method; the measure is the loss on the held-out *test* split of the target distribution
(never trained or selected on).  Reports, per method: final test loss for every seed, the share
of steps it needs to reach uniform's final test loss, and the share of trained samples that were
noise.

    python bench/selection_quality.py                      # defaults: 3 seeds, 5 methods
    python bench/selection_quality.py --seeds 0 --train-iters 100 --methods uniform,blade

The last line is one JSON object with the figures and the goals:
blade below uniform and rho on test loss for every seed; blade reaches uniform's final test loss
in <= 0.6x the steps; blade trains on < 1/3 of the noise uniform trains on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from blade_mega.testing import pretrain_rank, run_distributed  # noqa: E402

# Settings every selector shares (same sampler, same keep ratio), then per-method flags.
# rho gets blade's reference-step budget (K x number of syncs) by default.
SELECTION_FLAGS = ["--selection-granularity", "sample", "--keep-ratio", "0.5",
                   "--blade-sync-interval", "20", "--blade-ref-steps", "8",
                   "--blade-lambda", "0.5", "--reweight-mix", "0.5"]
METHODS = {
    "uniform": [],
    "highloss": ["--selection", "highloss"],
    "rho": ["--selection", "rho"],
    "blade": ["--selection", "blade"],
    "sketch-influence": ["--selection", "sketch-influence"],  # default --sketch-dim 64
}


def build_data(directory: str, size_mb: float, vocab: int) -> dict:
    from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus
    from blade_mega.prepare.inputs import iter_texts
    from blade_mega.prepare.preprocess import dataset_prefix, meta_path, preprocess
    from blade_mega.tokenizer import train_tokenizer

    paths = {"tokenizer": os.path.join(directory, "tokenizer.model")}
    for split in ("pool", "target", "test"):
        paths[split] = dataset_prefix(os.path.join(directory, split), "text")
    paths["labels"] = meta_path(paths["pool"])
    if all(os.path.exists(p + ".idx") for p in (paths["pool"], paths["target"], paths["test"])):
        return paths
    os.makedirs(directory, exist_ok=True)
    splits, labels = build_demo_corpus(size_mb=size_mb, noise_rate=0.5, seed=0)
    corpus = os.path.join(directory, "corpus")
    write_demo_corpus(corpus, splits, labels)
    train_tokenizer(iter_texts([os.path.join(corpus, "pool.jsonl")], ["text"], skip_invalid=False),
                    os.path.join(directory, "tokenizer"), vocab_size=vocab)
    for split in ("pool", "target", "test"):
        preprocess([os.path.join(corpus, f"{split}.jsonl")], os.path.join(directory, split),
                   paths["tokenizer"], append_eod=True, meta_keys=("id", "noise"),
                   show_progress=False)
    return paths


def run_method(paths: dict, method: str, seed: int, args, workdir: str,
               base: str | None = None) -> dict:
    log = os.path.join(workdir, f"{args.regime}_{method}_seed{seed}.jsonl")
    if args.reuse and os.path.exists(log):
        records = [json.loads(line) for line in open(log)]
        if any(r["kind"] == "eval" and r["iteration"] == args.train_iters for r in records):
            return summarise(records, seconds=float("nan"))
    if os.path.exists(log):
        os.remove(log)
    argv = ["--tokenizer-model", paths["tokenizer"], "--data-path", paths["pool"],
            "--target-data-path", paths["target"], "--test-data-path", paths["test"],
            "--noise-labels", paths["labels"], "--model-size", args.model_size,
            "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch),
            "--micro-batch-size", str(args.micro_batch), "--train-iters", str(args.train_iters),
            "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-warmup-iters", "20",
            "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_iters),
            "--log-interval", "10", "--seed", str(seed), "--no-progress", "--log-file", log,
            "--split", "100,1", *METHODS[method]]
    if method != "uniform":
        argv += SELECTION_FLAGS + args.method_flags
    if base:  # continued pretraining: start from the base model's weights, fresh schedule
        argv += ["--load", base, "--finetune"]
    started = time.perf_counter()
    records = run_distributed(pretrain_rank, 1, argv)[0]
    return summarise(records, time.perf_counter() - started)


def summarise(records: list[dict], seconds: float) -> dict:
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    shares = [r["trained_share"] for r in train if "trained_share" in r]
    noise_share = (float(np.mean([1.0 - s.get("clean", 0.0) for s in shares]))
                   if shares else None)
    return {"curve": [(r["iteration"], r["test_loss"]) for r in evals],
            "final": evals[-1]["test_loss"], "noise_share": noise_share, "seconds": seconds}


def train_base(paths: dict, seed: int, args, workdir: str) -> str:
    """The continued-pretraining regime's starting point: uniform training on the noisy pool."""
    save = os.path.join(workdir, f"base_seed{seed}")
    if os.path.exists(os.path.join(save, "latest")):
        return save
    argv = ["--tokenizer-model", paths["tokenizer"], "--data-path", paths["pool"],
            "--model-size", args.model_size, "--seq-length", str(args.seq_length),
            "--global-batch-size", str(args.global_batch),
            "--micro-batch-size", str(args.micro_batch), "--train-iters", str(args.base_iters),
            "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-warmup-iters", "20",
            "--eval-interval", "0", "--log-interval", "50", "--seed", str(1000 + seed),
            "--no-progress", "--split", "100,1", "--save", save]
    run_distributed(pretrain_rank, 1, argv)
    return save


def steps_to_reach(curve, level: float, total: int) -> float:
    for iteration, loss in curve:
        if loss <= level:
            return iteration / total
    return float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default="uniform,highloss,rho,blade,sketch-influence")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--size-mb", type=float, default=4.0)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--workdir", default=os.path.join(HERE, ".cache", "selection_quality"))
    p.add_argument("--regime", choices=("scratch", "continued"), default="scratch",
                   help="scratch: from random init; continued: from a model first trained "
                        "--base-iters steps uniformly on the noisy pool (where a static "
                        "reference is expected to go stale)")
    p.add_argument("--base-iters", type=int, default=300)
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs' logs in --workdir (same settings assumed)")
    p.add_argument("--method-flags", nargs=argparse.REMAINDER, default=[],
                   help="extra pretrain flags for every selecting method (last on the line)")
    args = p.parse_args()
    paths = build_data(os.path.join(args.workdir, "data"), args.size_mb, args.vocab)
    methods = args.methods.split(",")
    results: dict = {m: {} for m in methods}
    for seed in args.seeds:
        base = train_base(paths, seed, args, args.workdir) if args.regime == "continued" else None
        for method in methods:
            results[method][seed] = run_method(paths, method, seed, args, args.workdir, base)
            r = results[method][seed]
            print(f"seed {seed} {method:16s} test loss {r['final']:.4f}  noise share "
                  f"{r['noise_share'] if r['noise_share'] is not None else float('nan'):.3f}  "
                  f"{r['seconds']:.0f}s", flush=True)

    summary = {"settings": {k: v for k, v in vars(args).items() if k != "workdir"}}
    for method in methods:
        finals = [results[method][s]["final"] for s in args.seeds]
        summary[method] = {"test_loss": finals, "mean_test_loss": float(np.mean(finals)),
                           "noise_share": [results[method][s]["noise_share"] for s in args.seeds],
                           "seconds": [round(results[method][s]["seconds"], 1)
                                       for s in args.seeds]}
    if "uniform" in methods:
        for method in methods:
            ratios = [steps_to_reach(results[method][s]["curve"], results["uniform"][s]["final"],
                                     args.train_iters) for s in args.seeds]
            summary[method]["steps_to_uniform_final"] = ratios
    goals = {}
    if {"blade", "uniform"} <= set(methods):
        blade, uniform = summary["blade"], summary["uniform"]
        goals["blade_below_uniform_every_seed"] = all(
            b < u for b, u in zip(blade["test_loss"], uniform["test_loss"]))
        goals["blade_steps_ratio_le_0.6"] = all(r <= 0.6 for r in blade["steps_to_uniform_final"])
        uniform_noise = np.mean([x for x in uniform["noise_share"] if x is not None] or [0.5])
        blade_noise = np.mean([x for x in blade["noise_share"] if x is not None] or [1.0])
        goals["blade_noise_lt_third_of_uniform"] = bool(blade_noise < uniform_noise / 3)
    if {"blade", "rho"} <= set(methods):
        goals["blade_below_rho_every_seed"] = all(
            b < r for b, r in zip(summary["blade"]["test_loss"], summary["rho"]["test_loss"]))
    summary["goals"] = goals
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
