"""A run that forgets (``--sidecar-half-life``) and does not redraw what it just trained
(``--redraw-gap``) saves both in its checkpoint and resumes exactly: the same blocks and losses
as the run that never stopped."""

from __future__ import annotations

import json
import os

from blade_mega.testing import pretrain_rank, run_distributed

FLAGS = ["--selection", "highloss", "--model-size", "tiny", "--seq-length", "32",
         "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "6",
         "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0",
         "--no-progress", "--reweight-mix", "0.5", "--sidecar-half-life", "2",
         "--redraw-gap", "2", "--save-interval", "3"]


def train_resume_and_read(whole: list[str], first: list[str], resumed: list[str],
                          checkpoint: str) -> tuple:
    """One rank: the uninterrupted run, the run stopped at step 3 and its resume; then the
    recently trained window in the stopped run's run state, read as data."""
    import torch

    runs = [pretrain_rank(argv) for argv in (whole, first, resumed)]
    state = torch.load(os.path.join(checkpoint, "run_state_rank00000.pt"), weights_only=True)
    window = [part["documents"].tolist() for part in state["recently_trained"]["datasets"]]
    return runs, window


def test_a_forgetting_run_resumes_exactly(demo_data, tmp_path):
    def argv(save, log, *extra):
        return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path",
                demo_data.pool_prefix, *FLAGS, "--save", str(tmp_path / save),
                "--log-file", str(tmp_path / f"{log}.jsonl"), *extra]

    stopped = str(tmp_path / "stopped")
    (whole, _, resumed), window = run_distributed(
        train_resume_and_read, 1, argv("whole", "whole"),
        argv("stopped", "first", "--exit-interval", "3"),
        argv("stopped", "resumed", "--load", stopped), os.path.join(stopped, "iter_0000003"),
        timeout=300)[0]

    def steps(records):
        return {r["iteration"]: (r["block_crcs"], r["loss"]) for r in records
                if r["kind"] == "train"}

    assert [r["kind"] for r in resumed].count("resume") == 1
    assert steps(resumed) == {i: steps(whole)[i] for i in (4, 5, 6)}
    assert window[0]  # the documents trained at steps 1 and 2 (0-based), kept for the gap
    [meta_name] = [n for n in os.listdir(os.path.join(stopped, "iter_0000003"))
                   if n.endswith(".blade_sidecar.json")]
    with open(os.path.join(stopped, "iter_0000003", meta_name)) as f:
        assert json.load(f)["half_life"] == 2
