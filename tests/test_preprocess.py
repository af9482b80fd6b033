import gzip
import json
import os
import warnings

import numpy
import pytest

from blade_mega.prepare import preprocess as preprocess_module
from blade_mega.prepare.inputs import RawRecord
from blade_mega.prepare.preprocess import choose_dtype, preprocess
from blade_mega.errors import UserError
from blade_mega.data.tokenizer import Tokenizer
from conftest import assert_user_error, run_tool, run_tool_in_subprocess

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _run(tmp_path, inputs, model, **kwargs):
    """preprocess() into `<tmp_path>/out_<key>_document.*`."""
    return preprocess(inputs, str(tmp_path / "out"), model, show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return Tokenizer.load(demo_data.tokenizer_model)


def test_round_trip_through_megatron_reader(demo_data, tokenizer):
    records = _records(os.path.join(demo_data.corpus_dir, "target.jsonl"))
    documents = _documents(demo_data.target_prefix)
    assert len(documents) == len(records)
    for record, ids in zip(records, documents):
        assert ids == tokenizer.encode(record["text"]) + [tokenizer.eod_id]
    assert IndexedDataset(demo_data.target_prefix).index.dtype == numpy.uint16


def test_meta_lines_follow_index_order(demo_data):
    records = _records(os.path.join(demo_data.corpus_dir, "pool.jsonl"))
    meta = _records(demo_data.pool_meta)
    assert meta == [{"id": r["id"], "module": r["module"], "noise": r["noise"]} for r in records]
    assert len(meta) == len(IndexedDataset(demo_data.pool_prefix).document_indices) - 1


def test_gpt_dataset_builds_from_output(demo_data, tokenizer, tmp_path):
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=64,
        blend=([demo_data.pool_prefix], None),
        split="100,0,0",
        path_to_cache=str(tmp_path / "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [32, None, None], lambda: True, config).build()
    assert len(train) >= 32 and valid is None and test is None
    sample = train[0]
    assert sample["tokens"].shape == (64,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    assert int(sample["tokens"].max()) < tokenizer.vocab_size
    # The sample is a window of the document stream: its text occurs in some document.
    window = tokenizer.decode(sample["tokens"][:8].tolist())
    stream = "".join(r["text"] for r in _records(os.path.join(demo_data.corpus_dir, "pool.jsonl")))
    assert window in stream


def test_two_workers_write_the_same_bytes(demo_data, tmp_path):
    pool = os.path.join(demo_data.corpus_dir, "pool.jsonl")
    for workers in (1, 2):
        preprocess([pool], str(tmp_path / f"w{workers}"), demo_data.tokenizer_model, append_eod=True,
                   workers=workers, meta_keys=["id"], show_progress=False)
    for suffix in (".bin", ".idx", ".meta.jsonl"):
        one = (tmp_path / f"w1_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"w2_text_document{suffix}").read_bytes(), suffix


def test_in_flight_chunks_are_bounded(demo_data):
    """Streaming: the reader never runs more than a few chunks ahead of the writer."""
    consumed = []

    def chunks():
        for i in range(40):
            consumed.append(i)
            yield [RawRecord("x.jsonl", i + 1, json.dumps({"text": f"x = {i}"}).encode())]

    encoder_args = (demo_data.tokenizer_model, ["text"], [], False, numpy.uint16)
    for produced, _ in enumerate(preprocess_module._encode_in_order(chunks(), 2, encoder_args), start=1):
        assert len(consumed) - produced <= preprocess_module.CHUNKS_IN_FLIGHT_PER_WORKER * 2
    assert produced == 40


def test_input_kinds_keys_and_empty_documents(demo_data, tokenizer, tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    _write_jsonl(src / "a.jsonl", [{"text": "a = 1\n", "doc": "x"}, {"text": "", "doc": "y"}, {"text": "  \n", "doc": "z"}])
    with gzip.open(src / "nested" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "b = 2\n", "doc": "w"}) + "\n\n")
    summary = _run(tmp_path, [str(src)], model=demo_data.tokenizer_model, json_keys=["text", "doc"])
    assert _documents(str(tmp_path / "out_text_document")) == [tokenizer.encode("a = 1\n"), tokenizer.encode("b = 2\n")]
    assert _documents(str(tmp_path / "out_doc_document")) == [tokenizer.encode(t) for t in "xyzw"]
    assert (summary.documents, summary.skipped_empty, summary.skipped_invalid) == (6, 2, 0)
    assert summary.tokens == sum(len(d) for d in _documents(str(tmp_path / "out_text_document"))) + 4


def test_txt_file_is_one_document_and_globs_expand(demo_data, tokenizer, tmp_path):
    (tmp_path / "one.txt").write_text("import os\n\n\nprint(os.sep)\n")
    (tmp_path / "two.txt").write_text("x = 2\n")
    _run(tmp_path, [str(tmp_path / "*.txt")], model=demo_data.tokenizer_model, append_eod=True)
    assert _documents(str(tmp_path / "out_text_document")) == [
        tokenizer.encode("import os\n\n\nprint(os.sep)\n") + [3], tokenizer.encode("x = 2\n") + [3],
    ]


def test_skip_invalid_records(demo_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a = 1"}\n{"text": nope}\n{"other": "x"}\n{"text": "\xff"}\n[1]\n{"text": "b"}\n')
    summary = _run(tmp_path, [str(bad)], model=demo_data.tokenizer_model, on_error="skip")
    assert (summary.documents, summary.skipped_invalid) == (2, 4)


def test_dtype_choice(demo_data, tmp_path):
    assert choose_dtype(2000) == numpy.uint16
    assert choose_dtype(70000) == numpy.int32
    assert choose_dtype(2000, "int32") == numpy.int32
    with pytest.raises(UserError, match="vocab size 70000 does not fit --dtype uint16"):
        choose_dtype(70000, "uint16")


@pytest.fixture(scope="module")
def big_vocab_model(demo_data, tmp_path_factory):
    """The demo tokenizer padded with unused pieces past the uint16 range."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(open(demo_data.tokenizer_model, "rb").read())
    for i in range(70000 - len(model.pieces)):
        piece = model.pieces.add(piece=f"<unused_{i}>", score=0.0)
        piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
    path = tmp_path_factory.mktemp("big_vocab") / "big.model"
    path.write_bytes(model.SerializeToString())
    return str(path)


def test_large_vocab_uses_int32(big_vocab_model, demo_data, tmp_path):
    source = os.path.join(demo_data.corpus_dir, "test.jsonl")
    _run(tmp_path, [source], model=big_vocab_model)
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset.index.dtype == numpy.int32
    text = _records(source)[0]["text"]
    assert dataset[0].tolist() == Tokenizer.load(big_vocab_model).encode(text)


def test_failed_run_leaves_previous_outputs_and_no_temporaries(demo_data, tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "a = 1"}])
    _run(tmp_path, [good], model=demo_data.tokenizer_model, meta_keys=["text"])
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p.startswith("out")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "b = 2"}\n{"text": nope}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: invalid JSON"):
        _run(tmp_path, [str(bad)], model=demo_data.tokenizer_model, meta_keys=["text"], workers=2)
    after = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p.startswith("out")}
    assert after == before and len(before) == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# --- command line -------------------------------------------------------------------------------


def test_cli_summary_and_outputs(demo_data, tmp_path):
    source = os.path.join(demo_data.corpus_dir, "test.jsonl")
    result = run_tool_in_subprocess("preprocess_data", "--input", source, "--output-prefix", str(tmp_path / "t"),
                      "--tokenizer-model", demo_data.tokenizer_model, "--append-eod", "--workers", "2",
                      "--meta-keys", "id,noise")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split()[1:])
    assert int(fields["docs"]) == len(_records(source))
    assert int(fields["tokens"]) == sum(len(d) for d in _documents(str(tmp_path / "t_text_document")))
    assert fields["skipped_empty"] == fields["skipped_invalid"] == "0"
    assert sorted(os.listdir(tmp_path)) == ["t_text_document.bin", "t_text_document.idx", "t_text_document.meta.jsonl"]


@pytest.fixture
def cli(demo_data, tmp_path):
    def run(*inputs, model=None, extra=()):
        return run_tool("preprocess_data", "--input", *inputs, "--output-prefix", str(tmp_path / "out" / "x"),
                        "--tokenizer-model", model or demo_data.tokenizer_model, *extra)
    return run


def _no_outputs(tmp_path):
    return not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_cli_missing_input(cli, tmp_path):
    assert_user_error(cli(str(tmp_path / "absent.jsonl")), "input not found", "absent.jsonl")
    assert_user_error(cli(str(tmp_path / "*.jsonl")), "no files match")
    assert _no_outputs(tmp_path)


def test_cli_empty_input(cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_user_error(cli(str(empty)), "no documents", "empty.jsonl")
    only_empty_docs = _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " "}])
    assert_user_error(cli(only_empty_docs), "no documents")
    assert _no_outputs(tmp_path)


def test_cli_invalid_json(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"\n')
    assert_user_error(cli(str(bad)), "bad.jsonl:3", "invalid JSON", "--on-error skip")
    assert _no_outputs(tmp_path)
    skipped = cli(str(bad), extra=["--on-error", "skip"])
    assert skipped.returncode == 0 and "skipped_invalid=1" in skipped.stdout


def test_cli_missing_key(cli, tmp_path):
    source = _write_jsonl(tmp_path / "k.jsonl", [{"text": "a"}, {"body": "b"}])
    assert_user_error(cli(source), "k.jsonl:2", "no key 'text'", "--json-keys")
    assert _no_outputs(tmp_path)


def test_cli_non_utf8(cli, tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    assert_user_error(cli(str(bad)), "latin.jsonl:2", "UTF-8")
    txt = tmp_path / "latin.txt"
    txt.write_bytes(b"a = 1\nb = 2\nc = '\xe9'\n")
    assert_user_error(cli(str(txt)), "latin.txt:3", "UTF-8")
    assert _no_outputs(tmp_path)


def test_cli_bad_tokenizer(cli, tmp_path):
    source = _write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    assert_user_error(cli(source, model=str(tmp_path / "none.model")), "none.model", "train_tokenizer.py")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00garbage")
    assert_user_error(cli(source, model=str(corrupt)), "corrupt.model", "not a valid SentencePiece model")
    assert _no_outputs(tmp_path)


def test_cli_forced_dtype_too_small(cli, big_vocab_model, tmp_path):
    source = _write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    assert_user_error(cli(source, model=big_vocab_model, extra=["--dtype", "uint16"]), "70000", "--dtype int32")
    assert _no_outputs(tmp_path)


def test_cli_unwritable_output_dir(demo_data, tmp_path):
    source = _write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    (tmp_path / "file").write_text("not a directory")
    result = run_tool_in_subprocess("preprocess_data", "--input", source, "--output-prefix", str(tmp_path / "file" / "sub" / "x"),
                      "--tokenizer-model", demo_data.tokenizer_model)
    assert_user_error(result, "cannot write to output directory", "file")


def test_key_flags_take_space_and_comma_separated_forms(demo_data, tmp_path):
    """Megatron-LM spells --json-keys 'text title' and this tool --meta-keys 'id,noise': both
    flags accept both forms, with the same outputs."""
    source = os.path.join(demo_data.corpus_dir, "test.jsonl")
    outputs = {}
    for form, (json_keys, meta_keys) in {"spaces": (["text", "module"], ["id", "noise"]),
                                         "commas": (["text,module"], ["id,noise"])}.items():
        prefix = tmp_path / form / "t"
        result = run_tool("preprocess_data", "--input", source, "--output-prefix", str(prefix),
                          "--tokenizer-model", demo_data.tokenizer_model, "--no-progress",
                          "--json-keys", *json_keys, "--meta-keys", *meta_keys)
        assert result.returncode == 0, result.stderr
        outputs[form] = {name: (tmp_path / form / name).read_bytes()
                         for name in sorted(os.listdir(tmp_path / form))}
    assert sorted(outputs["spaces"]) == [f"t_{key}_document.{suffix}" for key in ("module", "text")
                                         for suffix in ("bin", "idx", "meta.jsonl")]
    assert outputs["spaces"] == outputs["commas"]
    first = json.loads(outputs["commas"]["t_text_document.meta.jsonl"].splitlines()[0])
    assert sorted(first) == ["id", "noise"]
