"""bench/results_tables.py: the Markdown tables of the selection-quality run files, checked on
a synthetic run file, and the README's results section, which must be what the script makes
of bench/results/."""

import json
import os

import pytest

from bench import results_tables as rt
from bench.quality.summary import as_json, goals, summarise
from conftest import REPO
from test_bench_quality import ROLES, synthetic_runs


def synthetic_result() -> dict:
    """A run file as the bench writes it, from the synthetic three-seed runs."""
    summary = summarise(synthetic_runs(), ROLES, train_iters=100)
    met, figures = goals(summary)
    return as_json({"bench": "selection_quality", "regime": "domain-shift", "tag": "tiny_100",
                    "seeds": [0, 1, 2], "train_iters": 100, "eval_interval": 50,
                    "command": {"command": "python bench/selection_quality.py --seeds 0 1 2",
                                "commit": "0123456789abcdef", "dirty": True,
                                "date": "2026-12-07T00:00:00+00:00"},
                    **summary, "goals": met, "figures": figures})


@pytest.fixture
def results_dir(tmp_path):
    with open(tmp_path / "selection_quality_domain-shift_tiny_100.json", "w") as f:
        json.dump(synthetic_result(), f)
    with open(tmp_path / "selection_quality_scratch_tiny_100.json", "w") as f:
        json.dump(dict(synthetic_result(), regime="scratch"), f)
    with open(tmp_path / "other_bench.json", "w") as f:  # not a selection-quality file
        json.dump({"bench": "other"}, f)
    return str(tmp_path)


def test_one_table_per_run_file_by_regime(results_dir):
    results = rt.load_results(results_dir)
    assert [r["regime"] for _, r in results] == ["scratch", "domain-shift"]
    text = rt.section(results)
    assert text.count("| method |") == 2
    assert "commit 0123456789 (dirty)" in text and "best baseline rho" in text


def test_the_rows_by_hand(results_dir):
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in rt.section(rt.load_results(results_dir)).splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    # blade: final 1.81 (mean of 1.80/1.81/1.82), -0.2 to uniform and -0.1 to rho on every
    # seed; at uniform's compute 1.96 (its step-50 model), 0.05 below uniform; rho has no
    # evaluation within that budget, so uniform is the best baseline there; compute 0.6x;
    # off-target 0.15; gap closed 2/3
    assert rows["blade"] == ("| blade | 1.8100 | −0.2000 ± 0.0000 | −0.1000 ± 0.0000 | 1.9600 "
                             "| −0.0500 ± 0.0000 | −0.0500 ± 0.0000 | 0.60× | 0.150 "
                             "| 0.67 ± 0.00 |")
    assert "uniform (best at uniform's compute)" in rows
    assert rows["rho (best baseline)"].startswith(
        "| rho (best baseline) | 1.9100 | −0.1000 ± 0.0000 | +0.0000 ± 0.0000 | — | — | — "
        "| 2.00× | 0.200 |")
    assert rows["uniform (best at uniform's compute)"].split(" | ")[7] == "1.00×"


def test_the_interval_and_never_formats():
    assert rt.difference({"mean": -0.0123, "low": -0.0168, "high": -0.0078, "n": 5}) == \
        "−0.0123 ± 0.0045"
    assert rt.difference({"mean": 0.5, "low": None, "high": None, "n": 1}, 2) == "+0.50 (1 seed)"
    assert rt.difference({"mean": None, "low": None, "high": None, "n": 0}) == "—"
    assert rt.value("never", 2, "×") == "never" and rt.value(None) == "—"


def test_write_readme_replaces_only_the_marked_section(results_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{rt.BEGIN}\nold figures\n{rt.END}\nafter\n")
    assert rt.main(["--results-dir", results_dir, "--readme", str(readme),
                    "--write-readme"]) == 0
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith(f"{rt.END}\nafter\n")
    assert "old figures" not in text
    assert rt.readme_section(text) == rt.section(rt.load_results(results_dir))
    assert rt.replace_section(text, rt.readme_section(text)) == text  # a second run: no change
    readme.write_text("no markers\n")
    assert rt.main(["--results-dir", results_dir, "--readme", str(readme),
                    "--write-readme"]) == 1


def test_the_readme_section_is_what_the_run_files_make():
    """Fails when a run file landed without `python bench/results_tables.py --write-readme`
    (or the README's section was edited by hand)."""
    results, overheads = rt.load_results(), rt.load_overheads()
    if not results and not overheads:
        pytest.skip("bench/results/ has no run files yet, so nothing generates the README's "
                    "results section")
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert rt.readme_section(f.read()) == rt.section(results, overheads), \
            "README.md's results section is stale: run python bench/results_tables.py " \
            "--write-readme"


def test_the_readme_has_the_markers_and_the_empty_section():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        section = rt.readme_section(f.read())
    if not rt.load_results() and not rt.load_overheads():
        assert section == rt.NOTHING_YET


def test_each_table_says_which_goals_were_met(results_dir):
    text = rt.section(rt.load_results(results_dir))
    # the synthetic runs: equal steps met, the oracle gap (2/3) not
    assert "blade beats every baseline at equal steps (each 95% interval below 0): **met**" in text
    assert "blade closes ≥ 80% of the uniform → oracle gap: **not met**" in text


def test_an_overhead_run_file_becomes_its_own_table(tmp_path):
    overhead = {"bench": "selection_overhead",
                "settings": {"model_size": "demo", "model_flags": "", "steps": 40},
                "cases": {"uniform": {"step_time": 0.25, "measured": 1.0, "analytic": 1.0,
                                      "measured_over_analytic": 1.0, "reference_model": None},
                          "blade-sample": {"step_time": 0.5, "measured": 2.0, "analytic": 1.7,
                                           "measured_over_analytic": 2.0 / 1.7,
                                           "reference_model": "tiny"}},
                "goal_default_path_le_1.15": False,
                "command": {"command": "python bench/selection_overhead.py", "commit": "abc"}}
    with open(tmp_path / "selection_overhead_demo.json", "w") as f:
        json.dump(overhead, f)
    [(path, result)] = rt.load_overheads(str(tmp_path))
    assert rt.load_results(str(tmp_path)) == []
    text = rt.section([], [(path, result)])
    assert "| blade-sample | tiny | 2.00× | 1.70× | 1.18 |" in text
    assert "uniform 250 ms/step" in text and "**not met**" in text
