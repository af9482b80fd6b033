"""tools/demo.py end to end at --tiny size: data, two real torchrun pretraining runs, report."""

import json
import os
import re
import runpy

import pytest

from conftest import REPO, assert_user_error, run_tool

METHODS = ("blade", "uniform")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One --tiny demo on 1 rank per run (make demo's 2-rank data parallelism gives the same
    losses, which the pretrain tests check)."""
    workdir = str(tmp_path_factory.mktemp("demo"))
    result = run_tool("demo", "--tiny", "--nproc", "1", "--workdir", workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result.stdout


def read_log(workdir, method):
    with open(os.path.join(workdir, "runs", method, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_report_holds_each_runs_last_evaluation(tiny_demo):
    workdir, stdout = tiny_demo
    report = os.path.join(workdir, "report")
    with open(os.path.join(report, "summary.md")) as f:
        loss_table = f.read().split("| run | iterations")[1].split("\n\n")[0]
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.split("|")[1:-1]] for line in loss_table.splitlines()[2:])}
    with open(os.path.join(report, "summary.json")) as f:
        summary = {run["name"]: run for run in json.load(f)["runs"]}
    assert set(summary) == set(rows) == set(METHODS)
    for method in METHODS:
        records = read_log(workdir, method)
        last_train = [r for r in records if r["kind"] == "train"][-1]
        last_eval = [r for r in records if r["kind"] == "eval"][-1]
        assert last_eval["iteration"] == 4
        finals = {k: last_eval[k] for k in ("valid_loss", "target_loss", "test_loss")}
        assert summary[method]["final"] == finals
        assert rows[method][:5] == ["4", f"{last_train['loss']:.4f}",
                                    *[f"{v:.4f}" for v in finals.values()]]
        # The headline printed at the end carries the same target and test losses.
        assert re.search(rf"{method}\s+{finals['target_loss']:.4f}\s+{finals['test_loss']:.4f}",
                         stdout)
    assert f"Report: {report}/index.html" in stdout


def test_plots_are_written_and_embedded(tiny_demo):
    workdir, _ = tiny_demo
    report = os.path.join(workdir, "report")
    for slug in ("train_loss", "target_loss", "test_loss", "excess", "divergence",
                 "noise_kept_rate", "trained_share"):
        with open(os.path.join(report, "plots", slug + ".png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", slug
    with open(os.path.join(report, "index.html")) as f:
        page = f.read()
    with open(os.path.join(report, "summary.json")) as f:
        plots = json.load(f)["plots"]
    assert page.count('src="data:image/png;base64,') == len(plots) >= 7


def test_noise_labels_and_the_reference_reach_training(tiny_demo):
    workdir, stdout = tiny_demo
    blade_train = [r for r in read_log(workdir, "blade") if r["kind"] == "train"]
    selecting = [r for r in blade_train if r.get("selecting") == 1.0]
    assert selecting, "blade never selected: check TINY_METHOD_FLAGS' warm-up"
    assert all("clean" in r["trained_share"] and len(r["trained_share"]) > 1 for r in selecting)
    assert sum(r["ref_synced"] for r in selecting) >= 1
    for method in METHODS:
        run = os.path.join(workdir, "runs", method)
        assert os.path.isfile(os.path.join(run, "latest"))
        assert any("tfevents" in name for name in os.listdir(os.path.join(run, "tensorboard")))
        assert re.search(rf"\[{method}\] it +4/4 +loss", stdout)  # progress passed through


def test_rerun_skips_every_finished_stage(tiny_demo):
    workdir, _ = tiny_demo
    logs = [os.path.join(workdir, "runs", m, "log.jsonl") for m in METHODS]
    before = [os.path.getmtime(p) for p in logs]
    result = run_tool("demo", "--tiny", "--nproc", "1", "--workdir", workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("up to date") == 6  # corpus, tokenizer, datasets, 2 runs, report
    assert "[blade] it" not in result.stdout
    assert [os.path.getmtime(p) for p in logs] == before


def test_an_interrupted_run_is_resumed_only_with_the_same_settings(tiny_demo):
    workdir, _ = tiny_demo
    demo = runpy.run_path(os.path.join(REPO, "tools", "demo.py"))
    argv = ["--tiny", "--nproc", "1", "--workdir", workdir]
    runner = demo["Demo"](demo["parse_args"](argv))
    settings = runner.run_settings("uniform")
    # A finished run also has a start stamp and a checkpoint: killed after its save, it resumes.
    assert runner.resumable("uniform", settings)
    assert not runner.resumable("uniform", runner.run_settings("blade"))
    assert not runner.resumable("uniform", dict(settings, nproc=2))
    assert not demo["Demo"](demo["parse_args"](argv + ["--force"])).resumable("uniform", settings)
    latest = os.path.join(workdir, "runs", "uniform", "latest")
    os.rename(latest, latest + ".away")
    try:
        assert not runner.resumable("uniform", settings)
    finally:
        os.rename(latest + ".away", latest)


def test_unknown_method_is_a_user_error(tmp_path):
    result = run_tool("demo", "--methods", "blade,nope", "--workdir", str(tmp_path))
    assert_user_error(result, "--methods nope", "blade")


def test_progress_line_compacts_log_records():
    demo = runpy.run_path(os.path.join(REPO, "tools", "demo.py"))
    train = {"kind": "train", "iteration": 20, "loss": 6.54321, "kept_fraction": 0.5,
             "trained_share": {"clean": 0.75, "spam": 0.25}, "step_time": 0.5}
    line = demo["progress_line"](json.dumps(train) + "\n", "blade", 80)
    assert line == ("[blade] it    20/80  loss 6.543  kept 0.50  noise 25%  "
                    "0.50 s/step, 0.5 min left")
    evaluation = {"kind": "eval", "iteration": 20, "valid_loss": 6.0, "target_loss": 6.25}
    assert demo["progress_line"](json.dumps(evaluation), "u", 80) == \
        "[u] eval at 20: valid 6.000  target 6.250"
    assert demo["progress_line"]("[rank0]: some warning\n", "u", 80) is None
    assert demo["progress_line"]("{not json\n", "u", 80) is None
