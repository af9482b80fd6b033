"""The documents trained in the last few steps, which the reweighted draw must not pick again
(``--redraw-gap``).

The reweighted share favours documents with high keep rates, that is documents just trained on;
without this window it would draw them again at once. Per dataset of the blend it holds, for
each of the last ``gap`` steps, the sorted main documents trained at that step: at most
``gap`` x (documents of a block) ids, whatever the corpus size. It is a checkpoint part (its
state in the run state file, as tensors), so a resumed run rejects the same documents and draws
the same blocks.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


class RecentlyTrained:
    def __init__(self, gap: int, num_datasets: int):
        """``gap``: steps during which a trained document is not drawn again (>= 1)."""
        if gap < 1:
            raise ValueError("gap must be >= 1")
        self.gap = int(gap)
        self._rounds: list[deque] = [deque() for _ in range(num_datasets)]  # (step, documents)
        # documents(part, step) of the last call per dataset: a draw asks once per rejection
        # round, and the answer changes only with the step or an add
        self._cached: dict[int, tuple[int, np.ndarray]] = {}

    def add(self, step: int, part: int, documents: np.ndarray) -> None:
        """The main documents of dataset ``part`` trained at ``step`` (steps never decrease)."""
        self._cached.pop(part, None)
        rounds = self._rounds[part]
        rounds.append((int(step), np.unique(np.asarray(documents, dtype=np.int64))))
        # Draws come after this step: none looks back to step - gap or earlier any more.
        while rounds and rounds[0][0] <= step - self.gap:
            rounds.popleft()

    def documents(self, part: int, step: int) -> np.ndarray:
        """Sorted main documents of dataset ``part`` trained in steps step - gap .. step - 1.
        A step's own rounds do not count: they are of an attempt at it that was dropped."""
        cached = self._cached.get(part)
        if cached is not None and cached[0] == step:
            return cached[1]
        chosen = [documents for trained_at, documents in self._rounds[part]
                  if step - self.gap <= trained_at < step]
        documents = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
        self._cached[part] = (step, documents)
        return documents

    # -- run state (a checkpoint part: train/checkpointer.py) ----------------------------------
    def state_dict(self) -> dict:
        """Per dataset, every remembered document and the step it was trained at."""
        datasets = []
        for rounds in self._rounds:
            steps = [np.full(len(documents), step, dtype=np.int64) for step, documents in rounds]
            documents = [documents for _, documents in rounds]
            datasets.append({
                "steps": torch.from_numpy(np.concatenate(steps) if steps
                                          else np.zeros(0, dtype=np.int64)),
                "documents": torch.from_numpy(np.concatenate(documents) if documents
                                              else np.zeros(0, dtype=np.int64))})
        return {"datasets": datasets}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s window; an empty state (a checkpoint saved without
        --redraw-gap) leaves it empty."""
        self._rounds = [deque() for _ in self._rounds]
        self._cached = {}
        for part, saved in enumerate(state.get("datasets", [])[:len(self._rounds)]):
            steps, documents = saved["steps"].numpy(), saved["documents"].numpy()
            # Rounds were saved in step order: each run of one step is one round.
            starts = np.flatnonzero(np.diff(steps, prepend=steps[:1] - 1))
            for start, end in zip(starts, [*starts[1:], len(steps)]):
                self._rounds[part].append((int(steps[start]),
                                           np.array(documents[start:end], dtype=np.int64)))
