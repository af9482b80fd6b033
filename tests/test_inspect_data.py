import json
import os
import shutil
import struct

import numpy
import pytest

from blade_mega.data.index_check import verify
from blade_mega.prepare.inspect import document_tokens, summarize
from blade_mega.errors import UserError
from blade_mega.data.tokenizer import Tokenizer
from conftest import assert_user_error, run_tool, run_tool_in_subprocess

HEADER_SIZE = 34  # magic 9, version 8, dtype 1, sequence count 8, document count 8


@pytest.fixture
def copy(demo_data, tmp_path):
    """A private copy of the target dataset to damage."""
    prefix = str(tmp_path / "copy")
    for suffix in (".bin", ".idx"):
        shutil.copy(demo_data.target_prefix + suffix, prefix + suffix)
    return prefix


def _counts(prefix):
    with open(prefix + ".idx", "rb") as f:
        return struct.unpack("<QQ", f.read(HEADER_SIZE)[18:])


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_summary_matches_the_data(demo_data):
    tokenizer = Tokenizer.load(demo_data.tokenizer_model)
    with open(os.path.join(demo_data.corpus_dir, "target.jsonl")) as f:
        lengths = [len(tokenizer.encode(json.loads(line)["text"])) + 1 for line in f]
    summary = summarize(demo_data.target_prefix, bins=5)
    assert summary["documents"] == summary["sequences"] == len(lengths)
    assert summary["tokens"] == sum(lengths)
    assert summary["dtype"] == "uint16"
    assert summary["document_length"]["min"] == min(lengths)
    assert summary["document_length"]["max"] == max(lengths)
    assert len(summary["histogram"]) == 5
    assert sum(b["count"] for b in summary["histogram"]) == len(lengths)


def test_document_tokens_and_range(demo_data):
    assert document_tokens(demo_data.target_prefix, 0)[-1] == 3  # EOD
    count = summarize(demo_data.target_prefix)["documents"]
    with pytest.raises(UserError, match=f"document {count} out of range"):
        document_tokens(demo_data.target_prefix, count)


def test_cli_text_and_json(demo_data):
    text = run_tool("inspect_data", demo_data.target_prefix)
    assert text.returncode == 0 and "documents" in text.stdout and "#" in text.stdout
    as_json = run_tool("inspect_data", demo_data.target_prefix + ".idx", "--json")
    assert json.loads(as_json.stdout) == summarize(demo_data.target_prefix)


def test_cli_decode(demo_data):
    with open(os.path.join(demo_data.corpus_dir, "target.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    result = run_tool("inspect_data", demo_data.target_prefix, "--decode", "2",
                      "--tokenizer-model", demo_data.tokenizer_model)
    assert result.returncode == 0 and result.stdout == texts[2]
    assert_user_error(run_tool("inspect_data", demo_data.target_prefix, "--decode", "2"), "--tokenizer-model")


def test_verify_accepts_good_data(demo_data):
    result = run_tool_in_subprocess("inspect_data", demo_data.pool_prefix, "--verify")
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr


def test_missing_file(copy):
    os.remove(copy + ".bin")
    assert_user_error(run_tool("inspect_data", copy, "--verify"), "copy.bin", "no such file")
    assert_user_error(run_tool("inspect_data", copy), "copy.bin", "no such file")


def test_wrong_magic(copy):
    _patch(copy + ".idx", 0, b"NOTMAGIC!")
    assert_user_error(run_tool("inspect_data", copy, "--verify"), "copy.idx", "wrong magic")


def test_wrong_version_and_dtype(copy):
    _patch(copy + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(UserError, match="version 2"):
        verify(copy)
    _patch(copy + ".idx", 9, struct.pack("<QB", 1, 42))
    with pytest.raises(UserError, match="dtype code 42"):
        verify(copy)


def test_truncated_bin(copy):
    size = os.path.getsize(copy + ".bin")
    os.truncate(copy + ".bin", size - 10)
    assert_user_error(run_tool("inspect_data", copy, "--verify"), "copy.bin", "past the end")


def test_truncated_idx(copy):
    os.truncate(copy + ".idx", os.path.getsize(copy + ".idx") - 8)
    assert_user_error(run_tool("inspect_data", copy, "--verify"), "copy.idx", "does not match its counts")
    os.truncate(copy + ".idx", 20)
    assert_user_error(run_tool("inspect_data", copy, "--verify"), "copy.idx", "truncated header")


def test_pointer_past_end(copy):
    sequences, _ = _counts(copy)
    last_pointer = HEADER_SIZE + 4 * sequences + 8 * (sequences - 1)
    _patch(copy + ".idx", last_pointer, struct.pack("<q", os.path.getsize(copy + ".bin")))
    assert_user_error(run_tool("inspect_data", copy, "--verify"), "copy.bin", f"sequence {sequences - 1} ends")


def test_pointers_must_not_decrease(copy):
    sequences, _ = _counts(copy)
    _patch(copy + ".idx", HEADER_SIZE + 4 * sequences + 8 * 2, struct.pack("<q", 0))
    with pytest.raises(UserError, match="pointers decrease at sequence 2"):
        verify(copy)


def test_document_indices_checked(copy):
    sequences, documents = _counts(copy)
    doc_offset = HEADER_SIZE + 12 * sequences
    _patch(copy + ".idx", doc_offset + 8 * (documents - 1), struct.pack("<q", sequences + 5))
    with pytest.raises(UserError, match=f"end at {sequences + 5}"):
        verify(copy)
    _patch(copy + ".idx", doc_offset + 8 * 2, struct.pack("<q", 0))  # document 1 now ends before it starts
    with pytest.raises(UserError, match="decrease at document 1"):
        verify(copy)


def test_negative_length(copy):
    _patch(copy + ".idx", HEADER_SIZE + 4, numpy.int32(-1).tobytes())
    with pytest.raises(UserError, match="negative sequence length at sequence 1"):
        verify(copy)
