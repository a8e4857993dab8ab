"""Artefacts on disk: atomic writes, and manifests that record every file's size and sha256.

Each artefact directory that a later stage or command loads (image shards, the LoRA adapter, embeddings,
the FAISS index) holds a `manifest.json`, written last, whose `files` maps each file to its byte size and
sha256. `verify_files` checks them before anything is read, so a missing, truncated or swapped file is an
`ArtifactError` that names the file and the `dvc repro` target that rebuilds it, never a traceback from
deep inside numpy, parquet or safetensors. Hashes are streamed (1 MiB at a time: memory stays flat for
multi-GB files) and remembered per process while a file's size and mtime stay the same, so a directory
read twice is hashed once.

A manifest also says what its artefact IS, so that a directory copied from another category or variant
(manifest and bytes intact) is refused too: `category`, `variant` (embeddings, index) and the sha256 of
what it was built from: `catalog_sha256` (products.parquet), `adapter_sha256` (the LoRA adapter: the
train directory's manifest.json, which covers every adapter file) and `embeddings_sha256` (the
embedding directory's manifest.json). Loaders pass what they expect to `verify_artifact`; a difference
is one line naming the manifest, what it was built for and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cliprec.errors import CliprecError
from cliprec.paths import rebuild_hint

MANIFEST_FILE = "manifest.json"
# lineage keys holding an upstream sha256 -> what that upstream is, for messages
BUILT_FROM = {
    "catalog_sha256": "catalog (products.parquet)",
    "adapter_sha256": "LoRA adapter",
    "embeddings_sha256": "embeddings",
}
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked


class ArtifactError(CliprecError):
    """An artefact is missing, truncated or not the one its manifest describes."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks: the project's one file hasher."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_identity(name: str) -> str:
    """A hub id as is; a local model directory as its path + the sha256 of its files.

    Fingerprints use this: the weights in a directory can change while its name stays the same.
    """
    path = Path(name)
    if not path.is_dir():
        return name
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return f"{path.as_posix()}@sha256:{h.hexdigest()}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600: these are shared project files, not secrets
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | Path) -> None:
    """JSON with indent 2 and a final newline, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def file_records(directory: str | Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} for files given relative to `directory`."""
    directory = Path(directory)
    out = {}
    for name in sorted(names):
        path = directory / name
        out[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def write_manifest(directory: str | Path, files: Iterable[str], info: dict[str, Any]) -> dict[str, Any]:
    """Write `directory/manifest.json` = info + the records of `files`; call it after the files are done."""
    manifest = {**info, "files": file_records(directory, files)}
    write_json(manifest, Path(directory) / MANIFEST_FILE)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an artefact directory; ArtifactError when it is missing or unreadable."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: {_rebuild(directory)}") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable ({e}): {_rebuild(directory)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} lists no files (written by an older cliprec?): {_rebuild(directory)}")
    return manifest


def verify_files(directory: str | Path, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Check size and sha256 of the manifest's files (or only `names`); return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    records = manifest["files"]
    for name in sorted(records if names is None else names):
        path = directory / name
        want = records.get(name)
        if want is None:
            raise ArtifactError(f"{path} is not in {directory / MANIFEST_FILE}: {_rebuild(directory)}")
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ArtifactError(f"{path} is missing: {_rebuild(directory)}") from None
        if stat.st_size != want["bytes"]:
            raise ArtifactError(
                f"{path} has {stat.st_size} bytes, its manifest says {want['bytes']} (truncated or "
                f"replaced): {_rebuild(directory)}"
            )
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if _verified.get(key) == want["sha256"]:
            continue
        if sha256_file(path) != want["sha256"]:
            raise ArtifactError(
                f"{path} does not match its manifest (sha256 differs: corrupted or replaced): "
                f"{_rebuild(directory)}"
            )
        _verified[key] = want["sha256"]
    return manifest


def check_built(directory: str | Path, manifest: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    """ArtifactError unless the manifest records each `expect` key with the expected value."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    for key, want in expect.items():
        have = manifest.get(key)
        if have == want:
            continue
        what = BUILT_FROM.get(key)
        if have is None:
            raise ArtifactError(
                f"{path} records no {what or key} (built by an older cliprec?): {_rebuild(directory)}"
            )
        if what is None:
            raise ArtifactError(f"{path} was built for {key} {have}, not {want}: {_rebuild(directory)}")
        raise ArtifactError(
            f"{path} was not built from the current {what} (sha256 {str(have)[:12]} recorded, "
            f"{str(want)[:12]} now): {_rebuild(directory)}"
        )


def verify_artifact(
    directory: str | Path, expect: Mapping[str, Any], names: Iterable[str] | None = None
) -> dict[str, Any]:
    """`verify_files`, then `check_built`: the files are intact AND the artefact is the one expected."""
    manifest = verify_files(directory, names)
    check_built(directory, manifest, expect)
    return manifest


def manifest_sha256(directory: str | Path) -> str:
    """sha256 of a directory's manifest.json: the identity of everything it lists."""
    read_manifest(directory)  # missing or unreadable: an ArtifactError with the rebuild command
    return sha256_file(Path(directory) / MANIFEST_FILE)


def catalog_identity(products_path: str | Path, category: str | None = None) -> dict[str, str]:
    """{"category", "catalog_sha256"} of a verified products.parquet, built for `category` when given."""
    products_path = Path(products_path)
    if not products_path.is_file():
        raise ArtifactError(f"{products_path} is missing: rebuild it with `{rebuild_hint(products_path)}`")
    directory = products_path.parent
    manifest = verify_files(directory, [products_path.name])
    # with no category expected the manifest must still record one ("?" never matches): downstream compares it
    check_built(directory, manifest, {"category": category or manifest.get("category") or "?"})
    return {
        "category": manifest["category"],
        "catalog_sha256": manifest["files"][products_path.name]["sha256"],
    }


def _rebuild(directory: Path) -> str:
    return f"rebuild it with `{rebuild_hint(directory)}`"
