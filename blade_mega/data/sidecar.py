"""The reweighting sidecar: per-document selection statistics, one float32 table per dataset.

Columns: how often a document's samples were scored, how often they were kept, and the sum of
their excess-loss scores.  It biases future candidate sampling (``--reweight-mix``), is saved with
checkpoints, and ``tools/export_selection.py`` turns it into a filtered Megatron dataset.  Every
rank holds the same table (updates are computed from all-gathered scores); rank 0 writes the file.
"""

from __future__ import annotations

import os

import numpy as np

SCORED, KEPT, EXCESS_SUM = 0, 1, 2
SUFFIX = ".blade_sidecar.npy"


class Sidecar:
    def __init__(self, num_documents: int):
        self.table = np.zeros((num_documents, 3), dtype=np.float32)

    def update(self, documents: np.ndarray, kept: np.ndarray, scores: np.ndarray) -> None:
        """Record one selection round: documents scored, which were kept, their (finite) scores."""
        finite = np.isfinite(scores)
        np.add.at(self.table[:, SCORED], documents[finite], 1.0)
        np.add.at(self.table[:, KEPT], documents[finite & kept], 1.0)
        np.add.at(self.table[:, EXCESS_SUM], documents[finite], scores[finite].astype(np.float32))

    def keep_rate(self) -> np.ndarray:
        """Smoothed fraction of times each document was kept; 0.5 for documents never scored."""
        return (self.table[:, KEPT] + 1.0) / (self.table[:, SCORED] + 2.0)

    def mean_excess(self) -> np.ndarray:
        scored = self.table[:, SCORED]
        return np.divide(self.table[:, EXCESS_SUM], scored, out=np.zeros_like(scored),
                         where=scored > 0)

    def save(self, path: str) -> None:
        """Atomic write: a reader never sees a half-written table."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, self.table)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, num_documents: int) -> "Sidecar":
        from blade_mega.errors import UserError

        try:
            table = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable sidecar ({err}); delete it or point "
                            "--sidecar-dir elsewhere") from None
        if table.shape != (num_documents, 3) or table.dtype != np.float32:
            raise UserError(f"{path}: sidecar has shape {table.shape}, expected "
                            f"({num_documents}, 3) float32; it belongs to another dataset")
        sidecar = cls(num_documents)
        sidecar.table[:] = table
        return sidecar
