"""``--dry-run --world-size N``: a cluster run planned from one process (no process group, no
data read), what it refuses, and its figures against the real engines on gloo ranks (whose
optimizer parameter groups are checked on the same engines: no weight decay on norms and
biases, for the learner and the reference alike)."""

import json
import math

import pytest

from blade_mega.engine import plan
from blade_mega.config import parse_config
from blade_mega.pretrain import vocab_size
from blade_mega.testing import in_rank, run_distributed, trainer_in_rank
from conftest import run_main


@pytest.fixture
def base(demo_data) -> list[str]:
    # Paths that do not exist: a dry run must not read data.
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", "/nonexistent/pool",
            "--target-data-path", "/nonexistent/target", "--selection", "blade"]


CLUSTER = ["--model-size", "1.3b", "--seq-length", "2048", "--tensor-model-parallel-size", "2",
           "--pipeline-model-parallel-size", "2", "--global-batch-size", "256",
           "--micro-batch-size", "4", "--bf16", "--dry-run", "--world-size", "64"]


def test_a_64_gpu_layout_is_planned_from_one_process(base, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # A same-size reference (auto would pick a 125m proxy pair): the case offload is for.
    code, out, err = run_main([*base, *CLUSTER, "--reference-model", "same", "--reference-offload"],
                              capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert any("64 ranks = TP 2 x PP 2 x DP 16; 4 micro-batches per step" in line for line in lines)
    figures = json.loads(lines[-1])
    assert figures["layout"] == {"tp": 2, "pp": 2, "dp": 16}
    assert figures["microbatches_per_step"] == 4
    stages = figures["parameters_per_rank"]["learner"]
    # By hand for h 2048, ffn 8192, 12 layers per stage, vocab 2000 padded to 2048, TP 2:
    layer = (3072 * 2048 + 3072) + (2048 * 1024 + 2048) + (4096 * 2048 + 4096) \
        + (2048 * 4096 + 2048) + 4 * 2048
    assert stages == [12 * layer + 1024 * 2048, 12 * layer + 2 * 2048 + 1024 * 2048]
    assert figures["parameters_per_rank"]["reference"] == stages
    learner = figures["bytes_per_rank"]["learner"]
    busiest = stages[figures["busiest_stage"]]
    assert learner["weights"] == 2 * busiest  # bf16
    assert learner["optimizer"] == 12 * math.ceil(busiest / 16)  # fp32 master + Adam, ZeRO-1
    reference = figures["bytes_per_rank"]["reference"]
    assert reference["optimizer"] == 0 and reference["optimizer_host"] == learner["optimizer"]
    acts = figures["bytes_per_rank"]["activations"]["per_microbatch"]
    assert acts["full"] < acts["selective"] < acts["none"]
    assert figures["bytes_per_rank"]["total_device"] > 2 * 2 * busiest


def test_the_default_reference_for_a_1_3b_learner_is_a_125m_proxy_pair_in_the_plan(base, capsys):
    code, out, err = run_main([*base, *CLUSTER], capsys)
    assert code == 0, err
    figures = json.loads(out.splitlines()[-1])
    params = figures["parameters_per_rank"]
    assert set(params) == {"learner", "proxy", "proxy_reference"}
    assert params["proxy"] == params["proxy_reference"]
    # 125m is ~1/12 of 1.3b per rank (embeddings included): far below the learner, not tiny.
    assert 0.03 < sum(params["proxy"]) / sum(params["learner"]) < 0.2


@pytest.mark.parametrize("flags, message", [
    (["--zero-stage", "2"], "ZeRO stage 2 needs one micro-batch per step"),
    (["--world-size", "48", "--tensor-model-parallel-size", "3",
      "--pipeline-model-parallel-size", "1", "--global-batch-size", "64"],
     "--tensor-model-parallel-size 3 does not divide --num-attention-heads 16"),
    (["--global-batch-size", "100"], "--global-batch-size 100 is not divisible by"),
    (["--pipeline-model-parallel-size", "16", "--world-size", "32"],
     "--pipeline-model-parallel-size 16 does not divide --num-layers 24"),
], ids=["zero2_microbatches", "tp_heads", "batch", "pp_layers"])
def test_a_layout_that_cannot_work_is_refused_in_one_line(base, capsys, flags, message):
    code, out, err = run_main([*base, *CLUSTER, *flags], capsys)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("error: ") and message in line, line


# -- against the real engines -------------------------------------------------------------------

def measure(argv: list[str], tp: int, pp: int) -> dict:
    """This rank's real counts after one step of every engine (Adam's moments then exist)."""
    import torch
    from megatron.core import parallel_state

    with in_rank(tp, pp):
        trainer = trainer_in_rank(argv, tp, pp)
        try:
            hook = trainer.hook
            block = trainer.sampler.block(0, 0, hook.block_size(0))
            batch = hook.select(0, block.ids)  # syncs and trains the reference (step 0 is due)
            trainer.learner.train_step(hook.microbatches(batch), batch.normaliser, 1e-3,
                                       batch.weight_fn)
            hook.after_step(0, batch, 1e-3)  # the proxy's step, if any
            engines = {"learner": trainer.learner, "reference": hook.reference.model}
            if hook.proxy is not None:
                engines = {"learner": trainer.learner, "proxy": hook.proxy,
                           "proxy_reference": hook.reference.model}
            out = {"stage": parallel_state.get_pipeline_model_parallel_rank()}
            for role, model in engines.items():
                optimizer = model.engine.optimizer
                names = {id(p): n for n, p in model.module.named_parameters()}
                groups = [(optimizer.optimizer.param_groups[i]["weight_decay"],
                           sorted(names[id(p)] for p in params))
                          for i, params in enumerate(optimizer.bit16_groups)]
                state = sum(t.numel() * t.element_size() for s in optimizer.optimizer.state.values()
                            for t in s.values() if torch.is_tensor(t) and t.numel() > 1)
                masters = sum(t.numel() * t.element_size()
                              for t in optimizer.single_partition_of_fp32_groups)
                out[role] = {"parameters": sum(p.numel() for p in model.module.parameters()),
                             "weights": sum(p.numel() * p.element_size()
                                            for p in model.module.parameters()),
                             "optimizer": state + masters, "groups": groups}
            return out
        finally:
            trainer.close()


def layout_argv(demo_data, extra) -> list[str]:
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            "--target-data-path", demo_data.target_prefix, "--selection", "blade",
            "--model-size", "tiny", "--seq-length", "32", "--global-batch-size", "4",
            "--micro-batch-size", "1", "--blade-ref-steps", "1", "--no-progress", *extra]


@pytest.mark.parametrize("tp, pp, extra", [
    (2, 1, []),
    (1, 2, ["--reference-model", "tiny"]),  # a proxy pair: proxy learner and its reference
], ids=["tp2dp2", "pp2dp2-proxy"])
def test_plan_matches_the_engines_and_norms_and_biases_do_not_decay(demo_data, tp, pp, extra):
    argv = layout_argv(demo_data, extra)
    ranks = run_distributed(measure, 4, argv, tp, pp, timeout=600)
    config = parse_config(argv + ["--tensor-model-parallel-size", str(tp),
                                  "--pipeline-model-parallel-size", str(pp)])
    figures = plan.plan(config, 4, vocab_size(config))
    assert figures["layout"]["dp"] == 2
    for rank in ranks:
        stage = rank["stage"]
        roles = [r for r in rank if r != "stage"]
        assert set(roles) == set(figures["parameters_per_rank"])
        for role in roles:
            real = rank[role]
            planned = figures["parameters_per_rank"][role][stage]
            assert real["parameters"] == planned, role
            parts = plan.model_bytes(planned, dp=2, zero_stage=1, bf16=False, offload=False)
            assert real["weights"] == parts["weights"]
            assert real["optimizer"] == pytest.approx(parts["optimizer"], rel=0.05), role
            # Megatron-LM's groups: decay on matrices only.
            [(decay, decayed), (no_decay, kept)] = real["groups"]
            assert (decay, no_decay) == (0.1, 0.0)
            assert decayed and all(n.endswith("weight") and "norm" not in n for n in decayed)
            assert kept and all(n.endswith("bias") or "layernorm" in n for n in kept)
            assert any("layernorm" in n for n in kept) and any(n.endswith("bias") for n in kept)


@pytest.mark.parametrize("flags, dtype", [([], "bf16"), (["--fp32"], "fp32")])
def test_a_dry_run_plans_the_clusters_dtype_not_this_machines(base, capsys, flags, dtype):
    # This machine has no CUDA (a run here trains fp32); the planned cluster run is bf16
    # unless --fp32 says otherwise.
    cluster = [flag for flag in CLUSTER if flag != "--bf16"]
    code, out, err = run_main([*base, *cluster, *flags], capsys)
    assert code == 0, err
    figures = json.loads(out.splitlines()[-1])
    assert figures["dtype"] == dtype and figures["config"]["bf16"] is (dtype == "bf16")
