"""Index arrays read with ``pread`` instead of a memory map.

Training reads the sample index a few entries at a time, at random places. Through a memory map,
each such touch maps far more than it reads (the kernel maps the page-cache folio or read-around
window it belongs to, 64 KB to megabytes), and mapped pages count in the rank's resident memory:
over a run it creeps towards the size of the index files, which grows with the corpus. A
``pread`` copies just the bytes asked for; the page cache still holds the files once per node,
shared by its ranks and reclaimable.

``PreadArray`` supports what the readers use: ``len``, ``shape``, ``dtype``, an int, a slice, or an
int array (rows of a 2-D array).
"""

from __future__ import annotations

import os

import numpy as np


class PreadArray:
    def __init__(self, path: str, dtype, shape: tuple, offset: int):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        self.offset = int(offset)
        self._row = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def of(cls, array) -> "PreadArray":
        """The same array as a memory-mapped one (``np.load(..., mmap_mode='r')``)."""
        return cls(array.filename, array.dtype, array.shape, array.offset)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _rows(self, start: int, count: int) -> np.ndarray:
        data = os.pread(self._fd, count * self._row, self.offset + start * self._row)
        if len(data) != count * self._row:
            raise OSError(f"{self.path}: short read (file truncated?)")
        return np.frombuffer(data, dtype=self.dtype).reshape((count,) + self.shape[1:])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            rows = self._rows(start, max(0, stop - start))
            return rows[::step] if step != 1 else rows
        if isinstance(key, (int, np.integer)):
            index = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= index < self.shape[0]:
                raise IndexError(f"index {key} out of range for {self.shape[0]}")
            row = self._rows(index, 1)[0]
            return row if self.ndim > 1 else row[()]
        indices = np.asarray(key, dtype=np.int64)
        flat = indices.reshape(-1)
        flat = np.where(flat < 0, flat + self.shape[0], flat)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"index out of range for {self.shape[0]}")
        out = np.empty((len(flat),) + self.shape[1:], dtype=self.dtype)
        if len(flat) and np.all(np.diff(flat) == 1):  # a run of positions: one read
            out[:] = self._rows(int(flat[0]), len(flat))
        else:
            for i, index in enumerate(flat):
                out[i] = self._rows(int(index), 1)[0]
        return out.reshape(indices.shape + self.shape[1:])
