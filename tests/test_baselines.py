"""The baselines do what they say: a random mask keeps a uniform share that no scorer would, the
static classifier ranks target-like documents above noise and trains on its best-scored ones,
and rho with a small reference scores against it (learner or proxy scorer) and keeps it static.
"""

import numpy
import pytest
import torch

from blade_mega.selection.excess_loss import top_k_samples
from blade_mega.selection.random_mask import random_keep, random_token_mask
from blade_mega.testing import in_rank, run_distributed, trainer_in_rank

BLOCK, KEEP, ROUNDS = 32, 16, 4000


def _uniform_over_positions(kept_positions: numpy.ndarray, block: int, rounds: int, k: int) -> bool:
    """Each block position kept with rate k / block within 5 standard deviations."""
    counts = numpy.bincount(kept_positions.ravel(), minlength=block)
    rate = k / block
    sd = numpy.sqrt(rounds * rate * (1 - rate))
    return bool(numpy.all(numpy.abs(counts - rounds * rate) < 5 * sd))


def test_random_keep_is_a_uniform_share_that_a_scorer_is_not():
    kept = numpy.stack([random_keep(7, step, BLOCK, KEEP) for step in range(ROUNDS)])
    assert all(len(set(row)) == KEEP for row in kept)
    assert _uniform_over_positions(kept, BLOCK, ROUNDS, KEEP)
    # A scorer whose scores follow the block's content fails the same test.
    rng = numpy.random.default_rng(0)
    scored = numpy.stack([top_k_samples(numpy.arange(BLOCK) + rng.normal(0, 4, BLOCK),
                                        numpy.arange(BLOCK), KEEP) for _ in range(ROUNDS)])
    assert not _uniform_over_positions(scored, BLOCK, ROUNDS, KEEP)


def test_random_choices_are_a_function_of_seed_and_step():
    assert numpy.array_equal(random_keep(1, 5, BLOCK, KEEP), random_keep(1, 5, BLOCK, KEEP))
    assert not numpy.array_equal(random_keep(1, 5, BLOCK, KEEP), random_keep(1, 6, BLOCK, KEEP))
    assert not numpy.array_equal(random_keep(1, 5, BLOCK, KEEP), random_keep(2, 5, BLOCK, KEEP))


def test_random_token_mask_keeps_k_of_each_microbatch_uniformly():
    rows, tokens, micro, k = 8, 16, 2, 19
    masks = torch.stack([random_token_mask(3, step, rows, tokens, micro, k)
                         for step in range(1000)])
    assert torch.all(masks.view(1000, rows // micro, -1).sum(-1) == k)
    rate = masks.mean(0)  # every token position kept about k / (micro x tokens) of the time
    assert torch.allclose(rate, torch.full_like(rate, k / (micro * tokens)), atol=0.07)


def test_the_classifier_ranks_target_like_documents_above_noise(demo_data):
    import json

    from blade_mega.data.tokenizer import Tokenizer
    from blade_mega.prepare.document_classifier import classify
    from blade_mega.report.evaluation import open_dataset

    (scores,), about = classify(open_dataset(demo_data.target_prefix),
                                [open_dataset(demo_data.pool_prefix)],
                                Tokenizer.load(demo_data.tokenizer_model))
    labels = numpy.array([json.loads(line)["noise"] for line in open(demo_data.pool_meta)])
    clean = scores[labels == "clean"]

    def auc(noise):  # how often a clean document outscores a noise one
        return (clean[:, None] > noise[None, :]).mean()

    # Duplicates are clean text repeated: nothing for a text classifier to see. Scrambled code
    # keeps its words, so a bag of n-grams sees it least well (0.67 when this was written).
    kinds = ("spam", "scramble", "blob")
    assert auc(scores[numpy.isin(labels, kinds)]) > 0.75
    for kind in kinds:
        assert auc(scores[labels == kind]) > 0.6, kind
    assert about["classifier"] == "fasttext" and about["folds"] == 2


# -- inside real Trainers on 2 gloo ranks ------------------------------------------------------
STEPS = 4


def _argv(data, *extra):
    return ["--tokenizer-model", data.tokenizer_model, "--data-path", data.pool_prefix,
            "--target-data-path", data.target_prefix, "--model-size", "tiny",
            "--seq-length", "32", "--global-batch-size", "8", "--micro-batch-size", "2",
            "--train-iters", str(STEPS), "--log-interval", "1", "--eval-interval", "0",
            "--no-progress", "--lr-warmup-iters", "1", "--lr", "3e-3", "--reweight-mix", "0",
            *extra]


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def _mean_losses(module, samples):
    """Per-sample mean cross-entropy from the full logits of a TP1/PP1 GPTModel forward."""
    tokens, labels = samples[:, :-1], samples[:, 1:]
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    module.eval()
    with torch.no_grad():
        logits = module(tokens, positions, None)
    module.train()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), reduction="none"
    ).view_as(labels).mean(1)


def _run_recorded(trainer, scorer_module):
    """Train, recording each selecting step's scores against a direct computation and whether
    the reference and the scorer moved."""
    hook, reference = trainer.hook, trainer.hook.reference.model.module
    rows = []
    select, sample_scores = hook.select, hook.sample_scores

    def recording_select(step, block_ids):
        before = {"ref": _flat(reference), "scorer": _flat(scorer_module)}
        batch = select(step, block_ids)
        rows.append({"step": step, "ref_moved": not torch.equal(before["ref"], _flat(reference)),
                     "scorer_before": before["scorer"], **rows_pending.pop()})
        return batch

    rows_pending = []

    def recording_scores(block_ids, samples=None):
        scores = sample_scores(block_ids, samples)
        local = hook.read(hook.local_share(block_ids))
        direct = _mean_losses(scorer_module, local) - _mean_losses(reference, local)
        share = len(block_ids) // hook.groups.dp_size
        mine = scores[hook.groups.dp_rank * share:(hook.groups.dp_rank + 1) * share]
        rows_pending.append({"score_error": float(numpy.abs(mine - direct.numpy()).max())})
        return scores

    hook.select, hook.sample_scores = recording_select, recording_scores
    trainer.train()
    moved = [not torch.equal(a["scorer_before"], b["scorer_before"])
             for a, b in zip(rows, rows[1:])]
    return [{k: v for k, v in row.items() if k != "scorer_before"} for row in rows], moved


def _baselines_rank(argv, scores_prefix):
    out = {}
    with in_rank():
        learner = ["--num-layers", "4", "--hidden-size", "64"]  # larger than the tiny preset
        trainer = trainer_in_rank(argv + ["--selection", "rho", "--reference-model", "tiny",
                                          "--rho-ref-steps", "3", *learner])
        out["rho-small"] = _run_recorded(trainer, trainer.learner.module)
        out["rho-small-sizes"] = (len(_flat(trainer.learner.module)),
                                  len(_flat(trainer.hook.reference.model.module)))
        trainer = trainer_in_rank(argv + ["--selection", "rho", "--reference-model", "tiny",
                                          "--rho-scorer", "proxy", "--rho-ref-steps", "3",
                                          *learner])
        out["rho-proxy"] = _run_recorded(trainer, trainer.hook.proxy.module)

        trainer = trainer_in_rank(argv + ["--selection", "random"])
        kept = []
        select = trainer.hook.select

        def recording_random(step, block_ids):
            batch = select(step, block_ids)
            kept.append((step, block_ids.copy(), batch.ids.copy()))
            return batch

        trainer.hook.select = recording_random
        trainer.train()
        out["random"] = kept

        trainer = trainer_in_rank(argv + ["--selection", "classifier"])
        kept = []
        select = trainer.hook.select

        def recording_classifier(step, block_ids):
            batch = select(step, block_ids)
            kept.append((block_ids.copy(), trainer.hook.sample_scores(block_ids),
                         batch.ids.copy()))
            return batch

        trainer.hook.select = recording_classifier
        trainer.train()
        out["classifier"] = kept
        out["flops"] = trainer.flops.record()["flops"]
    return out


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    import shutil

    from blade_mega.data.document_scores import write_scores
    from blade_mega.report.evaluation import open_dataset

    # A copy of the pool with made-up classifier scores: the test decides what a best one is.
    root = tmp_path_factory.mktemp("scored")
    prefix = str(root / "pool")
    for suffix in (".bin", ".idx"):
        shutil.copy(demo_data.pool_prefix + suffix, prefix + suffix)
    documents = len(open_dataset(prefix).sequence_lengths)
    write_scores(prefix, numpy.random.default_rng(0).random(documents), {"classifier": "test"})
    argv = _argv(demo_data)
    argv[argv.index("--data-path") + 1] = prefix
    return run_distributed(_baselines_rank, 2, argv, prefix, timeout=600)


@pytest.mark.parametrize("method", ["rho-small", "rho-proxy"])
def test_rho_with_a_small_reference_scores_against_it_and_keeps_it_static(runs, method):
    for rank in runs:
        rows, scorer_moved = rank[method]
        assert [row["ref_moved"] for row in rows] == [True] + [False] * (STEPS - 1)
        assert max(row["score_error"] for row in rows) < 1e-4
        assert all(scorer_moved)  # the learner (or u') trains on every step's kept batch
    learner, reference = runs[0]["rho-small-sizes"]
    assert reference < learner  # the small reference really is the preset's size


def test_random_keeps_the_seeded_positions_on_every_rank(runs):
    for (step, block, first), (_, _, second) in zip(runs[0]["random"], runs[1]["random"]):
        keep = random_keep(1234, step, len(block), 8)
        assert numpy.array_equal(numpy.concatenate([first, second]), block[keep])


def test_classifier_trains_on_the_best_scored_documents_of_each_block(runs):
    for (block, scores, first), (_, _, second) in zip(runs[0]["classifier"],
                                                      runs[1]["classifier"]):
        kept = numpy.concatenate([first, second])
        assert numpy.array_equal(kept, block[top_k_samples(scores, block, 8)])
        assert scores[numpy.isin(block, kept)].min() >= scores[~numpy.isin(block, kept)].max()
    assert runs[0]["flops"]["scoring"] == 0 and runs[0]["flops"]["reference"] == 0
