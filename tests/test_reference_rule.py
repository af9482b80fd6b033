"""The reference rule, compute accounting, diversity and selection quality, in real Trainers on
2 gloo ranks (TP1 x DP2 unless a case says otherwise).

One spawn runs every case and returns what it recorded at the hook's and the engines' public
call points (global ids trained on, micro-batches the reference stepped on, optimizer states,
weights); the tests compare those with what the rule says, computed independently here.
"""

import numpy
import pytest
import torch

from blade_mega.testing import in_rank, run_distributed, trainer_in_rank

WORLD = 2
TIMEOUT = 600
V_TOKENS = 8 * 64  # a reference step's V batch: global batch 8 x seq 64


def _argv(data, *extra):
    return ["--tokenizer-model", data.tokenizer_model, "--data-path", data.pool_prefix,
            "--target-data-path", data.target_prefix, "--noise-labels", data.pool_meta,
            "--model-size", "tiny", "--seq-length", "64", "--global-batch-size", "8",
            "--micro-batch-size", "2", "--train-iters", "4", "--log-interval", "1",
            "--eval-interval", "0", "--no-progress", "--lr-warmup-iters", "2", "--lr", "3e-3",
            "--selection", "blade", "--selection-warmup-steps", "1",
            "--blade-sync-interval", "2", "--blade-ref-steps", "1",
            "--blade-lambda", "0.5", "--blade-sync-beta", "1", "--reweight-mix", "0", *extra]


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def _optimizer_state(model):
    """fp32 master partitions and Adam state of a ModelEngine, as plain tensors."""
    base = model._base_optimizer()
    fp32 = [t.detach().clone() for t in model.engine.optimizer.single_partition_of_fp32_groups]
    adam = [{k: v.clone() for k, v in base.state[p].items()} if p in base.state else {}
            for group in base.param_groups for p in group["params"]]
    return {"fp32": fp32, "adam": adam}


def _same_state(a, b):
    return (all(torch.equal(x, y) for x, y in zip(a["fp32"], b["fp32"]))
            and len(a["adam"]) == len(b["adam"])
            and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                    for x, y in zip(a["adam"], b["adam"])))


class _Recorder:
    """Wraps a Trainer's hook, learner and reference at their call points."""

    def __init__(self, trainer, states=False, weights=False):
        self.trainer = trainer
        hook, ref = trainer.hook, getattr(trainer.hook, "reference", None)
        self.steps = {}      # step -> {block, ids, weights, normaliser, scores, stats}
        self.ref_steps = []  # each reference optimizer step: what it trained on
        self.syncs = []      # per sync: states / weights at its start and before its 1st step
        self.step = None
        select, after_step = hook.select, hook.after_step

        def recording_select(step, block_ids):
            self.step = step
            batch = select(step, block_ids)
            self.steps[step] = {"block": block_ids.copy(), "ids": batch.ids.copy()}
            return batch

        def recording_after_step(step, batch, lr):
            stats = after_step(step, batch, lr)  # token level: sets batch.weights (alpha)
            self.steps[step].update(weights=batch.weights.clone(), normaliser=batch.normaliser,
                                    stats=stats.values)
            return stats

        hook.select, hook.after_step = recording_select, recording_after_step
        if hasattr(hook, "sample_scores"):
            scores_fn = hook.sample_scores

            def recording_scores(block_ids, samples=None):
                scores = scores_fn(block_ids, samples)
                self.last_scores = scores.copy()
                return scores
            hook.sample_scores = recording_scores
        if ref is None:
            return
        sync, train_step = ref.sync_and_train, ref.model.train_step

        def recording_sync(learner, step):
            self.syncs.append({"step": step, "first_step_seen": False})
            if weights:
                self.syncs[-1].update(w_before=_flat(ref.model.module), u=_flat(learner.module))
            sync(learner, step)
            if weights:
                self.syncs[-1]["w_after"] = _flat(ref.model.module)

        def recording_train_step(micro, normaliser, lr, weight_fn=None):
            sync_row = self.syncs[-1]
            if not sync_row["first_step_seen"]:
                sync_row["first_step_seen"] = True
                if states:
                    sync_row.update(ref_state=_optimizer_state(ref.model),
                                    learner_state=_optimizer_state(trainer.learner))
                if weights:
                    sync_row["w_first_step"] = _flat(ref.model.module)
            self.ref_steps.append({
                "sync": self.step, "lr": lr, "normaliser": normaliser,
                "tokens": torch.cat([m.tokens for m in micro]),
                "labels": torch.cat([m.labels for m in micro]),
                "weights": torch.cat([m.weights for m in micro])})
            return train_step(micro, normaliser, lr, weight_fn)

        ref.sync_and_train, ref.model.train_step = recording_sync, recording_train_step


def _replay_case(argv):
    """blade, T = 2, K = 3 (more steps than replayed batches: they cycle), lambda 0.5, 5 steps:
    syncs at steps 1 (replays the warm-up batch of step 0) and 3 (replays steps 1 and 2)."""
    trainer = trainer_in_rank(argv + ["--blade-ref-steps", "3", "--train-iters", "5"])
    rec = _Recorder(trainer)
    trainer.train()
    target, train, groups = trainer.target_data, trainer.train_data, trainer.groups
    # What each reference step should have read, by id: the next V batch (this rank's share)
    # and the learner's batch of the step the rule names.
    expected_v = [target.read(groups.share(target.ordered_ids(8 * r, 8)))
                  for r in range(len(rec.ref_steps))]
    learner = {step: {"samples": train.read(row["ids"]), "weights": row["weights"],
                      "normaliser": row["normaliser"]} for step, row in rec.steps.items()}
    out = {"ref_steps": rec.ref_steps, "expected_v": expected_v, "learner": learner,
           "flops": dict(trainer.flops.totals)}
    if "token" not in argv:
        # lambda enters the reference loss: the gradient of one reference step's objective at
        # lambda 1.3 minus at 0 is 1.3 x the gradient of L_train(alpha) alone.
        from blade_mega.engine.model_engine import split_microbatches
        from blade_mega.selection.reference import ReplayBatch

        ref = trainer.hook.reference
        last = rec.steps[4]
        alpha = torch.rand(last["weights"].shape, generator=torch.Generator().manual_seed(0))
        replay = ReplayBatch(4, last["ids"], alpha, 300.0)
        v_ids = target.ordered_ids(0, 8)

        def gradient(micro, normaliser):
            for p in ref.model.module.parameters():
                p.grad = None
            ref.model.module.train()
            ref.model.runner.run(micro, forward_only=False, normaliser=normaliser)
            return torch.cat([p.grad.reshape(-1) for p in ref.model.module.parameters()]).clone()

        g_0 = gradient(*ref.step_microbatches(v_ids, replay, 0.0))
        g_13 = gradient(*ref.step_microbatches(v_ids, replay, 1.3))
        g_train = gradient(split_microbatches(train.read(last["ids"]), 2, alpha), 300.0)
        for p in ref.model.module.parameters():
            p.grad = None
        out["lambda"] = {"difference": g_13 - g_0, "train_term": 1.3 * g_train, "v_term": g_0}
    return out


def _state_case(argv, zero):
    """--reference-optimizer-state copy under ZeRO-`zero` (one micro-batch per step), then
    reset checked against a freshly built engine."""
    trainer = trainer_in_rank(argv + ["--zero-stage", str(zero), "--global-batch-size", "4",
                               "--blade-lambda", "0", "--reference-optimizer-state", "copy"])
    rec = _Recorder(trainer, states=True)
    trainer.train()
    ref = trainer.hook.reference
    copies = [(row["step"], _same_state(row["ref_state"], row["learner_state"]),
               bool(row["learner_state"]["adam"][0])) for row in rec.syncs]
    ref.model.reset_optimizer_state()
    fresh = trainer.build_engine(trainer.size, False)
    fresh.copy_weights_from(ref.model)
    micro, normaliser = ref.step_microbatches(trainer.target_data.ordered_ids(40, 4), None, 0.0)
    ref.model.train_step(micro, normaliser, 1e-3)
    fresh.train_step(micro, normaliser, 1e-3)
    steps = [float(s["step"]) for s in _optimizer_state(ref.model)["adam"] if s]
    return {"copies": copies,
            "reset_equals_fresh": _same_state(_optimizer_state(ref.model),
                                              _optimizer_state(fresh))
            and torch.equal(_flat(ref.model.module), _flat(fresh.module)),
            "steps_after_reset": steps}


def _beta_cases(argv):
    out = {}
    for name, extra in (
            ("beta0", ["--blade-sync-beta", "0", "--blade-lambda", "0", "--blade-ref-steps", "0",
                       "--blade-first-ref-steps", "3"]),
            ("rho", ["--selection", "rho", "--rho-ref-steps", "3"]),
            ("beta_half", ["--blade-sync-beta", "0.5"])):
        trainer = trainer_in_rank(argv + extra)
        rec = _Recorder(trainer, weights=True)
        trainer.train()
        out[name] = {"kept": {s: r["ids"] for s, r in rec.steps.items()},
                     "reference": _flat(trainer.hook.reference.model.module),
                     "syncs": [{k: v for k, v in row.items() if k != "first_step_seen"}
                               for row in rec.syncs],
                     "ref_steps": len(rec.ref_steps), "flops": dict(trainer.flops.totals)}
    return out


def _layout_case(argv, tp, pp):
    """blade with the sketch diversity term, 3 selecting steps."""
    trainer = trainer_in_rank(argv + ["--selection-diversity", "0.05", "--sketch-dim", "8"], tp, pp)
    rec = _Recorder(trainer)
    scores = {}
    select = trainer.hook.select

    def keep_scores(step, block_ids):
        batch = select(step, block_ids)
        if step >= 1:
            scores[step] = rec.last_scores
        return batch
    trainer.hook.select = keep_scores
    trainer.train()
    return {"kept": {s: r["ids"] for s, r in rec.steps.items()},
            "blocks": {s: r["block"] for s, r in rec.steps.items()}, "scores": scores,
            "last_stage": trainer.groups.is_last_stage, "flops": dict(trainer.flops.totals)}


def _method_flops(argv):
    out = {}
    for name, extra in (("uniform", ["--selection", "uniform"]),
                        ("highloss", ["--selection", "highloss"]),
                        ("sketch", ["--selection", "sketch-influence", "--sketch-dim", "8"]),
                        ("proxy-token", ["--reference-model", "tiny",
                                         "--selection-granularity", "token"])):
        trainer = trainer_in_rank(argv + extra + ["--train-iters", "3"])
        trainer.train()
        out[name] = dict(trainer.flops.totals)
    return out


def _quality_case(argv):
    """rho on the demo pool (half its documents labelled noise), and the same selector with its
    scores replaced by random numbers: the noise share of the kept samples and of the blocks
    they were chosen from (what uniform training on those blocks would see)."""
    out = {}
    for name in ("rho", "random"):
        trainer = trainer_in_rank(argv + ["--selection", "rho",
                                   "--rho-ref-steps", "60" if name == "rho" else "0",
                                   "--selection-warmup-steps", "0", "--global-batch-size", "16",
                                   "--micro-batch-size", "4", "--train-iters", "8"])
        hook = trainer.hook
        if name == "random":
            rng = numpy.random.RandomState(0)  # the same draws on every rank
            hook.sample_scores = lambda block_ids, samples=None: rng.rand(len(block_ids))
        rec = _Recorder(trainer)
        trainer.train()
        record = hook.ctx.record
        clean = record.noise_names.index("clean")
        noisy = {"kept": [], "blocks": []}
        for row in rec.steps.values():
            kept = numpy.concatenate(_all_gather_ids(row["ids"]))
            noisy["kept"].append(record.labels(kept) != clean)
            noisy["blocks"].append(record.labels(row["block"]) != clean)
        out[name] = {k: float(numpy.concatenate(v).mean()) for k, v in noisy.items()}
    return out


def _all_gather_ids(ids):
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, ids)
    return parts


class _Tensor:
    """A torch tensor crossing the result queue as a numpy array (torch's own pickling shares
    file descriptors that die with the rank)."""

    def __init__(self, tensor):
        self.array = tensor.detach().cpu().numpy().copy()


def _convert(value, leaf):
    if isinstance(value, dict):
        return {k: _convert(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(v, leaf) for v in value)
    return leaf(value)


def _to_queue(value):
    return _Tensor(value) if torch.is_tensor(value) else value


def _from_queue(value):
    return torch.from_numpy(value.array) if isinstance(value, _Tensor) else value


def _rule_rank(argv):
    out = {}
    with in_rank():
        out["replay_sample"] = _replay_case(argv)
        out["replay_token"] = _replay_case(argv + ["--selection-granularity", "token"])
        out["zero1"] = _state_case(argv, 1)
        out["zero2"] = _state_case(argv, 2)
        out["beta"] = _beta_cases(argv)
        out["methods"] = _method_flops(argv)
        out["quality"] = _quality_case(argv)
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            out[("diversity", tp, pp)] = _layout_case(argv, tp, pp)
    return _convert(out, _to_queue)


@pytest.fixture(scope="module")
def runs(demo_data):
    return _convert(run_distributed(_rule_rank, WORLD, _argv(demo_data), timeout=TIMEOUT),
                    _from_queue)


# -- the reference's K steps --------------------------------------------------------------------
def _rule(sync_step):
    """(learner step replayed, learning rate) of each reference step of the replay cases."""
    from blade_mega.engine.model_engine import learning_rate

    if sync_step == 1:  # first sync: K0 = 3 steps, replay = [step 0]; its own LR schedule
        return [(0, learning_rate(j, lr=3e-3, min_lr=1e-4, warmup_steps=1, total_steps=3))
                for j in range(3)]
    lr = learning_rate(3, lr=3e-3, min_lr=1e-4, warmup_steps=2, total_steps=5)
    return [(1, lr), (2, lr), (1, lr)]  # replay = [1, 2]; 3 steps cycle through them


@pytest.mark.parametrize("case", ["replay_sample", "replay_token"])
def test_reference_steps_train_on_fresh_v_and_the_replayed_batches(runs, case):
    for rank in runs:
        run = rank[case]
        steps = run["ref_steps"]
        assert [s["sync"] for s in steps] == [1, 1, 1, 3, 3, 3]
        rule = _rule(1) + _rule(3)
        for index, (step, (replayed, lr)) in enumerate(zip(steps, rule)):
            v = run["expected_v"][index]  # a fresh V batch every step: V positions 8r..8r+7
            learner = run["learner"][replayed]
            assert torch.equal(step["tokens"], torch.cat([v[:, :-1], learner["samples"][:, :-1]]))
            assert torch.equal(step["labels"][:4], v[:, 1:])
            assert step["normaliser"] == V_TOKENS
            assert step["lr"] == pytest.approx(lr, rel=1e-12)
            # V tokens weigh 1; the replayed batch its own alpha x lambda |V| / its normaliser.
            assert torch.equal(step["weights"][:4], torch.ones(4, 64))
            expected = learner["weights"] * (0.5 * V_TOKENS / learner["normaliser"])
            assert torch.allclose(step["weights"][4:], expected, rtol=1e-6, atol=0)
        if case == "replay_token":  # alpha of a selecting step is its token mask
            masks = run["learner"][2]["weights"]
            assert 0 < masks.mean() < 1 and set(masks.unique().tolist()) == {0.0, 1.0}


def test_lambda_adds_exactly_the_training_loss_gradient(runs):
    for rank in runs:
        grads = rank["replay_sample"]["lambda"]
        scale = grads["train_term"].abs().max()
        assert scale > 1e-3 and grads["v_term"].abs().max() > 1e-3
        assert (grads["difference"] - grads["train_term"]).abs().max() <= 1e-5 * scale


# -- optimizer state at a sync ------------------------------------------------------------------
@pytest.mark.parametrize("zero", [1, 2])
def test_copy_and_reset_of_the_reference_optimizer_are_exact(runs, zero):
    for rank in runs:
        run = rank[f"zero{zero}"]
        # Syncs before steps 1 and 3: the reference starts each with the learner's fp32 masters
        # and Adam moments and step count, bit for bit (and the learner has a state to copy).
        assert run["copies"] == [(1, True, True), (3, True, True)]
        assert run["reset_equals_fresh"]
        assert run["steps_after_reset"] and set(run["steps_after_reset"]) == {1.0}


# -- partial sync -------------------------------------------------------------------------------
def test_beta_zero_without_later_steps_is_rho(runs):
    for rank in runs:
        beta0, rho = rank["beta"]["beta0"], rank["beta"]["rho"]
        assert beta0["ref_steps"] == rho["ref_steps"] == 3
        assert torch.equal(beta0["reference"], rho["reference"])
        assert beta0["kept"].keys() == rho["kept"].keys()
        for step in rho["kept"]:
            assert numpy.array_equal(beta0["kept"][step], rho["kept"][step]), step
        # beta = 0: the later sync moved nothing toward u.
        later = beta0["syncs"][1]
        assert torch.equal(later["w_after"], later["w_before"])


def test_partial_sync_blends_weights_then_trains(runs):
    for rank in runs:
        syncs = rank["beta"]["beta_half"]["syncs"]
        assert [s["step"] for s in syncs] == [1, 3]
        assert torch.equal(syncs[0]["w_first_step"], syncs[0]["u"])  # the first sync copies
        second = syncs[1]
        assert not torch.equal(second["w_before"], second["u"])
        blended = 0.5 * second["w_before"] + 0.5 * second["u"]
        assert (second["w_first_step"] - blended).abs().max() < 1e-6
        assert not torch.equal(second["w_after"], second["w_first_step"])  # then K steps


# -- compute accounting -------------------------------------------------------------------------
def _forward(samples, size=None):
    from blade_mega.train.flops import forward_flops_per_token
    from blade_mega.engine.model import PRESETS

    return samples * 64 * forward_flops_per_token(size or PRESETS["tiny"], 2048, 64)


def test_flop_counter_equals_a_hand_count_for_each_method(runs):
    from blade_mega.train.flops import sketch_flops_per_token
    from blade_mega.engine.model import PRESETS

    f = _forward
    learner = lambda steps, batch=8: 3 * f(steps * batch)  # noqa: E731
    rank = runs[0]
    # blade, 5 steps, warm-up 1, block 16: scoring = u + w forwards on 4 blocks; reference =
    # 6 steps of (V batch + replayed batch), each a training pass over 8 samples.
    blade = rank["replay_sample"]["flops"]
    assert blade == {"learner": learner(5), "scoring": 4 * 2 * f(16),
                     "reference": 6 * 2 * 3 * f(8), "sketch": 0}
    # token level: only w's forward on the batch scores (u's is its training forward).
    token = rank["replay_token"]["flops"]
    assert token == {"learner": learner(5), "scoring": 4 * f(8),
                     "reference": 6 * 2 * 3 * f(8), "sketch": 0}
    # rho: its 3 V-only steps once; beta0 with K = 0 the same.
    for name in ("rho", "beta0"):
        assert rank["beta"][name]["flops"] == {"learner": learner(4), "scoring": 3 * 2 * f(16),
                                               "reference": 3 * 3 * f(8), "sketch": 0}
    # ZeRO copy case: global batch 4, block 8, lambda 0, K = 1 at 2 syncs.
    methods = rank["methods"]
    assert methods["uniform"] == {"learner": learner(3), "scoring": 0, "reference": 0,
                                  "sketch": 0}
    assert methods["highloss"] == {"learner": learner(3), "scoring": 2 * f(16), "reference": 0,
                                   "sketch": 0}
    sketch = sketch_flops_per_token(PRESETS["tiny"], 2048, 64, 8) * 64
    assert methods["sketch"] == {"learner": learner(3), "scoring": 0, "reference": 0,
                                 "sketch": 2 * (16 + 8) * sketch}
    # proxy pair (tiny for tiny), token level, 3 steps, sync at 1: u' and w' forwards on the
    # batch; u' trains on every batch (3) and w' 1 step of V + replayed batch.
    assert methods["proxy-token"] == {"learner": learner(3), "scoring": 2 * 2 * f(8),
                                      "reference": 3 * 3 * f(8) + 2 * 3 * f(8), "sketch": 0}
    diversity = rank[("diversity", 1, 1)]["flops"]
    assert diversity["sketch"] == 3 * 16 * sketch
    assert diversity["scoring"] == 3 * 2 * f(16)


# -- diversity with blade -----------------------------------------------------------------------
def _kept_sets(runs, tp, pp):
    if (tp, pp) == (1, 1):  # DP2: join the two ranks' shares
        return {s: numpy.concatenate([runs[0][("diversity", 1, 1)]["kept"][s],
                                      runs[1][("diversity", 1, 1)]["kept"][s]])
                for s in runs[0][("diversity", 1, 1)]["kept"]}
    last = [r for r in runs if r[("diversity", tp, pp)]["last_stage"]][0]
    return last[("diversity", tp, pp)]["kept"]


def test_blade_diversity_keeps_the_same_set_on_every_layout(runs):
    from blade_mega.selection.excess_loss import top_k_samples

    reference = _kept_sets(runs, 1, 1)
    for tp, pp in ((2, 1), (1, 2)):
        other = _kept_sets(runs, tp, pp)
        assert other.keys() == reference.keys()
        for step in reference:
            assert numpy.array_equal(other[step], reference[step]), (tp, pp, step)
    # The penalty changed the choice somewhere: the check is not plain top-k in disguise.
    run = runs[0][("diversity", 1, 1)]
    differs = 0
    for step, scores in run["scores"].items():
        block = run["blocks"][step]
        plain = set(block[top_k_samples(scores, block, 8)].tolist())
        differs += plain != set(reference[step].tolist())
    assert differs >= 1


# -- quality ------------------------------------------------------------------------------------
def test_a_selector_trains_on_less_labelled_noise_than_uniform(runs):
    quality = runs[0]["quality"]
    rho, random = quality["rho"], quality["random"]
    # The blocks are what uniform training would see (about 60% noise on this pool).
    assert 0.4 < rho["blocks"] < 0.8
    assert rho["kept"] < rho["blocks"] - 0.1
    # The same test fails for a picker that ignores the data.
    assert not random["kept"] < random["blocks"] - 0.1
