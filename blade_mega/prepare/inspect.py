"""Summarise and decode a Megatron indexed dataset (`<prefix>.idx` + `<prefix>.bin`) offline.

The checks themselves (`check_header`, `verify`) are the online path's (`data/index_check.py`);
`summarize` opens the dataset with megatron.core's reader, the one training uses.
"""

import warnings
from typing import List, Optional

import numpy

from blade_mega.data.index_check import verify
from blade_mega.errors import UserError
from blade_mega.data.tokenizer import Tokenizer

with warnings.catch_warnings():  # megatron.core warns about optional GPU extensions on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

def load(prefix: str) -> IndexedDataset:
    """Verify, then open with megatron.core's reader."""
    verify(prefix)
    return IndexedDataset(prefix, multimodal=False, mmap=True)


def length_histogram(lengths: numpy.ndarray, bins: int = 10) -> List[dict]:
    """Document lengths in tokens, in equal-width bins: [{"low", "high", "count"}]."""
    if lengths.size == 0:
        return []
    counts, edges = numpy.histogram(lengths, bins=bins)
    return [
        {"low": int(edges[i]), "high": int(edges[i + 1]), "count": int(counts[i])}
        for i in range(len(counts))
    ]


def summarize(prefix: str, bins: int = 10) -> dict:
    """Counts, dtype, token totals and the document-length histogram of the dataset."""
    dataset = load(prefix)
    doc_bounds = dataset.document_indices
    seq_lengths = dataset.sequence_lengths.astype(numpy.int64)
    cumulative = numpy.concatenate([[0], numpy.cumsum(seq_lengths)])
    doc_lengths = cumulative[doc_bounds[1:]] - cumulative[doc_bounds[:-1]]
    return {
        "prefix": prefix,
        "documents": int(len(doc_bounds) - 1),
        "sequences": int(len(dataset)),
        "tokens": int(seq_lengths.sum()),
        "dtype": numpy.dtype(dataset.index.dtype).name,
        "document_length": {
            "min": int(doc_lengths.min()) if doc_lengths.size else 0,
            "mean": float(doc_lengths.mean()) if doc_lengths.size else 0.0,
            "max": int(doc_lengths.max()) if doc_lengths.size else 0,
        },
        "histogram": length_histogram(doc_lengths, bins),
    }


def format_summary(summary: dict, width: int = 40) -> str:
    lines = [
        f"dataset    {summary['prefix']}",
        f"documents  {summary['documents']}",
        f"sequences  {summary['sequences']}",
        f"tokens     {summary['tokens']}",
        f"dtype      {summary['dtype']}",
        "doc length min {min} / mean {mean:.1f} / max {max} tokens".format(**summary["document_length"]),
    ]
    peak = max((b["count"] for b in summary["histogram"]), default=0)
    for b in summary["histogram"]:
        bar = "#" * (round(width * b["count"] / peak) if peak else 0)
        lines.append(f"{b['low']:>8}-{b['high']:<8} {b['count']:>7} {bar}")
    return "\n".join(lines)


def document_tokens(prefix: str, index: int) -> numpy.ndarray:
    """All tokens of document `index` (its sequences concatenated)."""
    dataset = load(prefix)
    count = len(dataset.document_indices) - 1
    if not 0 <= index < count:
        raise UserError(f"document {index} out of range; {prefix} has {count} documents (0..{count - 1})")
    first, last = dataset.document_indices[index], dataset.document_indices[index + 1]
    parts = [dataset[int(i)] for i in range(first, last)]
    return numpy.concatenate(parts) if parts else numpy.array([], dtype=numpy.int64)


def decode_document(prefix: str, index: int, tokenizer_model: Optional[str]) -> str:
    if not tokenizer_model:
        raise UserError("--decode needs --tokenizer-model")
    tokenizer = Tokenizer.load(tokenizer_model)
    return tokenizer.decode(document_tokens(prefix, index))
