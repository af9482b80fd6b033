"""The training loop: builds the run's parts from its ``RunConfig``, then steps.

``train()`` is the whole loop; cadence lives in small components (``TrainLog``, ``Evaluator``,
``Checkpointer``) and selection in the hook (selection/base.py). Ownership: the trainer owns the
learner and every engine it builds (closed by ``close``), the prefetcher that reads the next
block ahead (plugged into the training stream here), the run position, and the
``SelectionRecord`` whose sidecars (and recently trained documents) the block sampler reads and
the checkpointer saves.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

from blade_mega.config import RunConfig
from blade_mega.errors import UserError
from blade_mega.train import safe_load
from blade_mega.train.checkpointer import Checkpointer, RunPosition
from blade_mega.train.flops import TRAIN, FlopCounter
from blade_mega.train.metrics import MetricsLog, peak_rss_bytes, progress


def tokenizer(config: RunConfig):
    """The tokenizer (or, with --vocab-size only, what megatron.core's datasets read of one)."""
    if config.model.tokenizer_model:
        from blade_mega.data.tokenizer import Tokenizer

        return Tokenizer.load(config.model.tokenizer_model)
    from blade_mega.data.streams import VocabOnly

    return VocabOnly(config.model.vocab_size)


class Trainer:
    def __init__(self, config: RunConfig, layout):
        self.engines: list = []  # every DeepSpeed engine built, for close()
        try:
            self._build(config, layout)
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
            self.train_data.read_ahead = None
            prefetcher.close()
        while self.engines:
            engine = self.engines.pop()
            try:
                engine.destroy()
            except Exception as err:  # noqa: BLE001 - reported, and the next engine still goes
                warnings.warn(f"could not release a DeepSpeed engine: {err}")

    def _build(self, config: RunConfig, layout) -> None:
        from megatron.core import parallel_state, tensor_parallel

        from blade_mega.data.block_sampler import CandidateBlockSampler
        from blade_mega.data.prefetch import Prefetcher
        from blade_mega.data.streams import build_streams
        from blade_mega.engine import device_path, ds_config, plan
        from blade_mega.engine.model import padded_vocab_size
        from blade_mega.engine.model_engine import check_zero_schedule
        from blade_mega.selection.base import ProcessGroups, SelectionContext
        from blade_mega.selection.record import SelectionRecord, load_noise_labels
        from blade_mega.train.evaluator import Evaluator
        from blade_mega.train.train_log import TrainLog

        self.config = config
        self.layout = layout
        self.trust_checkpoint = safe_load.trusted(config.checkpoint.trust_checkpoint)
        data = config.data
        self.num_microbatches = plan.microbatches_per_step(config, layout.dp)
        check_zero_schedule(config.parallel.zero_stage, self.num_microbatches)
        ds_config.for_run(config, layout.dp)  # a --deepspeed-config at odds with the flags fails
        device_path.detect().check(config.model)
        self.size = config.model.size
        plan.check_model_layout(self.size, layout.tp, layout.pp)
        self.rank = torch.distributed.get_rank()
        tok = tokenizer(config)
        self.vocab = tok.vocab_size
        torch.manual_seed(data.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(data.seed)

        self.streams = build_streams(config, tok, self.vocab)
        self.train_data, self.valid_data = self.streams.train, self.streams.valid
        self.target_data, self.test_data = self.streams.target, self.streams.test
        self.prefetcher = Prefetcher(self.train_data)
        self.train_data.read_ahead = self.prefetcher
        self.learner = self.build_engine(self.size, False)
        self.groups = ProcessGroups(
            dp=parallel_state.get_data_parallel_group(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_group(),
            mp=parallel_state.get_model_parallel_group(),
            is_last_stage=parallel_state.is_pipeline_last_stage(),
            pp_size=parallel_state.get_pipeline_model_parallel_world_size())
        priors = None
        if data.sidecar_prior != "none" and \
                not getattr(config.method_spec.selector_class(), "keeps_sidecar", False):
            raise UserError(f"--sidecar-prior {data.sidecar_prior}: --selection "
                            f"{config.selection.method} keeps no sidecar, so no keep rates start "
                            "from the prior; drop the flag or select with a method that keeps "
                            "one (blade, rho, classifier, ...)")
        if data.sidecar_prior == "classifier":
            from blade_mega.data.document_scores import read_scores

            priors = [read_scores(prefix, self.train_data.num_documents(part))
                      for part, prefix in enumerate(self.train_data.prefixes)]
        record = SelectionRecord(self.train_data,
                                 *load_noise_labels(data.noise_labels, self.train_data),
                                 half_life=data.sidecar_half_life, redraw_gap=data.redraw_gap,
                                 priors=priors)
        self.record = record
        # Analytic FLOPs by role (train/flops.py), over the padded vocab the model computes.
        self.flops = FlopCounter(padded_vocab_size(self.vocab, layout.tp,
                                                   config.model.make_vocab_size_divisible_by),
                                 data.seq_length)
        ctx = SelectionContext(config=config, learner=self.learner, train=self.train_data,
                               target=self.target_data, groups=self.groups,
                               build_engine=self.build_engine, learner_size=self.size,
                               record=record, flops=self.flops)
        self.hook = config.method_spec.build(ctx)
        keeps_sidecar = self.hook.keeps_sidecar
        self.sampler = CandidateBlockSampler(
            self.train_data, data.seed, data.reweight_mix,
            record.sidecars if keeps_sidecar else None,
            record.recently_trained if keeps_sidecar else None)
        log = config.log
        self.log = MetricsLog(log.log_file or (os.path.join(config.checkpoint.save, "log.jsonl")
                                               if config.checkpoint.save else None),
                              log.tensorboard_dir, enabled=self.rank == 0)
        self.position = RunPosition()
        self.train_log = TrainLog(self.log, self.flops, interval=log.log_interval,
                                  train_iters=config.train.train_iters,
                                  tokens_per_step=data.global_batch_size * data.seq_length)
        self.evaluator = Evaluator(config, self.learner, self.streams, self.groups, self.flops,
                                   self.log, tok)
        # Seconds this launch has spent in training steps, dropped ones included (a step: its
        # block draw to its after_step, reference syncs and training inside): the eval
        # records' ``wall_s``, so evaluations, checkpoint writes and start-up are not in it.
        self.train_seconds = 0.0
        # the architecture and tokenizer size as trained, for tools/export_hf.py
        trained_as = {"config": config.to_dict(), "model": self.size.__dict__,
                      "vocab_size": self.vocab}
        self.checkpointer = Checkpointer(config, layout, self.learner, self.position,
                                         trained_as, self.log, self.trust_checkpoint)
        self.checkpointer.register("hook", self.hook)
        self.checkpointer.register("flops", self.flops)
        if keeps_sidecar:
            self.checkpointer.register("sidecars", record)
            if record.recently_trained is not None:  # without --redraw-gap: no run state key
                self.checkpointer.register("recently_trained", record.recently_trained)

    def build_engine(self, size, offload: bool):
        from blade_mega.engine import ds_config, plan
        from blade_mega.engine.model import build_gpt, padded_vocab_size, speed_options
        from blade_mega.engine.model_engine import ModelEngine, initialize_engine

        config = self.config
        vocab = padded_vocab_size(self.vocab, self.layout.tp,
                                  config.model.make_vocab_size_divisible_by)
        model = build_gpt(size, vocab, seed=config.data.seed, bf16=config.model.bf16,
                          init_std=config.model.init_method_std,
                          options=speed_options(config.model))
        engine = initialize_engine(model, ds_config.for_run(config, self.layout.dp, offload),
                                   self.trust_checkpoint)
        self.engines.append(engine)
        micro = score_micro = config.data.micro_batch_size
        if size != self.size:  # a small model: fewer, larger launches
            dp = self.layout.dp
            micro, score_micro = plan.small_model_micro_batches(
                size, config, tp=self.layout.tp, pp=self.layout.pp, vocab=self.vocab,
                local_batch=config.data.global_batch_size // dp,
                local_block=config.method_spec.candidates(config) // dp)
        return ModelEngine(engine, config.data.seq_length, micro, score_micro)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> int:
        position, iters = self.position, self.config.train.train_iters
        self.start()
        bar = progress(self.rank == 0 and not self.config.log.no_progress, iters,
                       position.iteration)
        while position.iteration < iters:
            step = position.iteration
            started = time.perf_counter()
            self.record.begin_step(step)
            block = self.sampler.block(step, position.consumed, self.hook.block_size(step))
            self.read_ahead(step, block)
            batch = self.hook.select(step, block.ids)
            hook_time = time.perf_counter() - started
            lr = self.learning_rate(step)
            losses, finite = self.learner.train_step(
                self.hook.microbatches(batch), batch.normaliser, lr, batch.weight_fn)
            self.flops.add("learner", self.size, self.config.data.global_batch_size, TRAIN)
            if not finite:  # the step was dropped; its compute was spent all the same
                self.train_seconds += time.perf_counter() - started
                self.on_bad_step(step, block.consumed)
                continue
            position.bad_steps = 0
            after = time.perf_counter()
            stats = self.hook.after_step(step, batch, lr)
            hook_time += time.perf_counter() - after
            position.iteration += 1
            position.consumed += block.consumed
            self.train_log.step(step, losses, started, hook_time, stats, block.ids)
            self.train_seconds += time.perf_counter() - started
            bar.update()
            self.train_log.maybe_write(position.iteration, position.consumed, lr)
            self.evaluator.maybe_evaluate(position.iteration, self.train_seconds)
            self.checkpointer.maybe_save(position.iteration)
            exit_interval = self.config.train.exit_interval
            if exit_interval and position.iteration % exit_interval == 0:
                break
        bar.close()
        self.finish()
        return 0

    def start(self) -> None:
        """The start record, then resume (--load), or the weights alone (--load --finetune)
        and the hook's fresh start."""
        from blade_mega.engine import device_path

        path = device_path.detect().describe(self.config.model.bf16)
        if self.rank == 0:
            print(f"blade-pretrain: {path}", file=sys.stderr, flush=True)
        self.log.write({"kind": "start", "iteration": 0, "device_path": path,
                        "world_size": torch.distributed.get_world_size(),
                        "tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                        "selection": self.config.selection.method,
                        "microbatches_per_step": self.num_microbatches,
                        # what --reference-model auto resolved to
                        "reference_model": self.config.selection.proxy or "same"})
        if self.config.checkpoint.load and not self.config.checkpoint.finetune:
            self.checkpointer.load()
            return
        if self.config.checkpoint.load:
            self.checkpointer.load_weights()
        self.hook.before_training()

    def read_ahead(self, step: int, block) -> None:
        """Read the next block's in-order samples while this step runs."""
        following = self.sampler.in_order_size(self.hook.block_size(step + 1))
        self.prefetcher.start_step(self.train_data.ordered_ids(
            self.position.consumed + block.consumed, following))

    def learning_rate(self, step: int) -> float:
        from blade_mega.engine.model_engine import learning_rate

        train = self.config.train
        return learning_rate(step, lr=train.lr, min_lr=train.min_lr,
                             warmup_steps=train.lr_warmup_iters, total_steps=train.train_iters)

    def on_bad_step(self, step: int, consumed: int) -> None:
        position = self.position
        position.bad_steps += 1
        self.log.write({"kind": "bad_step", "iteration": step,
                        "consecutive": position.bad_steps})
        if position.bad_steps >= self.config.train.max_bad_steps:
            save = self.config.checkpoint.save
            if save and position.iteration > 0:
                self.checkpointer.save()
            raise UserError(f"{position.bad_steps} consecutive non-finite losses at iteration "
                            f"{step}; lower --lr or check the data. The last good state is saved "
                            f"in {save or '(no --save given)'}")
        # The same block again would fail again: move past it.
        position.consumed += consumed

    def finish(self) -> None:
        self.checkpointer.save_at_end(self.position.iteration)
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, peak_rss_bytes())
        self.log.write({"kind": "end", "iteration": self.position.iteration,
                        "peak_rss_bytes": peaks, "prefetch_hits": self.prefetcher.hits,
                        "prefetch_misses": self.prefetcher.misses})
        self.log.close()
