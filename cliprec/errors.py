"""The error types: user errors are one line, programming errors keep their traceback.

A `CliprecError` is a problem the user can fix: bad params, a missing or corrupt artefact, bad input
data, a bad query. Stages and the `cliprec` command print it as `error: <message>` and exit 2; with
`--debug` or `CLIPREC_DEBUG=1` they re-raise it for the full traceback. Any other exception is a bug
and propagates untouched.
"""

from __future__ import annotations

import os

USER_ERROR_EXIT = 2


class CliprecError(Exception):
    """A problem the user can fix; its message is one line that says what and how."""


def debug_enabled() -> bool:
    """True when CLIPREC_DEBUG is set to anything but empty or 0."""
    return os.environ.get("CLIPREC_DEBUG", "") not in ("", "0")


def one_line(e: BaseException | str) -> str:
    """The first non-empty line of an exception's (or a message's) text: library errors can span dozens."""
    text = str(e).strip()
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else ""
    return text.splitlines()[0]
