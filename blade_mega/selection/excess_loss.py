"""Excess-loss selection: ``score = loss_u - loss_w``, keep the top share. highloss, rho, blade.

The top-k is the linear-minimisation step of a memoryless randomized block-coordinate
Frank-Wolfe: the candidate block is the random block, the kept set is the LMO vertex, and
nothing about earlier selections is remembered (the sidecar only biases which blocks are drawn).

* sample level: score a candidate block of ``global_batch / keep_ratio`` samples (forward-only
  passes of u and w on each DP rank's share), all-gather one float per sample over DP, keep the
  global top ``global_batch``; each DP rank then trains on its share of the kept samples.
* token level: score the batch's tokens inside the learner's own training forward (the loss
  function sees ``loss_u``; ``loss_w`` was computed before) and keep the top ``keep_ratio`` of
  each micro-batch's tokens. Only the reference costs an extra forward.

With ``--selection-diversity beta > 0`` (sample level) the kept set is the greedy Frank-Wolfe
solution of ``sum_S excess_i - beta sum_{i<j in S} <S g_i, S g_j>`` instead (``g_i``: the scorer's
per-sample gradient, sketched as for sketch-influence: TP partials summed, PP slots concatenated,
only sketches cross ranks).

Ties are broken by global sample id (sample level) or position (token level). Non-finite scores
are never kept and are counted; if a step has nothing scorable it trains uniformly and says so.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import numpy as np
import torch

from blade_mega.engine.model import PRESETS
from blade_mega.engine.model_engine import ModelEngine, broadcast_from_last_stage
from blade_mega.errors import UserError
from blade_mega.selection.base import SelectionContext, SelectionHook, StepStats, TrainBatch
from blade_mega.selection.methods import kept_tokens_per_microbatch
from blade_mega.selection.reference import Reference
from blade_mega.sketch.diversity import greedy_diverse_top_k
from blade_mega.sketch.sketcher import GradientSketcher
from blade_mega.sketch.whole import whole_sketches
from blade_mega.train.flops import TRAIN


def top_k_samples(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best finite scores, best first; ties go to the smaller global id."""
    finite = np.isfinite(scores)
    order = np.lexsort((ids, -np.where(finite, scores, -np.inf)))
    order = order[finite[order]]
    return order[:k]


def top_k_token_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the k highest finite scores of ``scores`` (any shape); ties to earlier tokens."""
    flat = scores.reshape(-1)
    finite = torch.isfinite(flat)
    keyed = torch.where(finite, flat, torch.full_like(flat, -math.inf))
    order = torch.argsort(-keyed, stable=True)[:k]
    mask = torch.zeros_like(flat)
    mask[order] = 1.0
    mask = mask * finite.to(mask.dtype)
    return mask.view_as(scores)


class TokenSelection:
    """Token level: the weights of each micro-batch, decided inside the learner's training
    forward from its per-token losses (``weight_fn`` of the step's ``TrainBatch``): the top
    ``k`` excess losses of the micro-batch are kept. ``chosen`` records, by micro-batch, the
    mask and the excess it was chosen by (on the last pipeline stage, where the losses are)."""

    def __init__(self, micro_batch: int, k: int, reference_losses: Optional[torch.Tensor],
                 proxy_losses: Optional[torch.Tensor]):
        self.micro_batch = micro_batch
        self.k = k
        self.reference_losses = reference_losses
        self.proxy_losses = proxy_losses
        self.chosen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, index: int, learner_losses: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor:
        rows = slice(index * self.micro_batch, (index + 1) * self.micro_batch)
        excess = learner_losses.cpu() if self.proxy_losses is None else self.proxy_losses[rows]
        if self.reference_losses is not None:
            excess = excess - self.reference_losses[rows]
        mask = top_k_token_mask(excess, self.k)
        if not torch.isfinite(excess).any():
            warnings.warn(f"no finite token scores in micro-batch {index}; training on it "
                          "uniformly (weight k / tokens each) this step")
            mask = torch.full_like(excess, self.k / excess.numel())
        self.chosen[index] = (mask, excess)
        return weights * mask.to(weights.device, weights.dtype)


class ExcessLossSelector(SelectionHook):
    """Base of highloss (no reference), rho (static reference) and blade (dynamic reference)."""

    keeps_sidecar = True
    score_name = "excess"

    def __init__(self, ctx: SelectionContext, reference: Optional[Reference],
                 proxy: Optional[ModelEngine] = None, proxy_size=None):
        super().__init__(ctx)
        selection = self.config.selection
        self.reference = reference
        # The learner-side scorer: the learner itself, or the small proxy learner u' of a
        # proxy pair (--reference-model PRESET), which trains on the same selected batches.
        self.proxy = proxy
        self.scorer = proxy if proxy is not None else ctx.learner
        self.scorer_size = proxy_size if proxy is not None else ctx.learner_size
        self.token_level = selection.token_level
        self.warmup = selection.warmup_steps
        self._ref_bad_seen = 0  # reference.bad_steps already reported
        self.block = None if self.token_level else self.candidate_block()
        self.diversity = selection.diversity
        self.sketcher = None
        if self.diversity > 0:
            self.sketcher = GradientSketcher(self.scorer.module, self.scorer.runner,
                                             selection.sketch_dim, self.config.data.seed)

    # -- call points ---------------------------------------------------------------------------
    def block_size(self, step: int) -> int:
        if self.token_level or step < self.warmup:
            return self.ctx.global_batch
        return self.block

    def select(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        if step < self.warmup:
            return self.uniform_batch(block_ids)
        if self.reference is not None and self.reference.due(step, self.warmup):
            self.reference.sync_and_train(self.scorer, step)
        if self.token_level:
            return self._select_tokens(block_ids)
        return self._select_samples(block_ids)

    def after_step(self, step: int, batch: TrainBatch, lr: float) -> StepStats:
        if step >= self.warmup and self.token_level:
            self._finish_token_step(batch)  # sets batch.weights to this step's masks (alpha)
        if self.reference is not None:  # for L_train(alpha) at the next sync
            self.reference.remember(step, batch.ids, batch.weights, batch.normaliser)
        dropped = {}  # non-finite steps of the hook's own models, dropped: the loop logs them
        if self.proxy is not None:  # u' follows u: same batch, same alpha
            if not self.proxy.train_step(self.proxy.split(batch.samples, batch.weights),
                                         batch.normaliser, lr)[1]:
                dropped["proxy"] = 1
            self.ctx.flops.add("reference", self.scorer_size, self.ctx.global_batch, TRAIN)
        if self.reference is not None and self.reference.bad_steps > self._ref_bad_seen:
            dropped["reference"] = self.reference.bad_steps - self._ref_bad_seen
            self._ref_bad_seen = self.reference.bad_steps
        if step < self.warmup:
            return StepStats({"selecting": 0.0}, dropped)
        stats = dict(batch.stats, selecting=1.0,
                     hook_comm_bytes=float(self.groups.take_sent_bytes()))
        if self.reference is not None:
            stats["ref_divergence"] = self.reference.last_divergence
            stats["ref_syncs"] = float(self.reference.syncs)
            stats["ref_bad_steps"] = float(self.reference.bad_steps)
            # 1 on the step that synced: its window mean x selecting steps counts the syncs.
            stats["ref_synced"] = float(self.reference.last_sync_step == step)
        return StepStats(stats, dropped)

    # -- scoring ---------------------------------------------------------------------------
    def sample_scores(self, block_ids: np.ndarray, samples: Optional[torch.Tensor] = None
                      ) -> np.ndarray:
        """Mean excess loss of every sample in the block, on every rank (block order).
        Means are linear, so each model sends only one float per sample across stages."""
        if samples is None:
            samples = self.read(self.local_share(block_ids))
        flops = self.ctx.flops
        excess = self.scorer.sample_losses(samples)
        flops.add("scoring", self.scorer_size, len(block_ids), 1)
        if self.reference is not None:
            excess = excess - self.reference.model.sample_losses(samples)
            flops.add("scoring", self.reference.size, len(block_ids), 1)
        if self.groups.pp_size > 1:
            models = 1 if self.reference is None else 2
            self.groups.count(models * excess.numel() * excess.element_size())
        return self.groups.gather_dp(excess.float())

    # -- sample level ----------------------------------------------------------------------
    def _select_samples(self, block_ids: np.ndarray) -> TrainBatch:
        batch = self.ctx.global_batch
        samples = self.read(self.local_share(block_ids))
        scores = self.sample_scores(block_ids, samples)
        if self.sketcher is None:
            keep = top_k_samples(scores, block_ids, batch)
        else:
            self.ctx.flops.add_sketch(self.scorer_size, len(block_ids),
                                      self.config.selection.sketch_dim)
            sketches = whole_sketches(self.sketcher.sketch(samples), self.sketcher,
                                      self.groups).double()
            gram = (sketches @ sketches.T).cpu().numpy()
            keep = greedy_diverse_top_k(scores, block_ids, gram, batch, self.diversity)
        return self.train_on_kept(block_ids, keep, scores)

    # -- token level -----------------------------------------------------------------------
    def _select_tokens(self, block_ids: np.ndarray) -> TrainBatch:
        ctx = self.ctx
        ids = self.local_share(block_ids)
        samples = self.read(ids)
        # weight_fn runs on the last stage, where both models' losses already are: no transfer.
        reference_losses = proxy_losses = None
        if self.reference is not None:
            reference_losses = self.reference.model.token_losses(samples, everywhere=False)
            ctx.flops.add("scoring", self.reference.size, len(block_ids), 1)
        if self.proxy is not None:
            proxy_losses = self.proxy.token_losses(samples, everywhere=False)
            ctx.flops.add("scoring", self.scorer_size, len(block_ids), 1)
        micro = self.config.data.micro_batch_size
        k = kept_tokens_per_microbatch(self.config)
        weight_fn = TokenSelection(micro, k, reference_losses, proxy_losses)
        normaliser = float((ctx.global_batch // micro) * k)
        return TrainBatch(ids, samples, torch.ones(samples.size(0), samples.size(1) - 1),
                          normaliser, weight_fn=weight_fn, candidates=block_ids)

    def _finish_token_step(self, batch: TrainBatch) -> None:
        """Masks exist on the last stage only: share per-sample summaries with every rank."""
        ctx = self.ctx
        n = batch.samples.size(0)
        summary = None
        if ctx.groups.is_last_stage:
            chosen = batch.weight_fn.chosen
            order = sorted(chosen)
            masks = torch.cat([chosen[i][0] for i in order])
            excess = torch.cat([chosen[i][1] for i in order])
            batch.weights = masks  # alpha of this step, for the reference's L_train
            finite = torch.isfinite(excess)
            safe = torch.where(finite, excess, torch.zeros_like(excess))
            kept_finite = masks * finite
            summary = torch.stack([
                masks.mean(1),                                    # kept share of the sample
                torch.where(finite.any(1), safe.sum(1) / finite.sum(1).clamp(min=1),
                            torch.full_like(masks[:, 0], math.nan)),  # mean finite excess
                (~finite).sum(1).float(),                         # non-finite token scores
                (safe * kept_finite).sum(1), kept_finite.sum(1),  # kept: excess sum, count
                safe.sum(1), finite.sum(1).float(),               # finite: excess sum, count
            ], dim=1).float()
        columns = 7
        summary = broadcast_from_last_stage(summary, (n, columns)).cpu()
        if ctx.groups.pp_size > 1:
            ctx.groups.count(summary.numel() * 4)
        gathered = ctx.groups.gather_dp(summary.reshape(-1)).reshape(-1, columns)
        all_ids = batch.candidates  # DP shares are contiguous, so gathered rows follow the block
        kept_share, mean_excess = gathered[:, 0], gathered[:, 1]
        kept_sum, kept_count, finite_sum, finite_count = gathered[:, 3:7].sum(axis=0)
        kept_excess = kept_sum / max(kept_count, 1.0)
        dropped_excess = (finite_sum - kept_sum) / max(finite_count - kept_count, 1.0)
        batch.stats.update(self.record_selection(all_ids, kept_share, mean_excess))
        batch.stats.update(ctx.record.score_quantiles(mean_excess, self.score_name))
        # Token level: kept/dropped excess are means over tokens, not over samples.
        batch.stats.update(excess_kept=float(kept_excess), excess_dropped=float(dropped_excess),
                           nonfinite_scores=float(gathered[:, 2].sum()))

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.reference is not None:
            state["reference"] = self.reference.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])
            self._ref_bad_seen = self.reference.bad_steps

    def save_files(self, directory: str) -> None:
        if self.reference is not None:
            self.reference.save(directory)
        if self.proxy is not None:
            self.proxy.engine.save_checkpoint(directory, tag="proxy", save_latest=False)

    def load_files(self, directory: str, load_optimizer: bool = True) -> None:
        saved_proxy = os.path.isdir(os.path.join(directory, "proxy"))
        if self.proxy is None and self.reference is not None and saved_proxy:
            raise UserError(f"{directory}: saved with a proxy pair (it holds proxy/); resume "
                            "with the --reference-model preset it was saved with (the start "
                            "record of its train log names it)")
        if self.proxy is not None and not saved_proxy:
            raise UserError(f"{os.path.join(directory, 'proxy')}: proxy learner checkpoint "
                            "missing: the run was saved with the same-size reference; resume with "
                            "--reference-model same")
        if self.reference is not None:
            self.reference.load(directory, load_optimizer)
        if self.proxy is not None:
            path, _ = self.proxy.engine.load_checkpoint(directory, tag="proxy",
                                                        load_module_only=not load_optimizer,
                                                        load_optimizer_states=load_optimizer,
                                                        load_lr_scheduler_states=False)
            if path is None:
                raise UserError(f"{os.path.join(directory, 'proxy')}: proxy learner checkpoint "
                                "unreadable; resume from another checkpoint")


class HighLossSelector(ExcessLossSelector):
    """``--selection highloss``: keep what the learner finds hardest (no reference)."""

    def __init__(self, ctx: SelectionContext):
        super().__init__(ctx, None)


class RhoSelector(ExcessLossSelector):
    """``--selection rho``: RHO-LOSS / Rho-1 with a static reference trained once on V.

    Its budget (``--rho-ref-steps``, by default blade's reference training in model passes) runs
    at the first selecting step, with its own learning-rate warm-up and decay; the reference rule
    is the resolved config's (one sync, lambda 0: selection/methods.py, ``rho_reference``).

    The reference is the learner's size and starts as a copy of it, or, with ``--reference-model
    PRESET``, a small model of that preset: the learner scores against it from the small model's
    own initialisation (RHO-LOSS's irreducible-loss model), or with ``--rho-scorer proxy`` a
    small proxy learner u' trained on the selected batches scores, and the reference starts as
    a copy of u' (blade's proxy pair with rho's rule)."""

    def __init__(self, ctx: SelectionContext):
        selection = ctx.config.selection
        size = PRESETS[selection.proxy] if selection.proxy else None
        proxy = ctx.build_engine(size, False) if size and selection.rho_scorer == "proxy" \
            else None
        reference = Reference(ctx, size=size)
        super().__init__(ctx, reference, proxy, size)
        if selection.rho_ref_load:
            reference.load_weights_only(selection.rho_ref_load)
        if selection.rho_ref_load or (size is not None and proxy is None):
            reference.copy_on_sync = False  # nothing to copy: loaded, or not the scorer's shape


class BladeSelector(ExcessLossSelector):
    """``--selection blade``: dynamic reference, moved toward u every T steps.

    With ``--reference-model PRESET`` it scores with a small proxy pair instead: a proxy
    learner u' (trained on the learner's selected batches) and its reference w' (synced from u').
    """

    def __init__(self, ctx: SelectionContext):
        preset = ctx.config.selection.proxy
        proxy_size = PRESETS[preset] if preset else None
        proxy = ctx.build_engine(proxy_size, False) if proxy_size else None
        reference = Reference(ctx, size=proxy_size)
        super().__init__(ctx, reference, proxy, proxy_size)
