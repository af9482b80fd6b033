"""The model: Megatron-Core ``GPTModel`` built from a layer spec, sized by named presets.

The layer spec and fused kernels follow the machine (blade_mega/engine/device_path.py): Transformer
Engine's spec on CUDA when it imports, else the local spec with torch SDPA core attention
(``SdpaDotProductAttention``: flash attention on CUDA; on CPU the stock attention cannot run,
as it takes its score buffer from a CUDA-only global memory pool).
"""

from __future__ import annotations

import hashlib
import math
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

from blade_mega.engine import device_path
from blade_mega.engine.cpu_compat import cuda_available


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


class SdpaDotProductAttention(DotProductAttention):
    """Core attention computed with ``scaled_dot_product_attention`` on any device (flash
    attention on CUDA).

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


CpuDotProductAttention = SdpaDotProductAttention  # the CPU path's name for it


def _row_seed(seed: int, global_name: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{global_name}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _global_rows(name: str, param: torch.nn.Parameter, dim: int, tp_rank: int, tp_size: int,
                 gated: bool) -> list[int]:
    """The full tensor's indices along ``dim`` of this rank's slice, in local order."""
    local = param.shape[dim]
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return list(range(local))
    if gated and name.endswith("mlp.linear_fc1.weight"):
        # SwiGLU's fc1 holds [gate; up] on every rank: rank r has gate[r] then up[r].
        half = local // 2
        full_half = half * tp_size
        return ([tp_rank * half + k for k in range(half)]
                + [full_half + tp_rank * half + k for k in range(half)])
    return [tp_rank * local + k for k in range(local)]


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """Megatron-Core sets a TP weight's ``tensor_model_parallel``/``partition_dim`` only while it
    initialises it; with ``perform_initialization=False`` (initialize_weights does it) they are
    set here, as Megatron would: gradient-norm clipping and the shard layout depend on them."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def is_norm(name: str) -> bool:
    """A norm's parameter, by name: LayerNorm/RMSNorm modules, TE's fused ``layer_norm_*``."""
    module = name.rsplit(".", 2)[-2] if "." in name else ""
    return "norm" in module or "layer_norm" in name


@torch.no_grad()
def initialize_weights(model: GPTModel, seed: int, init_std: float, num_layers: int) -> None:
    """Give every weight a value that depends only on (seed, its global name), never on the layout,
    and draw only this rank's shard.

    Megatron's CPU initialisation draws from one RNG stream in construction order, so a pipeline
    stage that starts at layer 2 would get different weights than a single-stage model; and it
    builds every full tensor on every rank.  Here each slice along the tensor-parallel dimension
    (a row of a column-parallel weight, a column of a row-parallel one) has its own generator,
    seeded by (seed, global name, index in the full tensor): a TP rank draws its slices alone and
    gets exactly what a single rank holds there.  Biases are 0, norm weights 1.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    layer_offset = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
    gated = bool(getattr(model.config, "gated_linear_unit", False))
    output_std = init_std / math.sqrt(2.0 * num_layers)  # GPT-2 scaled init of residual outputs
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
            continue
        if is_norm(name):
            param.fill_(1.0)
            continue
        global_name = _global_name(name, layer_offset)
        std = output_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else init_std
        dim = getattr(param, "partition_dim", 0) if param.dim() > 1 else 0
        # Straight into the parameter when it is fp32 on the host, else through one shard buffer.
        direct = param.dtype == torch.float32 and param.device.type == "cpu"
        target = param if direct else torch.empty(param.shape, dtype=torch.float32)
        row_shape = target.select(dim, 0).shape
        for k, index in enumerate(_global_rows(name, param, dim, tp_rank, tp_size, gated)):
            generator = torch.Generator().manual_seed(_row_seed(seed, global_name, index))
            row = torch.empty(row_shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            target.select(dim, k).copy_(row)
        if not direct:
            param.copy_(target)


def gated_tp_order(fc1: torch.Tensor, tp_size: int) -> torch.Tensor:
    """A gated MLP's full fc1 [gate; up] in the row order of its TP shards: Megatron's shard r
    holds [gate_r; up_r], not rows r/tp..(r+1)/tp of [gate; up]."""
    gate, up = fc1.chunk(2, dim=0)
    return torch.cat([torch.cat(pair) for pair in zip(gate.chunk(tp_size), up.chunk(tp_size))])


def layer_spec(normalization: str = "LayerNorm"):
    path = device_path.detect()
    if path.spec == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec)

        return get_gpt_layer_with_transformer_engine_spec()  # TE reads config.normalization
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
    return spec


def speed_options(model) -> dict:
    """TransformerConfig fields from --recompute-* and --sequence-parallel (a ``ModelConfig``)."""
    return {"recompute_granularity": model.recompute_granularity,
            "recompute_method": model.recompute_method,
            "recompute_num_layers": model.recompute_num_layers,
            "sequence_parallel": model.sequence_parallel}


def transformer_config(size: ModelSize, *, bf16: bool = False, dropout: float = 0.0,
                       init_std: float = 0.02, options: dict | None = None) -> TransformerConfig:
    return TransformerConfig(
        **device_path.detect().config_fields(add_bias_linear=size.add_bias_linear,
                                              gated_linear_unit=size.swiglu),
        **(options or {}),
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
        # Shards are allocated where they will live (the GPU, or the host without CUDA), and
        # initialize_weights fills them.
        use_cpu_initialization=not cuda_available(),
        perform_initialization=False,  # Megatron's would build each full tensor on every rank
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def build_gpt(size: ModelSize, vocab_size: int, *, seed: int, bf16: bool = False,
              init_std: float = 0.02, options: dict | None = None) -> GPTModel:
    """This rank's pipeline stage of a GPT. Embeddings are untied so PP needs no shared-grad reduce.
    ``options``: more TransformerConfig fields (``speed_options``)."""
    config = transformer_config(size, bf16=bf16, init_std=init_std, options=options)
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
    mark_tensor_parallel(model)
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
