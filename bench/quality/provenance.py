"""Where a bench result came from: the exact command, the commit, whether the tree was dirty,
and when; every run file under bench/results/ carries it."""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def provenance() -> dict:
    """The exact command, the commit it ran at (``dirty``: tracked files differed from it)
    and when."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"argv": sys.argv, "command": shlex.join(["python", *sys.argv]),
            "commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
