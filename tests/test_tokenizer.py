import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blade_mega.prepare.inputs import iter_texts
from blade_mega.errors import UserError
from blade_mega.data.tokenizer import Tokenizer, meta_path_for, sample_lines, train_tokenizer
from conftest import assert_user_error, run_tool

CODE = 'def f(x):\n\tif x:\n        return  x + 12345  # ü 日本 🐍\n\n\nclass A:\n    pass\r\n'


def _texts(demo_data, split="target"):
    return iter_texts([os.path.join(demo_data.corpus_dir, f"{split}.jsonl")], ["text"], skip_invalid=False)


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return Tokenizer.load(demo_data.tokenizer_model)


def test_special_ids_and_sidecar(demo_data, tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eod_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 2000
    with open(meta_path_for(demo_data.tokenizer_model)) as f:
        assert json.load(f) == {
            "vocab_size": 2000, "eod_id": 3, "pad_id": 0, "bos_id": 2, "unk_id": 1, "model_type": "bpe",
        }
    # The names megatron.core's GPTDataset reads.
    assert (tokenizer.eod, tokenizer.pad) == (3, 0)
    assert len(tokenizer.unique_identifiers["model_sha256"]) == 64


def test_code_round_trips_and_whitespace_is_cheap(tokenizer):
    ids = tokenizer.encode(CODE)
    assert tokenizer.decode(ids) == CODE
    assert tokenizer.encode("\n") == [tokenizer.encode("\n")[0]]  # newline is one piece
    assert len(tokenizer.encode("        ")) <= 2  # an 8-space indent is not 8 tokens
    assert tokenizer.encode_batch([CODE, "x = 1\n"]) == [ids, tokenizer.encode("x = 1\n")]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_training_is_deterministic_and_seeded(demo_data, tmp_path):
    first = train_tokenizer(_texts(demo_data), str(tmp_path / "a"), vocab_size=500, seed=3, max_sentences=2000)
    second = train_tokenizer(_texts(demo_data), str(tmp_path / "b"), vocab_size=500, seed=3, max_sentences=2000)
    other = train_tokenizer(_texts(demo_data), str(tmp_path / "c"), vocab_size=500, seed=4, max_sentences=2000)
    read = lambda t: open(t.model_path, "rb").read()  # noqa: E731
    assert read(first) == read(second)
    assert read(first) != read(other)  # the seed picks the sampled lines


def test_unigram_model_type(demo_data, tmp_path):
    texts = list(_texts(demo_data))[:20]
    tokenizer = train_tokenizer(texts, str(tmp_path / "uni"), vocab_size=400, model_type="unigram")
    assert tokenizer.model_type == "unigram"
    assert tokenizer.metadata()["model_type"] == "unigram"
    assert tokenizer.decode(tokenizer.encode(CODE)) == CODE


def test_sample_lines_is_bounded_ordered_and_seeded():
    texts = ["\n".join(f"line {d}.{i}" for i in range(10)) + "\n\n  \n" for d in range(100)]
    sample = sample_lines(texts, 50, seed=1)
    assert len(sample) == 50
    everything = sample_lines(texts, 10_000, seed=1)
    assert len(everything) == 1000  # blank lines dropped
    positions = [everything.index(line) for line in sample]
    assert positions == sorted(positions)  # input order kept
    assert sample == sample_lines(texts, 50, seed=1)
    assert sample != sample_lines(texts, 50, seed=2)


def test_load_errors_name_the_file(demo_data, tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(UserError, match="not found: .*nope.model"):
        Tokenizer.load(missing)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="corrupt.model is not a valid SentencePiece model"):
        Tokenizer.load(str(corrupt))


def test_stale_sidecar_is_rejected(demo_data, tmp_path):
    model = tmp_path / "tok.model"
    model.write_bytes(open(demo_data.tokenizer_model, "rb").read())
    (tmp_path / "tok.json").write_text(json.dumps({"vocab_size": 123, "eod_id": 3}))
    with pytest.raises(UserError, match="differs in vocab_size"):
        Tokenizer.load(str(model))


def test_vocab_too_large_for_input(tmp_path):
    with pytest.raises(UserError, match="lower --vocab-size"):
        train_tokenizer(["x = 1\ny = 2\n"], str(tmp_path / "tiny"), vocab_size=5000)
    assert not os.listdir(tmp_path)


def test_cli_trains_identical_models(demo_data, tmp_path):
    source = os.path.join(demo_data.corpus_dir, "target.jsonl")
    for name in ("one", "two"):
        result = run_tool("train_tokenizer", "--input", source, "--model-prefix", str(tmp_path / name),
                          "--vocab-size", "600", "--seed", "7")
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "one.model").read_bytes() == (tmp_path / "two.model").read_bytes()
    assert json.loads((tmp_path / "one.json").read_text())["vocab_size"] == 600


def test_cli_bad_inputs(tmp_path):
    assert_user_error(
        run_tool("train_tokenizer", "--input", str(tmp_path / "missing.jsonl"), "--model-prefix", str(tmp_path / "t")),
        "missing.jsonl",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a = 1"}\n{"text": oops}\n')
    assert_user_error(
        run_tool("train_tokenizer", "--input", str(bad), "--model-prefix", str(tmp_path / "t")), "bad.jsonl:2"
    )
    assert not (tmp_path / "t.model").exists()
