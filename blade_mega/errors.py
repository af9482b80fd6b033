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


# The job's ranks (blade_mega/peers.Peers), once a multi-rank process group is up: who stopped
# answering, and which rank prints an error several ranks share.
_peers = None


def set_peers(peers) -> None:
    global _peers
    _peers = peers


def stop_heartbeat() -> None:
    if _peers is not None:
        _peers.stop()


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


def _fail(message: str, shared: Optional[str] = None) -> NoReturn:
    """Print ``message`` and exit 2. Of the ranks failing with the same ``shared`` text (default:
    the message), only the lowest prints; with BLADE_DEBUG=1 every rank prints its traceback."""
    if _debug():
        traceback.print_exc()
    elif _peers is not None and not _peers.first_to_report(shared or message):
        sys.exit(EXIT_USER_ERROR)
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
        # RANK is set by every launcher (and by parallel.init_distributed).
        rank = os.environ.get("RANK")
        _fail(f"{f'rank {rank}: ' if rank is not None else ''}a collective failed ({reason}): "
              f"{_who_stopped(reason)}", shared="a collective failed")
    sys.exit(code or 0)


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _who_stopped(reason: str) -> str:
    """Which rank the others lost, from the heartbeats, and what to do about it."""
    resume = "then resume from the last checkpoint (--load); BLADE_DEBUG=1 prints the traceback"
    timed_out = reason.startswith("Timed out")
    silent = _peers.silent_ranks() if _peers is not None else {}
    if silent:
        seconds = int(max(silent.values()))
        slow = (f"raise --distributed-timeout-minutes (now {_peers.timeout_minutes:g}) if it was "
                "only slow, " if timed_out else "")
        return (f"{_ranks(silent)} stopped answering (no heartbeat for {seconds} s); check "
                f"{'its' if len(silent) == 1 else 'their'} log and host, {slow}{resume}")
    if silent is None:
        return ("the rendezvous store does not answer either, so rank 0 (or the launcher, "
                f"which hosts it) is gone; check its log, {resume}")
    if _peers is not None and timed_out:
        return ("every rank still answers, so one is stuck or slow in other work (a deadlock, a "
                "long save); raise --distributed-timeout-minutes (now "
                f"{_peers.timeout_minutes:g}) if it was only slow, {resume}")
    return ("another rank died or stopped responding (the launcher's summary names it); check "
            f"the other ranks' logs, {resume}")
