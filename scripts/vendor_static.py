"""Vendor the browser libraries that `cliprec serve` and the offline `dvc plots show` page load.

The web page, /docs and dvc_plots/index.html must work offline (no CDN), so the files are committed under
cliprec/static/vendor/ (package data). This script fetches the pinned versions with `npm pack` from the
npm registry, copies the files listed below and writes cliprec/static/vendor/VENDOR.json (package,
version, npm integrity, licence, and the sha256 of every copied file; tests/test_serve.py checks them).

vega 5 / vega-lite 5 / vega-embed 6 are the major versions DVC's own plots template loads, so the specs DVC
writes render unchanged. Run from the repo root after changing a version:

    python scripts/vendor_static.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENDOR = REPO / "cliprec" / "static" / "vendor"

# package -> (version, licence, {file in the package: file under vendor/<dir>/})
PACKAGES = {
    "vega": ("5.33.1", "BSD-3-Clause", {"build/vega.min.js": "vega.min.js"}),
    "vega-lite": (
        "5.23.0",
        "BSD-3-Clause",
        {"build/vega-lite.min.js": "vega-lite.min.js", "LICENSE": "LICENSE"},
    ),
    "vega-embed": (
        "6.29.0",
        "BSD-3-Clause",
        {"build/vega-embed.min.js": "vega-embed.min.js", "LICENSE": "LICENSE"},
    ),
    "swagger-ui-dist": (
        "5.35.0",
        "Apache-2.0",
        {
            "swagger-ui-bundle.js": "swagger-ui-bundle.js",
            "swagger-ui.css": "swagger-ui.css",
            "favicon-32x32.png": "favicon-32x32.png",
            "LICENSE": "LICENSE",
            "NOTICE": "NOTICE",
        },
    ),
}
DIRS = {"swagger-ui-dist": "swagger-ui"}


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    """Fetch, copy and record every package."""
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, licence, files) in PACKAGES.items():
            out = subprocess.run(
                ["npm", "pack", f"{name}@{version}", "--json"], cwd=tmp, check=True, capture_output=True
            )
            info = json.loads(out.stdout)[0]
            unpacked = Path(tmp) / name
            with tarfile.open(Path(tmp) / info["filename"]) as tar:
                tar.extractall(unpacked, filter="data")
            dest = VENDOR / DIRS.get(name, name)
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            copied = {}
            for src, dst in files.items():
                shutil.copyfile(unpacked / "package" / src, dest / dst)
                copied[f"{dest.name}/{dst}"] = sha256(dest / dst)
            manifest[name] = {
                "version": version,
                "license": licence,
                "integrity": info["integrity"],
                "files": copied,
            }
            print(f"{name}@{version}: {len(copied)} files -> {dest.relative_to(REPO)}")
    (VENDOR / "VENDOR.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
