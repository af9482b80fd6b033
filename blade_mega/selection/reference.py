"""The reference model ``w`` of excess-loss selection, and the one rule that moves it.

Every ``sync_interval`` steps (from the end of warm-up) a *sync*:

1. weights: the first sync copies ``w <- u`` exactly; later ones move ``w <- (1 - beta) w + beta u``
   (beta = 1: BLADE's full re-sync; beta = 0: never re-synced, a reference that keeps its
   target knowledge and keeps training);
2. optimizer state, when the weights moved: ``keep`` w's own Adam state, ``reset`` it, or
   ``copy`` the learner's (moments and step count, per ZeRO partition, with the fp32 masters);
3. K optimizer steps (K0 at the first sync) on ``L_V(w) + lam * L_train(alpha, w)``: each step a
   fresh batch of V and one of the learner's batches since the last sync with its own alpha
   (*replay*: held as this rank's global ids and per-token weights, re-read by id). K <= their
   number takes them evenly spaced from the oldest; more steps cycle through them. Warm-up
   batches count (alpha = 1); with no batch yet (selection from step 0) a step is V only.

The reference's learning rate: ``--reference-lr`` if given, else the learner's schedule at the
current step; the first sync (the warm start, rho's whole budget) runs its own linear warm-up
(10% of its steps) and cosine decay to ``--min-lr``, peaking at ``--reference-lr`` or ``--lr``.

* BLADE: a dynamic reference, (T, K, K0, lambda, beta) from the flags.
* RHO-LOSS / Rho-1: the same rule with one sync and lambda = 0: a static reference trained on V
  once, never updated again.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from blade_mega.engine.model_engine import ModelEngine, comm_device, learning_rate
from blade_mega.errors import UserError
from blade_mega.train.flops import TRAIN


@dataclass
class ReplayBatch:
    """One learner step's batch, as the reference re-reads it."""
    step: int
    ids: np.ndarray                  # this DP rank's global sample ids
    weights: Optional[torch.Tensor]  # [n, s] alpha; None: all ones
    normaliser: float                # the learner's normaliser of that step


def replay_order(steps: int, available: int) -> list[int]:
    """Which replayed batch each of ``steps`` reference steps trains on (oldest = 0)."""
    if available == 0:
        return [-1] * steps
    if steps <= available:
        return [j * available // steps for j in range(steps)]
    return [j % available for j in range(steps)]


class Reference:
    """The reference ``w`` and its rule, all from the run's resolved ``SelectionConfig`` (rho's
    has one sync and lambda 0). ``size``: a proxy pair's preset, else the learner's."""

    def __init__(self, ctx, size=None):
        if ctx.target is None:
            raise UserError("the reference model needs --target-data-path")
        rule = ctx.config.selection
        self.ctx = ctx
        self.sync_interval = rule.sync_interval
        self.steps_per_sync = rule.ref_steps
        self.first_steps = rule.first_ref_steps
        self.lam = rule.lam
        self.beta = rule.sync_beta
        self.optimizer_state = rule.optimizer_state
        self.lr = rule.reference_lr
        self.size = size or ctx.learner_size
        self.model: ModelEngine = ctx.build_engine(self.size, rule.reference_offload)
        self.target_consumed = 0   # reading position in V
        self.syncs = 0
        self.steps_trained = 0
        self.bad_steps = 0  # non-finite reference steps, dropped
        self.last_divergence = float("nan")
        self.copy_on_sync = True  # False when the weights were loaded (--rho-ref-load)
        self.last_sync_step = -1  # a step retried after a non-finite loss does not sync twice
        finite = [n for n in (self.first_steps, self.steps_per_sync, self.sync_interval)
                  if math.isfinite(n)]
        self.replay: deque[ReplayBatch] = deque(maxlen=max(1, *map(int, finite)))

    def due(self, step: int, warmup: int) -> bool:
        if step < warmup or step == self.last_sync_step:
            return False
        since = step - warmup
        return since == 0 if math.isinf(self.sync_interval) else since % self.sync_interval == 0

    def remember(self, step: int, ids: np.ndarray, weights: torch.Tensor,
                 normaliser: float) -> None:
        """The learner trained on ``ids`` with ``weights`` at ``step``: keep it for L_train."""
        if self.lam <= 0:
            return
        ones = bool((weights == 1).all())
        self.replay.append(ReplayBatch(step, np.asarray(ids).copy(),
                                       None if ones else weights.detach().clone(), normaliser))

    def sync_and_train(self, learner: ModelEngine, step: int) -> None:
        """Move ``w`` toward ``u`` (the rule above), then K (first: K0) steps."""
        self.last_sync_step = step
        self.last_divergence = self.divergence(learner)
        first = self.syncs == 0
        if self.copy_on_sync and (first or self.beta > 0):
            if first or self.beta == 1.0:
                self.model.copy_weights_from(learner)
            else:
                self.model.blend_weights_from(learner, self.beta)
            if self.optimizer_state == "reset":
                self.model.reset_optimizer_state()
            elif self.optimizer_state == "copy":
                self.model.copy_optimizer_state_from(learner)
        steps = self.first_steps if first else self.steps_per_sync
        batches = list(self.replay)
        self.replay.clear()
        for j, index in enumerate(replay_order(steps, len(batches))):
            self._train_step(self.step_lr(j, steps, step, first),
                             batches[index] if index >= 0 else None)
        self.syncs += 1

    def step_lr(self, j: int, steps: int, step: int, first: bool) -> float:
        train = self.ctx.config.train
        if first:  # the warm start / rho's budget: a schedule of its own over its steps
            return learning_rate(j, lr=self.lr or train.lr, min_lr=train.min_lr,
                                 warmup_steps=max(1, round(0.1 * steps)), total_steps=steps)
        if self.lr is not None:
            return self.lr
        return learning_rate(step, lr=train.lr, min_lr=train.min_lr,
                             warmup_steps=train.lr_warmup_iters, total_steps=train.train_iters)

    def step_microbatches(self, target_ids: np.ndarray, batch: Optional[ReplayBatch],
                          lam: float) -> tuple[list, float]:
        """One reference step's micro-batches and normaliser: this rank's share of the V batch
        ``target_ids``, then (lam > 0) the replayed batch with alpha scaled so that the step
        minimises ``L_V + lam * L_train`` over one shared normaliser."""
        ctx = self.ctx
        target_samples = ctx.target.read(ctx.groups.share(target_ids))
        target_tokens = float(len(target_ids) * ctx.tokens_per_sample)
        micro = self.model.split(target_samples)
        if lam > 0 and batch is not None:
            samples = ctx.train.read(batch.ids)
            weights = batch.weights if batch.weights is not None else \
                torch.ones(samples.size(0), samples.size(1) - 1)
            scaled = weights * (lam * target_tokens / batch.normaliser)
            micro += self.model.split(samples, scaled)
        return micro, target_tokens

    def _train_step(self, lr: float, batch: Optional[ReplayBatch]) -> None:
        ctx = self.ctx
        count = ctx.global_batch
        target_ids = ctx.target.ordered_ids(self.target_consumed, count)
        self.target_consumed += count
        micro, target_tokens = self.step_microbatches(target_ids, batch, self.lam)
        passes = 2 if self.lam > 0 and batch is not None else 1  # V batch (+ replayed batch)
        ctx.flops.add("reference", self.size, passes * count, TRAIN)
        _, finite = self.model.train_step(micro, target_tokens, lr)
        if finite:
            self.steps_trained += 1
        else:  # dropped (the engine changed nothing); counted, and logged by the trainer
            self.bad_steps += 1

    @torch.no_grad()
    def divergence(self, learner: ModelEngine) -> float:
        """||u - w|| / ||u|| over the whole model (summed over TP shards and PP stages; weights
        that every TP rank holds a copy of count once); NaN for a reference of another shape
        (rho's small reference)."""
        mine, theirs = list(self.model.module.parameters()), list(learner.module.parameters())
        sums = torch.zeros(3, dtype=torch.float64, device=comm_device())
        if [p.shape for p in mine] != [p.shape for p in theirs]:
            sums[2] = 1.0  # every stage takes part in the all-reduce, so all agree on NaN
        else:
            for u, w in zip(theirs, mine):
                if not param_is_not_tensor_parallel_duplicate(u):
                    continue
                sums[0] += (u.detach().double() - w.detach().double()).pow(2).sum()
                sums[1] += u.detach().double().pow(2).sum()
        torch.distributed.all_reduce(sums, group=self.ctx.groups.mp)
        return math.nan if sums[2] > 0 else float(torch.sqrt(sums[0] / sums[1]))

    def state_dict(self) -> dict:
        return {"target_consumed": self.target_consumed, "syncs": self.syncs,
                "steps_trained": self.steps_trained, "bad_steps": self.bad_steps,
                "last_sync_step": self.last_sync_step,
                "last_divergence": self.last_divergence,
                # ids as a tensor: a run state holds no NumPy, so it loads as data
                "replay": [{**vars(batch), "ids": torch.from_numpy(batch.ids)}
                           for batch in self.replay]}

    def load_state_dict(self, state: dict) -> None:
        self.target_consumed = state["target_consumed"]
        self.syncs = state["syncs"]
        self.steps_trained = state["steps_trained"]
        self.bad_steps = state.get("bad_steps", 0)
        self.last_sync_step = state["last_sync_step"]
        self.last_divergence = state["last_divergence"]
        self.replay.clear()
        self.replay.extend(ReplayBatch(**{**batch, "ids": np.asarray(batch["ids"])})
                           for batch in state.get("replay", []))

    def save(self, directory: str) -> None:
        self.model.engine.save_checkpoint(directory, tag="reference", save_latest=False)

    def load(self, directory: str, load_optimizer: bool = True) -> None:
        path, _ = self.model.engine.load_checkpoint(directory, tag="reference",
                                                    load_module_only=not load_optimizer,
                                                    load_optimizer_states=load_optimizer,
                                                    load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"{os.path.join(directory, 'reference')}: reference checkpoint "
                            "could not be loaded; it is missing or from another layout")

    def load_weights_only(self, directory: str) -> None:
        """``--rho-ref-load``: take a saved reference's weights, not its optimizer state."""
        path, _ = self.model.engine.load_checkpoint(directory, tag="reference",
                                                    load_module_only=True,
                                                    load_optimizer_states=False,
                                                    load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"{directory}: no reference/ checkpoint to load for --rho-ref-load; "
                            "point it at a checkpoint directory of a rho or blade run")
