"""User-facing errors for command-line tools: one line on stderr, exit status 2, no traceback.

``BLADE_DEBUG=1`` in the environment prints the traceback above the ``error:`` line as well.
"""

import os
import re
import sys
import traceback
from typing import Callable, NoReturn, Optional

EXIT_USER_ERROR = 2
DEBUG_ENV = "BLADE_DEBUG"

# What gloo raises (a plain RuntimeError, torch 2.x) when a peer is gone: "Timed out waiting
# <n>ms for recv operation to complete" once --distributed-timeout-minutes passes without word
# from a hung (e.g. SIGSTOPped) rank; "Connection reset by peer" / "Connection closed by peer"
# at once when a rank died.  Each message starts with gloo's source location
# ("[.../gloo/transport/tcp/pair.cc:537] ..."); requiring it keeps other "Timed out"s out.
_GLOO_LOCATION = re.compile(r"\[[^\]\s]*gloo/[^\]\s]*:\d+\]\s*")
_PEER_GONE = ("Timed out", "Connection reset by peer", "Connection closed by peer")


class UserError(Exception):
    """A problem the user can fix (bad input, wrong path, ...); the message says what and how."""


def collective_failure(err: BaseException) -> Optional[str]:
    """The short reason if ``err`` is a collective that failed because another rank died or
    stopped responding, else None."""
    if not isinstance(err, RuntimeError):  # torch's DistBackendError etc. subclass it
        return None
    message = str(err).strip()
    location = _GLOO_LOCATION.search(message)
    gloo_says = message[location.end():] if location else ""
    if not any(phrase in gloo_says for phrase in _PEER_GONE):
        return None
    # Keep gloo's first sentence; the rest is its generic advice ("... GLHF!").
    return gloo_says.split(". ", 1)[0].rstrip(".")


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str) -> NoReturn:
    if _debug():
        traceback.print_exc()
    # One write: print() sends the text and the newline separately, and with unbuffered
    # stderr two ranks' lines could interleave into one.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def run_cli(main_fn: Callable[[], Optional[int]]) -> NoReturn:
    """Run `main_fn()` and exit with its return code; a UserError, a collective that failed
    because another rank is gone, or Ctrl-C becomes `error: <message>` on stderr and exit
    status 2.  Any other exception propagates with its traceback."""
    try:
        code = main_fn()
    except UserError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted")
    except RuntimeError as err:
        reason = collective_failure(err)
        if reason is None:
            raise
        # RANK is set by every launcher (and by parallel.init_distributed); the other ranks
        # print their own line, so saying which rank this is tells the lines apart.
        rank = os.environ.get("RANK")
        _fail(f"{f'rank {rank}: ' if rank is not None else ''}a collective failed ({reason}): "
              "another rank died or stopped responding; check the other ranks' logs, then "
              "resume from the last checkpoint (--load)")
    sys.exit(code or 0)
