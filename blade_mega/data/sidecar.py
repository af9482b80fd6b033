"""The reweighting sidecar: per-document selection statistics, one float32 table per dataset.

Columns: how often a document's samples were scored, how often they were kept, and the sum of
their selection scores: excess loss, or influence for sketch-influence.  It biases future
candidate sampling (``--reweight-mix``), is saved with checkpoints, and
``tools/export_selection.py`` turns it into a filtered Megatron dataset.  Every rank holds the
same table (updates are computed from all-gathered scores); rank 0 writes the file.
"""

from __future__ import annotations

import io
import os

import numpy as np

from blade_mega.atomic import write_atomic

SCORED, KEPT, EXCESS_SUM = 0, 1, 2
SUFFIX = ".blade_sidecar.npy"


class Sidecar:
    def __init__(self, num_documents: int):
        self.table = np.zeros((num_documents, 3), dtype=np.float32)

    def update(self, documents: np.ndarray, kept: np.ndarray, scores: np.ndarray) -> None:
        """Record one selection round: documents scored, the share of each that was kept
        (0/1 for samples, a fraction for token-level masks), their (finite) scores."""
        finite = np.isfinite(scores)
        np.add.at(self.table[:, SCORED], documents[finite], 1.0)
        np.add.at(self.table[:, KEPT], documents[finite], kept[finite].astype(np.float32))
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
        buffer = io.BytesIO()
        np.save(buffer, self.table)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str, num_documents: int, prefix: str) -> "Sidecar":
        """Read a saved table, checking it belongs to the dataset ``prefix``."""
        from blade_mega.errors import UserError

        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable sidecar ({str(err).splitlines()[0]}); "
                            "pass the .blade_sidecar.npy saved in a checkpoint directory") from None
        if table.ndim != 2 or table.shape[1] != 3 or not np.issubdtype(table.dtype, np.floating):
            raise UserError(f"{path}: shape {table.shape} {table.dtype} is not a sidecar table "
                            "(documents x 3 floats); pass the .blade_sidecar.npy of a checkpoint")
        if table.shape[0] != num_documents:
            raise UserError(f"{path}: sidecar has {table.shape[0]} documents but {prefix} has "
                            f"{num_documents}; pass the --data-path this sidecar was trained on")
        sidecar = cls(num_documents)
        sidecar.table[:] = table
        return sidecar


def path_in(directory: str, prefix: str) -> str:
    """Where a checkpoint directory keeps the sidecar of dataset ``prefix``."""
    return os.path.join(directory, os.path.basename(prefix) + SUFFIX)
