"""git, run as a subprocess: the one helper of `cliprec gate`, `cliprec report` and `cliprec serve`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cliprec.errors import CliprecError


class GitError(CliprecError):
    """git cannot be run (not installed)."""


def git(root: str | Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`git -C root args...` with its output captured as text; the caller reads the return code."""
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False, timeout=timeout
        )
    except FileNotFoundError as e:
        raise GitError("git is not installed") from e


def show(root: str | Path, rev: str, path: str | Path) -> str | None:
    """The text of `path` at git revision `rev`, or None when the revision has no such file."""
    done = git(root, "show", f"{rev}:{Path(path).as_posix()}")
    return done.stdout if done.returncode == 0 else None


def commit_of(root: str | Path, rev: str) -> str | None:
    """The full commit id that `rev` (a branch, tag, ref or abbreviated id) names, or None."""
    done = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return done.stdout.strip() if done.returncode == 0 else None


def head_commit(root: str | Path) -> str | None:
    """HEAD of the git repository at root; None outside one, without git, or when git hangs."""
    try:
        done = git(root, "rev-parse", "HEAD", timeout=10)
    except (GitError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None
