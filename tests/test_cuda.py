"""The CUDA path, on a machine with NVIDIA GPUs (skipped elsewhere; bench/gpu_check.sh runs
these): the device path chosen, bf16 by default, and training runs (one GPU; TP2 with sequence
parallelism and recompute on two) whose losses match the plain run."""

import math

import pytest
import torch

from blade_mega.engine import device_path
from blade_mega.testing import pretrain_rank, run_distributed

pytestmark = pytest.mark.cuda
SEQUENCE_PARALLEL = torch.cuda.is_available() and device_path.detect().model.sequence_parallel

FAST = ["--model-size", "tiny", "--seq-length", "64", "--global-batch-size", "4",
        "--micro-batch-size", "2", "--train-iters", "4", "--lr-warmup-iters", "2",
        "--log-interval", "1", "--eval-interval", "0", "--no-progress"]


def train(demo_data, tmp_path, ranks: int, *flags: str) -> list[dict]:
    log = str(tmp_path / f"log{len(list(tmp_path.iterdir()))}.jsonl")
    argv = ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            *FAST, *flags, "--log-file", log]
    return run_distributed(pretrain_rank, ranks, argv, timeout=600)[0]


def test_cuda_path_bf16_by_default_and_cpu_layer_inert(demo_data):
    from blade_mega.engine import cpu_compat, device_path
    from blade_mega.config import parse_config

    path = device_path.detect()
    assert (path.device, path.backend, path.bf16_default) == ("cuda", "nccl", True)
    assert path.fusions["bias_dropout_fusion"] and path.fusions["bias_activation_fusion"]
    assert cpu_compat.install() is False
    base = ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", "x"]
    assert parse_config(base).model.bf16 is True
    assert parse_config([*base, "--fp32"]).model.bf16 is False


@pytest.fixture(scope="module")
def one_gpu(demo_data, tmp_path_factory) -> list[dict]:
    return train(demo_data, tmp_path_factory.mktemp("one_gpu"), 1)


def test_one_gpu_bf16_run_trains(one_gpu):
    records = one_gpu
    assert records[0]["device_path"].startswith("cuda: ") and "bf16" in records[0]["device_path"]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("flags", [
    (),
    pytest.param(("--sequence-parallel",), marks=pytest.mark.skipif(
        not SEQUENCE_PARALLEL, reason="needs Transformer Engine or Apex's LayerNorm")),
    ("--recompute-granularity", "selective"),
    ("--recompute-granularity", "full", "--recompute-method", "uniform"),
], ids=["tp2", "tp2-sp", "tp2-selective", "tp2-full"])
def test_tp2_matches_one_gpu(demo_data, tmp_path, one_gpu, flags):
    single = [r["loss"] for r in one_gpu if r["kind"] == "train"]
    tp2 = [r["loss"] for r in train(demo_data, tmp_path, 2, "--tensor-model-parallel-size", "2",
                                    *flags) if r["kind"] == "train"]
    assert tp2 == pytest.approx(single, abs=2e-2)  # bf16: a few ulps of the loss
