"""Reading a run's evaluation curve: when it first reaches a level, and where it stands at a
budget. A curve is a list of ``(x, value)`` points in evaluation order, ``x`` the steps, the
analytic FLOPs (all roles) or the training wall seconds at that evaluation."""

from __future__ import annotations

import math
from typing import Optional, Sequence

Curve = Sequence[tuple]


def first_at_or_below(curve: Curve, level: float) -> float:
    """``x`` of the first point whose value is at or below ``level``; inf if none is."""
    for x, value in curve:
        if value is not None and value <= level:
            return x
    return math.inf


def steps_to_reach(curve: Curve, level: float, total: int) -> float:
    """Steps to the first evaluation at or below ``level``, over ``total`` steps; inf if never."""
    return first_at_or_below(curve, level) / total


def _share_to_reach(curve: Curve, level: float, total: Optional[float]) -> Optional[float]:
    if not total or any(x is None for x, _ in curve):
        return None
    return first_at_or_below(curve, level) / total


def compute_to_reach(flops_curve: Curve, level: float, total_flops: Optional[float]
                     ) -> Optional[float]:
    """All roles' FLOPs at the first evaluation at or below ``level``, over ``total_flops``
    (uniform's whole run); inf if never, None if the log has no FLOPs."""
    return _share_to_reach(flops_curve, level, total_flops)


def wall_to_reach(wall_curve: Curve, level: float, total_wall_s: Optional[float]
                  ) -> Optional[float]:
    """Cumulative training wall seconds at the first evaluation at or below ``level``, over
    ``total_wall_s`` (uniform's whole run); inf if never, None if the log has no ``wall_s``.
    Every second of the run up to the crossing counts: a static reference's budget before its
    first selected step, a dynamic one's sync windows."""
    return _share_to_reach(wall_curve, level, total_wall_s)


def loss_at_compute(flops_curve: Curve, budget: Optional[float]) -> Optional[float]:
    """The value of the last evaluation within ``budget`` FLOPs (all roles): the model the same
    compute buys; None if the log has no FLOPs or no evaluation fits the budget."""
    if not budget or any(flops is None for flops, _ in flops_curve):
        return None
    within = [value for flops, value in flops_curve if flops <= budget * (1 + 1e-9)]
    return within[-1] if within else None
