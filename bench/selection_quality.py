"""Selection quality: does each method make the model better per training step on the target?

Demo corpus (stdlib code, half the pool labelled noise), the same model, steps and seeds for
every method; the measure is the loss on the held-out *test* split of the target distribution
(never trained or selected on).  Reports, per method: final test loss for every seed (windows
of the shuffled test split, as the training loop logs it), bits per byte of the final model on
the whole test documents (``tools/evaluate.py``: document order, tokenizer-independent), the
share of steps it needs to reach uniform's final test loss, and the share of trained samples
that were noise.

    python bench/selection_quality.py                      # defaults: 3 seeds, 5 methods
    python bench/selection_quality.py --seeds 0 --train-iters 100 --methods uniform,blade
    python bench/selection_quality.py --regime domain-shift --methods uniform,rho,blade \
        --variant v1="--selection blade --blade-ref-steps 8 --blade-lambda 0.5 --blade-sync-beta 1"

Regimes: ``scratch`` (random init on the noisy pool), ``continued`` (from a model trained
uniformly on that pool), ``domain-shift`` (from a base model trained on the stdlib's top-level
modules, continued on a pool where the target domain, GUI code: idlelib/tkinter/turtledemo, is
a minority among other packages and noise; "noise share" is then the off-target share).

Beside steps, every method reports the *compute* it needs to reach uniform's final test loss:
analytic FLOPs of all roles (blade_mega/train/flops.py: learner, scoring, reference/proxy, sketches)
at that point over uniform's total, and the wall-time version (share of steps x median step
time over uniform's).  Settings are to be chosen on ``selection_loss`` (domain-shift: a separate
target-domain split; other regimes: V), never on the test loss.

The last line is one JSON object with the figures and the goals:
blade below uniform and rho on test loss for every seed; blade reaches uniform's final test loss
with <= 0.75x uniform's compute; blade trains on < 1/3 of the noise uniform trains on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

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
    "sketch-influence": ["--selection", "sketch-influence"],  # default --sketch-dim 64
}


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
        return paths
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
    return paths


GUI_PACKAGES = ("idlelib", "tkinter", "turtledemo")  # the domain-shift regime's target domain


def build_domain_shift_data(directory: str, size_mb: float, vocab: int, noise_rate: float = 0.3
                            ) -> dict:
    """base (top-level modules), pool (GUI minority + other packages + labelled noise), target
    V, a selection split and test (GUI modules, disjoint), as indexed datasets.  Pool documents
    are labelled ``target``, ``off-domain`` or their noise type (``--noise-labels``)."""
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
        return paths
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
    return paths


def method_flags(method: str, args) -> list[str]:
    """A method's flags: one of METHODS, or a --variant NAME="flags" (its own --selection)."""
    if method in args.variants:
        return args.variants[method]
    return METHODS[method]


def learner_flags(args, iters: int) -> list[str]:
    """The learner's shape, batch and schedule: the same for the base model and every method."""
    return ["--model-size", args.model_size, *args.model_flags.split(),
            "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch),
            "--micro-batch-size", str(args.micro_batch), "--train-iters", str(iters),
            "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-warmup-iters", "20"]


def run_method(paths: dict, method: str, seed: int, args, workdir: str,
               base: str | None = None) -> dict:
    log = os.path.join(workdir, f"{args.regime}_{method}_seed{seed}.jsonl")
    bpb_file = log[:-len(".jsonl")] + ".test_bpb.json"
    if args.reuse and os.path.exists(log):
        records = [json.loads(line) for line in open(log)]
        if any(r["kind"] == "eval" and r["iteration"] == args.train_iters for r in records):
            bpb = json.load(open(bpb_file)) if os.path.exists(bpb_file) else {}
            return dict(summarise(records, float("nan"), selection_key(paths)), **bpb)
    for stale in (log, bpb_file):
        if os.path.exists(stale):
            os.remove(stale)
    save = os.path.join(workdir, f"ckpt_{args.regime}_{method}_seed{seed}")
    # The selection split: domain-shift has its own (held-out target-domain documents, as the
    # valid set); the other regimes choose on V's loss.
    data = (["--train-data-path", paths["pool"], "--valid-data-path", paths["select"]]
            if "select" in paths else ["--data-path", paths["pool"], "--split", "100,1"])
    argv = ["--tokenizer-model", paths["tokenizer"], *data,
            "--target-data-path", paths["target"], "--test-data-path", paths["test"],
            "--noise-labels", paths["labels"], *learner_flags(args, args.train_iters),
            "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_iters),
            "--log-interval", "10", "--seed", str(seed), "--no-progress", "--log-file", log,
            "--save", save, "--keep-checkpoints", "1", *method_flags(method, args)]
    if method != "uniform":
        # A variant's own flags come last, so they win over --method-flags.
        argv += args.method_flags + args.variants.get(method, [])
    if base:  # continued pretraining: start from the base model's weights, fresh schedule
        argv += ["--load", base, "--finetune"]
    started = time.perf_counter()
    # A long run (demo size, thousands of steps) outlasts run_distributed's 10-minute default.
    records = run_distributed(pretrain_rank, 1, argv, timeout=args.run_timeout)[0]
    seconds = time.perf_counter() - started
    bpb = test_bits_per_byte(save, paths)
    with open(bpb_file, "w") as f:
        json.dump(bpb, f)
    shutil.rmtree(save, ignore_errors=True)
    return dict(summarise(records, seconds, selection_key(paths)), **bpb)


def test_bits_per_byte(save: str, paths: dict) -> dict:
    """The final model on the whole test documents (tools/evaluate.py: in document order, no
    shuffle): loss and bits per byte, the tokenizer-independent figure users compare."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "tools",
                                                       "evaluate.py"),
                          "--load", save, "--data-path", paths["test"], "--no-progress"],
                         env=env, check=True, capture_output=True, text=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])["datasets"][paths["test"]]
    return {"test_bpb": figures["bits_per_byte"], "test_doc_loss": figures["loss"]}


def selection_key(paths: dict) -> str:
    return "valid_loss" if "select" in paths else "target_loss"


def summarise(records: list[dict], seconds: float, selection_key: str = "target_loss") -> dict:
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    shares = [r["trained_share"] for r in train if "trained_share" in r]
    # Off-target share: everything but clean (demo) or target-domain (domain-shift) text.
    noise_share = (float(np.mean([1.0 - s.get("clean", 0.0) - s.get("target", 0.0)
                                  for s in shares])) if shares else None)
    last = evals[-1]
    return {"curve": [(r["iteration"], r["test_loss"]) for r in evals],
            "flops_curve": [(r.get("flops"), r["test_loss"]) for r in evals],
            "final": last["test_loss"], "noise_share": noise_share, "seconds": seconds,
            # choose settings on this, never on the test loss
            "selection_loss": last.get(selection_key),
            "flops": train[-1].get("flops") if train else None,
            "median_step_time": float(np.median([r["step_time"] for r in train[1:] or train]))}


def train_base(paths: dict, seed: int, args, workdir: str) -> str:
    """The starting point of continued pretraining: uniform training on the noisy pool
    (continued) or on the base domain (domain-shift)."""
    save = os.path.join(workdir, f"{args.regime}_base{args.base_iters}_seed{seed}")
    if os.path.exists(os.path.join(save, "latest")):
        return save
    argv = ["--tokenizer-model", paths["tokenizer"], "--data-path", paths.get("base",
                                                                              paths["pool"]),
            *learner_flags(args, args.base_iters), "--eval-interval", "0", "--log-interval", "50", "--seed", str(1000 + seed),
            "--no-progress", "--split", "100,1", "--save", save]
    run_distributed(pretrain_rank, 1, argv, timeout=args.run_timeout)
    return save


def steps_to_reach(curve, level: float, total: int) -> float:
    for iteration, loss in curve:
        if loss <= level:
            return iteration / total
    return float("inf")


def compute_to_reach(flops_curve, level: float, total_flops: float) -> float | None:
    """Analytic FLOPs (all roles) at the first evaluation at or below ``level``, over
    ``total_flops`` (uniform's whole run); inf if never, None if the log has no FLOPs."""
    if not total_flops or any(flops is None for flops, _ in flops_curve):
        return None
    for flops, loss in flops_curve:
        if loss <= level:
            return flops / total_flops
    return float("inf")


def loss_at_compute(flops_curve, budget: float) -> float | None:
    """Test loss of the last evaluation within ``budget`` FLOPs (all roles): the model the same
    compute buys; None if the log has no FLOPs or no evaluation fits the budget."""
    if not budget or any(flops is None for flops, _ in flops_curve):
        return None
    within = [loss for flops, loss in flops_curve if flops <= budget * (1 + 1e-9)]
    return within[-1] if within else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default="uniform,highloss,rho,blade,sketch-influence")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=25)
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
    p.add_argument("--base-iters", type=int, default=300)
    p.add_argument("--run-timeout", type=float, default=7200,
                   help="seconds one training run may take before it counts as hung")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished runs' logs in --workdir (same settings assumed)")
    p.add_argument("--method-flags", nargs=argparse.REMAINDER, default=[],
                   help="extra pretrain flags for every selecting method (last on the line)")
    args = p.parse_args()
    args.variants = {}
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        if not name or "--selection" not in flags:
            p.error(f'--variant {variant}: expected NAME="--selection METHOD ..."')
        args.variants[name] = flags.split()
    if args.regime == "domain-shift":
        args.size_mb = args.size_mb or 2.0
        paths = build_domain_shift_data(
            os.path.join(args.workdir, f"data_domain_shift_{args.size_mb:g}mb"), args.size_mb,
            args.vocab)
    else:
        args.size_mb = args.size_mb or 4.0
        paths = build_data(os.path.join(args.workdir, "data"), args.size_mb, args.vocab)
    methods = args.methods.split(",") + list(args.variants)
    results: dict = {m: {} for m in methods}
    for seed in args.seeds:
        base = (train_base(paths, seed, args, args.workdir) if args.regime != "scratch"
                else None)
        for method in methods:
            results[method][seed] = run_method(paths, method, seed, args, args.workdir, base)
            r = results[method][seed]
            print(f"seed {seed} {method:16s} test loss {r['final']:.4f}  "
                  f"bpb {r.get('test_bpb', float('nan')):.4f}  selection loss "
                  f"{r['selection_loss'] if r['selection_loss'] is not None else float('nan'):.4f}"
                  "  noise share "
                  f"{r['noise_share'] if r['noise_share'] is not None else float('nan'):.3f}  "
                  f"{r['seconds']:.0f}s", flush=True)

    summary = {"settings": {k: v for k, v in vars(args).items() if k != "workdir"}}
    for method in methods:
        runs = [results[method][s] for s in args.seeds]
        finals = [r["final"] for r in runs]
        summary[method] = {"test_loss": finals, "mean_test_loss": float(np.mean(finals)),
                           "selection_loss": [r["selection_loss"] for r in runs],
                           "noise_share": [r["noise_share"] for r in runs],
                           # whole test documents (tools/evaluate.py), tokenizer-independent
                           "test_bpb": [r.get("test_bpb") for r in runs],
                           "total_flops": [(r["flops"] or {}).get("total") for r in runs],
                           "median_step_time": [r["median_step_time"] for r in runs],
                           "seconds": [round(r["seconds"], 1) for r in runs]}
    if "uniform" in methods:
        for method in methods:
            steps, compute, time_ratio, matched = [], [], [], []
            for s in args.seeds:
                mine, uniform = results[method][s], results["uniform"][s]
                share = steps_to_reach(mine["curve"], uniform["final"], args.train_iters)
                steps.append(share)
                uniform_flops = (uniform["flops"] or {}).get("total")
                compute.append(compute_to_reach(mine["flops_curve"], uniform["final"],
                                                uniform_flops))
                matched.append(loss_at_compute(mine["flops_curve"], uniform_flops))
                time_ratio.append(share * mine["median_step_time"] / uniform["median_step_time"])
            summary[method].update(steps_to_uniform_final=steps,
                                   compute_to_uniform_final=compute,
                                   time_to_uniform_final=time_ratio,
                                   # the same GPU-hours as uniform's whole run
                                   test_loss_at_uniform_compute=matched)
    goals = {}
    if {"blade", "uniform"} <= set(methods):
        blade, uniform = summary["blade"], summary["uniform"]
        goals["blade_below_uniform_every_seed"] = all(
            b < u for b, u in zip(blade["test_loss"], uniform["test_loss"]))
        goals["blade_compute_ratio_le_0.75"] = all(
            r is not None and r <= 0.75 for r in blade["compute_to_uniform_final"])
        uniform_noise = np.mean([x for x in uniform["noise_share"] if x is not None] or [0.5])
        blade_noise = np.mean([x for x in blade["noise_share"] if x is not None] or [1.0])
        goals["blade_noise_lt_third_of_uniform"] = bool(blade_noise < uniform_noise / 3)
    if {"blade", "rho"} <= set(methods):
        goals["blade_below_rho_every_seed"] = all(
            b < r for b, r in zip(summary["blade"]["test_loss"], summary["rho"]["test_loss"]))
        if "uniform" in methods:  # None (nothing evaluated within the budget) counts as worse
            goals["blade_below_rho_at_uniform_compute_every_seed"] = all(
                b is not None and (r is None or b < r) for b, r in zip(
                    summary["blade"]["test_loss_at_uniform_compute"],
                    summary["rho"]["test_loss_at_uniform_compute"]))
    summary["goals"] = goals
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
