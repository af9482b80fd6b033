"""The DeepSpeed config of a run: generated from the flags, or a ``--deepspeed-config`` file checked
against them.

Megatron's pipeline schedule owns the micro-batching and our flags own the batch, ZeRO stage,
precision, clipping and learning-rate schedule, so a file may not say otherwise: a value that
disagrees is refused with one line naming the key and the flag; a key the file leaves out is
filled in from the flags; everything else in the file (ZeRO bucket sizes, communication options,
the optimizer type, offload) is kept.
"""

from __future__ import annotations

import copy
import json

from blade_mega.engine.model_engine import deepspeed_config
from blade_mega.errors import UserError

_MISSING = object()


def _get(config: dict, keys: tuple, default=_MISSING):
    for key in keys:
        if not isinstance(config, dict) or key not in config:
            return default
        config = config[key]
    return config


def _set(config: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        config = config.setdefault(key, {})
    config[keys[-1]] = value


def load(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as err:
        raise UserError(f"{path}: cannot read DeepSpeed config ({err.strerror})")
    except ValueError as err:
        raise UserError(f"{path}: invalid JSON ({err}); fix the DeepSpeed config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object; fix the DeepSpeed config")
    return config


def merge(user: dict, ours: dict, path: str, *, global_batch_size: int, lr_flag: str = "--lr"
          ) -> dict:
    """``user`` with every value the run depends on checked against ``ours`` (from the flags)."""
    merged = copy.deepcopy(user)
    mbs = ours["train_micro_batch_size_per_gpu"]
    precision = "--bf16" if ours["bf16"]["enabled"] else "--fp32 (no --bf16)"
    # (keys, the flag or rule that decides the value, other values that mean the same)
    pinned = [
        (("train_micro_batch_size_per_gpu",), "--micro-batch-size", ()),
        (("gradient_accumulation_steps",),
         "Megatron's pipeline schedule, which accumulates the micro-batches itself (DeepSpeed "
         "must see 1)", ()),
        # A DeepSpeed user writes the global batch here; DeepSpeed itself sees one micro-batch
        # per data-parallel rank per backward.
        (("train_batch_size",), f"--global-batch-size {global_batch_size}",
         (global_batch_size,)),
        (("zero_optimization", "stage"), "--zero-stage", ()),
        (("bf16", "enabled"), precision, ()),
        (("gradient_clipping",), "--clip-grad", ()),
        (("optimizer", "params", "lr"), lr_flag, ()),
        (("optimizer", "params", "weight_decay"), "--weight-decay", ()),
    ]
    for keys, flag, same in pinned:
        want = _get(ours, keys)
        have = _get(user, keys)
        if have is not _MISSING and have != want and have not in same:
            raise UserError(f"{path}: {'.'.join(keys)} = {json.dumps(have)} conflicts with {flag}"
                            f" = {json.dumps(want)}; make them agree or drop the key")
        _set(merged, keys, want)
    if _get(user, ("fp16", "enabled"), False):
        raise UserError(f"{path}: fp16.enabled conflicts with {precision}: fp16 loss scaling is "
                        "not supported; drop the fp16 section (use --bf16)")
    if "scheduler" in user:
        raise UserError(f"{path}: 'scheduler' conflicts with --lr/--min-lr/--lr-warmup-iters, "
                        "which set the learning rate every step; drop the scheduler section")
    # Filled in where the file is silent: our optimizer, ZeRO options and logging defaults.
    if "type" not in merged["optimizer"]:
        merged["optimizer"]["type"] = ours["optimizer"]["type"]
    for key, value in ours["optimizer"]["params"].items():
        merged["optimizer"]["params"].setdefault(key, value)
    for key, value in ours["zero_optimization"].items():
        merged["zero_optimization"].setdefault(key, value)
    for key in ("zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown"):
        merged.setdefault(key, ours[key])
    return merged


def for_run(config, dp: int, offload: bool = False) -> dict:
    """The DeepSpeed config of one engine of this run (a ``RunConfig``; ``offload``: its
    optimizer state in host memory, the reference's with ``--reference-offload``)."""
    ours = deepspeed_config(
        micro_batch_size=config.data.micro_batch_size, dp=dp, lr=config.train.lr,
        zero_stage=config.parallel.zero_stage, weight_decay=config.train.weight_decay,
        clip_grad=config.train.clip_grad, bf16=config.model.bf16, offload_optimizer=offload)
    path = config.parallel.deepspeed_config
    if not path:
        return ours
    return merge(load(path), ours, path, global_batch_size=config.data.global_batch_size)
