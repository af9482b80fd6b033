"""Candidate blocks: seeded, resumable, and the reweighted share drawn by keep rate in O(block)."""

from unittest import mock

import numpy
import pytest
import torch

from blade_mega.data.block_sampler import CandidateBlockSampler
from blade_mega.data.sample_index import DataSpec, SampleIndex, build_sample_indices
from blade_mega.data.sidecar import Sidecar
from blade_mega.data.tokenizer import Tokenizer
from blade_mega.errors import UserError
from blade_mega.selection.record import SelectionRecord

SEQ = 64


pytestmark = pytest.mark.usefixtures("one_rank_group")  # BlendedDataset asks for the rank


@pytest.fixture(scope="module")
def samples(demo_data, tmp_path_factory):
    tokenizer = Tokenizer.load(demo_data.tokenizer_model)
    blend = ([demo_data.pool_prefix, demo_data.target_prefix], [0.8, 0.2])
    train, _, _ = build_sample_indices(DataSpec(blend=blend, split="100,0,0"), [4000, 0, 0],
                                       tokenizer, seq_length=SEQ, seed=5,
                                       cache_path=str(tmp_path_factory.mktemp("cache")))
    return train


def sidecars(samples):
    return [Sidecar(samples.num_documents(p)) for p in range(len(samples.datasets))]


def test_blocks_depend_only_on_seed_step_consumed_and_sidecar(samples):
    first = CandidateBlockSampler(samples, 5, 0.25, sidecars(samples))
    second = CandidateBlockSampler(samples, 5, 0.25, sidecars(samples))
    block = first.block(step=4, consumed=40, size=16)
    assert numpy.array_equal(block.ids, second.block(step=4, consumed=40, size=16).ids)
    assert block.consumed == 12  # the biased quarter does not advance the reading position
    assert numpy.array_equal(block.ids[:12], samples.ordered_ids(40, 12))
    assert len(set(block.ids.tolist())) == 16  # a sample appears at most once per block
    assert not numpy.array_equal(first.block(5, 40, 16).ids[12:], block.ids[12:])
    assert not numpy.array_equal(CandidateBlockSampler(samples, 6, 0.25, sidecars(samples))
                                 .block(4, 40, 16).ids, block.ids)
    # Another sidecar state draws other samples.
    changed = sidecars(samples)
    rejected = numpy.repeat(numpy.arange(changed[0].num_documents), 30)  # keep rate 1/32
    changed[0].update(rejected, numpy.zeros(len(rejected)), numpy.zeros(len(rejected)))
    assert not numpy.array_equal(CandidateBlockSampler(samples, 5, 0.25, changed)
                                 .block(4, 40, 16).ids, block.ids)
    unbiased = CandidateBlockSampler(samples, 5).block(4, 40, 16)
    assert unbiased.consumed == 16 and numpy.array_equal(unbiased.ids, samples.ordered_ids(40, 16))
    with pytest.raises(ValueError):
        CandidateBlockSampler(samples, 5, 1.5, sidecars(samples))


def test_biased_share_is_drawn_in_proportion_to_keep_rates(samples):
    tables = sidecars(samples)
    pool = tables[0]
    documents = numpy.arange(pool.num_documents)
    favoured = documents[documents % 10 == 0]
    # Keep rate (kept + 1) / (scored + 2): 0.9 for the favoured tenth, 0.1 for the rest.
    pool.update(numpy.repeat(documents, 8), numpy.repeat(numpy.isin(documents, favoured)
                                                         .astype(float), 8),
                numpy.zeros(8 * len(documents)))
    sampler = CandidateBlockSampler(samples, 5, 0.5, tables)
    draws = numpy.concatenate([sampler.block(step, 0, 16).ids[8:] for step in range(400)])
    parts, _ = samples.locate(draws)
    # Datasets are drawn by blend weight...
    assert abs((parts == 0).mean() - 0.8) < 4 * numpy.sqrt(0.16 / len(draws))
    # ...and within the pool, samples by their main document's keep rate.
    all_pool = numpy.arange(samples.offsets[1])
    [(_, _, mains)] = samples.main_documents(all_pool)
    rate = pool.keep_rate(mains)
    in_favour = numpy.isin(mains, favoured)
    expected = rate[in_favour].sum() / rate.sum()
    [(_, _, drawn_mains)] = samples.main_documents(draws[parts == 0])
    share = numpy.isin(drawn_mains, favoured).mean()
    sigma = numpy.sqrt(expected * (1 - expected) / (parts == 0).sum())
    assert abs(share - expected) < 4 * sigma
    # A uniform draw would sit at the favoured share of samples: far outside that band.
    assert abs(in_favour.mean() - expected) > 10 * sigma


def test_biased_draw_touches_o_of_block_samples(samples):
    sampler = CandidateBlockSampler(samples, 5, 0.5, sidecars(samples))
    with mock.patch.object(SampleIndex, "main_documents", autospec=True,
                           side_effect=SampleIndex.main_documents) as looked_up:
        sampler.block(3, 0, 64)
    touched = sum(len(call.args[1]) for call in looked_up.call_args_list)
    assert touched <= 4 * 64 + 64  # rejection tries, not every sample of the corpus
    assert len(samples) > 50 * touched


# -- --redraw-gap and --sidecar-half-life ------------------------------------------------------
def _pool_mains(samples, ids):
    """Main documents of the pool's samples among ``ids``."""
    return numpy.concatenate([documents for part, _, documents in samples.main_documents(ids)
                              if part == 0])


def test_documents_trained_within_the_gap_are_not_drawn_again(samples):
    record = SelectionRecord(samples, redraw_gap=3)
    documents = numpy.arange(record.sidecars[0].num_documents)
    favoured = documents[documents % 10 == 0]  # keep rate 0.9, the rest 0.1: half the draws
    record.sidecars[0].update(numpy.repeat(documents, 8), numpy.repeat(
        numpy.isin(documents, favoured).astype(float), 8), numpy.zeros(8 * len(documents)))
    record.recently_trained.add(10, 0, favoured)  # every favoured document trained at step 10
    gapped = CandidateBlockSampler(samples, 5, 0.5, record.sidecars, record.recently_trained)
    free = CandidateBlockSampler(samples, 5, 0.5, record.sidecars)

    def favoured_drawn(sampler, steps):
        drawn = numpy.concatenate([sampler.block(step, 0, 32).ids[16:] for step in steps])
        return numpy.isin(_pool_mains(samples, drawn), favoured).sum()

    assert favoured_drawn(free, range(11, 14)) > 10   # without the gap they come right back
    assert favoured_drawn(gapped, range(11, 14)) == 0  # steps 11..13: trained 1..3 steps ago
    assert favoured_drawn(gapped, range(14, 17)) > 10  # after the gap they may be drawn again
    assert favoured_drawn(gapped, [10]) > 0  # a step's own rounds (a dropped attempt) do not count
    # the in-order share is not filtered: only the reweighted draw
    assert numpy.array_equal(gapped.block(12, 0, 32).ids[:16], samples.ordered_ids(0, 16))


def test_the_record_remembers_trained_documents_for_the_gap_only(samples):
    record = SelectionRecord(samples, redraw_gap=2)
    ids = samples.ordered_ids(0, 8)
    record.begin_step(4)
    record.selection(ids, numpy.array([1, 0, 0.25, 0, 1, 0, 0, 0.0]), numpy.zeros(8))
    trained = numpy.unique(_pool_mains(samples, ids[[0, 2, 4]]))  # any kept share trains
    assert numpy.array_equal(record.recently_trained.documents(0, 5), trained)
    record.begin_step(5)
    record.trained_all(ids[5:])  # a warm-up step trains every candidate
    assert set(record.recently_trained.documents(0, 6).tolist()) == \
        set(trained.tolist()) | set(_pool_mains(samples, ids[5:]).tolist())
    assert set(record.recently_trained.documents(0, 7).tolist()) == \
        set(_pool_mains(samples, ids[5:]).tolist())  # step 4 is 3 steps back: past the gap
    assert SelectionRecord(samples).recently_trained is None  # no gap, no window


def test_a_resumed_sampler_draws_the_blocks_of_an_uninterrupted_one(samples, tmp_path):
    """Decayed sidecars (rescaled on the way) and the recently trained window saved at step
    20 and restored (as a checkpoint does: sidecar files, run state as data) draw every later
    block exactly as a run that never stopped."""
    def run(record, sampler, steps, consumed=0):
        blocks = []
        for step in steps:
            record.begin_step(step)
            block = sampler.block(step, consumed, 16)
            # a selection round that depends on the block: keep the lower half of the ids
            kept = (block.ids < numpy.median(block.ids)).astype(float)
            record.selection(block.ids, kept, numpy.sin(block.ids.astype(float)))
            consumed += block.consumed
            blocks.append(block.ids)
        return blocks, consumed

    def parts():
        record = SelectionRecord(samples, half_life=1, redraw_gap=3)
        return record, CandidateBlockSampler(samples, 5, 0.5, record.sidecars,
                                             record.recently_trained)

    record, sampler = parts()
    uninterrupted, _ = run(record, sampler, range(40))
    first, first_sampler = parts()
    _, consumed = run(first, first_sampler, range(20))
    first.save(str(tmp_path))
    torch.save(first.recently_trained.state_dict(), tmp_path / "run_state.pt")
    resumed, resumed_sampler = parts()
    resumed.load(str(tmp_path))
    resumed.recently_trained.load_state_dict(torch.load(tmp_path / "run_state.pt",
                                                        weights_only=True))
    after, _ = run(resumed, resumed_sampler, range(20, 40), consumed)
    assert resumed.sidecars[0].reference_step == 32  # rescaled after the resume, like the other
    for step, (expected, drawn) in enumerate(zip(uninterrupted[20:], after), start=20):
        assert numpy.array_equal(expected, drawn), step
    # The window is what carried part of that: without it the draws differ.
    forgetful, forgetful_sampler = parts()
    forgetful.load(str(tmp_path))
    differs, _ = run(forgetful, forgetful_sampler, range(20, 40), consumed)
    assert any(not numpy.array_equal(a, b) for a, b in zip(uninterrupted[20:], differs))
    # A run with another half-life cannot read these rows.
    with pytest.raises(UserError, match="saved with --sidecar-half-life 1, this run has 0"):
        SelectionRecord(samples).load(str(tmp_path))
