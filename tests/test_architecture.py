"""Architecture flags (Megatron-LM's names) reach Megatron-Core's ``TransformerConfig`` and
``GPTModel``; the -llama presets set them together; bad combinations are one error line.
(Layout invariance of the Llama-style preset: tests/test_engine_distributed.py.)"""

import pytest

from blade_mega.config import parse_config
from blade_mega.errors import UserError
from blade_mega.testing import run_distributed

BASE = ["--vocab-size", "500", "--data-path", "unused_text_document"]
CASES = {
    "tiny": [],
    "rmsnorm": ["--normalization", "RMSNorm"],
    "swiglu": ["--swiglu"],
    "no_bias": ["--disable-bias-linear"],
    "gqa": ["--group-query-attention", "--num-query-groups", "2"],
    "learned_positions": ["--position-embedding-type", "learned_absolute"],
    "rotary_base": ["--rotary-base", "500000"],
    "untied": ["--untie-embeddings-and-output-weights"],
    "tiny_llama": ["--model-size", "tiny-llama"],
    "llama_with_bias": ["--model-size", "tiny-llama", "--normalization", "LayerNorm"],
}


def _built(cases: dict) -> dict:
    """One rank: build each case's GPT and describe its config and modules."""
    from megatron.core import tensor_parallel

    from blade_mega.engine import cpu_compat, parallel
    from blade_mega.engine.model import build_gpt

    parallel.init_distributed(1, 1, 1.0)
    cpu_compat.install()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    out = {}
    try:
        for name, flags in cases.items():
            model = build_gpt(parse_config(BASE + flags).model.size, 512, seed=0)
            config, params = model.config, dict(model.named_parameters())
            layer = model.decoder.layers[0]
            out[name] = {
                "normalization": config.normalization,
                "gated_linear_unit": config.gated_linear_unit,
                "activation": config.activation_func.__name__,
                "add_bias_linear": config.add_bias_linear,
                "num_query_groups": config.num_query_groups,
                "position_embedding_type": model.position_embedding_type,
                "shared_embeddings": model.share_embeddings_and_output_weights,
                "norm_module": type(layer.input_layernorm).__name__,
                "qkv_rows": params["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0],
                "fc1_rows": params["decoder.layers.0.mlp.linear_fc1.weight"].shape[0],
                "biases": sorted(n for n in params if n.startswith("decoder.layers.0.")
                                and ".linear_" in n and n.endswith(".bias")),
                "has_positions": "embedding.position_embeddings.weight" in params,
                "inv_freq": (model.rotary_pos_emb.inv_freq.tolist()
                             if model.position_embedding_type == "rope" else None),
            }
    finally:
        parallel.shutdown()
    return out


@pytest.fixture(scope="module")
def built():
    return run_distributed(_built, 1, CASES, timeout=300)[0]


def test_defaults_are_todays_gpt(built):
    tiny = built["tiny"]
    assert (tiny["normalization"], tiny["gated_linear_unit"], tiny["activation"],
            tiny["add_bias_linear"], tiny["num_query_groups"], tiny["position_embedding_type"],
            tiny["shared_embeddings"]) == ("LayerNorm", False, "gelu", True, 4, "rope", False)
    assert (tiny["qkv_rows"], tiny["fc1_rows"]) == (3 * 64, 256)
    assert tiny["norm_module"] == "LayerNorm" and len(tiny["biases"]) == 4


def test_each_flag_changes_what_it_names(built):
    assert built["rmsnorm"]["normalization"] == "RMSNorm"
    assert built["rmsnorm"]["norm_module"] == "RMSNorm"
    assert (built["swiglu"]["gated_linear_unit"], built["swiglu"]["activation"],
            built["swiglu"]["fc1_rows"]) == (True, "silu", 2 * 256)
    assert built["no_bias"]["add_bias_linear"] is False and built["no_bias"]["biases"] == []
    # 4 query heads of 16 dims sharing 2 key/value heads: q 64 + k 32 + v 32 rows
    assert (built["gqa"]["num_query_groups"], built["gqa"]["qkv_rows"]) == (2, 128)
    learned = built["learned_positions"]
    assert learned["position_embedding_type"] == "learned_absolute" and learned["has_positions"]
    assert not built["tiny"]["has_positions"]
    head_dim = 16
    for case, base in (("tiny", 10000.0), ("rotary_base", 500000.0)):
        expected = [1.0 / base ** (i / head_dim) for i in range(0, head_dim, 2)]
        assert built[case]["inv_freq"] == pytest.approx(expected, rel=1e-6)
    assert built["untied"]["shared_embeddings"] is False


def test_llama_preset_sets_them_together_and_flags_override_it(built):
    llama = built["tiny_llama"]
    assert (llama["normalization"], llama["gated_linear_unit"], llama["add_bias_linear"],
            llama["num_query_groups"], llama["position_embedding_type"]) == \
        ("RMSNorm", True, False, 2, "rope")
    assert llama["biases"] == [] and llama["fc1_rows"] == 2 * 176
    assert built["llama_with_bias"]["normalization"] == "LayerNorm"


def test_architecture_flags_from_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("swiglu: true\ndisable-bias-linear: true\nnormalization: RMSNorm\n"
                      "num-query-groups: 2\nrotary-base: 1000\n")
    size = parse_config(["--config", str(config), *BASE]).model.size
    assert (size.swiglu, size.add_bias_linear, size.normalization, size.num_query_groups,
            size.rotary_base) == (True, False, "RMSNorm", 2, 1000)


@pytest.mark.parametrize("flags, message", [
    (["--num-query-groups", "3"], "--num-query-groups 3 must divide --num-attention-heads 4"),
    (["--model-size", "tiny-llama", "--tensor-model-parallel-size", "4"],
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--rotary-base", "0"], "--rotary-base 0 must be positive"),
])
def test_bad_architecture_is_one_error(flags, message):
    with pytest.raises(UserError, match=message):
        parse_config(BASE + flags)
