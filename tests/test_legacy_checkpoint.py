"""Checkpoints written before the typed run config (their run state holds the flag dict ``args``,
pinned in tests/golden/legacy_run_state_args.json as that code wrote it) still load: the config
they describe is the one today's flags give, tools read the model from them, and a run resumes
from them."""

from __future__ import annotations

import json
import os
import zlib

import torch

from blade_mega.config import from_checkpoint, parse_config
from blade_mega.testing import pretrain_rank, run_distributed
from blade_mega.train.model_weights import read_checkpoint
from conftest import REPO

with open(os.path.join(REPO, "tests", "golden", "legacy_run_state_args.json")) as f:
    LEGACY = json.load(f)


def _substituted(value, paths: dict):
    if isinstance(value, str):
        for placeholder, path in paths.items():
            value = value.replace(placeholder, path)
        return value
    if isinstance(value, list):
        return [_substituted(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: _substituted(v, paths) for k, v in value.items()}
    return value


def _paths(demo_data, save: str) -> dict:
    return {"TOKENIZER": demo_data.tokenizer_model,
            "DATA/pool_text_document": demo_data.pool_prefix,
            "DATA/target_text_document": demo_data.target_prefix, "SAVE": save}


def test_the_flag_dict_of_an_old_checkpoint_is_todays_config(demo_data, tmp_path):
    paths = _paths(demo_data, str(tmp_path / "ckpt"))
    old = from_checkpoint({"args": _substituted(LEGACY["args"], paths)})
    assert old == parse_config(_substituted(LEGACY["argv"], paths))
    assert old.selection.proxy == "tiny" and old.data.seq_length == 32
    # and today's form round-trips
    assert from_checkpoint({"config": old.to_dict()}) == old


def _as_written_before(directory: str, args: dict) -> None:
    """Rewrite the run state files of ``directory`` as the code before the change wrote them
    (``args`` where ``config`` is now), with the manifest's sizes and CRC-32s to match."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    for name in [n for n in manifest["files"] if n.startswith("run_state_rank")]:
        path = os.path.join(directory, name)
        state = torch.load(path, weights_only=False)
        del state["config"]
        state["args"] = args
        torch.save(state, path)
        with open(path, "rb") as f:
            data = f.read()
        manifest["files"][name] = len(data)
        manifest["crc32"][name] = zlib.crc32(data)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def test_an_old_checkpoint_is_read_by_the_tools_and_resumed(demo_data, tmp_path):
    save = str(tmp_path / "ckpt")
    paths = _paths(demo_data, save)
    argv = _substituted(LEGACY["argv"], paths)
    run_distributed(pretrain_rank, 1, argv + ["--train-iters", "1"], timeout=600)
    _as_written_before(os.path.join(save, "iter_0000001"), _substituted(LEGACY["args"], paths))

    model = read_checkpoint(save)  # what tools/export_hf.py and tools/evaluate.py read
    assert model.config == parse_config(argv)
    assert model.config.model.tokenizer_model == demo_data.tokenizer_model

    records = run_distributed(pretrain_rank, 1, argv + ["--load", save, "--log-file",
                                                        str(tmp_path / "resumed.jsonl")],
                              timeout=600)[0]
    assert [r["iteration"] for r in records if r["kind"] == "resume"] == [1]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [2]
