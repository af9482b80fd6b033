"""``--sidecar-prior classifier``: keep rates start from the static classifier's P(target)
instead of 1/2, worth two selection rounds, and the reweighted share follows them before any
document was scored."""

import numpy
import pytest

from blade_mega.config import parse_config
from blade_mega.data.block_sampler import CandidateBlockSampler
from blade_mega.data.sidecar import Sidecar
from blade_mega.errors import UserError
from blade_mega.selection.record import SelectionRecord
from test_block_sampler import samples  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("one_rank_group")


def test_keep_rates_start_from_the_prior_and_move_by_the_counts():
    prior = numpy.array([0.9, 0.1, 0.5, 0.0, 1.0], dtype=numpy.float32)
    table = Sidecar(5, prior=prior)
    documents = numpy.arange(5)
    # never scored: the prior itself, clipped into [0.01, 0.99]
    assert table.keep_rate(documents) == pytest.approx([0.9, 0.1, 0.5, 0.01, 0.99])
    # document 0 scored twice, kept neither time: (0 + 2 x 0.9) / (2 + 2)
    table.update(numpy.array([0, 0]), numpy.zeros(2), numpy.zeros(2))
    assert table.keep_rate(numpy.array([0]))[0] == pytest.approx(1.8 / 4)
    # without a prior the rule is (kept + 1) / (scored + 2), as before
    plain = Sidecar(5)
    plain.update(numpy.array([0, 0]), numpy.zeros(2), numpy.zeros(2))
    assert plain.keep_rate(documents) == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5])


def test_a_decaying_sidecar_falls_back_to_the_prior():
    prior = numpy.full(3, 0.8, dtype=numpy.float32)
    table = Sidecar(3, half_life=10, prior=prior)
    table.update(numpy.array([1] * 6), numpy.zeros(6), numpy.zeros(6), step=0)
    # at step 10 the six rejections weigh 3: (0 + 1.6) / (3 + 2)
    assert table.keep_rate(numpy.array([1]), step=10)[0] == pytest.approx(1.6 / 5)
    # long after, only the prior is left
    assert table.keep_rate(numpy.array([1]), step=1000)[0] == pytest.approx(0.8, abs=1e-6)


def test_the_reweighted_share_follows_the_prior_before_anything_is_scored(samples):  # noqa: F811
    n = samples.num_documents(0)
    documents = numpy.arange(n)
    favoured = documents[documents % 10 == 0]
    prior = numpy.where(numpy.isin(documents, favoured), 0.9, 0.1).astype(numpy.float32)
    record = SelectionRecord(samples, priors=[prior, None])
    sampler = CandidateBlockSampler(samples, 5, 0.5, record.sidecars)
    draws = numpy.concatenate([sampler.block(step, 0, 16).ids[8:] for step in range(300)])
    parts, _ = samples.locate(draws)
    [(_, _, drawn)] = samples.main_documents(draws[parts == 0])
    [(_, _, mains)] = samples.main_documents(numpy.arange(samples.offsets[1]))
    uniform_share = numpy.isin(mains, favoured).mean()
    rate = prior[mains]
    expected = rate[numpy.isin(mains, favoured)].sum() / rate.sum()
    share = numpy.isin(drawn, favoured).mean()
    sigma = numpy.sqrt(expected * (1 - expected) / len(drawn))
    assert abs(share - expected) < 4 * sigma
    assert share - uniform_share > 10 * sigma  # a plain 1/2 start would draw the plain share


def test_the_prior_survives_a_resume_without_being_saved(samples, tmp_path):  # noqa: F811
    n = samples.num_documents(0)
    prior = numpy.linspace(0, 1, n).astype(numpy.float32)
    record = SelectionRecord(samples, priors=[prior, None])
    record.sidecars[0].update(numpy.array([3, 3]), numpy.ones(2), numpy.zeros(2))
    record.save(str(tmp_path))
    resumed = SelectionRecord(samples, priors=[prior, None])
    resumed.load(str(tmp_path))
    documents = numpy.arange(min(n, 50))
    assert numpy.array_equal(resumed.sidecars[0].keep_rate(documents),
                             record.sidecars[0].keep_rate(documents))
    assert resumed.sidecars[1].prior is None


def test_a_prior_with_no_reweighted_share_is_refused(demo_data):
    with pytest.raises(UserError, match="--reweight-mix 0"):
        parse_config(["--tokenizer-model", demo_data.tokenizer_model, "--data-path",
                      demo_data.pool_prefix, "--selection", "classifier", "--sidecar-prior",
                      "classifier", "--reweight-mix", "0"])


def test_a_prior_for_a_method_without_a_sidecar_is_refused_in_one_line(demo_data, tmp_path):
    import subprocess

    from test_faults import env, single_process, train_flags

    from blade_mega.testing import free_port

    out = subprocess.run(single_process() + train_flags(demo_data, str(tmp_path),
                                                        "--selection", "random",
                                                        "--sidecar-prior", "classifier"),
                         capture_output=True, text=True, timeout=300,
                         env=dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if "--sidecar-prior" in line]
    assert len(lines) == 1 and "keeps no sidecar" in lines[0], out.stderr[-2000:]
    log = tmp_path / "log.jsonl"
    assert not log.exists() or '"kind": "train"' not in log.read_text()
