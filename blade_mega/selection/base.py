"""The selection plug-in interface: what the loop calls, what a hook gets, what it returns.

The loop calls a hook at fixed points, like OLMo-core's ``Callback(Stateful)``:

    hook.before_training()                  # once, on a fresh start (not on resume)
    block = sampler.block(step, consumed, hook.block_size(step))   # candidate ids (global)
    batch = hook.select(step, block.ids)    # this rank's samples + token weights
    losses = learner.train_step(...)        # masked loss in Megatron's forward step
    stats = hook.after_step(step, batch, lr)         # StepStats: reference sync/training
    hook.state_dict() / hook.load_state_dict()       # its small state, in the run state file
    hook.save_files(dir) / hook.load_files(dir)      # its own engines' files, if any

A hook gets everything it needs in a ``SelectionContext``: the frozen ``RunConfig`` (never the
flags), process groups passed in (never looked up from globals inside the hook), the run's
``SelectionRecord`` (sidecars, kept/noise statistics) and its ``FlopCounter``. The sidecars are
the record's, saved by the checkpointer as a part of their own; hooks only report to them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from blade_mega.config import RunConfig
from blade_mega.data.sample_index import SampleIndex
from blade_mega.engine.model_engine import ModelEngine, comm_device, split_microbatches
from blade_mega.errors import UserError
from blade_mega.train.flops import FlopCounter
from blade_mega.engine.model import ModelSize
from blade_mega.selection.record import SelectionRecord


@dataclass
class ProcessGroups:
    """The groups a hook communicates over, this rank's place in them, and the hook's only
    collectives, which count the bytes this rank sends (``take_sent_bytes``)."""
    dp: object
    dp_rank: int
    dp_size: int
    pp: object
    mp: object  # tensor x pipeline: one whole model replica
    is_last_stage: bool
    pp_size: int = 1
    sent_bytes: int = 0

    def share(self, ids: np.ndarray) -> np.ndarray:
        """This DP rank's contiguous share of a global id list."""
        per_rank = len(ids) // self.dp_size
        return ids[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def all_gather(self, tensor: torch.Tensor, group) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order, on the comm device."""
        size = torch.distributed.get_world_size(group)
        tensor = tensor.to(comm_device()).contiguous()
        if size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(size)]
        torch.distributed.all_gather(parts, tensor, group=group)
        self.sent_bytes += (size - 1) * tensor.numel() * tensor.element_size()
        return torch.cat(parts)

    def all_reduce(self, tensor: torch.Tensor, group) -> torch.Tensor:
        """Sum over ``group`` (ring all-reduce: 2 (n-1)/n of the tensor sent per rank)."""
        size = torch.distributed.get_world_size(group)
        tensor = tensor.to(comm_device()).contiguous()
        if size > 1:
            torch.distributed.all_reduce(tensor, group=group)
            self.sent_bytes += 2 * (size - 1) * tensor.numel() * tensor.element_size() // size
        return tensor

    def gather_dp(self, local: torch.Tensor) -> np.ndarray:
        """Per-sample values of this rank's DP share -> the whole block's, on every rank."""
        return self.all_gather(local, self.dp).cpu().numpy().copy()

    def count(self, nbytes: int) -> None:
        """Bytes sent by a collective that runs elsewhere (pipeline broadcasts of losses)."""
        self.sent_bytes += nbytes

    def take_sent_bytes(self) -> int:
        sent, self.sent_bytes = self.sent_bytes, 0
        return sent


@dataclass
class SelectionContext:
    config: RunConfig
    learner: ModelEngine
    train: SampleIndex
    target: Optional[SampleIndex]
    groups: ProcessGroups
    build_engine: Callable[[ModelSize, bool], ModelEngine]  # (size, offload) -> new model+engine
    learner_size: ModelSize
    record: SelectionRecord
    flops: FlopCounter

    @property
    def global_batch(self) -> int:
        return self.config.data.global_batch_size

    @property
    def tokens_per_sample(self) -> int:
        return self.config.data.seq_length


@dataclass
class TrainBatch:
    """What this DP rank trains on in one step."""
    ids: np.ndarray               # global sample ids, this rank's share
    samples: torch.Tensor         # [n, s+1] token windows
    weights: torch.Tensor         # [n, s] per-token loss weights (alpha)
    normaliser: float             # total weight of the global batch (fixed before the step)
    # Token level: decides each micro-batch's weights from the learner's losses inside its
    # training forward (engine.ModelEngine.train_step calls it on the last stage).
    weight_fn: Optional[Callable] = None
    candidates: Optional[np.ndarray] = None  # the whole block (global ids), when selecting
    stats: dict = field(default_factory=dict)


@dataclass
class StepStats:
    """What a hook reports after a step: ``values`` (numbers, or dicts of numbers) are averaged
    over the log window into the ``train`` record; ``dropped_steps`` counts, by model
    (``reference``, ``proxy``), the non-finite steps of the hook's own models that it dropped,
    which the loop logs as ``bad_step`` records."""
    values: dict = field(default_factory=dict)
    dropped_steps: dict = field(default_factory=dict)


class SelectionHook:
    """Base class of every selection plug-in: helpers and the default (no-op) call points.

    Selectors that score candidates set ``keeps_sidecar`` and report each selection round with
    ``train_on_kept`` (sample level) or ``record_selection``, so the sidecar, its checkpointing
    and the kept and noise statistics are the same for all of them (``SelectionRecord``).
    """

    keeps_sidecar = False
    score_name = "score"  # what a selector scores: names its <score_name>_kept/_dropped stats

    def __init__(self, ctx: SelectionContext):
        self.ctx = ctx
        self.config = ctx.config
        self.groups = ctx.groups

    # -- the loop's call points -------------------------------------------------------------
    def block_size(self, step: int) -> int:
        return self.ctx.global_batch

    def before_training(self) -> None:
        """Once, on a fresh start (or a --finetune start, after its weights are loaded); a
        resumed run restores what it set up from the checkpoint instead."""

    def select(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        raise NotImplementedError

    def after_step(self, step: int, batch: TrainBatch, lr: float) -> StepStats:
        return StepStats(dict(batch.stats))

    def state_dict(self) -> dict:
        """The hook's small run state (per rank), stored in the run state file."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_files(self, directory: str) -> None:
        """Save the hook's own model engines into ``directory`` (a checkpoint's)."""

    def load_files(self, directory: str, load_optimizer: bool = True) -> None:
        """Load what ``save_files`` wrote (without optimizer state if not ``load_optimizer``)."""

    # -- helpers for plug-ins ----------------------------------------------------------------
    def local_share(self, ids: np.ndarray) -> np.ndarray:
        return self.groups.share(ids)

    def read(self, ids: np.ndarray) -> torch.Tensor:
        return self.ctx.train.read(ids)

    def uniform_batch(self, block_ids: np.ndarray) -> TrainBatch:
        """The block as read, every token weighted 1 (uniform, and any warm-up step)."""
        ids = self.local_share(block_ids)
        samples = self.read(ids)
        weights = torch.ones(samples.size(0), samples.size(1) - 1)
        stats = self.ctx.record.trained_all(block_ids)
        return TrainBatch(ids, samples, weights, self.uniform_normaliser(), stats=stats)

    def candidate_block(self) -> int:
        """Size of a candidate block (the method's rule, ``MethodSpec.candidates``), which each
        DP rank scores in whole micro-batches."""
        config = self.config
        block = config.method_spec.candidates(config)
        unit = self.groups.dp_size * config.data.micro_batch_size
        if block % unit:
            raise UserError(
                f"--selection {config.selection.method} scores a block of {block} = "
                f"--global-batch-size / --keep-ratio samples, which must be a multiple of "
                f"--micro-batch-size x data-parallel size = {unit}; adjust --keep-ratio or the "
                "batch sizes")
        return block

    def train_on(self, block_ids: np.ndarray, keep: np.ndarray, stats: dict) -> TrainBatch:
        """The batch of the kept block positions ``keep``: this DP rank's share, all weights 1."""
        ids = self.local_share(block_ids[keep])
        samples = self.read(ids)
        weights = torch.ones(samples.size(0), samples.size(1) - 1)
        return TrainBatch(ids, samples, weights, self.uniform_normaliser(),
                          candidates=block_ids, stats=stats)

    def train_on_kept(self, block_ids: np.ndarray, keep: np.ndarray, scores: np.ndarray
                      ) -> TrainBatch:
        """Sample level: record the round and train on the block positions ``keep`` (chosen among
        finite scores). Too few finite scores are topped up with unscored candidates in block
        order; none at all trains on the block's first samples, with a warning."""
        batch = self.ctx.global_batch
        stats = {"nonfinite_scores": float((~np.isfinite(scores)).sum())}
        if len(keep) == 0:
            warnings.warn(f"no finite scores in a block of {len(block_ids)}; training on the "
                          "block's first samples uniformly this step")
            keep = np.arange(batch)
            stats["uniform_fallback"] = 1.0
        elif len(keep) < batch:
            unscored = np.flatnonzero(~np.isfinite(scores))
            keep = np.concatenate([keep, unscored[:batch - len(keep)]])
        kept = np.zeros(len(block_ids), dtype=bool)
        kept[keep] = True
        stats.update(self.record_selection(block_ids, kept.astype(np.float64), scores))
        stats.update(self.ctx.record.score_means(scores, kept, self.score_name))
        stats.update(self.ctx.record.score_quantiles(scores, self.score_name))
        return self.train_on(block_ids, keep, stats)

    def record_selection(self, ids: np.ndarray, kept: np.ndarray, scores: np.ndarray) -> dict:
        """One selection round (see ``SelectionRecord.selection``); returns the step's stats."""
        return self.ctx.record.selection(ids, kept, scores)

    def uniform_normaliser(self) -> float:
        return float(self.ctx.global_batch * self.ctx.tokens_per_sample)

    def microbatches(self, batch: TrainBatch):
        return split_microbatches(batch.samples, self.config.data.micro_batch_size, batch.weights)
