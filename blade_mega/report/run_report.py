"""Run reports: read pretraining logs, plot them, write a self-contained HTML page and a summary.

A run is a ``--save`` directory (its ``log.jsonl``), a JSON-lines log file, or a directory of
TensorBoard event files (``--tensorboard-dir``; scalars only, so the per-noise-type plots need the
JSON log).  ``write_report`` writes::

    <output>/index.html     every plot embedded as a base64 PNG: one file to open or mail
    <output>/summary.md     the summary tables, with the plots linked from plots/
    <output>/summary.json   the same numbers, for scripts
    <output>/plots/*.png

A plot whose fields no run logged is skipped with a note saying which flag would produce it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from blade_mega.atomic import write_atomic
from blade_mega.errors import UserError

LOG_NAME = "log.jsonl"
# Train fields logged on every step (the rest are selection statistics, logged while selecting).
EVERY_STEP = {"loss", "step_time", "tokens_per_s", "hook_time_share"}
TB_MARKER = "tfevents"
CLEAN = "clean"


# -- reading -----------------------------------------------------------------------------------
@dataclass
class RunLog:
    name: str
    source: str                                       # the file or directory read
    train: list[dict] = field(default_factory=list)   # "train" records, one per log window
    evals: list[dict] = field(default_factory=list)   # "eval" records
    events: list[dict] = field(default_factory=list)  # checkpoint, resume, bad_step, ...


def read_jsonl(path: str) -> list[dict]:
    """Every record of a JSON-lines log; a broken line is a UserError naming ``path:line``."""
    records = []
    try:
        # errors="replace": a binary line fails as invalid JSON, with its line number.
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: invalid JSON ({err.msg}); "
                                    "fix or delete that line (a run killed mid-write leaves "
                                    "a partial last line)") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object per line; "
                                    "is this a blade-pretrain log?")
                records.append(record)
    except OSError as err:
        raise UserError(f"{path}: cannot read the log ({err.strerror})") from None
    return records


def read_tensorboard(directory: str) -> list[dict]:
    """Records rebuilt from the scalars ``<kind>/<field>`` that MetricsLog writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[tuple[str, int], dict] = {}
    for event_dir in _event_dirs(directory):
        accumulator = EventAccumulator(event_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            kind, _, key = tag.partition("/")
            if not key:
                continue
            for event in accumulator.Scalars(tag):
                record = by_step.setdefault((kind, event.step),
                                            {"kind": kind, "iteration": event.step})
                record[key] = event.value
    return [by_step[key] for key in sorted(by_step, key=lambda k: (k[1], k[0] != "train"))]


def _event_dirs(directory: str) -> list[str]:
    return sorted({root for root, _, names in os.walk(directory)
                   if any(TB_MARKER in name for name in names)})


def find_log(path: str) -> tuple[str, str]:
    """("jsonl" | "tensorboard", path) of the log a run path points at."""
    if os.path.isfile(path):
        return "jsonl", path
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such run directory or log file")
    if os.path.isfile(os.path.join(path, LOG_NAME)):
        return "jsonl", os.path.join(path, LOG_NAME)
    if _event_dirs(path):
        return "tensorboard", path
    raise UserError(f"{path}: no {LOG_NAME} and no TensorBoard event files; pass a --save "
                    "directory, a --log-file, or a --tensorboard-dir of blade-pretrain")


def load_run(path: str, name: Optional[str] = None) -> RunLog:
    kind, source = find_log(path)
    records = read_jsonl(source) if kind == "jsonl" else read_tensorboard(source)
    run = RunLog(name or default_name(path), source)
    for record in records:
        kind = record.get("kind")
        if kind == "resume":
            # The resumed run repeats the iterations logged after its checkpoint: keep the new ones.
            at = record.get("iteration", 0)
            run.train = [r for r in run.train if r.get("iteration", 0) <= at]
            run.evals = [r for r in run.evals if r.get("iteration", 0) <= at]
        if kind == "train" and "iteration" in record:
            run.train.append(record)
        elif kind == "eval" and "iteration" in record:
            run.evals.append(record)
        else:
            run.events.append(record)
    return run


def default_name(path: str) -> str:
    path = os.path.normpath(os.path.abspath(path))
    if os.path.isfile(path):
        path = os.path.dirname(path)
    return os.path.basename(path)


def load_runs(paths: list[str], names: Optional[list[str]] = None) -> list[RunLog]:
    if not paths:
        raise UserError("give at least one run directory or log file")
    if names is not None and len(names) != len(paths):
        raise UserError(f"--names has {len(names)} names for {len(paths)} runs; give one per run")
    runs = [load_run(p, names[i] if names else None) for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for run in runs:  # two runs called "log" get "log" and "log-2"
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"
    return runs


# -- values ------------------------------------------------------------------------------------
def number(value) -> Optional[float]:
    """A logged number as float; MetricsLog writes non-finite floats as "nan"/"inf" strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of the records holding ``key`` as a number."""
    points = [(r["iteration"], number(r.get(key))) for r in records]
    points = [(i, v) for i, v in points if v is not None]
    return (np.array([p[0] for p in points], dtype=np.int64),
            np.array([p[1] for p in points], dtype=np.float64))


def nested_series(records: list[dict], key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per sub-key series of a dict field such as ``noise_kept_rate``."""
    subkeys = sorted({k for r in records if isinstance(r.get(key), dict) for k in r[key]},
                     key=lambda k: (k != CLEAN, k))
    flat = {sub: [{"iteration": r["iteration"], "v": r[key].get(sub)}
                  for r in records if isinstance(r.get(key), dict)] for sub in subkeys}
    return {sub: series(rows, "v") for sub, rows in flat.items()}


def window_steps(record: dict) -> int:
    """Steps in a train record's log window (one block checksum per step)."""
    crcs = record.get("block_crcs")
    return len(crcs) if isinstance(crcs, list) and crcs else 1


def selecting_steps(record: dict) -> float:
    """Steps of the window that selected (selection statistics are means over these only)."""
    share = number(record.get("selecting"))
    return window_steps(record) * (share if share is not None else 1.0)


def mean_over_steps(records: list[dict], key: str, sub: Optional[str] = None) -> Optional[float]:
    """Step-weighted mean of a (nested) train statistic over the run; None if never logged."""
    total = weight = 0.0
    for record in records:
        value = record.get(key)
        if sub:
            value = value.get(sub) if isinstance(value, dict) else None
        value = number(value)
        if value is None or not math.isfinite(value):
            continue
        steps = window_steps(record) if key in EVERY_STEP else selecting_steps(record)
        total += value * steps
        weight += steps
    return total / weight if weight else None


def sync_iterations(records: list[dict]) -> list[int]:
    """Iterations of the log windows in which the reference was re-synchronised (w <- u).

    Uses ``ref_synced`` (1 on sync steps, averaged over the window's selecting steps) when
    logged; otherwise the rise of the window-averaged ``ref_syncs`` count, whose ceiling is the
    count at the window's end (exact while there is at most one sync per window).
    """
    marks: list[int] = []
    count_before = 0
    for record in records:
        synced = number(record.get("ref_synced"))
        if synced is not None:
            new = int(round(synced * selecting_steps(record)))
        else:
            syncs = number(record.get("ref_syncs"))
            if syncs is None or not math.isfinite(syncs):
                continue
            count_now = math.ceil(syncs - 1e-9)
            new, count_before = max(0, count_now - count_before), count_now
        marks.extend([record["iteration"]] * new)
    return marks


# -- summary -----------------------------------------------------------------------------------
EVAL_KEYS = ("valid_loss", "target_loss", "test_loss")


def summarize(run: RunLog) -> dict:
    last_train = run.train[-1] if run.train else {}
    last_eval = run.evals[-1] if run.evals else {}
    noise_types = sorted({k for r in run.train if isinstance(r.get("noise_kept_rate"), dict)
                          for k in r["noise_kept_rate"]}, key=lambda k: (k != CLEAN, k))
    shares = {t: mean_over_steps(run.train, "trained_share", t) for t in noise_types}
    summary = {
        "name": run.name,
        "source": run.source,
        "iterations": last_train.get("iteration"),
        "final_train_loss": number(last_train.get("loss")),
        "eval_iteration": last_eval.get("iteration"),
        "final": {k: number(last_eval[k]) for k in EVAL_KEYS
                  if number(last_eval.get(k)) is not None},
        "kept_fraction": mean_over_steps(run.train, "kept_fraction"),
        "hook_time_share": mean_over_steps(run.train, "hook_time_share"),
        "tokens_per_s": mean_over_steps(run.train, "tokens_per_s"),
        "ref_syncs": len(sync_iterations(run.train)) if any("ref_syncs" in r for r in run.train)
        else None,
        "noise_kept_rate": {t: mean_over_steps(run.train, "noise_kept_rate", t)
                            for t in noise_types},
        "trained_share": shares,
        "noise_trained_share": (sum(v for t, v in shares.items() if t != CLEAN and v is not None)
                                if shares else None),
    }
    return summary


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def summary_tables(summaries: list[dict]) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of the loss table and, if any run logged noise, the noise table."""
    loss_header = ["run", "iterations", "train loss", "valid loss", "target loss", "test loss",
                   "kept fraction", "hook time share", "tokens/s", "reference syncs"]
    loss_rows = [[s["name"], _fmt(s["iterations"]), _fmt(s["final_train_loss"]),
                  *[_fmt(s["final"].get(k)) for k in EVAL_KEYS],
                  _fmt(s["kept_fraction"], 3), _pct(s["hook_time_share"]),
                  _fmt(s["tokens_per_s"], 0), _fmt(s["ref_syncs"])] for s in summaries]
    tables = [(loss_header, loss_rows)]
    types = []
    for s in summaries:
        types += [t for t in s["noise_kept_rate"] if t not in types]
    types.sort(key=lambda k: (k != CLEAN, k))
    if types:
        header = ["run", *[f"{t} kept" for t in types], "noise share of trained samples"]
        rows = [[s["name"], *[_pct(s["noise_kept_rate"].get(t)) for t in types],
                 _pct(s["noise_trained_share"])] for s in summaries]
        tables.append((header, rows))
    return tables


# -- plots -------------------------------------------------------------------------------------
@dataclass
class Plot:
    slug: str
    title: str
    png: Optional[bytes]   # None: skipped
    note: str = ""         # why it was skipped
    wide: bool = False     # several panels: a full-width row in the HTML page


def _colour(index: int) -> str:
    return f"C{index % 10}"


def _figure(title: str, ylabel: str, panels: int = 1):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5 if panels == 1 else 4.2 * panels, 3.6), dpi=100,
                 layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    fig.suptitle(title)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return fig, axes


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _metric_plot(slug: str, title: str, ylabel: str, runs: list[RunLog],
                 part: Callable[[RunLog], list[dict]], keys: list[tuple[str, str]],
                 hint: str) -> Plot:
    """One line per run and key (keys: (field, line style)); skipped if no run logged them."""
    drawn = [(i, run, key, style) for i, run in enumerate(runs) for key, style in keys
             if len(series(part(run), key)[0])]
    if not drawn:
        names = " / ".join(k for k, _ in keys)
        return Plot(slug, title, None, f"no run logged {names}; {hint}")
    fig, (ax,) = _figure(title, ylabel)
    for i, run, key, style in drawn:
        x, y = series(part(run), key)
        label = run.name if len(keys) == 1 else f"{run.name}: {key}"
        ax.plot(x, y, style, color=_colour(i), label=label, marker="." if len(x) < 30 else None)
    ax.legend(fontsize="small")
    return Plot(slug, title, _png(fig))


def _compute_plot(runs: list[RunLog]) -> Plot:
    """Test loss against the cumulative analytic FLOPs of every role (blade_mega/train/flops.py):
    the per-GPU-hour view, where selection pays for its scoring and reference training."""
    title = "Test loss vs compute (analytic FLOPs, all roles)"
    drawn = []
    for i, run in enumerate(runs):
        points = [(number(r.get("flops")), number(r.get("test_loss"))) for r in run.evals]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            drawn.append((i, run, points))
    if not drawn:
        return Plot("test_loss_vs_compute", title, None, "no eval record has flops and "
                    "test_loss; pass --test-data-path and --eval-interval > 0")
    fig, (ax,) = _figure(title, "loss")
    ax.set_xlabel("FLOPs")
    from matplotlib.ticker import AutoLocator

    ax.xaxis.set_major_locator(AutoLocator())
    for i, run, points in drawn:
        x, y = zip(*points)
        ax.plot(x, y, color=_colour(i), label=run.name, marker="." if len(x) < 30 else None)
    ax.legend(fontsize="small")
    return Plot("test_loss_vs_compute", title, _png(fig))


def _score_distribution_plot(runs: list[RunLog]) -> Plot:
    """The candidates' excess-loss distribution over time (window means of per-step p10..p90):
    a static reference that goes stale shows it collapsing toward 0."""
    title = "Excess-loss distribution of the candidates (p10-p90, p25-p75, median)"
    drawn = [run for run in runs if nested_series(run.train, "excess_quantiles")]
    if not drawn:
        return Plot("excess_distribution", title, None, "no run logged excess_quantiles; only "
                    "excess-loss methods (highloss, rho, blade) do")
    fig, axes = _figure(title, "loss_u - loss_w", panels=len(drawn))
    for ax, run in zip(axes, drawn):
        q = nested_series(run.train, "excess_quantiles")
        if not all(k in q for k in ("p10", "p25", "p50", "p75", "p90")):
            continue
        x = q["p50"][0]
        ax.fill_between(x, q["p10"][1], q["p90"][1], alpha=0.2, color="C0")
        ax.fill_between(x, q["p25"][1], q["p75"][1], alpha=0.35, color="C0")
        ax.plot(x, q["p50"][1], color="C0")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(run.name, fontsize="medium")
    return Plot("excess_distribution", title, _png(fig), wide=len(drawn) > 1)


def _divergence_plot(runs: list[RunLog]) -> Plot:
    title = "Learner/reference divergence ||u - w|| / ||u|| at each sync"
    drawn = [(i, run) for i, run in enumerate(runs) if len(series(run.train, "ref_divergence")[0])]
    if not drawn:
        return Plot("divergence", title, None, "no run logged ref_divergence; only methods with "
                    "a reference model (--selection rho or blade) do")
    fig, (ax,) = _figure(title, "relative divergence")
    for i, run in drawn:
        x, y = series(run.train, "ref_divergence")
        # Each record averages its window, and the divergence only changes at a sync: steps.
        ax.plot(x, y, color=_colour(i), label=run.name, drawstyle="steps-pre",
                marker="." if len(x) < 30 else None)
        for n, at in enumerate(sorted(set(sync_iterations(run.train)))):
            ax.axvline(at, color=_colour(i), alpha=0.3, linestyle=":",
                       label=f"{run.name}: sync (w <- u)" if n == 0 else None)
    ax.legend(fontsize="small")
    return Plot("divergence", title, _png(fig))


def _noise_plot(slug: str, title: str, key: str, ylabel: str, runs: list[RunLog]) -> Plot:
    with_noise = [run for run in runs if nested_series(run.train, key)]
    if not with_noise:
        return Plot(slug, title, None, f"no run logged {key}; pass --noise-labels <pool "
                    ".meta.jsonl> to a selection method (the demo corpus labels its noise)")
    # One colour per noise type across all panels.
    types = sorted({t for run in with_noise for t in nested_series(run.train, key)},
                   key=lambda t: (t != CLEAN, t))
    fig, axes = _figure(title, ylabel, panels=len(with_noise))
    for ax, run in zip(axes, with_noise):
        for noise, (x, y) in nested_series(run.train, key).items():
            ax.plot(x, y, color=_colour(types.index(noise)), label=noise,
                    linewidth=2.5 if noise == CLEAN else 1.2)
        ax.set_title(run.name, fontsize="medium")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize="small", framealpha=0.7)
    return Plot(slug, title, _png(fig), wide=len(with_noise) > 1)


def make_plots(runs: list[RunLog]) -> list[Plot]:
    train = lambda run: run.train  # noqa: E731
    evals = lambda run: run.evals  # noqa: E731
    return [
        _metric_plot("train_loss", "Training loss (selected samples)", "loss", runs, train,
                     [("loss", "-")], "the log has no train records"),
        _metric_plot("target_loss", "Target-set loss (V)", "loss", runs, evals,
                     [("target_loss", "-")], "pass --target-data-path and --eval-interval > 0"),
        _metric_plot("test_loss", "Test loss (held out, never selected on)", "loss", runs, evals,
                     [("test_loss", "-")], "pass --test-data-path and --eval-interval > 0"),
        _compute_plot(runs),
        _metric_plot("valid_loss", "Validation loss (split of --data-path)", "loss", runs, evals,
                     [("valid_loss", "-")], "set --eval-interval > 0"),
        _metric_plot("kept_fraction", "Kept fraction of the candidates", "fraction", runs,
                     train, [("kept_fraction", "-")], "only selection methods log it"),
        _metric_plot("excess", "Mean excess loss: kept (solid) vs dropped (dashed)",
                     "loss_u - loss_w", runs, train,
                     [("excess_kept", "-"), ("excess_dropped", "--")],
                     "only excess-loss methods (highloss, rho, blade) log it"),
        _score_distribution_plot(runs),
        _divergence_plot(runs),
        _noise_plot("noise_kept_rate", "Kept rate by noise type", "noise_kept_rate",
                    "kept / candidates", runs),
        _noise_plot("trained_share", "Share of trained samples by noise type", "trained_share",
                    "share", runs),
        _metric_plot("hook_time_share", "Share of step time in the selection hook", "share",
                     runs, train, [("hook_time_share", "-")], "the log has no train records"),
    ]


# -- writing -----------------------------------------------------------------------------------
def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.plots figure { margin: 0; }
.plots figure.wide { grid-column: 1 / -1; }
img { width: 100%; border: 1px solid #eee; }
.note { color: #8a5a00; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def write_report(runs: list[RunLog], output: str, title: str = "Pretraining run report") -> dict:
    """Write index.html, summary.md, summary.json and plots/ under ``output``; return the
    summary (what summary.json holds)."""
    try:
        os.makedirs(os.path.join(output, "plots"), exist_ok=True)
    except OSError as err:
        raise UserError(f"{output}: cannot create the report directory ({err.strerror}); "
                        "choose another --output") from None
    summaries = [summarize(run) for run in runs]
    tables = summary_tables(summaries)
    plots = make_plots(runs)
    for plot in plots:
        if plot.png is not None:
            _write(os.path.join(output, "plots", plot.slug + ".png"), plot.png)
    notes = [f"{p.title}: skipped, {p.note}" for p in plots if p.png is None]
    sources = [f"{run.name}: {run.source}" for run in runs]

    md = [f"# {title}", "", "Runs:", *[f"- `{s}`" for s in sources], ""]
    md += [f"{_markdown_table(h, rows)}\n" for h, rows in tables]
    md += ["Final losses are the last evaluation record of each run; kept fractions, hook time "
           "and noise rates are means over the selecting steps.", ""]
    md += [f"![{p.title}](plots/{p.slug}.png)" for p in plots if p.png is not None]
    md += ["", *[f"- {n}" for n in notes]] if notes else []
    _write(os.path.join(output, "summary.md"), ("\n".join(md) + "\n").encode())

    body = [f"<h1>{html.escape(title)}</h1>", "<ul>",
            *[f"<li><code>{html.escape(s)}</code></li>" for s in sources], "</ul>"]
    body += [_html_table(h, rows) for h, rows in tables]
    body += ["<p>Final losses are the last evaluation record of each run; kept fractions, hook "
             "time and noise rates are means over the selecting steps.</p>"]
    body.append('<div class="plots">')
    for plot in plots:
        if plot.png is None:
            continue
        data = base64.b64encode(plot.png).decode("ascii")
        wide = ' class="wide"' if plot.wide else ""
        body.append(f'<figure id="{plot.slug}"{wide}><img alt="{html.escape(plot.title)}" '
                    f'src="data:image/png;base64,{data}"></figure>')
    body.append("</div>")
    if notes:
        body += ["<h2>Skipped plots</h2>", "<ul>",
                 *[f'<li class="note">{html.escape(n)}</li>' for n in notes], "</ul>"]
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")
    _write(os.path.join(output, "index.html"), page.encode())
    result = {"runs": summaries, "plots": [p.slug for p in plots if p.png is not None],
              "skipped": notes}
    _write(os.path.join(output, "summary.json"), (json.dumps(result, indent=1) + "\n").encode())
    return result


def _write(path: str, data: bytes) -> None:
    write_atomic(path, data)  # a browser refresh never sees a half-written page
