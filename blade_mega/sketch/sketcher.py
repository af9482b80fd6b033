"""Per-sample gradient sketches of one pipeline stage's linear weights, from one backward pass.

For a linear layer ``y = x W^T`` over a sequence, sample i's weight gradient is
``G_i = sum_t d_t x_t^T`` (``d_t`` = dLoss_i/dy_t). Its Kronecker sketch is

    P_out G_i P_in^T = sum_t (P_out d_t)(P_in x_t)^T        (k x k, G_i never formed)

so a forward hook projects each layer's input and a tensor hook on its output projects the
output-gradient, and a batched outer product sums over tokens. Samples of a GPT batch are
independent, so one backward of ``sum_i loss_i`` gives every ``d_t`` of every sample.

A layer's sketch of ``k x k`` numbers is ``(k/q)^2`` independent Kronecker blocks of ``q x q``
(``q = BLOCK``), i.e. projections of width ``w = k^2/q``. A single k x k Kronecker sketch of a
low-rank gradient (a sample's gradient has rank <= its token count) estimates inner products
with a relative variance of order 1/k, not 1/k^2; independent blocks bring it to order 1/w for
the same size, at a projection cost of ``w (d_in + d_out)`` per token and layer.

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

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from blade_mega.engine import PipelineRunner, split_microbatches
from blade_mega.sketch.projection import projection_columns

BLOCK = 8  # q: side of one Kronecker block


@dataclass
class SketchedLayer:
    name: str             # global name, the same for every layout
    module: torch.nn.Module
    slot: int             # place in the whole model's sketch
    p_out: torch.Tensor   # [w, this rank's output dim]
    p_in: torch.Tensor    # [w, this rank's input dim]


def _tp_range(module: torch.nn.Module) -> tuple[str, int, int]:
    """Which side of the weight is TP-sharded, and this rank's global [start, stop) on it."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    rows, cols = module.weight.shape
    if isinstance(module, ColumnParallelLinear):
        return "out", rank * rows, (rank + 1) * rows
    return "in", rank * cols, (rank + 1) * cols


def _projections(seed: int, name: str, module: torch.nn.Module, width: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's columns of the layer's global P_out and P_in.  ``rows`` is the local output
    width of a ColumnParallelLinear shard; a RowParallelLinear's output is whole."""
    rows, cols = module.weight.shape
    side, start, stop = _tp_range(module)
    out_range = (start, stop) if side == "out" else (0, rows)
    in_range = (start, stop) if side == "in" else (0, cols)
    p_out = projection_columns(seed, name, "out", width, *out_range)
    p_in = projection_columns(seed, name, "in", width, *in_range)
    return p_out.to(device), p_in.to(device)


def check_sketch_dim(dim: int) -> None:
    if dim < 1 or (dim > BLOCK and dim % BLOCK):
        raise ValueError(f"sketch dimension {dim} must be at most {BLOCK} or a multiple of it")


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
        self.q = min(BLOCK, dim)
        self.r = (dim // self.q) ** 2
        # Entries are N(0, 1); each block's inner product is scaled to be unbiased, and the r
        # blocks are averaged.
        self.scale = 1.0 / (self.q * self.r ** 0.5)
        device = next(model.parameters()).device
        found, self.num_slots = sketched_modules(model)
        self.layers = [SketchedLayer(name, module, slot, *_projections(seed, name, module,
                                                                        self.r * self.q, device))
                       for name, module, slot in found]
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
            projected_in = args[0].detach().float() @ layer.p_in.T  # [s, b, k]
        out.register_hook(partial(self._accumulate, index, self._first_sample, projected_in))

    def _accumulate(self, index: int, first: int, projected_in: torch.Tensor,
                    grad: torch.Tensor) -> None:
        with torch.no_grad():
            projected_out = grad.detach().float() @ self.layers[index].p_out.T  # [s, b, k]
            s, b, _ = projected_out.shape
            per_sample = torch.einsum("sbro,sbri->broi", projected_out.view(s, b, self.r, self.q),
                                      projected_in.view(s, b, self.r, self.q))
            self._out[first:first + b, index] += per_sample.reshape(b, self.dim, self.dim) * self.scale
