"""Benchmark the gradient sketches of ``--selection sketch-influence``.

Measured on the demo model at DP=2 (two gloo ranks): samples sketched per second, the time to
sketch a candidate block relative to one training step on the same samples, and the bytes the
scorer sends per candidate (with and without the diversity term) against the model's gradient
bytes.  Computed for the 125M and 1.3B presets from the same formulas.  The last line of output
is one JSON object.

    python bench/sketch.py --data-dir /tmp/dd
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from blade_mega.errors import UserError, run_cli

GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 128


def sent_bytes_per_candidate(num_slots: int, k: int, block: int, mp: int, dp: int,
                             diverse: bool) -> float:
    """Bytes one rank sends per candidate, with the selector's accounting (ring all-reduce sends
    2(g-1)/g of the tensor, all-gather sends (g-1) times the local part)."""
    floats = num_slots * k * k
    reduce = lambda g: 2 * (g - 1) / g  # noqa: E731
    target = 4 * floats * (reduce(mp) + reduce(dp)) / block  # g_V, once per block
    local = block // dp
    if diverse:
        per_block = 4 * local * floats * (reduce(mp) + (dp - 1))
    else:
        per_block = 4 * local * (reduce(mp) + (dp - 1))
    return target + per_block / block


def _bench_rank(argv: list[str], repeats: int) -> dict:
    import torch

    from blade_mega import cpu_compat, parallel
    from blade_mega.config import parse_args
    from blade_mega.engine import split_microbatches
    from blade_mega.pretrain import Trainer

    cpu_compat.install()
    _, layout = parallel.init_distributed(1, 1)
    try:
        args = parse_args(argv)
        trainer = Trainer(args, layout)
        hook, learner = trainer.hook, trainer.learner
        block = hook.block_size(0)
        ids = trainer.train_data.ordered_ids(0, block)
        local = hook.read(hook.local_share(ids))
        micro = split_microbatches(local, args.micro_batch_size)
        normaliser = float(block * args.seq_length)
        learner.train_step(micro, normaliser, 1e-4)  # warm both paths up
        hook.sketcher.sketch(local)
        sketch_s, train_s = [], []
        for _ in range(repeats):
            torch.distributed.barrier()
            started = time.perf_counter()
            hook.sketcher.sketch(local)
            sketch_s.append(time.perf_counter() - started)
            torch.distributed.barrier()
            started = time.perf_counter()
            learner.train_step(micro, normaliser, 1e-4)
            train_s.append(time.perf_counter() - started)
        comm = {}
        for beta in (0.0, 0.1):
            hook.beta, hook.comm_bytes = beta, 0
            hook.block_scores(ids)
            comm[beta] = hook.comm_bytes / block
        params = sum(p.numel() for p in learner.module.parameters())
        return {"block": block, "local_samples": local.size(0),
                "sketch_s": float(np.median(sketch_s)), "train_s": float(np.median(train_s)),
                "comm_per_sample": comm, "num_slots": hook.sketcher.num_slots,
                "grad_bytes": 4 * params, "dp": trainer.groups.dp_size}
    finally:
        parallel.shutdown()


def main() -> None:
    from blade_mega.model import PRESETS, count_parameters
    from blade_mega.testing import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/dd", help="pool/target _text_document and tok.model")
    p.add_argument("--sketch-dim", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args()
    tok = os.path.join(opts.data_dir, "tok.model")
    if not os.path.isfile(tok):
        raise UserError(f"{tok}: not found; point --data-dir at a demo data directory")
    argv = ["--tokenizer-model", tok,
            "--data-path", os.path.join(opts.data_dir, "pool_text_document"),
            "--target-data-path", os.path.join(opts.data_dir, "target_text_document"),
            "--model-size", "demo", "--seq-length", str(opts.seq_length),
            "--global-batch-size", str(opts.global_batch_size), "--micro-batch-size", "4",
            "--selection", "sketch-influence", "--sketch-dim", str(opts.sketch_dim),
            "--no-progress", "--eval-interval", "0"]
    measured = run_distributed(_bench_rank, 2, argv, opts.repeats, timeout=1800)[0]
    k, block = opts.sketch_dim, measured["block"]
    demo_predicted = sent_bytes_per_candidate(measured["num_slots"], k, block, 1,
                                              measured["dp"], False)
    result = {
        "sketch_dim": k,
        "demo": {
            "block": block, "dp": measured["dp"],
            "samples_per_s_sketched": measured["local_samples"] / measured["sketch_s"],
            "sketch_over_train_step": measured["sketch_s"] / measured["train_s"],
            "bytes_per_sample": measured["comm_per_sample"][0.0],
            "bytes_per_sample_predicted": demo_predicted,
            "bytes_per_sample_diverse": measured["comm_per_sample"][0.1],
            "grad_bytes": measured["grad_bytes"],
            "comm_over_grad": measured["comm_per_sample"][0.0] / measured["grad_bytes"],
            "comm_over_grad_diverse": measured["comm_per_sample"][0.1] / measured["grad_bytes"],
        },
    }
    # Layouts for the presets: (TP, PP, DP, global batch); keep ratio 0.5.
    for name, (tp, pp, dp, batch) in {"125m": (1, 1, 8, 256), "1.3b": (2, 2, 8, 512)}.items():
        size = PRESETS[name]
        grad = 4 * count_parameters(size, GPT2_VOCAB)
        slots = 4 * size.num_layers + 1
        plain = sent_bytes_per_candidate(slots, k, 2 * batch, tp * pp, dp, False)
        diverse = sent_bytes_per_candidate(slots, k, 2 * batch, tp * pp, dp, True)
        result[name] = {"layout": {"tp": tp, "pp": pp, "dp": dp, "block": 2 * batch},
                        "grad_bytes": grad, "bytes_per_sample": plain,
                        "comm_over_grad": plain / grad, "bytes_per_sample_diverse": diverse,
                        "comm_over_grad_diverse": diverse / grad}
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
