"""Tokenise raw text into Megatron indexed datasets (`<prefix>_<key>_document.bin/.idx`).

Records stream from the inputs in chunks to worker processes and come back in order to a single
writer here, with at most a few chunks in flight: memory does not grow with corpus size.
All outputs are written under temporary names and renamed only when the whole run succeeded.
"""

import errno
import itertools
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy
from tqdm import tqdm

from blade_mega.prepare.inputs import InvalidRecord, RawRecord, expand_inputs, iter_raw_records, parse_record
from blade_mega.errors import UserError
from blade_mega.data.tokenizer import Tokenizer

with warnings.catch_warnings():  # megatron.core warns about optional GPU extensions on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

DTYPE_CHOICES = ("auto", "uint16", "int32")
RECORDS_PER_CHUNK = 64
CHUNKS_IN_FLIGHT_PER_WORKER = 2


def dataset_prefix(output_prefix: str, json_key: str) -> str:
    """Megatron's naming: `<output-prefix>_<key>_document` (+ `.bin`, `.idx`, `.meta.jsonl`)."""
    return f"{output_prefix}_{json_key}_document"


def meta_path(prefix: str) -> str:
    """Per-document metadata (`--meta-keys`) of the dataset at `prefix`, one JSON line each."""
    return prefix + ".meta.jsonl"


def choose_dtype(vocab_size: int, requested: str = "auto") -> type:
    """Token dtype: the smallest that holds every id (Megatron's rule) unless the user forces one."""
    if requested == "auto":
        return DType.optimal_dtype(vocab_size)
    if requested not in DTYPE_CHOICES:
        raise UserError(f"unknown --dtype {requested!r}; use one of {', '.join(DTYPE_CHOICES)}")
    dtype = getattr(numpy, requested)
    if vocab_size - 1 > numpy.iinfo(dtype).max:
        raise UserError(
            f"vocab size {vocab_size} does not fit --dtype {requested}; use --dtype int32 or auto"
        )
    return dtype


@dataclass
class PreprocessSummary:
    documents: int  # written, summed over json keys
    tokens: int
    skipped_empty: int
    skipped_invalid: int
    seconds: float

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"preprocess: docs={self.documents} tokens={self.tokens} "
            f"skipped_empty={self.skipped_empty} skipped_invalid={self.skipped_invalid} "
            f"seconds={self.seconds:.2f} tokens_per_s={rate:.0f}"
        )


@dataclass
class EncodedRecord:
    tokens: Dict[str, numpy.ndarray]  # per json key; empty array = empty document
    meta: Dict[str, object]


class DocumentEncoder:
    """Parses and tokenises chunks of raw records, in each worker process (or in-process for
    a single worker)."""

    def __init__(self, model_path, json_keys, meta_keys, append_eod: bool, dtype: type):
        self.tokenizer = Tokenizer.load(model_path)
        self.json_keys = list(json_keys)
        self.meta_keys = list(meta_keys)
        self.suffix = [self.tokenizer.eod_id] if append_eod else []
        self.dtype = dtype

    def encode_chunk(self, chunk: List[RawRecord]) -> List[Union[EncodedRecord, str]]:
        """One result per record: tokens, or the InvalidRecord message."""
        parsed: List[Union[dict, str]] = []
        for raw in chunk:
            try:
                parsed.append(parse_record(raw, self.json_keys, self.meta_keys))
            except InvalidRecord as err:
                parsed.append(str(err))
        valid = [record for record in parsed if isinstance(record, dict)]
        tokens_by_key = {}
        for key in self.json_keys:
            texts = [record[key] if record[key].strip() else "" for record in valid]
            tokens_by_key[key] = iter(self.tokenizer.encode_batch(texts))
        results: List[Union[EncodedRecord, str]] = []
        for record in parsed:
            if isinstance(record, str):
                results.append(record)
                continue
            tokens = {}
            for key in self.json_keys:
                ids = next(tokens_by_key[key])
                tokens[key] = numpy.array(ids + self.suffix if ids else [], dtype=self.dtype)
            results.append(EncodedRecord(tokens, {k: record[k] for k in self.meta_keys}))
        return results


_worker_encoder: Optional[DocumentEncoder] = None


def _init_worker(*encoder_args) -> None:
    global _worker_encoder
    _worker_encoder = DocumentEncoder(*encoder_args)


def _encode_in_worker(chunk: List[RawRecord]) -> List[Union[EncodedRecord, str]]:
    return _worker_encoder.encode_chunk(chunk)


def _chunks(records: Iterable[RawRecord], size: int) -> Iterator[List[RawRecord]]:
    iterator = iter(records)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _encode_in_order(chunks: Iterator[List[RawRecord]], workers: int, encoder_args) -> Iterator[list]:
    """Encoded chunks in input order. Unlike Pool.imap, which reads its whole input ahead,
    at most CHUNKS_IN_FLIGHT_PER_WORKER * workers chunks are pending at any time."""
    if workers == 1:
        encoder = DocumentEncoder(*encoder_args)
        yield from map(encoder.encode_chunk, chunks)
        return
    # fork: workers start instantly and inherit the imported modules.
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, encoder_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= CHUNKS_IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class DatasetWriter:
    """Builds one indexed dataset (+ optional meta.jsonl) under temporary names."""

    def __init__(self, prefix: str, dtype: type, with_meta: bool):
        self.prefix = prefix
        directory, name = os.path.split(os.path.abspath(prefix))
        self.tmp_prefix = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        self.suffixes = [".bin", ".idx"] + ([".meta.jsonl"] if with_meta else [])
        self.documents = 0
        self.builder = IndexedDatasetBuilder(self.tmp_prefix + ".bin", dtype=dtype)
        self.meta_file = open(meta_path(self.tmp_prefix), "w", encoding="utf-8") if with_meta else None

    def add(self, tokens: numpy.ndarray, meta: Dict[str, object]) -> None:
        self.builder.add_document(tokens, [tokens.size])
        if self.meta_file is not None:
            self.meta_file.write(json.dumps(meta, ensure_ascii=False) + "\n")
        self.documents += 1

    def finish(self) -> None:
        self.builder.finalize(self.tmp_prefix + ".idx")
        if self.meta_file is not None:
            self.meta_file.close()

    def publish(self) -> None:
        # .idx last: a reader that finds the .idx finds the .bin it describes.
        for suffix in sorted(self.suffixes, key=lambda s: s == ".idx"):
            os.replace(self.tmp_prefix + suffix, self.prefix + suffix)

    def discard(self) -> None:
        for f in (self.builder.data_file, self.meta_file):
            try:
                if f is not None:
                    f.close()
            except OSError:  # flushing the buffer fails again when the disk is full
                pass
        for suffix in self.suffixes:
            if os.path.exists(self.tmp_prefix + suffix):
                os.remove(self.tmp_prefix + suffix)


def _prepare_output_dir(output_prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise UserError(
            f"cannot write to output directory {directory} ({err.strerror}); "
            "choose a writable --output-prefix"
        ) from None


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    on_error: str = "fail",
    meta_keys: Sequence[str] = (),
    dtype: str = "auto",
    log_interval: int = 1000,
    show_progress: bool = True,
) -> PreprocessSummary:
    """Tokenise `inputs` into one indexed dataset per json key; see the module docstring."""
    start = time.perf_counter()
    if on_error not in ("fail", "skip"):
        raise UserError(f"unknown --on-error {on_error!r}; use fail or skip")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    paths = expand_inputs(inputs)
    tokenizer = Tokenizer.load(tokenizer_model)
    token_dtype = choose_dtype(tokenizer.vocab_size, dtype)
    _prepare_output_dir(output_prefix)
    encoder_args = (tokenizer_model, json_keys, meta_keys, append_eod, token_dtype)

    writers: Dict[str, DatasetWriter] = {}
    summary = PreprocessSummary(0, 0, 0, 0, 0.0)
    progress = tqdm(  # disable=None: shown only when stderr is a terminal
        unit="doc", file=sys.stderr, disable=None if show_progress else True,
        miniters=log_interval, mininterval=0,
    )
    try:
        for key in json_keys:
            writers[key] = DatasetWriter(dataset_prefix(output_prefix, key), token_dtype, bool(meta_keys))
        chunks = _chunks(iter_raw_records(paths), RECORDS_PER_CHUNK)
        for results in _encode_in_order(chunks, workers, encoder_args):
            for result in results:
                if isinstance(result, str):
                    if on_error == "fail":
                        raise UserError(result)
                    summary.skipped_invalid += 1
                    continue
                for key, tokens in result.tokens.items():
                    if tokens.size == 0:
                        summary.skipped_empty += 1
                        continue
                    writers[key].add(tokens, result.meta)
                    summary.documents += 1
                    summary.tokens += tokens.size
            progress.update(len(results))
            elapsed = time.perf_counter() - start
            progress.set_postfix_str(f"{summary.tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
        for key, writer in writers.items():
            if writer.documents == 0:
                raise UserError(
                    f"no documents with text under key {key!r} in {', '.join(inputs)} "
                    "(inputs are empty, or every document was empty or invalid)"
                )
            writer.finish()
        for writer in writers.values():
            writer.publish()
    except BaseException as err:
        for writer in writers.values():
            writer.discard()
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise UserError(f"cannot write {output_prefix}_* ({err.strerror}); free disk space and "
                            "re-run (nothing was written; earlier outputs are untouched)") from None
        raise
    finally:
        progress.close()
    summary.seconds = time.perf_counter() - start
    return summary
