"""The run's configuration: the flags checked and resolved once into a frozen tree of sections.

``RunConfig.from_flags`` is the only reader of the flags' ``Namespace``; everything below the
config layer takes a ``RunConfig`` (or one section of it). Field names are the Megatron-LM
flags' dests, so a field is found by its flag. Checkpoints store ``to_dict()`` (versioned);
``from_checkpoint`` also reads the flag dict that checkpoints held before (``args``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

from blade_mega.engine.model import PRESETS, ModelSize
from blade_mega.errors import UserError

CONFIG_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    model_size: str                  # the preset the size started from
    size: ModelSize                  # the architecture, preset plus flag overrides
    tokenizer_model: Optional[str]
    vocab_size: Optional[int]        # without a tokenizer
    make_vocab_size_divisible_by: int
    init_method_std: float
    bf16: bool
    recompute_granularity: Optional[str]
    recompute_method: Optional[str]
    recompute_num_layers: Optional[int]
    sequence_parallel: bool


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    zero_stage: int
    deepspeed_config: Optional[str]
    distributed_timeout_minutes: float


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple
    split: str
    split_weights: tuple             # --split as numbers
    train_data_path: Optional[tuple]
    valid_data_path: Optional[tuple]
    data_cache_path: Optional[str]
    target_data_path: Optional[str]
    test_data_path: Optional[str]
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    seed: int
    reweight_mix: float              # share of a block drawn by the sidecar's keep rates
    noise_labels: Optional[str]
    # (defaults: configs saved before these fields existed load as before)
    sidecar_half_life: int = 0       # steps for a selection round's weight to halve; 0: never
    sidecar_prior: str = "none"      # keep rates before scoring: none (1/2) or classifier
    redraw_gap: int = 0              # steps a trained document is not drawn again; 0: off


@dataclass(frozen=True)
class TrainConfig:
    train_iters: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    weight_decay: float
    clip_grad: float
    exit_interval: int
    max_bad_steps: int


@dataclass(frozen=True)
class LogConfig:
    eval_interval: int
    eval_iters: int
    log_interval: int
    log_file: Optional[str]
    tensorboard_dir: Optional[str]
    no_progress: bool


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str]
    load: Optional[str]
    no_load_optim: bool
    finetune: bool
    save_interval: int
    keep_checkpoints: int
    trust_checkpoint: bool = False   # may unpickle beyond data (train/safe_load.py)


@dataclass(frozen=True)
class SelectionConfig:
    """The selection method and its settings, with the method's own defaults filled in."""
    method: str
    granularity: str               # "sample" | "token"
    keep_ratio: float              # gamma
    warmup_steps: int              # uniform steps before selection (and the first sync)
    # The reference rule (rho and blade).
    sync_interval: float           # T (inf: one sync, rho)
    ref_steps: int                 # K per later sync
    first_ref_steps: int           # K0 at the first sync (rho: its whole budget)
    lam: float                     # lambda of L_V + lambda L_train(alpha)
    sync_beta: float               # w <- (1 - beta) w + beta u at later syncs
    optimizer_state: str           # keep | reset | copy, at syncs that move w toward u
    reference_lr: Optional[float]  # None: the learner's schedule (own schedule for K0)
    proxy: Optional[str]           # preset of a proxy pair, or None (same-size reference)
    reference_offload: bool
    rho_ref_steps: Optional[int]   # as given; rho resolves it into first_ref_steps
    rho_ref_load: Optional[str]
    # Sketches (sketch-influence, and the diversity term of any sample-level selector).
    sketch_dim: int
    diversity: float
    # rho with a small reference: who scores, the learner ("learner") or a proxy u' ("proxy")
    rho_scorer: str = "learner"

    @property
    def token_level(self) -> bool:
        return self.granularity == "token"

    def syncs(self, train_iters: int) -> int:
        """Syncs of the reference over a run of ``train_iters`` steps."""
        return math.ceil(max(0, train_iters - self.warmup_steps) / self.sync_interval)

    @property
    def reference_steps_per_step(self) -> float:
        """Reference optimizer steps per learner step, after the first sync (K / T)."""
        return self.ref_steps / self.sync_interval


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    train: TrainConfig
    log: LogConfig
    checkpoint: CheckpointConfig
    selection: SelectionConfig
    dry_run: bool = False
    world_size: Optional[int] = None  # with dry_run: plan for this many ranks

    @property
    def method_spec(self):
        """The selection method's spec (selection/registry.py)."""
        from blade_mega.selection.registry import method_spec

        return method_spec(self.selection.method)

    # -- from the flags ---------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, flags: argparse.Namespace, check_files: bool = True) -> "RunConfig":
        """Check and resolve the flags (``check_files``: that the files they name exist)."""
        size = model_size(flags)
        model = _model_section(flags, size)
        parallel = ParallelConfig(
            tensor_model_parallel_size=flags.tensor_model_parallel_size,
            pipeline_model_parallel_size=flags.pipeline_model_parallel_size,
            zero_stage=flags.zero_stage, deepspeed_config=flags.deepspeed_config,
            distributed_timeout_minutes=flags.distributed_timeout_minutes)
        _check_architecture(flags, size)
        if flags.micro_batch_size < 1 or flags.global_batch_size < 1:
            raise UserError("--micro-batch-size and --global-batch-size must be positive")
        selection = _selection_section(flags, size)
        data = _data_section(flags, check_files)
        config = cls(
            model=model, parallel=parallel, data=data,
            train=TrainConfig(**_fields(TrainConfig, flags)),
            log=LogConfig(**_fields(LogConfig, flags)),
            checkpoint=CheckpointConfig(**_fields(CheckpointConfig, flags)),
            selection=selection, dry_run=bool(flags.dry_run), world_size=flags.world_size)
        spec = config.method_spec
        config = dataclasses.replace(config, selection=spec.resolve(config))
        spec.check(config)
        return config

    # -- checkpoints --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain values (lists, dicts, numbers, strings), with the format's version."""
        return {"version": CONFIG_VERSION, **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        version = values.get("version")
        if version != CONFIG_VERSION:
            raise UserError(f"run config version {version}: this build reads version "
                            f"{CONFIG_VERSION}; use the blade_mega that wrote the checkpoint")
        return cls(**{name: _section_from_dict(_SECTIONS[name], value) if name in _SECTIONS
                      else value for name, value in values.items() if name != "version"})

    def as_flags(self) -> dict:
        """Every resolved value by flag dest, sections flattened (the ``--dry-run`` view)."""
        flat: dict = {}
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                flat.update({k: v for k, v in _plain(dataclasses.asdict(value)).items()
                             if k != "size"})
            else:
                flat[section.name] = value
        return flat


def from_checkpoint(run_state: dict) -> RunConfig:
    """The config a checkpoint's run state was trained with: ``config`` (this format), or the
    flag dict ``args`` of checkpoints written before it (resolved as flags, no file checks)."""
    if "config" in run_state:
        return RunConfig.from_dict(run_state["config"])
    from blade_mega.config.flags import flag_defaults

    known = flag_defaults()
    flags = argparse.Namespace(**{**known, **{k: v for k, v in run_state["args"].items()
                                             if k in known}})
    for name in ("data_path", "train_data_path", "valid_data_path"):
        if getattr(flags, name) is not None:
            setattr(flags, name, list(getattr(flags, name)))
    return RunConfig.from_flags(flags, check_files=False)


# -- sections -------------------------------------------------------------------------------------
def model_size(flags: argparse.Namespace) -> ModelSize:
    base = PRESETS[flags.model_size]
    # A flag left unset (None, or False for on/off flags) keeps the preset's value.
    fields = {name: getattr(flags, name) for name in ModelSize.__dataclass_fields__
              if getattr(flags, name, None) is not None and getattr(flags, name) is not False}
    if getattr(flags, "disable_bias_linear", False):
        fields["add_bias_linear"] = False
    return ModelSize(**{**base.__dict__, **fields})


def _model_section(flags: argparse.Namespace, size: ModelSize) -> ModelConfig:
    """The model, and the device flags as resolved: bf16 by default with CUDA (--fp32 opts out),
    and in a --dry-run, which plans the cluster's run whatever machine it runs on; recompute
    flags as Megatron-LM checks them."""
    from blade_mega.engine.cpu_compat import cuda_available

    if flags.fp32 and flags.bf16:
        raise UserError("--bf16 and --fp32 contradict each other; give one")
    default_bf16 = True if flags.dry_run else cuda_available()
    bf16 = False if flags.fp32 else (default_bf16 if flags.bf16 is None else flags.bf16)
    method, layers = flags.recompute_method, flags.recompute_num_layers
    full = flags.recompute_granularity == "full"
    if not full and (method is not None or layers is not None):
        raise UserError("--recompute-method and --recompute-num-layers apply to "
                        "--recompute-granularity full; add it or drop them")
    if full:
        if layers is not None and layers < 1:
            raise UserError("--recompute-num-layers must be at least 1")
        method, layers = method or "uniform", layers or 1
    sequence_parallel = flags.sequence_parallel
    if sequence_parallel and flags.tensor_model_parallel_size == 1:
        # As Megatron-LM: nothing to shard over, so it is turned off (said once).
        import warnings

        warnings.warn("--sequence-parallel is off: it needs --tensor-model-parallel-size > 1")
        sequence_parallel = False
    if flags.seq_length > size.max_position_embeddings:
        raise UserError(f"--seq-length {flags.seq_length} is above the model's "
                        f"--max-position-embeddings {size.max_position_embeddings}; "
                        "shorten the sequences or enlarge the model's positions")
    return ModelConfig(
        model_size=flags.model_size, size=size, tokenizer_model=flags.tokenizer_model,
        vocab_size=flags.vocab_size,
        make_vocab_size_divisible_by=flags.make_vocab_size_divisible_by,
        init_method_std=flags.init_method_std, bf16=bool(bf16),
        recompute_granularity=flags.recompute_granularity, recompute_method=method,
        recompute_num_layers=layers, sequence_parallel=bool(sequence_parallel))


def _check_architecture(flags: argparse.Namespace, size: ModelSize) -> None:
    if size.hidden_size % size.num_attention_heads:
        raise UserError("--hidden-size must be divisible by --num-attention-heads")
    groups, tp = size.query_groups, flags.tensor_model_parallel_size
    if groups < 1 or size.num_attention_heads % groups:
        raise UserError(f"--num-query-groups {groups} must divide --num-attention-heads "
                        f"{size.num_attention_heads}")
    if groups % tp and size.num_attention_heads % tp == 0:  # else the heads' check says it
        raise UserError(f"--num-query-groups {groups} is not divisible by "
                        f"--tensor-model-parallel-size {tp}: each TP rank holds whole key/value "
                        "groups; use a multiple of it")
    if size.rotary_base <= 0:
        raise UserError(f"--rotary-base {size.rotary_base} must be positive")


# --reference-model auto aims the proxy pair at AUTO_PROXY_SHARE of the learner's transformer
# FLOPs per token and never spends more than AUTO_PROXY_MAX_SHARE: a proxy pair scored as well
# at small shares as at large ones while its cost grows with the share (docs/method.md, *Proxy
# pair*). How small a proxy can get before it ranks badly is not known.
AUTO_PROXY_SHARE = 1 / 16
AUTO_PROXY_MAX_SHARE = 1 / 4


def auto_reference_model(flags: argparse.Namespace, learner: ModelSize) -> str:
    """What ``--reference-model auto`` means for this learner: among the presets of its family
    (same norm and MLP kind) that cost at most AUTO_PROXY_MAX_SHARE of its transformer FLOPs per
    token and split over the run's TP and PP like the learner, the one whose share is nearest
    AUTO_PROXY_SHARE (by ratio); 'same' when none qualifies (a learner of tiny's size)."""
    from blade_mega.train.flops import forward_flops_per_token

    tp, pp = flags.tensor_model_parallel_size, flags.pipeline_model_parallel_size

    def share(size: ModelSize) -> float:  # the output layer depends on the vocab: left out
        return (forward_flops_per_token(size, 0, flags.seq_length)
                / forward_flops_per_token(learner, 0, flags.seq_length))

    fits = [(abs(math.log(share(size) / AUTO_PROXY_SHARE)), name)
            for name, size in PRESETS.items()
            if (size.normalization, size.swiglu) == (learner.normalization, learner.swiglu)
            and share(size) <= AUTO_PROXY_MAX_SHARE
            and size.num_attention_heads % tp == 0 and size.query_groups % tp == 0
            and size.num_layers % pp == 0]
    return min(fits)[1] if fits else "same"


def _selection_section(flags: argparse.Namespace, size: ModelSize) -> SelectionConfig:
    """The selection flags, checked; the method's own defaults are its spec's ``resolve``."""
    from blade_mega.selection.registry import method_spec

    spec = method_spec(flags.selection)
    keep_ratio = flags.keep_ratio
    if keep_ratio is None:
        keep_ratio = 0.6 if flags.selection_granularity == "token" else 0.5
    if not 0.0 < keep_ratio <= 1.0:
        raise UserError(f"--keep-ratio {keep_ratio} must be in (0, 1]")
    if not 0.0 <= flags.reweight_mix <= 1.0:
        raise UserError(f"--reweight-mix {flags.reweight_mix} must be in [0, 1]")
    if spec.needs_target and not flags.target_data_path:
        raise UserError(f"--selection {flags.selection} needs --target-data-path (the held-out "
                        "target set V as an indexed dataset prefix)")
    reference = flags.reference_model
    if reference not in ("auto", "same") and reference not in PRESETS:
        raise UserError(f"--reference-model {reference}: use 'auto', 'same' or one "
                        f"of {', '.join(sorted(PRESETS))}")
    if reference == "auto":
        reference = auto_reference_model(flags, size) if spec.proxy_pair else "same"
    if reference != "same" and not (spec.proxy_pair or spec.small_reference):
        sized = [name for name in _method_names()
                 if _spec(name).proxy_pair or _spec(name).small_reference]
        raise UserError(f"--reference-model PRESET (a small scorer) applies to --selection "
                        f"{' or '.join(sized)}")
    for flag, value in (("--blade-ref-steps", flags.blade_ref_steps),
                        ("--blade-first-ref-steps", flags.blade_first_ref_steps),
                        ("--rho-ref-steps", flags.rho_ref_steps)):
        if value is not None and value < 0:
            raise UserError(f"{flag} {value} must be >= 0")
    if flags.blade_sync_interval < 1:
        raise UserError(f"--blade-sync-interval {flags.blade_sync_interval} must be >= 1")
    if not 0.0 <= flags.blade_sync_beta <= 1.0:
        raise UserError(f"--blade-sync-beta {flags.blade_sync_beta} must be in [0, 1]")
    if flags.blade_lambda < 0:
        raise UserError(f"--blade-lambda {flags.blade_lambda} must be >= 0")
    if flags.reference_lr is not None and flags.reference_lr <= 0:
        raise UserError(f"--reference-lr {flags.reference_lr} must be positive")
    if flags.selection_diversity < 0:
        raise UserError(f"--selection-diversity {flags.selection_diversity} must be >= 0")
    k = flags.blade_ref_steps
    return SelectionConfig(
        method=flags.selection, granularity=flags.selection_granularity, keep_ratio=keep_ratio,
        warmup_steps=flags.selection_warmup_steps, sync_interval=flags.blade_sync_interval,
        ref_steps=k, first_ref_steps=k if flags.blade_first_ref_steps is None
        else flags.blade_first_ref_steps,
        lam=flags.blade_lambda, sync_beta=flags.blade_sync_beta,
        optimizer_state=flags.reference_optimizer_state, reference_lr=flags.reference_lr,
        proxy=None if reference == "same" else reference,
        reference_offload=flags.reference_offload, rho_ref_steps=flags.rho_ref_steps,
        rho_ref_load=flags.rho_ref_load, sketch_dim=flags.sketch_dim,
        diversity=flags.selection_diversity, rho_scorer=flags.rho_scorer)


def _data_section(flags: argparse.Namespace, check_files: bool) -> DataConfig:
    if flags.tokenizer_model is None and flags.vocab_size is None:
        raise UserError("give --tokenizer-model (a SentencePiece .model) or --vocab-size")
    if check_files and flags.tokenizer_model and not os.path.isfile(flags.tokenizer_model):
        raise UserError(f"{flags.tokenizer_model}: tokenizer model not found; train one with "
                        "tools/train_tokenizer.py")
    try:
        split_weights = tuple(float(x) for x in str(flags.split).split(","))
    except ValueError:
        raise UserError(f"--split {flags.split}: expected comma-separated numbers like 969,30,1")
    if not 1 <= len(split_weights) <= 3 or split_weights[0] <= 0 or \
            any(w < 0 for w in split_weights):
        raise UserError(f"--split {flags.split}: expected train,valid[,test] shares like 969,30,1 "
                        "with a positive train share")
    if flags.train_data_path is None and flags.valid_data_path is not None:
        raise UserError("--valid-data-path goes with --train-data-path (per-split blends)")
    if flags.train_data_path is not None and flags.data_path:
        raise UserError("give either --data-path (with --split) or --train-data-path "
                        "(and --valid-data-path), not both")
    for flag, value, zero in (("--sidecar-half-life", flags.sidecar_half_life, "never forget"),
                              ("--redraw-gap", flags.redraw_gap, "off")):
        if value < 0:
            raise UserError(f"{flag} {value} must be >= 0 steps (0: {zero})")

    if flags.sidecar_prior != "none" and flags.reweight_mix == 0:
        raise UserError(f"--sidecar-prior {flags.sidecar_prior} acts through the reweighted "
                        "share of each block, which --reweight-mix 0 turns off; give a mix > 0")

    def words(value):
        return None if value is None else tuple(value)

    return DataConfig(
        data_path=tuple(flags.data_path), split=str(flags.split), split_weights=split_weights,
        train_data_path=words(flags.train_data_path), valid_data_path=words(flags.valid_data_path),
        data_cache_path=flags.data_cache_path, target_data_path=flags.target_data_path,
        test_data_path=flags.test_data_path, seq_length=flags.seq_length,
        micro_batch_size=flags.micro_batch_size, global_batch_size=flags.global_batch_size,
        seed=flags.seed, reweight_mix=flags.reweight_mix, noise_labels=flags.noise_labels,
        sidecar_half_life=flags.sidecar_half_life, redraw_gap=flags.redraw_gap,
        sidecar_prior=flags.sidecar_prior)


def _fields(section, flags: argparse.Namespace) -> dict:
    return {f.name: getattr(flags, f.name) for f in dataclasses.fields(section)}


def _method_names() -> list[str]:
    from blade_mega.selection.registry import method_names

    return method_names()


def _spec(name: str):
    from blade_mega.selection.registry import method_spec

    return method_spec(name)


# -- plain values ---------------------------------------------------------------------------------
_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
             "train": TrainConfig, "log": LogConfig, "checkpoint": CheckpointConfig,
             "selection": SelectionConfig}
_TUPLES = {"data_path", "split_weights", "train_data_path", "valid_data_path"}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf"  # JSON has no infinity
    return value


def _section_from_dict(section, values: dict):
    out = {}
    for name, value in values.items():
        if name == "size":
            value = ModelSize(**value)
        elif name in _TUPLES and value is not None:
            value = tuple(value)
        elif value == "inf":
            value = math.inf
        out[name] = value
    return section(**out)
