"""Run logs: one JSON object per line (stdout and a file) and TensorBoard events. Rank 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional


class MetricsLog:
    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str], enabled: bool,
                 echo: bool = True):
        self.enabled = enabled
        self.echo = echo
        self._file = None
        self._tb = None
        if not enabled:
            return
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()})
        if self.echo:
            print(line, flush=True)
        if self._file:
            self._file.write(line + "\n")
        if self._tb and "iteration" in record:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["iteration"])
            self._tb.flush()

    def close(self) -> None:
        """Idempotent: a run that fails closes its log in cleanup after the loop may have."""
        if self._file:
            self._file.close()
            self._file = None
        if self._tb:
            self._tb.close()
            self._tb = None


def _plain(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def progress(enabled: bool, total: int, initial: int):
    """A progress bar on stderr (rank 0), or a no-op object."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


def process_age_s() -> Optional[float]:
    """Seconds since this process started (Linux /proc), for time-to-first-step."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident set size (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
