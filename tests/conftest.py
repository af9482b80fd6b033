"""Shared fixtures: a small demo corpus, a tokenizer trained on it and its indexed datasets."""

import io
import json
import os
import runpy
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from unittest import mock

import pytest

# DeepSpeed JIT-builds its CPU comm op once per torch_extensions directory; one per venv keeps
# two checkouts (or a CI clone beside a dev tree) from rebuilding each other's copy, which a
# test running under a file-size limit could not do.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      os.path.join(sys.prefix, "torch_extensions"))

from blade_mega.prepare.demo_corpus import build_demo_corpus, write_demo_corpus
from blade_mega.prepare.preprocess import dataset_prefix, meta_path, preprocess
from blade_mega.prepare.inputs import iter_texts
from blade_mega.data.tokenizer import train_tokenizer

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


def run_main(argv, capsys) -> tuple[int, str, str]:
    """``blade-pretrain argv`` in this process: (exit code, stdout, stderr)."""
    from blade_mega.pretrain import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


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


# -- Llama-style checkpoints of several layouts, for export and evaluation tests ---------------

LLAMA_TRAIN = ["--model-size", "tiny-llama", "--seq-length", "32", "--global-batch-size", "4",
               "--micro-batch-size", "2", "--train-iters", "2", "--lr", "3e-3",
               "--lr-warmup-iters", "1", "--eval-interval", "0", "--no-progress"]
LLAMA_LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"],
                 "pp2": ["--pipeline-model-parallel-size", "2"]}
PROBE_SHAPE = (2, 32)  # the token batch whose logits the checkpoint fixtures record


def probe_tokens(vocab: int = 2000):
    import torch

    return torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(7))


def _layout_logits(module, tokens):
    """Full-vocabulary logits of ``tokens`` from this rank's stage of a model of any TP/PP
    layout, through Megatron's pipeline schedule; None except on the last stage."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = []

    def forward_step(data, model):
        batch = next(data)
        positions = torch.arange(batch.size(1)).expand_as(batch)
        output = model(batch, positions, None)  # no labels: [b, s, vocab / tp] logits

        def keep(output):
            captured.append(output.detach())
            return output.sum() * 0.0, {}

        return output, keep

    module.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[module],
            num_microbatches=1, seq_length=tokens.size(1), micro_batch_size=tokens.size(0),
            forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(captured[0]) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, captured[0].contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _train_save_and_probe(argv):
    """One rank: train and save a checkpoint; return the probe's logits (last stage, TP rank 0)
    and the names whose weights differ between the trained module and this rank's shard of the
    checkpoint as blade_mega.train.model_weights gathers it (none, if gathering is exact)."""
    import torch
    from megatron.core import parallel_state

    from blade_mega.config import parse_config
    from blade_mega.testing import in_rank
    from blade_mega.train.model_weights import read_checkpoint, shard_for
    from blade_mega.train.trainer import Trainer

    config = parse_config(argv)
    parallel = config.parallel
    with in_rank(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                 timeout_minutes=2.0) as layout:
        trainer = Trainer(config, layout)
        try:
            trainer.train()
            module = trainer.learner.module
            logits = _layout_logits(module, probe_tokens())
            offset = module.decoder.layers[0].layer_number - 1
            shard = shard_for(read_checkpoint(config.checkpoint.save), module.state_dict().keys(),
                              parallel_state.get_tensor_model_parallel_rank(),
                              parallel_state.get_tensor_model_parallel_world_size(), offset)
            trained = module.state_dict()
            differ = sorted(n for n, t in shard.items() if not torch.equal(t, trained[n]))
            if parallel_state.get_tensor_model_parallel_rank() != 0:
                logits = None
            records = []
            if config.log.log_file and torch.distributed.get_rank() == 0:
                with open(config.log.log_file) as f:
                    records = [json.loads(line) for line in f]
            return {"logits": None if logits is None else logits.tolist(), "differ": differ,
                    "missing": sorted(set(trained) - set(shard) - {n for n in trained
                                                                   if n.endswith("_extra_state")}),
                    "train": [r for r in records if r["kind"] == "train"]}
        finally:
            trainer.close()


def _train_save_and_probe_each(argvs):
    """``_train_save_and_probe`` for several runs in one process (one start-up for all)."""
    return [_train_save_and_probe(argv) for argv in argvs]


@dataclass(frozen=True)
class LlamaCheckpoint:
    save: str            # the --save directory
    logits: list         # probe_tokens()'s logits [2, 32, padded vocab] from the trained model
    rank_reports: list   # per rank: {"differ": [...], "missing": [...]}
    train: list          # rank 0's train log records


@pytest.fixture(scope="session")
def llama_checkpoints(demo_data, tmp_path_factory) -> dict:
    """A 2-step tiny-llama run saved with TP2 and with PP2 (2 gloo ranks each)."""
    from blade_mega.testing import run_distributed

    out = {}
    for name, flags in LLAMA_LAYOUTS.items():
        save = str(tmp_path_factory.mktemp(f"llama_{name}"))
        argv = ["--tokenizer-model", demo_data.tokenizer_model, "--data-path",
                demo_data.pool_prefix, *LLAMA_TRAIN, *flags, "--save", save,
                "--log-file", os.path.join(save, "log.jsonl"), "--log-interval", "1"]
        ranks = run_distributed(_train_save_and_probe, 2, argv, timeout=300)
        logits = next(r["logits"] for r in ranks if r["logits"] is not None)
        out[name] = LlamaCheckpoint(save, logits, [{k: r[k] for k in ("differ", "missing")}
                                                   for r in ranks], ranks[0]["train"])
    return out
