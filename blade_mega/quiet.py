"""Keep library chatter that does not concern the user's run off the console.

Megatron-Core warns at import that Apex and Transformer Engine are missing (six lines on a CPU
machine), DeepSpeed that it fell back to its CPU accelerator: neither changes what the run
does, and the device path line (blade_mega/engine/device_path.py) says what is used.  ``BLADE_DEBUG=1``
keeps every warning.  Our own warnings (blade_mega.*) are never filtered.
"""

from __future__ import annotations

import os
import warnings

LIBRARIES = ("megatron", "deepspeed", "transformer_engine", "apex", "torch")


def install(env=os.environ) -> bool:
    """Filter the libraries' warnings (must run before they are imported). Returns whether it did."""
    if env.get("BLADE_DEBUG", "") not in ("", "0"):
        return False
    for library in LIBRARIES:
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=rf"{library}(\.|$)")
    import torch

    if not torch.cuda.is_available():
        # Named, DeepSpeed picks its CPU accelerator without a "could not detect a GPU" warning.
        env.setdefault("DS_ACCELERATOR", "cpu")
    return True
