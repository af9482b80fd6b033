"""``--selection uniform``: train on each block as read, score nothing, keep no sidecar."""

from __future__ import annotations

import numpy as np

from blade_mega.selection.base import SelectionHook, TrainBatch


class UniformSelector(SelectionHook):
    def select(self, step: int, block_ids: np.ndarray) -> TrainBatch:
        return self.uniform_batch(block_ids)
