"""How a stage process runs (`run_stage`): INFO logging, steady memory, a user error as one line + exit 2.

`cliprec/errors.py` holds the error types; this module holds what every stage's `__main__` calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Callable

from cliprec.errors import USER_ERROR_EXIT, CliprecError, debug_enabled

MMAP_THRESHOLD = 128 * 1024  # bytes; glibc's initial value, which it otherwise raises at run time
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def steady_memory() -> None:
    """Keep glibc from growing the heap by fragmentation: allocations >= 128 KB always come from mmap.

    After freeing a large block glibc raises its mmap threshold (up to 32 MB); tensors of ever new
    shapes (a batch pads to its longest summary) are then carved out of the heap and fragment it: the
    train stage's RSS grew step by step without this and stays flat with it. Setting the threshold
    explicitly also switches the adjustment off. No-op where libc is not glibc.
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
