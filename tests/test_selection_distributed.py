"""Excess-loss selection inside real Trainers on 2 gloo ranks.

One spawn builds Trainers for several layouts (TP1 x DP2, TP2, PP2) and methods, wrapping the
hook's own methods to record every step's block, scores and choices; the tests compare those
records with a direct cross-entropy computation and across layouts.  Resume runs real processes.
"""

import os
import warnings

import numpy
import pytest
import torch

from blade_mega.testing import in_rank, pretrain_rank, run_distributed, trainer_in_rank

WORLD = 2
STEPS = 4
TIMEOUT = 400


def _argv(data, *extra):
    return ["--tokenizer-model", data.tokenizer_model, "--data-path", data.pool_prefix,
            "--target-data-path", data.target_prefix, "--model-size", "tiny",
            "--seq-length", "64", "--global-batch-size", "8", "--micro-batch-size", "2",
            "--train-iters", str(STEPS), "--log-interval", "1", "--eval-interval", "0",
            "--no-progress", "--lr-warmup-iters", "2", "--lr", "3e-3", "--selection", "blade",
            "--selection-warmup-steps", "1", "--blade-sync-interval", "2",
            "--blade-ref-steps", "1",
            "--blade-lambda", "0.5", "--blade-sync-beta", "1", "--reweight-mix", "0", *extra]


# -- in-rank helpers ----------------------------------------------------------------------------
def _direct_token_losses(module, samples):
    """Per-token cross-entropy from the full logits of a TP1/PP1 GPTModel forward."""
    from blade_mega.engine.model import padded_vocab_size

    tokens, labels = samples[:, :-1], samples[:, 1:]
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    module.eval()
    with torch.no_grad():
        logits = module(tokens, positions, None)
    # Megatron's loss runs over the padded vocab: the padding columns are real logits.
    assert logits.size(-1) == padded_vocab_size(2000, 1)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), reduction="none"
    ).view_as(labels)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def _chosen(batch) -> dict:
    """Token level: the masks and excess the step's weight_fn chose by, per micro-batch."""
    return getattr(batch.weight_fn, "chosen", {})


def _record(trainer, direct):
    """Wrap the hook so each step keeps its block, scores, choices and reference changes."""
    hook, ref = trainer.hook, trainer.hook.reference
    steps, copies = [], []
    select, scores_fn, after_step = hook.select, hook.sample_scores, hook.after_step
    copy = ref.model.copy_weights_from
    last = {"ref": _flat(ref.model.module)}

    def recording_select(step, block_ids):
        before = _flat(ref.model.module)
        batch = select(step, block_ids)
        row = {"step": step, "block": block_ids.copy(), "kept": batch.ids.copy(),
               "ref_moved_between_steps": not torch.equal(before, last["ref"]),
               "ref_moved_in_select": not torch.equal(before, _flat(ref.model.module))}
        if direct and step >= hook.warmup:
            samples = hook.read(hook.local_share(block_ids))
            row["direct"] = (_direct_token_losses(trainer.learner.module, samples)
                             - _direct_token_losses(ref.model.module, samples)).numpy()
        steps.append(row)
        return batch

    def recording_scores(block_ids, samples=None):
        scores = scores_fn(block_ids, samples)
        last["scores"] = scores.copy()  # select adds its row after scoring: stash until then
        return scores

    def recording_after_step(step, batch, lr):
        row = steps[-1]
        row["scores"] = last.pop("scores", None)
        chosen = _chosen(batch)
        if chosen:
            order = sorted(chosen)
            row["masks"] = torch.cat([chosen[i][0] for i in order]).numpy()
            row["excess"] = torch.cat([chosen[i][1] for i in order]).numpy()
        stats = after_step(step, batch, lr)
        row["stats"] = stats.values
        if chosen:  # the reference's L_train must see this step's alpha (the masks)
            replayed = hook.reference.replay[-1]
            row["last_batch_is_masked"] = bool(
                replayed.step == step and replayed.weights is not None
                and numpy.array_equal(replayed.weights.numpy(), row["masks"]))
        last["ref"] = _flat(ref.model.module)
        return stats

    def checked_copy(learner):
        copy(learner)
        mine = ref.model.engine.optimizer.single_partition_of_fp32_groups
        theirs = learner.engine.optimizer.single_partition_of_fp32_groups
        copies.append({
            "params": all(torch.equal(w, u) for w, u in zip(ref.model.module.parameters(),
                                                              learner.module.parameters())),
            "fp32_partitions": len(mine) > 0 and all(torch.equal(w, u)
                                                     for w, u in zip(mine, theirs))})

    hook.select, hook.sample_scores, hook.after_step = (recording_select, recording_scores,
                                                         recording_after_step)
    ref.model.copy_weights_from = checked_copy
    return steps, copies


def _nan_checks(argv):
    """Inject non-finite reference losses (our own ModelEngine.token_losses) into one step."""
    results = {}
    for granularity in ("sample", "token"):
        for case in ("some", "all"):
            trainer = trainer_in_rank(argv + ["--selection-warmup-steps", "0",
                                              "--blade-sync-interval", "100",
                                              "--selection-granularity", granularity])
            hook = trainer.hook
            real = hook.reference.model.token_losses

            def poisoned(samples, everywhere=True, case=case, real=real):
                losses = real(samples, everywhere).clone()  # one stage: never None
                if case == "all":
                    return torch.full_like(losses, float("nan"))
                losses[0, 5] = float("nan")       # sample level: sample 0 unscorable
                losses[1, 7] = float("inf")       # excess -inf: sample 1 unscorable
                losses[2, :10] = float("nan")     # token level: 10 more unscorable tokens
                return losses

            hook.reference.model.token_losses = poisoned
            block = trainer.sampler.block(1, 0, hook.block_size(1))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                batch = hook.select(1, block.ids)
                trainer.learner.train_step(hook.microbatches(batch), batch.normaliser, 1e-3,
                                           batch.weight_fn)
                stats = hook.after_step(1, batch, 1e-3)
            row = {"block": block.ids, "kept": batch.ids, "stats": stats.values,
                   "warnings": [str(w.message) for w in caught],
                   "sidecar_scored": float(trainer.hook.ctx.record.sidecars[0].sorted_rows()[1][:, 0].sum())}
            chosen = _chosen(batch)
            if chosen:
                row["masks"] = torch.cat([chosen[i][0] for i in sorted(chosen)]).numpy()
            results[(granularity, case)] = row
    return results


def _selection_rank(argv):
    out = {}
    with in_rank():
        for granularity in ("sample", "token"):
            for tp, pp in ((1, 1), (2, 1), (1, 2)):
                trainer = trainer_in_rank(argv + ["--selection-granularity", granularity], tp, pp)
                steps, copies = _record(trainer, direct=(tp, pp) == (1, 1))
                trainer.train()
                out[(granularity, tp, pp)] = {"steps": steps, "copies": copies,
                                              "last_stage": trainer.groups.is_last_stage}
        trainer = trainer_in_rank(argv + ["--selection", "rho", "--rho-ref-steps", "2"])
        steps, _ = _record(trainer, direct=False)
        trainer.train()
        out["rho"] = {"steps": steps}
        out["nan"] = _nan_checks(argv)
    return out


@pytest.fixture(scope="module")
def runs(demo_data):
    return run_distributed(_selection_rank, WORLD, _argv(demo_data), timeout=TIMEOUT)


def _selecting(run, rank=0):
    return [row for row in run[rank]["steps"] if row["step"] >= 1]


def _tp1(runs, granularity):
    """The TP1 x DP2 run with both ranks' shares joined in block order."""
    rows = []
    for first, second in zip(_selecting(runs_of(runs, granularity, 1, 1), 0),
                             _selecting(runs_of(runs, granularity, 1, 1), 1)):
        joined = dict(first)
        for key in ("kept", "direct", "masks", "excess"):
            if key in first:
                joined[key] = numpy.concatenate([first[key], second[key]])
        rows.append(joined)
    return rows


def runs_of(runs, granularity, tp, pp):
    return [rank[(granularity, tp, pp)] for rank in runs]


# -- scores against an independent computation --------------------------------------------------
def test_sample_scores_are_mean_excess_of_direct_cross_entropy(runs):
    rows = _tp1(runs, "sample")
    assert len(rows) == STEPS - 1
    for row in rows:
        direct = row["direct"].mean(axis=1)
        assert numpy.abs(row["scores"] - direct).max() < 1e-5
        assert numpy.abs(direct).max() > 1e-3  # u and w differ: the check is not vacuous
        # Exactly global_batch samples of the block, the best by direct score.
        positions = numpy.flatnonzero(numpy.isin(row["block"], row["kept"]))
        assert len(row["kept"]) == 8 == len(positions)
        dropped = numpy.setdiff1d(numpy.arange(len(row["block"])), positions)
        assert direct[positions].min() >= direct[dropped].max() - 1e-5


def test_token_masks_keep_the_top_share_of_direct_excess(runs):
    k = round(0.6 * 2 * 64)
    for row in _tp1(runs, "token"):
        assert numpy.abs(row["excess"] - row["direct"]).max() < 1e-5
        for start in range(0, 8, 2):  # per micro-batch of 2 samples
            mask = row["masks"][start:start + 2].astype(bool)
            direct = row["direct"][start:start + 2]
            assert mask.sum() == k
            assert direct[mask].min() >= direct[~mask].max() - 1e-5
        assert row["last_batch_is_masked"]


@pytest.mark.parametrize("granularity", ["sample", "token"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_layouts_agree_with_tp1(runs, granularity, tp, pp):
    reference = _tp1(runs, granularity)
    last = [r for r, run in enumerate(runs_of(runs, granularity, tp, pp)) if run["last_stage"]][0]
    other = _selecting(runs_of(runs, granularity, tp, pp), last)
    assert len(other) == len(reference)
    for mine, theirs in zip(other, reference):
        assert numpy.array_equal(mine["block"], theirs["block"])
        assert numpy.array_equal(mine["kept"], theirs["kept"])
        if granularity == "sample":
            assert numpy.abs(mine["scores"] - theirs["scores"]).max() < 1e-5
        else:
            # Per-token differences of two float32 losses (7.6 on average, higher on rare
            # tokens) after a few steps that TP reduces in another order: tens of ulps. Seen:
            # at most 1.7e-5 on every token but one, 6.8e-5 on one token of the first
            # selecting step; the kept masks, which is what selection uses, are equal.
            assert numpy.abs(mine["excess"] - theirs["excess"]).max() < 1e-4
            assert numpy.array_equal(mine["masks"], theirs["masks"])


# -- the reference ------------------------------------------------------------------------------
def test_sync_copies_weights_and_fp32_partitions_exactly(runs):
    for rank in runs:
        for key, run in rank.items():
            if isinstance(key, tuple):
                # Warm-up 1, T = 2 over 4 steps: syncs before steps 1 and 3.
                assert run["copies"] == [{"params": True, "fp32_partitions": True}] * 2, key


def test_blade_reference_moves_only_at_syncs(runs):
    for granularity in ("sample", "token"):
        for row in runs[0][(granularity, 1, 1)]["steps"]:
            assert not row["ref_moved_between_steps"]
            assert row["ref_moved_in_select"] == (row["step"] in (1, 3)), row["step"]
            if row["step"] >= 1:
                assert row["stats"]["ref_syncs"] == (1.0 if row["step"] < 3 else 2.0)


def test_rho_reference_is_trained_once_then_frozen(runs):
    rows = runs[0]["rho"]["steps"]
    assert [row["ref_moved_in_select"] for row in rows] == [False, True, False, False]
    assert not any(row["ref_moved_between_steps"] for row in rows)
    assert rows[-1]["stats"]["ref_syncs"] == 1.0


# -- non-finite scores --------------------------------------------------------------------------
def test_nonfinite_sample_scores_are_excluded_and_counted(runs):
    rows = [rank["nan"][("sample", "some")] for rank in runs]
    block = rows[0]["block"]
    kept = numpy.concatenate([row["kept"] for row in rows])
    share = len(block) // WORLD
    poisoned = block[[0, 1, 2, share, share + 1, share + 2]]
    assert rows[0]["stats"]["nonfinite_scores"] == 6.0
    assert len(kept) == 8 and not numpy.isin(kept, poisoned).any()
    assert rows[0]["sidecar_scored"] == len(block) - 6
    assert not any("finite scores" in w for w in rows[0]["warnings"])


def test_unscorable_sample_block_falls_back_to_uniform_with_a_warning(runs):
    rows = [rank["nan"][("sample", "all")] for rank in runs]
    kept = numpy.concatenate([row["kept"] for row in rows])
    assert numpy.array_equal(kept, rows[0]["block"][:8])
    assert rows[0]["stats"]["uniform_fallback"] == 1.0
    assert rows[0]["stats"]["nonfinite_scores"] == len(rows[0]["block"])
    assert any("finite scores" in w for w in rows[0]["warnings"])


def test_nonfinite_token_scores_are_never_kept(runs):
    k = round(0.6 * 2 * 64)
    for row in (rank["nan"][("token", "some")] for rank in runs):
        masks = row["masks"]
        assert masks[0, 5] == 0 and masks[1, 7] == 0 and not masks[2, :10].any()
        assert all(masks[i:i + 2].sum() == k for i in range(0, len(masks), 2))
    assert runs[0]["nan"][("token", "some")]["stats"]["nonfinite_scores"] == 2 * 12


def test_unscorable_tokens_fall_back_to_uniform_with_a_warning(runs):
    k = round(0.6 * 2 * 64)
    for row in (rank["nan"][("token", "all")] for rank in runs):
        # Every token weighted k / (2 x 64): uniform, and the same total weight as a selection.
        assert numpy.allclose(row["masks"], k / 128)
        assert any("uniformly" in w for w in row["warnings"])


# -- resume ---------------------------------------------------------------------------------------
def _train_runs(argvs):
    """Several Trainer runs in one process (each from scratch or from its own --load)."""
    from blade_mega.config import parse_config
    from blade_mega.train.trainer import Trainer

    with in_rank() as layout:
        for argv in argvs:
            Trainer(parse_config(argv), layout).train()


TIMING = {"step_time", "tokens_per_s", "hook_time_share", "startup_s"}


def _train_records(path):
    import json

    with open(path) as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: {k: v for k, v in r.items() if k not in TIMING}
            for r in records if r["kind"] == "train"}


def _assert_bit_equal(a, b, where):
    """Two loaded checkpoint structures hold the same tensors, bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_bit_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bit_equal(x, y, f"{where}[{i}]")


def _engine_tensors(directory):
    """Weights, fp32 master partitions and Adam state of a DeepSpeed checkpoint directory."""
    out = {"module": torch.load(os.path.join(directory, "mp_rank_00_model_states.pt"),
                                weights_only=False)["module"]}
    for name in sorted(os.listdir(directory)):
        if name.endswith("_optim_states.pt"):
            state = torch.load(os.path.join(directory, name),
                               weights_only=False)["optimizer_state_dict"]
            out[name] = {k: state[k] for k in ("base_optimizer_state",
                                               "single_partition_of_fp32_groups")}
    return out


def test_blade_resume_is_exact(demo_data, tmp_path):
    base = _argv(demo_data, "--train-iters", "6", "--reweight-mix", "0.25", "--blade-lambda",
                 "0.5")
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run_distributed(_train_runs, WORLD, [
        base + ["--save", full, "--log-file", full + ".jsonl"],
        base + ["--save", split, "--log-file", split + "_a.jsonl", "--exit-interval", "3"],
    ], timeout=TIMEOUT)
    # The second half in a fresh process, as after a real restart.
    run_distributed(pretrain_rank, WORLD, base + ["--load", split, "--save", split,
                                                  "--log-file", split + "_b.jsonl"],
                    timeout=TIMEOUT)
    expected = _train_records(full + ".jsonl")
    resumed = {**_train_records(split + "_a.jsonl"), **_train_records(split + "_b.jsonl")}
    assert sorted(resumed) == list(range(1, 7))
    assert expected[6]["ref_syncs"] == 3.0  # syncs at steps 1, 3 (after the resume) and 5
    # Exact, reference statistics included (lambda > 0: w also trains on the restored batch).
    for iteration, record in expected.items():
        assert resumed[iteration] == record, iteration
    name = os.path.basename(demo_data.pool_prefix) + ".blade_sidecar.npy"
    tables = [numpy.load(os.path.join(d, "iter_0000006", name)) for d in (full, split)]
    assert tables[0]["scored"].sum() > 0
    assert numpy.array_equal(tables[0], tables[1])
    # The losses are float32 sums that hide ulp drift of the weights: compare the learner's and
    # the reference's weights, fp32 masters and Adam moments themselves.
    for sub in ("", "reference"):
        _assert_bit_equal(_engine_tensors(os.path.join(full, "iter_0000006", sub)),
                          _engine_tensors(os.path.join(split, "iter_0000006", sub)),
                          sub or "learner")


def test_resume_with_another_dp_size_continues_data_and_sidecar(demo_data, tmp_path):
    """DP 2 -> DP 1: the data position and the sidecar are global and carry over; ZeRO's
    optimizer partitions do not, which --no-load-optim says out loud."""
    import json

    from blade_mega.data.sidecar import Sidecar

    base = _argv(demo_data, "--reweight-mix", "0.25", "--blade-lambda", "0")
    save = str(tmp_path / "dp2")
    run_distributed(pretrain_rank, WORLD, base + ["--save", save, "--log-file", save + ".jsonl",
                                                  "--train-iters", "3"], timeout=TIMEOUT)
    checkpoint = os.path.join(save, "iter_0000003")
    # The sidecar is one file per dataset, written once (not per rank, not in the run state).
    name = os.path.basename(demo_data.pool_prefix) + ".blade_sidecar"
    assert sorted(n for n in os.listdir(checkpoint) if "sidecar" in n) == [
        name + ".json", name + ".npy"]
    for rank in range(WORLD):
        state = torch.load(os.path.join(checkpoint, f"run_state_rank{rank:05d}.pt"),
                           weights_only=False)
        assert "sidecars" not in state["hook"]
    saved = numpy.load(os.path.join(checkpoint, name + ".npy"))
    with open(save + ".jsonl") as f:
        consumed = [json.loads(l) for l in f if '"train"' in l][-1]["consumed"]

    refused = run_distributed(_resume_error, 1, base + ["--load", save, "--train-iters", "5"],
                              timeout=TIMEOUT)[0]
    assert "data-parallel size 2, this run has 1" in refused and "--no-load-optim" in refused

    out = str(tmp_path / "dp1")
    records = run_distributed(pretrain_rank, 1, base + [
        "--load", save, "--no-load-optim", "--save", out, "--log-file", out + ".jsonl",
        "--train-iters", "5"], timeout=TIMEOUT)[0]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [4, 5]
    end = next(r for r in records if r["kind"] == "end")
    assert end["prefetch_hits"] > 0  # the in-order samples of step 5 were read ahead
    block = 16  # 8 / keep ratio 0.5; a quarter of it drawn by keep rate
    assert train[0]["consumed"] == consumed + (block - 4)
    with open(os.path.join(checkpoint, name + ".json")) as f:
        documents = json.load(f)["documents"]
    resumed = Sidecar.load(os.path.join(out, "iter_0000005", name + ".npy"), documents, "pool")
    rows = resumed.rows(saved["document"])
    # Every document scored before the resume keeps its counts (and gains the new rounds').
    assert (rows[:, 0] >= saved["scored"]).all()
    total = resumed.sorted_rows()[1][:, 0].sum()
    assert total == saved["scored"].sum() + 2 * block


def _resume_error(argv):
    from blade_mega.config import parse_config
    from blade_mega.errors import UserError
    from blade_mega.pretrain import pretrain

    try:
        pretrain(parse_config(argv))
    except UserError as err:
        return str(err)
    return ""


def test_resume_with_another_reference_model_names_the_fix(demo_data, tmp_path):
    """A checkpoint saved with a proxy pair, resumed with the same-size reference and back:
    each is one clear error, not a shape mismatch deep in DeepSpeed."""
    saves = {}
    for reference in ("tiny", "same"):
        saves[reference] = str(tmp_path / reference)
        run_distributed(pretrain_rank, 1, _argv(demo_data, "--train-iters", "2",
                                                "--reference-model", reference,
                                                "--save", saves[reference]), timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match="saved with a proxy pair .* resume with the "
                                           "--reference-model preset"):
        run_distributed(pretrain_rank, 1, _argv(demo_data, "--train-iters", "3",
                                                "--reference-model", "same",
                                                "--load", saves["tiny"]), timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match="proxy learner checkpoint missing.*resume with "
                                           "--reference-model same"):
        run_distributed(pretrain_rank, 1, _argv(demo_data, "--train-iters", "3",
                                                "--reference-model", "tiny",
                                                "--load", saves["same"]), timeout=TIMEOUT)
