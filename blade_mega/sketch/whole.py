"""Whole-model sketches from each rank's partials: only sketch-sized tensors cross ranks.

A rank's ``GradientSketcher`` gives its TP shard's partial sketch of its pipeline stage's
layers.  Placed in the layers' slots of the whole model's sketch (zero elsewhere) and summed over
the model-parallel group, TP partials add and PP stages fill their own slots; gathered over DP,
every rank holds every candidate's whole sketch.
"""

from __future__ import annotations

import torch

from blade_mega.sketch.sketcher import GradientSketcher


def place_in_slots(partial: torch.Tensor, sketcher: GradientSketcher) -> torch.Tensor:
    """[..., local layers, k, k] partial sketches -> [..., num_slots * k^2], zero elsewhere."""
    lead = partial.shape[:-3]
    placed = partial.new_zeros(*lead, sketcher.num_slots, sketcher.slot_size)
    placed[..., sketcher.slots.to(partial.device), :] = partial.flatten(-2)
    return placed.flatten(-2)


def whole_sketches(partial: torch.Tensor, sketcher: GradientSketcher, groups) -> torch.Tensor:
    """This rank's partial sketches of its DP share -> every sample's whole-model sketch
    [n, num_slots * k^2] (block order), on every rank. ``groups``: the hook's ProcessGroups
    (its collectives count the bytes sent)."""
    whole = groups.all_reduce(place_in_slots(partial, sketcher), groups.mp)
    return groups.all_gather(whole, groups.dp)
