"""Gradient sketches and the influence scorer on 2 real gloo ranks.

One spawn builds a sketch-influence Trainer for each layout (TP1 x DP2, TP2, PP2) with the same
layout-independent weights, and returns the whole-model sketches of the same samples.  In the
DP2 layout it also records every torch.distributed collective issued while scoring a block.
"""

import functools

import numpy as np
import pytest

from blade_mega.testing import run_distributed

WORLD = 2
LAYOUTS = ((1, 1), (2, 1), (1, 2))
SAMPLES = 8
BLOCK = 16
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "send", "recv",
               "isend", "irecv")


def _argv(data):
    return ["--tokenizer-model", data.tokenizer_model, "--data-path", data.pool_prefix,
            "--target-data-path", data.target_prefix, "--model-size", "tiny",
            "--seq-length", "64", "--global-batch-size", "8", "--micro-batch-size", "2",
            "--train-iters", "1", "--eval-interval", "0", "--no-progress",
            "--selection", "sketch-influence"]


def _trainer(argv, tp=1, pp=1):
    from blade_mega.testing import trainer_in_rank

    return trainer_in_rank(argv, tp, pp)


def _recording_collectives(record):
    """Wrap torch.distributed's collectives so each call that reaches another rank records
    (name, numel) first. (Megatron's vocab-parallel loss also calls all_reduce on the 1-rank TP
    group at TP1: nothing leaves the rank.)"""
    import torch

    originals = {}
    for name in COLLECTIVES:
        original = getattr(torch.distributed, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def wrapped(*args, _name=name, _original=original, **kwargs):
            tensor = args[1] if _name == "all_gather" else args[0]
            if torch.distributed.get_world_size(kwargs.get("group")) > 1:
                record.append((_name, int(tensor.numel())))
            return _original(*args, **kwargs)

        originals[name] = original
        setattr(torch.distributed, name, wrapped)
    return originals


def _restore(originals):
    import torch

    for name, original in originals.items():
        setattr(torch.distributed, name, original)


def _sketch_rank(argv):
    from blade_mega import cpu_compat, parallel

    cpu_compat.install()
    parallel.init_distributed(1, 1)
    out = {}
    try:
        for tp, pp in LAYOUTS:
            trainer = _trainer(argv, tp, pp)
            hook = trainer.hook
            ids = trainer.train_data.ordered_ids(0, SAMPLES)
            partial = hook.sketcher.sketch(hook.read(hook.local_share(ids)))
            out[(tp, pp)] = hook.full_sketches(partial).numpy()
        # The DP2 trainer (TP1/PP1) is rebuilt last so nothing but the scorer communicates.
        trainer = _trainer(argv, 1, 1)
        hook = trainer.hook
        block = trainer.train_data.ordered_ids(100, BLOCK)
        for beta in (0.0, 0.5):
            hook.beta, hook.comm_bytes, hook.target_consumed = beta, 0, 0  # same V batch
            record = []
            originals = _recording_collectives(record)
            try:
                scores, gram = hook.block_scores(block)
            finally:
                _restore(originals)
            out[("collectives", beta)] = {"calls": record, "bytes": hook.comm_bytes,
                                          "scores": scores, "gram": gram}
        out["slot_floats"] = hook.sketcher.num_slots * hook.sketcher.slot_size
        out["params"] = sum(p.numel() for p in trainer.learner.module.parameters())
    finally:
        parallel.shutdown()
    return out


@pytest.fixture(scope="module")
def runs(demo_data):
    return run_distributed(_sketch_rank, WORLD, _argv(demo_data), timeout=400)


def test_sketches_are_equal_for_tp1_tp2_and_pp2(runs):
    reference = runs[0][(1, 1)]  # DP2: each rank sketched its share; gathered in order
    assert reference.shape[0] == SAMPLES and np.abs(reference).max() > 0
    for rank in range(WORLD):
        for layout in LAYOUTS:
            np.testing.assert_allclose(runs[rank][layout], reference, rtol=0,
                                       atol=1e-5 * np.abs(reference).max())


def test_scorer_collectives_carry_only_sketches_or_scores(runs):
    out = runs[0]
    slot_floats, local = out["slot_floats"], BLOCK // WORLD
    assert slot_floats * 5 < out["params"]  # a sketch is far smaller than a gradient
    plain = out[("collectives", 0.0)]
    # g_V's sketch summed over DP, then this rank's scores gathered.
    assert plain["calls"] == [("all_reduce", slot_floats), ("all_gather", local)]
    assert plain["bytes"] == 4 * (slot_floats + local)
    diverse = out[("collectives", 0.5)]
    assert diverse["calls"] == [("all_reduce", slot_floats), ("all_gather", local * slot_floats)]
    # Both ranks rank the block the same way, and both paths give the same scores.
    np.testing.assert_array_equal(out[("collectives", 0.0)]["scores"],
                                  runs[1][("collectives", 0.0)]["scores"])
    np.testing.assert_allclose(diverse["scores"], plain["scores"], rtol=1e-4,
                               atol=1e-6 * np.abs(plain["scores"]).max())
    assert diverse["gram"].shape == (BLOCK, BLOCK)
