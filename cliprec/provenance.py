"""Which code and which libraries a run used (resume fingerprints, run summaries, dvc.yaml deps), and
how a run went (`append_run_log`).

`import_closure` follows the import statements of project files (read with `ast`, so an import inside a
function counts too) through every module of the project's packages (`cliprec`, `cliprec_worlds`) they
reach. `code_identity` hashes that closure. `resume_fingerprint` is what a resumable stage (summarize,
train) keeps with its progress: its inputs + `run_identity` (code identity and `library_versions`), so a
run resumes only the progress of the same inputs, code and libraries: editing `cliprec/loss.py` or
upgrading peft retrains instead of re-exporting an old adapter. tests/test_provenance.py uses the same
closure to check that dvc.yaml lists every module a stage imports.

What depends on how a run went (resumed or not, how long it took) stays out of the stages' outputs, so
that a killed and resumed run leaves the same `dvc.lock` as an uninterrupted one: `append_run_log` adds
it as one JSON line to a file that is no DVC output (`cliprec.paths.run_log_path`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cliprec.artifacts import sha256_file

PACKAGES = ("cliprec", "cliprec_worlds")  # the runtime, and the demo world that its `synthetic` source loads
ROOT = Path(__file__).resolve().parents[1]  # the project root: cliprec/ and stages/ live here


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name (`cliprec.train` -> cliprec/train.py), None if not ours."""
    if not any(name == pkg or name.startswith(pkg + ".") for pkg in PACKAGES):
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names a file imports (`from cliprec import paths` -> cliprec, cliprec.paths)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    return bool(body)


def import_closure(*entries: str | Path, root: Path = ROOT) -> list[Path]:
    """Project files reachable from entry files or module names, sorted, relative to `root`.

    A package `__init__.py` that holds only a docstring is left out: it cannot change a result.
    """
    todo = [Path(e) if str(e).endswith(".py") else module_file(str(e), root) for e in entries]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path is None:
            continue
        path = (root / path).resolve() if not path.is_absolute() else path.resolve()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(module_file(name, root) for name in _imports(path))
    keep = [p for p in seen if p.name != "__init__.py" or _has_code(p)]
    return sorted(p.relative_to(root) for p in keep)


def code_identity(*entries: str, root: Path = ROOT) -> str:
    """sha256 over the import closure of `entries` (file names and contents)."""
    h = hashlib.sha256()
    for rel in import_closure(*entries, root=root):
        h.update(rel.as_posix().encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(root / rel)))
    return h.hexdigest()


def library_versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages`, plus the Python version ("absent" for a missing package)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def run_identity(module: str, libraries: Sequence[str]) -> dict[str, Any]:
    """The code (the import closure of `module`) and the library versions a run uses."""
    return {"code": code_identity(module), "versions": library_versions(*libraries)}


def resume_fingerprint(inputs: Mapping[str, Any], identity: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumable stage's progress must match to be resumed: its inputs and its `run_identity`.

    Returned as JSON reads it back (tuples as lists; key order kept, as the stages' reports print it), so a
    stored copy compares equal.
    """
    return json.loads(json.dumps({**inputs, **identity}, default=list))


def fingerprint_digest(fp: Mapping[str, Any]) -> str:
    """sha256 of a `resume_fingerprint`, for a stage that stores a digest rather than the whole of it."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def append_run_log(path: str | Path, record: dict[str, Any]) -> None:
    """Append `record` + the UTC time it finished as one JSON line to `path` (one line per run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record})
    with open(path, "a", encoding="utf-8") as f:  # one write per line: a kill cannot tear an earlier one
        f.write(line + "\n")
