"""A selection method written in this file alone and registered in one line runs wherever a
built-in one does: it plans (``--dry-run``), trains, checkpoints and resumes on 2 gloo ranks.
The method is the one docs/architecture.md's *How to add a method* walks through."""

from __future__ import annotations

import json
import os

import numpy as np

from blade_mega.selection.base import SelectionHook, StepStats
from blade_mega.selection.registry import MethodSpec, register
from blade_mega.testing import pretrain_rank, run_distributed
from conftest import run_main


class EveryOtherSelector(SelectionHook):
    """Reads a block of twice the batch and keeps every other candidate; counts its rounds."""
    keeps_sidecar = True  # its rounds go into the sidecar, like any scoring selector's

    def __init__(self, ctx):
        super().__init__(ctx)
        self.block = self.candidate_block()  # the spec's rule below
        self.rounds = 0

    def block_size(self, step: int) -> int:
        return self.block

    def select(self, step: int, block_ids: np.ndarray):
        self.rounds += 1
        scores = -np.arange(len(block_ids), dtype=np.float64)  # earlier is better
        return self.train_on_kept(block_ids, np.arange(0, len(block_ids), 2), scores)

    def after_step(self, step: int, batch, lr: float) -> StepStats:
        return StepStats(dict(batch.stats, rounds=float(self.rounds)))

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = state["rounds"]


register(MethodSpec("every-other", EveryOtherSelector,
                    candidates=lambda config: 2 * config.data.global_batch_size))

WORLD = 2
FLAGS = ["--selection", "every-other", "--model-size", "tiny", "--seq-length", "32",
         "--global-batch-size", "4", "--micro-batch-size", "1", "--train-iters", "4",
         "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0",
         "--no-progress", "--tensor-model-parallel-size", "2", "--reweight-mix", "0"]


def _toy_rank(argv: list[str]) -> list[dict]:
    """One rank of a run (defined here, so that each spawned rank imports this file and with
    it the registration above, as a user's launcher script would)."""
    return pretrain_rank(argv)


def test_a_method_registered_in_one_line_plans(demo_data, capsys):
    code, out, err = run_main(["--tokenizer-model", demo_data.tokenizer_model, "--data-path",
                               demo_data.pool_prefix, *FLAGS, "--dry-run", "--world-size",
                               str(WORLD)], capsys)
    assert code == 0, err
    plan = json.loads(out.splitlines()[-1])
    assert plan["config"]["method"] == "every-other"
    assert set(plan["parameters_per_rank"]) == {"learner"}
    assert plan["layout"] == {"tp": 2, "pp": 1, "dp": 1}


def test_a_method_registered_in_one_line_trains_checkpoints_and_resumes(demo_data, tmp_path):
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "log.jsonl")
    argv = ["--tokenizer-model", demo_data.tokenizer_model, "--data-path",
            demo_data.pool_prefix, *FLAGS, "--save", save, "--log-file", log]
    run_distributed(_toy_rank, WORLD, argv + ["--exit-interval", "2"], timeout=600)
    records = run_distributed(_toy_rank, WORLD, argv + ["--load", save], timeout=600)[0]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert [r["kind"] for r in records].count("resume") == 1
    # Its state came back with the checkpoint: the rounds go on counting after the resume.
    assert [r["rounds"] for r in train] == [1.0, 2.0, 3.0, 4.0]
    # It read blocks of twice the batch and trained on half of each.
    assert all(r["kept_fraction"] == 0.5 and r["consumed"] == 8 * r["iteration"]
               for r in train)
    final = os.path.join(save, "iter_0000004")
    assert any(name.endswith(".blade_sidecar.npy") for name in os.listdir(final))
