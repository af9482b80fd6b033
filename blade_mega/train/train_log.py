"""The ``train`` records: what each step measured, averaged over a ``--log-interval`` window."""

from __future__ import annotations

import time
import zlib
from typing import Optional

import numpy as np
import torch

from blade_mega.engine.cpu_compat import cuda_available
from blade_mega.train.flops import FlopCounter
from blade_mega.train.metrics import MetricsLog, process_age_s


class TrainLog:
    def __init__(self, log: MetricsLog, flops: FlopCounter, *, interval: int, train_iters: int,
                 tokens_per_step: int):
        self.log = log
        self.flops = flops
        self.interval = interval
        self.train_iters = train_iters
        self.tokens_per_step = tokens_per_step
        self.window: list[dict] = []
        self.first_step = True

    def step(self, step: int, losses: tuple, started: float, hook_time: float, stats,
             block_ids: np.ndarray) -> None:
        """One good step: ``losses`` (weighted sum, weight), its start time, the time spent in
        the hook, the hook's ``StepStats`` and the block's global ids (their CRC-32 is logged,
        so two runs can be compared block by block)."""
        for model, count in stats.dropped_steps.items():  # the hook's own models' bad steps
            self.log.write({"kind": "bad_step", "model": model, "iteration": step,
                            "count": count})
        entry = {"loss": losses, "time": time.perf_counter() - started, "hook_time": hook_time,
                 "stats": stats.values,
                 "ids": zlib.crc32(np.ascontiguousarray(block_ids).tobytes())}
        if self.first_step:  # time to first step: start-up (index build or cache) + one step
            entry["startup_s"] = process_age_s()
            self.first_step = False
        self.window.append(entry)

    def maybe_write(self, iteration: int, consumed: int, lr: float) -> None:
        if iteration % self.interval == 0 or iteration == self.train_iters:
            self.write(iteration, consumed, lr)

    def write(self, iteration: int, consumed: int, lr: float) -> None:
        window, self.window = self.window, []
        weighted = sum(w["loss"][0] for w in window)
        weight = sum(w["loss"][1] for w in window)
        seconds = sum(w["time"] for w in window)
        tokens = len(window) * self.tokens_per_step
        record = {"kind": "train", "iteration": iteration, "consumed": consumed,
                  "loss": weighted / max(weight, 1e-12), "lr": lr,
                  "step_time": seconds / len(window), "tokens_per_s": tokens / seconds,
                  "hook_time_share": sum(w["hook_time"] for w in window) / seconds,
                  "block_crcs": [w["ids"] for w in window]}
        startup: list[Optional[float]] = [w["startup_s"] for w in window
                                          if w.get("startup_s") is not None]
        if startup:
            record["startup_s"] = startup[0]
        record.update(merge_stats([w["stats"] for w in window]))
        if cuda_available():
            record["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record.update(self.flops.record())  # cumulative, by role
        self.log.write(record)


def merge_stats(stats: list[dict]) -> dict:
    """Average each numeric selection statistic over the log window."""
    merged: dict = {}
    for key in {k for s in stats for k in s}:
        values = [s[key] for s in stats if key in s]
        if all(isinstance(v, (int, float)) for v in values):
            merged[key] = float(np.mean(values))
        elif all(isinstance(v, dict) for v in values):
            merged[key] = merge_stats(values)
    return merged
