"""Sample index and candidate blocks: windows, blended global ids, seeded and biased blocks."""

import numpy
import pytest

from blade_mega.data.sampler import CandidateBlockSampler
from blade_mega.data.samples import BlendedWindows, TokenWindows
from blade_mega.data.sidecar import KEPT, SCORED, Sidecar

SEQ = 64


def _stream(windows):
    return numpy.concatenate([numpy.array(windows.dataset.get(int(d))) for d in windows.documents])


def test_windows_are_the_concatenated_shuffled_documents(demo_data):
    windows = TokenWindows(demo_data.target_prefix, SEQ, seed=3)
    stream = _stream(windows)
    assert sorted(windows.documents.tolist()) == list(range(len(windows.documents)))
    assert len(windows) == (len(stream) - 1) // SEQ
    for index in range(len(windows)):
        begin = index * SEQ
        assert numpy.array_equal(windows.tokens(index), stream[begin:begin + SEQ + 1])
    # Each token's document, and the document credited with a window (under its midpoint).
    owners = numpy.repeat(windows.documents, windows.doc_lengths)
    some = numpy.array([0, 7, len(windows) - 1])
    for index in some:
        assert numpy.array_equal(windows.token_documents(int(index)),
                                 owners[index * SEQ:index * SEQ + SEQ + 1])
    assert windows.main_documents(some).tolist() == owners[some * SEQ + SEQ // 2].tolist()
    other_seed = TokenWindows(demo_data.target_prefix, SEQ, seed=4)
    assert not numpy.array_equal(other_seed.documents, windows.documents)


def _blend(demo_data, seed=5, weights=(0.7, 0.3)):
    parts = [TokenWindows(demo_data.target_prefix, SEQ, seed),
             TokenWindows(demo_data.test_prefix, SEQ, seed)]
    return BlendedWindows(parts, list(weights), seed)


def test_blend_follows_weights_and_global_ids_address_parts(demo_data):
    blend = _blend(demo_data)
    count = 1000
    ids = blend.ordered_ids(0, count)
    parts = numpy.searchsorted(blend.offsets, ids, side="right") - 1
    # Megatron's greedy blending stays within a sample or two of the target shares.
    assert abs((parts == 0).sum() - 0.7 * count) <= 2
    assert numpy.array_equal(blend.ordered_ids(300, 200), ids[300:500])
    for part in (0, 1):
        visits = ids[parts == part] - blend.offsets[part]
        size = len(blend.parts[part])
        assert visits.min() >= 0 and visits.max() < size
        # Each epoch of a part is a permutation: no repeats before every sample was seen.
        assert len(set(visits[:size].tolist())) == min(size, len(visits))
    for global_id in ids[:20]:
        part, local = blend.locate(int(global_id))
        assert local == global_id - blend.offsets[part]
        assert numpy.array_equal(blend.tokens(int(global_id)), blend.parts[part].tokens(local))


def test_blocks_depend_only_on_seed_step_and_consumed(demo_data):
    def sampler(seed=5):
        blend = _blend(demo_data, seed)
        return CandidateBlockSampler(blend, seed, 0.25, [Sidecar(len(p.dataset.sequence_lengths))
                                                         for p in blend.parts])

    first, second = sampler(), sampler()
    block = first.block(step=4, consumed=40, size=16)
    again = second.block(step=4, consumed=40, size=16)
    assert numpy.array_equal(block.ids, again.ids)
    assert block.consumed == 12  # the biased quarter does not advance the reading position
    assert numpy.array_equal(block.ids[:12], first.windows.ordered_ids(40, 12))
    assert not numpy.array_equal(first.block(5, 40, 16).ids[12:], block.ids[12:])
    assert not numpy.array_equal(sampler(seed=6).block(4, 40, 16).ids, block.ids)
    plain = CandidateBlockSampler(first.windows, 5)
    unbiased = plain.block(4, 40, 16)
    assert unbiased.consumed == 16
    assert numpy.array_equal(unbiased.ids, first.windows.ordered_ids(40, 16))
    with pytest.raises(ValueError):
        CandidateBlockSampler(first.windows, 5, 1.5, first.sidecars)


def test_biased_share_is_drawn_in_proportion_to_keep_rates(demo_data):
    windows = TokenWindows(demo_data.pool_prefix, SEQ, seed=5)
    blend = BlendedWindows([windows], [1.0], seed=5)
    sidecar = Sidecar(len(windows.dataset.sequence_lengths))
    favoured = windows.documents[: len(windows.documents) // 10]
    sidecar.table[:, SCORED] = 8
    sidecar.table[favoured, KEPT] = 8  # keep rate 0.9 against 0.1 for the rest
    sampler = CandidateBlockSampler(blend, 5, 0.5, [sidecar])
    main = windows.main_documents(numpy.arange(len(windows)))
    in_favour = numpy.isin(main, favoured)
    rate = sidecar.keep_rate()[main]
    assert numpy.allclose(sampler.sample_weights(), rate / rate.sum())
    expected = rate[in_favour].sum() / rate.sum()
    draws = numpy.concatenate([sampler.block(step, 0, 16).ids[8:] for step in range(300)])
    share = in_favour[draws].mean()
    sigma = numpy.sqrt(expected * (1 - expected) / len(draws))
    assert abs(share - expected) < 4 * sigma
    assert expected > 2 * in_favour.mean()  # the bias is large enough to tell apart
