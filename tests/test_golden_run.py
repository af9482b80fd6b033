"""Golden runs: two fixed-seed 20-step runs on 2 gloo ranks, each saved at step 10 and resumed
in fresh processes, must reproduce the pinned losses, data blocks, evaluations and checkpoint
contents bit for bit.

They pin today's behaviour ahead of behaviour-free refactors (modules moved, the argparse
Namespace in checkpoints replaced by a typed config, the training loop restructured): such a
change must leave every number here identical.  What is pinned, per configuration
(``tests/golden/golden_run_<name>.json``):

* every train log record of both launches: ``iteration``, ``consumed``, ``loss`` (the exact
  float) and ``block_crcs`` (CRC-32s of each step's candidate block ids);
* every eval record: its ``iteration`` and window losses ``valid_loss``, ``target_loss`` and
  ``test_loss`` (exact floats; the whole-document ``test_doc_loss`` / ``test_bpb`` are checked
  against tools/evaluate.py in tests/test_eval_documents.py instead);
* a digest of the checkpoints at iterations 10 and 20: each file of ``iter_XXXXXXX/``
  (recursively) but the manifest, ``.pt`` files unpickled and walked down to their leaves
  (``file`` -> ``key/key[i]/...`` -> the first 64 bits of a sha256 of dtype + shape + bytes
  for tensors and arrays, of ``repr`` for scalars and strings), other files hashed whole; the
  top-level ``args`` and ``config`` of ``run_state_rank*.pt`` are left out (they hold the run's
  configuration, whose encoding is free to change), and of the manifest only its file names and
  tp/pp/dp/iteration (its sizes and CRCs depend on that encoding).

Float bits depend on the CPU's kernels and on the torch / DeepSpeed / Megatron-Core / numpy
versions (DeepSpeed's version string and its zero_to_*.py scripts are in the checkpoints too):
the golden files record that environment, and the test skips, saying why, where it differs.
Check a refactor on the machine and venv that wrote them.  Regenerate after an intended change
of behaviour (or of that environment), and say why in the commit:

    BLADE_WRITE_GOLDEN=1 pytest tests/test_golden_run.py
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy
import pytest
import torch

from blade_mega.testing import pretrain_rank, run_distributed

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
WRITE = os.environ.get("BLADE_WRITE_GOLDEN") == "1"
WORLD = 2
TIMEOUT = 400
STEPS, HALF = 20, 10

# Common to both configurations: tiny sizes, a fixed seed, one log record per step and an
# evaluation at steps 10 and 20 on the valid split, the target set and the test set.
COMMON = ["--model-size", "tiny", "--seq-length", "32", "--global-batch-size", "4",
          "--micro-batch-size", "2", "--train-iters", str(STEPS), "--seed", "1234",
          "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
          "--eval-interval", str(HALF), "--eval-iters", "1", "--no-progress",
          "--save-interval", str(HALF)]

CONFIGS = {
    # A proxy pair (tiny u'/w' scoring for the tiny learner), TP 2 x DP 1; w syncs before
    # 0-based steps 2, 6, 10 (the resumed launch's first step), 14 and 18.
    "blade_tp2": ["--selection", "blade", "--reference-model", "tiny",
                  "--tensor-model-parallel-size", "2", "--selection-warmup-steps", "2",
                  "--blade-sync-interval", "4", "--blade-ref-steps", "1",
                  "--blade-lambda", "0.5", "--reweight-mix", "0.25"],
    # RHO-1 style: a reference trained once for 2 steps, then frozen; PP 2 x DP 1.
    "rho_pp2": ["--selection", "rho", "--pipeline-model-parallel-size", "2",
                "--rho-ref-steps", "2", "--reweight-mix", "0.25"],
}


def _argv(data, name):
    return ["--tokenizer-model", data.tokenizer_model, "--data-path", data.pool_prefix,
            "--target-data-path", data.target_prefix, "--test-data-path", data.test_prefix,
            *COMMON, *CONFIGS[name]]


# -- checkpoint digest --------------------------------------------------------------------------
# The run's configuration, whose encoding may change.  It is also the only place the
# temporary paths (--save, --log-file, the data and tokenizer) appear in a checkpoint: nothing
# DeepSpeed saves depends on them (checked: two runs in different directories digest alike).
RUN_STATE_SKIPPED = {"args", "config"}


def _sha(*parts: bytes) -> str:
    """The first 16 hex digits (64 bits) of the parts' sha256: ample to catch any change, and
    half the size of the golden files."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _is_container(value) -> bool:
    return isinstance(value, (dict, list, tuple, numpy.ndarray)) or torch.is_tensor(value)


def _walk(value, path: str, out: dict) -> None:
    """Flatten ``value`` into ``out``: leaf path (keys joined by ``/``, list items as ``[i]``)
    -> sha256.  Tensors and arrays hash their dtype, shape and bytes (an array as the tensor
    of its values); lists and tuples of plain
    values (betas, torch.Size) are one leaf; any other value hashes its ``repr``."""
    def child(key):
        return f"{path}/{key}" if path else str(key)

    if torch.is_tensor(value):
        tensor = value.detach().cpu().contiguous()
        # the bytes through a uint8 view: works for dtypes numpy lacks (bfloat16)
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        out[path] = _sha(b"tensor", str(tensor.dtype).encode(),
                         repr(tuple(tensor.shape)).encode(), data)
    elif isinstance(value, numpy.ndarray) and value.dtype != object:
        # the values, whichever container holds them: a run state may keep ids as a NumPy
        # array or as a tensor (checkpoints load as data since format 2: tensors)
        _walk(torch.from_numpy(numpy.ascontiguousarray(value)), path, out)
    elif isinstance(value, dict) and value:
        for key, item in value.items():
            _walk(item, child(key), out)
    elif isinstance(value, (list, tuple)) and any(_is_container(item) for item in value):
        out[child("#len")] = _sha(type(value).__name__.encode(), str(len(value)).encode())
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", out)
    else:
        text = repr(value)
        # an object without a value repr would hash its address: handle its type above
        assert " at 0x" not in text, f"{path}: {text} has no stable repr"
        out[path] = _sha(b"repr", text.encode())


def _digest_checkpoint(directory: str) -> dict:
    """``{"manifest": its file names and layout, "files": {file: sha256 or {leaf: sha256}}}``."""
    paths = {}
    for root, _, names in os.walk(directory):
        for name in names:
            paths[os.path.relpath(os.path.join(root, name), directory)] = os.path.join(root, name)
    files: dict = {}
    manifest = None
    for rel in sorted(paths):
        path = paths[rel]
        if rel == "manifest.json":
            with open(path) as f:
                manifest = json.load(f)
        elif rel.endswith(".pt"):
            state = torch.load(path, weights_only=False, map_location="cpu")
            if os.path.basename(rel).startswith("run_state_rank"):
                state = {k: v for k, v in state.items() if k not in RUN_STATE_SKIPPED}
            files[rel] = {}
            _walk(state, "", files[rel])
        else:
            with open(path, "rb") as f:
                files[rel] = _sha(f.read())
    assert manifest is not None, f"{directory}: no manifest.json"
    return {"manifest": {"files": sorted(manifest["files"]),
                         **{k: manifest[k] for k in ("iteration", "tp", "pp", "dp")}},
            "files": files}


def _environment() -> dict:
    import deepspeed
    import megatron.core

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron.core": megatron.core.__version__, "numpy": numpy.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": _cpu_model()}


def _cpu_model() -> str:
    """Two CPUs with the same instruction set can still round differently (seen: the same
    AVX512 venv, last bits of the losses apart), so the model is part of the environment."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


# -- the runs -----------------------------------------------------------------------------------
EVAL_PINNED = ("iteration", "valid_loss", "target_loss", "test_loss")


def _read_log(path: str) -> dict:
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return {
        "train": [{k: r[k] for k in ("iteration", "consumed", "loss", "block_crcs")}
                  for r in records if r["kind"] == "train"],
        "eval": [{k: r[k] for k in EVAL_PINNED if k in r}
                 for r in records if r["kind"] == "eval"],
    }


def _golden_run(data, name: str, tmp_path) -> dict:
    save = str(tmp_path / "ckpt")
    base = _argv(data, name)
    # First half, then the second half in fresh processes, as after a real restart.
    run_distributed(pretrain_rank, WORLD, base + ["--save", save, "--exit-interval", str(HALF),
                                                  "--log-file", str(tmp_path / "a.jsonl")],
                    timeout=TIMEOUT)
    half = _digest_checkpoint(os.path.join(save, f"iter_{HALF:07d}"))
    run_distributed(pretrain_rank, WORLD, base + ["--load", save, "--save", save,
                                                  "--log-file", str(tmp_path / "b.jsonl")],
                    timeout=TIMEOUT)
    return {"launches": [_read_log(str(tmp_path / "a.jsonl")),
                         _read_log(str(tmp_path / "b.jsonl"))],
            "checkpoints": {f"iter_{HALF:07d}": half,
                            f"iter_{STEPS:07d}": _digest_checkpoint(
                                os.path.join(save, f"iter_{STEPS:07d}"))}}


# -- comparison ---------------------------------------------------------------------------------
def _flatten(value, path: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{path}/{key}" if path else str(key)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{path}[{i}]"))
        out[f"{path}#len"] = len(value)
        return out
    return {path: value}


def _differences(expected: dict, actual: dict, limit: int = 12) -> list[str]:
    """Readable differences, in the run's order (the first training step that moved first)."""
    want, got = _flatten(expected), _flatten(actual)
    lines = []
    for key in [*got, *(k for k in want if k not in got)]:
        if key not in got:
            lines.append(f"missing:  {key} (expected {want[key]!r})")
        elif key not in want:
            lines.append(f"extra:    {key} = {got[key]!r}")
        elif want[key] != got[key]:
            lines.append(f"differs:  {key}: expected {want[key]!r}, got {got[key]!r}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_golden_run(demo_data, tmp_path, name):
    path = os.path.join(GOLDEN_DIR, f"golden_run_{name}.json")
    expected = None
    if not WRITE:
        assert os.path.exists(path), f"{path} missing: run with BLADE_WRITE_GOLDEN=1 to create it"
        with open(path) as f:
            expected = json.load(f)
        if expected["environment"] != _environment():
            pytest.skip(f"{os.path.basename(path)} was written with {expected['environment']}, "
                        f"this is {_environment()}: float bits are not comparable")
    actual = _golden_run(demo_data, name, tmp_path)
    # Sanity: both halves ran, logged every step and evaluated.
    assert [r["iteration"] for launch in actual["launches"] for r in launch["train"]] == \
        list(range(1, STEPS + 1))
    assert [r["iteration"] for launch in actual["launches"] for r in launch["eval"]] == \
        [HALF, STEPS]
    if WRITE:
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"environment": _environment(), **actual}, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    del expected["environment"]
    diffs = _differences(expected, actual)
    assert not diffs, (f"{name} differs from {os.path.relpath(path)} (BLADE_WRITE_GOLDEN=1 "
                       "rewrites it after an intended change):\n" + "\n".join(diffs))
