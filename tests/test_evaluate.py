"""tools/evaluate.py: whole documents in order, cut into chunks, loss and bits per byte per
dataset (and per noise label); checked against a hand computation with the exported Hugging
Face model, and equal across evaluation layouts."""

import json
import math
import os

import numpy as np
import pytest
import torch

from blade_mega.testing import run_distributed
from conftest import REPO, assert_user_error, run_tool

SEQ = 32
TOOL = os.path.join(REPO, "tools", "evaluate.py")


def _evaluate_rank(argvs):
    """One rank of ``tools/evaluate.py argv`` for each argv in turn (one process start-up for
    all); rank 0 returns each run's last output line, parsed."""
    import contextlib
    import io
    import runpy

    tool = runpy.run_path(TOOL, run_name="evaluate_tool")
    results = []
    for argv in argvs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            tool["main"](argv)
        if os.environ["RANK"] == "0":
            results.append(json.loads(out.getvalue().strip().splitlines()[-1]))
    return results


def _write_dataset(prefix, documents, labels=None):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for tokens in documents:
        builder.add_document(np.asarray(tokens, dtype=np.int32), [len(tokens)])
    builder.finalize(prefix + ".idx")
    if labels is not None:
        with open(prefix + ".meta.jsonl", "w") as f:
            for label in labels:
                f.write(json.dumps({"noise": label}) + "\n")


@pytest.fixture(scope="module")
def datasets(demo_data, tmp_path_factory):
    """``two``: 70 and 33 tokens (EOD included) of non-ASCII text; ``labelled``: six short
    documents, three labelled clean and three noise."""
    from blade_mega.data.tokenizer import Tokenizer

    tok = Tokenizer.load(demo_data.tokenizer_model)
    root = tmp_path_factory.mktemp("eval_data")
    with open(os.path.join(demo_data.corpus_dir, "test.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    text = "# héllo wörld: ✓ 日本語 — ünïcode\n" + texts[0]
    ids = tok.encode(text)
    two = [ids[:69] + [tok.eod_id], ids[100:132] + [tok.eod_id]]
    assert [len(d) for d in two] == [70, 33]
    labelled = [tok.encode(t)[:40 + 9 * i] + [tok.eod_id] for i, t in enumerate(texts[1:7])]
    _write_dataset(str(root / "two"), two, ["clean", "clean"])
    _write_dataset(str(root / "labelled"), labelled, ["clean", "noise"] * 3)
    return {"two": str(root / "two"), "labelled": str(root / "labelled"), "docs": two,
            "tokenizer": tok}


@pytest.fixture(scope="module")
def results(llama_checkpoints, datasets):
    """The TP2-saved checkpoint evaluated on 1 rank and on 2 ranks as TP2, PP2 and DP2."""
    ckpt = llama_checkpoints["tp2"].save
    base = ["--load", ckpt, "--data-path", datasets["two"], datasets["labelled"],
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--no-progress"]
    labelled = ["--noise-labels", datasets["two"] + ".meta.jsonl",
                datasets["labelled"] + ".meta.jsonl"]
    out = {"single": run_distributed(_evaluate_rank, 1, [base + labelled], timeout=300)[0][0]}
    layouts = {"tp2": ["--tensor-model-parallel-size", "2"],
               "pp2": ["--pipeline-model-parallel-size", "2"], "dp2": []}
    runs = run_distributed(_evaluate_rank, 2, [base + flags for flags in layouts.values()],
                           timeout=300)[0]
    out.update(zip(layouts, runs))
    return out


def test_chunks_tokens_and_bytes_by_hand(results, datasets):
    two = results["single"]["datasets"][datasets["two"]]
    # 70 tokens -> chunks of 32, 32, 6 (predicting 31 + 31 + 5); 33 -> 32, 1 (31 + 0)
    assert (two["documents"], two["tokens"], two["predicted_tokens"]) == (2, 103, 98)
    tok = datasets["tokenizer"]
    expected_bytes = sum(len(tok.decode(d).encode("utf-8")) for d in datasets["docs"])
    assert expected_bytes > sum(len(tok.decode(d)) for d in datasets["docs"])  # non-ASCII
    assert two["bytes"] == expected_bytes
    assert two["bits_per_byte"] == pytest.approx(
        two["loss"] * two["predicted_tokens"] / math.log(2) / two["bytes"], rel=1e-12)


def test_loss_equals_a_hand_computation_with_the_exported_model(results, datasets,
                                                                 llama_checkpoints, tmp_path):
    """Our chunks' losses, recomputed chunk by chunk with transformers on the export (padded
    vocabulary kept, so the softmax is the same)."""
    transformers = pytest.importorskip("transformers")
    directory = str(tmp_path / "hf")
    result = run_tool("export_hf", "--load", llama_checkpoints["tp2"].save, "--output",
                      directory, "--keep-padded-vocab")
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    total = 0.0
    for doc in datasets["docs"]:
        for start in range(0, len(doc), SEQ):
            chunk = torch.tensor(doc[start:start + SEQ]).unsqueeze(0)
            if chunk.size(1) < 2:
                continue
            with torch.no_grad():
                logits = model(chunk).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
    two = results["single"]["datasets"][datasets["two"]]
    assert two["loss"] == pytest.approx(total / 98, rel=1e-5)


def test_figures_per_noise_label(results, datasets):
    labelled = results["single"]["datasets"][datasets["labelled"]]
    by_label = labelled["by_label"]
    assert sorted(by_label) == ["clean", "noise"]
    assert by_label["clean"]["documents"] == by_label["noise"]["documents"] == 3
    for key in ("tokens", "predicted_tokens", "bytes"):
        assert by_label["clean"][key] + by_label["noise"][key] == labelled[key]
    nll = sum(v["loss"] * v["predicted_tokens"] for v in by_label.values())
    assert nll == pytest.approx(labelled["loss"] * labelled["predicted_tokens"], rel=1e-9)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_every_layout_gives_the_same_figures(results, layout):
    single, other = results["single"], results[layout]
    assert other["layout"]["tp" if layout == "tp2" else "pp" if layout == "pp2" else "dp"] == 2
    for prefix, figures in other["datasets"].items():
        expected = single["datasets"][prefix]
        for key in ("documents", "tokens", "predicted_tokens", "bytes"):
            assert figures[key] == expected[key]
        for key in ("loss", "bits_per_byte"):
            assert figures[key] == pytest.approx(expected[key], rel=1e-6)


def test_label_files_must_match_the_prefixes(datasets, llama_checkpoints):
    result = run_tool("evaluate", "--load", llama_checkpoints["tp2"].save, "--data-path",
                      datasets["two"], datasets["labelled"], "--noise-labels",
                      datasets["labelled"] + ".meta.jsonl")
    assert_user_error(result, "--noise-labels has 1 files for 2 --data-path prefixes")
