"""Initial weights: each rank draws only its tensor-parallel shards, and the shards are exactly
the single-rank model's (plain GPT and a SwiGLU MLP, whose fc1 holds [gate; up] per rank)."""

import dataclasses
import pytest
import torch
import torch.nn.functional as F

from blade_mega.testing import run_distributed

VOCAB = 256


def build_and_record(tp: int, options: dict) -> dict:
    """Build the tiny GPT under TP ``tp``; return its weights, what each draw produced, and its
    logits on fixed tokens (vocab-sharded under TP)."""
    from unittest import mock

    from megatron.core import parallel_state, tensor_parallel

    from blade_mega.engine import cpu_compat
    from blade_mega.engine.model import PRESETS, build_gpt
    from blade_mega.engine.parallel import init_distributed, shutdown

    cpu_compat.install()
    init_distributed(tp, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    draws = []
    real_normal = torch.Tensor.normal_

    def recording_normal(self, *args, **kwargs):
        draws.append(self.numel())
        return real_normal(self, *args, **kwargs)

    try:
        with mock.patch.object(torch.Tensor, "normal_", recording_normal):
            # SwiGLU comes from the size (its fields build the TransformerConfig), not options.
            size = dataclasses.replace(PRESETS["tiny"], swiglu=bool(options))
            model = build_gpt(size, VOCAB, seed=7)
        sharded = {n: (p.numel(), p.dim()) for n, p in model.named_parameters()
                   if getattr(p, "tensor_model_parallel", False)}
        tokens = torch.arange(32).remainder(VOCAB).view(2, 16)
        positions = torch.arange(16).expand(2, 16)
        with torch.no_grad():
            logits = model.eval()(tokens, positions, None)
        # numpy: torch tensors would cross the process boundary as shared memory of a process
        # that is gone by then.
        return {"weights": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
                "draws": draws, "sharded": sharded, "logits": logits.numpy().copy(),
                "rank": parallel_state.get_tensor_model_parallel_rank()}
    finally:
        shutdown()


def tensors(results: list[dict]) -> list[dict]:
    for result in results:
        result["weights"] = {n: torch.from_numpy(w) for n, w in result["weights"].items()}
        result["logits"] = torch.from_numpy(result["logits"])
    return results


GATED = {"gated_linear_unit": True, "activation_func": F.silu}


@pytest.mark.parametrize("options", [{}, GATED], ids=["gelu", "swiglu"])
def test_tp2_shards_are_the_single_rank_weights_and_no_rank_draws_a_full_tensor(options):
    [single] = tensors(run_distributed(build_and_record, 1, 1, options, timeout=300))
    ranks = tensors(run_distributed(build_and_record, 2, 2, options, timeout=300))
    for rank in ranks:
        # Every value drawn is one slice of one of this rank's shards: the draws add up to the
        # shards, none is as large as a full tensor's.
        matrices = [numel for numel, dims in rank["sharded"].values() if dims > 1]
        assert sum(rank["draws"]) == sum(matrices)
        assert max(rank["draws"]) < min(matrices)
    for name, full in single["weights"].items():
        parts = [rank["weights"][name] for rank in ranks]
        if name not in ranks[0]["sharded"]:
            assert all(torch.equal(p, full) for p in parts), name  # replicated: norms, biases
            continue
        dim = 1 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0
        if options and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            gate, up = full.chunk(2, dim=0)
            expected = [torch.cat([g, u]) for g, u in zip(gate.chunk(2), up.chunk(2))]
        else:
            expected = full.chunk(2, dim=dim)
        for part, want in zip(parts, expected):
            assert torch.equal(part, want), name  # bit-identical
    # The same weights compute the same function: TP2's vocab shards are the single rank's logits.
    logits = torch.cat([rank["logits"] for rank in ranks], dim=-1)
    assert torch.allclose(logits, single["logits"], atol=1e-5)
    # Norm weights start at 1 (they were drawn like matrices before).
    assert torch.equal(single["weights"]["decoder.layers.0.input_layernorm.weight"],
                       torch.ones(64))
