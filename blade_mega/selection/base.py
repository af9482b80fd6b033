"""The selection plug-in interface, and ``uniform`` (no selection) as its plainest plug-in.

The loop calls a hook at fixed points, like OLMo-core's ``Callback(Stateful)``:

    block = sampler.block(step, consumed, hook.block_size(step))   # candidate ids (global)
    batch = hook.select(step, block.ids)    # this rank's samples + token weights
    losses = learner.train_step(...)        # masked loss in Megatron's forward step
    metrics = hook.after_step(step, batch, lr)       # reference sync/training, sidecar
    hook.state_dict() / hook.load_state_dict()       # with every checkpoint

A hook gets everything it needs in a ``SelectionContext``; process groups are passed in there,
never looked up from globals inside the hook.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from blade_mega.data.sample_index import SampleIndex
from blade_mega.data.sidecar import Sidecar, path_in
from blade_mega.engine import ModelEngine, split_microbatches
from blade_mega.errors import UserError
from blade_mega.model import ModelSize


@dataclass
class ProcessGroups:
    """The groups a hook communicates over, and this rank's place in them."""
    dp: object
    dp_rank: int
    dp_size: int
    pp: object
    mp: object  # tensor x pipeline: one whole model replica
    is_last_stage: bool

    def share(self, ids: np.ndarray) -> np.ndarray:
        """This DP rank's contiguous share of a global id list."""
        per_rank = len(ids) // self.dp_size
        return ids[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]


@dataclass
class SelectionContext:
    args: argparse.Namespace
    learner: ModelEngine
    train: SampleIndex
    target: Optional[SampleIndex]
    groups: ProcessGroups
    build_engine: Callable[[ModelSize, bool], ModelEngine]  # (size, offload) -> new model+engine
    learner_size: ModelSize
    sidecars: list[Sidecar]
    noise_labels: Optional[np.ndarray] = None  # per document of train part 0, or None
    noise_names: tuple[str, ...] = ()

    @property
    def global_batch(self) -> int:
        return self.args.global_batch_size

    @property
    def tokens_per_sample(self) -> int:
        return self.args.seq_length


@dataclass
class TrainBatch:
    """What this DP rank trains on in one step."""
    ids: np.ndarray               # global sample ids, this rank's share
    samples: torch.Tensor         # [n, s+1] token windows
    weights: torch.Tensor         # [n, s] per-token loss weights (alpha)
    normaliser: float             # total weight of the global batch (fixed before the step)
    weight_fn: Optional[Callable] = None  # token level: decides weights from the learner's losses
    candidates: Optional[np.ndarray] = None  # the whole block (global ids), when selecting
    stats: dict = field(default_factory=dict)
    chosen: dict = field(default_factory=dict)  # token level: micro-batch -> (mask, scores)


class SelectionHook:
    """``--selection uniform``: train on the block as read. Base class of every plug-in.

    Selectors that score candidates set ``keeps_sidecar`` and report each selection round with
    ``train_on_kept`` (sample level) or ``record_selection``, so the sidecar, its checkpointing
    and the kept and noise statistics are the same for all of them. Uniform scores nothing: it
    keeps no sidecar.
    """

    name = "uniform"
    keeps_sidecar = False
    score_name = "score"  # what a selector scores: names its <score_name>_kept/_dropped stats

    def __init__(self, ctx: SelectionContext):
        self.ctx = ctx
        self.comm_bytes = 0  # bytes this hook sent through collectives in the last step

    # -- the loop's call points -------------------------------------------------------------
    def block_size(self, step: int) -> int:
        return self.ctx.global_batch

    def before_training(self) -> None:
        """Once, after the learner exists and any checkpoint is loaded."""

    def select(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        ids = self.local_share(block_ids)
        samples = self.read(ids)
        weights = torch.ones(samples.size(0), samples.size(1) - 1)
        stats = self.noise_stats(block_ids, np.ones(len(block_ids)))
        return TrainBatch(ids, samples, weights, self.uniform_normaliser(), stats=stats)

    def after_step(self, step: int, batch: TrainBatch, lr: float) -> dict:
        return dict(batch.stats)

    def state_dict(self) -> dict:
        """The hook's small run state (per rank). Sidecars are not in it: they are files,
        written once per checkpoint by ``save_engines``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_engines(self, directory: str) -> None:
        """Save the hook's own files into ``directory``: the sidecars here (every rank holds the
        same rows, so rank 0 writes them, once); subclasses add their extra model engines."""
        if self.keeps_sidecar and torch.distributed.get_rank() == 0:
            for prefix, sidecar in zip(self.ctx.train.prefixes, self.ctx.sidecars):
                sidecar.save(path_in(directory, prefix))

    def load_engines(self, directory: str, load_optimizer: bool = True) -> None:
        """Read the sidecars saved in ``directory`` (every rank reads the same files);
        subclasses load their engines (without optimizer state if not ``load_optimizer``)."""
        if not self.keeps_sidecar:
            return
        for part, prefix in enumerate(self.ctx.train.prefixes):
            path = path_in(directory, prefix)
            if not os.path.isfile(path):
                raise UserError(f"{path}: the checkpoint has no sidecar for {prefix}; resume with "
                                "the --data-path and --selection it was trained with")
            self.ctx.sidecars[part] = Sidecar.load(path, self.ctx.train.num_documents(part),
                                                   prefix)

    # -- helpers for plug-ins ----------------------------------------------------------------
    def local_share(self, ids: np.ndarray) -> np.ndarray:
        return self.ctx.groups.share(ids)

    def read(self, ids: np.ndarray) -> torch.Tensor:
        return self.ctx.train.read(ids)

    def candidate_block(self) -> int:
        """Size of a sample-level candidate block: global_batch / keep_ratio samples, which each
        DP rank scores in whole micro-batches."""
        args = self.ctx.args
        block = int(round(self.ctx.global_batch / args.keep_ratio))
        unit = self.ctx.groups.dp_size * args.micro_batch_size
        if block % unit:
            raise UserError(
                f"--selection {args.selection} scores a block of {block} = --global-batch-size / "
                f"--keep-ratio samples, which must be a multiple of --micro-batch-size x "
                f"data-parallel size = {unit}; adjust --keep-ratio or the batch sizes")
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
        finite = np.isfinite(scores)  # mean score of the kept and of the dropped candidates
        for side, chosen in (("kept", kept & finite), ("dropped", ~kept & finite)):
            mean = float(scores[chosen].mean()) if chosen.any() else float("nan")
            stats[f"{self.score_name}_{side}"] = mean
        return self.train_on(block_ids, keep, stats)

    def record_selection(self, ids: np.ndarray, kept: np.ndarray, scores: np.ndarray) -> dict:
        """One selection round over candidates ``ids`` (global, the same on every rank): ``kept``
        is each one's kept share (0/1 per sample, a fraction under token masks), ``scores`` its
        score (non-finite: unscored). Adds the round to the sidecars; returns the step's stats."""
        for part, where, documents in self.ctx.train.main_documents(ids):
            self.ctx.sidecars[part].update(documents, kept[where], scores[where])
        return {"kept_fraction": float(kept.mean()), **self.noise_stats(ids, kept)}

    def uniform_normaliser(self) -> float:
        return float(self.ctx.global_batch * self.ctx.tokens_per_sample)

    def noise_stats(self, ids: np.ndarray, kept: np.ndarray) -> dict:
        """Per labelled noise type (demo corpus): the kept rate of its candidates and its share
        of what was trained on. ``kept`` is each candidate's kept share (0..1)."""
        labels = self._noise_labels(ids)
        if labels is None:
            return {}
        trained = kept.sum()
        kept_rate, share = {}, {}
        for code, name in enumerate(self.ctx.noise_names):
            of_type = labels == code
            if of_type.any():
                kept_rate[name] = float(kept[of_type].mean())
            share[name] = float(kept[of_type].sum() / trained) if trained else 0.0
        return {"noise_kept_rate": kept_rate, "trained_share": share}

    def _noise_labels(self, ids: np.ndarray) -> Optional[np.ndarray]:
        if self.ctx.noise_labels is None:
            return None
        labels = np.full(len(ids), -1, dtype=np.int64)
        for part, where, documents in self.ctx.train.main_documents(ids):
            if part == 0:
                labels[where] = self.ctx.noise_labels[documents]
        return labels

    def microbatches(self, batch: TrainBatch):
        return split_microbatches(batch.samples, self.ctx.args.micro_batch_size, batch.weights)
