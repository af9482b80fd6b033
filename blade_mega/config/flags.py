"""Command-line flags (Megatron-LM names) and an optional YAML file under them: the words a user
types, parsed into an ``argparse.Namespace`` that only ``config/run_config.py`` reads.

Precedence: built-in defaults < ``--config run.yaml`` < flags on the command line.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from blade_mega.engine.model import PRESETS
from blade_mega.errors import UserError
from blade_mega.selection.registry import method_names


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blade-pretrain", exit_on_error=exit_on_error,
        description="Pretrain a Megatron-Core GPT with DeepSpeed ZeRO and online data selection.")
    p.add_argument("--config", help="YAML file of flag values (keys as flags, - or _); flags win")
    # The deepspeed launcher appends --local_rank unless given --no_local_rank; ranks come from
    # the environment (blade_mega/engine/parallel.py), so it is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parallel layout and memory plan, then exit")
    p.add_argument("--world-size", type=int,
                   help="with --dry-run: plan for this many ranks (TP x PP x DP) without "
                        "launching them")

    g = p.add_argument_group("model")
    g.add_argument("--model-size", default="tiny", choices=sorted(PRESETS))
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
                 "--max-position-embeddings"):
        g.add_argument(flag, type=int, help="override the preset")
    g.add_argument("--tokenizer-model", help="SentencePiece model; sets the vocab size")
    g.add_argument("--vocab-size", type=int, help="vocab size when no --tokenizer-model is given")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 weights and compute (the default with CUDA; --fp32 opts out)")

    g = p.add_argument_group("architecture", "Megatron-LM's flags; unset ones keep the preset's "
                             "(the -llama presets set RMSNorm, SwiGLU, no biases and GQA)")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"))
    g.add_argument("--swiglu", action="store_true", help="gated SiLU MLP (Llama's) instead of GELU")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="no biases in the linear layers (Llama)")
    g.add_argument("--num-query-groups", type=int,
                   help="grouped-query attention: key/value heads shared by groups of query heads "
                        "(applies with or without --group-query-attention)")
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted for Megatron-LM command lines; --num-query-groups decides")
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute"))
    g.add_argument("--rotary-base", type=int, help="RoPE base theta (default 10000)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="accepted for Megatron-LM command lines: embeddings and output layer are "
                        "always separate weights here (so pipeline stages share no gradient)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--zero-stage", type=int, default=1)
    g.add_argument("--deepspeed-config", help="DeepSpeed JSON; replaces the generated one")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="collective timeout: a dead rank ends the job after this long")

    g = p.add_argument_group("speed and memory (Megatron-Core's; GPUs)")
    g.add_argument("--fp32", action="store_true", help="fp32 weights and compute, even with CUDA")
    g.add_argument("--recompute-granularity", choices=("selective", "full"),
                   help="activation recompute: 'selective' recomputes core attention, 'full' "
                        "whole layers (see --recompute-method)")
    g.add_argument("--recompute-method", choices=("uniform", "block"),
                   help="with --recompute-granularity full: 'uniform' recomputes every "
                        "--recompute-num-layers-layer chunk, 'block' the first N layers of each "
                        "stage (default uniform)")
    g.add_argument("--recompute-num-layers", type=int,
                   help="with --recompute-granularity full: layers per chunk (uniform) or "
                        "layers recomputed per stage (block); default 1")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard LayerNorm and dropout activations over the TP ranks (needs TP > 1 "
                        "and NCCL)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[],
                   help="prefix, 'p1 p2 ...' (weighted by size) or 'w1 p1 w2 p2 ...'")
    g.add_argument("--split", default="98,2",
                   help="train,valid[,test] document shares of --data-path, as Megatron-LM")
    g.add_argument("--train-data-path", nargs="+", default=None,
                   help="the training blend, instead of --data-path and --split")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="the validation blend (with --train-data-path)")
    g.add_argument("--data-cache-path",
                   help="where the sample index files are built once (by rank 0) and read by "
                        "every rank (default: <directory of the first dataset>/cache)")
    g.add_argument("--target-data-path", help="held-out target set V (indexed dataset prefix)")
    g.add_argument("--test-data-path",
                   help="held-out test set of the target distribution, never trained or selected "
                        "on: the honest measure (logged as test_loss)")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=10)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--exit-interval", type=int, default=0,
                   help="stop (and save) once the iteration is a multiple of this")
    g.add_argument("--max-bad-steps", type=int, default=3,
                   help="stop after this many consecutive non-finite losses")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-file", help="JSON-lines log (default: <save>/log.jsonl)")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--no-load-optim", action="store_true",
                   help="with --load: do not load the optimizer state (needed to resume with "
                        "another data-parallel size; weights, data position and sidecar carry over)")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: take only the model weights (continued pretraining); "
                        "iteration, optimizer, data order and selection state start fresh")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="--load (and --rho-ref-load) may unpickle what a checkpoint of this "
                        "version never holds, which can run code: only for checkpoints you "
                        "trust, such as one written before checkpoint format 2 (also: "
                        "BLADE_TRUST_CHECKPOINT=1)")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--keep-checkpoints", type=int, default=2)

    g = p.add_argument_group("data selection")
    g.add_argument("--selection", default="uniform", choices=method_names(),
                   help="the selection method (registered in selection/methods.py)")
    g.add_argument("--selection-granularity", default="sample", choices=("token", "sample"))
    g.add_argument("--keep-ratio", type=float, default=None,
                   help="gamma: kept share of tokens (token level, default 0.6) or of the "
                        "candidate block (sample level, default 0.5)")
    g.add_argument("--selection-warmup-steps", type=int, default=0,
                   help="uniform steps before selection starts (and before blade's first sync)")
    g.add_argument("--blade-sync-interval", type=int, default=20, help="T: steps between w <- u")
    # Defaults: the best blade measured at equal compute (docs/method.md, *Sweeps*).
    g.add_argument("--blade-ref-steps", type=int, default=16, help="K: reference steps per sync")
    g.add_argument("--blade-lambda", type=float, default=0.0,
                   help="weight of the selected training loss in the reference objective "
                        "(0: w trains on V alone, which measured best at equal compute)")
    g.add_argument("--blade-first-ref-steps", type=int, default=None,
                   help="K0: reference steps of the first sync, the warm start (default: K)")
    g.add_argument("--blade-sync-beta", type=float, default=0.25,
                   help="partial sync after the first: w <- (1 - beta) w + beta u (1: BLADE's "
                        "full re-sync; 0: never re-synced, w keeps training on its objective)")
    g.add_argument("--reference-optimizer-state", default="keep",
                   choices=("keep", "reset", "copy"),
                   help="the reference's Adam state at a sync: keep its own, reset it, or copy "
                        "the learner's (moments, step count and fp32 masters, per ZeRO partition)")
    g.add_argument("--reference-lr", type=float, default=None,
                   help="the reference's learning rate (default: the learner's schedule at the "
                        "current step; rho's budget and the first sync: their own warm-up and "
                        "cosine decay to --min-lr, peaking at this or --lr)")
    g.add_argument("--reference-model", default="auto",
                   help="blade's scorer: 'same' (w has the learner's architecture), a preset "
                        "name (a small proxy pair u'/w' scores instead), or 'auto' (the preset "
                        "of the learner's family nearest 1/16 of its transformer FLOPs per "
                        "token, at most 1/4; else 'same'). rho: 'auto' is 'same'; a preset is "
                        "its static reference's size (see --rho-scorer)")
    g.add_argument("--reference-offload", action="store_true",
                   help="keep the reference's optimizer state in host memory (ZeRO-Offload)")
    g.add_argument("--rho-ref-steps", type=int, default=None,
                   help="rho's one-off reference training steps (default: blade's total budget)")
    g.add_argument("--rho-scorer", default="learner", choices=("learner", "proxy"),
                   help="rho with --reference-model PRESET: 'learner' scores its own loss "
                        "against the small reference (RHO-LOSS's setting); 'proxy' scores with "
                        "a small proxy learner u' trained on the selected batches, as blade's "
                        "pair (its reference w' is copied from u' once, then trained on V)")
    g.add_argument("--rho-ref-load",
                   help="take rho's static reference weights from the reference/ saved in this "
                        "checkpoint directory (an iter_XXXXXXX/ of a rho or blade run)")
    g.add_argument("--reweight-mix", type=float, default=0.5,
                   help="share of each candidate block drawn by the sidecar's keep rates "
                        "(selectors that keep a sidecar; uniform always reads in order)")
    g.add_argument("--sidecar-half-life", type=int, default=0, metavar="STEPS",
                   help="the sidecar forgets: a selection round's weight in its counts (and so "
                        "in the keep rates) halves every STEPS steps (0: counts never forget)")
    g.add_argument("--sidecar-prior", choices=("none", "classifier"), default="none",
                   help="what a document's keep rate is before it is scored: none (1/2), or "
                        "classifier: its P(target) from the static classifier's scores beside "
                        "each --data-path dataset (tools/score_documents.py), a prior worth two "
                        "selection rounds")
    g.add_argument("--redraw-gap", type=int, default=0, metavar="STEPS",
                   help="the reweighted share draws no sample whose main document was trained "
                        "in the last STEPS steps (0: off)")
    g.add_argument("--noise-labels", help="meta.jsonl with a 'noise' key per document, to log "
                                          "the share of each noise type kept (demo corpus)")
    g.add_argument("--sketch-dim", type=int, default=64,
                   help="sketch-influence: each layer's gradient sketch is k x k (k <= 8 or a "
                        "multiple of 8), made of Kronecker blocks of side gcd(k, 16) (gcd(k, 8) "
                        "for the output layer); projection cost grows as k^2")
    g.add_argument("--selection-diversity", type=float, default=0.0,
                   help="beta: greedy top-k that subtracts beta * <S g_i, S g_j> against samples "
                        "already chosen (sketch-influence, and blade/rho at sample level: "
                        "sketches of the scorer's per-sample gradients)")
    return p


def _dest(key: str) -> str:
    return key.replace("-", "_")


def parse_flags(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags as given (YAML under the command line), not yet checked or resolved."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        # As defaults, so that flags on the command line still win over the file.
        parser.set_defaults(**load_yaml(first.config))
    return parser.parse_args(argv)


def flag_defaults() -> dict:
    """Every flag's default, by dest (what a checkpoint written before a flag existed meant)."""
    return {action.dest: action.default for action in build_parser()._actions
            if action.dest != "help"}


def load_yaml(path: str) -> dict:
    """The file's values by dest, converted and checked as the same flags on the command line."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read config ({err.strerror}); check the --config path")
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML ({str(err).splitlines()[0]}); fix the file")
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    # A parser that raises instead of exiting, so a bad value can name the file and the key.
    checker = build_parser(exit_on_error=False)
    actions = {action.dest: action for action in checker._actions}
    out = {}
    for key, value in values.items():
        dest = _dest(str(key))
        if dest not in actions or dest == "config":
            raise UserError(f"{path}: unknown key '{key}'; use flag names, e.g. micro-batch-size")
        try:
            out[dest] = _flag_value(checker, actions[dest], value)
        except argparse.ArgumentError as err:
            raise UserError(f"{path}: {key}: {err.message}; fix the file")
    return out


def _flag_value(checker: argparse.ArgumentParser, action: argparse.Action, value) -> object:
    """What `action.dest` gets from the same flag on the command line, given this YAML value."""
    if action.nargs == 0:
        # A store_true flag takes no word, so the key's YAML boolean is the value itself;
        # that way the file can say false too.
        if not isinstance(value, bool):
            raise argparse.ArgumentError(action, f"expected true or false, not {value!r}")
        return value
    # The words that would follow the flag: one per list item. Null gives none, which argparse
    # reports as a flag missing its value.
    words = [] if value is None else value if isinstance(value, list) else [value]
    if any(word is None or isinstance(word, (list, dict)) for word in words):
        raise argparse.ArgumentError(action, f"expected a value or a list, not {value!r}")
    parsed, extra = checker.parse_known_args([action.option_strings[0], *map(str, words)])
    if extra:  # a list given to a one-value flag
        raise argparse.ArgumentError(action, f"expected one value, not {value!r}")
    return getattr(parsed, action.dest)
