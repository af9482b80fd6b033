"""The sample indices a run reads, built from its flags: the training stream and its validation
split (``--data-path`` + ``--split``, or ``--train-data-path`` / ``--valid-data-path``), the
target set V (``--target-data-path``) and the target's held-out test set (``--test-data-path``).

Each is sized for the whole run up front, as Megatron-LM sizes its splits from
``--train-iters x --global-batch-size``; here a step reads a candidate block, not a batch.
"""

from __future__ import annotations

import argparse
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


def block_size(args: argparse.Namespace) -> int:
    """The most reading positions one step can consume: its whole candidate block. (Its
    reweighted share reads none, but sizing by the block keeps one index, and one cache, for
    every --reweight-mix.)"""
    if args.selection != "uniform" and args.selection_granularity == "sample":
        return int(round(args.global_batch_size / args.keep_ratio))
    return args.global_batch_size


def cache_path(args: argparse.Namespace, first_prefix: str) -> str:
    return args.data_cache_path or os.path.join(
        os.path.dirname(os.path.abspath(first_prefix)), "cache")


def build_streams(args: argparse.Namespace, tokenizer, vocab_size: int) -> Streams:
    eval_count = args.eval_iters * args.global_batch_size + args.micro_batch_size * 64
    # Dropped (non-finite) steps move past their block too: room for the most that can happen.
    train_count = (args.train_iters + args.max_bad_steps) * block_size(args)
    if args.train_data_path is not None:
        train_blend = parse_blend(args.train_data_path, "--train-data-path")
        valid_blend = (parse_blend(args.valid_data_path, "--valid-data-path")
                       if args.valid_data_path else None)
        spec = DataSpec(blend_per_split=[train_blend, valid_blend, None])
    else:
        train_blend = parse_blend(args.data_path)
        spec = DataSpec(blend=train_blend, split=args.split)
    common = dict(seq_length=args.seq_length, seed=args.seed, vocab_size=vocab_size,
                  cache_path=cache_path(args, train_blend[0][0]))
    train, valid, _ = build_sample_indices(spec, [train_count, eval_count, eval_count],
                                           tokenizer, **common)

    def single(prefix: Optional[str], flag: str, count: int) -> Optional[SampleIndex]:
        if not prefix:
            return None
        one = DataSpec(blend=parse_blend([prefix], flag), split="1,0,0")
        return build_sample_indices(one, [count, None, None], tokenizer, **common)[0]

    # V feeds the reference (or influence) at most one global batch per step.
    target = single(args.target_data_path, "--target-data-path",
                    max(args.train_iters * args.global_batch_size, eval_count))
    test = single(args.test_data_path, "--test-data-path", eval_count)
    return Streams(train, valid, target, test)
