"""Command-line flags (Megatron-LM names), an optional YAML file under them, and validation.

Precedence: built-in defaults < ``--config run.yaml`` < flags on the command line.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from blade_mega.errors import UserError
from blade_mega.engine.model import PRESETS, ModelSize

SELECTIONS = ("uniform", "highloss", "rho", "blade", "sketch-influence")


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
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--keep-checkpoints", type=int, default=2)

    g = p.add_argument_group("data selection")
    g.add_argument("--selection", default="uniform", choices=SELECTIONS)
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
                        "token, at most 1/4; else 'same')")
    g.add_argument("--reference-offload", action="store_true",
                   help="keep the reference's optimizer state in host memory (ZeRO-Offload)")
    g.add_argument("--rho-ref-steps", type=int, default=None,
                   help="rho's one-off reference training steps (default: blade's total budget)")
    g.add_argument("--rho-ref-load",
                   help="take rho's static reference weights from the reference/ saved in this "
                        "checkpoint directory (an iter_XXXXXXX/ of a rho or blade run)")
    g.add_argument("--reweight-mix", type=float, default=0.5,
                   help="share of each candidate block drawn by the sidecar's keep rates "
                        "(selectors that keep a sidecar; uniform always reads in order)")
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        # As defaults, so that flags on the command line still win over the file.
        parser.set_defaults(**load_yaml(first.config))
    args = parser.parse_args(argv)
    validate(args)
    return args


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


def model_size(args: argparse.Namespace) -> ModelSize:
    base = PRESETS[args.model_size]
    # A flag left unset (None, or False for on/off flags) keeps the preset's value.
    fields = {name: getattr(args, name) for name in ModelSize.__dataclass_fields__
              if getattr(args, name, None) is not None and getattr(args, name) is not False}
    if getattr(args, "disable_bias_linear", False):
        fields["add_bias_linear"] = False
    return ModelSize(**{**base.__dict__, **fields})


# --reference-model auto aims the proxy pair at AUTO_PROXY_SHARE of the learner's transformer
# FLOPs per token and never spends more than AUTO_PROXY_MAX_SHARE. Measured (README, proxy pair;
# shares of transformer FLOPs): a proxy pair beat the same-size reference per FLOP at every share
# we ran and scored as well at 0.02 as at 0.17 (6 x 256 learner: tiny 4.108, demo 4.110), while
# its cost grows with the share: compute to uniform's final loss 0.65-0.68x at 0.02 (tiny for
# 6 x 256), 0.78x at 0.06 (4 x 192), 0.99x at 0.14 (tiny for demo) and 0.99x at 0.17 (demo for
# 6 x 256). How small a proxy can get before it ranks badly we have not seen.
AUTO_PROXY_SHARE = 1 / 16
AUTO_PROXY_MAX_SHARE = 1 / 4


def auto_reference_model(args: argparse.Namespace, learner: ModelSize) -> str:
    """What ``--reference-model auto`` means for this learner: among the presets of its family
    (same norm and MLP kind) that cost at most AUTO_PROXY_MAX_SHARE of its transformer FLOPs per
    token and split over the run's TP and PP like the learner, the one whose share is nearest
    AUTO_PROXY_SHARE (by ratio); 'same' when none qualifies (a learner of tiny's size)."""
    from blade_mega.train.flops import forward_flops_per_token

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size

    def share(size: ModelSize) -> float:  # the output layer depends on the vocab: left out
        return (forward_flops_per_token(size, 0, args.seq_length)
                / forward_flops_per_token(learner, 0, args.seq_length))

    fits = [(abs(math.log(share(size) / AUTO_PROXY_SHARE)), name)
            for name, size in PRESETS.items()
            if (size.normalization, size.swiglu) == (learner.normalization, learner.swiglu)
            and share(size) <= AUTO_PROXY_MAX_SHARE
            and size.num_attention_heads % tp == 0 and size.query_groups % tp == 0
            and size.num_layers % pp == 0]
    return min(fits)[1] if fits else "same"


def validate(args: argparse.Namespace) -> None:
    """Checks that need no process group. Layout-dependent ones run after launch."""
    size = model_size(args)
    resolve_device_flags(args)
    if args.seq_length > size.max_position_embeddings:
        raise UserError(f"--seq-length {args.seq_length} is above the model's "
                        f"--max-position-embeddings {size.max_position_embeddings}; "
                        "shorten the sequences or enlarge the model's positions")
    if size.hidden_size % size.num_attention_heads:
        raise UserError("--hidden-size must be divisible by --num-attention-heads")
    groups, tp = size.query_groups, args.tensor_model_parallel_size
    if groups < 1 or size.num_attention_heads % groups:
        raise UserError(f"--num-query-groups {groups} must divide --num-attention-heads "
                        f"{size.num_attention_heads}")
    if groups % tp and size.num_attention_heads % tp == 0:  # else the heads' check says it
        raise UserError(f"--num-query-groups {groups} is not divisible by "
                        f"--tensor-model-parallel-size {tp}: each TP rank holds whole key/value "
                        "groups; use a multiple of it")
    if size.rotary_base <= 0:
        raise UserError(f"--rotary-base {size.rotary_base} must be positive")
    if args.micro_batch_size < 1 or args.global_batch_size < 1:
        raise UserError("--micro-batch-size and --global-batch-size must be positive")
    if args.keep_ratio is None:
        args.keep_ratio = 0.6 if args.selection_granularity == "token" else 0.5
    if not 0.0 < args.keep_ratio <= 1.0:
        raise UserError(f"--keep-ratio {args.keep_ratio} must be in (0, 1]")
    if not 0.0 <= args.reweight_mix <= 1.0:
        raise UserError(f"--reweight-mix {args.reweight_mix} must be in [0, 1]")
    if args.selection in ("rho", "blade", "sketch-influence") and not args.target_data_path:
        raise UserError(f"--selection {args.selection} needs --target-data-path (the held-out "
                        "target set V as an indexed dataset prefix)")
    if args.reference_model not in ("auto", "same") and args.reference_model not in PRESETS:
        raise UserError(f"--reference-model {args.reference_model}: use 'auto', 'same' or one "
                        f"of {', '.join(sorted(PRESETS))}")
    if args.reference_model == "auto":
        args.reference_model = (auto_reference_model(args, size) if args.selection == "blade"
                                else "same")
    if args.reference_model != "same" and args.selection != "blade":
        raise UserError("--reference-model PRESET (a proxy pair) applies to --selection blade")
    selection_config(args)  # the selection flags' own checks
    if args.tokenizer_model is None and args.vocab_size is None:
        raise UserError("give --tokenizer-model (a SentencePiece .model) or --vocab-size")
    if args.tokenizer_model and not os.path.isfile(args.tokenizer_model):
        raise UserError(f"{args.tokenizer_model}: tokenizer model not found; train one with "
                        "tools/train_tokenizer.py")
    try:
        args.split_weights = tuple(float(x) for x in str(args.split).split(","))
    except ValueError:
        raise UserError(f"--split {args.split}: expected comma-separated numbers like 969,30,1")
    if not 1 <= len(args.split_weights) <= 3 or args.split_weights[0] <= 0 or \
            any(w < 0 for w in args.split_weights):
        raise UserError(f"--split {args.split}: expected train,valid[,test] shares like 969,30,1 "
                        "with a positive train share")
    if args.train_data_path is None and args.valid_data_path is not None:
        raise UserError("--valid-data-path goes with --train-data-path (per-split blends)")
    if args.train_data_path is not None and args.data_path:
        raise UserError("give either --data-path (with --split) or --train-data-path "
                        "(and --valid-data-path), not both")


def resolve_device_flags(args: argparse.Namespace) -> None:
    """bf16 by default with CUDA (--fp32 opts out); recompute flags as Megatron-LM checks them."""
    from blade_mega.engine.cpu_compat import cuda_available

    if args.fp32 and args.bf16:
        raise UserError("--bf16 and --fp32 contradict each other; give one")
    args.bf16 = False if args.fp32 else (cuda_available() if args.bf16 is None else args.bf16)
    full = args.recompute_granularity == "full"
    if not full and (args.recompute_method is not None or args.recompute_num_layers is not None):
        raise UserError("--recompute-method and --recompute-num-layers apply to "
                        "--recompute-granularity full; add it or drop them")
    if full:
        if args.recompute_num_layers is not None and args.recompute_num_layers < 1:
            raise UserError("--recompute-num-layers must be at least 1")
        args.recompute_method = args.recompute_method or "uniform"
        args.recompute_num_layers = args.recompute_num_layers or 1
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        # As Megatron-LM: nothing to shard over, so it is turned off (said once).
        import warnings

        warnings.warn("--sequence-parallel is off: it needs --tensor-model-parallel-size > 1")
        args.sequence_parallel = False


def check_layout(args: argparse.Namespace, dp: int) -> int:
    """Batch arithmetic for this layout; returns micro-batches per step per DP rank."""
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                        f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}; "
                        f"use a multiple of {per_step}")
    return args.global_batch_size // per_step


@dataclass(frozen=True)
class SelectionConfig:
    """Everything a selection hook reads of the flags, resolved once (``selection_config``)."""
    method: str
    granularity: str               # "sample" | "token"
    keep_ratio: float              # gamma
    warmup_steps: int              # uniform steps before selection (and the first sync)
    global_batch: int
    micro_batch: int
    seq_length: int
    train_iters: int
    seed: int
    zero_stage: int
    # The learner's schedule, which the reference follows by default.
    lr: float
    min_lr: float
    lr_warmup_iters: int
    # The reference rule (rho and blade).
    sync_interval: float           # T (inf: one sync, rho)
    ref_steps: int                 # K per later sync
    first_ref_steps: int           # K0 at the first sync (rho: its whole budget)
    lam: float                     # lambda of L_V + lambda L_train(alpha)
    sync_beta: float               # w <- (1 - beta) w + beta u at later syncs
    optimizer_state: str           # keep | reset | copy, at syncs that move w toward u
    reference_lr: Optional[float]  # None: the learner's schedule (own schedule for K0)
    proxy: Optional[str]           # preset of a proxy pair, or None
    reference_offload: bool
    rho_ref_load: Optional[str]
    # Sketches (sketch-influence, and the diversity term of any sample-level selector).
    sketch_dim: int
    diversity: float

    @property
    def token_level(self) -> bool:
        return self.granularity == "token"

    def syncs(self) -> int:
        """Syncs over the run (blade's rule)."""
        return math.ceil(max(0, self.train_iters - self.warmup_steps) / self.sync_interval)


def blade_reference_passes(ref_steps: int, first_ref_steps: int, lam: float, syncs: int,
                           warmup_steps: int) -> int:
    """blade's reference training over a run in training passes over B samples: each step
    trains on a V batch, and with lambda > 0 on a replayed batch of the learner's too (the
    first sync replays the warm-up's batches, none without warm-up)."""
    if syncs <= 0:
        return 0
    first = first_ref_steps * (2 if lam > 0 and warmup_steps > 0 else 1)
    return first + (syncs - 1) * ref_steps * (2 if lam > 0 else 1)


def selection_config(args: argparse.Namespace) -> SelectionConfig:
    """The selection flags, checked and resolved; rho's default budget is blade's reference
    training in model passes (rho trains on V only: one pass per step)."""
    for flag, value in (("--blade-ref-steps", args.blade_ref_steps),
                        ("--blade-first-ref-steps", args.blade_first_ref_steps),
                        ("--rho-ref-steps", args.rho_ref_steps)):
        if value is not None and value < 0:
            raise UserError(f"{flag} {value} must be >= 0")
    if args.blade_sync_interval < 1:
        raise UserError(f"--blade-sync-interval {args.blade_sync_interval} must be >= 1")
    if not 0.0 <= args.blade_sync_beta <= 1.0:
        raise UserError(f"--blade-sync-beta {args.blade_sync_beta} must be in [0, 1]")
    if args.blade_lambda < 0:
        raise UserError(f"--blade-lambda {args.blade_lambda} must be >= 0")
    if args.reference_lr is not None and args.reference_lr <= 0:
        raise UserError(f"--reference-lr {args.reference_lr} must be positive")
    if args.selection_diversity < 0:
        raise UserError(f"--selection-diversity {args.selection_diversity} must be >= 0")
    if args.selection_diversity > 0 and args.selection in ("rho", "blade", "highloss") and \
            args.selection_granularity != "sample":
        raise UserError("--selection-diversity chooses whole samples; use "
                        "--selection-granularity sample")
    keep_ratio = args.keep_ratio if args.keep_ratio is not None else (
        0.6 if args.selection_granularity == "token" else 0.5)
    k = args.blade_ref_steps
    k0 = k if args.blade_first_ref_steps is None else args.blade_first_ref_steps
    common = dict(
        method=args.selection, granularity=args.selection_granularity, keep_ratio=keep_ratio,
        warmup_steps=args.selection_warmup_steps, global_batch=args.global_batch_size,
        micro_batch=args.micro_batch_size, seq_length=args.seq_length,
        train_iters=args.train_iters, seed=args.seed, zero_stage=args.zero_stage, lr=args.lr,
        min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters,
        optimizer_state=args.reference_optimizer_state, reference_lr=args.reference_lr,
        reference_offload=args.reference_offload, rho_ref_load=args.rho_ref_load,
        sketch_dim=args.sketch_dim, diversity=args.selection_diversity)
    if args.selection == "rho":
        budget = args.rho_ref_steps
        if budget is None:
            syncs = math.ceil(max(0, args.train_iters - args.selection_warmup_steps)
                              / args.blade_sync_interval)
            budget = blade_reference_passes(k, k0, args.blade_lambda, syncs,
                                            args.selection_warmup_steps)
        if args.rho_ref_load:
            budget = 0
        return SelectionConfig(**common, sync_interval=math.inf, ref_steps=0,
                               first_ref_steps=budget, lam=0.0, sync_beta=0.0, proxy=None)
    proxy = None if args.reference_model == "same" else args.reference_model
    return SelectionConfig(**common, sync_interval=args.blade_sync_interval, ref_steps=k,
                           first_ref_steps=k0, lam=args.blade_lambda,
                           sync_beta=args.blade_sync_beta, proxy=proxy)
