"""The selection rules on their own: top-k with ties and non-finite scores."""

import math

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
