"""The run configuration: flags (and YAML) parsed once into a frozen ``RunConfig``.

``parse_config(argv)`` is the entry; ``flags.py`` knows the words, ``run_config.py`` the checks,
the resolved values and the checkpointed form.
"""

from __future__ import annotations

from typing import Optional, Sequence

from blade_mega.config.run_config import (
    CheckpointConfig, DataConfig, LogConfig, ModelConfig, ParallelConfig, RunConfig,
    SelectionConfig, TrainConfig, from_checkpoint)

__all__ = ["CheckpointConfig", "DataConfig", "LogConfig", "ModelConfig", "ParallelConfig",
           "RunConfig", "SelectionConfig", "TrainConfig", "from_checkpoint", "parse_config"]


def parse_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Flags (``--config run.yaml`` under them) to a checked, resolved ``RunConfig``."""
    from blade_mega.config.flags import parse_flags

    return RunConfig.from_flags(parse_flags(argv))
