"""Report on one or more pretraining runs: loss curves, selection statistics, noise kept.

Examples:
    python tools/report.py runs/demo/runs/blade runs/demo/runs/uniform --output runs/demo/report
    python tools/report.py runs/a/log.jsonl runs/b/tensorboard --names a,b --output report

Each RUN is a --save directory (its log.jsonl), a --log-file, or a --tensorboard-dir of
blade-pretrain. Writes OUTPUT/index.html (self-contained, plots embedded), summary.md,
summary.json and plots/*.png. Plots whose fields no run logged are skipped with a note.
"""

import argparse

from blade_mega.errors import run_cli
from blade_mega.report.run_report import load_runs, write_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory or log file")
    parser.add_argument("--output", required=True, help="report directory (created)")
    parser.add_argument("--names", help="comma-separated run names (default: directory names)")
    parser.add_argument("--title", default="Pretraining run report")
    args = parser.parse_args()

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    result = write_report(load_runs(args.runs, names), args.output, args.title)
    for run in result["runs"]:
        losses = "  ".join(f"{k} {v:.4f}" for k, v in run["final"].items())
        print(f"report: {run['name']}: iteration {run['iterations']}  {losses}")
    for note in result["skipped"]:
        print(f"report: {note}")
    print(f"report: wrote {args.output}/index.html and {args.output}/summary.md")
    return 0


if __name__ == "__main__":
    run_cli(main)
