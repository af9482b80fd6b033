"""Sample index: fixed-length token windows over Megatron indexed datasets, with global ids.

Each dataset's documents (in a seeded order) are concatenated and cut into windows of
``seq_length + 1`` tokens, like Megatron's ``GPTDataset``.  A sample's *global id* is its offset in
the blend (dataset offset + window number): selection scores, the reweighting sidecar and
checkpoints all talk in global ids, so every rank and every resumed run agrees on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from blade_mega.data.inspect import verify
from blade_mega.errors import UserError


def open_indexed(prefix: str) -> IndexedDataset:
    """Open ``prefix.bin/.idx`` with a one-line error naming the missing or broken file."""
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; pass the prefix of a dataset written by "
                            "tools/preprocess_data.py (without .bin/.idx)")
    verify(prefix)  # header, dtype and pointer checks: a clear error instead of a crash later
    return IndexedDataset(prefix, mmap=True)


@dataclass(frozen=True)
class SplitRange:
    """Which documents of a dataset a split uses: [start, stop) of the document list."""
    start: int
    stop: int


def split_documents(num_docs: int, weights: tuple[float, ...], which: int) -> SplitRange:
    """Megatron-style ``--split 98,2``: contiguous document ranges in proportion to weights."""
    total = float(sum(weights))
    bounds = np.round(np.cumsum([0.0] + [w / total for w in weights]) * num_docs).astype(int)
    return SplitRange(int(bounds[which]), int(bounds[which + 1]))


class TokenWindows:
    """The windows of one dataset (or one split of it)."""

    def __init__(self, prefix: str, seq_length: int, seed: int,
                 split: SplitRange | None = None, dataset: IndexedDataset | None = None):
        self.prefix = prefix
        self.seq_length = seq_length
        self.dataset = dataset if dataset is not None else open_indexed(prefix)
        lengths = self.dataset.sequence_lengths.astype(np.int64)
        split = split or SplitRange(0, len(lengths))
        rng = np.random.default_rng([seed, 0x5A3])
        # Document order is shuffled once so windows mix documents, but fixed by the seed.
        self.documents = split.start + rng.permutation(split.stop - split.start)
        self.doc_lengths = lengths[self.documents]
        self.doc_starts = np.concatenate([[0], np.cumsum(self.doc_lengths)])
        total = int(self.doc_starts[-1])
        self.num_samples = max(0, (total - 1) // seq_length)
        if self.num_samples == 0:
            raise UserError(
                f"{get_bin_path(prefix)}: {total} tokens in this split is fewer than one sample of "
                f"--seq-length {seq_length} + 1; use a shorter --seq-length or more data")

    def __len__(self) -> int:
        return self.num_samples

    def _pieces(self, index: int):
        """(document id, offset in document, length) pieces covering window ``index``."""
        begin = index * self.seq_length
        end = begin + self.seq_length + 1
        first = int(np.searchsorted(self.doc_starts, begin, side="right")) - 1
        position = begin
        slot = first
        while position < end:
            doc_begin = int(self.doc_starts[slot])
            offset = position - doc_begin
            length = min(int(self.doc_lengths[slot]) - offset, end - position)
            if length > 0:
                yield int(self.documents[slot]), offset, length
            position += max(length, 0)
            slot += 1

    def tokens(self, index: int) -> np.ndarray:
        parts = [self.dataset.get(doc, offset=offset, length=length)
                 for doc, offset, length in self._pieces(index)]
        return np.concatenate(parts).astype(np.int64)

    def token_documents(self, index: int) -> np.ndarray:
        """The document id of each of the window's ``seq_length + 1`` tokens."""
        return np.concatenate([np.full(length, doc, dtype=np.int64)
                               for doc, _, length in self._pieces(index)])

    def main_documents(self, indices: np.ndarray) -> np.ndarray:
        """The document under each window's midpoint: the one a window is credited to."""
        middle = np.asarray(indices, dtype=np.int64) * self.seq_length + self.seq_length // 2
        return self.documents[np.searchsorted(self.doc_starts, middle, side="right") - 1]


class BlendedWindows:
    """Several ``TokenWindows`` with global ids laid end to end, and a blended reading order.

    The order visits dataset d with probability ``weights[d]`` (Megatron's greedy blending, from
    ``megatron.core.datasets.helpers``); inside each dataset, each epoch is a fresh permutation.
    """

    def __init__(self, parts: list[TokenWindows], weights: list[float], seed: int,
                 vocab_size: int | None = None):
        if len(parts) != len(weights):
            raise UserError("--data-path: give a weight for every dataset prefix, or none")
        self.parts = parts
        self.weights = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.seed = seed
        self.vocab_size = vocab_size
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self._blend_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, global_id: int) -> tuple[int, int]:
        part = int(np.searchsorted(self.offsets, global_id, side="right")) - 1
        return part, int(global_id - self.offsets[part])

    def tokens(self, global_id: int) -> np.ndarray:
        part, local = self.locate(global_id)
        tokens = self.parts[part].tokens(local)
        low, high = int(tokens.min()), int(tokens.max())
        if self.vocab_size is not None and (low < 0 or high >= self.vocab_size):
            bad = high if high >= self.vocab_size else low
            raise UserError(
                f"{get_bin_path(self.parts[part].prefix)}: token id {bad} is outside "
                f"the model's vocab of {self.vocab_size}; the dataset was made with another "
                "tokenizer: re-run tools/preprocess_data.py with this --tokenizer-model")
        return tokens

    def read(self, global_ids) -> torch.Tensor:
        """The windows of ``global_ids`` as one [n, seq_length + 1] int64 tensor."""
        return torch.from_numpy(np.stack([self.tokens(int(i)) for i in global_ids]))

    def token_documents(self, global_id: int) -> tuple[int, np.ndarray]:
        part, local = self.locate(global_id)
        return part, self.parts[part].token_documents(local)

    def main_documents(self, global_ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """For each dataset: (part, positions in ``global_ids``, main document of those samples)."""
        global_ids = np.asarray(global_ids, dtype=np.int64)
        parts = np.searchsorted(self.offsets, global_ids, side="right") - 1
        result = []
        for part in np.unique(parts):
            where = np.nonzero(parts == part)[0]
            local = global_ids[where] - self.offsets[part]
            result.append((int(part), where, self.parts[part].main_documents(local)))
        return result

    def _blend(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self._blend_cache is None or self._blend_cache[0] < size:
            from megatron.core.datasets import helpers

            size = max(size, 2 * (self._blend_cache[0] if self._blend_cache else 1024))
            dataset_index = np.zeros(size, dtype=np.int16)
            dataset_sample_index = np.zeros(size, dtype=np.int64)
            helpers.build_blending_indices(dataset_index, dataset_sample_index, self.weights,
                                           len(self.parts), size, False)
            self._blend_cache = (size, dataset_index, dataset_sample_index)
        return self._blend_cache[1], self._blend_cache[2]

    def _permutation(self, part: int, epoch: int) -> np.ndarray:
        key = (part, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, part, epoch])
            self._perm_cache[key] = rng.permutation(len(self.parts[part]))
        return self._perm_cache[key]

    def ordered_ids(self, start: int, count: int) -> np.ndarray:
        """Global ids at reading positions [start, start + count)."""
        dataset_index, dataset_sample_index = self._blend(start + count)
        ids = np.empty(count, dtype=np.int64)
        for i, position in enumerate(range(start, start + count)):
            part = int(dataset_index[position])
            local_position = int(dataset_sample_index[position])
            n = len(self.parts[part])
            local = self._permutation(part, local_position // n)[local_position % n]
            ids[i] = self.offsets[part] + local
        return ids


def parse_data_path(values: list[str]) -> tuple[list[str], list[float]]:
    """``--data-path A`` or ``--data-path 0.7 A 0.3 B`` (Megatron's blend syntax)."""
    if not values:
        raise UserError("--data-path is required: the prefix of an indexed dataset "
                        "(tools/preprocess_data.py writes <prefix>.bin/.idx)")
    if len(values) == 1:
        return values, [1.0]
    if len(values) % 2:
        raise UserError("--data-path: with several datasets give 'weight prefix' pairs, "
                        "e.g. --data-path 0.7 a_text_document 0.3 b_text_document")
    try:
        weights = [float(w) for w in values[0::2]]
    except ValueError:
        raise UserError("--data-path: with several datasets give 'weight prefix' pairs, "
                        "e.g. --data-path 0.7 a_text_document 0.3 b_text_document") from None
    if any(w <= 0 for w in weights):
        raise UserError("--data-path: blend weights must be positive")
    return list(values[1::2]), weights


def build_windows(values: list[str], seq_length: int, seed: int,
                  split: tuple[float, ...] | None, which: int,
                  vocab_size: int | None = None) -> BlendedWindows:
    """Train (which=0) or valid (which=1) windows of a ``--data-path`` blend."""
    prefixes, weights = parse_data_path(values)
    parts = []
    for prefix in prefixes:
        dataset = open_indexed(prefix)
        doc_range = (split_documents(len(dataset.sequence_lengths), split, which)
                     if split else None)
        if doc_range is not None and doc_range.stop <= doc_range.start:
            raise UserError(f"{prefix}: --split {','.join(map(str, split))} leaves no documents "
                            "for the validation split; give it a larger share")
        parts.append(TokenWindows(prefix, seq_length, seed, doc_range, dataset=dataset))
    return BlendedWindows(parts, weights, seed, vocab_size)
