"""Checkpoints: DeepSpeed files for model + optimizer, plus our own run state, made atomic.

Layout of ``--save``::

    iter_0000100/                 DeepSpeed checkpoint of the learner (tag = iter_0000100)
    iter_0000100/reference/ ...   the selection hook's engines, if any
    iter_0000100/run_state_rank00003.pt   iteration, consumed samples, RNG states, hook state
    iter_0000100/manifest.json    written once every rank finished: files, sizes, layout
    latest                        the tag of the newest complete checkpoint, replaced last

A save killed half-way leaves no manifest and ``latest`` untouched, so it is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
from megatron.core import tensor_parallel

from blade_mega.errors import UserError
from blade_mega.parallel import Layout

LATEST = "latest"
MANIFEST = "manifest.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(save_dir: str, iteration: int, engine, run_state: dict, layout: Layout,
         hook=None, keep: int = 2) -> str:
    tag = tag_for(iteration)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    directory = os.path.join(save_dir, tag)
    if rank == 0 and os.path.isdir(directory):
        shutil.rmtree(directory)  # a stale, incomplete attempt at this tag
    _barrier()
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)
    if hook is not None:
        hook.save_engines(directory, tag)
    state_path = os.path.join(directory, f"run_state_rank{rank:05d}.pt")
    torch.save({**run_state, "rng": rng_state()}, state_path + ".tmp")
    os.replace(state_path + ".tmp", state_path)
    _barrier()
    if rank == 0:
        files = {}
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, directory)] = os.path.getsize(path)
        manifest = {"iteration": iteration, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                    "files": files}
        _write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
        _write_atomic(os.path.join(save_dir, LATEST), tag)
        _prune(save_dir, keep)
    _barrier()
    return directory


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(save_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(t for t in os.listdir(save_dir) if t.startswith("iter_"))
    for old in tags[:-keep]:
        shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


def check_complete(directory: str) -> Optional[str]:
    """None if the checkpoint in ``directory`` is complete, else what is wrong with it."""
    manifest_path = os.path.join(directory, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return f"{manifest_path}: missing or unreadable (the save did not finish)"
    for name, size in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{path}: missing"
        if os.path.getsize(path) != size:
            return f"{path}: {os.path.getsize(path)} bytes, expected {size} (truncated or changed)"
    return None


def find_loadable(load_dir: str) -> tuple[str, dict]:
    """The newest complete checkpoint: ``latest`` if it checks out, else the newest that does."""
    latest_path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(latest_path):
        raise UserError(f"{latest_path}: no checkpoint to load; check --load or drop it to start "
                        "from scratch")
    with open(latest_path) as f:
        latest = f.read().strip()
    candidates = [latest] + sorted((t for t in os.listdir(load_dir)
                                    if t.startswith("iter_") and t != latest), reverse=True)
    problems = []
    for tag in candidates:
        problem = check_complete(os.path.join(load_dir, tag))
        if problem is None:
            if problems and _rank() == 0:
                print(f"warning: skipped broken checkpoint(s): {'; '.join(problems)}; "
                      f"loading {tag}", flush=True)
            with open(os.path.join(load_dir, tag, MANIFEST)) as f:
                return tag, json.load(f)
        problems.append(problem)
    raise UserError(f"no complete checkpoint in {load_dir}: {problems[0]}; restore the files or "
                    "start without --load")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def load(load_dir: str, engine, layout: Layout, hook=None) -> dict:
    tag, manifest = find_loadable(load_dir)
    if (manifest["tp"], manifest["pp"]) != (layout.tp, layout.pp):
        raise UserError(
            f"{os.path.join(load_dir, tag)}: saved with tensor-model-parallel-size "
            f"{manifest['tp']} and pipeline-model-parallel-size {manifest['pp']}, but this run "
            f"uses {layout.tp} and {layout.pp}; relaunch with the saved layout")
    if manifest["dp"] != layout.dp:
        raise UserError(f"{os.path.join(load_dir, tag)}: saved with data-parallel size "
                        f"{manifest['dp']}, this run has {layout.dp}; relaunch with "
                        f"{manifest['dp'] * layout.tp * layout.pp} ranks")
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"{os.path.join(load_dir, tag)}: DeepSpeed could not load this checkpoint")
    directory = os.path.join(load_dir, tag)
    if hook is not None:
        hook.load_engines(directory, tag)
    state_path = os.path.join(directory, f"run_state_rank{_rank():05d}.pt")
    try:
        state = torch.load(state_path, weights_only=False)
    except Exception as err:  # a corrupt pickle raises many types
        raise UserError(f"{state_path}: unreadable run state ({type(err).__name__}); "
                        "remove this checkpoint directory to fall back to the previous one")
    set_rng_state(state.pop("rng"))
    return state
