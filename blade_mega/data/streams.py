"""The sample indices a run reads, built from its config: the training stream and its validation
split (``--data-path`` + ``--split``, or ``--train-data-path`` / ``--valid-data-path``), the
target set V (``--target-data-path``) and the target's held-out test set (``--test-data-path``).

Each is sized for the whole run up front, as Megatron-LM sizes its splits from
``--train-iters x --global-batch-size``; here a step reads a candidate block, not a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from blade_mega.data.sample_index import DataSpec, SampleIndex, build_sample_indices, parse_blend


@dataclass
class Streams:
    train: SampleIndex
    valid: Optional[SampleIndex]
    target: Optional[SampleIndex]
    test: Optional[SampleIndex]


class VocabOnly:
    """What GPTDatasetConfig reads of a tokenizer, when the run gives --vocab-size only."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = None
        self.pad = -1

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}


def cache_path(data, first_prefix: str) -> str:
    return data.data_cache_path or os.path.join(
        os.path.dirname(os.path.abspath(first_prefix)), "cache")


def build_streams(config, tokenizer, vocab_size: int) -> Streams:
    """The run's four streams (a ``RunConfig``)."""
    data, train_iters = config.data, config.train.train_iters
    eval_count = config.log.eval_iters * data.global_batch_size + data.micro_batch_size * 64
    # A step reads at most its whole candidate block (its reweighted share reads none, but
    # sizing by the block keeps one index, and one cache, for every --reweight-mix). Dropped
    # (non-finite) steps move past their block too: room for the most that can happen.
    train_count = (train_iters + config.train.max_bad_steps) * config.method_spec.candidates(config)
    if data.train_data_path is not None:
        train_blend = parse_blend(list(data.train_data_path), "--train-data-path")
        valid_blend = (parse_blend(list(data.valid_data_path), "--valid-data-path")
                       if data.valid_data_path else None)
        spec = DataSpec(blend_per_split=[train_blend, valid_blend, None])
    else:
        train_blend = parse_blend(list(data.data_path))
        spec = DataSpec(blend=train_blend, split=data.split)
    common = dict(seq_length=data.seq_length, seed=data.seed, vocab_size=vocab_size,
                  cache_path=cache_path(data, train_blend[0][0]))
    train, valid, _ = build_sample_indices(spec, [train_count, eval_count, eval_count],
                                           tokenizer, **common)

    def single(prefix: Optional[str], flag: str, count: int) -> Optional[SampleIndex]:
        if not prefix:
            return None
        one = DataSpec(blend=parse_blend([prefix], flag), split="1,0,0")
        return build_sample_indices(one, [count, None, None], tokenizer, **common)[0]

    # V feeds the reference (or influence) at most one global batch per step.
    target = single(data.target_data_path, "--target-data-path",
                    max(train_iters * data.global_batch_size, eval_count))
    test = single(data.test_data_path, "--test-data-path", eval_count)
    return Streams(train, valid, target, test)
