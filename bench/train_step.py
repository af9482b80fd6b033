"""Training-step throughput and memory per rank, and ZeRO's optimizer-state sharding.

Part 1: the ``demo`` model (uniform selection) at TP1xDP2, TP2 and PP2 on 2 gloo ranks:
global tokens/s (steps after the first, which pays for warm-up) and each rank's peak RSS.
Part 2: optimizer-state bytes per rank at DP2 with ZeRO-0, ZeRO-1 and ZeRO-2, read from the
optimizer's tensors: the fp32 master weights the optimizer updates plus Adam's exp_avg and
exp_avg_sq.  ZeRO-1/2: DeepSpeed's partition ``single_partition_of_fp32_groups`` and the inner
optimizer's state; ZeRO-0: the torch optimizer's parameters (in fp32 training they are the model
weights themselves) and state.  So in fp32 ZeRO-1/2 keep their fp32 partition *beside* the full
fp32 model weights; under --bf16 that copy replaces nothing either way, as in the ZeRO paper.

    python bench/train_step.py                        # demo data built under --workdir
    python bench/train_step.py --tokenizer-model /tmp/dd/tok.model \\
        --data-path /tmp/dd/pool_text_document --steps 10

Last line: one JSON object. Goal: ZeRO-1 and ZeRO-2 optimizer bytes per rank within 10% of
ZeRO-0's / DP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from blade_mega.testing import run_distributed  # noqa: E402

DP = 2
GOAL_TOLERANCE = 0.10
LAYOUTS = {  # name: pretrain flags, on 2 ranks
    "TP1xDP2": [],
    "TP2": ["--tensor-model-parallel-size", "2"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
}
ZERO_STAGES = (0, 1, 2)


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def optimizer_state_bytes(engine) -> dict:
    """Bytes this rank holds for the optimizer: fp32 master weights and Adam's moments."""
    import torch

    optimizer = engine.optimizer
    partitions = getattr(optimizer, "single_partition_of_fp32_groups", None)
    if partitions is not None:  # DeepSpeed ZeRO-1/2
        master = sum(tensor_bytes(t) for t in partitions)
        inner = optimizer.optimizer
    else:  # ZeRO-0: a plain torch optimizer over the full model
        master = sum(tensor_bytes(p) for group in optimizer.param_groups for p in group["params"])
        inner = optimizer
    moments = sum(tensor_bytes(value) for state in inner.state.values()
                  for name, value in state.items()
                  if name in ("exp_avg", "exp_avg_sq") and torch.is_tensor(value))
    return {"optimizer": type(optimizer).__name__, "master_bytes": master,
            "moments_bytes": moments, "total_bytes": master + moments}


def bench_rank(argv: list[str]) -> dict:
    """One rank of a training run; returns its peak RSS, optimizer bytes and (rank 0) log."""
    import resource

    import torch

    from blade_mega.engine import cpu_compat, parallel
    from blade_mega.config import parse_config
    from blade_mega.train.trainer import Trainer

    config = parse_config(argv)
    cpu_compat.install()
    _, layout = parallel.init_distributed(config.parallel.tensor_model_parallel_size,
                                          config.parallel.pipeline_model_parallel_size)
    try:
        trainer = Trainer(config, layout)
        trainer.train()
        optimizer = optimizer_state_bytes(trainer.learner.engine)
        rank = torch.distributed.get_rank()
    finally:
        parallel.shutdown()
    records = []
    if rank == 0:
        with open(config.log.log_file) as f:
            records = [json.loads(line) for line in f]
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "optimizer": optimizer, "records": records}


def run(base: list[str], flags: list[str], log: str) -> list[dict]:
    if os.path.exists(log):
        os.remove(log)
    return run_distributed(bench_rank, DP, [*base, *flags, "--log-file", log], timeout=1800)


def throughput(records: list[dict], tokens_per_step: int) -> float:
    """Global tokens/s over every step but the first."""
    steps = [r for r in records if r["kind"] == "train"][1:]
    return len(steps) * tokens_per_step / sum(r["step_time"] for r in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-model", help="default: demo data built under --workdir")
    parser.add_argument("--data-path", help="indexed dataset prefix (with --tokenizer-model)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_train_step"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if bool(args.tokenizer_model) != bool(args.data_path):
        parser.error("give --tokenizer-model and --data-path together, or neither")
    if not args.tokenizer_model:
        from bench.selection_quality import build_data

        paths = build_data(os.path.join(args.workdir, "data"), size_mb=1.0, vocab=2000)
        args.tokenizer_model, args.data_path = paths["tokenizer"], paths["pool"]
    os.makedirs(args.workdir, exist_ok=True)
    common = ["--tokenizer-model", args.tokenizer_model, "--data-path", args.data_path,
              "--model-size", "demo", "--seq-length", str(args.seq_length),
              "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "0",
              "--no-progress", "--split", "100,1"]

    speed = {}
    for name, flags in LAYOUTS.items():
        ranks = run([*common, "--train-iters", str(args.steps),
                     "--global-batch-size", str(args.global_batch_size),
                     "--micro-batch-size", str(args.micro_batch_size)],
                    flags, os.path.join(args.workdir, f"speed_{name}.jsonl"))
        speed[name] = {
            "tokens_per_s": round(throughput(ranks[0]["records"],
                                             args.global_batch_size * args.seq_length), 1),
            "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks]}

    zero = {}
    for stage in ZERO_STAGES:
        # One micro-batch per rank per step: what ZeRO-2 needs, the same for every stage.
        ranks = run([*common, "--train-iters", "2", "--global-batch-size",
                     str(args.micro_batch_size * DP), "--micro-batch-size",
                     str(args.micro_batch_size), "--zero-stage", str(stage)],
                    [], os.path.join(args.workdir, f"zero{stage}.jsonl"))
        zero[stage] = {"optimizer": ranks[0]["optimizer"]["optimizer"],
                       "bytes_per_rank": [r["optimizer"]["total_bytes"] for r in ranks],
                       "master_bytes_per_rank": [r["optimizer"]["master_bytes"] for r in ranks],
                       "moments_bytes_per_rank": [r["optimizer"]["moments_bytes"] for r in ranks]}

    full = max(zero[0]["bytes_per_rank"])
    ratios = {stage: max(zero[stage]["bytes_per_rank"]) / full for stage in ZERO_STAGES}
    goal_met = all(abs(ratios[stage] - 1 / DP) <= GOAL_TOLERANCE / DP for stage in (1, 2))

    print(f"demo model, 2 ranks, seq {args.seq_length}, global batch {args.global_batch_size}, "
          f"micro {args.micro_batch_size}, {args.steps} steps (first excluded)")
    print(f"{'layout':<10}{'tokens/s':>12}{'peak RSS MB per rank':>28}")
    for name, row in speed.items():
        rss = " / ".join(f"{x:.0f}" for x in row["peak_rss_mb_per_rank"])
        print(f"{name:<10}{row['tokens_per_s']:>12.1f}{rss:>28}")
    print()
    print(f"{'DP2':<8}{'optimizer':<26}{'master B/rank':>16}{'moments B/rank':>16}"
          f"{'total B/rank':>14}{'x ZeRO-0':>10}")
    for stage in ZERO_STAGES:
        row = zero[stage]
        print(f"ZeRO-{stage:<3}{row['optimizer']:<26}{max(row['master_bytes_per_rank']):>16,}"
              f"{max(row['moments_bytes_per_rank']):>16,}{max(row['bytes_per_rank']):>14,}"
              f"{ratios[stage]:>10.3f}")
    print(f"goal: ZeRO-1/2 within {GOAL_TOLERANCE:.0%} of 1/DP = {1 / DP:.3f} of ZeRO-0: "
          f"{'met' if goal_met else 'NOT met'}")
    print(json.dumps({"bench": "train_step", "model": "demo", "ranks": DP,
                      "seq_length": args.seq_length, "global_batch_size": args.global_batch_size,
                      "steps": args.steps, "throughput": speed,
                      "optimizer_state": {f"zero{s}": zero[s] for s in ZERO_STAGES},
                      "optimizer_ratio_to_zero0": {f"zero{s}": round(ratios[s], 4)
                                                   for s in ZERO_STAGES},
                      "goal": f"zero1/zero2 bytes per rank within {GOAL_TOLERANCE:.0%} of "
                              "zero0 / DP", "goal_met": goal_met}))


if __name__ == "__main__":
    main()
