"""Greedy selection with a quadratic redundancy penalty, for any sample-level selector.

Maximise ``sum_{i in S} score_i - beta * sum_{i<j in S} <g_i, g_j>`` over sets of size k, one
sample at a time: the Frank-Wolfe step on that quadratic objective over the chosen set's
indicator, where each new vertex is the candidate with the best gain
``score_i - beta * sum_{j chosen} <g_i, g_j>``.  With ``beta = 0`` it is the plain top-k.
"""

from __future__ import annotations

import numpy as np


def greedy_diverse_top_k(scores: np.ndarray, ids: np.ndarray, gram: np.ndarray, k: int,
                         beta: float) -> np.ndarray:
    """Positions of up to k samples, in the order chosen; ties go to the smaller global id and
    non-finite gains are never chosen (like ``top_k_samples``)."""
    gain = np.asarray(scores, dtype=np.float64).copy()
    available = np.ones(len(gain), dtype=bool)
    chosen: list[int] = []
    for _ in range(min(k, len(gain))):
        usable = available & np.isfinite(gain)
        if not usable.any():
            break
        best = gain[usable].max()
        ties = np.flatnonzero(usable & (gain == best))
        pick = int(ties[np.argmin(ids[ties])])
        chosen.append(pick)
        available[pick] = False
        gain -= beta * gram[:, pick]
    return np.asarray(chosen, dtype=np.int64)
