"""The run report: log reading (JSON lines, TensorBoard, resumes, broken lines) and the pages."""

import base64
import json
import os
import re
import shutil
import subprocess

import pytest

from blade_mega.errors import UserError
from blade_mega.train.metrics import MetricsLog
from blade_mega.report.run_report import (load_run, load_runs, mean_over_steps, read_jsonl, series,
                               summarize, sync_iterations, write_report)
from conftest import assert_user_error, run_tool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def blade_records(steps_per_window=5, windows=4):
    """A blade-like log: train windows with selection stats, a sync every 10 steps, two evals."""
    records, syncs = [], 0
    for w in range(1, windows + 1):
        iteration = w * steps_per_window
        before = syncs
        syncs = (iteration - 1) // 10 + 1  # syncs at steps 0, 10, 20, ...
        records.append({
            "kind": "train", "iteration": iteration, "loss": 7.0 - 0.1 * w,
            "hook_time_share": 0.5, "tokens_per_s": 1000.0,
            "block_crcs": list(range(steps_per_window)), "selecting": 1.0,
            "kept_fraction": 0.5, "excess_kept": 0.3, "excess_dropped": -0.1,
            "excess_quantiles": {"p10": -0.2, "p25": -0.1, "p50": 0.0, "p75": 0.2, "p90": 0.4},
            "ref_divergence": 0.01 * w, "ref_syncs": float(syncs),
            "ref_synced": (syncs - before) / steps_per_window,
            "noise_kept_rate": {"clean": 0.8, "spam": 0.1},
            "trained_share": {"clean": 0.9, "spam": 0.1}})
        if w % 2 == 0:
            records.append({"kind": "eval", "iteration": iteration, "valid_loss": 6.5 - 0.01 * w,
                            "target_loss": 6.6 - 0.01 * w, "test_loss": 6.7 - 0.01 * w,
                            "flops": 1e12 * iteration})
    records.append({"kind": "checkpoint", "iteration": windows * steps_per_window, "path": "x"})
    return records


def write_log(directory, records, extra_lines=()):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "log.jsonl")
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_broken_line_is_one_user_error_naming_file_and_line(tmp_path):
    path = write_log(str(tmp_path / "run"), blade_records()[:2], ['{"kind": "train", "iter'])
    with pytest.raises(UserError, match=re.escape(f"{path}:3: invalid JSON")):
        read_jsonl(path)
    result = run_tool("report", str(tmp_path / "run"), "--output", str(tmp_path / "out"))
    assert_user_error(result, f"{path}:3")


def test_non_object_line_and_missing_run_are_user_errors(tmp_path):
    path = write_log(str(tmp_path / "run"), [], ["[1, 2]"])
    with pytest.raises(UserError, match=re.escape(f"{path}:1: expected a JSON object")):
        read_jsonl(path)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="no log.jsonl and no TensorBoard event files"):
        load_run(str(tmp_path / "empty"))
    result = run_tool("report", str(tmp_path / "run"), str(tmp_path / "run"), "--names", "a",
                      "--output", str(tmp_path / "out"))
    assert_user_error(result, "--names has 1 names for 2 runs")


def test_resume_replaces_the_iterations_logged_after_the_checkpoint(tmp_path):
    first = [{"kind": "train", "iteration": i, "loss": 9.0} for i in (1, 2, 3)]
    first.append({"kind": "eval", "iteration": 3, "valid_loss": 9.0})
    resumed = [{"kind": "resume", "iteration": 2, "path": "ckpt"},
               {"kind": "train", "iteration": 3, "loss": 1.0},
               {"kind": "eval", "iteration": 3, "valid_loss": 1.0}]
    run = load_run(write_log(str(tmp_path / "run"), first + resumed))
    assert series(run.train, "loss")[0].tolist() == [1, 2, 3]
    assert series(run.train, "loss")[1].tolist() == [9.0, 9.0, 1.0]
    assert [r["valid_loss"] for r in run.evals] == [1.0]
    assert [r["kind"] for r in run.events] == ["resume"]


def test_non_finite_values_logged_as_strings_are_read_as_floats(tmp_path):
    records = [{"kind": "train", "iteration": 1, "loss": "nan"},
               {"kind": "train", "iteration": 2, "loss": 3.0, "excess_kept": "inf"}]
    run = load_run(write_log(str(tmp_path / "run"), records))
    x, y = series(run.train, "loss")
    assert x.tolist() == [1, 2] and y[0] != y[0] and y[1] == 3.0
    assert series(run.train, "excess_kept")[1].tolist() == [float("inf")]
    assert mean_over_steps(run.train, "loss") == 3.0  # non-finite windows are left out


def test_sync_iterations_from_ref_synced_and_from_the_averaged_count():
    records = [r for r in blade_records(steps_per_window=5, windows=6) if r["kind"] == "train"]
    # Syncs at steps 0, 10, 20 fall in the windows ending at iterations 5, 15 and 25.
    assert sync_iterations(records) == [5, 15, 25]
    without_field = [{k: v for k, v in r.items() if k != "ref_synced"} for r in records]
    assert sync_iterations(without_field) == [5, 15, 25]
    # A sync on a window's last step averages to a fraction; it still counts once, there.
    averaged = [{"iteration": 4, "ref_syncs": 1.0}, {"iteration": 8, "ref_syncs": 1.25},
                {"iteration": 12, "ref_syncs": 2.0}]
    assert sync_iterations(averaged) == [4, 8]
    # Two syncs in one window (log interval > sync interval) count twice with ref_synced.
    two = [{"iteration": 10, "ref_synced": 0.2, "ref_syncs": 1.5, "block_crcs": [0] * 10}]
    assert sync_iterations(two) == [10, 10]


def test_selection_means_weight_windows_by_their_selecting_steps():
    records = [
        {"iteration": 4, "block_crcs": [0] * 4, "selecting": 0.25, "kept_fraction": 0.2,
         "hook_time_share": 0.1},
        {"iteration": 8, "block_crcs": [0] * 4, "selecting": 1.0, "kept_fraction": 0.7,
         "hook_time_share": 0.4},
    ]
    assert mean_over_steps(records, "kept_fraction") == pytest.approx((0.2 * 1 + 0.7 * 4) / 5)
    assert mean_over_steps(records, "hook_time_share") == pytest.approx(0.25)  # every step
    assert mean_over_steps(records, "ref_divergence") is None


def test_report_holds_the_runs_numbers_and_embeds_every_plot(tmp_path):
    blade = write_log(str(tmp_path / "blade"), blade_records())
    uniform = write_log(str(tmp_path / "uniform"), [
        {"kind": "train", "iteration": 10, "loss": 7.5, "hook_time_share": 0.01},
        {"kind": "eval", "iteration": 10, "valid_loss": 7.25, "target_loss": 7.125}])
    out = str(tmp_path / "report")
    result = run_tool("report", os.path.dirname(blade), os.path.dirname(uniform),
                      "--output", out)
    assert result.returncode == 0, result.stderr

    md = open(os.path.join(out, "summary.md")).read()
    loss_table = md.split("| run | iterations")[1].split("\n\n")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in loss_table.splitlines()[2:]}
    # iterations, train, valid, target, test loss of the last train/eval records
    assert rows["blade"][:5] == ["20", "6.6000", "6.4600", "6.5600", "6.6600"]
    assert rows["uniform"][:5] == ["10", "7.5000", "7.2500", "7.1250", "–"]
    assert "| blade | 80.0% | 10.0% | 10.0% |" in md  # clean kept, spam kept, noise share
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["runs"][0]["ref_syncs"] == 2
    assert summary["runs"][1]["final"] == {"valid_loss": 7.25, "target_loss": 7.125}

    page = open(os.path.join(out, "index.html")).read()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(summary["plots"]) == 12
    assert {"test_loss_vs_compute", "excess_distribution"} <= set(summary["plots"])
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for data in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
    for slug in summary["plots"]:
        assert open(os.path.join(out, "plots", slug + ".png"), "rb").read(8) == PNG_MAGIC
        assert f"plots/{slug}.png" in md


def test_missing_fields_skip_their_plots_with_a_note(tmp_path):
    run_dir = str(tmp_path / "plain")
    write_log(run_dir, [{"kind": "train", "iteration": i, "loss": 5.0 / i} for i in (1, 2)])
    out = str(tmp_path / "report")
    result = write_report(load_runs([run_dir]), out)
    assert result["plots"] == ["train_loss"]
    notes = "\n".join(result["skipped"])
    assert "--target-data-path" in notes and "--test-data-path" in notes
    assert "ref_divergence" in notes and "--noise-labels" in notes
    page = open(os.path.join(out, "index.html")).read()
    assert "Skipped plots" in page and "ref_divergence" in page
    assert summarize(load_run(run_dir))["final"] == {}


def test_tensorboard_events_are_read_like_the_json_log(tmp_path):
    tb_dir = str(tmp_path / "tb")
    log = MetricsLog(str(tmp_path / "log.jsonl"), tb_dir, enabled=True, echo=False)
    for record in blade_records():
        log.write(record)
    log.close()
    from_tb = load_run(tb_dir, "tb")
    from_json = load_run(str(tmp_path / "log.jsonl"))
    for key in ("loss", "kept_fraction", "ref_divergence"):
        assert series(from_tb.train, key)[0].tolist() == series(from_json.train, key)[0].tolist()
        assert series(from_tb.train, key)[1] == pytest.approx(series(from_json.train, key)[1])
    assert summarize(from_tb)["final"] == pytest.approx(summarize(from_json)["final"])


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed "
                    "(apt-get install -y chromium) to render the page headless")
def test_page_renders_in_a_headless_browser(tmp_path):
    """The page opens in a real browser offline and draws something (screenshot non-empty)."""
    write_log(str(tmp_path / "blade"), blade_records())
    out = str(tmp_path / "report")
    write_report(load_runs([str(tmp_path / "blade")]), out)
    shot = str(tmp_path / "shot.png")
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1600", f"--screenshot={shot}",
                    "file://" + os.path.abspath(os.path.join(out, "index.html"))],
                   capture_output=True, timeout=60, check=True)
    with open(shot, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # a blank page is ~5 KB
