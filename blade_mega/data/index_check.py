"""O(1) and full checks of a Megatron indexed dataset (`<prefix>.idx` + `<prefix>.bin`).

Every rank runs `check_header` when it opens a dataset; `verify` reads the .idx arrays itself
(once, on the rank that builds a cold sample index, and in `tools/inspect_data.py --verify`) so
that a damaged file gives a precise message instead of an assertion inside megatron.core.
"""

import os
import struct
import warnings

import numpy

from blade_mega.errors import UserError

with warnings.catch_warnings():  # megatron.core warns about optional GPU extensions on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def normalize_prefix(path: str) -> str:
    """Accept `x`, `x.bin` or `x.idx` for the dataset at prefix `x`."""
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def check_header(prefix: str, check_bin: bool = True) -> tuple[int, int, int]:
    """O(1) checks of `prefix`.idx/.bin (header, dtype, the .idx size against its counts, the .bin
    size against the last sequence): what every rank runs on open. Returns (sequences, documents,
    itemsize). The full scan is `verify`."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; pass the prefix of a dataset written by "
                            "tools/preprocess_data.py (without .bin/.idx)")
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise UserError(f"{idx_path}: truncated header ({len(header)} bytes); re-run preprocessing")
    magic, version, code, sequences, documents = _HEADER.unpack(header)
    if magic != INDEX_MAGIC:
        raise UserError(f"{idx_path}: wrong magic {magic!r}, not a Megatron indexed dataset index")
    if version != INDEX_VERSION:
        raise UserError(f"{idx_path}: unsupported index version {version} (expected {INDEX_VERSION})")
    try:
        itemsize = DType.size(code)
    except ValueError:
        raise UserError(f"{idx_path}: unknown dtype code {code}") from None
    arrays_size = sequences * (4 + 8) + documents * 8
    idx_size = os.path.getsize(idx_path)
    # Multimodal datasets add one int8 mode per sequence.
    if idx_size not in (_HEADER.size + arrays_size, _HEADER.size + arrays_size + sequences):
        raise UserError(
            f"{idx_path}: size {idx_size} bytes does not match its counts "
            f"({sequences} sequences, {documents} document indices); file is truncated or damaged"
        )
    if sequences and check_bin:
        index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
        last_length = int(numpy.frombuffer(index, numpy.int32, 1, _HEADER.size + 4 * (sequences - 1))[0])
        last_pointer = int(numpy.frombuffer(index, numpy.int64, 1, _HEADER.size + 4 * sequences
                                            + 8 * (sequences - 1))[0])
        bin_size = os.path.getsize(bin_path)
        if last_pointer + last_length * itemsize != bin_size:
            raise UserError(f"{bin_path}: {bin_size} bytes, but its .idx says the last sequence ends "
                            f"at byte {last_pointer + last_length * itemsize}; the .bin is damaged "
                            "or does not belong to this .idx (tools/inspect_data.py --verify)")
    return sequences, documents, itemsize


def verify(prefix: str) -> None:
    """Raise UserError describing the first inconsistency between `prefix`.idx and .bin: reads
    every pointer (O(documents)); `tools/inspect_data.py --verify` and a cold index build run it."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    sequences, documents, itemsize = check_header(prefix, check_bin=False)  # its own messages
    index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(index, numpy.int32, sequences, _HEADER.size)
    pointers = numpy.frombuffer(index, numpy.int64, sequences, _HEADER.size + 4 * sequences)
    doc_indices = numpy.frombuffer(index, numpy.int64, documents, _HEADER.size + 12 * sequences)
    bin_size = os.path.getsize(bin_path)
    if sequences:
        if (lengths < 0).any():
            raise UserError(f"{idx_path}: negative sequence length at sequence {_first(lengths < 0)}")
        if (numpy.diff(pointers) < 0).any():
            bad = _first(numpy.diff(pointers) < 0) + 1
            raise UserError(f"{idx_path}: sequence pointers decrease at sequence {bad}")
        ends = pointers + lengths.astype(numpy.int64) * itemsize
        if (ends > bin_size).any():
            bad = _first(ends > bin_size)
            raise UserError(
                f"{bin_path}: sequence {bad} ends at byte {ends[bad]} past the end of the file "
                f"({bin_size} bytes); the .bin is truncated or does not belong to this .idx"
            )
        # Megatron's writer packs sequences back to back from byte 0: any other pointer is damage.
        starts = numpy.concatenate([[0], numpy.cumsum(lengths[:-1], dtype=numpy.int64) * itemsize])
        if (pointers != starts).any():
            bad = _first(pointers != starts)
            raise UserError(f"{idx_path}: sequence {bad} starts at byte {pointers[bad]}, expected "
                            f"{starts[bad]} from the lengths before it; the index is damaged")
    expected_bin = int(lengths.sum(dtype=numpy.int64)) * itemsize
    if bin_size != expected_bin:
        raise UserError(f"{bin_path}: {bin_size} bytes, but its .idx describes {expected_bin}; "
                        "the .bin is damaged or does not belong to this .idx")
    if documents == 0 or doc_indices[0] != 0:
        raise UserError(f"{idx_path}: document index must start at 0")
    if (numpy.diff(doc_indices) < 0).any():
        bad = _first(numpy.diff(doc_indices) < 0)
        raise UserError(f"{idx_path}: document indices decrease at document {bad}")
    if doc_indices[-1] != sequences:
        raise UserError(
            f"{idx_path}: document indices end at {doc_indices[-1]}, expected {sequences} sequences"
        )


def _first(mask: numpy.ndarray) -> int:
    return int(numpy.flatnonzero(mask)[0])
