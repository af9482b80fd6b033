"""Sample index: megatron.core's GPTDatasets and blend over indexed datasets, with global ids.

Built exactly as Megatron-LM builds it: ``BlendedMegatronDatasetBuilder(GPTDataset, ...)`` with a
``GPTDatasetConfig``. The index files (document, sample and shuffle indices per dataset, and the
blend's dataset/sample indices) are built once by global rank 0 under ``--data-cache-path`` and
memory-mapped by every rank, so a rank's memory and start-up do not grow with the corpus.

A sample's *global id* is ``offset of its dataset + its index in that GPTDataset`` (dataset id and
index within the dataset, laid end to end). Reading position ``p`` of the training stream is
the blend's entry ``p`` (one dataset: ``p`` itself). Selection scores, the reweighting sidecar
and checkpoints all talk in global ids, so every rank, layout and resumed run agrees on them.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from blade_mega import distributed
from blade_mega.data.pread_array import PreadArray
from blade_mega.errors import UserError
from blade_mega.data.index_check import check_header, verify

with warnings.catch_warnings():  # megatron.core warns about optional GPU extensions on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path
    from megatron.core.datasets.utils import Split

TRAIN, VALID, TEST = Split.train.value, Split.valid.value, Split.test.value


@dataclass(frozen=True)
class DataSpec:
    """What to build: a blend (prefixes + weights or None) and its split, or one blend per split."""
    blend: Optional[tuple[list[str], Optional[list[float]]]] = None
    split: Optional[str] = None
    blend_per_split: Optional[list] = None


class SampleIndex:
    """One split of a blend: its GPTDatasets (one per prefix), global ids and reading order."""

    def __init__(self, top, seq_length: int, vocab_size: Optional[int] = None):
        if isinstance(top, BlendedDataset):
            self.datasets: list[GPTDataset] = list(top.datasets)
            self._order = (top.dataset_index, top.dataset_sample_index)
            self.weights = np.asarray(top.weights, dtype=np.float64)
        else:
            self.datasets = [top]
            self._order = None
            self.weights = np.ones(1)
        self.weights = self.weights / self.weights.sum()
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.prefixes = [d.dataset.path_prefix for d in self.datasets]
        self.offsets = np.concatenate(
            [[0], np.cumsum([len(d) for d in self.datasets])]).astype(np.int64)
        # Samples read ahead (a data.prefetch.Prefetcher): its owner, the trainer, sets it.
        self.read_ahead = None
        for d in self.datasets:
            _read_by_pread(d)
        if self._order is not None:
            top.dataset_index, top.dataset_sample_index = (
                _pread_of(a, _cache_file(top, a, affix)) for a, affix in (
                    (top.dataset_index, "dataset_index.npy"),
                    (top.dataset_sample_index, "dataset_sample_index.npy")))
            self._order = (top.dataset_index, top.dataset_sample_index)

    # -- sizes and positions ------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of global ids."""
        return int(self.offsets[-1])

    @property
    def stream_length(self) -> int:
        """Reading positions before the order repeats."""
        return len(self._order[0]) if self._order is not None else len(self)

    def num_documents(self, part: int) -> int:
        return int(self.datasets[part].dataset.sequence_lengths.shape[0])

    def ordered_ids(self, start: int, count: int) -> np.ndarray:
        """Global ids at reading positions [start, start + count). Positions past the built
        index wrap around (the index is built for the run's whole need, so only an unplanned
        extension of the run gets there)."""
        positions = (start + np.arange(count, dtype=np.int64)) % self.stream_length
        if self._order is None:
            return positions
        dataset_index, sample_index = self._order
        return self.offsets[np.asarray(dataset_index[positions], dtype=np.int64)] + \
            np.asarray(sample_index[positions], dtype=np.int64)

    def locate(self, global_ids) -> tuple[np.ndarray, np.ndarray]:
        """(dataset part, index within that GPTDataset) of each global id."""
        global_ids = np.asarray(global_ids, dtype=np.int64)
        parts = np.searchsorted(self.offsets, global_ids, side="right") - 1
        return parts, global_ids - self.offsets[parts]

    # -- reading ------------------------------------------------------------------------------
    def tokens(self, global_id: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of one sample."""
        parts, local = self.locate([global_id])
        part = int(parts[0])
        # The raw window (tokens and labels in one), as GPTDataset.__getitem__ reads it.
        text, _ = self.datasets[part]._query_document_sample_shuffle_indices(int(local[0]))
        if self.vocab_size is not None:
            low, high = int(text.min()), int(text.max())
            if low < 0 or high >= self.vocab_size:
                bad = high if high >= self.vocab_size else low
                raise UserError(
                    f"{get_bin_path(self.prefixes[part])}: token id {bad} is outside the model's "
                    f"vocab of {self.vocab_size}; the dataset was made with another tokenizer: "
                    "re-run tools/preprocess_data.py with this --tokenizer-model")
        return text

    def read(self, global_ids) -> torch.Tensor:
        """The windows of ``global_ids`` as one [n, seq_length + 1] int64 tensor."""
        if len(global_ids) == 0:
            return torch.zeros(0, self.seq_length + 1, dtype=torch.int64)
        rows = []
        for global_id in global_ids:
            ahead = self.read_ahead.get(int(global_id)) if self.read_ahead is not None else None
            rows.append(ahead if ahead is not None else self.tokens(int(global_id)))
        return torch.from_numpy(np.stack(rows))

    def main_documents(self, global_ids) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """For each dataset: (part, positions in ``global_ids``, main document of those samples).
        A sample's main document is the one under its middle token: the one it is credited to."""
        parts, local = self.locate(global_ids)
        result = []
        for part in np.unique(parts):
            where = np.flatnonzero(parts == part)
            result.append((int(part), where, self._main_documents(int(part), local[where])))
        return result

    def _main_documents(self, part: int, local: np.ndarray) -> np.ndarray:
        dataset = self.datasets[part]
        rows = np.asarray(dataset.shuffle_index[local], dtype=np.int64)
        start = np.asarray(dataset.sample_index[rows], dtype=np.int64)
        slot, offset = start[:, 0], start[:, 1] + self.seq_length // 2
        lengths = dataset.dataset.sequence_lengths
        documents = np.asarray(dataset.document_index[slot], dtype=np.int64)
        # Walk forward over the documents the window spans until the middle token's one.
        while True:
            length = lengths[documents].astype(np.int64)
            past = offset >= length
            if not past.any():
                return documents
            offset[past] -= length[past]
            slot[past] += 1
            documents[past] = dataset.document_index[slot[past]]


def _read_by_pread(d: GPTDataset) -> None:
    """Serve ``d``'s index arrays (and its .idx arrays) by pread, not memory maps (see
    data/pread_array.py); a rank that just built them lets go of its in-memory copies."""
    if isinstance(d.sample_index, PreadArray):
        return
    d.document_index, d.sample_index, d.shuffle_index = (
        _pread_of(array, _cache_file(d, array, affix)) for array, affix in (
            (d.document_index, "document_index.npy"), (d.sample_index, "sample_index.npy"),
            (d.shuffle_index, "shuffle_index.npy")))
    # megatron.core keeps an arange over the split's documents (4 bytes a document) that only
    # building the index uses: do not hold it for the whole run.
    d.indices = None
    index = d.dataset.index
    if not isinstance(index.sequence_lengths, PreadArray):
        count = len(index.sequence_lengths)
        path = get_idx_path(d.dataset.path_prefix)
        header = 34  # magic 9, version 8, dtype 1, sequence count 8, document count 8
        index.sequence_lengths = PreadArray(path, np.int32, (count,), header)
        index.sequence_pointers = PreadArray(path, np.int64, (count,), header + 4 * count)


def _cache_file(dataset, array, affix: str) -> Optional[str]:
    """The cache file an index array was loaded from, or written to just now."""
    path = getattr(array, "filename", None)
    if path:
        return path
    cache = dataset.config.path_to_cache
    if not cache:
        return None
    name = f"{dataset.unique_description_hash}-{type(dataset).__name__}-"
    split = dataset.split.name if isinstance(dataset, BlendedDataset) else dataset.index_split.name
    return os.path.join(cache, f"{name}{split}-{affix}")


def _pread_of(array, path: Optional[str]):
    if path is None or not os.path.isfile(path):
        return array  # no cache directory: megatron.core keeps it in memory
    return PreadArray.of(np.load(path, mmap_mode="r"))


# -- building --------------------------------------------------------------------------------
def gpt_config(spec: DataSpec, tokenizer, *, seq_length: int, seed: int,
               cache_path: Optional[str]) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=spec.blend, split=spec.split,
        blend_per_split=spec.blend_per_split, path_to_cache=cache_path, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
        # megatron.core then reads the .bin by file offset, not through a memory map whose
        # read-around would count in resident memory (see data/pread_array.py).
        mmap_bin_files=False)


def build_sample_indices(spec: DataSpec, sizes: Sequence[Optional[int]], tokenizer, *,
                         seq_length: int, seed: int, cache_path: Optional[str],
                         vocab_size: Optional[int] = None) -> list[Optional[SampleIndex]]:
    """[train, valid, test] sample indices of ``sizes`` samples each (None: no such split).

    Open-time checks are O(1) per dataset on every rank (header and file sizes); the full
    pointer scan runs once, on the rank that builds a dataset's index (a cold cache)."""
    prefixes = _prefixes(spec)
    for prefix in prefixes:
        check_header(prefix)
    config = gpt_config(spec, tokenizer, seq_length=seq_length, seed=seed, cache_path=cache_path)
    if distributed.rank() == 0:
        for prefix in prefixes:
            _verify_once(prefix, cache_path)
        _drop_damaged_files(cache_path)
    built = _build(config, sizes)
    problem = distributed.from_rank0(_check_cache(built) if distributed.rank() == 0 else None)
    if problem is not None:
        # A damaged or foreign index file: say so once, remove this run's files, build anew.
        if distributed.rank() == 0:
            print(f"warning: {problem}; rebuilding the sample index", flush=True)
            for path in _cache_files(built):
                if os.path.exists(path):
                    os.remove(path)
        distributed.barrier()
        built = _build(config, sizes)
    return [SampleIndex(top, seq_length, vocab_size) if top is not None and len(top) else None
            for top in built]


def _build(config: GPTDatasetConfig, sizes) -> list:
    megatron_logger = logging.getLogger("megatron.core")
    level = megatron_logger.level
    megatron_logger.setLevel(logging.WARNING)  # its INFO lines list every index file
    try:
        return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True,
                                             config).build()
    except Exception as err:  # noqa: BLE001 - the builder wraps OSErrors in bare Exceptions
        cause = err.__cause__ or err.__context__ or err
        if isinstance(cause, OSError) or isinstance(err, OSError):
            where = config.path_to_cache or "the data directory"
            reason = getattr(cause, "strerror", None) or cause
            raise UserError(f"cannot write the sample index under {where} ({reason}); "
                            "pass --data-cache-path DIR, a directory every rank can read and "
                            "rank 0 can write") from None
        if isinstance(err, (AssertionError, IndexError, ValueError)) or \
                isinstance(cause, (AssertionError, IndexError, ValueError)):
            raise UserError(f"megatron.core could not build the sample index ({cause}); check "
                            "--data-path, --split and that every dataset has enough tokens "
                            "for one --seq-length sample") from None
        raise
    finally:
        megatron_logger.setLevel(level)


def _prefixes(spec: DataSpec) -> list[str]:
    blends = [spec.blend] if spec.blend else [b for b in (spec.blend_per_split or []) if b]
    return sorted({prefix for blend in blends for prefix in blend[0]})


def _cache_files(built) -> list[str]:
    """The index files the built datasets came from (memory-mapped ``.npy`` + descriptions)."""
    paths = []
    for top in built:
        if top is None:
            continue
        datasets = top.datasets if isinstance(top, BlendedDataset) else [top]
        arrays = [top.dataset_index, top.dataset_sample_index] if isinstance(
            top, BlendedDataset) else []
        for d in datasets:
            arrays += [d.document_index, d.sample_index, d.shuffle_index]
        for array in arrays:
            path = getattr(array, "filename", None)
            if path:
                paths += [path, path.rsplit("-", 1)[0] + "-description.txt"]
    return paths


def _check_cache(built) -> Optional[str]:
    """What is wrong with the loaded index files, or None. O(1) checks: shapes, dtypes, the
    description each file was written for, and the boundary entries."""
    for top in built:
        if top is None:
            continue
        datasets = top.datasets if isinstance(top, BlendedDataset) else [top]
        for d in datasets:
            problem = _describe_mismatch(d.sample_index, d.unique_description) or \
                _index_problem(d)
            if problem:
                return problem
        if isinstance(top, BlendedDataset):
            problem = _describe_mismatch(top.dataset_index, top.unique_description)
            if problem is None and (top.dataset_index.shape != top.dataset_sample_index.shape
                                    or (top.size is not None and len(top.dataset_index) != top.size)
                                    or (len(top.dataset_index) and
                                        int(np.max(top.dataset_index[[0, -1]])) >=
                                        len(top.datasets))):
                problem = f"{getattr(top.dataset_index, 'filename', 'blend index')}: wrong shape"
            if problem:
                return problem
    return None


def _describe_mismatch(array, description: str) -> Optional[str]:
    path = getattr(array, "filename", None)
    if not path:
        return None  # built in memory just now
    description_path = path.rsplit("-", 1)[0] + "-description.txt"
    try:
        with open(description_path) as f:
            if f.read() != description:
                return f"{description_path}: written for another dataset or configuration"
    except OSError:
        return f"{description_path}: missing"
    return None


def _index_problem(d: GPTDataset) -> Optional[str]:
    path = getattr(d.sample_index, "filename", "sample index")
    documents = d.dataset.sequence_lengths.shape[0]
    sample_index, shuffle_index, document_index = d.sample_index, d.shuffle_index, d.document_index
    if sample_index.ndim != 2 or sample_index.shape[1] != 2 or len(sample_index) < 2:
        return f"{path}: not a sample index"
    if shuffle_index.ndim != 1 or len(shuffle_index) > len(sample_index) - 1 or \
            (len(shuffle_index) and int(np.max(shuffle_index[[0, -1]])) >= len(sample_index) - 1):
        return f"{getattr(shuffle_index, 'filename', 'shuffle index')}: does not match the sample index"
    last = int(sample_index[-1, 0])
    if document_index.ndim != 1 or last >= len(document_index) or \
            int(np.max(document_index[[0, -1]])) >= documents:
        return f"{getattr(document_index, 'filename', 'document index')}: does not match the dataset"
    return None


def _drop_damaged_files(directory: str) -> None:
    """Remove index files whose .npy header is unreadable or promises more bytes than the file
    has (a torn or foreign write): megatron.core would fail on them with no file named."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".npy"))
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            intact = os.path.getsize(path) == expected
        except (OSError, ValueError):
            intact = False
        if not intact:
            print(f"warning: {path}: damaged sample index file (size or header); rebuilding it",
                  flush=True)
            for stale in (path, path.rsplit("-", 1)[0] + "-description.txt"):
                if os.path.exists(stale):
                    os.remove(stale)


def _verify_once(prefix: str, cache_path: Optional[str]) -> None:
    """The full pointer scan of ``prefix``, once per (file, size, mtime): a marker in the cache
    records that it passed."""
    stats = [os.stat(p) for p in (get_idx_path(prefix), get_bin_path(prefix))]
    key = "-".join(f"{s.st_size}-{s.st_mtime_ns}" for s in stats)
    directory = cache_path or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    marker = os.path.join(directory, f"{os.path.basename(prefix)}.verified")
    try:
        with open(marker) as f:
            if f.read() == key:
                return
    except OSError:
        pass
    verify(prefix)
    try:
        os.makedirs(directory, exist_ok=True)
        with open(marker + ".tmp", "w") as f:
            f.write(key)
        os.replace(marker + ".tmp", marker)
    except OSError:
        pass  # a read-only cache only costs the scan again next time


# -- flags -----------------------------------------------------------------------------------
def parse_blend(values: list[str], flag: str = "--data-path"
                ) -> tuple[list[str], Optional[list[float]]]:
    """``A``, ``A B`` (weights by size) or ``0.7 A 0.3 B`` (Megatron's blend syntax)."""
    if not values:
        raise UserError(f"{flag} is required: the prefix of an indexed dataset "
                        "(tools/preprocess_data.py writes <prefix>.bin/.idx)")
    if len(values) % 2 or len(values) == 1:
        prefixes, weights = list(values), None
    else:
        try:
            weights = [float(w) for w in values[0::2]]
        except ValueError:
            prefixes, weights = list(values), None  # an even number of prefixes, no weights
        else:
            prefixes = list(values[1::2])
            if any(w <= 0 for w in weights):
                raise UserError(f"{flag}: blend weights must be positive")
    for prefix in prefixes:
        for path in (get_idx_path(prefix), get_bin_path(prefix)):
            if not os.path.isfile(path):
                raise UserError(f"{path}: no such file; pass the prefix of a dataset written by "
                                "tools/preprocess_data.py (without .bin/.idx)")
    return prefixes, weights
