"""End-to-end demo: stdlib corpus -> tokenizer -> indexed datasets -> pretrain blade vs uniform
on CPU ranks -> HTML report.  ``make demo`` runs it: 5.1 minutes on 2 idle cores (as the README
says), longer when other jobs share them.

Examples:
    python tools/demo.py --workdir runs/demo
    python tools/demo.py --workdir runs/demo --methods blade,uniform,rho --train-iters 600
    python tools/demo.py --workdir /tmp/t --tiny          # the whole pipeline in under a minute

Stages, each skipped when its outputs exist with the same settings (--force redoes them all):

    corpus      <workdir>/data/corpus/{pool,target,test}.jsonl, labels.json (half the pool is
                labelled noise; target and test are clean held-out modules)
    tokenizer   <workdir>/data/tokenizer.model
    datasets    <workdir>/data/{pool,target,test}_text_document.{bin,idx,meta.jsonl}
    pretrain    <workdir>/runs/<method>/: checkpoints, log.jsonl, tensorboard/, console.log
                (an interrupted run resumes from its last checkpoint)
    report      <workdir>/report/index.html, summary.md, summary.json, plots/

Every method trains the same model for the same steps on the pool; ``target_loss`` is measured on
the target set V that blade's reference trains on, ``test_loss`` on a test set nobody sees.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from blade_mega.atomic import write_atomic
from blade_mega.errors import UserError, run_cli
from blade_mega.selection.registry import method_names

# Every method (selection/registry.py) runs with the flag defaults: `--selection blade` alone
# is the recommended setting (chosen by the sweeps in docs/method.md), as
# bench/selection_quality.py measures it.
METHODS = method_names()
# --tiny: sizes for a pipeline check in seconds; method flags appended (later flags win).
TINY = dict(size_mb=0.05, vocab_size=400, model_size="tiny", seq_length=32,
            global_batch_size=8, micro_batch_size=2, train_iters=4, eval_iters=1, log_interval=1,
            eval_interval=2, save_interval=4, split="80,20")
TINY_METHOD_FLAGS = ["--selection-warmup-steps", "1", "--blade-sync-interval", "2",
                     "--blade-ref-steps", "1"]
SPLITS = ("pool", "target", "test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the whole pipeline in under a minute")
    p.add_argument("--methods", default="blade,uniform",
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks per run (data parallel)")
    g = p.add_argument_group("data")
    g.add_argument("--size-mb", type=float, default=3.0, help="pool size in MB, noise included")
    g.add_argument("--noise-rate", type=float, default=0.5)
    g.add_argument("--vocab-size", type=int, default=2000)
    g.add_argument("--corpus-seed", type=int, default=0)
    g = p.add_argument_group("training (blade-pretrain flags)")
    g.add_argument("--model-size", default="demo")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=0, help="default: train-iters / 10")
    g.add_argument("--eval-iters", type=int, default=8, help="batches per held-out evaluation")
    g.add_argument("--save-interval", type=int, default=0,
                   help="checkpoint every N steps, to resume if interrupted (default: "
                        "train-iters / 3)")
    g.add_argument("--split", default="98,2", help="train,valid document shares of the pool")
    g.add_argument("--seed", type=int, default=1234)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    if "--tiny" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**TINY)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise UserError(f"--methods {','.join(unknown) or '(empty)'}: choose from "
                        f"{', '.join(METHODS)}")
    if args.nproc < 1:
        raise UserError("--nproc must be at least 1")
    args.eval_interval = args.eval_interval or max(1, args.train_iters // 10)
    args.save_interval = args.save_interval or max(1, args.train_iters // 3)
    return args


# -- stage bookkeeping -------------------------------------------------------------------------
class Stages:
    """A stage is skipped when its outputs exist and it last finished with the same settings."""

    def __init__(self, workdir: str, force: bool):
        self.dir = os.path.join(workdir, ".stages")
        self.force = force
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name + ".json")

    def read(self, name: str):
        try:
            with open(self.path(name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def is_done(self, name: str, settings: dict, outputs: list[str]) -> bool:
        return (not self.force and self.read(name) == settings
                and all(os.path.exists(p) for p in outputs))

    def mark(self, name: str, settings: dict) -> None:
        write_atomic(self.path(name), json.dumps(settings, indent=1))


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = args.workdir
        self.data = os.path.join(args.workdir, "data")
        self.stages = Stages(args.workdir, args.force)
        self.tokenizer = os.path.join(self.data, "tokenizer.model")
        self.prefix = {s: os.path.join(self.data, f"{s}_text_document") for s in SPLITS}
        self.report_dir = os.path.join(args.workdir, "report")
        a = args
        self.corpus_settings = dict(size_mb=a.size_mb, noise_rate=a.noise_rate, seed=a.corpus_seed)
        self.data_settings = dict(self.corpus_settings, vocab_size=a.vocab_size)

    def run(self) -> dict:
        started = time.perf_counter()
        if importlib.util.find_spec("matplotlib") is None:  # fail now, not after the training
            raise UserError("the report needs matplotlib: pip install matplotlib "
                            "(make venv installs it)")
        self.corpus()
        self.tokenizer_stage()
        self.datasets()
        for method in self.args.methods:
            self.pretrain(method)
        summary = self.report()
        self.headline(summary, time.perf_counter() - started)
        return summary

    # -- data ------------------------------------------------------------------------------
    def corpus(self) -> None:
        corpus_dir = os.path.join(self.data, "corpus")
        outputs = [os.path.join(corpus_dir, f) for f in ("labels.json", "pool.jsonl")]
        if self.stages.is_done("corpus", self.corpus_settings, outputs):
            banner(f"corpus: up to date in {corpus_dir}")
            return
        from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus

        banner(f"corpus: {self.args.size_mb} MB stdlib pool, {self.args.noise_rate:.0%} noise")
        splits, labels = build_demo_corpus(self.args.size_mb, self.args.noise_rate,
                                           self.args.corpus_seed)
        write_demo_corpus(corpus_dir, splits, labels)
        for name, stats in labels["splits"].items():
            print(f"  {name}: {stats['documents']} docs, {stats['bytes'] / 2**20:.2f} MB, "
                  f"noise {stats['noise']}", flush=True)
        self.stages.mark("corpus", self.corpus_settings)

    def tokenizer_stage(self) -> None:
        if self.stages.is_done("tokenizer", self.data_settings, [self.tokenizer]):
            banner(f"tokenizer: up to date ({self.tokenizer})")
            return
        from blade_mega.prepare.inputs import iter_texts
        from blade_mega.data.tokenizer import train_tokenizer

        banner(f"tokenizer: BPE, vocab {self.args.vocab_size}")
        pool = os.path.join(self.data, "corpus", "pool.jsonl")
        tokenizer = train_tokenizer(iter_texts([pool], ["text"], skip_invalid=False),
                                    os.path.splitext(self.tokenizer)[0], self.args.vocab_size)
        print(f"  wrote {tokenizer.model_path}", flush=True)
        self.stages.mark("tokenizer", self.data_settings)

    def datasets(self) -> None:
        outputs = [self.prefix[s] + suffix for s in SPLITS for suffix in (".bin", ".idx")]
        if self.stages.is_done("datasets", self.data_settings, outputs):
            banner("datasets: up to date")
            return
        from blade_mega.prepare.preprocess import preprocess

        banner("datasets: tokenising pool, target and test")
        for split in SPLITS:
            summary = preprocess([os.path.join(self.data, "corpus", f"{split}.jsonl")],
                                 os.path.join(self.data, split), self.tokenizer,
                                 append_eod=True, workers=1,
                                 meta_keys=["id", "noise"], show_progress=False)
            print(f"  {split}: {summary.line()}", flush=True)
        self.stages.mark("datasets", self.data_settings)

    # -- training --------------------------------------------------------------------------
    def run_dir(self, method: str) -> str:
        return os.path.join(self.workdir, "runs", method)

    def pretrain_argv(self, method: str) -> list[str]:
        a, run = self.args, self.run_dir(method)
        argv = ["--model-size", a.model_size, "--tokenizer-model", self.tokenizer,
                "--data-path", self.prefix["pool"], "--split", a.split,
                "--target-data-path", self.prefix["target"],
                "--test-data-path", self.prefix["test"],
                "--noise-labels", self.prefix["pool"] + ".meta.jsonl",
                "--seq-length", str(a.seq_length), "--global-batch-size", str(a.global_batch_size),
                "--micro-batch-size", str(a.micro_batch_size), "--train-iters", str(a.train_iters),
                "--lr", str(a.lr), "--lr-warmup-iters", str(max(1, a.train_iters // 10)),
                "--seed", str(a.seed), "--log-interval", str(a.log_interval),
                "--eval-interval", str(a.eval_interval), "--eval-iters", str(a.eval_iters),
                "--save", run, "--save-interval", str(a.save_interval),
                "--log-file", os.path.join(run, "log.jsonl"),
                "--tensorboard-dir", os.path.join(run, "tensorboard"), "--no-progress"]
        argv += ["--selection", method]
        if a.tiny:
            argv += TINY_METHOD_FLAGS
        return argv

    def run_settings(self, method: str) -> dict:
        return dict(self.data_settings, nproc=self.args.nproc, argv=self.pretrain_argv(method))

    def resumable(self, method: str, settings: dict) -> bool:
        """An interrupted run with the same settings left a checkpoint: continue from it."""
        return (not self.args.force
                and self.stages.read(f"pretrain-{method}.started") == settings
                and os.path.isfile(os.path.join(self.run_dir(method), "latest")))

    def pretrain(self, method: str) -> None:
        run = self.run_dir(method)
        settings = self.run_settings(method)
        argv = settings["argv"]
        name = f"pretrain-{method}"
        if self.stages.is_done(name, settings, [os.path.join(run, "log.jsonl")]):
            banner(f"pretrain {method}: up to date ({run})")
            return
        resume = self.resumable(method, settings)
        if resume:
            argv = argv + ["--load", run]
        else:
            shutil.rmtree(run, ignore_errors=True)
            os.makedirs(run)
            self.stages.mark(name + ".started", settings)
        banner(f"pretrain {method}: {self.args.train_iters} steps on {self.args.nproc} CPU "
               f"rank(s){' (resuming)' if resume else ''}; log {run}/log.jsonl")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(self.args.nproc), "-m", "blade_mega.pretrain", *argv]
        console = os.path.join(run, "console.log")
        code = stream(command, console, method, self.args.train_iters)
        if code != 0:
            with open(console, errors="replace") as f:
                lines = f.readlines()
            errors = [line.strip() for line in lines if line.startswith("error: ")]
            if not errors:  # a crash, not a diagnosed error: show how it ended
                sys.stderr.write("".join(lines[-15:]))
            cause = errors[0].removeprefix("error: ") if errors else f"exit status {code}"
            raise UserError(f"pretraining {method} failed: {cause} (full output: {console})")
        self.stages.mark(name, settings)

    # -- report ----------------------------------------------------------------------------
    def report(self) -> dict:
        from blade_mega.report.run_report import load_runs, write_report

        logs = [os.path.join(self.run_dir(m), "log.jsonl") for m in self.args.methods]
        settings = {m: [os.path.getsize(p), os.path.getmtime(p)]
                    for m, p in zip(self.args.methods, logs)}
        summary_path = os.path.join(self.report_dir, "summary.json")
        if self.stages.is_done("report", settings, [summary_path]):
            banner(f"report: up to date ({self.report_dir})")
            with open(summary_path) as f:
                return json.load(f)
        banner(f"report: {self.report_dir}")
        runs = load_runs([self.run_dir(m) for m in self.args.methods], self.args.methods)
        title = f"BLADE demo: {' vs '.join(self.args.methods)} on the stdlib corpus"
        summary = write_report(runs, self.report_dir, title)
        self.stages.mark("report", settings)
        return summary

    def headline(self, summary: dict, seconds: float) -> None:
        banner(f"done in {seconds / 60:.1f} min. Report: {self.report_dir}/index.html "
               f"(tables: {self.report_dir}/summary.md)")
        print(f"  {'method':<10} {'target loss':>11} {'test loss':>10}  noise in trained samples")
        for run in summary["runs"]:
            final = run["final"]
            noise = "-"
            if run["noise_trained_share"] is not None:
                rates = ", ".join(f"{t} {v:.0%}" for t, v in run["noise_kept_rate"].items()
                                  if v is not None)
                noise = f"{run['noise_trained_share']:.1%}  (kept rate: {rates})"
            print(f"  {run['name']:<10} {_loss(final.get('target_loss')):>11} "
                  f"{_loss(final.get('test_loss')):>10}  {noise}", flush=True)


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def stream(command: list[str], console: str, method: str, total: int) -> int:
    """Run ``command``, keep all its output in ``console``, show one line per log record."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    with open(console, "a") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            bufsize=1) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                shown = progress_line(line, method, total)
                if shown:
                    print(shown, flush=True)
        finally:
            if proc.poll() is None:  # interrupted: do not leave the ranks running
                proc.terminate()
            proc.wait()
    return proc.returncode


def progress_line(line: str, method: str, total: int):
    """A compact line for a pretrain JSON log record, or None for other output."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    kind = record.get("kind")
    if kind == "train":
        parts = [f"[{method}] it {record['iteration']:>5}/{total}",
                 f"loss {record['loss']:.3f}"]
        if "kept_fraction" in record:
            parts.append(f"kept {record['kept_fraction']:.2f}")
        share = record.get("trained_share")
        if isinstance(share, dict) and "clean" in share:
            parts.append(f"noise {1 - share['clean']:.0%}")
        step = record.get("step_time", 0.0)
        remaining = (total - record["iteration"]) * step
        parts.append(f"{step:.2f} s/step, {remaining / 60:.1f} min left")
        return "  ".join(parts)
    if kind == "eval":
        losses = "  ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in record.items()
                           if k.endswith("_loss") and isinstance(v, float))
        return f"[{method}] eval at {record['iteration']}: {losses}"
    if kind in ("checkpoint", "resume", "bad_step"):
        return f"[{method}] {kind} at {record.get('iteration')}"
    return None


def main() -> int:
    Demo(parse_args()).run()
    return 0


if __name__ == "__main__":
    run_cli(main)
