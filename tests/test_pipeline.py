"""The real dvc.yaml end to end on a tiny demo (one category, 60 products, 1 epoch), through `dvc` itself.

What only DVC can show: a forced rerun retrains and reproduces its outputs bit for bit, the image side
reaches the stored images (DVC's run-cache ignores params named `size`), an own catalog file is a
dependency of ingest, and a DVC remote carries every artefact to a fresh clone that then answers queries
without recomputing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from cliprec import paths
from cliprec.images import read_image_table

REPO = Path(__file__).resolve().parents[1]
CAT = "Amazon_Fashion"
PROJECT_FILES = (
    "cliprec/",
    "cliprec_worlds/",  # the demo generator: ingest depends on cliprec_worlds/${setup}
    "stages/",
    "catalog/",
    "models/",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
)

pytestmark = [
    pytest.mark.slow,  # ~1.5 min: eleven stages, each a fresh Python process
    pytest.mark.skipif(not (shutil.which("dvc") and shutil.which("git")), reason="needs dvc and git"),
]


def sh(*cmd: str, cwd: Path) -> str:
    """Run a command; fail the test with its output when it fails."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def edit_params(root: Path, change) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    change(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def tiny(raw: dict) -> None:
    raw.update(categories=[CAT], epochs=1, batch_size=16)
    raw["images"]["workers"] = 4
    raw["embed"]["batch_size"] = 32
    raw["setups"]["demo"]["ingest"]["n_products"] = 60


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """This checkout's pipeline in a new git + DVC repo, reproduced once and committed."""
    root = tmp_path_factory.mktemp("pipeline") / "project"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if name.startswith(PROJECT_FILES) and (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    edit_params(root, tiny)
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "the pipeline", cwd=root)  # DVCLive needs a commit (dvclive#522)
    sh("dvc", "repro", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "tiny pipeline", cwd=root)
    return root


def outs_of(root: Path) -> dict[str, str]:
    """{output path: md5} of every stage in dvc.lock."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])}


def copy_of(project: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(project, dst, symlinks=True)
    return dst


def test_forced_rerun_trains_again_and_reproduces_bit_for_bit(project, tmp_path):
    root = copy_of(project, tmp_path)
    outs = outs_of(root)
    out = sh("dvc", "repro", "-f", "-s", f"train@{CAT}", cwd=root)
    assert "resuming" not in out and "finished run; training again" in out
    summary = json.loads((root / paths.train_dir(CAT) / "summary.json").read_text())
    assert summary["resumed_from_epoch"] is None and summary["epochs_run"] == 1
    assert outs_of(root) == outs  # the same adapter, checkpoint, metrics and curves, bit for bit
    assert sh("git", "status", "--porcelain", "--", "metrics", cwd=root) == ""


def test_the_image_side_reaches_the_stored_images(project, tmp_path):
    root = copy_of(project, tmp_path)

    def side_of_stored_images() -> set[tuple[int, int]]:
        import io

        jpegs = read_image_table(root / paths.images_dir(CAT), columns=["jpeg"])["jpeg"]
        return {Image.open(io.BytesIO(b)).size for b in jpegs}

    assert side_of_stored_images() == {(224, 224)}
    edit_params(root, lambda r: r["images"].update(side=64))
    out = sh("dvc", "repro", "-s", f"images@{CAT}", cwd=root)
    assert "Stage is cached" not in out
    assert side_of_stored_images() == {(64, 64)}
    assert f"train@{CAT}" in sh("dvc", "status", cwd=root)  # and what depends on the images must rerun


def test_an_own_catalog_file_is_a_dependency_of_ingest(project, tmp_path):
    root = copy_of(project, tmp_path)
    catalog = root / "catalog" / f"meta_{CAT}.jsonl"
    shutil.copy(REPO / "tests" / "fixtures" / f"meta_{CAT}.jsonl", catalog)
    sh("dvc", "add", str(catalog.relative_to(root)), cwd=root)
    edit_params(
        root,
        lambda r: r["setups"]["demo"]["ingest"].update(source="jsonl", path="catalog/meta_{category}.jsonl"),
    )
    sh("dvc", "repro", "-s", f"ingest@{CAT}", cwd=root)
    assert f"ingest@{CAT}" not in sh("dvc", "status", f"ingest@{CAT}", cwd=root)
    before = json.loads((root / paths.ingest_dir(CAT) / "report.json").read_text())["rows_read"]

    record = json.loads(catalog.read_text().splitlines()[0])
    record.update(parent_asin="B0APPENDED1", title="An appended record")
    with open(catalog, "a") as f:
        f.write(json.dumps(record) + "\n")
    status = sh("dvc", "status", f"ingest@{CAT}", cwd=root)
    assert f"ingest@{CAT}" in status and "catalog" in status
    sh("dvc", "repro", "-s", f"ingest@{CAT}", cwd=root)
    after = json.loads((root / paths.ingest_dir(CAT) / "report.json").read_text())["rows_read"]
    assert after == before + 1
    assert "B0APPENDED1" in set(pd.read_parquet(root / paths.products_path(CAT))["id"])


def test_a_dvc_remote_carries_everything_to_a_fresh_clone(project, tmp_path):
    root = copy_of(project, tmp_path)
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=root)
    sh("dvc", "push", cwd=root)
    sh("git", "commit", "-qam", "remote", cwd=root)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(root), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    assert "up to date" in sh("dvc", "status", cwd=clone)
    product = (clone / paths.embed_dir(CAT, "lora") / "ids.txt").read_text().split()[0]
    out = sh("cliprec", "recommend", "--category", CAT, "--product", product, "--json", cwd=clone)
    assert len(json.loads(out[out.index("{") :])["results"]) == 5
    out = sh("cliprec", "recommend", "--category", CAT, "--text", "black leather belt", "--k", "3", cwd=clone)
    assert len(out.strip().splitlines()) == 4  # header + 3 products, from the pulled adapter and index
    assert "up to date" in sh("dvc", "status", cwd=clone)  # nothing was recomputed or changed
