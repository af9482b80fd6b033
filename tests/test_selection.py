"""The selection rules on their own: top-k with ties and non-finite scores, sidecar bookkeeping."""

import math

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blade_mega.data.sidecar import KEPT, SCORED, Sidecar
from blade_mega.errors import UserError
from blade_mega.selection.excess_loss import top_k_samples, top_k_token_mask

nan, inf = math.nan, math.inf


def test_top_k_samples_ranks_by_score_then_global_id_and_skips_nonfinite():
    scores = numpy.array([1.0, 3.0, 3.0, nan, 2.0, inf, -inf, 3.0])
    ids = numpy.array([70, 50, 10, 0, 40, 5, 1, 30])
    # The three 3.0s go in id order (10, 30, 50), then 2.0; nan and +-inf are never chosen.
    assert top_k_samples(scores, ids, 4).tolist() == [2, 7, 1, 4]
    assert top_k_samples(scores, ids, 8).tolist() == [2, 7, 1, 4, 0]


def test_top_k_token_mask_keeps_exactly_k_ties_to_earlier_tokens():
    scores = torch.tensor([[0.5, 2.0, 2.0, nan], [2.0, -inf, inf, 1.0]])
    mask = top_k_token_mask(scores, 3)
    assert mask.shape == scores.shape
    assert mask.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    # Not enough finite scores: every finite one, nothing else.
    assert top_k_token_mask(scores, 7).tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, nan, inf]), min_size=1, max_size=40),
       st.integers(min_value=0, max_value=45))
def test_top_k_token_mask_properties(values, k):
    scores = torch.tensor(values)
    mask = top_k_token_mask(scores, k)
    finite = torch.isfinite(scores)
    assert int(mask.sum()) == min(k, int(finite.sum()))
    assert not bool((mask.bool() & ~finite).any())
    kept, dropped = scores[mask.bool()], scores[~mask.bool() & finite]
    if len(kept) and len(dropped):
        assert kept.min() >= dropped.max()
        # Among equal scores the earlier token wins.
        tie = float(kept.min())
        positions = torch.nonzero(scores == tie).flatten()
        assert mask[positions].tolist() == sorted(mask[positions].tolist(), reverse=True)


def test_sidecar_counts_finite_scores_only(tmp_path):
    sidecar = Sidecar(4)
    sidecar.update(numpy.array([0, 1, 1, 2]), numpy.array([True, False, True, True]),
                   numpy.array([1.0, 2.0, 4.0, nan]))
    assert sidecar.table[:, SCORED].tolist() == [1, 2, 0, 0]
    assert sidecar.table[:, KEPT].tolist() == [1, 1, 0, 0]
    assert sidecar.mean_excess().tolist() == [1.0, 3.0, 0.0, 0.0]
    # (kept + 1) / (scored + 2): unscored documents sit at 0.5.
    assert numpy.allclose(sidecar.keep_rate(), [2 / 3, 0.5, 0.5, 0.5])
    path = str(tmp_path / "s.blade_sidecar.npy")
    sidecar.save(path)
    assert numpy.array_equal(Sidecar.load(path, 4, "pool").table, sidecar.table)
    with pytest.raises(UserError, match="sidecar has 4 documents but pool has 5"):
        Sidecar.load(path, 5, "pool")


def test_hook_refuses_a_checkpoint_sidecar_of_other_data():
    from types import SimpleNamespace

    from blade_mega.sketch.influence import SketchInfluenceSelector

    mine = [Sidecar(5), Sidecar(3)]
    hook = SketchInfluenceSelector.__new__(SketchInfluenceSelector)  # only its bookkeeping
    hook.ctx = SimpleNamespace(sidecars=mine)
    good = [numpy.full((5, 3), 1.0, numpy.float32), numpy.full((3, 3), 2.0, numpy.float32)]
    hook.load_state_dict({"sidecars": good, "target_consumed": 7})
    assert mine[0].table.sum() == 15 and mine[1].table.sum() == 18
    with pytest.raises(UserError, match=r"sidecar tables \[\(4, 3\), \(3, 3\)\].*--data-path"):
        hook.load_state_dict({"sidecars": [numpy.zeros((4, 3)), good[1]], "target_consumed": 7})
    with pytest.raises(UserError, match="do not match"):
        hook.load_state_dict({"sidecars": good[:1], "target_consumed": 7})
