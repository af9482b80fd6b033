"""The reweighting sidecar: per-document selection statistics of one dataset, kept sparse.

Columns: how often a document's samples were scored, how often they were kept, and the sum of
their selection scores (excess loss, or influence for sketch-influence). It biases future
candidate sampling (``--reweight-mix``), is saved once per checkpoint, and
``tools/export_selection.py`` turns it into a filtered Megatron dataset.

Only documents that were ever scored have a row: a run scores ``steps x block`` candidates, a
small share of a 10^9-document corpus, so memory and checkpoint bytes grow with the run, not
the corpus. Rows live in a few sorted levels (a log-structured merge: each update adds a small
sorted level, equal-sized neighbours merge), so an update costs O(block log n) amortised and a
lookup O(log^2 n). Every rank holds the same rows: updates come from all-gathered scores.

With a half-life h (``--sidecar-half-life``) the counts forget: a round recorded at step t
weighs 2^(-(now - t)/h) when read at step ``now``, so judgements of an early, near-random
reference fade. Forward decay keeps that O(block log n): a round is stored weighted by
2^((t - reference)/h), a weight fixed when it is added, and reads scale the stored rows by
2^((reference - now)/h), so no row is touched by another document's update. Before those
weights could overflow float32, every row is rescaled once by a power of two (exact) and the
reference step moves up; rows that decayed below float32's range are dropped then.

A prior (``--sidecar-prior classifier``) replaces the 1/2 that a never-scored document's keep
rate starts from by a per-document probability (a static classifier's P(target), memory-mapped
beside the dataset): rates are (kept + 2p) / (scored + 2), the prior worth two rounds. It is
read, not stored: the saved rows are the same with or without it.

On disk (``<dataset>.blade_sidecar.npy``): one structured array sorted by document, memory-mapped
when read, and a ``.json`` beside it naming the dataset's document count (and, with a half-life,
the half-life and reference step the stored rows are weighted against).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from blade_mega.atomic import write_atomic
from blade_mega.errors import UserError

SCORED, KEPT, EXCESS_SUM = 0, 1, 2
SUFFIX = ".blade_sidecar.npy"
ROW = np.dtype([("document", "<i8"), ("scored", "<f4"), ("kept", "<f4"), ("score_sum", "<f4")])
# Rescale the rows once new rounds would weigh 2^REBASE_HALF_LIVES: stored values stay below
# 2^32 x (rounds per half-life) x |score|, far inside float32's 2^128.
REBASE_HALF_LIVES = 32


class _Level:
    def __init__(self, documents: np.ndarray, table: np.ndarray):
        self.documents = documents  # sorted, unique
        self.table = table          # [n, 3] float32


# A prior probability is clipped into this range, so that no document is certain either way
# before it is scored and the rejection sampler's acceptance rate stays bounded away from 0.
PRIOR_RANGE = (0.01, 0.99)


class Sidecar:
    def __init__(self, num_documents: int, half_life: int = 0,
                 prior: Optional[np.ndarray] = None):
        """``half_life``: steps after which a round weighs half (0: counts never forget);
        ``prior``: [num_documents] probabilities a document's keep rate starts from (None: 1/2)."""
        if half_life < 0:
            raise ValueError("half_life must be >= 0")
        self.num_documents = int(num_documents)
        self.half_life = int(half_life)
        if prior is not None and len(prior) != self.num_documents:
            raise ValueError(f"a prior of {len(prior)} documents for a sidecar of "
                             f"{self.num_documents}")
        self.prior = prior
        self.reference_step = 0  # stored rows hold sum_i x_i 2^((t_i - reference_step) / h)
        self._levels: list[_Level] = []

    def __len__(self) -> int:
        """Documents with a row (ever scored)."""
        return sum(len(level.documents) for level in self._levels)

    def _lookup(self, documents: np.ndarray):
        """For each level, (positions in ``documents`` found there, their rows in the level)."""
        found = []
        for level in self._levels:
            pos = np.searchsorted(level.documents, documents)
            pos_clipped = np.minimum(pos, len(level.documents) - 1)
            hit = level.documents[pos_clipped] == documents
            found.append((np.flatnonzero(hit), pos_clipped[hit]))
        return found

    def _check_step(self, step: Optional[int]) -> None:
        if self.half_life and step is None:
            raise ValueError("a sidecar with a half-life needs the step of each update and read")

    def update(self, documents: np.ndarray, kept: np.ndarray, scores: np.ndarray,
               step: Optional[int] = None) -> None:
        """Record one selection round at ``step``: documents scored, the share of each that was
        kept (0/1 for samples, a fraction for token-level masks), their (finite) scores.
        ``step`` matters (and is required) only with a half-life."""
        self._check_step(step)
        documents = np.asarray(documents, dtype=np.int64)
        finite = np.isfinite(scores)
        if not finite.any():
            return
        unique, inverse = np.unique(documents[finite], return_inverse=True)
        add = np.zeros((len(unique), 3), dtype=np.float64)
        np.add.at(add[:, SCORED], inverse, 1.0)
        np.add.at(add[:, KEPT], inverse, np.asarray(kept, dtype=np.float64)[finite])
        np.add.at(add[:, EXCESS_SUM], inverse, np.asarray(scores, dtype=np.float64)[finite])
        if self.half_life:
            if step - self.reference_step >= REBASE_HALF_LIVES * self.half_life:
                self._rebase(step)
            add *= 2.0 ** ((step - self.reference_step) / self.half_life)
        add = add.astype(np.float32)
        new = np.ones(len(unique), dtype=bool)
        for level, (where, rows) in zip(self._levels, self._lookup(unique)):
            level.table[rows] += add[where]
            new[where] = False
        if new.any():
            self._levels.append(_Level(unique[new], add[new]))
            self._compact()

    def _compact(self) -> None:
        # Merge while the newest level is at least half its older neighbour: O(log n) levels.
        while len(self._levels) > 1 and \
                2 * len(self._levels[-1].documents) >= len(self._levels[-2].documents):
            newer, older = self._levels.pop(), self._levels.pop()
            documents = np.concatenate([older.documents, newer.documents])
            order = np.argsort(documents, kind="stable")
            self._levels.append(_Level(documents[order],
                                       np.concatenate([older.table, newer.table])[order]))

    def _rebase(self, step: int) -> None:
        """Move the reference step up by whole half-lives to at most ``step``, rescaling every
        row by the matching power of two (exact unless it underflows). O(rows), once every
        REBASE_HALF_LIVES half-lives."""
        half_lives = (step - self.reference_step) // self.half_life
        documents, table = self.sorted_rows()
        table = np.ldexp(table, -half_lives)
        # Decayed below float32's range: no weight left, so no row (as if never scored).
        alive = table[:, SCORED] > 0
        self._levels = [_Level(documents[alive], table[alive])] if alive.any() else []
        self.reference_step += half_lives * self.half_life

    def rows(self, documents: np.ndarray) -> np.ndarray:
        """[n, 3] stored statistics of ``documents`` (zeros for documents never scored). With a
        half-life they are weighted against ``reference_step``: per-document ratios (keep
        share, mean score) read directly, counts through ``decayed_rows``."""
        documents = np.asarray(documents, dtype=np.int64)
        out = np.zeros((len(documents), 3), dtype=np.float32)
        for level, (where, rows) in zip(self._levels, self._lookup(documents)):
            out[where] = level.table[rows]
        return out

    def decayed_rows(self, documents: np.ndarray, step: Optional[int] = None) -> np.ndarray:
        """[n, 3] float64 statistics as of ``step``: each round weighted 2^(-(step - t)/h)
        (without a half-life: the all-time counts)."""
        self._check_step(step)
        rows = self.rows(documents).astype(np.float64)
        if self.half_life:
            rows *= 2.0 ** ((self.reference_step - step) / self.half_life)
        return rows

    def keep_rate(self, documents: np.ndarray, step: Optional[int] = None) -> np.ndarray:
        """Smoothed fraction of times each document was kept, (kept + 1) / (scored + 2) of the
        counts as of ``step``; 0.5 for documents never scored (or long forgotten). With a prior
        p: (kept + 2p) / (scored + 2), p for documents never scored."""
        if not self.half_life:
            rows = self.rows(documents)
            kept, scored = rows[:, KEPT].astype(np.float64), rows[:, SCORED]
        else:
            rows = self.decayed_rows(documents, step)
            kept, scored = rows[:, KEPT], rows[:, SCORED]
        if self.prior is None:
            return (kept + 1.0) / (scored + 2.0)
        prior = np.clip(np.asarray(self.prior[np.asarray(documents, dtype=np.int64)],
                                   dtype=np.float64), *PRIOR_RANGE)
        return (kept + 2.0 * prior) / (scored + 2.0)

    def sorted_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(documents, [n, 3] table) of every scored document, sorted by document."""
        if not self._levels:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.float32)
        documents = np.concatenate([level.documents for level in self._levels])
        table = np.concatenate([level.table for level in self._levels])
        order = np.argsort(documents, kind="stable")
        return documents[order], table[order]

    def dense_table(self) -> np.ndarray:
        """[num_documents, 3] stored rows (see ``rows``): for offline tools that walk every
        document anyway (export, which reads ratios)."""
        table = np.zeros((self.num_documents, 3), dtype=np.float32)
        documents, rows = self.sorted_rows()
        table[documents] = rows
        return table

    def mean_excess(self, documents: np.ndarray) -> np.ndarray:
        rows = self.rows(documents)
        return np.divide(rows[:, EXCESS_SUM], rows[:, SCORED], out=np.zeros(len(rows), np.float32),
                         where=rows[:, SCORED] > 0)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Atomic write of the rows and the document count: a reader never sees half a table."""
        documents, table = self.sorted_rows()
        records = np.empty(len(documents), dtype=ROW)
        records["document"] = documents
        records["scored"], records["kept"], records["score_sum"] = table.T
        with open(path + ".tmp", "wb") as f:
            np.save(f, records)
        os.replace(path + ".tmp", path)
        meta = {"documents": self.num_documents, "rows": int(len(documents))}
        if self.half_life:  # without one the file is as it always was
            meta.update(half_life=self.half_life, reference_step=self.reference_step)
        write_atomic(_meta_path(path), json.dumps(meta))

    @classmethod
    def load(cls, path: str, num_documents: int, prefix: str) -> "Sidecar":
        """Read a saved sidecar (memory-mapped), checking it belongs to the dataset ``prefix``,
        with the half-life it was saved with (files without one: 0). Also reads the dense
        [documents x 3] tables of earlier versions."""
        try:
            records = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable sidecar ({str(err).splitlines()[0]}); "
                            "pass the .blade_sidecar.npy saved in a checkpoint directory") from None
        meta = _saved_meta(path)
        sidecar = cls(num_documents, _meta_int(meta, "half_life", path))
        sidecar.reference_step = _meta_int(meta, "reference_step", path)
        if records.dtype == ROW and records.ndim == 1:
            saved_documents = meta.get("documents")
            if saved_documents is not None and saved_documents != num_documents:
                raise UserError(f"{path}: sidecar is of a dataset of {saved_documents} documents "
                                f"but {prefix} has {num_documents}; pass the --data-path this "
                                "sidecar was trained on")
            documents = np.asarray(records["document"])
            if len(documents) and (documents[-1] >= num_documents or documents[0] < 0):
                raise UserError(f"{path}: sidecar names document {int(documents[-1])} but {prefix} "
                                f"has {num_documents}; pass the --data-path it was trained on")
            table = np.stack([records["scored"], records["kept"], records["score_sum"]], axis=1)
        elif records.ndim == 2 and records.shape[1] == 3 and \
                np.issubdtype(records.dtype, np.floating):
            if records.shape[0] != num_documents:
                raise UserError(f"{path}: sidecar has {records.shape[0]} documents but {prefix} "
                                f"has {num_documents}; pass the --data-path this sidecar was "
                                "trained on")
            documents = np.flatnonzero(np.asarray(records[:, SCORED]) > 0)
            table = np.asarray(records[documents])
        else:
            raise UserError(f"{path}: {records.shape} {records.dtype} is not a sidecar table; "
                            "pass the .blade_sidecar.npy of a checkpoint")
        if len(documents):
            sidecar._levels = [_Level(np.array(documents, dtype=np.int64),
                                      np.array(table, dtype=np.float32))]
        return sidecar


def _meta_path(path: str) -> str:
    return path[:-len(".npy")] + ".json" if path.endswith(".npy") else path + ".json"


def _saved_meta(path: str) -> dict:
    """The ``.json`` beside a sidecar; {} when it is missing or unreadable (as in old files)."""
    try:
        with open(_meta_path(path)) as f:
            meta = json.load(f)
        meta = meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}
    try:
        meta["documents"] = int(meta["documents"])
    except (KeyError, TypeError, ValueError):
        meta.pop("documents", None)
    return meta


def _meta_int(meta: dict, key: str, path: str) -> int:
    """A non-negative whole number of the ``.json`` (0 when absent): the decay's settings must
    be read exactly or not at all."""
    value = meta.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{_meta_path(path)}: {key} {value!r} is not a whole number of steps; "
                        "pass a sidecar saved by blade-pretrain")
    return value


def path_in(directory: str, prefix: str) -> str:
    """Where a checkpoint directory keeps the sidecar of dataset ``prefix``."""
    return os.path.join(directory, os.path.basename(prefix) + SUFFIX)
