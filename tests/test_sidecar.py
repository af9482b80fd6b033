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


# -- forgetting: --sidecar-half-life ------------------------------------------------------------
def test_decayed_counts_and_rates_follow_the_half_life_by_hand():
    sidecar = Sidecar(3, half_life=10)
    sidecar.update(numpy.array([0]), numpy.array([1.0]), numpy.array([1.0]), step=0)   # kept
    sidecar.update(numpy.array([0]), numpy.array([0.0]), numpy.array([3.0]), step=10)  # dropped
    # At step 20 the step-0 round weighs 2^-2, the step-10 one 2^-1.
    assert sidecar.decayed_rows(numpy.array([0, 1]), step=20).tolist() == \
        [[0.25 + 0.5, 0.25, 0.25 * 1.0 + 0.5 * 3.0], [0, 0, 0]]
    assert sidecar.keep_rate(numpy.array([0, 1]), step=20).tolist() == \
        [(0.25 + 1) / (0.75 + 2), 0.5]
    assert sidecar.keep_rate(numpy.array([0]), step=10).tolist() == [(0.5 + 1) / (1.5 + 2)]
    assert sidecar.mean_excess(numpy.array([0])).tolist() == [pytest.approx(7 / 3)]  # a ratio
    with pytest.raises(ValueError, match="needs the step"):
        sidecar.keep_rate(numpy.array([0]))


def test_rows_are_rescaled_before_their_weights_overflow_and_dropped_once_forgotten():
    sidecar = Sidecar(3, half_life=1)
    sidecar.update(numpy.array([0]), numpy.array([1.0]), numpy.array([2.0]), step=0)
    # 40 half-lives on: a round would weigh 2^40, so the rows are rescaled to step 40 first.
    sidecar.update(numpy.array([1]), numpy.array([0.0]), numpy.array([1.0]), step=40)
    assert sidecar.reference_step == 40
    assert sidecar.rows(numpy.array([0, 1])).tolist() == [[2 ** -40, 2 ** -40, 2 ** -39],
                                                          [1, 0, 1]]
    assert sidecar.keep_rate(numpy.array([0, 1]), step=41).tolist() == \
        [(2 ** -41 + 1) / (2 ** -41 + 2), 1 / 2.5]
    # 160 half-lives later both rows are below float32's range: no row is left of them.
    sidecar.update(numpy.array([2]), numpy.array([1.0]), numpy.array([1.0]), step=200)
    assert sidecar.reference_step == 200 and len(sidecar) == 1
    assert sidecar.keep_rate(numpy.array([0, 1, 2]), step=200).tolist() == [0.5, 0.5, 2 / 3]


def test_no_half_life_keeps_todays_counts_and_files_exactly(tmp_path):
    rng = numpy.random.default_rng(1)
    today, zero = Sidecar(500), Sidecar(500, half_life=0)
    for step in range(30):
        docs, kept = rng.integers(0, 500, size=32), (rng.random(32) < 0.5).astype(float)
        scores = rng.normal(size=32)
        today.update(docs, kept, scores)
        zero.update(docs, kept, scores, step=step)
    probe = numpy.arange(500)
    assert numpy.array_equal(zero.rows(probe), today.rows(probe))
    assert numpy.array_equal(zero.keep_rate(probe, step=99), today.keep_rate(probe))
    today.save(str(tmp_path / "today.npy"))
    zero.save(str(tmp_path / "zero.npy"))
    assert (tmp_path / "zero.npy").read_bytes() == (tmp_path / "today.npy").read_bytes()
    assert (tmp_path / "zero.json").read_text() == (tmp_path / "today.json").read_text()
    assert set(json.loads((tmp_path / "zero.json").read_text())) == {"documents", "rows"}


def test_a_decayed_sidecar_resumes_from_its_file_exactly(tmp_path):
    rng = numpy.random.default_rng(2)
    rounds = [(rng.integers(0, 200, size=16), (rng.random(16) < 0.5).astype(float),
               rng.normal(size=16)) for _ in range(80)]
    uninterrupted = Sidecar(200, half_life=1)  # rescaled at steps 32 and 64
    for step, round_ in enumerate(rounds):
        uninterrupted.update(*round_, step=step)
    first = Sidecar(200, half_life=1)
    for step, round_ in enumerate(rounds[:50]):
        first.update(*round_, step=step)
    path = str(tmp_path / "pool.blade_sidecar.npy")
    first.save(path)
    assert json.loads((tmp_path / "pool.blade_sidecar.json").read_text()) == \
        {"documents": 200, "rows": len(first), "half_life": 1, "reference_step": 32}
    resumed = Sidecar.load(path, 200, "pool")
    assert (resumed.half_life, resumed.reference_step) == (1, 32)
    for step, round_ in enumerate(rounds[50:], start=50):
        resumed.update(*round_, step=step)
    assert resumed.reference_step == uninterrupted.reference_step == 64
    probe = numpy.arange(200)
    assert numpy.array_equal(resumed.rows(probe), uninterrupted.rows(probe))
    assert numpy.array_equal(resumed.keep_rate(probe, step=80),
                             uninterrupted.keep_rate(probe, step=80))
    (tmp_path / "pool.blade_sidecar.json").write_text(
        json.dumps({"documents": 200, "rows": len(first), "half_life": 2.5}))
    with pytest.raises(UserError, match="half_life 2.5 is not a whole number of steps"):
        Sidecar.load(path, 200, "pool")


def test_a_file_without_a_half_life_loads_as_never_forgetting(tmp_path):
    sidecar = Sidecar(4)
    sidecar.update(numpy.array([1]), numpy.array([1.0]), numpy.array([0.5]))
    sidecar.save(str(tmp_path / "old.npy"))
    loaded = Sidecar.load(str(tmp_path / "old.npy"), 4, "pool")
    assert (loaded.half_life, loaded.reference_step) == (0, 0)
    (tmp_path / "old.json").unlink()  # a sidecar whose .json went missing reads the same
    assert Sidecar.load(str(tmp_path / "old.npy"), 4, "pool").half_life == 0
