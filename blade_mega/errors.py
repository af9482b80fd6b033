"""User-facing errors for command-line tools: one line on stderr, exit status 2, no traceback."""

import sys
from typing import Callable, NoReturn, Optional

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix (bad input, wrong path, ...); the message says what and how."""


def run_cli(main_fn: Callable[[], Optional[int]]) -> NoReturn:
    """Run `main_fn()` and exit with its return code; a UserError or Ctrl-C becomes
    `error: <message>` on stderr and exit status 2."""
    try:
        code = main_fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)
