"""Per-sample gradient sketches of one pipeline stage's linear weights, from one backward pass.

For a linear layer ``y = x W^T`` over a sequence, sample i's weight gradient is
``G_i = sum_t d_t x_t^T`` (``d_t`` = dLoss_i/dy_t). Its Kronecker sketch is

    P_out G_i P_in^T = sum_t (P_out d_t)(P_in x_t)^T        (k x k, G_i never formed)

so a forward hook projects each layer's input and a tensor hook on its output projects the
output-gradient, and a batched outer product sums over tokens. Samples of a GPT batch are
independent, so one backward of ``sum_i loss_i`` gives every ``d_t`` of every sample.

A layer's sketch of ``k x k`` numbers is ``(k/q)^2`` independent Kronecker blocks of ``q x q``,
i.e. projections of width ``w = k^2/q``. A single k x k Kronecker sketch of a low-rank gradient
(a sample's gradient has rank <= its token count, and measured stable ranks are 1-3) estimates
inner products with a relative variance of order 1/k, not 1/k^2; independent blocks bring it to
order 1/w for the same size, at a projection cost of ``w (d_in + d_out)`` per token and layer.
The output layer holds most of a language model's per-sample gradient norm (77-99% measured on
the tiny and demo models), so it gets the narrow blocks (q = 8, w = 512 at k = 64); the
transformer layers get q = 16 (w = 256): the same sketch size everywhere, about 40% less
projection work, and the same accuracy in the total inner product (within the spread between
projection draws, measured on exact per-sample gradients).

Megatron's tensor parallelism splits these sums, never the samples:
* ColumnParallelLinear (qkv, fc1, output layer) holds rows [a, b) of W and sees the whole x:
  it uses columns [a, b) of P_out and all of P_in.
* RowParallelLinear (proj, fc2) holds columns [a, b) of W and sees x[..., a:b] and the whole d:
  it uses columns [a, b) of P_in and all of P_out.
Either way each TP rank's partial sketch is one term of a sum over ranks.  Each sketched layer
has a *slot* in the whole model's sketch (layer-major order, output layer last), so pipeline
stages fill disjoint slots: summing placed partials over the model-parallel group both adds the
TP terms and concatenates the PP stages.

The forward/backward runs through Megatron's pipeline schedule with every parameter frozen:
no weight gradient is computed or reduced, and no optimizer state is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from blade_mega.engine.model_engine import PipelineRunner, split_microbatches
from blade_mega.sketch.projection import projection_columns

OUTPUT_BLOCK = 8   # q of the output layer (most of the gradient norm): the widest projection
LAYER_BLOCK = 16   # q of the transformer layers' linears


@dataclass
class SketchedLayer:
    name: str             # global name, the same for every layout
    module: torch.nn.Module
    slot: int             # place in the whole model's sketch
    q: int                # side of one Kronecker block; r = (k/q)^2 blocks
    p_out: torch.Tensor   # [w, this rank's output dim], w = r q
    p_in: torch.Tensor    # [w, this rank's input dim]

    @property
    def blocks(self) -> int:
        return self.p_out.size(0) // self.q

    @property
    def scale(self) -> float:
        """Entries are unit-variance: each block's inner product is scaled to be unbiased, and the
        r blocks are averaged."""
        return 1.0 / (self.q * self.blocks ** 0.5)


def block_side(dim: int, output_layer: bool) -> int:
    """q for a k x k sketch: gcd(k, the layer kind's block side), i.e. 8 or 16 for the k that
    ``check_sketch_dim`` accepts above 8, k itself up to 8."""
    return math.gcd(dim, OUTPUT_BLOCK if output_layer else LAYER_BLOCK)


def _projections(seed: int, name: str, module: torch.nn.Module, width: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's columns of the layer's global P_out and P_in: a ColumnParallelLinear shard
    owns a range of output rows, a RowParallelLinear shard a range of input columns."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rows, cols = module.weight.shape
    if isinstance(module, ColumnParallelLinear):
        out_range, in_range = (rows * tp, rank * rows, (rank + 1) * rows), (cols, 0, cols)
    else:
        out_range, in_range = (rows, 0, rows), (cols * tp, rank * cols, (rank + 1) * cols)
    p_out = projection_columns(seed, name, "out", width, *out_range)
    p_in = projection_columns(seed, name, "in", width, *in_range)
    return p_out.to(device), p_in.to(device)


def check_sketch_dim(dim: int) -> None:
    # Above 8, a multiple of 8 keeps q >= 8, so projections stay at most k^2/8 wide (an odd k
    # would make them k^2 wide: 16x the work and a QR of that width at start-up).
    if dim < 1 or (dim > OUTPUT_BLOCK and dim % OUTPUT_BLOCK):
        raise ValueError(f"sketch dimension {dim} must be at most {OUTPUT_BLOCK} or a multiple "
                         f"of {OUTPUT_BLOCK}")


def sketched_modules(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module, int]], int]:
    """(global name, module, slot) of this stage's sketched linears, and the model's slot count."""
    found = []
    per_layer = None
    for layer in model.decoder.layers:
        number = layer.layer_number - 1  # global, whatever the pipeline stage
        linears = [(sub, m) for sub, m in layer.named_modules()
                   if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
        if per_layer is None:
            per_layer = len(linears)
        if len(linears) != per_layer:
            raise ValueError("sketching needs the same linear layers in every transformer layer")
        for position, (sub, module) in enumerate(linears):
            found.append((f"decoder.layers.{number}.{sub}", module, number * per_layer + position))
    per_layer = per_layer or 0
    output_slot = model.config.num_layers * per_layer
    if getattr(model, "post_process", False) and getattr(model, "output_layer", None) is not None:
        found.append(("output_layer", model.output_layer, output_slot))
    return found, output_slot + 1


class GradientSketcher:
    """Per-sample sketches ``[n, local layers, k, k]`` of one stage (this TP rank's partial)."""

    def __init__(self, model: torch.nn.Module, runner: PipelineRunner, dim: int, seed: int):
        check_sketch_dim(dim)
        if model.config.sequence_parallel:
            raise ValueError("gradient sketches do not support sequence parallelism")
        self.model = model
        self.runner = runner
        self.dim = dim
        device = next(model.parameters()).device
        found, self.num_slots = sketched_modules(model)
        self.layers = []
        for name, module, slot in found:
            q = block_side(dim, name == "output_layer")
            width = dim * dim // q
            self.layers.append(SketchedLayer(name, module, slot, q,
                                             *_projections(seed, name, module, width, device)))
        self.slots = torch.tensor([layer.slot for layer in self.layers], dtype=torch.long)

    @property
    def slot_size(self) -> int:
        return self.dim * self.dim

    def sketch(self, samples: torch.Tensor) -> torch.Tensor:
        """Sketches of d(mean token loss of sample i)/dW for every sample of ``samples`` [n, s+1].

        Every rank of a model-parallel group passes the same samples (like a training step).
        """
        n, seq = samples.size(0), samples.size(1) - 1
        device = next(self.model.parameters()).device
        self._out = torch.zeros(n, len(self.layers), self.dim, self.dim, device=device)
        self._next_sample = 0
        frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        was_training = self.model.training
        handles = [self.model.register_forward_pre_hook(self._count_samples)]
        embedding = getattr(self.model, "embedding", None)
        if getattr(self.model, "pre_process", False) and embedding is not None:
            # Nothing upstream needs a gradient; the schedule still needs a graph from here.
            handles.append(embedding.register_forward_hook(
                lambda _m, _a, out: out.detach().requires_grad_(True)))
        for index, layer in enumerate(self.layers):
            handles.append(layer.module.register_forward_hook(partial(self._capture, index)))
        try:
            for param, _ in frozen:
                param.requires_grad_(False)
            self.model.eval()
            dp = parallel_state.get_data_parallel_world_size()
            # The runner's loss is sum(token losses) * dp / normaliser: this makes it
            # sum_i mean_t loss(i, t).
            self.runner.run(split_microbatches(samples, self.runner.micro_batch_size),
                            forward_only=False, normaliser=float(dp * seq))
        finally:
            for handle in handles:
                handle.remove()
            for param, requires_grad in frozen:
                param.requires_grad_(requires_grad)
            self.model.train(was_training)
        out, self._out = self._out, None
        return out

    # -- hooks -------------------------------------------------------------------------------
    def _count_samples(self, _module, args) -> None:
        self._first_sample = self._next_sample
        self._next_sample += args[0].size(0)  # input_ids [b, s]

    def _capture(self, index: int, module, args, output) -> None:
        layer = self.layers[index]
        out = output[0] if isinstance(output, tuple) else output
        if out.size(-1) != layer.p_out.size(1):
            raise RuntimeError(f"{layer.name}: output of width {out.size(-1)} does not match its "
                               f"weight shard ({layer.p_out.size(1)} rows); gathered outputs "
                               "cannot be sketched")
        with torch.no_grad():
            # [b, w, s]: sample-major, so the sum over tokens below is one batched matmul with
            # no transposing copies.
            projected_in = torch.matmul(layer.p_in, args[0].detach().float().permute(1, 2, 0))
        out.register_hook(partial(self._accumulate, index, self._first_sample, projected_in))

    def _accumulate(self, index: int, first: int, projected_in: torch.Tensor,
                    grad: torch.Tensor) -> None:
        layer = self.layers[index]
        with torch.no_grad():
            projected_out = torch.matmul(layer.p_out, grad.detach().float().permute(1, 2, 0))
            b, _, s = projected_out.shape
            blocks = b * layer.blocks
            # Block (i, j): sum_t (P_out,j d_it)(P_in,j x_it)^T for sample i.
            per_sample = torch.bmm(projected_out.view(blocks, layer.q, s),
                                   projected_in.view(blocks, layer.q, s).transpose(1, 2))
            self._out[first:first + b, index] += per_sample.view(b, self.dim, self.dim) * layer.scale
