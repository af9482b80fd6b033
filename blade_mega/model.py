"""The model: Megatron-Core ``GPTModel`` built from a layer spec, sized by named presets.

On CUDA the stock local spec (or Transformer Engine's, when installed) is used untouched.
Without CUDA the local spec's core attention is swapped for ``CpuDotProductAttention``,
because the stock one takes its score buffer from a CUDA-only global memory pool.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from blade_mega.cpu_compat import cuda_available


@dataclass(frozen=True)
class ModelSize:
    """A model's shape and architecture; the field names are the Megatron-LM flags' dests."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    max_position_embeddings: int
    normalization: str = "LayerNorm"      # or "RMSNorm"
    swiglu: bool = False                  # gated SiLU MLP instead of GELU
    add_bias_linear: bool = True          # --disable-bias-linear sets False
    num_query_groups: Optional[int] = None  # GQA; None = one group per head
    position_embedding_type: str = "rope"  # or "learned_absolute"
    rotary_base: int = 10000

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


LLAMA = dict(normalization="RMSNorm", swiglu=True, add_bias_linear=False)

# Named sizes. ``tiny`` is for tests, ``demo`` for the 2-core demo, the rest for clusters.
# The ``-llama`` presets are Llama-style (RMSNorm, SwiGLU, no biases, GQA, RoPE); their SwiGLU
# width is about 8/3 h, so the MLP has the parameters of a 4h GELU one.
PRESETS: dict[str, ModelSize] = {
    "tiny": ModelSize(2, 64, 4, 256, 256),
    "demo": ModelSize(4, 128, 4, 512, 512),
    "125m": ModelSize(12, 768, 12, 3072, 2048),
    "350m": ModelSize(24, 1024, 16, 4096, 2048),
    "1.3b": ModelSize(24, 2048, 16, 8192, 2048),
    "tiny-llama": ModelSize(2, 64, 4, 176, 256, num_query_groups=2, **LLAMA),
    "demo-llama": ModelSize(4, 128, 4, 352, 512, num_query_groups=2, **LLAMA),
    "125m-llama": ModelSize(12, 768, 12, 2048, 2048, num_query_groups=4, **LLAMA),
    "1.3b-llama": ModelSize(24, 2048, 16, 5504, 2048, num_query_groups=8, **LLAMA),
}


class CpuDotProductAttention(DotProductAttention):
    """Core attention computed with ``scaled_dot_product_attention`` on any device.

    Same inputs, outputs, head partitioning and dropout RNG handling as Megatron's
    ``DotProductAttention``; only the score buffer allocation differs.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if heads_per_group > 1:
            key = key.repeat_interleave(heads_per_group, dim=2)
            value = value.repeat_interleave(heads_per_group, dim=2)
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None if causal or attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale)
        # [b, heads, s, dim] -> [s, b, heads * dim]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)


def _global_name(name: str, layer_offset: int) -> str:
    """``decoder.layers.3.x`` on a later pipeline stage is layer ``3 + offset`` of the whole model."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts)


@torch.no_grad()
def initialize_weights(model: GPTModel, seed: int, init_std: float, num_layers: int) -> None:
    """Give every weight a value that depends only on (seed, its global name), never on the layout.

    Megatron's CPU initialisation draws from one RNG stream in construction order, so a pipeline
    stage that starts at layer 2 would get different weights than a single-stage model.  Here each
    full (unsharded) tensor comes from its own generator and each TP rank keeps its slice.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    layer_offset = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
    output_std = init_std / math.sqrt(2.0 * num_layers)  # GPT-2 scaled init of residual outputs
    gated = model.config.gated_linear_unit
    for name, param in model.named_parameters():
        global_name = _global_name(name, layer_offset)
        if name.endswith("bias"):
            param.zero_()
            continue
        if "layer_norm" in name or name.startswith("decoder.final_layernorm"):
            param.fill_(1.0)
            continue
        sharded = getattr(param, "tensor_model_parallel", False) and tp_size > 1
        dim = getattr(param, "partition_dim", 0)
        full_shape = list(param.shape)
        if sharded:
            full_shape[dim] *= tp_size
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{global_name}".encode()))
        std = output_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else init_std
        full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        if sharded and gated and name.endswith("linear_fc1.weight"):
            full = gated_tp_order(full, tp_size)
        shard = full.chunk(tp_size, dim=dim)[tp_rank] if sharded else full
        param.copy_(shard)


def gated_tp_order(fc1: torch.Tensor, tp_size: int) -> torch.Tensor:
    """A gated MLP's full fc1 [gate; up] in the row order of its TP shards: Megatron's shard r
    holds [gate_r; up_r], not rows r/tp..(r+1)/tp of [gate; up]."""
    gate, up = fc1.chunk(2, dim=0)
    return torch.cat([torch.cat(pair) for pair in zip(gate.chunk(tp_size), up.chunk(tp_size))])


def layer_spec(normalization: str = "LayerNorm"):
    spec = get_gpt_layer_local_spec(normalization=normalization)
    if not cuda_available():
        spec.submodules.self_attention.submodules.core_attention = CpuDotProductAttention
    return spec


def transformer_config(size: ModelSize, *, bf16: bool = False, dropout: float = 0.0,
                       init_std: float = 0.02) -> TransformerConfig:
    return TransformerConfig(
        num_layers=size.num_layers,
        hidden_size=size.hidden_size,
        num_attention_heads=size.num_attention_heads,
        ffn_hidden_size=size.ffn_hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        hidden_dropout=dropout,
        attention_dropout=dropout,
        init_method_std=init_std,
        normalization=size.normalization,
        gated_linear_unit=size.swiglu,
        activation_func=F.silu if size.swiglu else F.gelu,
        add_bias_linear=size.add_bias_linear,
        num_query_groups=size.num_query_groups,
        use_cpu_initialization=True,  # same weights for any TP layout, given the seed
        perform_initialization=True,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


def build_gpt(size: ModelSize, vocab_size: int, *, seed: int, bf16: bool = False,
              init_std: float = 0.02) -> GPTModel:
    """This rank's pipeline stage of a GPT. Embeddings are untied so PP needs no shared-grad reduce."""
    config = transformer_config(size, bf16=bf16, init_std=init_std)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(size.normalization),
        vocab_size=vocab_size,
        max_sequence_length=size.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,  # logits stay vocab-sharded; losses use vocab-parallel CE
        share_embeddings_and_output_weights=False,
        position_embedding_type=size.position_embedding_type,
        rotary_base=size.rotary_base,
    )
    initialize_weights(model, seed, init_std, size.num_layers)
    device = torch.cuda.current_device() if cuda_available() else "cpu"
    return model.to(device)


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Megatron pads the vocab so each TP shard is a multiple of ``multiple`` rows."""
    step = multiple * tp_size
    return ((vocab_size + step - 1) // step) * step


def count_parameters(size: ModelSize, vocab_size: int) -> int:
    """Parameters of the full (unsharded) model, for memory and FLOP estimates."""
    h, f, n = size.hidden_size, size.ffn_hidden_size, size.num_layers
    qkv = h + 2 * size.query_groups * (h // size.num_attention_heads)
    fc1 = 2 * f if size.swiglu else f
    norm = 2 * h if size.normalization == "LayerNorm" else h
    biases = qkv + h + fc1 + h if size.add_bias_linear else 0
    per_layer = qkv * h + h * h + fc1 * h + f * h + biases + 2 * norm
    positions = size.max_position_embeddings * h \
        if size.position_embedding_type == "learned_absolute" else 0
    return n * per_layer + 2 * vocab_size * h + positions + norm
