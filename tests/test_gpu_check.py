"""The GPU check's own logic, on CPU: it refuses without CUDA in one line, and its stage runner
records a failed or timed-out stage and goes on, skips what no longer fits the time budget, and
keeps every stage's whole log."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench import gpu_check
from conftest import REPO


def test_without_cuda_the_check_says_so_in_one_line():
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("gpu_check: no CUDA device here")


def test_a_failed_or_timed_out_stage_is_recorded_and_the_next_one_runs(tmp_path):
    stages = gpu_check.Stages(budget_s=60, log_dir=str(tmp_path))
    log = str(tmp_path / "slow.log")
    stages.run("fails", lambda timeout: 1 / 0, timeout=10, minimum=1)
    stages.run("hangs", lambda timeout: gpu_check.run_logged(
        [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(30)"],
        log, timeout), timeout=2, minimum=1)
    stages.run("works", lambda timeout: {"value": 1}, timeout=10, minimum=1)
    results = stages.results
    assert results["fails"]["error"].startswith("ZeroDivisionError")
    assert results["hangs"]["error"] == "timed out after 2 s"
    assert gpu_check.last_line(log) == "started"  # the whole output is kept for the cause
    assert results["works"]["value"] == 1


def test_stages_beyond_the_budget_are_skipped(tmp_path):
    stages = gpu_check.Stages(budget_s=1.5, log_dir=str(tmp_path))
    stages.run("first", lambda timeout: time.sleep(1) or {"done": True}, timeout=10, minimum=0.5)
    later = stages.run("later", lambda timeout: {"done": True}, timeout=10, minimum=1)
    assert stages.results["first"]["done"] and "skipped" in later
