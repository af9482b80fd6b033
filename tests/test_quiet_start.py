"""A plain start is quiet and honest: library warnings that do not concern the run are filtered
(``BLADE_DEBUG=1`` shows them), the device path is named in one line, and non-finite steps of
the reference are dropped, counted and logged like the learner's."""

import os
import subprocess
import sys

from blade_mega.testing import pretrain_rank, run_distributed


def start(env_extra: dict, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "BLADE_DEBUG")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "blade_mega.pretrain", "--vocab-size", "1000",
                           "--data-path", "/nonexistent/pool", "--dry-run", *flags],
                          env=env, capture_output=True, text=True, timeout=300)


def test_library_warnings_are_filtered_unless_blade_debug():
    quiet = start({})
    assert quiet.returncode == 0, quiet.stderr
    assert "Warning" not in quiet.stderr and "WARNING" not in quiet.stderr, quiet.stderr
    assert "device path here: cpu: local spec, fp32, SDPA attention, gloo" in quiet.stdout
    loud = start({"BLADE_DEBUG": "1"})
    assert loud.returncode == 0
    assert "Apex is not installed" in loud.stderr  # Megatron-Core's import-time warnings


def test_nonfinite_reference_steps_are_dropped_counted_and_logged(demo_data, tmp_path):
    # lambda 1e39 overflows the weights of the learner's batch in the reference objective, so
    # every sync after the first (which has no learner batch yet) trains on an infinite loss;
    # the learner itself is untouched.
    log = str(tmp_path / "log.jsonl")
    records = run_distributed(pretrain_rank, 1, [
        "--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
        "--target-data-path", demo_data.target_prefix, "--selection", "blade",
        "--model-size", "tiny", "--seq-length", "32", "--global-batch-size", "4",
        "--micro-batch-size", "2", "--train-iters", "4", "--blade-sync-interval", "2",
        "--blade-ref-steps", "1", "--blade-lambda", "1e39", "--log-interval", "1",
        "--eval-interval", "0", "--no-progress", "--log-file", log], timeout=600)[0]
    start_record = records[0]
    assert start_record["kind"] == "start" and start_record["device_path"].startswith("cpu: ")
    dropped = [r for r in records if r["kind"] == "bad_step"]
    assert dropped == [{"kind": "bad_step", "model": "reference", "iteration": 2, "count": 1}]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]  # the learner trained every step
    assert [r["ref_bad_steps"] for r in train] == [0.0, 0.0, 1.0, 1.0]
