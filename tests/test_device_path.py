"""The device-path decision table (which layer spec, attention and fused kernels for which
machine), its wiring into the model, and the flags that follow the device (bf16 by default with
CUDA, --fp32, recompute, sequence parallelism)."""

import pytest

from blade_mega.engine import device_path, model
from blade_mega.config import parse_config
from blade_mega.engine.device_path import FUSION_FIELDS, choose
from blade_mega.errors import UserError

ON = {"bias_activation_fusion", "bias_dropout_fusion"}
TABLE = [
    # (cuda, te, apex) -> spec, attention, fusions on, line
    ((True, True, True), "transformer_engine", "te",
     ON | {"masked_softmax_fusion", "apply_rope_fusion"}, "cuda: TE spec, bf16, TE fused attention"),
    ((True, True, False), "transformer_engine", "te",
     ON | {"masked_softmax_fusion", "apply_rope_fusion"}, "cuda: TE spec, bf16, TE fused attention"),
    ((True, False, True), "local", "sdpa", ON | {"persist_layer_norm"},
     "cuda: local spec, bf16, SDPA attention (flash), nccl"),
    ((True, False, False), "local", "sdpa", ON, "cuda: local spec, bf16, SDPA attention (flash)"),
    ((False, True, True), "local", "sdpa", set(), "cpu: local spec, fp32, SDPA attention, gloo"),
    ((False, False, False), "local", "sdpa", set(), "cpu: local spec, fp32, SDPA attention, gloo"),
]


@pytest.mark.parametrize("env, spec, attention, fused, line", TABLE)
def test_device_path_table(env, spec, attention, fused, line):
    path = choose(*env)
    assert (path.spec, path.attention) == (spec, attention)
    assert {name for name, on in path.fusions.items() if on} == fused
    assert set(path.fusions) == set(FUSION_FIELDS)
    assert not path.fusions["gradient_accumulation_fusion"]  # DeepSpeed owns the gradients
    assert (path.backend, path.bf16_default) == (("nccl", True) if env[0] else ("gloo", False))
    assert path.describe().startswith(line)
    assert path.sequence_parallel == (env[0] and (env[1] or env[2]))


def test_bias_less_gelu_is_not_fused():
    path = choose(True, False, False)
    assert not path.config_fields(add_bias_linear=False)["bias_activation_fusion"]
    assert path.config_fields(add_bias_linear=False, gated_linear_unit=True)[
        "bias_activation_fusion"]


def test_this_cpu_machine_takes_the_unchanged_cpu_path():
    assert device_path.detect() == choose(False, False, False)
    spec = model.layer_spec()
    assert spec.submodules.self_attention.submodules.core_attention is \
        model.SdpaDotProductAttention


def test_cuda_paths_wire_the_spec(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(device_path, "detect", lambda: choose(True, True, False))
    sentinel = object()
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda: sentinel)
    assert model.layer_spec() is sentinel
    monkeypatch.setattr(device_path, "detect", lambda: choose(True, False, False))
    spec = model.layer_spec()
    assert spec.submodules.self_attention.submodules.core_attention is \
        model.SdpaDotProductAttention


@pytest.fixture
def base() -> list[str]:
    return ["--vocab-size", "1000", "--data-path", "x"]


def test_bf16_is_the_default_with_cuda_and_fp32_opts_out(monkeypatch, base):
    assert parse_config(base).model.bf16 is False  # CPU: fp32, as before
    monkeypatch.setattr("blade_mega.engine.cpu_compat.cuda_available", lambda: True)
    assert parse_config(base).model.bf16 is True
    assert parse_config([*base, "--fp32"]).model.bf16 is False
    with pytest.raises(UserError, match="--bf16 and --fp32 contradict"):
        parse_config([*base, "--bf16", "--fp32"])


def test_recompute_and_sequence_parallel_flags(base):
    run = parse_config([*base, "--recompute-granularity", "full"])
    # Megatron-LM's defaults
    assert (run.model.recompute_method, run.model.recompute_num_layers) == ("uniform", 1)
    options = model.speed_options(run.model)
    assert options["recompute_granularity"] == "full" and not options["sequence_parallel"]
    with pytest.raises(UserError, match="apply to --recompute-granularity full"):
        parse_config([*base, "--recompute-granularity", "selective", "--recompute-method", "block"])
    with pytest.warns(UserWarning, match="--sequence-parallel is off"):
        assert parse_config([*base, "--sequence-parallel"]).model.sequence_parallel is False
    assert parse_config([*base, "--sequence-parallel", "--tensor-model-parallel-size", "2"]
                      ).model.sequence_parallel is True


def test_sequence_parallel_is_refused_where_megatron_cannot_run_it(base):
    run = parse_config([*base, "--sequence-parallel", "--tensor-model-parallel-size", "2"])
    with pytest.raises(UserError, match="--sequence-parallel needs Transformer Engine or Apex"):
        device_path.detect().check(run.model)
    choose(True, True, False).check(run.model)  # TE: fine


def test_recompute_runs_on_cpu_and_changes_no_loss(demo_data, tmp_path):
    """Recompute replays the forward under the saved RNG states: the same losses, bit for bit."""
    from blade_mega.testing import pretrain_rank, run_distributed

    def losses(*flags):
        log = str(tmp_path / f"{len(flags)}.jsonl")
        records = run_distributed(pretrain_rank, 1, [
            "--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "2",
            "--train-iters", "3", "--log-interval", "1", "--eval-interval", "0", "--no-progress",
            "--log-file", log, *flags], timeout=600)[0]
        return [r["loss"] for r in records if r["kind"] == "train"]

    plain = losses()
    assert losses("--recompute-granularity", "full", "--recompute-num-layers", "2") == plain
    assert losses("--recompute-granularity", "selective") == plain
