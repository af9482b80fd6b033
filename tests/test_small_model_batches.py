"""A model smaller than the learner (proxy pair, small reference) runs larger micro-batches: as
large as this rank's share allows while its activations stay within one learner micro-batch's,
and its scores are those of the learner's micro-batch split (only the launch count changes)."""

import pytest

from blade_mega.config.flags import parse_flags
from blade_mega.config.run_config import RunConfig
from blade_mega.engine import plan
from blade_mega.engine.model import PRESETS
from blade_mega.testing import in_rank, run_distributed, trainer_in_rank

WIDE = ["--num-layers", "6", "--hidden-size", "256", "--ffn-hidden-size", "1024"]


def _config(*extra):
    flags = parse_flags(["--tokenizer-model", "x", "--data-path", "y", "--model-size", "demo",
                         "--seq-length", "128", "--global-batch-size", "16",
                         "--micro-batch-size", "8", *extra])
    return RunConfig.from_flags(flags, check_files=False)


def _bytes(config, size, micro):
    acts = plan.activation_bytes(size, config, tp=1, pp=1, vocab=2000, bf16=False,
                                 micro_batch=micro)
    return acts, acts["none"] + acts["logits_last_stage"]


@pytest.mark.parametrize("extra, expected", [([], (16, 16)), (WIDE, (16, 32))],
                         ids=["demo", "6x256"])
def test_a_small_model_takes_the_largest_micro_batches_the_learners_budget_holds(extra, expected):
    config = _config(*extra)
    tiny = PRESETS["tiny"]
    train, score = plan.small_model_micro_batches(tiny, config, tp=1, pp=1, vocab=2000,
                                                  local_batch=16, local_block=32)
    assert (train, score) == expected
    _, budget = _bytes(config, config.model.size, 8)
    _, proxy_train = _bytes(config, tiny, train)
    assert proxy_train <= budget
    # one size up would not fit (or would not divide the share)
    _, bigger = _bytes(config, tiny, 2 * train)
    assert bigger > budget or 16 % (2 * train)


def test_a_share_the_larger_size_does_not_divide_keeps_a_divisor():
    config = _config(*WIDE)
    train, score = plan.small_model_micro_batches(PRESETS["tiny"], config, tp=1, pp=1,
                                                  vocab=2000, local_batch=24, local_block=40)
    assert (train, score) == (24, 40) or (24 % train == 0 and 40 % score == 0)
    assert train % 8 == 0 and score % 8 == 0


def test_a_model_as_large_as_the_learner_keeps_its_micro_batch_for_training():
    config = _config()
    train, _ = plan.small_model_micro_batches(config.model.size, config, tp=1, pp=1, vocab=2000,
                                              local_batch=16, local_block=32)
    assert train == 8


def _proxy_scores(argv):
    import torch

    from blade_mega.engine.model_engine import split_microbatches

    with in_rank(1, 2):
        trainer = trainer_in_rank(argv, 1, 2)
        try:
            hook = trainer.hook
            proxy = hook.proxy
            block = trainer.sampler.block(0, 0, hook.block_size(0))
            samples = trainer.train_data.read(block.ids)
            batched = proxy.token_losses(samples)
            out = proxy.runner.run(split_microbatches(samples, 2), forward_only=True,
                                   keep_token_losses=True)
            split = torch.cat(out.token_losses) if out.token_losses else None
            last = trainer.groups.is_last_stage
            return {"sizes": (trainer.learner.micro_batch_size, proxy.micro_batch_size,
                              proxy.scoring_micro_batch_size,
                              hook.reference.model.scoring_micro_batch_size),
                    "diff": float((batched - split).abs().max()) if last else None,
                    "finite": bool(torch.isfinite(batched).all())}
        finally:
            trainer.close()


def test_proxy_scores_in_its_own_micro_batches_equal_the_learners_split_at_pp2(demo_data):
    argv = ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            "--target-data-path", demo_data.target_prefix, "--selection", "blade",
            "--model-size", "demo", *WIDE, "--reference-model", "tiny", "--seq-length", "32",
            "--global-batch-size", "8", "--micro-batch-size", "2", "--no-progress"]
    ranks = run_distributed(_proxy_scores, 2, argv, timeout=600)
    for rank in ranks:
        learner, train, score, reference = rank["sizes"]
        assert learner == 2 and train > learner and score >= train and reference == score
        assert rank["finite"]
    diffs = [r["diff"] for r in ranks if r["diff"] is not None]
    assert diffs and max(diffs) <= 1e-5
