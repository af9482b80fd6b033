"""Shared fixtures: a small demo corpus, a tokenizer trained on it and its indexed datasets."""

import io
import os
import runpy
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from unittest import mock

import pytest

from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus
from blade_mega.prepare.preprocess import dataset_prefix, meta_path, preprocess
from blade_mega.prepare.inputs import iter_texts
from blade_mega.tokenizer import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_META_KEYS = ("id", "module", "noise")


@dataclass(frozen=True)
class DemoData:
    """Paths of the session's demo data. Prefixes are Megatron dataset prefixes (no suffix)."""

    corpus_dir: str  # pool.jsonl, target.jsonl, test.jsonl, labels.json
    tokenizer_model: str  # its <prefix>.json sidecar lies next to it
    pool_prefix: str
    target_prefix: str
    test_prefix: str
    pool_meta: str  # one {"id", "module", "noise"} line per pool document, in index order


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> DemoData:
    """~1 MB pool (half noise), 256 KB target and test, vocab-2000 BPE, EOD-terminated datasets."""
    root = str(tmp_path_factory.mktemp("demo_data"))
    corpus_dir = os.path.join(root, "corpus")
    splits, labels = build_demo_corpus(size_mb=1.0, noise_rate=0.5, seed=0)
    write_demo_corpus(corpus_dir, splits, labels)
    pool_jsonl = os.path.join(corpus_dir, "pool.jsonl")
    tokenizer = train_tokenizer(
        iter_texts([pool_jsonl], ["text"], skip_invalid=False),
        os.path.join(root, "tokenizer"),
        vocab_size=2000,
    )
    prefixes = {}
    for split in ("pool", "target", "test"):
        output_prefix = os.path.join(root, "indexed", split)
        preprocess(
            [os.path.join(corpus_dir, f"{split}.jsonl")],
            output_prefix,
            tokenizer.model_path,
            append_eod=True,
            meta_keys=DEMO_META_KEYS,
            show_progress=False,
        )
        prefixes[split] = dataset_prefix(output_prefix, "text")
    return DemoData(
        corpus_dir=corpus_dir,
        tokenizer_model=tokenizer.model_path,
        pool_prefix=prefixes["pool"],
        target_prefix=prefixes["target"],
        test_prefix=prefixes["test"],
        pool_meta=meta_path(prefixes["pool"]),
    )


@pytest.fixture(scope="module")
def one_rank_group():
    """A 1-rank gloo process group in the test process, as under torchrun with one rank."""
    import torch

    from blade_mega.testing import free_port

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run tools/<tool>.py as `__main__` in this process, capturing its output and exit status.
    (A subprocess would spend seconds importing torch; `run_tool_in_subprocess` checks that the
    tools also work that way.)"""
    path = os.path.join(REPO, "tools", f"{tool}.py")
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", [path, *args]), redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code or 0
    return subprocess.CompletedProcess([path, *args], code, stdout.getvalue(), stderr.getvalue())


def run_tool_in_subprocess(tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python tools/<tool>.py args...` exactly as a user would."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one `error:` line on stderr mentioning every fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need an NVIDIA GPU: skipped here with the reason (bench/gpu_check.sh
    runs them on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine); run bench/gpu_check.sh "
                                   "on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
