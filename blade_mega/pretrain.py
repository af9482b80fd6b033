"""Pretrain a Megatron-Core GPT under DeepSpeed ZeRO, with online data selection as a plug-in.

One CPU process, the tiny model on the demo data (``make demo`` builds it under runs/demo/data)::

    python -m blade_mega.pretrain --tokenizer-model runs/demo/data/tokenizer.model \\
        --data-path runs/demo/data/pool_text_document \\
        --target-data-path runs/demo/data/target_text_document \\
        --selection blade --train-iters 50 --save runs/try

Two ranks with tensor parallelism (torchrun; launch/ has deepspeed, Slurm and mpiexec scripts)::

    torchrun --nproc_per_node 2 -m blade_mega.pretrain --tensor-model-parallel-size 2 ...

Print the resolved configuration and parallel layout without training: add ``--dry-run``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
import zlib
from typing import Optional, Sequence

import numpy as np
import torch

from blade_mega import quiet  # first: its filters must be in place before megatron.core imports

quiet.install()

from blade_mega.engine import cpu_compat  # noqa: E402
from blade_mega.train import checkpoint  # noqa: E402
from blade_mega.config import check_layout, model_size, parse_args  # noqa: E402
from blade_mega.engine.cpu_compat import cuda_available  # noqa: E402
from blade_mega.errors import UserError, run_cli  # noqa: E402
from blade_mega.train.flops import TRAIN, FlopCounter  # noqa: E402
from blade_mega.train.metrics import MetricsLog, peak_rss_bytes, process_age_s, progress  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_cli(lambda: pretrain(parse_args(argv)))


def tokenizer(args: argparse.Namespace):
    """The tokenizer (or, with --vocab-size only, what megatron.core's datasets read of one)."""
    if args.tokenizer_model:
        from blade_mega.data.tokenizer import Tokenizer

        return Tokenizer.load(args.tokenizer_model)
    from blade_mega.data.streams import VocabOnly

    return VocabOnly(args.vocab_size)


def vocab_size(args: argparse.Namespace) -> int:
    return tokenizer(args).vocab_size


def dry_run(args: argparse.Namespace) -> None:
    """The resolved config, layout and memory plan; no process group, no data read. The world
    is ``--world-size`` (plan a cluster run from a laptop) or the launcher's."""
    from blade_mega.engine import device_path, ds_config, plan
    from blade_mega.engine.parallel import discover_process

    proc = discover_process()
    world_size = args.world_size or proc.world_size
    figures = plan.plan(args, world_size, vocab_size(args))
    ds_config.for_run(args, figures["layout"]["dp"])
    if proc.rank == 0:
        for line in [f"device path here: {device_path.detect().describe(args.bf16)}",
                     *plan.describe(figures)]:
            print(line)
        resolved = {k: v for k, v in vars(args).items() if k != "split_weights"}
        print(json.dumps({"config": resolved, "model": model_size(args).__dict__,
                          "launcher": proc.launcher, **figures}, default=str))


def pretrain(args: argparse.Namespace) -> int:
    if args.dry_run:
        dry_run(args)
        return 0
    from blade_mega.engine import parallel

    cpu_compat.install()
    trainer = None
    try:
        _, layout = parallel.init_distributed(args.tensor_model_parallel_size,
                                              args.pipeline_model_parallel_size,
                                              args.distributed_timeout_minutes)
        trainer = Trainer(args, layout)
        return trainer.train()
    finally:
        # pretrain() may run again in this process (a notebook, a sweep driver): nothing of this
        # run (model, optimizer, log, process groups and their connections) may outlive it.
        try:
            if trainer is not None:
                trainer.close()
                trainer = None
        finally:
            parallel.shutdown()


class Trainer:
    """Builds the parts, then runs the loop. Each part lives in its own module."""

    def __init__(self, args: argparse.Namespace, layout):
        self.engines: list = []  # every DeepSpeed engine built, for close()
        try:
            self._build(args, layout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the log and destroy the DeepSpeed engines: ZeRO's gradient hooks hold the
        parameters (and the data-parallel group each parameter names) in a cycle through
        autograd that the garbage collector cannot see, so without this every run's model would
        outlive it. Cleanup never raises: it runs while another error may be on its way out."""
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
        prefetcher = getattr(self, "prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()
        while self.engines:
            engine = self.engines.pop()
            try:
                engine.destroy()
            except Exception as err:  # noqa: BLE001 - reported, and the next engine still goes
                warnings.warn(f"could not release a DeepSpeed engine: {err}")

    def _build(self, args: argparse.Namespace, layout) -> None:
        from megatron.core import parallel_state, tensor_parallel

        from blade_mega.engine import device_path, ds_config, plan
        from blade_mega.data.block_sampler import CandidateBlockSampler
        from blade_mega.data.prefetch import Prefetcher
        from blade_mega.data.streams import build_streams
        from blade_mega.engine.model_engine import check_zero_schedule
        from blade_mega.config import selection_config
        from blade_mega.engine.model import padded_vocab_size
        from blade_mega.selection import make_hook
        from blade_mega.selection.base import ProcessGroups, SelectionContext
        from blade_mega.selection.record import SelectionRecord, load_noise_labels

        self.args = args
        self.layout = layout
        self.num_microbatches = check_layout(args, layout.dp)
        check_zero_schedule(args.zero_stage, self.num_microbatches)
        ds_config.for_run(args, layout.dp)  # a --deepspeed-config at odds with the flags fails here
        device_path.detect().check(args)
        plan.check_model_layout(model_size(args), layout.tp, layout.pp, args)
        self.rank = torch.distributed.get_rank()
        tok = tokenizer(args)
        self.vocab = tok.vocab_size
        torch.manual_seed(args.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)

        streams = build_streams(args, tok, self.vocab)
        self.train_data, self.valid_data = streams.train, streams.valid
        self.target_data, self.test_data = streams.target, streams.test
        self.prefetcher = Prefetcher(self.train_data)
        self.size = model_size(args)
        self.learner = self.build_engine(self.size, False)
        self.groups = ProcessGroups(
            dp=parallel_state.get_data_parallel_group(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_group(),
            mp=parallel_state.get_model_parallel_group(),
            is_last_stage=parallel_state.is_pipeline_last_stage(),
            pp_size=parallel_state.get_pipeline_model_parallel_world_size())
        record = SelectionRecord(self.train_data,
                                 *load_noise_labels(args.noise_labels, self.train_data))
        # Analytic FLOPs by role (blade_mega/train/flops.py), over the padded vocab the model computes.
        self.flops = FlopCounter(padded_vocab_size(self.vocab, layout.tp,
                                                   args.make_vocab_size_divisible_by),
                                 args.seq_length)
        ctx = SelectionContext(config=selection_config(args), learner=self.learner,
                               train=self.train_data, target=self.target_data,
                               groups=self.groups, build_engine=self.build_engine,
                               learner_size=self.size, record=record, flops=self.flops)
        self.hook = make_hook(args.selection, ctx)
        self.sampler = CandidateBlockSampler(self.train_data, args.seed, args.reweight_mix,
                                             record.sidecars if self.hook.keeps_sidecar else None)
        self.log = MetricsLog(args.log_file or (os.path.join(args.save, "log.jsonl")
                                                if args.save else None),
                              args.tensorboard_dir, enabled=self.rank == 0)
        self.iteration = 0
        self.consumed = 0
        self.bad_steps = 0
        self.saved_iteration = -1  # the iteration whose checkpoint is already in --save

    def build_engine(self, size, offload: bool):
        from blade_mega.engine import ds_config
        from blade_mega.engine.model_engine import ModelEngine, initialize_engine
        from blade_mega.engine.model import build_gpt, padded_vocab_size, speed_options

        args = self.args
        vocab = padded_vocab_size(self.vocab, self.layout.tp, args.make_vocab_size_divisible_by)
        model = build_gpt(size, vocab, seed=args.seed, bf16=args.bf16,
                          init_std=args.init_method_std, options=speed_options(args))
        engine = initialize_engine(model, ds_config.for_run(args, self.layout.dp, offload))
        self.engines.append(engine)
        return ModelEngine(engine, args.seq_length, args.micro_batch_size)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> int:
        from blade_mega.engine.model_engine import learning_rate

        from blade_mega.engine import device_path

        args = self.args
        path = device_path.detect().describe(args.bf16)
        if self.rank == 0:
            print(f"blade-pretrain: {path}", file=sys.stderr, flush=True)
        self.log.write({"kind": "start", "iteration": 0, "device_path": path,
                        "world_size": torch.distributed.get_world_size(),
                        "tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                        "selection": args.selection, "microbatches_per_step": self.num_microbatches,
                        # what --reference-model auto resolved to
                        "reference_model": args.reference_model})
        if args.load and not args.finetune:
            self.load()
        else:
            if args.load:
                tag = checkpoint.load_weights(args.load, self.learner.engine, self.layout)
                self.log.write({"kind": "finetune", "iteration": 0, "path": args.load, "tag": tag})
            self.hook.before_training()
        bar = progress(self.rank == 0 and not args.no_progress, args.train_iters, self.iteration)
        window: list[dict] = []
        first_step = True
        while self.iteration < args.train_iters:
            step = self.iteration
            started = time.perf_counter()
            block = self.sampler.block(step, self.consumed, self.hook.block_size(step))
            # Read the next block's in-order samples while this step runs.
            self.prefetcher.start_step(self.train_data.ordered_ids(
                self.consumed + block.consumed,
                self.sampler.in_order_size(self.hook.block_size(step + 1))))
            batch = self.hook.select(step, block.ids)
            hook_time = time.perf_counter() - started
            lr = learning_rate(step, lr=args.lr, min_lr=args.min_lr,
                               warmup_steps=args.lr_warmup_iters, total_steps=args.train_iters)
            losses, finite = self.learner.train_step(
                self.hook.microbatches(batch), batch.normaliser, lr, batch.weight_fn)
            self.flops.add("learner", self.size, args.global_batch_size, TRAIN)  # spent either way
            if not finite:
                self.on_bad_step(step, block.consumed)
                continue
            self.bad_steps = 0
            after = time.perf_counter()
            stats = self.hook.after_step(step, batch, lr)
            for model, count in stats.pop("dropped_steps", {}).items():  # reference, proxy
                self.log.write({"kind": "bad_step", "model": model, "iteration": step,
                                "count": count})
            hook_time += time.perf_counter() - after
            self.iteration += 1
            self.consumed += block.consumed
            window.append({"loss": losses, "time": time.perf_counter() - started,
                           "hook_time": hook_time, "stats": stats,
                           "ids": zlib.crc32(np.ascontiguousarray(block.ids).tobytes())})
            bar.update()
            if first_step:  # time to first step: start-up (index build or cache) + one step
                window[-1]["startup_s"] = process_age_s()
                first_step = False
            if self.iteration % args.log_interval == 0 or self.iteration == args.train_iters:
                self.write_train_log(window, lr)
                window = []
            if args.eval_interval and (self.iteration % args.eval_interval == 0
                                       or self.iteration == args.train_iters):
                self.evaluate()
            if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                self.save()
            if args.exit_interval and self.iteration % args.exit_interval == 0:
                break
        bar.close()
        if args.save and (not args.save_interval or self.iteration % args.save_interval):
            self.save()
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, peak_rss_bytes())
        self.log.write({"kind": "end", "iteration": self.iteration, "peak_rss_bytes": peaks,
                        "prefetch_hits": self.prefetcher.hits,
                        "prefetch_misses": self.prefetcher.misses})
        self.log.close()
        return 0

    def on_bad_step(self, step: int, consumed: int) -> None:
        self.bad_steps += 1
        self.log.write({"kind": "bad_step", "iteration": step, "consecutive": self.bad_steps})
        if self.bad_steps >= self.args.max_bad_steps:
            if self.args.save and self.iteration > 0:
                self.save()
            raise UserError(f"{self.bad_steps} consecutive non-finite losses at iteration {step}"
                            "; lower --lr or check the data. The last good state is saved in "
                            f"{self.args.save or '(no --save given)'}")
        # The same block again would fail again: move past it.
        self.consumed += consumed

    def write_train_log(self, window: list[dict], lr: float) -> None:
        weighted = sum(w["loss"][0] for w in window)
        weight = sum(w["loss"][1] for w in window)
        seconds = sum(w["time"] for w in window)
        tokens = len(window) * self.args.global_batch_size * self.args.seq_length
        record = {"kind": "train", "iteration": self.iteration, "consumed": self.consumed,
                  "loss": weighted / max(weight, 1e-12), "lr": lr,
                  "step_time": seconds / len(window), "tokens_per_s": tokens / seconds,
                  "hook_time_share": sum(w["hook_time"] for w in window) / seconds,
                  "block_crcs": [w["ids"] for w in window]}
        startup = [w["startup_s"] for w in window if w.get("startup_s") is not None]
        if startup:
            record["startup_s"] = startup[0]
        record.update(merge_stats([w["stats"] for w in window]))
        if cuda_available():
            record["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record.update(self.flops.record())  # cumulative, by role
        self.log.write(record)

    def evaluate(self) -> None:
        args = self.args
        count = args.eval_iters * args.global_batch_size
        record = {"kind": "eval", "iteration": self.iteration,
                  "flops": self.flops.record()["flops"]["total"]}
        if self.valid_data is not None:
            record["valid_loss"] = eval_loss(self.learner, self.valid_data, count, self.groups)
        if self.target_data is not None:
            record["target_loss"] = eval_loss(self.learner, self.target_data, count, self.groups)
        if self.test_data is not None:
            record["test_loss"] = eval_loss(self.learner, self.test_data, count, self.groups)
        for key in [k for k in record if k.endswith("_loss")]:
            record[key.replace("_loss", "_ppl")] = math.exp(min(record[key], 50.0))
        self.log.write(record)

    # -- checkpoints ---------------------------------------------------------------------------
    def run_state(self) -> dict:
        return {"iteration": self.iteration, "consumed": self.consumed,
                "bad_steps": self.bad_steps, "hook": self.hook.state_dict(),
                "flops": self.flops.state_dict(),
                "args": vars(self.args), "cpu_threads": torch.get_num_threads(),
                # the architecture and tokenizer size as trained, for tools/export_hf.py
                "model": self.size.__dict__, "vocab_size": self.vocab}

    def save(self) -> None:
        if self.iteration == self.saved_iteration:
            return  # that checkpoint exists; rewriting it would put it at risk for nothing
        directory = checkpoint.save(self.args.save, self.iteration, self.learner.engine,
                                    self.run_state(), self.layout, self.hook,
                                    self.args.keep_checkpoints)
        self.saved_iteration = self.iteration
        self.log.write({"kind": "checkpoint", "iteration": self.iteration, "path": directory})

    def load(self) -> None:
        state = checkpoint.load(self.args.load, self.learner.engine, self.layout, self.hook,
                                load_optimizer=not self.args.no_load_optim)
        self.iteration = state["iteration"]
        self.consumed = state["consumed"]
        self.bad_steps = state.get("bad_steps", 0)
        self.hook.load_state_dict(state["hook"])
        self.flops.load_state_dict(state.get("flops", {}))
        threads = state.get("cpu_threads")
        if (threads is not None and threads != torch.get_num_threads() and not cuda_available()
                and torch.distributed.get_rank() == 0):
            # CPU kernels (LayerNorm's backward among them) sum per-thread partial results, so
            # their last bits depend on the thread count: the run resumes, but not bit-exactly.
            warnings.warn(f"{self.args.load}: saved by ranks with {threads} CPU threads, this "
                          f"run has {torch.get_num_threads()}; set OMP_NUM_THREADS={threads} "
                          "for a bit-exact resume")
        if self.args.save and os.path.realpath(self.args.save) == os.path.realpath(self.args.load):
            self.saved_iteration = self.iteration
        self.log.write({"kind": "resume", "iteration": self.iteration, "path": self.args.load})


def eval_loss(learner, windows, count: int, groups) -> float:
    """Mean token loss over a fixed set of ``count`` samples (the same at every evaluation)."""
    from blade_mega.engine.model_engine import comm_device

    per_rank_unit = groups.dp_size * learner.micro_batch_size
    count = max(per_rank_unit, (count // per_rank_unit) * per_rank_unit)
    ids = windows.ordered_ids(0, count)
    samples = windows.read(groups.share(ids))
    means = learner.sample_losses(samples).double()  # equal-length samples: mean of means
    totals = torch.tensor([means.sum().item(), float(means.numel())], dtype=torch.float64,
                          device=comm_device())
    torch.distributed.all_reduce(totals, group=groups.dp)
    return float(totals[0] / totals[1])


def merge_stats(stats: list[dict]) -> dict:
    """Average each numeric selection statistic over the log window."""
    merged: dict = {}
    for key in {k for s in stats for k in s}:
        values = [s[key] for s in stats if key in s]
        if all(isinstance(v, (int, float)) for v in values):
            merged[key] = float(np.mean(values))
        elif all(isinstance(v, dict) for v in values):
            merged[key] = merge_stats(values)
    return merged


if __name__ == "__main__":
    main()
