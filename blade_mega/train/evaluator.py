"""The ``eval`` records: held-out losses of the learner on the run's fixed evaluation samples, and
its loss and bits per byte over the whole test documents."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from blade_mega.train.flops import FlopCounter
from blade_mega.train.metrics import MetricsLog, progress


class Evaluator:
    """Every ``--eval-interval`` steps and at the last: ``valid_loss`` (the --split share of
    --data-path), ``target_loss`` (--target-data-path) and ``test_loss`` (--test-data-path),
    each over fixed windows; with --test-data-path also ``test_doc_loss`` and ``test_bpb``, the
    whole test documents in document order (``TestDocuments``); ``wall_s``, the training
    seconds behind the record (the trainer's count)."""

    def __init__(self, config, learner, streams, groups, flops: FlopCounter, log: MetricsLog,
                 tokenizer):
        self.interval = config.log.eval_interval
        self.train_iters = config.train.train_iters
        self.count = config.log.eval_iters * config.data.global_batch_size
        self.learner = learner
        self.splits = {"valid_loss": streams.valid, "target_loss": streams.target,
                       "test_loss": streams.test}
        self.groups = groups
        self.flops = flops
        self.log = log
        self.documents = (TestDocuments(config.data.test_data_path, config.data.seq_length,
                                        tokenizer, with_bytes=log.enabled)
                          if self.interval and config.data.test_data_path else None)

    def maybe_evaluate(self, iteration: int, wall_s: float) -> None:
        if self.interval and (iteration % self.interval == 0 or iteration == self.train_iters):
            self.evaluate(iteration, wall_s)

    def evaluate(self, iteration: int, wall_s: float) -> None:
        record = {"kind": "eval", "iteration": iteration,
                  "flops": self.flops.record()["flops"]["total"], "wall_s": wall_s}
        for key, windows in self.splits.items():
            if windows is not None:
                record[key] = eval_loss(self.learner, windows, self.count, self.groups)
        if self.documents is not None:
            record.update(self.documents.figures(self.learner, self.groups))
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


class TestDocuments:
    """The test set's documents as tools/evaluate.py reads them (report/evaluation.py: index
    order, chunks of the run's --seq-length, bytes of the detokenised text).

    Every rank runs the chunks (shared over DP; each replica's TP/PP ranks run the same ones)
    and gets the summed losses; only ``with_bytes`` ranks (the one that logs) detokenise the
    documents, once, here. Without a tokenizer model (--vocab-size only) there are no bytes,
    so no ``test_bpb``."""

    def __init__(self, prefix: str, seq_length: int, tokenizer, with_bytes: bool):
        from blade_mega.report import evaluation as ev

        self.dataset = ev.open_dataset(prefix)
        self.seq_length = seq_length
        self.lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        self.predicted = ev.predicted_tokens(self.lengths, seq_length)
        self.nbytes: Optional[np.ndarray] = (ev.document_bytes(self.dataset, tokenizer)
                                             if with_bytes and hasattr(tokenizer, "decode")
                                             else None)

    def figures(self, learner, groups) -> dict:
        """``test_doc_loss`` (mean token loss) and ``test_bpb`` of the learner as it is now."""
        from megatron.core import parallel_state

        from blade_mega.report import evaluation as ev

        # tools/evaluate.py's rule: one rank per replica adds its losses to the all-reduce
        scoring = groups.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
        learner.module.eval()  # the next training step sets train mode again
        nll = ev.document_losses(learner.runner, self.dataset, self.seq_length,
                                 learner.micro_batch_size, groups.dp_rank, groups.dp_size,
                                 scoring, progress(False, 0, 0))
        # no bytes (not the logging rank, or no tokenizer model): summarize gives no bpb
        nbytes = self.nbytes if self.nbytes is not None else np.zeros_like(self.lengths)
        summary = ev.summarize(nll, self.predicted, self.lengths, nbytes)
        figures = {"test_doc_loss": summary["loss"], "test_bpb": summary["bits_per_byte"]}
        return {key: value for key, value in figures.items() if value is not None}
