"""Benchmark the gradient sketches of ``--selection sketch-influence``.

Measured at DP=2 (two gloo ranks) on the demo model and on the 125M preset (with the demo
tokenizer's small vocabulary): samples sketched per second, the time to sketch a candidate
block relative to one training step on the same samples, and the bytes the scorer sends per
candidate (with and without the diversity term) against the model's gradient bytes.  Bytes are
also computed for the 125M and 1.3B presets (GPT-2 vocabulary) from the same formulas.  The last
line of output is one JSON object.

    python bench/sketch.py --data-dir runs/demo/data      # after `make demo`; ~3 min
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

    from blade_mega.engine import cpu_compat, parallel
    from blade_mega.config import parse_config
    from blade_mega.engine.model_engine import split_microbatches
    from blade_mega.train.trainer import Trainer

    cpu_compat.install()
    _, layout = parallel.init_distributed(1, 1)
    try:
        config = parse_config(argv)
        trainer = Trainer(config, layout)
        hook, learner = trainer.hook, trainer.learner
        block = hook.block_size(0)
        ids = trainer.train_data.ordered_ids(0, block)
        local = hook.read(hook.local_share(ids))
        micro = split_microbatches(local, config.data.micro_batch_size)
        normaliser = float(block * config.data.seq_length)
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
            hook.beta = beta
            hook.groups.take_sent_bytes()
            hook.block_scores(ids)
            comm[beta] = hook.groups.take_sent_bytes() / block
        params = sum(p.numel() for p in learner.module.parameters())
        return {"block": block, "local_samples": local.size(0),
                "sketch_s": float(np.median(sketch_s)), "train_s": float(np.median(train_s)),
                "comm_per_sample": comm, "num_slots": hook.sketcher.num_slots,
                "grad_bytes": 4 * params, "dp": trainer.groups.dp_size}
    finally:
        parallel.shutdown()


def main() -> None:
    from blade_mega.engine.model import PRESETS, count_parameters
    from blade_mega.testing import run_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="runs/demo/data",
                   help="pool/target _text_document and tok.model")
    p.add_argument("--models", default="demo,125m", help="presets to measure, comma-separated")
    p.add_argument("--sketch-dim", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args()
    names = ("tokenizer.model", "tok.model")  # make demo's name, and the dev machine's
    found = [os.path.join(opts.data_dir, n) for n in names
             if os.path.isfile(os.path.join(opts.data_dir, n))]
    if not found:
        raise UserError(f"{opts.data_dir}: no {' or '.join(names)}; point --data-dir at the "
                        "data directory `make demo` builds (runs/demo/data)")
    tok = found[0]
    k = opts.sketch_dim
    result = {"sketch_dim": k, "measured": {}}
    for model in opts.models.split(","):
        argv = ["--tokenizer-model", tok,
                "--data-path", os.path.join(opts.data_dir, "pool_text_document"),
                "--target-data-path", os.path.join(opts.data_dir, "target_text_document"),
                "--model-size", model, "--seq-length", str(opts.seq_length),
                "--global-batch-size", str(opts.global_batch_size), "--micro-batch-size", "4",
                "--selection", "sketch-influence", "--sketch-dim", str(k),
                "--no-progress", "--eval-interval", "0"]
        measured = run_distributed(_bench_rank, 2, argv, opts.repeats, timeout=1800)[0]
        block = measured["block"]
        predicted = sent_bytes_per_candidate(measured["num_slots"], k, block, 1,
                                             measured["dp"], False)
        result["measured"][model] = {
            "block": block, "dp": measured["dp"],
            "samples_per_s_sketched": measured["local_samples"] / measured["sketch_s"],
            "sketch_over_train_step": measured["sketch_s"] / measured["train_s"],
            "bytes_per_sample": measured["comm_per_sample"][0.0],
            "bytes_per_sample_predicted": predicted,
            "bytes_per_sample_diverse": measured["comm_per_sample"][0.1],
            "grad_bytes": measured["grad_bytes"],
            "comm_over_grad": measured["comm_per_sample"][0.0] / measured["grad_bytes"],
            "comm_over_grad_diverse": measured["comm_per_sample"][0.1] / measured["grad_bytes"],
        }
    result["goal_sketch_over_train_step_met"] = {
        name: m["sketch_over_train_step"] <= 1.5 for name, m in result["measured"].items()}
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
    result["goal_comm_met"] = result["125m"]["comm_over_grad"] <= 1e-3
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
