"""The engine on real gloo ranks: every TP/PP/DP layout and ZeRO stage trains the same model
(losses equal to one rank's), a run stopped and resumed is the straight run, and bad input
ends every rank with one clear error instead of a hang."""

import math
import os
import subprocess
import sys

import pytest

from blade_mega.testing import free_port, pretrain_rank, run_distributed
from conftest import LLAMA_LAYOUTS, LLAMA_TRAIN, assert_user_error

STEPS = 4
# The global batch of 4 is what every layout below shares, so its losses must match one rank's.
FAST = ["--model-size", "tiny", "--seq-length", "64", "--global-batch-size", "4",
        "--train-iters", str(STEPS), "--lr-warmup-iters", "2", "--log-interval", "1",
        "--eval-interval", "0", "--no-progress"]
SINGLE = (1, ("--micro-batch-size", "2"))
LAYOUTS = {
    # name: (ranks, flags); ZeRO-1 is the default stage.
    "tp2": (2, ("--tensor-model-parallel-size", "2", "--micro-batch-size", "2")),
    "pp2": (2, ("--pipeline-model-parallel-size", "2", "--micro-batch-size", "2")),
    "dp2": (2, ("--micro-batch-size", "2")),
    "tp2pp2": (4, ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                   "--micro-batch-size", "2")),
    # ZeRO-2 takes one micro-batch per step per rank.
    "dp2-zero2": (2, ("--micro-batch-size", "2", "--zero-stage", "2")),
    "pp2-zero2": (2, ("--pipeline-model-parallel-size", "2", "--micro-batch-size", "4",
                      "--zero-stage", "2")),
}
SUBPROCESS_TIMEOUT = 300


def data_flags(demo_data) -> list[str]:
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix]


@pytest.fixture(scope="module")
def train(demo_data, tmp_path_factory):
    """``train(ranks, flags)`` -> rank 0's train records; each distinct run happens once."""
    root = tmp_path_factory.mktemp("engine_runs")
    done = {}

    def run(ranks: int, flags: tuple) -> list[dict]:
        if (ranks, flags) not in done:
            log = str(root / f"run{len(done)}.jsonl")
            argv = [*data_flags(demo_data), *FAST, *flags, "--log-file", log]
            records = run_distributed(pretrain_rank, ranks, argv, timeout=600)[0]
            done[ranks, flags] = [r for r in records if r["kind"] == "train"]
        return done[ranks, flags]

    return run


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_trains_with_finite_decreasing_loss(train, layout):
    records = train(*LAYOUTS[layout])
    assert [r["iteration"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x) for x in losses(records))
    assert losses(records)[-1] < losses(records)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_losses_equal_the_single_rank_run(train, layout):
    single = losses(train(*SINGLE))
    assert losses(train(*LAYOUTS[layout])) == pytest.approx(single, abs=1e-4)
    # Same samples in the same order, whatever the layout.
    assert [r["block_crcs"] for r in train(*LAYOUTS[layout])] == \
        [r["block_crcs"] for r in train(*SINGLE)]


@pytest.fixture(scope="module")
def llama_single(demo_data, tmp_path_factory) -> list[dict]:
    log = str(tmp_path_factory.mktemp("llama_single") / "log.jsonl")
    argv = [*data_flags(demo_data), *LLAMA_TRAIN, "--log-interval", "1", "--log-file", log]
    return [r for r in run_distributed(pretrain_rank, 1, argv, timeout=300)[0]
            if r["kind"] == "train"]


@pytest.mark.parametrize("layout", LLAMA_LAYOUTS)
def test_llama_layout_losses_equal_the_single_rank_run(llama_checkpoints, llama_single, layout):
    """The Llama-style preset (RMSNorm, SwiGLU, no biases, 2 key/value groups of 2 query
    heads): TP splits the groups and each SwiGLU [gate; up] pair, PP the layers (the runs are
    conftest's llama_checkpoints, saved for the export and evaluation tests)."""
    records = llama_checkpoints[layout].train
    assert [r["iteration"] for r in records] == [1, 2]
    assert losses(records)[-1] < losses(records)[0]
    assert losses(records) == pytest.approx(losses(llama_single), abs=1e-4)
    assert [r["block_crcs"] for r in records] == [r["block_crcs"] for r in llama_single]


@pytest.fixture(scope="module")
def dp2_checkpoint(train, tmp_path_factory) -> str:
    """A DP2 (TP1, PP1) run stopped and saved at half way."""
    save = str(tmp_path_factory.mktemp("dp2_checkpoint"))
    ranks, flags = LAYOUTS["dp2"]
    train(ranks, (*flags, "--exit-interval", str(STEPS // 2), "--save", save))
    return save


def test_resume_continues_exactly_like_a_straight_run(train, dp2_checkpoint):
    ranks, flags = LAYOUTS["dp2"]
    straight = train(ranks, flags)
    first = train(ranks, (*flags, "--exit-interval", str(STEPS // 2), "--save", dp2_checkpoint))
    resumed = train(ranks, (*flags, "--load", dp2_checkpoint))
    assert [r["iteration"] for r in first + resumed] == list(range(1, STEPS + 1))
    assert losses(first + resumed) == pytest.approx(losses(straight), abs=1e-6, rel=0)
    assert [r["block_crcs"] for r in first + resumed] == [r["block_crcs"] for r in straight]


# -- bad input: real processes, each ends with one `error:` line -------------------------------

def pretrain_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "blade_mega.pretrain", *args]


def torchrun_command(ranks: int, *args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "blade_mega.pretrain", *args]


def bad_input_cases(demo_data, checkpoint: str, missing_prefix: str) -> dict:
    base = [*data_flags(demo_data), *FAST]
    return {
        "world_not_divisible": (pretrain_command(*base, "--tensor-model-parallel-size", "2"),
                                ["world size 1 is not divisible by tensor-model-parallel-size 2"]),
        "batch_not_divisible": (pretrain_command(*base, "--global-batch-size", "6",
                                                 "--micro-batch-size", "4"),
                                ["--global-batch-size 6 is not divisible", "use a multiple of 4"]),
        "seq_above_positions": (pretrain_command(*base, "--seq-length", "512"),
                                ["--seq-length 512 is above", "--max-position-embeddings 256"]),
        "missing_data_prefix": (pretrain_command(*FAST, "--tokenizer-model",
                                                 demo_data.tokenizer_model,
                                                 "--data-path", missing_prefix),
                                [f"{missing_prefix}.idx: no such file"]),
        "zero2_several_microbatches": (pretrain_command(*base, "--micro-batch-size", "2",
                                                        "--zero-stage", "2"),
                                       ["ZeRO stage 2 needs one micro-batch", "runs 2"]),
        # Raised on both ranks after the process group is up: both must exit, neither may wait
        # in a collective for the other.
        "checkpoint_of_another_layout": (
            torchrun_command(2, *base, "--micro-batch-size", "2",
                             "--tensor-model-parallel-size", "2", "--load", checkpoint),
            ["saved with tensor-model-parallel-size 1 and pipeline-model-parallel-size 1",
             "this run uses 2 and 1"]),
    }


@pytest.fixture(scope="module")
def bad_runs(demo_data, dp2_checkpoint, tmp_path_factory) -> dict:
    """Every bad-input case started at once (they are independent), then waited for."""
    missing = str(tmp_path_factory.mktemp("missing") / "nothing_text_document")
    cases = bad_input_cases(demo_data, dp2_checkpoint, missing)
    # No MASTER_PORT: concurrent single-process runs must each find a free one themselves.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (command, _) in cases.items()}
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)  # a hang fails here
            results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                             cases[name][1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


SINGLE_PROCESS_CASES = ["world_not_divisible", "batch_not_divisible", "seq_above_positions",
                        "missing_data_prefix", "zero2_several_microbatches"]


@pytest.mark.parametrize("case", SINGLE_PROCESS_CASES)
def test_bad_input_is_one_error_line(bad_runs, case):
    result, fragments = bad_runs[case]
    assert_user_error(result, *fragments)


def test_error_on_every_rank_ends_a_torchrun_job_with_one_line(bad_runs):
    result, fragments = bad_runs["checkpoint_of_another_layout"]
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]  # both ranks raised it; the lowest prints
    for fragment in fragments:
        assert fragment in errors[0]
