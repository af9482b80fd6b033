"""Files that appear whole or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import os


def write_atomic(path: str, data: bytes | str, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so a reader never sees a half-written file. ``durable`` also
    fsyncs before the rename (checkpoint markers: the rename must not land before the data).
    Raises OSError; no temporary file is left behind."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
