"""How a stage process runs: user errors are one line, programming errors keep their traceback.

A `CliprecError` is a problem the user can fix: bad params, a missing or corrupt artefact, bad input
data, a bad query. Stages and the `cliprec` command print it as `error: <message>` and exit 2; with
`--debug` or `CLIPREC_DEBUG=1` they re-raise it for the full traceback. Any other exception is a bug
and propagates untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2
MMAP_THRESHOLD = 128 * 1024  # bytes; glibc's initial value, which it otherwise raises at run time
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


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


def steady_memory() -> None:
    """Keep glibc from growing the heap by fragmentation: allocations >= 128 KB always come from mmap.

    After freeing a large block glibc raises its mmap threshold (up to 32 MB); tensors of ever new
    shapes (a batch pads to its longest summary) are then carved out of the heap and fragment it. Measured
    on the train stage: RSS grew ~4 MB a step (+400 MB over 100 steps) without this, flat with it.
    Setting the threshold explicitly also switches the adjustment off. No-op where libc is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def run_stage(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Run a stage's main(argv) with INFO logging and steady memory; a CliprecError is one line, exit 2."""
    steady_memory()
    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["CLIPREC_DEBUG"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried: noise
    try:
        main(args)
    except CliprecError as e:
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
