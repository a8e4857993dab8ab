"""The `cliprec` command: every recommend query mode and error, on the tiny fake project of test_recommend."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import CAT, photo_file, shared_project
from PIL import Image

from cliprec import paths
from cliprec.cli import main


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return shared_project(tmp_path_factory)


def cli(project, *args):
    return main(["--root", str(project), "recommend", "--category", CAT, *args])


def ranked_ids(out: str) -> list[str]:
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "id", "score", "title"]
    return [line.split()[1] for line in lines[1:]]


def test_text_query(project, capsys):
    assert cli(project, "--text", "a red shirt", "--k", "3") == 0
    ids = ranked_ids(capsys.readouterr().out)
    assert len(ids) == 3 and all(i.startswith("P") for i in ids)


def test_image_and_text_image_queries(project, tmp_path, capsys):
    image = photo_file(tmp_path / "q.jpg", "green")
    assert cli(project, "--image", str(image), "--k", "4") == 0
    image_ids = ranked_ids(capsys.readouterr().out)
    assert cli(project, "--image", str(image), "--text", "a green dress", "--k", "4", "--json") == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["query"] == {
        "kind": "text+image",
        "text": "a green dress",
        "image": str(image),
        "product": None,
    }
    assert len(payload["results"]) == 4 and len(image_ids) == 4


def test_product_query_json_and_grid(project, tmp_path, capsys):
    grid = tmp_path / "out" / "grid.png"
    assert cli(project, "--product", "P0001", "--k", "5", "--json", "--grid", str(grid)) == 0
    payload = json.loads(capsys.readouterr().out)
    ids = [r["id"] for r in payload["results"]]
    assert len(ids) == 5 and "P0001" not in ids
    assert [r["rank"] for r in payload["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in payload["results"]]
    assert scores == sorted(scores, reverse=True)
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.width > 5 * im.height // 2  # query + 5 cells side by side


def test_zeroshot_variant(project, capsys):
    assert cli(project, "--text", "a red shirt", "--variant", "zeroshot", "--json") == 0
    assert json.loads(capsys.readouterr().out)["variant"] == "zeroshot"


def one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cliprec recommend: error: ") and expected in err[0], err[0]
    assert "Traceback" not in err[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "no query: give --text, --image and/or --product"),
        (("--product", "B000NOPE"), "unknown product 'B000NOPE'"),
        (("--product", "P0005"), "no embedding"),
        (("--image", "/no/such.jpg"), "unreadable image '/no/such.jpg'"),
        (("--text", "x", "--k", "0"), "--k must be >= 1"),
    ],
)
def test_query_errors_exit_2(project, capsys, args, expected):
    assert cli(project, *args) == 2
    one_line_error(capsys, expected)


def test_unreadable_image_file(project, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert cli(project, "--image", str(tmp_path / "bad.png")) == 2
    one_line_error(capsys, "unreadable image")


def test_unknown_category(project, capsys):
    assert main(["--root", str(project), "recommend", "--category", "Toys", "--text", "x"]) == 2
    one_line_error(capsys, "unknown category 'Toys' (params.yaml categories: Amazon_Fashion, Appliances)")


def test_pipeline_not_run(project, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(project / "params.yaml", fresh / "params.yaml")
    assert cli(fresh, "--text", "x") == 2
    one_line_error(
        capsys,
        f"pipeline not run yet: no index in {fresh}/data/index/{CAT}/lora; run `dvc repro index@{CAT}-lora`",
    )


def test_missing_adapter(project, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(project, partial, ignore=shutil.ignore_patterns("train"))
    assert cli(partial, "--text", "x") == 2
    one_line_error(capsys, f"run `dvc repro train@{CAT}`")
    # item -> item needs no model, so it still works
    assert cli(partial, "--product", "P0000", "--k", "2") == 0


def test_corrupted_index(project, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(project, broken)
    index_file = broken / paths.index_dir(CAT, "lora") / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-8] + b"garbage!")
    assert cli(broken, "--product", "P0000") == 2
    one_line_error(capsys, "sha256")


def test_an_index_of_the_other_variant(project, tmp_path, capsys):
    # a directory copied whole (manifest and bytes intact) from the zero-shot variant: once answered, exit 0
    swapped = tmp_path / "swapped"
    shutil.copytree(project, swapped)
    shutil.rmtree(swapped / paths.index_dir(CAT, "lora"))
    shutil.copytree(project / paths.index_dir(CAT, "zeroshot"), swapped / paths.index_dir(CAT, "lora"))
    assert cli(swapped, "--product", "P0000") == 2
    one_line_error(
        capsys,
        f"data/index/{CAT}/lora/manifest.json was built for variant zeroshot, not lora: rebuild it with "
        f"`dvc repro index@{CAT}-lora`",
    )


def test_console_script_reports_errors_without_traceback(project):
    exe = shutil.which("cliprec")
    cmd = [exe] if exe else [sys.executable, "-m", "cliprec.cli"]
    proc = subprocess.run(
        [*cmd, "--root", str(project), "recommend", "--category", "Toys", "--text", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    want = "unknown category 'Toys' (params.yaml categories: Amazon_Fashion, Appliances)"
    assert proc.stderr.strip() == f"cliprec recommend: error: {want}"


def test_usage_errors_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["recommend", "--text", "x"])  # --category is required
    assert e.value.code == 2
    assert "--category" in capsys.readouterr().err
    assert main(["--root", "/no/such/dir", "report"]) == 2
