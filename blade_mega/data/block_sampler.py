"""Candidate-block sampler: which global sample ids a step looks at.

A block is the random block of the memoryless block-coordinate Frank-Wolfe step: ``size`` samples,
most read in the blend's order (advancing ``consumed``), a ``reweight_mix`` share drawn in
proportion to the sidecar's keep rates (as of the step: they may decay, data/sidecar.py), never a
sample whose main document was trained in the last ``--redraw-gap`` steps
(data/recently_trained.py). A block depends only on (seed, step, consumed, sidecar, recently
trained), so a resumed run draws the same blocks.

The reweighted share costs O(block) per step whatever the corpus size: a dataset is chosen by
its blend weight, then samples of it are tried uniformly, each accepted with its main document's
keep rate (rejection sampling; rates are at most 1, and about half on average, so about two
tries per drawn sample). That draws each sample with probability proportional to its keep rate
within its dataset, exactly, without an array over all samples. A recently trained document's
rate is 0: its samples are rejected like any other, with the same random numbers used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from blade_mega.data.recently_trained import RecentlyTrained
from blade_mega.data.sample_index import SampleIndex
from blade_mega.data.sidecar import Sidecar
from blade_mega.errors import UserError

MAX_ROUNDS = 1000  # rejection rounds before giving up (only a corpus smaller than a block gets near)


@dataclass(frozen=True)
class Block:
    ids: np.ndarray   # global sample ids, in block order
    consumed: int     # reading positions used by this block


class CandidateBlockSampler:
    def __init__(self, samples: SampleIndex, seed: int, reweight_mix: float = 0.0,
                 sidecars: Optional[list[Sidecar]] = None,
                 recently_trained: Optional[RecentlyTrained] = None):
        if not 0.0 <= reweight_mix <= 1.0:
            raise ValueError("reweight_mix must be in [0, 1]")
        self.samples = samples
        self.seed = seed
        self.reweight_mix = reweight_mix if sidecars else 0.0
        self.sidecars = sidecars
        self.recently_trained = recently_trained

    def in_order_size(self, size: int) -> int:
        return size - int(round(self.reweight_mix * size))

    def block(self, step: int, consumed: int, size: int) -> Block:
        in_order_count = self.in_order_size(size)
        in_order = self.samples.ordered_ids(consumed, in_order_count)
        biased = size - in_order_count
        if biased == 0:
            return Block(in_order, size)
        rng = np.random.default_rng([self.seed, step, 0xB1A5])
        drawn = self.draw(rng, biased, exclude=in_order, step=step)
        return Block(np.concatenate([in_order, drawn]), in_order_count)

    def draw(self, rng: np.random.Generator, count: int, exclude: np.ndarray, step: int
             ) -> np.ndarray:
        """``count`` distinct global ids not in ``exclude``, each drawn with probability
        proportional to (blend weight of its dataset) x (keep rate of its main document at
        ``step``, 0 if trained in the last --redraw-gap steps) / (sum of its dataset's rates):
        sequential draws without replacement."""
        if len(self.samples) - len(np.unique(exclude)) < count:
            raise UserError(f"--reweight-mix: the training split has {len(self.samples)} samples, "
                            f"too few for candidate blocks of {len(exclude) + count}; use more "
                            "data or a lower mix")
        taken = set(int(i) for i in exclude)
        # Which dataset each drawn sample comes from: by blend weight, exactly as before rates.
        parts = rng.choice(len(self.samples.datasets), size=count, p=self.samples.weights)
        drawn = np.empty(count, dtype=np.int64)
        for part in range(len(self.samples.datasets)):
            slots = np.flatnonzero(parts == part)
            drawn[slots] = self._draw_in(rng, part, len(slots), taken, step)
        return drawn

    def _draw_in(self, rng: np.random.Generator, part: int, count: int, taken: set, step: int
                 ) -> list:
        """``count`` new ids of dataset ``part`` by keep rate: uniform tries, each accepted
        with its main document's rate."""
        start, size = int(self.samples.offsets[part]), int(self.samples.offsets[part + 1]
                                                          - self.samples.offsets[part])
        drawn: list[int] = []
        for _ in range(MAX_ROUNDS):
            need = count - len(drawn)
            if need == 0:
                return drawn
            tries = 2 * need + 8
            ids = start + (rng.random(tries) * size).astype(np.int64)
            accept = rng.random(tries) < self.keep_rates(ids, step)
            for global_id in ids[accept]:
                global_id = int(global_id)
                if global_id not in taken and len(drawn) < count:
                    taken.add(global_id)
                    drawn.append(global_id)
        if len(drawn) < count:
            if self.recently_trained is None:
                outside, remedy = "", "more data or a lower mix"
            else:
                outside = (" outside the documents trained in the last "
                           f"{self.recently_trained.gap} steps")
                remedy = "more data, a lower mix or a lower --redraw-gap"
            raise UserError(f"--reweight-mix: could not draw {count} distinct samples of "
                            f"{self.samples.prefixes[part]} by keep rate{outside}; use {remedy}")
        return drawn

    def keep_rates(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Each sample's acceptance rate at ``step``: its main document's keep rate, 0 where
        that document was trained in the last --redraw-gap steps."""
        rates = np.empty(len(ids), dtype=np.float64)
        for part, where, documents in self.samples.main_documents(ids):
            rates[where] = self.sidecars[part].keep_rate(documents, step)
            if self.recently_trained is not None:
                rates[where[np.isin(documents, self.recently_trained.documents(part, step))]] = 0
        return rates
