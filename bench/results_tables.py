"""Markdown tables of the run files in bench/results/ (selection quality, each with its goals;
selection overhead), and the README's results section made from them.

    python bench/results_tables.py                 # print the tables
    python bench/results_tables.py --write-readme  # rewrite README.md between the markers

One table per run file (a regime at one setting, ``--tag``), rows in the order the bench ran
them. Differences are paired over seeds: mean +/- the half-width of the 95% t interval (the
interval excludes 0 when the half-width is smaller than the mean's size). "never": a seed never
reached the level; "—": not measured (no uniform or oracle row, one seed only, ...).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
README = os.path.join(REPO, "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
REGIME_ORDER = ("scratch", "continued", "domain-shift")
NOTHING_YET = "_No run files in `bench/results/` yet._"


def _run_files(directory: str, bench: str) -> list[tuple[str, dict]]:
    """(path, result) of every run file of ``bench`` in ``directory``, by file name."""
    found = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        if result.get("bench") == bench:
            found.append((path, result))
    return found


def load_results(directory: str = RESULTS_DIR) -> list[tuple[str, dict]]:
    """(path, result) of every selection-quality run file, by regime then file name."""
    found = _run_files(directory, "selection_quality")

    def order(item):
        regime = item[1]["regime"]
        return (REGIME_ORDER.index(regime) if regime in REGIME_ORDER else len(REGIME_ORDER),
                os.path.basename(item[0]))

    return sorted(found, key=order)


def value(x, digits: int = 4, suffix: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, str):  # "never"
        return x
    return f"{x:.{digits}f}{suffix}"


def difference(interval, digits: int = 4, signed: bool = True) -> str:
    """``−0.0123 ± 0.0045`` (mean ± the 95% half-width), ``−0.0123 (1 seed)`` without one;
    ``signed``: a difference, whose sign is always shown."""
    if not interval or interval.get("mean") is None:
        return "—"
    mean = f"{interval['mean']:{'+' if signed else ''}.{digits}f}".replace("-", "−")
    if interval.get("low") is None:
        return f"{mean} ({interval['n']} seed)"
    half = (interval["high"] - interval["low"]) / 2
    return f"{mean} ± {half:.{digits}f}"


def _display_path(path: str) -> str:
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, REPO) if absolute.startswith(REPO + os.sep) else absolute


def regime_table(result: dict, path: str) -> str:
    """One run file as a heading line and a Markdown table."""
    command = result.get("command", {})
    commit = (command.get("commit") or "unknown")[:10] + (" (dirty)" if command.get("dirty")
                                                          else "")
    best = result.get("best_baseline")
    best_at_compute = result.get("best_baseline_at_uniform_compute")
    lines = [f"**{result['regime']}**, `{result['tag']}`: {len(result['seeds'])} seeds "
             f"({', '.join(map(str, result['seeds']))}), {result['train_iters']} steps, "
             f"evaluations every {result['eval_interval']}; best baseline "
             f"{best or '—'} at equal steps, {best_at_compute or '—'} at uniform's compute "
             f"(lowest selection-split loss there). `{_display_path(path)}`, commit "
             f"{commit}, {command.get('date', '?')}: `{command.get('command', '?')}`",
             "",
             "| method | test bpb | − uniform | − best baseline | bpb at uniform's compute "
             "| − uniform, same compute | − best baseline, same compute "
             "| compute to uniform's final | noise share | oracle gap closed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, method in result["methods"].items():
        mean = method["mean"]
        vs_uniform = method.get("vs_uniform", {})
        vs_best = method.get("vs_best_baseline", {})
        marks = [m for m, who in (("best baseline", best),
                                  ("best at uniform's compute", best_at_compute)) if who == name]
        label = f"{name} ({', '.join(marks)})" if marks else name
        lines.append("| " + " | ".join([
            label, value(mean["test_bpb"]),
            difference(vs_uniform.get("final")), difference(vs_best.get("final")),
            value(mean.get("test_bpb_at_uniform_compute")),
            difference(vs_uniform.get("at_uniform_compute")),
            difference(vs_best.get("at_uniform_compute")),
            value(mean.get("compute_to_uniform_final"), 2, "×"),
            value(mean["noise_share"], 3),
            difference(method.get("oracle_gap_closed"), 2, signed=False)]) + " |")
    return "\n".join(lines)


GOAL_NAMES = {
    "blade_beats_every_baseline_at_equal_compute":
        "blade beats every baseline at uniform's compute (each 95% interval below 0)",
    "blade_beats_every_baseline_at_equal_steps":
        "blade beats every baseline at equal steps (each 95% interval below 0)",
    "blade_compute_to_uniform_final_le_0.70":
        "blade reaches uniform's final test bpb with ≤ 0.70× its compute on every seed",
    "blade_noise_lt_third_of_uniform": "blade's off-target share below a third of uniform's",
    "oracle_gap_closed_ge_0.8": "blade closes ≥ 80% of the uniform → oracle gap",
}


def goals_line(result: dict) -> str:
    """The run file's goals, each met or not met, in words."""
    goals = result.get("goals") or {}
    if not goals:
        return ""
    parts = [f"{GOAL_NAMES.get(name, name)}: **{'met' if met else 'not met'}**"
             for name, met in goals.items()]
    baselines = [name for name, m in result.get("methods", {}).items()
                 if m.get("role") == "baseline"]
    return (f"Goals (the run file's `goals`; baselines run: {', '.join(baselines) or 'none'}): "
            + "; ".join(parts) + ".")


def overhead_table(result: dict, path: str) -> str:
    """A bench/selection_overhead.py run file: measured over analytic cost per case."""
    command = result.get("command", {})
    commit = (command.get("commit") or "unknown")[:10] + (" (dirty)" if command.get("dirty")
                                                          else "")
    settings = result.get("settings", {})
    shape = settings.get("model_flags") or f"--model-size {settings.get('model_size')}"
    base = result["cases"].get("uniform", {}).get("step_time")
    lines = [f"**Cost per step**, learner `{shape}`, {settings.get('steps')} steps "
             f"(uniform {value(base and base * 1000, 0)} ms/step). `{_display_path(path)}`, "
             f"commit {commit}, {command.get('date', '?')}: `{command.get('command', '?')}`",
             "",
             "| case | reference | measured | analytic | measured / analytic |",
             "|---|---|---|---|---|"]
    for name, case in result["cases"].items():
        reference = None if name == "uniform" else case.get("reference_model")
        lines.append(f"| {name} | {reference or '—'} | "
                     f"{value(case.get('measured'), 2, '×')} | "
                     f"{value(case.get('analytic'), 2, '×')} | "
                     f"{value(case.get('measured_over_analytic'), 2)} |")
    default = result.get("goal_default_path_le_1.15")
    if default is not None:
        lines += ["", "Goal (blade at its defaults, measured / analytic ≤ 1.15): "
                  f"**{'met' if default else 'not met'}**."]
    return "\n".join(lines)


def load_overheads(directory: str = RESULTS_DIR) -> list[tuple[str, dict]]:
    """(path, result) of every bench/selection_overhead.py run file, by file name."""
    return _run_files(directory, "selection_overhead")


def section(results: list[tuple[str, dict]], overheads: list[tuple[str, dict]] = ()) -> str:
    """What goes between the README's markers."""
    if not results and not overheads:
        return NOTHING_YET
    parts = []
    for path, result in results:
        parts.append(regime_table(result, path))
        line = goals_line(result)
        if line:
            parts.append(line)
    parts += [overhead_table(result, path) for path, result in overheads]
    return "\n\n".join(parts)


def replace_section(text: str, generated: str) -> str:
    """``text`` with everything between the markers replaced by ``generated``."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README lacks the markers {BEGIN} ... {END}")
    return text[:begin + len(BEGIN)] + "\n" + generated + "\n" + text[end:]


def readme_section(text: str) -> str:
    """What the README holds between the markers now."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"the README lacks the markers {BEGIN} ... {END}")
    return text[begin + len(BEGIN):end].strip("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--readme", default=README)
    p.add_argument("--write-readme", action="store_true",
                   help="rewrite the README's section between the results markers")
    args = p.parse_args(argv)
    generated = section(load_results(args.results_dir), load_overheads(args.results_dir))
    if not args.write_readme:
        print(generated)
        return 0
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    try:
        updated = replace_section(text, generated)
    except ValueError as err:
        print(f"results_tables: {args.readme}: {err}", file=sys.stderr)
        return 1
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
