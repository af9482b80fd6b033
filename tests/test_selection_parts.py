"""Selection parts without engines: the FLOP formula, the resolved SelectionConfig, the
reference's replay order, and the per-selection bookkeeping (SelectionRecord)."""

import math

import numpy
import pytest

from blade_mega.config import parse_config
from blade_mega.errors import UserError
from blade_mega.train.flops import FlopCounter, forward_flops_per_token, sketch_flops_per_token
from blade_mega.engine.model import PRESETS, ModelSize
from blade_mega.selection.record import SelectionRecord
from blade_mega.selection.reference import replay_order


# -- FLOPs ----------------------------------------------------------------------------------------
def test_forward_flops_match_a_hand_count():
    # tiny: 2 layers, h 64, ffn 256; seq 64, padded vocab 2048. Per token and layer:
    # qkv 2*64*192 = 24576, scores 2*64*64 = 8192, scores x values 8192, proj 2*64*64 = 8192,
    # fc1 2*64*256 = 32768, fc2 32768 -> 114688; output layer 2*64*2048 = 262144.
    assert forward_flops_per_token(PRESETS["tiny"], 2048, 64) == 2 * 114688 + 262144
    # One layer, h 2, ffn 3, seq 5, vocab 7: 8*4 + 4*2*3 + 4*5*2 = 96, output 2*2*7 = 28.
    assert forward_flops_per_token(ModelSize(1, 2, 1, 3, 8), 7, 5) == 124
    # Llama-style, h 4, 2 heads in 1 key/value group, SwiGLU ffn 3, seq 5, vocab 7: qkv
    # 2*4*(4 + 2*2) = 64, proj 32, fc1 (gate and up) 2*4*6 = 48, fc2 24, scores 2*2*5*4 = 80;
    # output 2*4*7 = 56.
    llama = ModelSize(1, 4, 2, 3, 8, swiglu=True, num_query_groups=1)
    assert forward_flops_per_token(llama, 7, 5) == 304


def test_sketch_flops_add_projections_to_two_forwards():
    size = ModelSize(1, 16, 1, 32, 64)  # k = 8: q = 8 everywhere, w = 8
    per_layer = sum(2 * 8 * (i + o) + 2 * 64 for i, o in ((16, 48), (16, 16), (16, 32), (32, 16)))
    output = 2 * 8 * (16 + 128) + 2 * 64
    assert sketch_flops_per_token(size, 128, 10, 8) == \
        2 * forward_flops_per_token(size, 128, 10) + per_layer + output


def test_flop_counter_sums_roles_and_round_trips():
    counter = FlopCounter(2048, 64)
    sample = 64 * forward_flops_per_token(PRESETS["tiny"], 2048, 64)
    counter.add("learner", PRESETS["tiny"], 8, 3)
    counter.add("scoring", PRESETS["tiny"], 16, 1)
    record = counter.record()["flops"]
    assert record["learner"] == 24 * sample and record["scoring"] == 16 * sample
    assert record["total"] == 40 * sample and record["reference"] == record["sketch"] == 0
    other = FlopCounter(2048, 64)
    other.load_state_dict(counter.state_dict())
    assert other.record() == counter.record()


# -- SelectionConfig ----------------------------------------------------------------------------
def _config(*flags):
    return parse_config(["--vocab-size", "100", "--target-data-path", "v",
                         "--train-iters", "100", *flags]).selection


def test_rho_gets_blades_reference_budget_in_model_passes():
    # blade: 5 syncs over 100 steps (T = 20); K = 8 steps of V + replayed batch (2 passes); the
    # first sync replays no batch without warm-up (1 pass a step).
    rho = _config("--selection", "rho", "--blade-ref-steps", "8", "--blade-lambda", "0.5")
    assert rho.first_ref_steps == 8 + 4 * 8 * 2 and rho.lam == 0 and math.isinf(rho.sync_interval)
    warm = _config("--selection", "rho", "--blade-ref-steps", "8", "--selection-warmup-steps", "5",
                   "--blade-lambda", "0.5")
    assert warm.first_ref_steps == 8 * 2 + 4 * 8 * 2  # 95 steps: still 5 syncs; K0 replays
    anchored = _config("--selection", "rho", "--blade-ref-steps", "8",
                       "--blade-first-ref-steps", "60", "--blade-lambda", "0")
    assert anchored.first_ref_steps == 60 + 4 * 8
    assert _config("--selection", "rho", "--rho-ref-steps", "7").first_ref_steps == 7
    # With blade's defaults (K = 16, lambda = 0: one pass a step): 5 syncs x 16.
    assert _config("--selection", "rho").first_ref_steps == 5 * 16


def test_blade_config_resolves_its_flags():
    blade = _config("--selection", "blade", "--blade-ref-steps", "3", "--blade-sync-beta", "0.25",
                    "--reference-optimizer-state", "copy", "--reference-lr", "1e-4")
    assert (blade.ref_steps, blade.first_ref_steps, blade.sync_beta) == (3, 3, 0.25)
    assert blade.optimizer_state == "copy" and blade.reference_lr == 1e-4
    assert blade.keep_ratio == 0.5 and not blade.token_level and blade.proxy is None
    with pytest.raises(Exception):  # frozen
        blade.lam = 1.0


@pytest.mark.parametrize("flags,fragment", [
    (["--blade-sync-beta", "1.5"], "--blade-sync-beta"),
    (["--blade-first-ref-steps", "-1"], "--blade-first-ref-steps"),
    (["--reference-lr", "0"], "--reference-lr"),
    (["--selection-diversity", "0.1", "--selection-granularity", "token"], "granularity sample"),
])
def test_bad_selection_flags_name_the_flag(flags, fragment):
    with pytest.raises(UserError, match=fragment):
        _config("--selection", "blade", *flags)


# -- replay order -------------------------------------------------------------------------------
def test_replay_order_spreads_few_steps_and_cycles_many():
    assert replay_order(4, 20) == [0, 5, 10, 15]
    assert replay_order(3, 3) == [0, 1, 2]
    assert replay_order(5, 2) == [0, 1, 0, 1, 0]
    assert replay_order(2, 0) == [-1, -1]


# -- SelectionRecord ----------------------------------------------------------------------------
class _Index:
    """Two datasets; global id i belongs to dataset i // 10, main document (i % 10) // 2."""
    datasets = [None, None]
    prefixes = ["a", "b"]

    def num_documents(self, part):
        return 5

    def main_documents(self, ids):
        ids = numpy.asarray(ids)
        out = []
        for part in (0, 1):
            where = numpy.flatnonzero(ids // 10 == part)
            if len(where):
                out.append((part, where, (ids[where] % 10) // 2))
        return out


def test_record_updates_sidecars_and_noise_stats(tmp_path):
    labels = numpy.array([0, 1, 1, 0, 2], dtype=numpy.int16)  # clean, spam, spam, clean, blob
    record = SelectionRecord(_Index(), labels, ("clean", "spam", "blob"))
    ids = numpy.array([0, 2, 3, 8, 11, 19])  # docs 0, 1, 1, 4 of part 0; docs 0, 4 of part 1
    kept = numpy.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    scores = numpy.array([0.5, -1.0, 2.0, numpy.nan, 0.1, 0.3])
    stats = record.selection(ids, kept, scores)
    assert stats["kept_fraction"] == pytest.approx(4 / 6)
    # Labels exist for part 0 only: 4 labelled candidates, 3 of them kept.
    assert stats["noise_kept_rate"] == {"clean": 1.0, "spam": 0.5, "blob": 1.0}
    assert stats["trained_share"] == pytest.approx({"clean": 0.25, "spam": 0.25, "blob": 0.25})
    rows = record.sidecars[0].rows(numpy.array([0, 1, 4]))
    assert rows[:, 0].tolist() == [1, 2, 0]  # scored: doc 4's score was nan
    assert rows[:, 1].tolist() == [1, 1, 0]  # kept
    means = SelectionRecord.score_means(scores, kept.astype(bool), "excess")
    assert means == pytest.approx({"excess_kept": (0.5 + 2.0 + 0.3) / 3,
                                   "excess_dropped": (-1.0 + 0.1) / 2})
    record.save(str(tmp_path))
    restored = SelectionRecord(_Index())
    restored.load(str(tmp_path))
    assert numpy.array_equal(restored.sidecars[1].dense_table(), record.sidecars[1].dense_table())
    with pytest.raises(UserError, match="no sidecar"):
        SelectionRecord(_Index()).load(str(tmp_path / "missing"))


def test_score_quantiles_skip_nonfinite_scores():
    scores = numpy.array([numpy.nan, *range(11), numpy.inf])  # 0..10
    quantiles = SelectionRecord.score_quantiles(scores, "excess")["excess_quantiles"]
    assert quantiles == pytest.approx({"p10": 1.0, "p25": 2.5, "p50": 5.0, "p75": 7.5, "p90": 9.0})
    assert SelectionRecord.score_quantiles(numpy.array([numpy.nan]), "excess") == {}
