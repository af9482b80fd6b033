"""Whole-document evaluation: mean token loss and bits per byte, in document order, any layout.

Each document's tokens (its EOD included) are cut into consecutive chunks of ``seq_length``
tokens; a chunk is one model input and predicts its tokens 2..n (the first token of a chunk has
no context, so it is not scored). Bytes are the UTF-8 bytes of the detokenised document, so

    loss          = sum of token losses (nats) / predicted tokens
    bits per byte = sum of token losses / ln 2 / bytes

and bits per byte compares models with different tokenizers. The chunks are shared out over the
data-parallel ranks in order; tensor- and pipeline-parallel ranks of a replica run the same
chunks. Per-document loss sums meet on every rank with one all-reduce.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from blade_mega.errors import UserError

with warnings.catch_warnings():  # megatron.core warns about optional GPU extensions on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset


@dataclass(frozen=True)
class Chunk:
    document: int
    start: int   # first token, within the document
    length: int  # tokens (<= seq_length); predicts length - 1 of them


def chunks(lengths, seq_length: int) -> list[Chunk]:
    """Every document cut into consecutive chunks of ``seq_length`` tokens (the last shorter)."""
    out = []
    for document, length in enumerate(int(n) for n in lengths):
        for start in range(0, length, seq_length):
            out.append(Chunk(document, start, min(seq_length, length - start)))
    return out


def open_dataset(prefix: str) -> IndexedDataset:
    for suffix in (".idx", ".bin"):
        try:
            open(prefix + suffix, "rb").close()
        except OSError as err:
            raise UserError(f"{prefix}{suffix}: {err.strerror.lower()}; pass the prefix "
                            "tools/preprocess_data.py printed (without .bin/.idx)") from None
    return IndexedDataset(prefix, mmap=True)


def read_labels(path: str, num_documents: int) -> list[str]:
    """The ``noise`` value of each document of a preprocess ``.meta.jsonl`` ("clean" if absent)."""
    labels = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    labels.append(str(json.loads(line).get("noise", "clean")))
                except (ValueError, AttributeError):
                    raise UserError(f"{path}:{number}: not a JSON object; regenerate it with "
                                    "tools/preprocess_data.py --meta-keys id,noise") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read labels ({err.strerror}); check --noise-labels")
    if len(labels) != num_documents:
        raise UserError(f"{path}: {len(labels)} lines for {num_documents} documents; pass the "
                        ".meta.jsonl written with that dataset")
    return labels


def _microbatch_windows(dataset: IndexedDataset, share: list[Chunk], seq_length: int,
                        micro_batch_size: int):
    """[b, seq_length + 1] windows and [b, seq_length] weights per micro-batch: a chunk of n
    tokens fills the first n places, and only its n - 1 real predictions have weight 1."""
    from blade_mega.engine.model_engine import make_microbatch

    for begin in range(0, len(share), micro_batch_size):
        group = share[begin:begin + micro_batch_size]
        windows = torch.zeros(micro_batch_size, seq_length + 1, dtype=torch.long)
        weights = torch.zeros(micro_batch_size, seq_length)
        for row, chunk in enumerate(group):
            tokens = dataset.get(chunk.document, chunk.start, chunk.length)
            windows[row, :chunk.length] = torch.from_numpy(tokens.astype(np.int64))
            weights[row, :chunk.length - 1] = 1.0
        yield group, make_microbatch(windows, weights)


def document_losses(runner, dataset: IndexedDataset, seq_length: int, micro_batch_size: int,
                    dp_rank: int, dp_size: int, scoring: bool, bar) -> np.ndarray:
    """Sum of token losses per document [num_documents] (float64), identical on every rank.
    ``scoring``: this rank's losses count (last pipeline stage, TP rank 0); the others run the
    same chunks but add nothing, so the all-reduce over the world adds each replica once."""
    from blade_mega.engine.model_engine import comm_device

    lengths = dataset.sequence_lengths
    every = chunks(lengths, seq_length)
    per_rank = math.ceil(len(every) / dp_size)
    share = every[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    sums = np.zeros(len(lengths), dtype=np.float64)
    batches = list(_microbatch_windows(dataset, share, seq_length, micro_batch_size))
    step = 8  # micro-batches per schedule call, so that the progress bar moves
    for begin in range(0, len(batches), step):
        part = batches[begin:begin + step]
        out = runner.run([mb for _, mb in part], forward_only=True, keep_token_losses=True)
        if scoring:
            for (group, mb), losses in zip(part, out.token_losses):
                per_row = (losses.double() * mb.weights.double()).sum(dim=1)
                for row, chunk in enumerate(group):
                    sums[chunk.document] += float(per_row[row])
        bar.update(len(part))
    totals = torch.from_numpy(sums).to(comm_device())
    torch.distributed.all_reduce(totals)
    return totals.cpu().numpy()


def summarize(nll: np.ndarray, predicted: np.ndarray, tokens: np.ndarray, nbytes: np.ndarray,
              select: Optional[np.ndarray] = None) -> dict:
    if select is not None:
        nll, predicted, tokens, nbytes = nll[select], predicted[select], tokens[select], \
            nbytes[select]
    total_nll, total_predicted, total_bytes = float(nll.sum()), int(predicted.sum()), \
        int(nbytes.sum())
    return {"documents": int(len(nll)), "tokens": int(tokens.sum()),
            "predicted_tokens": total_predicted, "bytes": total_bytes,
            "loss": total_nll / total_predicted if total_predicted else None,
            "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else None}


def document_bytes(dataset: IndexedDataset, tokenizer) -> np.ndarray:
    """UTF-8 bytes of each detokenised document (its EOD detokenises to nothing)."""
    return np.array([len(tokenizer.decode(dataset.get(i).tolist()).encode("utf-8"))
                     for i in range(len(dataset.sequence_lengths))], dtype=np.int64)


def predicted_tokens(lengths, seq_length: int) -> np.ndarray:
    """Per document: its tokens minus the first of each chunk."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return lengths - (lengths + seq_length - 1) // seq_length
