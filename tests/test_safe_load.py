"""Loading a checkpoint runs no code: a crafted checkpoint whose run state, model file or
optimizer file carries a pickle payload is refused with one line naming the file and the type,
through resume and --finetune on 2 ranks and through tools/export_hf.py and tools/evaluate.py,
and the payload never runs. A checkpoint of the format before (NumPy in its run state) loads
only with --trust-checkpoint, with a warning that names its format."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import zlib

import numpy as np
import pytest
import torch

from blade_mega.testing import pretrain_rank, run_distributed
from conftest import assert_user_error, run_tool

WORLD = 2
FLAGS = ["--model-size", "tiny", "--seq-length", "32", "--global-batch-size", "4",
         "--micro-batch-size", "2", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-interval", "0", "--no-progress"]


class Payload:
    """Unpickling it creates ``marker``: what an attacker's object would do instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _argv(demo_data, *extra: str) -> list[str]:
    return ["--tokenizer-model", demo_data.tokenizer_model, "--data-path", demo_data.pool_prefix,
            *FLAGS, *extra]


def _cli_rank(argv: list[str]) -> tuple[int, str]:
    """One rank of ``blade-pretrain argv`` as a user runs it: (exit code, stderr)."""
    from blade_mega.pretrain import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def _rewrite(directory: str, name: str, change) -> None:
    """``change(state)`` in one file of the checkpoint, its manifest's size and CRC-32 to match
    (a forger rewrites both)."""
    path = os.path.join(directory, name)
    state = torch.load(path, weights_only=False)  # our own file, as written
    change(state)
    torch.save(state, path)
    manifest_path = os.path.join(directory, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(path, "rb") as f:
        data = f.read()
    manifest["files"][name], manifest["crc32"][name] = len(data), zlib.crc32(data)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


@pytest.fixture(scope="module")
def checkpoints(demo_data, tmp_path_factory):
    """A real 2-rank checkpoint, and copies of it with a payload in one kind of file each."""
    root = tmp_path_factory.mktemp("safe_load")
    clean = str(root / "clean")
    run_distributed(pretrain_rank, WORLD, _argv(demo_data, "--train-iters", "1", "--save",
                                                clean), timeout=600)
    markers = str(root / "markers")
    os.makedirs(markers)
    files = sorted(os.listdir(os.path.join(clean, "iter_0000001")))
    kinds = {"run_state": [n for n in files if n.startswith("run_state_rank")],
             "model": [n for n in files if n.endswith("model_states.pt")],
             "optimizer": [n for n in files if n.endswith("optim_states.pt")]}
    assert all(len(names) >= 1 for names in kinds.values()), files
    out = {"clean": clean, "markers": markers}
    for kind, names in kinds.items():
        copy = str(root / kind)
        shutil.copytree(clean, copy)
        for name in names:
            _rewrite(os.path.join(copy, "iter_0000001"), name,
                     lambda state, name=name: state.update(
                         extra=Payload(os.path.join(markers, f"{kind}-{name}"))))
        out[kind] = copy
    legacy = str(root / "legacy")  # format 1: no "format" in the manifest, NumPy in run states
    shutil.copytree(clean, legacy)
    directory = os.path.join(legacy, "iter_0000001")
    for name in kinds["run_state"]:
        _rewrite(directory, name, lambda state: state.update(ids=np.arange(4)))
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    del manifest["format"]
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    out["legacy"] = legacy
    return out


def _assert_refused(ranks: list, kind: str) -> None:
    """Every rank exits 2; the job says why in one line per distinct message (ranks that refuse
    the same file print it once), naming the file and the refused type; no traceback."""
    assert all(code == 2 for code, _ in ranks), ranks
    stderr = "".join(err for _, err in ranks)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines and "Traceback" not in stderr, stderr
    name = {"run_state": "run_state_rank", "model": "model_states.pt",
            "optimizer": "optim_states.pt"}[kind]
    for line in lines:
        assert "refused to load" in line and "io.open" in line and name in line, line


@pytest.mark.parametrize("kind", ["run_state", "model", "optimizer"])
def test_resume_refuses_a_payload_and_runs_none_of_it(demo_data, checkpoints, kind, tmp_path):
    argv = _argv(demo_data, "--train-iters", "2", "--load", checkpoints[kind], "--save",
                 str(tmp_path / "out"))
    _assert_refused(run_distributed(_cli_rank, WORLD, argv, timeout=600), kind)
    assert os.listdir(checkpoints["markers"]) == []


def test_finetune_refuses_a_payload_in_the_weights(demo_data, checkpoints, tmp_path):
    argv = _argv(demo_data, "--train-iters", "1", "--load", checkpoints["model"], "--finetune",
                 "--save", str(tmp_path / "out"))
    _assert_refused(run_distributed(_cli_rank, WORLD, argv, timeout=600), "model")
    assert os.listdir(checkpoints["markers"]) == []


@pytest.mark.parametrize("kind", ["run_state", "model"])
def test_export_and_evaluate_refuse_a_payload(demo_data, checkpoints, kind, tmp_path):
    exported = run_tool("export_hf", "--load", checkpoints[kind], "--output",
                        str(tmp_path / "hf"))
    assert_user_error(exported, "refused to load", "io.open")
    evaluated = run_tool("evaluate", "--load", checkpoints[kind], "--data-path",
                         demo_data.target_prefix)
    assert_user_error(evaluated, "refused to load", "io.open")
    assert os.listdir(checkpoints["markers"]) == [] and not (tmp_path / "hf").exists()


def test_a_checkpoint_of_the_format_before_loads_only_when_trusted(demo_data, checkpoints,
                                                                   tmp_path):
    argv = _argv(demo_data, "--train-iters", "2", "--load", checkpoints["legacy"], "--save",
                 str(tmp_path / "out"))
    refused = run_distributed(_cli_rank, WORLD, argv, timeout=600)
    assert all(code == 2 for code, _ in refused)
    message = "".join(err for _, err in refused)
    assert "refused to load" in message and "numpy" in message
    assert "written before checkpoint format 2" in message and "--trust-checkpoint" in message
    trusted = run_distributed(_cli_rank, WORLD, argv + ["--trust-checkpoint"], timeout=600)
    assert all(code == 0 for code, _ in trusted), trusted
    warned = [line for _, err in trusted for line in err.splitlines()
              if line.startswith("warning: ")]
    assert len(warned) == 1 and "written before checkpoint format 2" in warned[0], warned
    assert os.path.isdir(tmp_path / "out" / "iter_0000002")
