"""``pretrain()`` called again in the same process (a notebook, a sweep driver) trains again.

The second call used to hang: the first run's process groups outlived it (Megatron-Core's
``destroy_model_parallel`` forgets a group, ``RotaryEmbedding.forward``'s lru_cache keeps the
module, ZeRO's gradient hooks keep the parameters) and with them rank 0's rendezvous store, so
the next start read the finished run's keys and waited for peers that were gone.  Each run must
now meet on fresh keys, give the same losses as the first, and leave nothing of itself behind.
"""

from __future__ import annotations

import gc
import os

from blade_mega.testing import pretrain_rank, run_distributed

FAST = ["--model-size", "tiny", "--seq-length", "64", "--global-batch-size", "8",
        "--micro-batch-size", "4", "--train-iters", "3", "--lr-warmup-iters", "1",
        "--log-interval", "1", "--eval-interval", "0", "--no-progress"]


def pretrain_again_and_again(argvs: list[list[str]]) -> list:
    """One rank: ``pretrain`` once per argv, in this one process.  Per run: rank 0's train
    records (or the UserError's message), and how many parameters/engines are still alive after."""
    import deepspeed
    import torch

    from blade_mega.errors import UserError

    runs = []
    for argv in argvs:
        try:
            records = pretrain_rank(argv)
            outcome = [r for r in records if r["kind"] == "train"]
        except UserError as err:
            outcome = f"UserError: {err}"
        gc.collect()
        alive = sum(isinstance(o, (torch.nn.Parameter, deepspeed.DeepSpeedEngine))
                    for o in gc.get_objects())
        runs.append((outcome, alive))
    return runs


def argv_for(demo_data, log: str, *extra: str) -> list[str]:
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            *FAST, "--log-file", log, *extra]


def assert_same_training(first: list[dict], again: list[dict]) -> None:
    assert len(first) == 3 and len(again) == 3
    for a, b in zip(first, again):
        assert (a["iteration"], a["consumed"], a["block_crcs"]) == \
            (b["iteration"], b["consumed"], b["block_crcs"])
        assert a["loss"] == b["loss"]  # same seed, same data, same process: bit for bit


def test_single_rank_pretrain_runs_again_in_the_same_process(demo_data, tmp_path):
    logs = [str(tmp_path / f"run{i}.jsonl") for i in range(4)]
    argvs = [argv_for(demo_data, logs[0]), argv_for(demo_data, logs[1]),
             # A run that fails after the process group is up must not spoil the next one.
             argv_for(demo_data, logs[2], "--zero-stage", "2"),
             argv_for(demo_data, logs[3])]
    runs = run_distributed(pretrain_again_and_again, 1, argvs, timeout=300)[0]
    (first, alive0), (second, alive1), (failed, alive2), (third, alive3) = runs
    assert "ZeRO stage 2 needs one micro-batch per step" in failed
    assert_same_training(first, second)
    assert_same_training(first, third)
    assert (alive0, alive1, alive2, alive3) == (0, 0, 0, 0)  # no parameter or engine outlives its run


def test_two_ranks_pretrain_runs_again_in_the_same_processes(demo_data, tmp_path):
    """The hang needed a peer: with one rank gloo has nobody to wait for."""
    argvs = [argv_for(demo_data, str(tmp_path / f"run{i}.jsonl")) for i in range(2)]
    runs = run_distributed(pretrain_again_and_again, 2, argvs, timeout=300)
    (first, alive0), (second, alive1) = runs[0]
    assert_same_training(first, second)
    assert all(alive == 0 for rank_runs in runs for _, alive in rank_runs)
    assert os.path.exists(argvs[1][argvs[1].index("--log-file") + 1])


def resume_with_threads(save_argv: list[str], resume_argv: list[str], threads: int) -> list:
    """One rank: train and save, then resume in this process with ``threads`` CPU threads;
    the warnings the resumed run raised."""
    import warnings

    import torch

    pretrain_rank(save_argv)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pretrain_rank(resume_argv)
    finally:
        torch.set_num_threads(saved)
    return [str(w.message) for w in caught if "CPU threads" in str(w.message)]


def test_resume_with_another_cpu_thread_count_warns(demo_data, tmp_path):
    """CPU kernels sum per-thread partials: a resume with another thread count is not bit-exact,
    and says so."""
    for threads, expected in ((2, 1), (1, 0)):  # ranks run with 1 thread (blade_mega.testing)
        save = str(tmp_path / f"ckpt{threads}")
        first = argv_for(demo_data, str(tmp_path / f"a{threads}.jsonl"), "--save", save,
                         "--exit-interval", "2")
        again = argv_for(demo_data, str(tmp_path / f"b{threads}.jsonl"), "--load", save)
        caught = run_distributed(resume_with_threads, 1, first, again, threads, timeout=300)[0]
        assert len(caught) == expected, caught
        if expected:
            assert "saved by ranks with 1 CPU threads, this run has 2" in caught[0]
            assert "OMP_NUM_THREADS=1" in caught[0]
