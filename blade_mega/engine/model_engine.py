"""One model + its DeepSpeed ZeRO engine, stepped by Megatron's pipeline schedule.

Megatron's ``get_forward_backward_func`` runs the micro-batches (1F1B across pipeline stages);
DeepSpeed owns the optimizer state (ZeRO-1/2 sharded over the data-parallel group), the
data-parallel gradient reduction and the checkpoint files.  A step is:
schedule(forward+backward over micro-batches) -> ``allreduce_gradients()`` -> ``step()``.

Losses are *weighted token sums* divided by a normaliser fixed before the step (the total weight
of the global batch), so the gradient is the same for every TP/PP/DP layout and micro-batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from blade_mega.errors import UserError
from blade_mega.engine.parallel import MegatronMPU


def deepspeed_config(*, micro_batch_size: int, dp: int, lr: float, zero_stage: int,
                     weight_decay: float, clip_grad: float, bf16: bool,
                     offload_optimizer: bool = False) -> dict:
    """The DeepSpeed JSON config generated from Megatron-style flags.

    ``gradient_accumulation_steps`` is 1: Megatron's schedule accumulates the micro-batches and
    DeepSpeed sees one backward per step.
    """
    zero = {"stage": zero_stage, "contiguous_gradients": False, "overlap_comm": False,
            "reduce_scatter": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * dp,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "gradient_clipping": clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int
                  ) -> float:
    """Linear warm-up then cosine decay to ``min_lr``; a pure function of the step, so a resumed
    run needs no scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(engine, value: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = value


def check_zero_schedule(zero_stage: int, num_microbatches: int) -> None:
    """ZeRO-2 reduce-scatters each gradient from a hook as soon as it is computed; under
    Megatron's schedule a second micro-batch computes it again inside the same DeepSpeed step."""
    if zero_stage >= 2 and num_microbatches > 1:
        raise UserError(
            f"ZeRO stage {zero_stage} needs one micro-batch per step under Megatron's pipeline "
            f"schedule, but this layout runs {num_microbatches}; use --zero-stage 1, or set "
            "--global-batch-size = --micro-batch-size x data-parallel size")
    if zero_stage not in (0, 1, 2):
        raise UserError(f"--zero-stage {zero_stage} is not supported; use 0, 1 or 2")


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron-LM's rule: no weight decay on biases and 1-D parameters (every norm's weight);
    a name naming a norm counts too (LayerNorm or RMSNorm, fused into a linear or not)."""
    from blade_mega.engine.model import is_norm

    return not (name.endswith("bias") or param.dim() == 1 or is_norm(name))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's two groups (empty ones left out: DeepSpeed cannot flatten them)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def initialize_engine(model: torch.nn.Module, config: dict, trust_checkpoint: bool = False):
    """A DeepSpeed engine for ``model`` whose checkpoint files load as data
    (train/safe_load.py; ``trust_checkpoint``: the user allows pickle beyond that)."""
    import deepspeed

    from blade_mega.train import safe_load

    weight_decay = config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay),
        config=config, mpu=MegatronMPU())
    safe_load.install(engine, trust_checkpoint)
    return engine


@dataclass
class MicroBatch:
    """Inputs of one micro-batch, identical on every rank of a model-parallel group."""
    tokens: torch.Tensor        # [b, s] int64
    labels: torch.Tensor        # [b, s] int64
    weights: torch.Tensor       # [b, s] float32 per-token loss weights (0 = not trained on)
    position_ids: torch.Tensor  # [b, s] int64


def make_microbatch(samples: torch.Tensor, weights: Optional[torch.Tensor] = None) -> MicroBatch:
    """``samples`` are [b, s+1] token windows; inputs are the first s, labels the last s."""
    tokens = samples[:, :-1].contiguous()
    labels = samples[:, 1:].contiguous()
    if weights is None:
        weights = torch.ones(labels.shape, dtype=torch.float32)
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens).contiguous()
    return MicroBatch(tokens, labels, weights, positions)


@dataclass
class StepLosses:
    """What the last pipeline stage saw: weighted loss sums and, if asked, per-token losses."""
    # [weighted loss sum, weight] in float64 on the compute device, summed without a host sync
    # per micro-batch; None on stages without a loss.
    sums: Optional[torch.Tensor] = None
    token_losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def weighted_sum(self) -> float:
        return 0.0 if self.sums is None else float(self.sums[0])

    @property
    def weight(self) -> float:
        return 0.0 if self.sums is None else float(self.sums[1])


def comm_device() -> torch.device:
    """Where tensors must live for collectives: the GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class PipelineRunner:
    """Runs forward(-backward) of one model over micro-batches with Megatron's schedule."""

    def __init__(self, model: torch.nn.Module, seq_length: int, micro_batch_size: int):
        self.model = model
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size  # the default split (sketches, evaluations)
        self._schedule = get_forward_backward_func()

    def run(self, microbatches: list[MicroBatch], *, forward_only: bool, normaliser: float = 1.0,
            keep_token_losses: bool = False,
            weight_fn: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None
            ) -> StepLosses:
        """``loss = sum(w * l) / normaliser`` summed over micro-batches (the schedule divides each
        micro-batch loss by their count, so it is multiplied back here).

        ``weight_fn(i, token_losses, weights)`` may replace micro-batch i's weights once its
        per-token losses are known (token-level selection decides the mask there).
        """
        out = StepLosses()
        device = comm_device()
        n = len(microbatches)
        dp = parallel_state.get_data_parallel_world_size()
        # DeepSpeed averages gradients over DP; undo it so the objective is a sum over the batch.
        scale = n * dp / normaliser
        counter = iter(range(n))

        def loss_func(index: int, weights: torch.Tensor, token_losses: torch.Tensor):
            if weight_fn is not None:
                weights = weight_fn(index, token_losses.detach(), weights)
            weights = weights.to(token_losses.dtype)
            weighted = (token_losses * weights).sum()
            # float64 sums in micro-batch order: the same values .item() per micro-batch gave
            sums = torch.stack([weighted.detach().double(), weights.sum().double()])
            out.sums = sums if out.sums is None else out.sums + sums
            if keep_token_losses:
                out.token_losses.append(token_losses.detach().float().cpu())
            return weighted * scale, {}

        def forward_step(data_iterator, model):
            index = next(counter)
            mb = next(data_iterator)
            output = model(mb.tokens.to(device), mb.position_ids.to(device), None,
                           labels=mb.labels.to(device))
            return output, partial(loss_func, index, mb.weights.to(device))

        with torch.no_grad() if forward_only else torch.enable_grad():
            self._schedule(
                forward_step_func=forward_step, data_iterator=iter(microbatches),
                model=[self.model], num_microbatches=n, seq_length=self.seq_length,
                # the pipeline's activation shape: whatever size these micro-batches have
                micro_batch_size=microbatches[0].tokens.size(0), forward_only=forward_only)
        return out


def global_loss(losses: StepLosses) -> tuple[float, float]:
    """Sum the last stage's loss over data-parallel ranks and hand it to every pipeline stage."""
    totals = (torch.zeros(2, dtype=torch.float64, device=comm_device()) if losses.sums is None
              else losses.sums.to(comm_device(), copy=True))
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    totals = broadcast_from_last_stage(totals, (2,), torch.float64)
    return float(totals[0]), float(totals[1])


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape, dtype=torch.float32
                              ) -> torch.Tensor:
    """Send a tensor computed on the last pipeline stage to every stage of this pipeline."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=comm_device())
    else:
        tensor = tensor.to(comm_device(), dtype).contiguous()
    torch.distributed.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def split_microbatches(samples: torch.Tensor, micro_batch_size: int,
                       weights: Optional[torch.Tensor] = None) -> list[MicroBatch]:
    """[n, s+1] windows (and optional [n, s] weights) -> micro-batches of ``micro_batch_size``."""
    if samples.size(0) % micro_batch_size:
        raise ValueError(f"{samples.size(0)} samples do not split into micro-batches of "
                         f"{micro_batch_size}")
    out = []
    for start in range(0, samples.size(0), micro_batch_size):
        stop = start + micro_batch_size
        out.append(make_microbatch(samples[start:stop],
                                   None if weights is None else weights[start:stop]))
    return out


def drop_gradients(engine) -> None:
    """Forget a non-finite step's gradients, DeepSpeed's copies included.

    ZeRO-2 has already reduce-scattered some of them from its backward hooks, and marked those
    parameters reduced: finish the reduction (every DP rank drops the same step, so the ranks
    stay in step), then clear its partitioned buffers as its own overflow skip does. Without
    this the next good step fails ("has already been reduced") or adds the bad gradients."""
    optimizer = engine.optimizer
    if engine.zero_optimization_partition_gradients():
        engine.allreduce_gradients()
        for group in list(getattr(optimizer, "averaged_gradients", {})):
            optimizer.averaged_gradients[group] = None
            if group in getattr(optimizer, "all_grad_tensors", {}):
                optimizer.all_grad_tensors[group] = None
        release = getattr(optimizer, "_release_preflattened_grad_buffers", None)
        if release is not None:
            release()
    optimizer.zero_grad()
    for param in engine.module.parameters():
        param.grad = None


class ModelEngine:
    """A GPT stage + its DeepSpeed engine: a training step, and per-token losses for scoring.

    ``micro_batch_size`` splits its training batches (``split``), ``scoring_micro_batch_size``
    its forward-only scoring; a model smaller than the learner takes larger micro-batches of
    both (engine/plan.py, ``small_model_micro_batches``), since per-launch overhead, not
    arithmetic, bounds a small model's speed."""

    def __init__(self, engine, seq_length: int, micro_batch_size: int,
                 scoring_micro_batch_size: Optional[int] = None):
        self.engine = engine
        self.module = engine.module
        self.micro_batch_size = micro_batch_size
        self.scoring_micro_batch_size = scoring_micro_batch_size or micro_batch_size
        self.seq_length = seq_length
        self.runner = PipelineRunner(engine.module, seq_length, micro_batch_size)

    def split(self, samples: torch.Tensor, weights: Optional[torch.Tensor] = None
              ) -> list[MicroBatch]:
        """A training batch of this model in its own micro-batches."""
        return split_microbatches(samples, self.micro_batch_size, weights)

    def train_step(self, microbatches: list[MicroBatch], normaliser: float, lr: float,
                   weight_fn=None) -> tuple[tuple[float, float], bool]:
        """One optimizer step. Returns the global (weighted loss sum, weight) and whether it was
        finite; a non-finite step changes nothing (its gradients are dropped)."""
        self.module.train()
        set_learning_rate(self.engine, lr)
        local = self.runner.run(microbatches, forward_only=False, normaliser=normaliser,
                                weight_fn=weight_fn)
        weighted, weight = global_loss(local)
        finite = math.isfinite(weighted)
        if finite:
            self.engine.allreduce_gradients()
            self.engine.step()
        else:
            drop_gradients(self.engine)
        return (weighted, weight), finite

    @torch.no_grad()
    def token_losses(self, samples: torch.Tensor, everywhere: bool = True
                     ) -> Optional[torch.Tensor]:
        """Per-token losses [n, s] of ``samples`` [n, s+1]. They are computed on the last
        pipeline stage; ``everywhere`` sends them to every stage, else other stages get None."""
        self.module.eval()
        size = math.gcd(self.scoring_micro_batch_size, samples.size(0))
        out = self.runner.run(split_microbatches(samples, size),
                              forward_only=True, keep_token_losses=True)
        losses = torch.cat(out.token_losses) if out.token_losses else None
        if not everywhere:
            return losses
        shape = (samples.size(0), samples.size(1) - 1)
        return broadcast_from_last_stage(losses, shape).cpu()

    @torch.no_grad()
    def sample_losses(self, samples: torch.Tensor) -> torch.Tensor:
        """Mean token loss per sample [n], on every stage (only n floats cross stages)."""
        losses = self.token_losses(samples, everywhere=False)
        means = losses.mean(dim=1) if losses is not None else None
        return broadcast_from_last_stage(means, (samples.size(0),)).cpu()

    @torch.no_grad()
    def copy_weights_from(self, other: "ModelEngine") -> None:
        """``self <- other`` exactly: module weights and DeepSpeed's fp32 master partitions."""
        for mine, theirs in zip(self.module.parameters(), other.module.parameters()):
            mine.copy_(theirs)
        mine_fp32 = getattr(self.engine.optimizer, "single_partition_of_fp32_groups", None)
        theirs_fp32 = getattr(other.engine.optimizer, "single_partition_of_fp32_groups", None)
        if mine_fp32 is not None and theirs_fp32 is not None:  # ZeRO-1/2: exact fp32 masters
            for mine, theirs in zip(mine_fp32, theirs_fp32):
                mine.data.copy_(theirs.data)
        elif hasattr(self.engine.optimizer, "refresh_fp32_params"):
            # Other wrappers (ZeRO-0 with bf16): masters re-read from the copied module weights.
            self.engine.optimizer.refresh_fp32_params()

    @torch.no_grad()
    def blend_weights_from(self, other: "ModelEngine", beta: float) -> None:
        """``self <- (1 - beta) self + beta other``, on the module weights and on DeepSpeed's
        fp32 master partitions alike (the same element-wise rule on both)."""
        for mine, theirs in zip(self.module.parameters(), other.module.parameters()):
            mine.lerp_(theirs, beta)
        mine_fp32 = getattr(self.engine.optimizer, "single_partition_of_fp32_groups", None)
        theirs_fp32 = getattr(other.engine.optimizer, "single_partition_of_fp32_groups", None)
        if mine_fp32 is not None and theirs_fp32 is not None:
            for mine, theirs in zip(mine_fp32, theirs_fp32):
                mine.data.lerp_(theirs.data, beta)
        elif hasattr(self.engine.optimizer, "refresh_fp32_params"):
            self.engine.optimizer.refresh_fp32_params()

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under DeepSpeed's wrapper (ZeRO-1/2: over the fp32 partitions)."""
        optimizer = self.engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def reset_optimizer_state(self) -> None:
        """Adam as if never stepped: torch's Adam re-creates step 0 and zero moments lazily."""
        self._base_optimizer().state.clear()

    @torch.no_grad()
    def copy_optimizer_state_from(self, other: "ModelEngine") -> None:
        """``self``'s Adam state <- ``other``'s (moments and step count), partition by partition:
        with the same model and layout, the two optimizers' parameter groups match one to one."""
        mine, theirs = self._base_optimizer(), other._base_optimizer()
        for group, their_group in zip(mine.param_groups, theirs.param_groups):
            for param, their_param in zip(group["params"], their_group["params"]):
                state = theirs.state.get(their_param)
                if not state:
                    mine.state.pop(param, None)
                    continue
                mine.state[param] = {key: value.clone() if torch.is_tensor(value) else value
                                     for key, value in state.items()}
