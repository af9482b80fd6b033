"""Selection quality: does each method make the model better on the target, per step and per FLOP?

Demo corpus (stdlib code, half the pool labelled noise), the same model, steps, evaluations and
seeds for every method. The test figure is ``test_bpb``: bits per byte of the learner on the
whole held-out *test* documents of the target distribution (never trained or selected on),
measured in the training loop at every evaluation (train/evaluator.py, the same figure as
``tools/evaluate.py`` on the checkpoint), so each run has a curve over steps, over FLOPs (all
roles: blade_mega/train/flops.py) and over training wall seconds (``wall_s``: step time only,
evaluations excluded). The final figure is the last evaluation's; ``test_loss`` (fixed windows
of the test split) is kept beside it.

    python bench/selection_quality.py                      # defaults: 5 seeds, 8 methods
    python bench/selection_quality.py --seeds 0 --train-iters 20 --methods uniform,blade \
        --results /tmp/smoke.json                           # a smoke run: not a results file
    python bench/selection_quality.py --regime domain-shift --methods uniform,rho,blade \
        --variant v1="--selection blade --blade-ref-steps 8 --blade-lambda 0.5" --tag v1

Regimes: ``scratch`` (random init on the noisy pool), ``continued`` (from a model trained
uniformly on that pool), ``domain-shift`` (from a base model trained on the stdlib's top-level
modules, continued on a pool where the target domain, GUI code: idlelib/tkinter/turtledemo, is
a minority among other packages and noise; "noise share" is then the off-target share).

Rows beside the selectors: ``oracle`` (uniform training on only the pool's target share: its
clean documents, or in domain-shift its target-domain ones) bounds what selection can reach;
``target-mix`` (uniform training on the pool with the target set V mixed in at
``--target-mix-share``) is what V buys without a selector; ``blade-paper`` is the paper's
setting (its METHODS entry says what that takes).

Per method and seed the summary has: final test_bpb, selection-split loss (domain-shift: a
separate target-domain split; other regimes: V), noise share, total FLOPs, the steps / compute /
wall time to reach uniform's final test_bpb (over uniform's), the test_bpb at uniform's total
compute; and the paired difference over seeds (mean and 95% t interval) to uniform and to the
best baseline (the non-blade row with the lowest mean selection-split loss: chosen on the
selection split, never on test), at equal steps and at equal compute (there: among the rows with
a model within uniform's compute, on their selection-split loss at it); with ``oracle`` run, the
share of the uniform -> oracle gap each method closes (bench/quality/).

The summary, the exact command, the commit and the per-seed curves go to ``--results``
(bench/results/README.md); ``bench/results_tables.py`` makes the README's tables from those
files. The last line printed is one JSON object: the goals (blade beats every baseline at equal
compute; blade reaches uniform's final test_bpb with <= 0.70x its compute; blade closes >= 0.8
of the oracle gap; ...) and the figures beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.quality.provenance import provenance  # noqa: E402
from bench.quality.summary import as_json, goals, method_role, run_figures, summarise  # noqa: E402
from blade_mega.testing import pretrain_rank, run_distributed  # noqa: E402

# Every method runs with the flag defaults (sample level, keep 1/2 of a 2x block, T = 20,
# K = 16, lambda = 0, beta = 0.25, --reweight-mix 0.5: the defaults the sweeps in docs/method.md
# chose), so "blade" and "rho" here are what `--selection blade|rho` alone gives; rho's default
# budget is blade's reference training in model passes. Variants add their own flags.
METHODS = {
    "uniform": [],
    "highloss": ["--selection", "highloss"],
    "rho": ["--selection", "rho"],
    "blade": ["--selection", "blade"],
    # The paper's setting: token level, keep 0.6, lambda 0.5, T = 20, K = 6 (K/T = 0.3); its
    # full re-sync w <- u at every sync (beta = 1), a reference of the learner's own size, and
    # candidate blocks drawn at random (the memoryless Frank-Wolfe step: no sidecar bias).
    "blade-paper": ["--selection", "blade", "--selection-granularity", "token",
                    "--keep-ratio", "0.6", "--blade-lambda", "0.5",
                    "--blade-sync-interval", "20", "--blade-ref-steps", "6",
                    "--blade-sync-beta", "1", "--reference-model", "same",
                    "--reweight-mix", "0"],
    "sketch-influence": ["--selection", "sketch-influence"],  # default --sketch-dim 64
    # Uniform training on other data than the pool (TRAINING_DATA).
    "oracle": [],
    "target-mix": [],
    # The baselines a sceptic asks for first. rho-small: the learner against a static
    # reference of the tiny preset trained on V from its own initialisation (RHO-LOSS's
    # design; for the tiny learner it is the learner's size, started fresh instead of copied);
    # rho-proxy: a tiny proxy pair with rho's rule, which costs what blade's pair costs.
    "random": ["--selection", "random"],
    "rho-small": ["--selection", "rho", "--reference-model", "tiny"],
    "rho-proxy": ["--selection", "rho", "--reference-model", "tiny", "--rho-scorer", "proxy"],
    # fastText on V against the pool, scored once before the runs (the data step below).
    "classifier": ["--selection", "classifier"],
}
DEFAULT_METHODS = ("uniform,random,rho,rho-small,rho-proxy,classifier,target-mix,oracle,blade,"
                   "blade-paper")
# What a method trains on, when it is not the pool.
TRAINING_DATA = {"oracle": "oracle", "target-mix": "target-mix"}
# The protocol fixes these for every row: a variant or --method-flags may not change them.
PROTOCOL_FLAGS = ("--train-iters", "--eval-interval", "--eval-iters", "--seed",
                  "--test-data-path", "--target-data-path")


def build_data(directory: str, size_mb: float, vocab: int) -> dict:
    from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus
    from blade_mega.prepare.inputs import iter_texts
    from blade_mega.prepare.preprocess import dataset_prefix, meta_path, preprocess
    from blade_mega.data.tokenizer import train_tokenizer

    paths = {"tokenizer": os.path.join(directory, "tokenizer.model")}
    for split in ("pool", "target", "test"):
        paths[split] = dataset_prefix(os.path.join(directory, split), "text")
    paths["labels"] = meta_path(paths["pool"])
    if all(os.path.exists(p + ".idx") for p in (paths["pool"], paths["target"], paths["test"])):
        return add_oracle(directory, paths, "clean")
    os.makedirs(directory, exist_ok=True)
    splits, labels = build_demo_corpus(size_mb=size_mb, noise_rate=0.5, seed=0)
    corpus = os.path.join(directory, "corpus")
    write_demo_corpus(corpus, splits, labels)
    train_tokenizer(iter_texts([os.path.join(corpus, "pool.jsonl")], ["text"], skip_invalid=False),
                    os.path.join(directory, "tokenizer"), vocab_size=vocab)
    for split in ("pool", "target", "test"):
        preprocess([os.path.join(corpus, f"{split}.jsonl")], os.path.join(directory, split),
                   paths["tokenizer"], append_eod=True, meta_keys=("id", "noise"),
                   show_progress=False)
    return add_oracle(directory, paths, "clean")


GUI_PACKAGES = ("idlelib", "tkinter", "turtledemo")  # the domain-shift regime's target domain


def build_domain_shift_data(directory: str, size_mb: float, vocab: int, noise_rate: float = 0.3
                            ) -> dict:
    """base (top-level modules), pool (GUI minority + other packages + labelled noise), target
    V, a selection split and test (GUI modules, disjoint), and the oracle's data (the pool's
    target-domain documents), as indexed datasets.  Pool documents are labelled ``target``,
    ``off-domain`` or their noise type (``--noise-labels``)."""
    import random

    from blade_mega.prepare.demo_corpus import (MIN_HELD_OUT_BYTES, NoiseMaker, _documents_of,
                                                _noise_count, stdlib_modules, stdlib_root,
                                                write_demo_corpus)
    from blade_mega.prepare.inputs import iter_texts
    from blade_mega.prepare.preprocess import dataset_prefix, meta_path, preprocess
    from blade_mega.data.tokenizer import train_tokenizer

    splits = ("base", "pool", "target", "select", "test")
    paths = {"tokenizer": os.path.join(directory, "tokenizer.model")}
    for split in splits:
        paths[split] = dataset_prefix(os.path.join(directory, split), "text")
    paths["labels"] = meta_path(paths["pool"])
    if all(os.path.exists(paths[split] + ".idx") for split in splits):
        return add_oracle(directory, paths, "target")
    rng = random.Random(0)
    modules = stdlib_modules(stdlib_root())
    rng.shuffle(modules)
    gui = [m for m in modules if m[0].split("/")[0] in GUI_PACKAGES]
    top = [m for m in modules if "/" not in m[0]]
    other = [m for m in modules if "/" in m[0] and m[0].split("/")[0] not in GUI_PACKAGES]

    def take(source, budget, label):
        docs, size = [], 0
        while source and size < budget:
            for doc in _documents_of(*source.pop()):
                doc.noise = label
                docs.append(doc)
                size += len(doc.text)
        return docs

    pool_bytes = int(size_mb * 2**20)
    clean_bytes = int(pool_bytes * (1 - noise_rate))
    docs = {"target": take(gui, MIN_HELD_OUT_BYTES, "target"),
            "test": take(gui, MIN_HELD_OUT_BYTES, "target"),
            "select": take(gui, MIN_HELD_OUT_BYTES // 2, "target"),
            "base": take(top, pool_bytes // 2, "clean")}
    # The rest of the GUI code, up to 40% of the clean bytes (all of it at the default 2 MB:
    # about a quarter of the pool's bytes, a sixth of its tokens: base64 blobs are token-dense).
    on_target = take(gui, int(0.4 * clean_bytes), "target")
    off = take(other + top, clean_bytes - sum(len(d.text) for d in on_target), "off-domain")
    clean = on_target + off
    maker = NoiseMaker(clean, rng)
    kinds = [("spam", "scramble", "duplicate", "blob")[i % 4]
             for i in range(_noise_count(len(clean), noise_rate))]
    pool = clean + [maker.make(kind, i) for i, kind in enumerate(kinds)]
    rng.shuffle(pool)
    docs["pool"] = pool
    corpus = os.path.join(directory, "corpus")
    write_demo_corpus(corpus, {k: docs[k] for k in ("pool", "target", "test")},
                      {"regime": "domain-shift", "target_domain": GUI_PACKAGES})
    for extra in ("base", "select"):
        with open(os.path.join(corpus, f"{extra}.jsonl"), "w") as f:
            f.writelines(json.dumps(doc.record()) + "\n" for doc in docs[extra])
    train_tokenizer(iter_texts([os.path.join(corpus, f"{s}.jsonl") for s in ("base", "pool")],
                               ["text"], skip_invalid=False),
                    os.path.join(directory, "tokenizer"), vocab_size=vocab)
    for split in splits:
        preprocess([os.path.join(corpus, f"{split}.jsonl")], os.path.join(directory, split),
                   paths["tokenizer"], append_eod=True, meta_keys=("id", "noise"),
                   show_progress=False)
    return add_oracle(directory, paths, "target")
def add_oracle(directory: str, paths: dict, label: str) -> dict:
    """``paths["oracle"]``: the pool's documents labelled ``label`` (its target share), as an
    indexed dataset of their own (the same texts, the same tokenizer), with its labels file."""
    from blade_mega.prepare.preprocess import dataset_prefix, meta_path, preprocess

    paths["oracle"] = dataset_prefix(os.path.join(directory, "oracle"), "text")
    paths["oracle_labels"] = meta_path(paths["oracle"])
    if os.path.exists(paths["oracle"] + ".idx"):
        return paths
    corpus = os.path.join(directory, "corpus")
    source = os.path.join(corpus, "oracle.jsonl")
    with open(os.path.join(corpus, "pool.jsonl")) as pool, open(source, "w") as out:
        out.writelines(line for line in pool if json.loads(line).get("noise") == label)
    preprocess([source], os.path.join(directory, "oracle"), paths["tokenizer"], append_eod=True,
               meta_keys=("id", "noise"), show_progress=False)
    return paths


def score_pool(paths: dict) -> None:
    """The classifier's per-document scores of the pool, beside it (once per data directory):
    fastText trained on V, never on the selection or test split."""
    from blade_mega.data.document_scores import scores_path

    if os.path.exists(scores_path(paths["pool"])):
        return
    subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "tools",
                                                 "score_documents.py"),
                    "--tokenizer-model", paths["tokenizer"], "--data-path", paths["pool"],
                    "--target-data-path", paths["target"]],
                   check=True, stdout=subprocess.DEVNULL)


def method_flags(method: str, args) -> list[str]:
    """A method's flags: one of METHODS, or a --variant NAME="flags" (its own --selection),
    with bench flags' values filled in (None where the flag was not given)."""
    return args.variants[method] if method in args.variants else METHODS[method]


def selection_of(flags: list[str]) -> Optional[str]:
    return flags[flags.index("--selection") + 1] if "--selection" in flags[:-1] else None


def learner_flags(args, iters: int) -> list[str]:
    """The learner's shape, batch and schedule: the same for the base model and every method."""
    return ["--model-size", args.model_size, *args.model_flags.split(),
            "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch),
            "--micro-batch-size", str(args.micro_batch), "--train-iters", str(iters),
            "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-warmup-iters", "20"]


def training_data(paths: dict, method: str, args) -> tuple[list[str], str]:
    """The training blend's words (Megatron's "W1 prefix1 W2 prefix2") and the labels file of
    its dataset 0 (what --noise-labels labels)."""
    data = TRAINING_DATA.get(method, "pool")
    if data == "oracle":
        return [paths["oracle"]], paths["oracle_labels"]
    if data == "target-mix":  # V is unlabelled in the blend: it counts as on target
        share = args.target_mix_share
        return [f"{1 - share:g}", paths["pool"], f"{share:g}", paths["target"]], paths["labels"]
    return [paths["pool"]], paths["labels"]


def run_argv(paths: dict, method: str, seed: int, args, log: str,
             base: Optional[str] = None) -> list[str]:
    blend, labels = training_data(paths, method, args)
    # The selection split: domain-shift has its own (held-out target-domain documents, as the
    # valid set); the other regimes choose on V's loss.
    data = (["--train-data-path", *blend, "--valid-data-path", paths["select"]]
            if "select" in paths else ["--data-path", *blend, "--split", "100,1"])
    flags = method_flags(method, args)
    argv = ["--tokenizer-model", paths["tokenizer"], *data,
            "--target-data-path", paths["target"], "--test-data-path", paths["test"],
            "--noise-labels", labels, *learner_flags(args, args.train_iters),
            "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_iters),
            "--log-interval", "10", "--seed", str(seed), "--no-progress", "--log-file", log,
            *flags]
    if selection_of(flags) not in (None, "uniform"):
        # A variant's own flags come last, so they win over --method-flags.
        argv += args.method_flags + args.variants.get(method, [])
    if base:  # continued pretraining: start from the base model's weights, fresh schedule
        argv += ["--load", base, "--finetune"]
    return argv


def unavailable(method: str, argv: list[str], flags: list[str]) -> Optional[str]:
    """Why this build cannot run ``method`` (None if it can): its --selection is not
    registered, a bench flag it needs was not given, or the run's flags are refused."""
    from blade_mega.config import parse_config
    from blade_mega.errors import UserError
    from blade_mega.selection.registry import method_names

    selection = selection_of(flags)
    if selection is not None and selection not in method_names():
        return (f"--selection {selection} is not registered in this build (registered: "
                f"{', '.join(method_names())})")
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            parse_config(argv)
    except UserError as err:
        return str(err)
    except SystemExit:  # argparse said why on stderr
        lines = refused.getvalue().strip().splitlines()
        return lines[-1] if lines else "its flags are refused"
    return None


def run_method(paths: dict, method: str, seed: int, args, base: Optional[str] = None) -> dict:
    """One run's figures (``run_figures``) and its wall seconds, start-up and evaluations
    included (None for a reused log)."""
    log = os.path.join(args.workdir, f"{args.regime}_{method}_seed{seed}.jsonl")
    key = selection_key(paths)
    if args.reuse and os.path.exists(log):
        records = [json.loads(line) for line in open(log)]
        if any(r["kind"] == "eval" and r["iteration"] == args.train_iters for r in records):
            return dict(run_figures(records, key), seconds=None)
    if os.path.exists(log):  # the log is appended to: a stale one would mix two runs
        os.remove(log)
    argv = run_argv(paths, method, seed, args, log, base)
    started = time.perf_counter()
    # A long run (demo size, thousands of steps) outlasts run_distributed's 10-minute default.
    records = run_distributed(pretrain_rank, 1, argv, timeout=args.run_timeout)[0]
    return dict(run_figures(records, key), seconds=time.perf_counter() - started)


def selection_key(paths: dict) -> str:
    return "valid_loss" if "select" in paths else "target_loss"


def train_base(paths: dict, seed: int, args, workdir: str) -> str:
    """The starting point of continued pretraining: uniform training on the noisy pool
    (continued) or on the base domain (domain-shift)."""
    save = os.path.join(workdir, f"{args.regime}_base{args.base_iters}_seed{seed}")
    if os.path.exists(os.path.join(save, "latest")):
        return save
    argv = ["--tokenizer-model", paths["tokenizer"], "--data-path", paths.get("base",
                                                                              paths["pool"]),
            *learner_flags(args, args.base_iters), "--eval-interval", "0", "--log-interval", "50",
            "--seed", str(1000 + seed), "--no-progress", "--split", "100,1", "--save", save]
    run_distributed(pretrain_rank, 1, argv, timeout=args.run_timeout)
    return save


def default_results(args) -> str:
    return os.path.join(HERE, "results", f"selection_quality_{args.regime}_{args.tag}.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, of: {', '.join(METHODS)} (default: {DEFAULT_METHODS})")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=25,
                   help="steps between evaluations, the same for every row (the crossings "
                        "round up to it)")
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--model-flags", default="", metavar='"FLAGS"',
                   help='learner shape overrides for every run, base included (e.g. '
                        '"--num-layers 8 --hidden-size 256 --ffn-hidden-size 1024"): a learner '
                        'larger than a preset, to measure a proxy pair at a smaller size ratio')
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--size-mb", type=float, default=None,
                   help="pool size (default 4 MB; domain-shift: 2 MB, which holds all the "
                        "target-domain code that the held-out splits leave)")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--workdir", default=os.path.join(HERE, ".cache", "selection_quality"))
    p.add_argument("--regime", choices=("scratch", "continued", "domain-shift"),
                   default="scratch",
                   help="scratch: from random init; continued: from a model first trained "
                        "--base-iters steps uniformly on the noisy pool (where a static "
                        "reference is expected to go stale); domain-shift: from a base model "
                        "of another domain, on a pool where the target domain is a minority")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="an extra method: a name and its pretrain flags (with --selection), "
                        "run after --methods with the shared selection flags; repeatable")
    p.add_argument("--target-mix-share", type=float, default=0.1,
                   help="target-mix: the share of V in its training blend")
    p.add_argument("--base-iters", type=int, default=300)
    p.add_argument("--run-timeout", type=float, default=7200,
                   help="seconds one training run may take before it counts as hung")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs' logs in --workdir (same settings assumed)")
    p.add_argument("--tag", default=None,
                   help="names the results file (default: <model-size>_<train-iters>, with "
                        "_custom after it when --model-flags, --method-flags or a --variant is "
                        "given); give one for any other setting of your own")
    p.add_argument("--results", metavar="FILE",
                   help="where the summary goes (default: "
                        "bench/results/selection_quality_<regime>_<tag>.json); smoke runs "
                        "belong in a temporary directory")
    p.add_argument("--method-flags", nargs=argparse.REMAINDER, default=[],
                   help="extra pretrain flags for every selecting method (last on the line)")
    args = p.parse_args(argv)
    args.variants = {}
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        if not name or "--selection" not in flags:
            p.error(f'--variant {variant}: expected NAME="--selection METHOD ..."')
        args.variants[name] = flags.split()
    for where, flags in [("--method-flags", args.method_flags),
                         *((f"--variant {n}", f) for n, f in args.variants.items())]:
        fixed = [flag for flag in flags if flag.split("=")[0] in PROTOCOL_FLAGS]
        if fixed:
            p.error(f"{where}: {fixed[0]} is the protocol's, the same for every row; set the "
                    "bench's own flag")
    args.method_list = args.methods.split(",") + list(args.variants)
    unknown = [m for m in args.method_list if m not in METHODS and m not in args.variants]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not 0 < args.target_mix_share < 1:
        p.error("--target-mix-share must be in (0, 1)")
    # a run with its own learner shape or method flags must not overwrite the defaults' file
    custom = args.model_flags or args.method_flags or args.variants
    args.tag = args.tag or f"{args.model_size}_{args.train_iters}" + ("_custom" if custom else "")
    args.results = args.results or default_results(args)
    return args


def main() -> None:
    from bench.results_tables import regime_table
    from blade_mega.atomic import write_atomic

    args = parse_args()
    if args.regime == "domain-shift":
        args.size_mb = args.size_mb or 2.0
        paths = build_domain_shift_data(
            os.path.join(args.workdir, f"data_domain_shift_{args.size_mb:g}mb"), args.size_mb,
            args.vocab)
    else:
        args.size_mb = args.size_mb or 4.0
        paths = build_data(os.path.join(args.workdir, "data"), args.size_mb, args.vocab)
    if "classifier" in args.method_list:
        score_pool(paths)
    skipped = {}
    for method in args.method_list:
        probe = os.path.join(args.workdir, "probe.jsonl")
        reason = unavailable(method, run_argv(paths, method, args.seeds[0], args, probe),
                             method_flags(method, args))
        if reason:
            skipped[method] = reason
            print(f"selection_quality: skipping {method}: {reason}", file=sys.stderr, flush=True)
    methods = [m for m in args.method_list if m not in skipped]
    if "uniform" not in methods:
        print("selection_quality: without uniform there are no crossings, budgets or paired "
              "differences", file=sys.stderr)

    runs: dict = {m: [] for m in methods}
    for seed in args.seeds:
        base = (train_base(paths, seed, args, args.workdir) if args.regime != "scratch"
                else None)
        for method in methods:
            r = run_method(paths, method, seed, args, base)
            runs[method].append(r)
            print(f"seed {seed} {method:16s} test bpb {number(r['test_bpb'], 4)}  test loss "
                  f"{number(r['test_loss'], 4)}  selection loss {number(r['selection_loss'], 4)}"
                  f"  noise share {number(r['noise_share'], 3)}  "
                  f"{number(r['seconds'], 0)}s", flush=True)

    roles = {m: method_role(m, selection_of(method_flags(m, args))) for m in methods}
    summary = summarise(runs, roles, args.train_iters)
    met, figures = goals(summary)
    result = {"bench": "selection_quality", "regime": args.regime, "tag": args.tag,
              "seeds": args.seeds, "train_iters": args.train_iters,
              "eval_interval": args.eval_interval, "command": provenance(),
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("workdir", "results", "variants", "method_list")},
              "flags": {m: method_flags(m, args) for m in methods}, "skipped": skipped,
              **summary, "goals": met, "figures": figures,
              "curves": {m: {str(seed): run["curve"] for seed, run in zip(args.seeds, runs[m])}
                         for m in methods},
              "run_seconds": {m: [run["seconds"] for run in runs[m]] for m in methods}}
    result = as_json(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    write_atomic(args.results, json.dumps(result, indent=1) + "\n")
    print(regime_table(result, os.path.abspath(args.results)))
    print(json.dumps({"regime": args.regime, "results": os.path.abspath(args.results),
                      "goals": met, "figures": as_json(figures)}))


def number(value, digits: int) -> str:
    return "nan" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
