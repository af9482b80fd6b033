"""The selection-quality protocol's summary of one regime, and its goals.

Input: per method, one run per seed (the same seeds, in the same order, for every method), each
``run_figures``' dict: the evaluation curve and the final figures. The test figure is
``test_bpb`` (whole test documents, every evaluation); settings and the best baseline are
chosen on ``selection_loss`` (the selection split), never on test.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from bench.quality.curves import compute_to_reach, loss_at_compute, steps_to_reach, wall_to_reach
from bench.quality.paired import below_zero, mean_interval, paired_difference

CURVE_KEYS = ("iteration", "flops", "wall_s", "test_bpb", "test_loss")
# ... and each evaluation's selection-split loss, as "selection_loss" (the key differs by regime)
FINAL_KEYS = ("test_bpb", "test_loss", "selection_loss", "noise_share", "total_flops",
              "total_wall_s")

# Noise labels that are the target distribution: the demo corpus's clean text, the
# domain-shift pool's target-domain documents. Everything else trained on is off-target.
ON_TARGET_LABELS = ("clean", "target")


def run_figures(records: list[dict], selection_key: str) -> dict:
    """One run's log records -> its curve (one point per evaluation) and final figures."""
    evals = [r for r in records if r["kind"] == "eval"]
    shares = [r["trained_share"] for r in records
              if r["kind"] == "train" and "trained_share" in r]
    last = evals[-1]
    return {"curve": [{**{key: r.get(key) for key in CURVE_KEYS},
                       "selection_loss": r.get(selection_key)} for r in evals],
            "test_bpb": last.get("test_bpb"), "test_loss": last.get("test_loss"),
            "selection_loss": last.get(selection_key),
            "noise_share": (sum(off_target_share(s) for s in shares) / len(shares)
                            if shares else None),
            "total_flops": last.get("flops"), "total_wall_s": last.get("wall_s")}


def off_target_share(trained_share: dict) -> float:
    """The share of a step's trained samples whose label is off target (noise, off-domain).
    Samples outside the labelled dataset (the target set mixed into a blend) are in no label,
    so they count as on target, as they are."""
    return sum(share for label, share in trained_share.items()
               if label not in ON_TARGET_LABELS)


def method_role(name: str, selection: Optional[str]) -> str:
    """``oracle`` (trains on the pool's target share: a bound, not a baseline), ``blade`` (any
    row whose --selection is blade) or ``baseline``."""
    if name == "oracle":
        return "oracle"
    return "blade" if selection == "blade" else "baseline"


def mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    """The plain mean over seeds: None if a seed has no figure, inf if one never got there."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _curve(run: dict, x: str, y: str = "test_bpb") -> list[tuple]:
    return [(point[x], point.get(y)) for point in run["curve"]]


def _against_uniform(run: dict, uniform: dict, train_iters: int) -> dict:
    level = uniform["test_bpb"]
    return {"steps_to_uniform_final": steps_to_reach(_curve(run, "iteration"), level,
                                                     train_iters),
            "compute_to_uniform_final": compute_to_reach(_curve(run, "flops"), level,
                                                         uniform["total_flops"]),
            "wall_to_uniform_final": wall_to_reach(_curve(run, "wall_s"), level,
                                                   uniform["total_wall_s"]),
            "test_bpb_at_uniform_compute": loss_at_compute(_curve(run, "flops"),
                                                           uniform["total_flops"]),
            "selection_loss_at_uniform_compute": loss_at_compute(
                _curve(run, "flops", "selection_loss"), uniform["total_flops"])}


def gap_closed(uniform: Optional[float], method: Optional[float], oracle: Optional[float]
               ) -> Optional[float]:
    """(uniform - method) / (uniform - oracle): 0 at uniform, 1 at the oracle."""
    if None in (uniform, method, oracle) or uniform == oracle:
        return None
    return (uniform - method) / (uniform - oracle)


def best_baseline(methods: dict, key: str = "selection_loss") -> Optional[str]:
    """The baseline with the lowest mean selection-split loss (never chosen on test): at the
    end (``selection_loss``), or at uniform's compute (``selection_loss_at_uniform_compute``),
    among the baselines with a model at that budget on every seed."""
    scored = {name: m["mean"].get(key) for name, m in methods.items()
              if m["role"] == "baseline" and m["mean"].get(key) is not None}
    return min(scored, key=scored.get) if scored else None


def _paired(methods: dict, name: str, final: Optional[str], at_compute: Optional[str]) -> dict:
    """Paired test_bpb differences: to ``final`` at equal steps, to ``at_compute`` at
    uniform's compute (either None: that side is absent)."""
    mine = methods[name]["per_seed"]
    out = {}
    if final is not None:
        out["final"] = paired_difference(mine["test_bpb"],
                                         methods[final]["per_seed"]["test_bpb"])
    if at_compute is not None:
        key = "test_bpb_at_uniform_compute"
        out["at_uniform_compute"] = paired_difference(mine[key],
                                                      methods[at_compute]["per_seed"][key])
    return out


def summarise(runs: dict, roles: dict, train_iters: int) -> dict:
    """``runs``: method -> [run_figures per seed]; ``roles``: method -> ``method_role``.
    Per method: its per-seed figures and their means; with uniform run, the crossings of
    uniform's final test_bpb and the test_bpb at uniform's compute, and the paired
    differences (mean and 95% interval over seeds) to uniform and to the best baseline at
    equal steps (final) and at equal compute (the best baseline at equal compute is chosen
    among those with a model within uniform's compute, on their selection-split loss there);
    with the oracle run too, the share of the uniform -> oracle gap each method closes."""
    uniform = runs.get("uniform")
    oracle = runs.get("oracle")
    methods = {}
    for name, seeds in runs.items():
        per_seed = {key: [run[key] for run in seeds] for key in FINAL_KEYS}
        if uniform is not None:
            crossings = [_against_uniform(run, base, train_iters)
                         for run, base in zip(seeds, uniform)]
            per_seed.update({key: [c[key] for c in crossings] for key in crossings[0]})
            if oracle is not None:
                per_seed["oracle_gap_closed"] = [
                    gap_closed(u["test_bpb"], run["test_bpb"], o["test_bpb"])
                    for run, u, o in zip(seeds, uniform, oracle)]
        methods[name] = {"role": roles[name], "per_seed": per_seed,
                         "mean": {key: mean_of(values) for key, values in per_seed.items()}}
    best = best_baseline(methods)
    best_at_compute = best_baseline(methods, "selection_loss_at_uniform_compute")
    for name, method in methods.items():
        if uniform is not None:
            method["vs_uniform"] = _paired(methods, name, "uniform", "uniform")
            if best is not None or best_at_compute is not None:
                method["vs_best_baseline"] = _paired(methods, name, best, best_at_compute)
            if oracle is not None:
                method["oracle_gap_closed"] = mean_interval(method["per_seed"]["oracle_gap_closed"])
    return {"best_baseline": best, "best_baseline_at_uniform_compute": best_at_compute,
            "methods": methods}


COMPUTE_GOAL = 0.70
GAP_GOAL = 0.8


def goals(summary: dict) -> tuple[dict, dict]:
    """(goal -> met, figures beside them) for the method named ``blade``; a goal whose methods
    were not run is absent."""
    methods = summary["methods"]
    met: dict = {}
    figures: dict = {}
    if "blade" not in methods or "uniform" not in methods:
        return met, figures
    blade = methods["blade"]["per_seed"]
    baselines = [name for name, m in methods.items() if m["role"] == "baseline"]
    # A baseline with no model within uniform's compute on any seed (a static reference's
    # budget alone exceeds it) is no rival at that budget: named, not judged.
    absent = [name for name in baselines
              if all(v is None for v in methods[name]["per_seed"]["test_bpb_at_uniform_compute"])]
    figures["baselines_without_a_model_at_uniform_compute"] = absent
    for setting, key in (("equal_compute", "test_bpb_at_uniform_compute"),
                         ("equal_steps", "test_bpb")):
        judged = [n for n in baselines if not (setting == "equal_compute" and n in absent)]
        intervals = {name: paired_difference(blade[key], methods[name]["per_seed"][key])
                     for name in judged}
        figures[f"blade_minus_baseline_test_bpb_at_{setting}"] = intervals
        met[f"blade_beats_every_baseline_at_{setting}"] = bool(intervals) and all(
            below_zero(i) for i in intervals.values())
    compute = blade["compute_to_uniform_final"]
    figures["blade_compute_to_uniform_final"] = compute
    met[f"blade_compute_to_uniform_final_le_{COMPUTE_GOAL:.2f}"] = all(
        c is not None and c <= COMPUTE_GOAL for c in compute)
    noise = {name: mean_of(methods[name]["per_seed"]["noise_share"])
             for name in ("blade", "uniform")}
    figures["noise_share"] = noise
    if None not in noise.values():
        met["blade_noise_lt_third_of_uniform"] = noise["blade"] < noise["uniform"] / 3
    if "oracle" in methods:
        gap = methods["blade"]["oracle_gap_closed"]
        figures["blade_oracle_gap_closed"] = gap
        met[f"oracle_gap_closed_ge_{GAP_GOAL:g}"] = (gap["mean"] is not None
                                                    and gap["mean"] >= GAP_GOAL)
    return met, figures


NEVER = "never"  # a level never reached (inf), as strict JSON has no infinity


def as_json(value):
    """``value`` with inf as ``NEVER`` and any other non-finite float as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return NEVER if value == math.inf else None
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value
