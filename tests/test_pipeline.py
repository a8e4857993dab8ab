"""The real dvc.yaml end to end on a tiny demo (one category, 60 products, 1 epoch), through `dvc` itself.

What only DVC can show: a forced rerun retrains and reproduces its outputs bit for bit, the image side
reaches the stored images (DVC's run-cache ignores params named `size`), an own catalog file is a
dependency of ingest, and a DVC remote carries every artefact to a fresh clone that then answers queries
without recomputing anything.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from cliprec import paths
from cliprec.shards import read_image_table

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
    assert summary["epochs_run"] == 1 and "resumed_from_epoch" not in summary
    run = json.loads((root / paths.run_log_path("train", CAT)).read_text().splitlines()[-1])
    assert run["resumed_from_epoch"] is None  # how the run went: logged outside the DVC outputs
    assert outs_of(root) == outs  # the same adapter, checkpoint, metrics and curves, bit for bit
    assert sh("git", "status", "--porcelain", "--", "metrics", cwd=root) == ""


# A stage killed after `after` of its checkpoints (summarize: chunks, train: optimizer steps): the stage's
# own command, run outside DVC, dies as `kill -9` would once that much is on disk.
KILLED_STAGE = """
import os, runpy, sys
sys.path[0] = "stages"  # as `python stages/<stage>.py`: the cliprec that DVC's run of the stage imports
import cliprec.summarize as summarize, cliprec.train as train
stage, after = sys.argv[1], int(sys.argv[2])
module, name = (summarize, "_write_chunk") if stage == "summarize" else (train, "_train_step")
real, calls = getattr(module, name), []
def dying(*args, **kwargs):
    if len(calls) == after:
        os._exit(137)
    calls.append(1)
    return real(*args, **kwargs)
setattr(module, name, dying)
sys.argv = [f"stages/{stage}.py", sys.argv[3]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_killed_and_resumed_run_leaves_the_same_dvc_lock(project, tmp_path):
    # 3 summarize chunks and 2 epochs of 2 steps: killed after 2 chunks, and in the first step of epoch 2
    def more_to_resume(raw: dict) -> None:
        raw["epochs"] = 2
        raw["setups"]["demo"]["summarize"]["chunk_size"] = 20

    locks, runs = {}, {}
    for how in ("whole", "killed"):
        root = tmp_path / how
        shutil.copytree(project, root, symlinks=True)
        edit_params(root, more_to_resume)
        for stage, after in (("summarize", 2), ("train", 3)):
            if how == "killed":
                done = subprocess.run([sys.executable, "-c", KILLED_STAGE, stage, str(after), CAT], cwd=root)
                assert done.returncode == 137
            sh("dvc", "repro", "-s", f"{stage}@{CAT}", cwd=root)
        locks[how] = (root / "dvc.lock").read_text()
        logs = [root / paths.run_log_path(stage, CAT) for stage in ("summarize", "train")]
        runs[how] = [json.loads(f.read_text().splitlines()[-1]) for f in logs]
    assert [runs["killed"][0]["resumed_chunks"], runs["killed"][1]["resumed_from_epoch"]] == [2, 1]
    assert [runs["whole"][0]["resumed_chunks"], runs["whole"][1]["resumed_from_epoch"]] == [0, None]
    assert locks["killed"] == locks["whole"]  # every output (and progress dir) hash, so every later stage


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
    sh("dvc", "repro", f"ingest@{CAT}", cwd=root)  # and catalog@CAT before it, which fingerprints the file
    assert f"ingest@{CAT}" not in sh("dvc", "status", f"ingest@{CAT}", cwd=root)
    before = json.loads((root / paths.ingest_dir(CAT) / "report.json").read_text())["rows_read"]

    record = json.loads(catalog.read_text().splitlines()[0])
    record.update(parent_asin="B0APPENDED1", title="An appended record")
    with open(catalog, "a") as f:
        f.write(json.dumps(record) + "\n")
    status = sh("dvc", "status", cwd=root)
    assert f"catalog@{CAT}" in status and "modified:           catalog" in status
    sh("dvc", "repro", f"ingest@{CAT}", cwd=root)
    after = json.loads((root / paths.ingest_dir(CAT) / "report.json").read_text())["rows_read"]
    assert after == before + 1
    assert "B0APPENDED1" in set(pd.read_parquet(root / paths.products_path(CAT))["id"])


def test_editing_one_categorys_catalog_file_reruns_only_that_categorys_ingest(tmp_path):
    """Two categories, each a jsonl file under catalog/: an edit to Appliances leaves Amazon_Fashion be."""
    root = tmp_path / "project"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    for name in subprocess.run(listed, cwd=REPO, capture_output=True, text=True).stdout.splitlines():
        if name.startswith(PROJECT_FILES) and (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    cats = ["Amazon_Fashion", "Appliances"]
    for cat in cats:
        shutil.copy(REPO / "tests" / "fixtures" / f"meta_{CAT}.jsonl", root / "catalog" / f"meta_{cat}.jsonl")
    edit_params(root, lambda r: r.update(categories=cats))
    edit_params(
        root,
        lambda r: r["setups"]["demo"]["ingest"].update(source="jsonl", path="catalog/meta_{category}.jsonl"),
    )
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("dvc", "add", *(f"catalog/meta_{cat}.jsonl" for cat in cats), cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "two own catalogs", cwd=root)
    sh("dvc", "repro", "ingest", cwd=root)

    with open(root / "catalog" / "meta_Appliances.jsonl", "a") as f:
        f.write('{"parent_asin": "B0APPENDED1", "title": "An appended record"}\n')
    out = sh("dvc", "repro", "ingest", cwd=root)
    assert "Running stage 'ingest@Appliances'" in out
    assert "Running stage 'ingest@Amazon_Fashion'" not in out
    assert "Stage 'ingest@Amazon_Fashion' didn't change, skipping" in out
    assert "up to date" in sh("dvc", "status", "--with-deps", "ingest", cwd=root)


def test_an_in_place_append_to_a_tracked_file_keeps_its_old_version_in_the_cache(tmp_path):
    """`>>` on a tracked catalog file (as root, which ignores its mode) must not reach into DVC's cache."""
    root = tmp_path / "repo"
    (root / "catalog").mkdir(parents=True)
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # this project's cache settings
    catalog = root / "catalog" / f"meta_{CAT}.jsonl"
    old = (REPO / "tests" / "fixtures" / f"meta_{CAT}.jsonl").read_bytes()
    catalog.write_bytes(old)
    sh("dvc", "add", "catalog/" + catalog.name, cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "catalog v1", cwd=root)

    os.chmod(catalog, catalog.stat().st_mode | 0o200)  # what root's `>>` does whatever the mode says
    with open(catalog, "ab") as f:  # in place: the same inode
        f.write(b'{"parent_asin": "B0APPENDED1", "title": "An appended record"}\n')
    new = catalog.read_bytes()
    sh("dvc", "add", "catalog/" + catalog.name, cwd=root)
    sh("git", "commit", "-qam", "catalog v2", cwd=root)

    sh("git", "checkout", "HEAD~1", "--", f"catalog/{catalog.name}.dvc", cwd=root)
    sh("dvc", "checkout", f"catalog/{catalog.name}.dvc", cwd=root)
    assert catalog.read_bytes() == old
    sh("git", "checkout", "HEAD", "--", f"catalog/{catalog.name}.dvc", cwd=root)
    sh("dvc", "checkout", f"catalog/{catalog.name}.dvc", cwd=root)
    assert catalog.read_bytes() == new


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


def _own_project(tmp_path: Path, change) -> Path:
    """This checkout's pipeline in a new git + DVC repo, params changed by `change`, committed."""
    root = tmp_path / "project"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    for name in subprocess.run(listed, cwd=REPO, capture_output=True, text=True).stdout.splitlines():
        if name.startswith(PROJECT_FILES) and (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    edit_params(root, change)
    for cmd in (
        ("git", "init", "-q"),
        ("dvc", "init", "-q"),
        ("git", "add", "-A"),
        ("git", "commit", "-qm", "p"),
    ):
        sh(*cmd, cwd=root)
    return root


def test_c4_queries_from_a_local_copy_load_in_the_demo_with_two_overrides(tmp_path):
    """C4's exact test.csv at catalog/<dir>/, chosen with two -S: the same loader; unknown items counted."""
    root = _own_project(tmp_path, tiny)
    sh("dvc", "repro", f"ingest@{CAT}", cwd=root)
    ids = sorted(pd.read_parquet(root / paths.products_path(CAT))["id"])
    rows = [
        next(iter(csv.reader([(REPO / "tests/fixtures/amazon-c4/test.csv").read_text().splitlines()[0]])))
    ]
    rows += [
        [str(i), f"I need something like product {i}", pid, "AU", "5", "a review"]
        for i, pid in enumerate(ids[:3])
    ]
    rows += [["90", "A request for another category's product", "B0NOTHERE1", "AU", "5", "-"]]
    (root / "catalog" / "c4test").mkdir()
    with open(root / "catalog" / "c4test" / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    before = outs_of(root)[f"data/ingest/{CAT}"]
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "c4 copy", cwd=root)
    overrides = ("-S", "setups.demo.queries.source=c4", "-S", "setups.demo.queries.hub_root=catalog/c4test")
    sh("dvc", "exp", "run", *overrides, f"queries@{CAT}", cwd=root)
    report = json.loads((root / paths.queries_dir(CAT) / "report.json").read_text())
    assert report["source"] == "c4" and report["kept"] == 3 and report["dropped"]["unknown_product"] == 1
    # its targets were in the sample already: ingest's output is the same, so no later stage reruns
    assert outs_of(root)[f"data/ingest/{CAT}"] == before


def test_editing_one_categorys_query_file_reruns_only_that_categorys_queries(tmp_path):
    cats = ["Amazon_Fashion", "Appliances"]

    def two(raw: dict) -> None:
        tiny(raw)
        raw.update(categories=cats)
        raw["setups"]["demo"]["ingest"]["n_products"] = 20

    root = _own_project(tmp_path, two)
    sh("dvc", "repro", "ingest", cwd=root)
    for cat in cats:
        ids = sorted(pd.read_parquet(root / paths.products_path(cat))["id"])
        lines = [
            {"query_id": f"{cat}-{i}", "text": f"query {i}", "relevant": {pid: 1}}
            for i, pid in enumerate(ids[:5])
        ]
        (root / "catalog" / f"queries_{cat}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    edit_params(
        root,
        lambda r: r["setups"]["demo"]["queries"].update(
            source="jsonl", path="catalog/queries_{category}.jsonl"
        ),
    )
    sh("dvc", "repro", "queries", cwd=root)
    with open(root / "catalog" / "queries_Appliances.jsonl", "a") as f:
        f.write(json.dumps({"query_id": "new", "text": "one more", "relevant": {ids[0]: 2}}) + "\n")
    out = sh("dvc", "repro", "queries", cwd=root)
    assert "Running stage 'queries@Appliances'" in out
    assert (
        "Running stage 'queries@Amazon_Fashion'" not in out
        and "Running stage 'ingest@Amazon_Fashion'" not in out
    )
    assert json.loads((root / paths.queries_dir("Appliances") / "report.json").read_text())["kept"] == 6
