"""``--selection sketch-influence``: first-order influence on the target set, from gradient sketches.

Each step (after warm-up) the selector sketches the mean gradient of one batch of the target set
V (``g_V``: by linearity, the mean of its per-sample sketches) and every sample of a candidate
block of ``global_batch / keep_ratio`` samples, scores ``<S g_i, S g_V>`` (TracIn / GREATS: how
much a step on sample i lowers the loss on V), and keeps the best ``global_batch``; ties go to the
smaller global id.  With ``--selection-diversity beta > 0`` the kept set is chosen greedily with
the redundancy penalty ``beta * <S g_i, S g_j>`` against samples already chosen.

Each round goes into the reweighting sidecar (influence in its score column) and the step's
kept and noise statistics, as in excess-loss selection (``SelectionHook.train_on_kept``).

Communication carries only sketches and scores (never a gradient):
* g_V: this rank's partial sketch placed in its slots, summed over the model-parallel group
  (TP terms add, PP stages fill their own slots) and over DP: ``num_slots * k^2`` floats a step.
* beta = 0: each rank scores its partial sketches against g_V; the partial scores are summed over
  the model-parallel group and gathered over DP: two floats per candidate.
* beta > 0: the candidates' full sketches are formed like g_V and gathered over DP, so every rank
  has the block's Gram matrix: ``num_slots * k^2`` floats per candidate.
"""

from __future__ import annotations

import numpy as np
import torch

from blade_mega.selection.base import SelectionContext, SelectionHook, StepStats, TrainBatch
from blade_mega.selection.excess_loss import top_k_samples
from blade_mega.sketch.diversity import greedy_diverse_top_k
from blade_mega.sketch.sketcher import GradientSketcher
from blade_mega.sketch.whole import place_in_slots, whole_sketches


class SketchInfluenceSelector(SelectionHook):
    keeps_sidecar = True
    score_name = "influence"

    def __init__(self, ctx: SelectionContext):
        super().__init__(ctx)
        selection = self.config.selection  # its checks: selection/methods.py, sketch_checks
        self.warmup = selection.warmup_steps
        self.beta = selection.diversity
        self.sketch_dim = selection.sketch_dim
        self.block = self.candidate_block()
        self.sketcher = GradientSketcher(ctx.learner.module, ctx.learner.runner,
                                         self.sketch_dim, self.config.data.seed)
        self.target_consumed = 0  # reading position in V

    # -- call points ---------------------------------------------------------------------------
    def block_size(self, step: int) -> int:
        if step < self.warmup:
            return self.ctx.global_batch
        return self.block

    def select(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        if step < self.warmup:
            return self.uniform_batch(block_ids)
        ctx = self.ctx
        scores, gram = self.block_scores(block_ids)
        if gram is None:
            keep = top_k_samples(scores, block_ids, ctx.global_batch)
        else:
            keep = greedy_diverse_top_k(scores, block_ids, gram, ctx.global_batch, self.beta)
        return self.train_on_kept(block_ids, keep, scores)

    def after_step(self, step: int, batch: TrainBatch, lr: float) -> StepStats:
        if step < self.warmup:
            return StepStats({"selecting": 0.0})
        return StepStats(dict(batch.stats, selecting=1.0,
                              hook_comm_bytes=float(self.groups.take_sent_bytes())))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "target_consumed": self.target_consumed}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.target_consumed = state["target_consumed"]

    # -- scoring -------------------------------------------------------------------------------
    def block_scores(self, block_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Influence score of every block sample (block order, on every rank), and the block's
        sketch Gram matrix when the diversity term needs it."""
        groups = self.groups
        target = self.target_sketch()
        partial = self.sketcher.sketch(self.read(self.local_share(block_ids)))
        self.ctx.flops.add_sketch(self.ctx.learner_size, len(block_ids), self.sketch_dim)
        if self.beta == 0:
            mine = place_in_slots(partial, self.sketcher) @ target  # this rank's terms of <.,.>
            local_scores = groups.all_reduce(mine, groups.mp)
            return groups.all_gather(local_scores, groups.dp).cpu().double().numpy(), None
        sketches = whole_sketches(partial, self.sketcher, groups).double()
        return (sketches @ target.double()).cpu().numpy(), (sketches @ sketches.T).cpu().numpy()

    def target_sketch(self) -> torch.Tensor:
        """Full sketch of the mean gradient of the next V batch, on every rank."""
        ctx = self.ctx
        count = ctx.global_batch
        ids = ctx.target.ordered_ids(self.target_consumed, count)
        self.target_consumed += count
        samples = ctx.target.read(self.local_share(ids))
        ctx.flops.add_sketch(ctx.learner_size, count, self.sketch_dim)
        placed = place_in_slots(self.sketcher.sketch(samples).sum(0), self.sketcher)
        groups = self.groups
        placed = groups.all_reduce(groups.all_reduce(placed, groups.mp), groups.dp)
        return placed / count
