"""The ``eval`` records: held-out losses of the learner on the run's fixed evaluation samples."""

from __future__ import annotations

import math

import torch

from blade_mega.train.flops import FlopCounter
from blade_mega.train.metrics import MetricsLog


class Evaluator:
    """Every ``--eval-interval`` steps and at the last: ``valid_loss`` (the --split share of
    --data-path), ``target_loss`` (--target-data-path) and ``test_loss`` (--test-data-path)."""

    def __init__(self, config, learner, streams, groups, flops: FlopCounter, log: MetricsLog):
        self.interval = config.log.eval_interval
        self.train_iters = config.train.train_iters
        self.count = config.log.eval_iters * config.data.global_batch_size
        self.learner = learner
        self.splits = {"valid_loss": streams.valid, "target_loss": streams.target,
                       "test_loss": streams.test}
        self.groups = groups
        self.flops = flops
        self.log = log

    def maybe_evaluate(self, iteration: int) -> None:
        if self.interval and (iteration % self.interval == 0 or iteration == self.train_iters):
            self.evaluate(iteration)

    def evaluate(self, iteration: int) -> None:
        record = {"kind": "eval", "iteration": iteration,
                  "flops": self.flops.record()["flops"]["total"]}
        for key, windows in self.splits.items():
            if windows is not None:
                record[key] = eval_loss(self.learner, windows, self.count, self.groups)
        for key in [k for k in record if k.endswith("_loss")]:
            record[key.replace("_loss", "_ppl")] = math.exp(min(record[key], 50.0))
        self.log.write(record)


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
