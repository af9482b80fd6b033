"""The few collectives of the run's plumbing (checkpoint files, sample-index builds), each named
for what it agrees on. All work without a process group (one process: the value itself).

The selection hook's collectives, which count their bytes, are ``selection.base.ProcessGroups``'.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")


def _up() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank(group=None) -> int:
    return torch.distributed.get_rank(group) if _up() else 0


def world_size(group=None) -> int:
    return torch.distributed.get_world_size(group) if _up() else 1


def barrier(group=None) -> None:
    if _up():
        torch.distributed.barrier(group=group)


def from_rank0(value: T, group=None) -> T:
    """Rank 0's ``value`` on every rank (a decision one rank made for all)."""
    if not _up():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    return box[0]


def first_problem(problem: Optional[str], group=None) -> Optional[str]:
    """The lowest rank's non-None ``problem``, on every rank (None if no rank had one): a failure
    on one rank stops them all with the same message instead of leaving the others waiting."""
    if not _up():
        return problem
    problems = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(problems, problem, group=group)
    return next((p for p in problems if p is not None), None)


def split_over_ranks(fn: Callable[[str], object], names, group=None) -> dict:
    """``{name: fn(name)}`` with the names shared out over the ranks (checksums of a large
    checkpoint read it once in all, not once per rank). Every rank must call it."""
    me, world = rank(group), world_size(group)
    mine = {name: fn(name) for name in sorted(names)[me::world]}
    if world == 1:
        return mine
    parts = [None] * world
    torch.distributed.all_gather_object(parts, mine, group=group)
    return {name: value for part in parts for name, value in part.items()}
