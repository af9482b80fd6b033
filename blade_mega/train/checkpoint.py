"""Checkpoints: DeepSpeed files for model + optimizer, plus our own run state, made atomic.

Layout of ``--save``::

    iter_0000100/                 DeepSpeed checkpoint of the learner (tag = iter_0000100)
    iter_0000100/reference/ ...   files of the run's other parts: the hook's engines, sidecars
    iter_0000100/run_state_rank00003.pt   run position, RNG states, the parts' small states
    iter_0000100/manifest.json    written once every rank finished: files, sizes, layout
    latest                        the tag of the newest complete checkpoint, replaced last

A save killed half-way leaves no manifest and ``latest`` untouched, so it is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from typing import Optional, Sequence

import torch
from megatron.core import tensor_parallel

from blade_mega import distributed
from blade_mega.atomic import write_atomic
from blade_mega.engine.parallel import Layout
from blade_mega.errors import UserError
from blade_mega.train import safe_load

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


def save(save_dir: str, iteration: int, engine, run_state: dict, layout: Layout,
         parts: Sequence = (), keep: int = 2) -> str:
    """Write checkpoint ``iteration``: the learner ``engine``'s DeepSpeed files, every part's
    ``save_files(directory)``, and this rank's ``run_state``; atomic (see the module's doc)."""
    tag = tag_for(iteration)
    rank = distributed.rank()
    directory = os.path.join(save_dir, tag)
    if rank == 0 and os.path.isdir(directory):
        shutil.rmtree(directory)  # a stale, incomplete attempt at this tag
    distributed.barrier()
    # Each phase ends with every rank agreeing on success, so a write that fails on one rank
    # makes every rank stop with the same message instead of leaving the others in a collective.
    problem = _guarded(lambda: _write_files(save_dir, tag, engine, run_state, parts, rank))
    _raise_if_any(problem, directory, save_dir)
    files = {}
    if rank == 0:
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, directory)] = os.path.getsize(path)
    files = distributed.from_rank0(files)
    crcs = distributed.split_over_ranks(lambda name: _crc32(os.path.join(directory, name)), files)
    problem = None
    if rank == 0:
        manifest = {"format": safe_load.FORMAT, "iteration": iteration, "tp": layout.tp,
                    "pp": layout.pp, "dp": layout.dp, "files": files, "crc32": crcs}
        problem = _guarded(lambda: (
            write_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1),
                         durable=True),
            write_atomic(os.path.join(save_dir, LATEST), tag, durable=True),
            _prune(save_dir, tag, keep)))
    _raise_if_any(problem, directory, save_dir)
    return directory


def _write_files(save_dir: str, tag: str, engine, run_state: dict, parts, rank: int) -> None:
    directory = os.path.join(save_dir, tag)
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)
    for part in parts:
        part.save_files(directory)
    state_path = os.path.join(directory, f"run_state_rank{rank:05d}.pt")
    torch.save({**run_state, "rng": rng_state()}, state_path + ".tmp")
    os.replace(state_path + ".tmp", state_path)


def _guarded(write) -> Optional[str]:
    """Run a write; None if it worked, else why it failed (only write failures are caught)."""
    try:
        write()
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _is_write_error(err):
            raise
        # torch.save's own message for a failed write is an internal assertion: say what it means
        return err.strerror if isinstance(err, OSError) and err.strerror else \
            "a write failed: disk full or file too large"
    return None


def _raise_if_any(problem: Optional[str], directory: str, save_dir: str) -> None:
    reason = distributed.first_problem(problem)
    if reason is not None:
        raise UserError(f"{directory}: cannot write the checkpoint ({reason}); "
                        f"free space in {save_dir} (or check its quota) and resume with --load "
                        "from the previous checkpoint, which is untouched")


def _is_write_error(err: RuntimeError) -> bool:
    """torch.save reports a failed write (disk full, file too large) as a RuntimeError."""
    return any(s in str(err) for s in ("inline_container", "PytorchStreamWriter",
                                       "file write failed"))


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _prune(save_dir: str, current: str, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints up to ``current``. Incomplete ones (a torn
    save) do not count, and tags above ``current`` (another run's) are left alone."""
    if keep <= 0:
        return
    tags = sorted(t for t in os.listdir(save_dir) if t.startswith("iter_") and t <= current)
    complete = [t for t in tags if os.path.isfile(os.path.join(save_dir, t, MANIFEST))]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for old in tags:
        if old < oldest_kept:
            shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


def _read_manifest(directory: str) -> tuple[Optional[str], Optional[dict]]:
    """(problem, manifest) from the manifest and the files' sizes."""
    manifest_path = os.path.join(directory, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return f"{manifest_path}: missing or unreadable (the save did not finish)", None
    for name, size in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{path}: missing", None
        if os.path.getsize(path) != size:
            return (f"{path}: {os.path.getsize(path)} bytes, expected {size} "
                    "(truncated or changed)"), None
    return None, manifest


def check_complete(directory: str) -> Optional[str]:
    """None if the checkpoint in ``directory`` is complete and intact, else what is wrong with
    it: sizes catch truncation, CRC-32s same-size corruption. Every rank must call it; rank 0's
    view of the manifest and sizes decides, so all ranks take the same path."""
    problem, manifest = distributed.from_rank0(
        _read_manifest(directory) if distributed.rank() == 0 else None)
    if problem is not None:
        return problem
    expected = manifest.get("crc32", {})  # absent in manifests written before checksums
    actual = distributed.split_over_ranks(lambda name: _crc32(os.path.join(directory, name)),
                                          expected)
    for name in sorted(expected):
        if actual[name] != expected[name]:
            return (f"{os.path.join(directory, name)}: CRC-32 {actual[name]:08x}, expected "
                    f"{expected[name]:08x} (corrupted)")
    return None


def find_loadable(load_dir: str) -> tuple[str, dict]:
    """The newest complete checkpoint: ``latest`` if it checks out, else the newest that does."""
    latest_path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(latest_path):
        raise UserError(f"{latest_path}: no checkpoint to load; check --load or drop it to start "
                        "from scratch")
    with open(latest_path) as f:
        latest = f.read().strip()
    # Fall back only to older checkpoints: a newer tag belongs to another run in this directory.
    candidates = [latest] + sorted((t for t in os.listdir(load_dir)
                                    if t.startswith("iter_") and t < latest), reverse=True)
    problems = []
    for tag in candidates:
        problem = check_complete(os.path.join(load_dir, tag))
        if problem is None:
            if problems and distributed.rank() == 0:
                print(f"warning: skipped broken checkpoint(s): {'; '.join(problems)}; "
                      f"loading {tag}", flush=True)
            with open(os.path.join(load_dir, tag, MANIFEST)) as f:
                manifest = json.load(f)
            note_format(os.path.join(load_dir, tag), manifest)
            return tag, manifest
        problems.append(problem)
    raise UserError(f"no complete checkpoint in {load_dir}: {problems[0]}; restore the files or "
                    "start without --load")


def load_weights(load_dir: str, engine, layout: Layout) -> str:
    """Model weights only, for continued pretraining (``--finetune``). Returns the tag."""
    tag, manifest = find_loadable(load_dir)
    _check_layout(load_dir, tag, manifest, layout, check_dp=False)
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_only=True,
                                     load_optimizer_states=False, load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"{os.path.join(load_dir, tag)}: DeepSpeed could not load this checkpoint")
    return tag  # DeepSpeed refreshes ZeRO's fp32 master copy from the loaded weights


def note_format(directory: str, manifest: dict) -> None:
    """One warning line for a checkpoint of an older format (rank 0)."""
    version = manifest.get("format", 1)
    if version < safe_load.FORMAT and distributed.rank() == 0:
        sys.stderr.write(
            f"warning: {directory}: checkpoint format {version}, written before checkpoint "
            f"format {safe_load.FORMAT}: its files load as data if they can; a run state that "
            f"needs pickle loads only with --trust-checkpoint or {safe_load.TRUST_ENV}=1 (a new "
            "save writes the current format)\n")


def _check_layout(load_dir: str, tag: str, manifest: dict, layout: Layout, check_dp: bool):
    if (manifest["tp"], manifest["pp"]) != (layout.tp, layout.pp):
        raise UserError(
            f"{os.path.join(load_dir, tag)}: saved with tensor-model-parallel-size "
            f"{manifest['tp']} and pipeline-model-parallel-size {manifest['pp']}, but this run "
            f"uses {layout.tp} and {layout.pp}; relaunch with the saved layout")
    if check_dp and manifest["dp"] != layout.dp:
        raise UserError(f"{os.path.join(load_dir, tag)}: saved with data-parallel size "
                        f"{manifest['dp']}, this run has {layout.dp}; relaunch with "
                        f"{manifest['dp'] * layout.tp * layout.pp} ranks")


def load(load_dir: str, engine, layout: Layout, parts: Sequence = (),
         load_optimizer: bool = True, trust: bool = False) -> dict:
    """Resume: weights, optimizer state (unless ``load_optimizer`` is False), every part's
    ``load_files(directory, load_optimizer)``, and this rank's run state. The data position and the sidecars are global, so a
    run may resume with another data-parallel size; ZeRO's optimizer partitions are per DP rank,
    so that needs ``load_optimizer=False`` (``--no-load-optim``)."""
    tag, manifest = find_loadable(load_dir)
    _check_layout(load_dir, tag, manifest, layout, check_dp=False)
    directory = os.path.join(load_dir, tag)
    dp_changed = manifest["dp"] != layout.dp
    if dp_changed and load_optimizer:
        raise UserError(
            f"{directory}: saved with data-parallel size {manifest['dp']}, this run has "
            f"{layout.dp}: ZeRO's optimizer partitions do not carry over; add --no-load-optim to "
            "resume the weights, data position and sidecar with a fresh optimizer, or relaunch "
            f"with {manifest['dp'] * layout.tp * layout.pp} ranks (or convert the checkpoint "
            "with DeepSpeed's ds_to_universal and load it with the saved layout's optimizer)")
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_only=not load_optimizer,
                                     load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"{directory}: DeepSpeed could not load this checkpoint")
    for part in parts:
        part.load_files(directory, load_optimizer)
    # Same DP size: this rank's own file. Another DP size: the file of the rank at the same
    # tensor/pipeline position in DP rank 0 (the state every DP rank shares: iteration, data
    # position, selection state; RNG streams then differ from an uninterrupted run).
    source = distributed.rank() if not dp_changed else _same_position_in_dp0(layout, manifest["dp"])
    state_path = os.path.join(directory, f"run_state_rank{source:05d}.pt")
    state, problem = None, None
    try:
        state = safe_load.load_file(state_path, trust)
    except UserError as err:  # refused: it holds what a run state never does
        problem = str(err)
    except Exception as err:  # a corrupt file raises many types
        problem = (f"{state_path}: unreadable run state ({type(err).__name__}); "
                   "remove this checkpoint directory to fall back to the previous one")
    problem = distributed.first_problem(problem)  # every rank stops, not only the bad file's
    if problem is not None:
        raise UserError(problem)
    set_rng_state(state.pop("rng"))
    return state


def _same_position_in_dp0(layout: Layout, saved_dp: int) -> int:
    """Global rank, in the saved layout, of this rank's tensor/pipeline position at DP rank 0
    (Megatron's rank order: tensor fastest, then data, then pipeline)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return tp_rank + layout.tp * saved_dp * pp_rank
