"""The sparse reweighting sidecar: counts, lookups through its merged levels, files."""

import json
import math

import numpy
import pytest

from blade_mega.data.sidecar import EXCESS_SUM, KEPT, SCORED, Sidecar, path_in
from blade_mega.errors import UserError

nan = math.nan


def test_sidecar_counts_finite_scores_only(tmp_path):
    sidecar = Sidecar(4)
    sidecar.update(numpy.array([0, 1, 1, 2]), numpy.array([1.0, 0.0, 1.0, 1.0]),
                   numpy.array([1.0, 2.0, 4.0, nan]))
    table = sidecar.dense_table()
    assert table[:, SCORED].tolist() == [1, 2, 0, 0]
    assert table[:, KEPT].tolist() == [1, 1, 0, 0]
    assert table[:, EXCESS_SUM].tolist() == [1, 6, 0, 0]
    assert len(sidecar) == 2  # only scored documents have a row
    # (kept + 1) / (scored + 2): unscored documents sit at 0.5.
    assert numpy.allclose(sidecar.keep_rate(numpy.arange(4)), [2 / 3, 0.5, 0.5, 0.5])


def test_sparse_levels_match_a_dense_table_under_random_updates():
    rng = numpy.random.default_rng(0)
    documents = 10_000
    sidecar, dense = Sidecar(documents), numpy.zeros((documents, 3))
    for _ in range(200):
        docs = rng.integers(0, documents, size=64) if rng.random() < 0.7 else \
            rng.integers(0, 50, size=64)  # revisits, so rows are updated in older levels
        kept = (rng.random(64) < 0.5).astype(float)
        scores = rng.normal(size=64)
        scores[rng.random(64) < 0.05] = nan
        sidecar.update(docs, kept, scores)
        finite = numpy.isfinite(scores)
        numpy.add.at(dense[:, SCORED], docs[finite], 1)
        numpy.add.at(dense[:, KEPT], docs[finite], kept[finite])
        numpy.add.at(dense[:, EXCESS_SUM], docs[finite], scores[finite])
    assert len(sidecar._levels) <= 2 * math.log2(len(sidecar)) + 1  # merged, not one per step
    assert len(sidecar) == int((dense[:, SCORED] > 0).sum())
    assert numpy.allclose(sidecar.dense_table(), dense, atol=1e-4)
    probe = rng.integers(0, documents, size=500)
    assert numpy.allclose(sidecar.keep_rate(probe),
                          (dense[probe, KEPT] + 1) / (dense[probe, SCORED] + 2))


def test_file_round_trip_is_sparse_and_checks_the_dataset(tmp_path):
    sidecar = Sidecar(1_000_000)
    sidecar.update(numpy.array([3, 999_999, 3]), numpy.array([1.0, 0.0, 0.5]),
                   numpy.array([0.5, -1.0, 0.25]))
    path = path_in(str(tmp_path), "/data/pool_text_document")
    sidecar.save(path)
    assert path.endswith("pool_text_document.blade_sidecar.npy")
    import os
    assert os.path.getsize(path) < 1000  # rows for the two scored documents, not a million
    with open(path[:-4] + ".json") as f:
        assert json.load(f)["documents"] == 1_000_000
    loaded = Sidecar.load(path, 1_000_000, "pool")
    assert numpy.array_equal(loaded.rows(numpy.array([3, 999_999, 5])),
                             sidecar.rows(numpy.array([3, 999_999, 5])))
    with pytest.raises(UserError, match="of a dataset of 1000000 documents but pool has 5"):
        Sidecar.load(path, 5, "pool")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match="junk.npy: not a readable sidecar"):
        Sidecar.load(str(tmp_path / "junk.npy"), 5, "pool")


def test_dense_tables_of_earlier_versions_still_load(tmp_path):
    table = numpy.zeros((4, 3), numpy.float32)
    table[1] = [2, 1, 0.5]
    numpy.save(tmp_path / "old.npy", table)
    loaded = Sidecar.load(str(tmp_path / "old.npy"), 4, "pool")
    assert numpy.array_equal(loaded.dense_table(), table)
    with pytest.raises(UserError, match="sidecar has 4 documents but pool has 5"):
        Sidecar.load(str(tmp_path / "old.npy"), 5, "pool")
