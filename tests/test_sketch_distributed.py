"""Gradient sketches and the influence scorer on 2 real gloo ranks.

One spawn builds a sketch-influence Trainer for each layout (TP1 x DP2, TP2, PP2) with the same
layout-independent weights, and returns the whole-model sketches of the same samples.  In the
DP2 layout it also records every torch.distributed collective issued while scoring a block.
Another spawn trains sketch-influence runs (straight, and stopped + resumed) to check its
sidecar, noise statistics and checkpoints.
"""

import functools
import json
import os

import numpy as np
import pytest
import torch

from blade_mega.data.sidecar import EXCESS_SUM, KEPT, SCORED, SUFFIX
from blade_mega.testing import in_rank, run_distributed, trainer_in_rank

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
    from blade_mega.sketch.whole import whole_sketches

    out = {}
    with in_rank():
        for tp, pp in LAYOUTS:
            trainer = trainer_in_rank(argv, tp, pp)
            hook = trainer.hook
            ids = trainer.train_data.ordered_ids(0, SAMPLES)
            partial = hook.sketcher.sketch(hook.read(hook.local_share(ids)))
            out[(tp, pp)] = whole_sketches(partial, hook.sketcher, hook.groups).cpu().numpy()
        # The DP2 trainer (TP1/PP1) is rebuilt last so nothing but the scorer communicates.
        trainer = trainer_in_rank(argv, 1, 1)
        hook = trainer.hook
        block = trainer.train_data.ordered_ids(100, BLOCK)
        for beta in (0.0, 0.5):
            hook.beta, hook.target_consumed = beta, 0  # same V batch
            hook.groups.take_sent_bytes()
            record = []
            originals = _recording_collectives(record)
            try:
                scores, gram = hook.block_scores(block)
            finally:
                _restore(originals)
            out[("collectives", beta)] = {"calls": record, "bytes": hook.groups.take_sent_bytes(),
                                          "scores": scores, "gram": gram}
        out["slot_floats"] = hook.sketcher.num_slots * hook.sketcher.slot_size
        out["params"] = sum(p.numel() for p in trainer.learner.module.parameters())
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


# -- training runs: the sidecar, noise statistics and checkpoints --------------------------------
STEPS = 4
WARMUP = 1
BATCH = 8


def _train_argv(data):
    # --reweight-mix: blocks depend on the sidecar, so a resume that lost it would draw others.
    return _argv(data) + ["--train-iters", str(STEPS), "--selection-warmup-steps", str(WARMUP),
                          "--log-interval", "1", "--noise-labels", data.pool_meta,
                          "--reweight-mix", "0.25"]


def _record_steps(hook):
    """Wrap the hook so each selecting step keeps its block, scores, this rank's kept ids and
    the statistics after_step returned."""
    steps = []
    block_scores, select, after_step = hook.block_scores, hook.select, hook.after_step

    def recording_scores(block_ids):
        scores, gram = block_scores(block_ids)
        steps.append({"block": block_ids.copy(), "scores": scores.copy()})
        return scores, gram

    def recording_select(step, block_ids):
        batch = select(step, block_ids)
        if step >= WARMUP:
            steps[-1]["kept"] = batch.ids.copy()
        return batch

    def recording_after_step(step, batch, lr):
        stats = after_step(step, batch, lr)
        if step >= WARMUP:
            steps[-1]["stats"] = stats.values
        return stats

    hook.block_scores, hook.select, hook.after_step = (recording_scores, recording_select,
                                                       recording_after_step)
    return steps


def _training_rank(argv, full, split, uniform):
    out = {}
    with in_rank():
        trainer = trainer_in_rank(argv + ["--save", full, "--log-file", full + ".jsonl"])
        steps = _record_steps(trainer.hook)
        trainer.train()
        for row in steps:  # main document of each candidate (one dataset: part 0)
            [(_, where, documents)] = trainer.train_data.main_documents(row["block"])
            row["documents"] = np.empty_like(documents)
            row["documents"][where] = documents
        out["steps"] = steps
        out["table"] = trainer.hook.ctx.record.sidecars[0].dense_table()
        trainer_in_rank(argv + ["--save", split, "--exit-interval", "2"]).train()
        resumed = trainer_in_rank(argv + ["--load", split, "--save", split])
        resumed.checkpointer.load()
        out["restored"] = resumed.hook.ctx.record.sidecars[0].dense_table()
        out["restored_target_consumed"] = resumed.hook.target_consumed
        resumed.train()  # loads the same checkpoint again, then runs steps 2 and 3
        trainer_in_rank(argv + ["--selection", "uniform", "--train-iters", "1",
                         "--save", uniform]).train()
    return out


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sketch_runs")
    dirs = {name: str(root / name) for name in ("full", "split", "uniform")}
    ranks = run_distributed(_training_rank, WORLD, _train_argv(demo_data), dirs["full"],
                            dirs["split"], dirs["uniform"], timeout=600)
    return {"ranks": ranks, "sidecar": os.path.basename(demo_data.pool_prefix) + SUFFIX,
            "meta": demo_data.pool_meta, **dirs}


def _selecting_steps(ranks):
    """Rank 0's records with both ranks' kept shares joined (the blocks are the same)."""
    rows = []
    for first, second in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert np.array_equal(first["block"], second["block"])
        rows.append(dict(first, kept=np.isin(first["block"],
                                             np.concatenate([first["kept"], second["kept"]]))))
    return rows


def test_sidecar_counts_exactly_the_scored_and_kept_candidates(trained):
    rows = _selecting_steps(trained["ranks"])
    assert len(rows) == STEPS - WARMUP
    table = trained["ranks"][0]["table"]
    scored, kept, score_sum = (np.zeros(len(table)) for _ in range(3))
    for row in rows:
        assert np.isfinite(row["scores"]).all() and row["kept"].sum() == BATCH
        np.add.at(scored, row["documents"], 1.0)
        np.add.at(kept, row["documents"], row["kept"])
        np.add.at(score_sum, row["documents"], row["scores"])
    assert scored.sum() == BLOCK * len(rows) and kept.sum() == BATCH * len(rows)
    assert np.array_equal(table[:, SCORED], scored)
    assert np.array_equal(table[:, KEPT], kept)
    # The score column holds influence: the scores the selector ranked by, summed per document.
    scale = np.abs(score_sum).max()
    assert scale > 0
    np.testing.assert_allclose(table[:, EXCESS_SUM], score_sum, rtol=1e-5, atol=1e-6 * scale)
    assert np.array_equal(trained["ranks"][1]["table"], table)  # every rank holds the same table


def test_selecting_steps_log_kept_fraction_influence_and_noise_stats(trained):
    with open(trained["meta"]) as f:
        noise = np.array([json.loads(line)["noise"] for line in f])
    with open(trained["full"] + ".jsonl") as f:
        logged = {r["iteration"]: r for r in map(json.loads, f) if r["kind"] == "train"}
    rows = _selecting_steps(trained["ranks"])
    for row in rows:
        stats, labels, kept = row["stats"], noise[row["documents"]], row["kept"]
        assert stats["kept_fraction"] == BATCH / BLOCK
        assert stats["influence_kept"] > stats["influence_dropped"]
        assert set(stats["trained_share"]) == set(noise) and len(set(labels)) >= 2
        for name in set(labels):
            of_type = labels == name
            assert stats["noise_kept_rate"][name] == pytest.approx(kept[of_type].mean())
            assert stats["trained_share"][name] == pytest.approx(kept[of_type].sum() / BATCH)
    # The same statistics reach each step's train record (one step per record: --log-interval 1).
    for iteration, row in zip(range(WARMUP + 1, STEPS + 1), rows):
        for key in ("kept_fraction", "influence_kept", "noise_kept_rate", "trained_share"):
            assert logged[iteration][key] == pytest.approx(row["stats"][key]), (iteration, key)
    assert "trained_share" not in logged[WARMUP]  # warm-up steps do not select


def _dense(path, like):
    """A saved (sparse) sidecar file as the dense [documents x 3] table."""
    from blade_mega.data.sidecar import Sidecar

    return Sidecar.load(path, len(like), "pool").dense_table()


def test_checkpoint_holds_the_sidecar_and_resume_restores_it(trained):
    name = trained["sidecar"]
    table = trained["ranks"][0]["table"]
    saved = _dense(os.path.join(trained["split"], "iter_0000002", name), table)
    # Step 0 was warm-up, step 1 selected: one block scored, one batch kept.
    assert saved[:, SCORED].sum() == BLOCK and saved[:, KEPT].sum() == BATCH
    for rank in trained["ranks"]:
        assert np.array_equal(rank["restored"], saved)
        assert rank["restored_target_consumed"] == BATCH  # one V batch per selecting step
    # Resumed, the run ends with the straight run's sidecar (in the file and in memory).
    full, split = (_dense(os.path.join(trained[d], "iter_0000004", name), table)
                   for d in ("full", "split"))
    assert np.array_equal(full, trained["ranks"][0]["table"])
    assert np.array_equal(full[:, :2], split[:, :2])
    np.testing.assert_allclose(full[:, 2], split[:, 2], rtol=1e-5,
                               atol=1e-6 * np.abs(full[:, 2]).max())


def test_uniform_keeps_no_sidecar(trained):
    directory = os.path.join(trained["uniform"], "iter_0000001")
    assert os.path.isdir(directory)
    assert not [n for n in os.listdir(directory) if n.endswith(SUFFIX)]
    state = torch.load(os.path.join(directory, "run_state_rank00000.pt"), weights_only=False)
    assert state["hook"] == {}
