"""Stage `check_params`: validate all of params.yaml, so a bad value fails `dvc repro` in a second.

Every stage validates at its start too; this stage also catches what runs no stage at all (e.g.
`categories: []`, where DVC would otherwise succeed with nothing to do).

Usage: python stages/check_params.py
"""

from __future__ import annotations

import logging

from cliprec.errors import CliprecError
from cliprec.params import load_params
from cliprec.runtime import run_stage

log = logging.getLogger("cliprec.check_params")


def main(argv: list[str]) -> None:
    """Load and validate params.yaml; log what the active setup is."""
    if argv:
        raise CliprecError("usage: python stages/check_params.py")
    p = load_params()
    log.info("params.yaml is valid: setup %s, categories %s", p.setup, ", ".join(p.categories))


if __name__ == "__main__":
    run_stage(main)
