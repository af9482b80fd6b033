"""The selection-quality bench's figures (bench/quality/): curve crossings and budgets, paired
95% intervals, the regime summary and its goals, checked on hand-computed values; and the
bench's own rules (protocol flags, training blends, methods this build lacks)."""

import math

import pytest

from bench import selection_quality as sq
from bench.quality import paired
from bench.quality.curves import (compute_to_reach, first_at_or_below, loss_at_compute,
                                  steps_to_reach, wall_to_reach)
from bench.quality.paired import below_zero, mean_interval, paired_difference, t_quantile_975
from bench.quality.summary import (NEVER, as_json, gap_closed, goals, method_role,
                                   off_target_share, run_figures, summarise)


# -- curves ---------------------------------------------------------------------------------------
def test_steps_to_reach_takes_the_first_evaluation_at_or_below():
    curve = [(25, 5.0), (50, 4.2), (75, 3.9), (100, 3.8)]
    assert steps_to_reach(curve, 4.0, 100) == 0.75
    assert steps_to_reach(curve, 4.2, 100) == 0.5  # at the level counts
    assert steps_to_reach(curve, 3.0, 100) == math.inf
    assert first_at_or_below([(1, None), (2, 1.0)], 1.0) == 2  # an evaluation without the figure


def test_compute_to_reach_is_a_share_of_uniforms_flops():
    curve = [(10, 5.0), (20, 4.2), (30, 3.9)]
    assert compute_to_reach(curve, 4.2, 40) == 0.5
    assert compute_to_reach(curve, 3.0, 40) == math.inf
    assert compute_to_reach([(None, 5.0)], 4.0, 40) is None  # a log without FLOPs
    assert compute_to_reach(curve, 4.2, None) is None


def test_wall_to_reach_uses_the_cumulative_seconds_at_the_crossing():
    # 1.5 s at the first evaluation, 4.5 s at the second: a reference budget spent in between
    # counts in full, not as a share of steps times a median step
    curve = [(1.5, 5.0), (4.5, 3.9)]
    assert wall_to_reach(curve, 4.0, 6.0) == 0.75
    assert wall_to_reach([(None, 3.9)], 4.0, 6.0) is None


def test_loss_at_compute_is_the_last_evaluation_within_the_budget():
    curve = [(10, 5.0), (20, 4.2), (30, 3.9)]
    assert loss_at_compute(curve, 25) == 4.2
    assert loss_at_compute(curve, 30) == 3.9  # exactly at the budget
    assert loss_at_compute(curve, 5) is None
    assert loss_at_compute([(None, 4.0)], 25) is None


# -- paired intervals -----------------------------------------------------------------------------
def test_paired_difference_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, half-width t(0.975; 2) / sqrt(3) = 4.302653 / 1.732051
    out = paired_difference([1, 2, 3], [0, 0, 0])
    assert (out["mean"], out["n"]) == (2.0, 3)
    assert out["low"] == pytest.approx(2 - 2.484138, abs=1e-6)
    assert out["high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    assert not below_zero(out)


def test_paired_difference_wholly_below_zero():
    # d = -0.1, -0.2, -0.1, -0.3: mean -0.175, sd 0.095743, t(3) 3.182446 -> half 0.152348
    out = paired_difference([3.0, 3.1, 2.9, 3.2], [3.1, 3.3, 3.0, 3.5])
    assert out["mean"] == pytest.approx(-0.175)
    assert out["high"] == pytest.approx(-0.175 + 0.152348, abs=1e-6)
    assert out["low"] == pytest.approx(-0.175 - 0.152348, abs=1e-6)
    assert below_zero(out)


def test_seeds_without_a_figure_are_left_out_and_counted():
    out = paired_difference([1.0, None, 3.0, math.inf], [0.0, 0.0, 0.0, 0.0])
    assert (out["mean"], out["n"]) == (2.0, 2)
    assert out["high"] - out["mean"] == pytest.approx(12.706205 * math.sqrt(2) / math.sqrt(2),
                                                      abs=1e-6)
    assert mean_interval([4.0]) == {"mean": 4.0, "low": None, "high": None, "n": 1}
    assert mean_interval([None])["mean"] is None
    assert not below_zero(mean_interval([-1.0]))
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0], [1.0, 2.0])


def test_t_quantiles(monkeypatch):
    assert t_quantile_975(1) == pytest.approx(12.706205, abs=1e-6)
    assert t_quantile_975(4) == pytest.approx(2.776445, abs=1e-6)  # 5 seeds
    assert t_quantile_975(30) == pytest.approx(2.042272, abs=1e-6)
    with pytest.raises(ValueError):
        t_quantile_975(0)
    monkeypatch.setitem(__import__("sys").modules, "scipy", None)  # as without scipy
    with pytest.raises(ValueError, match="install scipy"):
        t_quantile_975(31)
    assert paired.T_975[4 - 1] == t_quantile_975(4)


# -- one run's figures, roles ---------------------------------------------------------------------
def test_run_figures_and_the_off_target_share():
    records = [
        {"kind": "train", "iteration": 10, "trained_share": {"clean": 0.4, "spam": 0.6}},
        # a blend with V: 0.2 of the trained samples are in no label, and on target
        {"kind": "train", "iteration": 20, "trained_share": {"clean": 0.5, "spam": 0.3}},
        {"kind": "eval", "iteration": 10, "flops": 5.0, "wall_s": 1.0, "test_bpb": 2.5,
         "test_loss": 5.5, "target_loss": 5.4},
        {"kind": "eval", "iteration": 20, "flops": 10.0, "wall_s": 2.0, "test_bpb": 2.25,
         "test_loss": 5.0, "target_loss": 4.9, "valid_loss": 4.0}]
    out = run_figures(records, "target_loss")
    assert out["noise_share"] == pytest.approx(0.45)
    assert (out["test_bpb"], out["test_loss"], out["selection_loss"]) == (2.25, 5.0, 4.9)
    assert (out["total_flops"], out["total_wall_s"]) == (10.0, 2.0)
    assert out["curve"][0] == {"iteration": 10, "flops": 5.0, "wall_s": 1.0, "test_bpb": 2.5,
                               "test_loss": 5.5, "selection_loss": 5.4}
    assert off_target_share({"target": 0.3, "off-domain": 0.5, "blob": 0.2}) == \
        pytest.approx(0.7)


def test_method_roles():
    assert method_role("oracle", None) == "oracle"
    assert method_role("blade-paper", sq.selection_of(sq.METHODS["blade-paper"])) == "blade"
    assert method_role("rho", sq.selection_of(["--selection", "rho"])) == "baseline"
    assert method_role("uniform", None) == "baseline"
    assert method_role("target-mix", sq.selection_of([])) == "baseline"


def test_gap_closed():
    assert gap_closed(2.0, 1.8, 1.7) == pytest.approx(2 / 3)
    assert gap_closed(2.0, 2.0, 2.0) is None and gap_closed(2.0, None, 1.7) is None


def test_as_json_writes_never_for_a_level_not_reached():
    assert as_json({"a": [math.inf, 1.0, math.nan], "b": (2,)}) == {"a": [NEVER, 1.0, None],
                                                                    "b": [2]}


# -- the regime summary and its goals --------------------------------------------------------------
def synthetic_run(flops, wall, bpb, selection, noise):
    curve = [{"iteration": it, "flops": f, "wall_s": w, "test_bpb": b, "test_loss": 2 * b,
              "selection_loss": selection + late}
             for it, f, w, b, late in zip((50, 100), flops, wall, bpb, (0.1, 0.0))]
    return {"curve": curve, "test_bpb": bpb[-1], "test_loss": 2 * bpb[-1],
            "selection_loss": selection, "noise_share": noise, "total_flops": flops[-1],
            "total_wall_s": wall[-1]}


def synthetic_runs():
    """Three seeds of uniform, rho, blade and the oracle (evaluations at steps 50 and 100)."""
    return {
        "uniform": [synthetic_run((50, 100), (5, 10), (2.5, 2.0 + s / 100), 3.0, 0.6)
                    for s in range(3)],
        "rho": [synthetic_run((150, 200), (15, 20), (2.1, 1.9 + s / 100), 2.9, 0.2)
                for s in range(3)],
        "blade": [synthetic_run((60, 120), (6, 12), (1.95 + s / 100, 1.8 + s / 100), 2.95, 0.15)
                  for s in range(3)],
        "oracle": [synthetic_run((50, 100), (5, 10), (2.2, 1.7 + s / 100), 2.5, 0.0)
                   for s in range(3)]}


ROLES = {"uniform": "baseline", "rho": "baseline", "blade": "blade", "oracle": "oracle"}


def test_summary_by_hand():
    summary = summarise(synthetic_runs(), ROLES, train_iters=100)
    # rho has the lowest selection loss of the baselines (the oracle's is lower: not one)
    assert summary["best_baseline"] == "rho"
    blade = summary["methods"]["blade"]
    seeds = blade["per_seed"]
    # its first evaluation (step 50, 60 FLOPs, 6 s) is already below uniform's final
    assert seeds["steps_to_uniform_final"] == [0.5] * 3
    assert seeds["compute_to_uniform_final"] == [0.6] * 3
    assert seeds["wall_to_uniform_final"] == [0.6] * 3
    # uniform's 100 FLOPs buy blade its step-50 model
    assert seeds["test_bpb_at_uniform_compute"] == pytest.approx([1.95, 1.96, 1.97])
    assert seeds["oracle_gap_closed"] == pytest.approx([2 / 3] * 3)
    assert blade["vs_uniform"]["final"]["mean"] == pytest.approx(-0.2)
    assert blade["vs_uniform"]["at_uniform_compute"]["mean"] == pytest.approx(-0.05)
    assert blade["vs_best_baseline"]["final"]["mean"] == pytest.approx(-0.1)
    assert blade["oracle_gap_closed"]["mean"] == pytest.approx(2 / 3)
    rho = summary["methods"]["rho"]["per_seed"]
    assert rho["steps_to_uniform_final"] == [1.0] * 3
    assert rho["compute_to_uniform_final"] == [2.0] * 3
    assert rho["test_bpb_at_uniform_compute"] == [None] * 3  # its first evaluation costs 150
    assert summary["methods"]["uniform"]["per_seed"]["compute_to_uniform_final"] == [1.0] * 3
    # nothing of rho's at uniform's compute, so the best baseline there is uniform, chosen on
    # its selection loss at that budget
    assert rho["selection_loss_at_uniform_compute"] == [None] * 3
    assert summary["best_baseline_at_uniform_compute"] == "uniform"
    assert blade["vs_best_baseline"]["at_uniform_compute"]["mean"] == pytest.approx(-0.05)
    assert blade["vs_best_baseline"]["at_uniform_compute"]["n"] == 3


def test_goals_by_hand():
    met, figures = goals(summarise(synthetic_runs(), ROLES, train_iters=100))
    assert met == {"blade_beats_every_baseline_at_equal_compute": True,  # rho: none there
                   "blade_beats_every_baseline_at_equal_steps": True,
                   "blade_compute_to_uniform_final_le_0.70": True,
                   "blade_noise_lt_third_of_uniform": True,  # 0.15 < 0.6 / 3
                   "oracle_gap_closed_ge_0.8": False}  # 2/3
    assert figures["blade_compute_to_uniform_final"] == [0.6] * 3
    assert set(figures["blade_minus_baseline_test_bpb_at_equal_steps"]) == {"uniform", "rho"}
    assert set(figures["blade_minus_baseline_test_bpb_at_equal_compute"]) == {"uniform"}
    assert figures["baselines_without_a_model_at_uniform_compute"] == ["rho"]
    assert goals(summarise({"uniform": synthetic_runs()["uniform"]}, ROLES, 100)) == ({}, {})


# -- the bench's rules -----------------------------------------------------------------------------
def test_the_protocol_flags_are_the_same_for_every_row():
    with pytest.raises(SystemExit):
        sq.parse_args(["--variant", "v=--selection blade --eval-interval 10"])
    with pytest.raises(SystemExit):
        sq.parse_args(["--methods", "uniform,nonesuch"])
    args = sq.parse_args(["--regime", "domain-shift", "--train-iters", "20"])
    assert args.seeds == [0, 1, 2, 3, 4]
    assert args.results.endswith("bench/results/selection_quality_domain-shift_tiny_20.json")
    # the baselines a sceptic asks for first run by default
    for method in ("random", "rho-small", "rho-proxy", "classifier", "target-mix", "oracle"):
        assert method in sq.DEFAULT_METHODS.split(",")


def test_training_data_of_the_oracle_and_the_target_mix():
    paths = {"pool": "P", "target": "V", "oracle": "O", "labels": "P.meta",
             "oracle_labels": "O.meta"}
    args = sq.parse_args(["--target-mix-share", "0.25"])
    assert sq.training_data(paths, "blade", args) == (["P"], "P.meta")
    assert sq.training_data(paths, "oracle", args) == (["O"], "O.meta")
    # the pool first: --noise-labels labels dataset 0 of the blend
    assert sq.training_data(paths, "target-mix", args) == (["0.75", "P", "0.25", "V"], "P.meta")


def test_a_method_this_build_lacks_is_skipped_with_its_reason():
    args = sq.parse_args([])
    base = ["--vocab-size", "500", "--data-path", "unused_text_document"]
    assert sq.unavailable("random", base, sq.METHODS["random"]) is None
    assert "not registered" in sq.unavailable("missing", base, ["--selection", "missing"])
    token_level = ["--selection", "classifier", "--selection-granularity", "token"]
    assert "scores whole documents" in sq.unavailable("classifier", base + token_level,
                                                      token_level)
    assert sq.unavailable("uniform", base, []) is None


def test_the_bench_end_to_end(tmp_path):
    """One seed, 10 steps, uniform and target-mix on a 1 MB pool (~35 s): the in-loop test_bpb
    at every evaluation reaches the run file, the blend trains, the oracle's data holds only
    the pool's clean documents, and the last line is the goals' JSON object."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    results = tmp_path / "result.json"
    out = subprocess.run(
        [sys.executable, "bench/selection_quality.py", "--seeds", "0", "--train-iters", "10",
         "--eval-interval", "5", "--methods", "uniform,target-mix", "--size-mb", "1",
         "--workdir", str(tmp_path / "work"), "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(last) == {"regime", "results", "goals", "figures"}
    result = json.loads(results.read_text())
    assert result["command"]["argv"][0] == "bench/selection_quality.py"
    assert len(result["command"]["commit"]) == 40
    curve = result["curves"]["uniform"]["0"]
    assert [p["iteration"] for p in curve] == [5, 10]
    assert all(p["test_bpb"] > 0 and p["wall_s"] > 0 for p in curve)
    methods = result["methods"]
    assert methods["uniform"]["per_seed"]["test_bpb"] == [curve[-1]["test_bpb"]]
    assert result["flags"]["target-mix"] == []

    def labelled_shares(method):  # per logged window: the labelled (pool) share trained on
        with open(tmp_path / "work" / f"scratch_{method}_seed0.jsonl") as f:
            return [sum(r["trained_share"].values()) for r in map(json.loads, f)
                    if r["kind"] == "train"]

    # a tenth of target-mix's samples are V's, in no label of the pool (on target)
    assert labelled_shares("uniform") == pytest.approx([1.0])  # one window of 10 steps
    assert 0.75 < labelled_shares("target-mix")[0] < 0.99
    data = tmp_path / "work" / "data"
    pool = [json.loads(line)["noise"]
            for line in (data / "pool_text_document.meta.jsonl").read_text().splitlines()]
    oracle = [json.loads(line)["noise"]
              for line in (data / "oracle_text_document.meta.jsonl").read_text().splitlines()]
    assert oracle == ["clean"] * pool.count("clean")
