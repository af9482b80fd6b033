"""Which Megatron-Core model path this machine runs: one decision, made from three facts.

| CUDA | Transformer Engine | Apex | layer spec | core attention | fused kernels | sequence parallel |
|---|---|---|---|---|---|---|
| yes | yes | any | TE's (``get_gpt_layer_with_transformer_engine_spec``) | TE's (flash / cuDNN fused) | bias-GELU/SwiGLU, bias-dropout-add, masked softmax, RoPE | yes |
| yes | no | yes | local | torch SDPA (flash) | bias-GELU/SwiGLU, bias-dropout-add; Apex's persistent LayerNorm | yes |
| yes | no | no | local | torch SDPA (flash) | bias-GELU/SwiGLU, bias-dropout-add | no (torch LayerNorm) |
| no | any | any | local | torch SDPA (CPU math kernel) | none (today's CPU path) | no |

Megatron's gradient-accumulation fusion stays off everywhere: it accumulates into the
``main_grad`` buffers of Megatron's own DDP, and DeepSpeed owns the gradients here.  bf16 is the
default with CUDA (``--fp32`` opts out, config.resolve_device_flags), the backend nccl; without
CUDA, gloo and fp32, and blade_mega/engine/cpu_compat.py patches the few CUDA-only places (it does
nothing when CUDA exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# TransformerConfig fields this module decides, all off on the CPU path.
FUSION_FIELDS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
                 "apply_rope_fusion", "persist_layer_norm", "gradient_accumulation_fusion")


@dataclass(frozen=True)
class DevicePath:
    device: str        # "cuda" | "cpu"
    spec: str          # "transformer_engine" | "local"
    attention: str     # "te" (TE's fused attention) | "sdpa" (torch scaled_dot_product_attention)
    backend: str       # "nccl" | "gloo"
    bf16_default: bool
    fusions: dict = field(default_factory=dict)  # TransformerConfig field -> bool
    # Megatron-Core's torch LayerNorm fallback cannot shard over the sequence: --sequence-parallel
    # needs TE's or Apex's norm.
    sequence_parallel: bool = False

    def check(self, model) -> None:
        """Refuse flags this path cannot run (a ``ModelConfig``), in one line."""
        from blade_mega.errors import UserError

        if model.sequence_parallel and not self.sequence_parallel:
            raise UserError(f"--sequence-parallel needs Transformer Engine or Apex's fused "
                            f"LayerNorm (Megatron-Core's torch LayerNorm cannot shard over the "
                            f"sequence), and this machine ({self.device}) has neither; install "
                            f"one, or drop the flag")

    def config_fields(self, *, add_bias_linear: bool = True, gated_linear_unit: bool = False
                      ) -> dict:
        """The fusion fields for TransformerConfig. Megatron fuses GELU only with its bias, so a
        bias-less, ungated MLP (``--disable-bias-linear`` without SwiGLU) runs it unfused."""
        fields = dict(self.fusions)
        if not add_bias_linear and not gated_linear_unit:
            fields["bias_activation_fusion"] = False
        return fields

    def describe(self, bf16: bool | None = None) -> str:
        """One line for the start of a run, e.g. ``cuda: TE spec, bf16, TE fused attention``."""
        spec = "TE spec" if self.spec == "transformer_engine" else "local spec"
        dtype = self.bf16_default if bf16 is None else bf16
        attention = {"te": "TE fused attention",
                     "sdpa": "SDPA attention (flash)" if self.device == "cuda"
                     else "SDPA attention"}[self.attention]
        fused = [name.replace("_fusion", "").replace("_", "-")
                 for name, on in self.fusions.items() if on]
        return (f"{self.device}: {spec}, {'bf16' if dtype else 'fp32'}, {attention}, "
                f"{self.backend}" + (f", fused: {' '.join(fused)}" if fused else ""))


def choose(cuda: bool, te: bool, apex: bool) -> DevicePath:
    """The table above."""
    if not cuda:
        return DevicePath("cpu", "local", "sdpa", "gloo", False,
                          {name: False for name in FUSION_FIELDS})
    use_te = te
    fusions = {
        "bias_activation_fusion": True,   # torch.jit-scripted in megatron.core.fusions
        "bias_dropout_fusion": True,
        # The local path's SDPA attention has no softmax module; TE's attention fuses its own.
        "masked_softmax_fusion": use_te,
        "apply_rope_fusion": use_te,      # Megatron's fused RoPE is TE's kernel
        "persist_layer_norm": apex and not use_te,  # Apex's FastLayerNorm (local spec)
        "gradient_accumulation_fusion": False,  # needs Megatron DDP's main_grad (DeepSpeed here)
    }
    return DevicePath("cuda", "transformer_engine" if use_te else "local",
                      "te" if use_te else "sdpa", "nccl", True, fusions,
                      sequence_parallel=te or apex)


def environment() -> tuple[bool, bool, bool]:
    """(CUDA, Transformer Engine importable, Apex's fused LayerNorm importable), as Megatron-Core
    itself found them at import."""
    import torch
    from megatron.core.fusions import fused_layer_norm
    from megatron.core.models.gpt import gpt_layer_specs

    cuda = torch.cuda.is_available()
    te = bool(getattr(gpt_layer_specs, "HAVE_TE", False))
    apex = bool(getattr(fused_layer_norm, "HAVE_PERSIST_LAYER_NORM", False))
    return cuda, te, apex


def detect() -> DevicePath:
    return choose(*environment())
