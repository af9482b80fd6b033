"""The reference model ``w`` of excess-loss selection, and the one rule that moves it.

Every ``sync_interval`` steps (from the end of warm-up): ``w <- u`` exactly, then
``steps_per_sync`` optimizer steps on ``L_V(w) + lam * L_train(alpha, w)`` (held-out target loss
plus the alpha-weighted loss of the learner's latest batch); frozen in between.

* BLADE: a dynamic reference, (T, K, lambda) from the flags.
* RHO-LOSS / Rho-1: the same rule with one sync and lambda = 0: a static reference trained on V
  once, never updated again.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from blade_mega.engine import ModelEngine, comm_device, split_microbatches
from blade_mega.errors import UserError


class Reference:
    def __init__(self, ctx, *, sync_interval: float, steps_per_sync: int, lam: float,
                 offload: bool = False, size=None):
        if ctx.target is None:
            raise UserError("the reference model needs --target-data-path")
        self.ctx = ctx
        self.sync_interval = sync_interval
        self.steps_per_sync = steps_per_sync
        self.lam = lam
        self.model: ModelEngine = ctx.build_engine(size or ctx.learner_size, offload)
        self.target_consumed = 0   # reading position in V
        self.syncs = 0
        self.steps_trained = 0
        self.bad_steps = 0  # non-finite reference steps, dropped
        self.last_divergence = float("nan")
        self.copy_on_sync = True  # False when the weights were loaded (--rho-ref-load)
        self.last_sync_step = -1  # a step retried after a non-finite loss does not sync twice

    def due(self, step: int, warmup: int) -> bool:
        if step < warmup or step == self.last_sync_step:
            return False
        since = step - warmup
        return since == 0 if math.isinf(self.sync_interval) else since % self.sync_interval == 0

    def sync_and_train(self, learner: ModelEngine, lr: float, step: int,
                       last_batch: Optional[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """``w <- u``, then K steps. ``last_batch`` = (samples, alpha weights, normaliser)."""
        self.last_sync_step = step
        self.last_divergence = self.divergence(learner)
        if self.copy_on_sync:
            self.model.copy_weights_from(learner)
        for _ in range(self.steps_per_sync):
            self._train_step(lr, last_batch)
        self.syncs += 1

    def _train_step(self, lr: float, last_batch) -> None:
        ctx = self.ctx
        count = ctx.global_batch
        target_ids = ctx.target.ordered_ids(self.target_consumed, count)
        self.target_consumed += count
        target_samples = ctx.target.read(ctx.groups.share(target_ids))
        target_tokens = float(count * ctx.tokens_per_sample)
        micro = split_microbatches(target_samples, ctx.args.micro_batch_size)
        if self.lam > 0 and last_batch is not None:
            samples, weights, normaliser = last_batch
            # Scale so that the step minimises L_V + lam * L_train with one shared normaliser.
            scaled = weights * (self.lam * target_tokens / normaliser)
            micro += split_microbatches(samples, ctx.args.micro_batch_size, scaled)
        _, finite = self.model.train_step(micro, target_tokens, lr)
        if finite:
            self.steps_trained += 1
        else:  # dropped (the engine changed nothing); counted, and logged by the trainer
            self.bad_steps += 1

    @torch.no_grad()
    def divergence(self, learner: ModelEngine) -> float:
        """||u - w|| / ||u|| over the whole model (summed over TP shards and PP stages; weights
        that every TP rank holds a copy of count once)."""
        sums = torch.zeros(2, dtype=torch.float64, device=comm_device())
        for u, w in zip(learner.module.parameters(), self.model.module.parameters()):
            if not param_is_not_tensor_parallel_duplicate(u):
                continue
            sums[0] += (u.detach().double() - w.detach().double()).pow(2).sum()
            sums[1] += u.detach().double().pow(2).sum()
        torch.distributed.all_reduce(sums, group=self.ctx.groups.mp)
        return float(torch.sqrt(sums[0] / sums[1]))

    def state_dict(self) -> dict:
        return {"target_consumed": self.target_consumed, "syncs": self.syncs,
                "steps_trained": self.steps_trained, "bad_steps": self.bad_steps,
                "last_sync_step": self.last_sync_step,
                "last_divergence": self.last_divergence}

    def load_state_dict(self, state: dict) -> None:
        self.target_consumed = state["target_consumed"]
        self.syncs = state["syncs"]
        self.steps_trained = state["steps_trained"]
        self.bad_steps = state.get("bad_steps", 0)
        self.last_sync_step = state["last_sync_step"]
        self.last_divergence = state["last_divergence"]

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
