"""Checkpoint files are read as data: ``torch.load(weights_only=True)``, so a crafted file cannot
run code on the ranks, tools or machines that read it.

What a checkpoint of this version holds, and nothing more, may be unpickled: tensors, numbers,
strings, lists, tuples, dicts (PyTorch's weights-only set) and the four DeepSpeed types of its
ZeRO-1/2 files, allowed one by one (``DEEPSPEED_TYPES``). Any other type is refused with one line
naming the file and the type, before anything of it is built.

A checkpoint written before format 2 (no ``format`` in its manifest) may hold NumPy arrays in its
run state, which only pickle reads. Such a file, and any file someone trusts although it is
refused, loads with the old, unsafe path only when the user says so: ``--trust-checkpoint`` or
``BLADE_TRUST_CHECKPOINT=1``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from typing import Optional

import torch

from blade_mega.errors import UserError

TRUST_ENV = "BLADE_TRUST_CHECKPOINT"
FORMAT = 2  # the manifest's "format": run states hold no NumPy (tensors instead)


def trusted(flag: bool = False) -> bool:
    """The user's word that the checkpoints this process reads may run code when loaded."""
    return flag or os.environ.get(TRUST_ENV, "") == "1"


def deepspeed_types() -> list:
    """The non-tensor types DeepSpeed's ZeRO-1/2 optimizer files hold (its model files need
    none): a partition's parameter fragments, the static loss scaler (fp32 and bf16; the dynamic
    one with fp16) and the ZeRO stage."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def load_file(path: str, trust: bool = False, map_location="cpu"):
    """The object saved in ``path``, unpickled as data only; with ``trust``, a file that data
    alone cannot read is loaded the old way, with a warning."""
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_type(str(err))
        if refused is None:
            raise  # not a type it refused: a damaged file, which the caller reports
        if not trust:
            raise UserError(
                f"{path}: refused to load: it holds {refused}, which unpickling would build by "
                f"running code, and a checkpoint holds only tensors, numbers and strings; "
                f"{_format_note(path)}if you trust where it came from, rerun with "
                f"--trust-checkpoint or {TRUST_ENV}=1") from None
    if not _format_note(path):  # an old format's checkpoint has said so once already
        sys.stderr.write(f"warning: {path}: loaded with pickle (it holds {refused}) because "
                         f"--trust-checkpoint or {TRUST_ENV}=1 is set\n")
    return torch.load(path, map_location=map_location, weights_only=False)


def _refused_type(message: str) -> Optional[str]:
    """The type PyTorch's weights-only unpickler named when it refused one, else None."""
    for pattern in (r"GLOBAL ([\w.]+)", r"but got <class '([\w.]+)'>"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def _format_note(path: str) -> str:
    """'written before checkpoint format 2; ' when the file's checkpoint says so."""
    directory = os.path.dirname(os.path.abspath(path))
    for candidate in (directory, os.path.dirname(directory)):
        manifest = os.path.join(candidate, "manifest.json")
        if os.path.isfile(manifest):
            try:
                with open(manifest) as f:
                    version = json.load(f).get("format", 1)
            except (OSError, ValueError):
                return ""
            return (f"written before checkpoint format {FORMAT} (NumPy in its run state); "
                    if version < FORMAT else "")
    return ""


def install(engine, trust: bool = False) -> None:
    """Make the DeepSpeed ``engine`` read its checkpoint files with ``load_file`` (the learner's,
    the reference's and the proxy's engines alike)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class DataCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_file(path, trust, map_location)

    current = engine.checkpoint_engine
    safe = DataCheckpointEngine()
    safe.zipfile_serialization = getattr(current, "zipfile_serialization", True)
    engine.checkpoint_engine = safe
