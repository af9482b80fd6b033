"""The built-in selection methods: uniform, random, classifier, highloss, rho, blade,
sketch-influence.

Each is one ``MethodSpec`` (selection/registry.py); the rules below are the methods' own facts:
how many candidates a step reads, which engines they build, their defaults and refusals, and
their cost in model passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from blade_mega.errors import UserError
from blade_mega.selection.registry import EngineRole, MethodSpec, register

if TYPE_CHECKING:
    from blade_mega.config.run_config import RunConfig, SelectionConfig
    from blade_mega.engine.model import ModelSize


# -- the candidate-block rule (the one place --keep-ratio is read) ------------------------------
def kept_share(config: "RunConfig") -> float:
    """gamma: the kept share of the tokens (token level) or of the candidate block."""
    return config.selection.keep_ratio


def sample_block(config: "RunConfig") -> int:
    """A sample-level step scores ``global_batch / keep_ratio`` candidates and keeps a batch;
    token level scores the batch itself."""
    if config.selection.token_level:
        return config.data.global_batch_size
    return int(round(config.data.global_batch_size / kept_share(config)))


def kept_tokens_per_microbatch(config: "RunConfig") -> int:
    """Token level: the tokens of each micro-batch kept (its top ``keep_ratio`` share)."""
    return int(round(kept_share(config) * config.data.micro_batch_size * config.data.seq_length))


# -- engines ------------------------------------------------------------------------------------
def with_reference(config: "RunConfig", learner: "ModelSize") -> list[EngineRole]:
    """The learner and a reference of its size, or a proxy pair (u', w') scoring for it."""
    from blade_mega.engine.model import PRESETS

    selection = config.selection
    roles = [EngineRole("learner", learner, False)]
    if selection.proxy is not None:
        proxy = PRESETS[selection.proxy]
        return roles + [EngineRole("proxy", proxy, False),
                        EngineRole("proxy_reference", proxy, selection.reference_offload)]
    return roles + [EngineRole("reference", learner, selection.reference_offload)]


def rho_engines(config: "RunConfig", learner: "ModelSize") -> list[EngineRole]:
    """rho: a same-size reference, a small one of a preset that the learner scores against
    (RHO-LOSS's own), or with ``--rho-scorer proxy`` a proxy pair as blade's."""
    from blade_mega.engine.model import PRESETS

    selection = config.selection
    if selection.proxy is None or selection.rho_scorer == "proxy":
        return with_reference(config, learner)
    return [EngineRole("learner", learner, False),
            EngineRole("reference", PRESETS[selection.proxy], selection.reference_offload)]


# -- flag rules -----------------------------------------------------------------------------------
def sketch_dim_checks(config: "RunConfig") -> None:
    from blade_mega.sketch.sketcher import check_sketch_dim

    try:
        check_sketch_dim(config.selection.sketch_dim)
    except ValueError as err:
        raise UserError(f"--sketch-dim: {err}") from None


def excess_loss_checks(config: "RunConfig") -> None:
    if config.selection.diversity > 0:
        if config.selection.token_level:
            raise UserError("--selection-diversity chooses whole samples; use "
                            "--selection-granularity sample")
        sketch_dim_checks(config)  # the diversity term compares gradient sketches


def blade_checks(config: "RunConfig") -> None:
    excess_loss_checks(config)
    if config.parallel.zero_stage >= 2 and config.selection.lam > 0:
        raise UserError(
            "--zero-stage 2 with --selection blade and --blade-lambda > 0: each reference "
            "step runs the V batch and the selected batch (several micro-batches), which "
            "ZeRO-2 cannot accumulate; use --zero-stage 1 or --blade-lambda 0")


def rho_checks(config: "RunConfig") -> None:
    excess_loss_checks(config)
    if config.selection.rho_scorer == "proxy" and config.selection.proxy is None:
        raise UserError("--rho-scorer proxy scores with a small proxy pair: give its size with "
                        "--reference-model PRESET")


def classifier_checks(config: "RunConfig") -> None:
    if config.selection.token_level:
        raise UserError("--selection classifier scores whole documents; use "
                        "--selection-granularity sample")


def sketch_checks(config: "RunConfig") -> None:
    if config.selection.token_level:
        raise UserError("--selection sketch-influence scores whole samples; use "
                        "--selection-granularity sample")
    sketch_dim_checks(config)


def blade_reference_passes(config: "RunConfig") -> int:
    """blade's reference training over a run in training passes over B samples: each step
    trains on a V batch, and with lambda > 0 on a replayed batch of the learner's too (the
    first sync replays the warm-up's batches, none without warm-up)."""
    selection = config.selection
    syncs = selection.syncs(config.train.train_iters)
    if syncs <= 0:
        return 0
    replays = selection.lam > 0
    first = selection.first_ref_steps * (2 if replays and selection.warmup_steps > 0 else 1)
    return first + (syncs - 1) * selection.ref_steps * (2 if replays else 1)


def rho_reference(config: "RunConfig") -> "SelectionConfig":
    """rho: one sync (a static reference trained once on V, lambda 0). Its budget by default is
    blade's reference training in model passes (rho trains on V only: one pass per step); none
    when its weights are loaded (--rho-ref-load)."""
    selection = config.selection
    budget = selection.rho_ref_steps
    if budget is None:
        budget = blade_reference_passes(config)
    if selection.rho_ref_load:
        budget = 0
    return dataclasses.replace(selection, sync_interval=math.inf, ref_steps=0,
                               first_ref_steps=budget, lam=0.0, sync_beta=1.0)


# -- cost in learner training steps (a forward is 1/3; references counted at the learner's size) --
def scoring_cost(config: "RunConfig", models: int) -> float:
    if config.selection.token_level:  # the learner's losses come from its training forward
        return (models - 1) / 3
    return models / (3 * kept_share(config))


def highloss_cost(config: "RunConfig") -> float:
    return 1.0 + scoring_cost(config, 1)


def rho_cost(config: "RunConfig") -> float:
    return 1.0 + scoring_cost(config, 2)  # its one-off reference training is not per step


def blade_cost(config: "RunConfig") -> float:
    selection = config.selection
    training = selection.reference_steps_per_step * (2.0 if selection.lam > 0 else 1.0)
    return 1.0 + scoring_cost(config, 2) + training


def sketch_cost(config: "RunConfig") -> float:
    return 1.0 + (2 / kept_share(config) + 2) / 3


EXCESS = "blade_mega.selection.excess_loss"

UNIFORM = register(MethodSpec("uniform", "blade_mega.selection.uniform:UniformSelector"))
RANDOM = register(MethodSpec(
    "random", "blade_mega.selection.random_mask:RandomSelector", candidates=sample_block))
CLASSIFIER = register(MethodSpec(
    "classifier", "blade_mega.selection.classifier:ClassifierSelector", candidates=sample_block,
    check=classifier_checks))
HIGHLOSS = register(MethodSpec(
    "highloss", f"{EXCESS}:HighLossSelector", candidates=sample_block, check=excess_loss_checks,
    cost=highloss_cost))
RHO = register(MethodSpec(
    "rho", f"{EXCESS}:RhoSelector", needs_target=True, small_reference=True,
    candidates=sample_block, engines=rho_engines, resolve=rho_reference, check=rho_checks,
    cost=rho_cost))
BLADE = register(MethodSpec(
    "blade", f"{EXCESS}:BladeSelector", needs_target=True, proxy_pair=True,
    candidates=sample_block, engines=with_reference, check=blade_checks, cost=blade_cost))
SKETCH_INFLUENCE = register(MethodSpec(
    "sketch-influence", "blade_mega.selection.influence:SketchInfluenceSelector",
    needs_target=True, candidates=sample_block, check=sketch_checks, cost=sketch_cost))
BUILT_IN = (UNIFORM, RANDOM, CLASSIFIER, HIGHLOSS, RHO, BLADE, SKETCH_INFLUENCE)
