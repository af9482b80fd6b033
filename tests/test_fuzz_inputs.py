"""Seeded fuzzing of every input a run reads: damaged .idx/.bin files and malformed JSONL.

Each case must end in a clean UserError or in correct output, never in another exception, a hang
or silently wrong data.  A .bin byte change that keeps the file well-formed is data, not damage:
the reader must return exactly the changed tokens, and ids outside the vocab must be refused by
``SampleIndex.tokens``.
"""

import json
import os
import random
import shutil

import numpy as np
import pytest

from blade_mega.data.index_check import verify
from blade_mega.prepare.inspect import summarize
from blade_mega.prepare.preprocess import dataset_prefix, preprocess
from blade_mega.data.sample_index import DataSpec, build_sample_indices
from blade_mega.prepare.inspect import load as open_indexed
from blade_mega.errors import UserError
from blade_mega.data.tokenizer import Tokenizer

SEQ = 16
VOCAB = 2000
CASES = 300


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return Tokenizer.load(demo_data.tokenizer_model)


@pytest.fixture(scope="module")
def small_dataset(demo_data, tmp_path_factory):
    """A 12-document dataset cut from the demo target set, and its windows as read intact."""
    root = tmp_path_factory.mktemp("fuzz_base")
    with open(os.path.join(demo_data.corpus_dir, "target.jsonl")) as f:
        lines = [next(f) for _ in range(12)]
    (root / "small.jsonl").write_text("".join(lines))
    out = str(root / "small")
    preprocess([str(root / "small.jsonl")], out, demo_data.tokenizer_model, append_eod=True,
               show_progress=False)
    prefix = dataset_prefix(out, "text")
    return prefix, read_windows(prefix)


def sample_index(prefix: str, tokenizer=None):
    """The training-side reader of the whole dataset (one epoch, vocab-checked)."""
    [samples, _, _] = build_sample_indices(
        DataSpec(blend=([prefix], None), split="1,0,0"), [None, None, None],
        tokenizer or _Vocab(), seq_length=SEQ, seed=1, vocab_size=VOCAB,
        cache_path=os.path.join(os.path.dirname(prefix), "cache"))
    return samples


class _Vocab:
    vocab_size, eod, pad = VOCAB, 3, 0
    unique_identifiers = {"class": "fuzz"}


def read_windows(prefix: str) -> list:
    """Every window of the dataset through the training-side reader."""
    samples = sample_index(prefix)
    return [samples.tokens(i) for i in range(len(samples))]


def expected_window(samples, i: int, tokens: np.ndarray, pointers: np.ndarray) -> np.ndarray:
    """Window ``i`` cut from the flat token array by hand: the documents from its start entry
    in the sample index to the next one's, each from its .idx pointer."""
    d = samples.datasets[0]
    row = int(d.shuffle_index[i])
    (first, offset), (last, end) = d.sample_index[row], d.sample_index[row + 1]
    lengths = d.dataset.sequence_lengths
    parts = []
    for slot in range(int(first), int(last) + 1):
        doc = int(d.document_index[slot])
        begin = int(offset) if slot == first else 0
        stop = int(end) + 1 if slot == last else int(lengths[doc])
        parts.append(tokens[pointers[doc] + begin:pointers[doc] + stop])
    return np.concatenate(parts)


def damaged_copy(prefix: str, directory: str, case: int, suffix: str, change) -> str:
    target = os.path.join(directory, f"case{case}")
    for ext in (".idx", ".bin"):
        shutil.copyfile(prefix + ext, target + ext)
    with open(target + suffix, "rb") as f:
        data = bytearray(f.read())
    with open(target + suffix, "wb") as f:
        f.write(change(data))
    return target


def flip_bytes(rng: random.Random):
    def change(data: bytearray) -> bytes:
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(data))
            data[position] = (data[position] + rng.randint(1, 255)) % 256  # always a change
        return bytes(data)
    return change


def truncate_or_extend(rng: random.Random):
    def change(data: bytearray) -> bytes:
        if rng.random() < 0.8:
            return bytes(data[:rng.randrange(len(data))])
        return bytes(data) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
    return change


def same_reading(rng: random.Random):
    """Changes a valid index may hold that training does not read differently: the dtype code of
    another 2-byte type (int16 for uint16, ids < 32768), or a document boundary moved between its
    neighbours (windows cut sequences, not documents)."""
    def change(data: bytearray) -> bytes:
        if rng.random() < 0.5:
            data[17] = 3  # header: 9-byte magic, 8-byte version, then the dtype code
            return bytes(data)
        sequences = int.from_bytes(data[18:26], "little")
        doc_start = 34 + 12 * sequences
        doc = rng.randrange(1, sequences)
        value = rng.choice([doc - 1, doc + 1])
        data[doc_start + 8 * doc:doc_start + 8 * doc + 8] = value.to_bytes(8, "little")
        return bytes(data)
    return change


def test_damaged_index_is_refused_or_reads_the_same_windows(small_dataset, tmp_path):
    """.idx damage either fails verification with a UserError or changes nothing training reads
    (e.g. the document index, which windows do not use, or a dtype code of the same width)."""
    prefix, intact = small_dataset
    refused = 0
    for case in range(CASES):
        rng = random.Random(case)
        change = (same_reading(rng) if case % 10 == 0 else
                  truncate_or_extend(rng) if case % 3 == 0 else flip_bytes(rng))
        damaged = damaged_copy(prefix, str(tmp_path), case, ".idx", change)
        try:
            verify(damaged)
            summarize(damaged)
            windows = read_windows(damaged)
        except UserError as err:
            assert os.path.basename(damaged) in str(err), (case, str(err))
            refused += 1
            continue
        assert len(windows) == len(intact), case
        assert all(np.array_equal(a, b) for a, b in zip(windows, intact)), case
    assert CASES // 2 < refused < CASES  # mostly real damage, and some harmless changes


def test_changed_bin_reads_exactly_the_changed_tokens_or_is_refused(small_dataset, tmp_path):
    prefix, intact = small_dataset
    dataset = open_indexed(prefix)
    pointers = dataset.index.sequence_pointers // 2  # uint16 tokens: byte offset -> token offset
    refused_vocab = 0
    for case in range(CASES):
        rng = random.Random(10_000 + case)
        if case % 4 == 0:  # wrong size: always refused when opened
            damaged = damaged_copy(prefix, str(tmp_path), case, ".bin", truncate_or_extend(rng))
            with pytest.raises(UserError, match=os.path.basename(damaged) + ".bin"):
                open_indexed(damaged)
            continue
        damaged = damaged_copy(prefix, str(tmp_path), case, ".bin", flip_bytes(rng))
        changed = np.fromfile(damaged + ".bin", dtype=np.uint16).astype(np.int64)
        samples = sample_index(damaged)
        for i in range(len(samples)):
            expected = expected_window(samples, i, changed, pointers)
            if expected.max() >= VOCAB:
                with pytest.raises(UserError, match="outside the model's vocab"):
                    samples.tokens(i)
                refused_vocab += 1
            else:
                assert np.array_equal(samples.tokens(i), expected), (case, i)
    assert refused_vocab > 0  # some flips did produce out-of-vocab ids


# -- malformed JSONL into the preprocessing library entry ---------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "über", "naïve", "数据", "🙂", "x" * 40, "a\tb"]


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def random_line(rng: random.Random) -> tuple[bytes, str]:
    """One JSONL line and what preprocessing must make of it: 'doc', 'empty' or 'invalid'."""
    kind = rng.randrange(9)
    if kind <= 2:
        return json.dumps({"text": random_text(rng), "id": rng.randrange(99)}).encode(), "doc"
    if kind == 3:
        return json.dumps({"text": rng.choice(["", "   ", "\t"])}).encode(), "empty"
    if kind == 4:  # a strict prefix of an object is never valid JSON
        full = json.dumps({"text": random_text(rng)}).encode()
        return full[:rng.randrange(1, len(full))], "invalid"
    if kind == 5:
        return json.dumps(rng.choice([[1, 2], 3, "text", None, {"other": "x"},
                                      {"text": 5}, {"text": ["a"]}])).encode(), "invalid"
    if kind == 6:  # invalid UTF-8 inside an otherwise fine record
        return b'{"text": "ab\xff\xfe cd"}', "invalid"
    if kind == 7:  # a lone surrogate: valid JSON, but not encodable text
        return b'{"text": "ok \\ud800 then"}', "invalid"
    junk = bytes(rng.choice(b"{}[]\":,ab01 \\") for _ in range(rng.randint(1, 30)))
    return b"{" + junk + b"\x00", "invalid"  # a NUL byte is never valid JSON


def test_malformed_jsonl_gives_user_error_or_exact_documents(demo_data, tokenizer, tmp_path):
    for case in range(120):
        rng = random.Random(case)
        lines = [random_line(rng) for _ in range(rng.randint(1, 6))]
        path = tmp_path / f"case{case}.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line, _ in lines))
        kinds = [kind for _, kind in lines]
        for on_error in ("fail", "skip"):
            out = str(tmp_path / f"out{case}{on_error}")
            try:
                summary = preprocess([str(path)], out, demo_data.tokenizer_model, append_eod=True,
                                     on_error=on_error, show_progress=False)
            except UserError as err:
                no_docs = "doc" not in kinds
                assert ("invalid" in kinds and on_error == "fail") or no_docs, (case, str(err))
                assert str(path) in str(err) or (no_docs and "no documents" in str(err))
                assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # nothing half-written
                continue
            assert on_error == "skip" or "invalid" not in kinds, case
            assert summary.skipped_invalid == kinds.count("invalid")
            assert summary.skipped_empty == kinds.count("empty")
            expected = [tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod]
                        for line, kind in lines if kind == "doc"]
            dataset = open_indexed(dataset_prefix(out, "text"))
            assert [dataset[i].tolist() for i in range(len(dataset))] == expected, case
