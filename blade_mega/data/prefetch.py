"""Reading off the critical path: the next block's in-order samples are read on a background
thread while the current step runs.

The in-order part of a block depends only on the reading position, which the current step's
block already fixes, so it can be read ahead. The reweighted share depends on the sidecar after
this step and is read when the step starts. A miss (a prediction that did not hold, e.g. after
a dropped step) just reads directly: the values are the same either way.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

from blade_mega.data.sample_index import SampleIndex


class Prefetcher:
    def __init__(self, samples: SampleIndex):
        self.samples = samples
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blade-prefetch")
        self._pending: Optional[Future] = None
        self._ready: dict[int, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def start_step(self, next_ids: np.ndarray) -> None:
        """Make what was read ahead for this step available, and start reading ``next_ids``
        (the next step's in-order samples) in the background."""
        self._ready = self._pending.result() if self._pending is not None else {}
        self._pending = self._executor.submit(self._read, np.array(next_ids, dtype=np.int64))

    def _read(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        return {int(i): self.samples.tokens(int(i)) for i in ids}

    def get(self, global_id: int) -> Optional[np.ndarray]:
        tokens = self._ready.get(global_id)
        if tokens is None:
            self.misses += 1
        else:
            self.hits += 1
        return tokens

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
