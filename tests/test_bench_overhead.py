"""bench/selection_overhead.py end to end on a tiny run: its last line and its run file."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_the_overhead_bench_reports_the_default_path_and_writes_its_run_file(tmp_path):
    results = tmp_path / "overhead.json"
    out = subprocess.run(
        [sys.executable, "bench/selection_overhead.py", "--model-size", "tiny", "--steps", "4",
         "--seq-length", "32", "--global-batch", "4", "--micro-batch", "2",
         "--sync-interval", "2", "--ref-steps", "1", "--size-mb", "0.3",
         "--cases", "uniform,blade-sample,blade-same", "--workdir", str(tmp_path / "w"),
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    cases = last["cases"]
    assert set(cases) == {"uniform", "blade-sample", "blade-same"}
    # a tiny learner: auto's reference is the same size, as --reference-model same asks
    assert cases["blade-same"]["reference_model"] == "same"
    for name in ("blade-sample", "blade-same"):
        assert cases[name]["analytic"] > 1.5 and cases[name]["step_time"] > 0
        assert cases[name]["measured_over_analytic"] == cases[name]["measured"] / cases[name]["analytic"]
    assert isinstance(last["goal_default_path_le_1.15"], bool)
    saved = json.loads(results.read_text())
    assert saved["cases"] == cases and saved["command"]["argv"][0].endswith("selection_overhead.py")
