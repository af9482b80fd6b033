"""Candidate blocks: seeded, resumable, and the reweighted share drawn by keep rate in O(block)."""

from unittest import mock

import numpy
import pytest

from blade_mega.data.block_sampler import CandidateBlockSampler
from blade_mega.data.sample_index import DataSpec, SampleIndex, build_sample_indices
from blade_mega.data.sidecar import Sidecar
from blade_mega.data.tokenizer import Tokenizer

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
