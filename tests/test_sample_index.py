"""The sample index: megatron.core's GPTDataset/BlendedDataset behind global ids, built once
into the cache, never regenerated per sample, and checked on open in O(1)."""

import os
from unittest import mock

import numpy
import pytest
import torch

from blade_mega.data import sample_index as sample_index_module
from blade_mega.data.prefetch import Prefetcher
from blade_mega.data.sample_index import DataSpec, build_sample_indices
from blade_mega.errors import UserError
from blade_mega.prepare.preprocess import dataset_prefix, preprocess
from blade_mega.data.tokenizer import Tokenizer

SEQ = 64


pytestmark = pytest.mark.usefixtures("one_rank_group")  # BlendedDataset asks for the rank


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return Tokenizer.load(demo_data.tokenizer_model)


def build(tokenizer, cache, blend, split="98,2,0", sizes=(500, 50, 0), seed=5):
    return build_sample_indices(DataSpec(blend=blend, split=split), list(sizes), tokenizer,
                                seq_length=SEQ, seed=seed, cache_path=str(cache),
                                vocab_size=tokenizer.vocab_size)


def test_samples_are_megatron_gpt_dataset_samples(demo_data, tokenizer, tmp_path):
    train, valid, test = build(tokenizer, tmp_path, ([demo_data.target_prefix], None))
    assert test is None and len(valid) > 0
    dataset = train.datasets[0]
    assert len(train) == len(dataset) >= 500
    assert numpy.array_equal(train.ordered_ids(10, 5), numpy.arange(10, 15))
    for global_id in (0, 7, len(train) - 1):
        item = dataset[global_id]  # Megatron's own sample: tokens and labels
        window = train.tokens(global_id)
        assert numpy.array_equal(window[:-1], item["tokens"].numpy())
        assert numpy.array_equal(window[1:], item["labels"].numpy())
    assert train.read([3, 4]).shape == (2, SEQ + 1)
    # Train and valid take disjoint document ranges of the split.
    assert set(numpy.unique(train.datasets[0].document_index[:])).isdisjoint(
        numpy.unique(valid.datasets[0].document_index[:]))


def test_main_document_is_the_one_under_the_middle_token(demo_data, tokenizer, tmp_path):
    train, _, _ = build(tokenizer, tmp_path, ([demo_data.target_prefix], None))
    d = train.datasets[0]
    lengths, order = d.dataset.sequence_lengths[:], d.document_index[:]
    owners = numpy.repeat(order, lengths[order])
    starts = numpy.concatenate([[0], numpy.cumsum(lengths[order], dtype=numpy.int64)])
    ids = numpy.arange(0, len(train), 7)
    rows = d.sample_index[d.shuffle_index[ids]]
    first = starts[rows[:, 0]] + rows[:, 1]
    [(part, where, documents)] = train.main_documents(ids)
    assert part == 0 and numpy.array_equal(where, numpy.arange(len(ids)))
    assert numpy.array_equal(documents, owners[first + SEQ // 2])
    assert len(numpy.unique(documents)) > 10


def test_blend_follows_megatron_weights_and_global_ids_address_parts(demo_data, tokenizer,
                                                                      tmp_path):
    blend = ([demo_data.target_prefix, demo_data.test_prefix], [0.7, 0.3])
    train, _, _ = build(tokenizer, tmp_path, blend, sizes=(1000, 50, 0))
    ids = train.ordered_ids(0, 1000)
    parts, local = train.locate(ids)
    assert abs((parts == 0).sum() - 700) <= 10  # Megatron's greedy blend, with its surplus
    assert numpy.array_equal(train.ordered_ids(300, 200), ids[300:500])
    for global_id, part, index in list(zip(ids, parts, local))[:20]:
        expected = train.datasets[part][int(index)]["tokens"].numpy()
        assert numpy.array_equal(train.tokens(int(global_id))[:-1], expected)
    # An unplanned extension of the run wraps around rather than failing.
    assert numpy.array_equal(train.ordered_ids(train.stream_length, 3), ids[:3])


def test_twelve_datasets_are_indexed_once_and_never_per_sample(demo_data, tokenizer, tmp_path):
    from megatron.core.datasets import gpt_dataset

    prefixes = []
    with open(os.path.join(demo_data.corpus_dir, "pool.jsonl")) as f:
        lines = f.readlines()
    per = len(lines) // 12
    for i in range(12):
        (tmp_path / f"part{i}.jsonl").write_text("".join(lines[i * per:(i + 1) * per]))
        out = str(tmp_path / f"part{i}")
        preprocess([out + ".jsonl"], out, demo_data.tokenizer_model, append_eod=True,
                   show_progress=False)
        prefixes.append(dataset_prefix(out, "text"))
    with mock.patch.object(gpt_dataset, "_build_shuffle_index",
                           wraps=gpt_dataset._build_shuffle_index) as shuffles:
        train, _, _ = build(tokenizer, tmp_path / "cache", (prefixes, [1.0] * 12),
                            split="100,0,0", sizes=(3000, 0, 0))
        built = shuffles.call_count
        assert built == 12  # one shuffle index per dataset, at build time
        ids = train.ordered_ids(0, 3000)
        train.read(ids[:300])
        train.main_documents(ids)
        assert shuffles.call_count == built  # reading never regenerates an order
    assert len(numpy.unique(train.locate(ids)[0])) == 12


def test_cache_is_reused_and_a_damaged_or_foreign_file_rebuilt(demo_data, tokenizer, tmp_path,
                                                              capsys):
    from megatron.core.datasets import helpers

    blend = ([demo_data.target_prefix, demo_data.test_prefix], [0.5, 0.5])
    cache = tmp_path / "cache"
    with mock.patch.object(sample_index_module, "verify", wraps=sample_index_module.verify) \
            as verify, mock.patch.object(helpers, "build_sample_idx",
                                         wraps=helpers.build_sample_idx) as builds:
        first, _, _ = build(tokenizer, cache, blend)
        assert builds.call_count == 4 and verify.call_count == 2  # 2 datasets x train/valid
        again, _, _ = build(tokenizer, cache, blend)
        assert builds.call_count == 4  # the second start reads the cache
        assert verify.call_count == 2  # the full scan is not repeated on open
        ids = first.ordered_ids(0, 200)
        assert numpy.array_equal(again.ordered_ids(0, 200), ids)
        shuffle = next(p for p in os.listdir(cache) if p.endswith("train-shuffle_index.npy"))
        with open(cache / shuffle, "r+b") as f:
            f.truncate(os.path.getsize(cache / shuffle) // 2)
        capsys.readouterr()
        rebuilt, _, _ = build(tokenizer, cache, blend)
        lines = [l for l in capsys.readouterr().out.splitlines() if "warning" in l]
        assert len(lines) == 1 and shuffle in lines[0] and "rebuilding" in lines[0]
        assert builds.call_count == 5
        assert numpy.array_equal(rebuilt.ordered_ids(0, 200), ids)
        description = next(p for p in os.listdir(cache)
                           if p.endswith("BlendedDataset-train-description.txt"))
        (cache / description).write_text("another dataset")
        foreign, _, _ = build(tokenizer, cache, blend)
        lines = [l for l in capsys.readouterr().out.splitlines() if "warning" in l]
        assert len(lines) == 1 and description in lines[0] and "another dataset" in lines[0]
        assert numpy.array_equal(foreign.ordered_ids(0, 200), ids)


def test_open_checks_refuse_a_damaged_bin_with_one_line(demo_data, tokenizer, tmp_path):
    import shutil

    damaged = str(tmp_path / "damaged")
    for ext in (".idx", ".bin"):
        shutil.copyfile(demo_data.target_prefix + ext, damaged + ext)
    with open(damaged + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(damaged + ".bin") - 2)
    with pytest.raises(UserError, match=r"damaged\.bin: .* bytes, but its \.idx"):
        build(tokenizer, tmp_path / "cache", ([damaged], None))
    with pytest.raises(UserError, match=r"nothing\.idx: no such file"):
        sample_index_module.parse_blend([str(tmp_path / "nothing")])


def test_prefetched_reads_equal_direct_reads(demo_data, tokenizer, tmp_path):
    train, _, _ = build(tokenizer, tmp_path, ([demo_data.target_prefix], None))
    direct = train.read(train.ordered_ids(0, 48))
    prefetcher = Prefetcher(train)
    train.read_ahead = prefetcher  # as the trainer, its owner, plugs it in
    try:
        prefetcher.start_step(train.ordered_ids(0, 32))   # read ahead for the next step
        prefetcher.start_step(train.ordered_ids(32, 16))  # that step begins
        assert torch.equal(train.read(train.ordered_ids(0, 48)), direct)
        assert prefetcher.hits == 32 and prefetcher.misses == 16
    finally:
        train.read_ahead = None
        prefetcher.close()
