"""The eval records' whole-document figures (train/evaluator.py ``TestDocuments``): the final
evaluation's ``test_bpb`` and ``test_doc_loss`` equal tools/evaluate.py's figures on the saved
final checkpoint, for a run on 1 rank and one at TP2 on 2 gloo ranks; ``wall_s`` is the sum of
the step times."""

import json
import os

import pytest

from blade_mega.testing import pretrain_rank, run_distributed
from conftest import REPO

SEQ = 32
STEPS = 4
TOOL = os.path.join(REPO, "tools", "evaluate.py")


def _train_then_evaluate(argv, evaluate_argv):
    """One rank: the training run, then tools/evaluate.py on its checkpoint; rank 0 returns the
    run's log records and the tool's JSON line."""
    import contextlib
    import io
    import runpy

    records = pretrain_rank(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(TOOL, run_name="evaluate_tool")["main"](evaluate_argv)
    if os.environ["RANK"] != "0":
        return None
    return records, json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def test_documents(demo_data, tmp_path_factory):
    """Twelve test documents (the first 1,500 characters of each): a few chunks apiece."""
    from blade_mega.prepare.preprocess import dataset_prefix, preprocess

    root = tmp_path_factory.mktemp("eval_documents")
    source = str(root / "test.jsonl")
    with open(os.path.join(demo_data.corpus_dir, "test.jsonl")) as f, open(source, "w") as out:
        for _, line in zip(range(12), f):
            out.write(json.dumps({"text": json.loads(line)["text"][:1500]}) + "\n")
    preprocess([source], str(root / "test"), demo_data.tokenizer_model, append_eod=True,
               show_progress=False)
    return dataset_prefix(str(root / "test"), "text")


def _run(demo_data, test_documents, directory, world, layout_flags):
    save = os.path.join(directory, "ckpt")
    argv = ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            "--test-data-path", test_documents, "--model-size", "tiny", "--seq-length", str(SEQ),
            "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", str(STEPS),
            "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
            "--eval-interval", "2", "--eval-iters", "1", "--no-progress", "--seed", "7",
            "--save", save, "--log-file", os.path.join(directory, "log.jsonl"), *layout_flags]
    evaluate = ["--load", save, "--data-path", test_documents, "--micro-batch-size", "2",
                "--no-progress"]
    return run_distributed(_train_then_evaluate, world, argv, evaluate, timeout=300)[0]


@pytest.fixture(scope="module")
def runs(demo_data, test_documents, tmp_path_factory):
    return {"single": _run(demo_data, test_documents, str(tmp_path_factory.mktemp("one")), 1, []),
            "tp2": _run(demo_data, test_documents, str(tmp_path_factory.mktemp("tp2")), 2,
                        ["--tensor-model-parallel-size", "2"])}


@pytest.mark.parametrize("layout", ["single", "tp2"])
def test_final_evaluation_equals_tools_evaluate(runs, test_documents, layout):
    records, evaluated = runs[layout]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [2, STEPS]
    figures = evaluated["datasets"][test_documents]
    assert figures["documents"] == 12 and figures["predicted_tokens"] > 12
    assert evals[-1]["test_bpb"] == pytest.approx(figures["bits_per_byte"], rel=1e-6, abs=1e-6)
    assert evals[-1]["test_doc_loss"] == pytest.approx(figures["loss"], rel=1e-6, abs=1e-6)
    assert evals[0]["test_bpb"] > evals[-1]["test_bpb"]  # it trained, and each eval is fresh


def test_wall_s_is_the_sum_of_the_step_times(runs):
    records, _ = runs["single"]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["step_time"] for r in records if r["kind"] == "train"]  # one record per step
    assert len(steps) == STEPS
    assert 0 < evals[0]["wall_s"] < evals[1]["wall_s"]
    # each step is timed once more, a few bookkeeping lines later than its step_time
    assert evals[1]["wall_s"] == pytest.approx(sum(steps), rel=0.02, abs=0.01)
    assert evals[0]["wall_s"] == pytest.approx(sum(steps[:2]), rel=0.02, abs=0.01)
