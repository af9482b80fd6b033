"""Candidate-block sampler: which global sample ids a step looks at.

A block is the random block of the memoryless block-coordinate Frank-Wolfe step: ``size`` samples,
most read in the blend's order (advancing ``consumed``), a ``reweight_mix`` share drawn in
proportion to the sidecar's keep rates.  A block depends only on (seed, step, consumed, sidecar),
so a resumed run draws the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from blade_mega.data.samples import BlendedWindows
from blade_mega.data.sidecar import Sidecar
from blade_mega.errors import UserError


@dataclass(frozen=True)
class Block:
    ids: np.ndarray   # global sample ids, in block order
    consumed: int     # reading positions used by this block


class CandidateBlockSampler:
    def __init__(self, windows: BlendedWindows, seed: int, reweight_mix: float = 0.0,
                 sidecars: Optional[list[Sidecar]] = None):
        if not 0.0 <= reweight_mix <= 1.0:
            raise ValueError("reweight_mix must be in [0, 1]")
        self.windows = windows
        self.seed = seed
        self.reweight_mix = reweight_mix if sidecars else 0.0
        self.sidecars = sidecars
        # Main document of every sample, per dataset: fixed, so computed once.
        self._documents = [w.main_documents(np.arange(len(w))) for w in windows.parts] \
            if self.reweight_mix else []

    def block(self, step: int, consumed: int, size: int) -> Block:
        biased = int(round(self.reweight_mix * size))
        in_order = self.windows.ordered_ids(consumed, size - biased)
        if biased == 0:
            return Block(in_order, size)
        rng = np.random.default_rng([self.seed, step, 0xB1A5])
        weights = self.sample_weights()
        weights[in_order] = 0.0  # a sample appears at most once per block
        if np.count_nonzero(weights) < biased:
            raise UserError(f"--reweight-mix: the training split has {len(weights)} samples, too "
                            f"few for candidate blocks of {size}; use more data or a lower mix")
        drawn = rng.choice(len(weights), size=biased, replace=False, p=weights / weights.sum())
        return Block(np.concatenate([in_order, drawn.astype(np.int64)]), size - biased)

    def sample_weights(self) -> np.ndarray:
        """Each sample's weight: its main document's keep rate, times its dataset's blend weight."""
        weights = np.empty(len(self.windows), dtype=np.float64)
        for part, (documents, sidecar) in enumerate(zip(self._documents, self.sidecars)):
            start, stop = self.windows.offsets[part], self.windows.offsets[part + 1]
            rate = sidecar.keep_rate()[documents]
            weights[start:stop] = self.windows.weights[part] * rate / rate.sum()
        return weights
