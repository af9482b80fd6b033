"""tools/export_selection.py: a sidecar + its dataset -> a filtered Megatron indexed dataset."""

import json
import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from blade_mega.data.index_check import verify
from blade_mega.data.sidecar import Sidecar
from conftest import assert_user_error, run_tool


def _documents(prefix):
    dataset = IndexedDataset(prefix, mmap=True)
    # Copies: the arrays are views of a memory map that closes with the dataset.
    return [numpy.array(dataset.get(i)) for i in range(len(dataset.sequence_lengths))]


@pytest.fixture
def source(demo_data):
    documents = _documents(demo_data.target_prefix)
    return demo_data.target_prefix, documents


@pytest.fixture
def sidecar_file(source, tmp_path):
    """Documents 0-9 scored 4 times: kept 4,3,2,1,0,... times; excess sums 0,1,2,... (ties at 8)."""
    prefix, documents = source
    sidecar = Sidecar(len(documents))
    kept = [4, 3, 2, 1, 0, 4, 3, 2, 1, 0]
    excess = [0, 4, 8, 8, 2, 8, 1, -3, 0, 6]
    for round_ in range(4):  # four rounds: kept k of the 4 times, excess summing to the value
        sidecar.update(numpy.arange(10), (numpy.array(kept) > round_).astype(float),
                       numpy.array(excess, dtype=numpy.float64) / 4)
    path = str(tmp_path / (os.path.basename(prefix) + ".blade_sidecar.npy"))
    sidecar.save(path)
    return path


def _export(sidecar, prefix, output, *rule):
    result = run_tool("export_selection", "--sidecar", sidecar, "--data-path", prefix,
                      "--output-prefix", output, *rule)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _assert_holds_exactly(output, documents, chosen):
    verify(output)
    written = _documents(output)
    assert len(written) == len(chosen)
    for tokens, document in zip(written, chosen):
        assert numpy.array_equal(tokens, documents[document])
    leftovers = [n for n in os.listdir(os.path.dirname(output)) if ".tmp-" in n]
    assert not leftovers


def test_keep_rate_threshold_exports_exactly_those_documents(source, sidecar_file, tmp_path):
    prefix, documents = source
    output = str(tmp_path / "out" / "kept")
    summary = _export(sidecar_file, prefix, output, "--metric", "keep-rate", "--threshold", "0.5")
    chosen = [0, 1, 2, 5, 6, 7]  # kept 4/4, 3/4 or 2/4 times; never-scored ones are left out
    _assert_holds_exactly(output, documents, chosen)
    assert summary["documents"] == 6 and summary["scored"] == 10
    assert summary["tokens"] == sum(documents[d].size for d in chosen)
    with open(prefix + ".meta.jsonl") as f:
        source_meta = f.read().splitlines()
    with open(output + ".meta.jsonl") as f:
        assert f.read().splitlines() == [source_meta[d] for d in chosen]


def test_top_fraction_of_mean_excess_breaks_ties_by_document_id(source, sidecar_file, tmp_path):
    prefix, documents = source
    output = str(tmp_path / "top")
    # Mean excess is 2.0 for documents 2, 3 and 5 (the best); 0.2 x 10 scored = 2 places.
    _export(sidecar_file, prefix, output, "--metric", "mean-excess", "--top-fraction", "0.2")
    _assert_holds_exactly(output, documents, [2, 3])


def test_checkpoint_directory_and_keep_unscored(source, sidecar_file, tmp_path):
    prefix, documents = source
    output = str(tmp_path / "all")
    summary = _export(os.path.dirname(sidecar_file), prefix, output, "--threshold", "0.75",
                      "--keep-unscored")
    chosen = [0, 1, 5, 6] + list(range(10, len(documents)))
    _assert_holds_exactly(output, documents, chosen)
    assert summary["of_documents"] == len(documents)


def test_bad_inputs_are_one_line_errors_and_write_nothing(source, sidecar_file, tmp_path):
    prefix, documents = source
    output = str(tmp_path / "never")

    def fails(sidecar, data_path, *rule_and_fragments):
        split = rule_and_fragments.index("--")
        result = run_tool("export_selection", "--sidecar", sidecar, "--data-path", data_path,
                          "--output-prefix", output, *rule_and_fragments[:split])
        assert_user_error(result, *rule_and_fragments[split + 1:])

    fails(str(tmp_path / "missing.npy"), prefix, "--threshold", "0.5", "--",
          "missing.npy", "no such sidecar")
    fails(str(tmp_path / "nowhere"), prefix, "--threshold", "0.5", "--", "no such sidecar")
    other = str(tmp_path / "other.blade_sidecar.npy")
    Sidecar(len(documents) + 1).save(other)
    fails(other, prefix, "--threshold", "0.5", "--", "other.blade_sidecar.npy",
          f"{len(documents) + 1} documents", "--data-path")
    garbage = str(tmp_path / "garbage.npy")
    with open(garbage, "wb") as f:
        f.write(b"not numpy")
    fails(garbage, prefix, "--threshold", "0.5", "--", "garbage.npy", "not a readable sidecar")
    fails(sidecar_file, str(tmp_path / "no_dataset"), "--threshold", "0.5", "--",
          "no_dataset.idx", "no such file")
    fails(sidecar_file, prefix, "--threshold", "1.5", "--", "keep-rate >= 1.5", "lower --threshold")
    fails(sidecar_file, prefix, "--top-fraction", "0", "--", "--top-fraction 0.0")
    never_scored = str(tmp_path / "empty.blade_sidecar.npy")
    Sidecar(len(documents)).save(never_scored)
    fails(never_scored, prefix, "--threshold", "0.5", "--", "ever scored", "--keep-unscored")
    result = run_tool("export_selection", "--sidecar", sidecar_file, "--data-path", prefix,
                      "--output-prefix", prefix, "--threshold", "0.5")
    assert_user_error(result, "--output-prefix must differ")
    assert not any(n.startswith("never") or ".tmp-" in n for n in os.listdir(tmp_path))
