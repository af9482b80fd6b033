"""Analytic FLOPs of the GPT's passes, and the run's cumulative count by role.

One formula for every method and bench: matrix multiplies count 2 FLOPs per multiply-add; a
forward over one token of a ``seq_length`` window costs, per transformer layer,

    qkv 2*h*3h  +  attention scores 2*s*h  +  scores x values 2*s*h  +  proj 2*h*h
    +  fc1 2*h*f  +  fc2 2*f*h                      = 8 h^2 + 4 h f + 4 s h

(full s x s scores, as Megatron-LM's FLOP formula counts them; causal masking halves the useful
share but not what the kernels compute), plus the output layer 2*h*V over the padded vocabulary.
With grouped-query attention the qkv output is h + 2 h g / a wide (g key/value groups, a heads);
with SwiGLU fc1 is 2f wide (gate and up), as Megatron builds them.
Embeddings, norms, softmax and element-wise work are left out (under 1% at these sizes).
A training pass (forward + backward) is 3 forwards.

Roles: ``learner`` (the learner's training steps), ``scoring`` (forward-only passes that score
candidates: learner, reference or proxy pair), ``reference`` (training of the reference and of
the proxy learner), ``sketch`` (frozen forward/backward passes and projections of gradient
sketches).  Counts are global (every rank adds the same numbers), so any rank's log is the run's.
"""

from __future__ import annotations

from blade_mega.engine.model import ModelSize

ROLES = ("learner", "scoring", "reference", "sketch")
TRAIN = 3  # forward + backward, in forwards


def forward_flops_per_token(size: ModelSize, vocab: int, seq_length: int) -> int:
    """One token's forward through a GPT of ``size`` with a ``vocab``-row (padded) output."""
    h, f = size.hidden_size, size.ffn_hidden_size
    per_layer = sum(2 * d_in * d_out for d_in, d_out in linear_shapes(size)) + 4 * seq_length * h
    return size.num_layers * per_layer + 2 * h * vocab


def linear_shapes(size: ModelSize) -> tuple[tuple[int, int], ...]:
    """(d_in, d_out) of a layer's linears: qkv, proj, fc1, fc2."""
    h, f = size.hidden_size, size.ffn_hidden_size
    qkv = h + 2 * h * size.query_groups // size.num_attention_heads
    return (h, qkv), (h, h), (h, 2 * f if size.swiglu else f), (f, h)


def sketch_flops_per_token(size: ModelSize, vocab: int, seq_length: int, dim: int) -> int:
    """One token of a gradient sketch: a forward and an input-gradient backward (no weight
    gradients: 2 forwards), plus per sketched linear the projections of its input and output
    gradient (``2 w (d_in + d_out)``, w = k^2/q) and the block products (``2 k^2``)."""
    from blade_mega.sketch.sketcher import block_side

    h = size.hidden_size
    layer_w = dim * dim // block_side(dim, False)
    output_w = dim * dim // block_side(dim, True)
    per_layer = sum(2 * layer_w * (d_in + d_out) + 2 * dim * dim
                    for d_in, d_out in linear_shapes(size))
    output = 2 * output_w * (h + vocab) + 2 * dim * dim
    return 2 * forward_flops_per_token(size, vocab, seq_length) + \
        size.num_layers * per_layer + output


class FlopCounter:
    """Cumulative analytic FLOPs of a run, by role. ``state_dict`` goes into checkpoints."""

    def __init__(self, vocab: int, seq_length: int):
        self.vocab = vocab
        self.seq_length = seq_length
        self.totals = {role: 0 for role in ROLES}

    def forward(self, size: ModelSize) -> int:
        """FLOPs of one sample's forward (``seq_length`` tokens)."""
        return forward_flops_per_token(size, self.vocab, self.seq_length) * self.seq_length

    def add(self, role: str, size: ModelSize, samples: int, passes: float) -> None:
        """``samples`` global samples through ``passes`` forwards each (TRAIN for a step)."""
        self.totals[role] += int(round(self.forward(size) * samples * passes))

    def add_sketch(self, size: ModelSize, samples: int, dim: int) -> None:
        per_token = sketch_flops_per_token(size, self.vocab, self.seq_length, dim)
        self.totals["sketch"] += per_token * self.seq_length * samples

    def record(self) -> dict:
        """What a log record carries: each role's total and their sum."""
        return {"flops": {**self.totals, "total": sum(self.totals.values())}}

    def state_dict(self) -> dict:
        return dict(self.totals)

    def load_state_dict(self, state: dict) -> None:
        self.totals = {role: int(state.get(role, 0)) for role in ROLES}
