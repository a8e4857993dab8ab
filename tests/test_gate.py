"""cliprec.gate: the decision on parsed `dvc metrics diff --json` output, then once for real with DVC."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cliprec.cli import main
from cliprec.gate import decide, is_gated, markdown

LORA = "metrics/Amazon_Fashion/lora.json"


def entry(old, new):
    """One metric as DVC prints it (`diff` only when both sides are numbers)."""
    out = {"old": old, "new": new}
    if old is not None and new is not None:
        out["diff"] = new - old
    return out


def verdicts(diff, tolerance=0.01):
    return {(r.path, r.metric): r.status for r in decide(diff, tolerance)}


def failed(diff, tolerance=0.01):
    return any(r.failed for r in decide(diff, tolerance))


def test_relevance_names():
    assert is_gated(LORA, "text_to_image.recall_at_5")
    assert is_gated(LORA, "multimodal.mrr")
    assert is_gated(LORA, "image_to_text.ndcg_at_10")
    assert not is_gated(LORA, "ann_recall_at_10")  # index quality, not relevance
    assert not is_gated(LORA, "avg_mean_similarity_at_5")  # the seed's metric
    assert not is_gated(LORA, "text_to_image.gallery_size")
    assert not is_gated(LORA, "multimodal.skipped_no_alt")
    assert not is_gated("metrics/train/Amazon_Fashion/metrics.json", "val.recall_at_5")


def test_planted_regression_fails():
    diff = {LORA: {"text_to_image.recall_at_5": entry(0.50, 0.45), "text_to_image.mrr": entry(0.3, 0.31)}}
    got = verdicts(diff)
    assert got[(LORA, "text_to_image.recall_at_5")] == "regression"
    assert got[(LORA, "text_to_image.mrr")] == "improved"
    assert failed(diff)
    assert not failed(diff, tolerance=0.06)  # the same drop within a looser tolerance


def test_equal_metrics_pass():
    # `dvc metrics diff --all` lists unchanged metrics too, with diff 0
    diff = {LORA: {"text_to_image.recall_at_1": entry(0.2, 0.2), "mrr": entry(0.3, 0.3)}}
    assert set(verdicts(diff).values()) == {"unchanged"}
    assert not failed(diff)
    assert not failed({})  # nothing changed at all


def test_improvement_passes():
    assert not failed({LORA: {"image_to_image.recall_at_10": entry(0.40, 0.90)}})


def test_drop_of_exactly_the_tolerance_passes():
    diff = {LORA: {"text_to_image.recall_at_5": entry(0.50, 0.49)}}  # 0.010000000000000009 in floats
    assert verdicts(diff)[(LORA, "text_to_image.recall_at_5")] == "within_tolerance"
    assert not failed(diff)


def test_missing_metric_fails():
    diff = {LORA: {"text_to_image.ndcg_at_10": entry(0.4, None)}}
    assert verdicts(diff)[(LORA, "text_to_image.ndcg_at_10")] == "missing"
    assert failed(diff)


def test_nan_counts_as_missing():
    assert failed({LORA: {"text_to_image.mrr": entry(0.4, float("nan"))}})


def test_non_relevance_changes_never_fail():
    diff = {
        LORA: {
            "avg_mean_similarity_at_5": entry(0.9, 0.1),
            "ann_recall_at_10": entry(1.0, 0.5),
            "text_to_image.gallery_size": entry(250, 10),
            "catalog.products": entry(2500, None),
        },
        "metrics/train/Amazon_Fashion/metrics.json": {"val.recall_at_5": entry(0.9, 0.1)},
    }
    assert set(verdicts(diff).values()) == {"info"}
    assert not failed(diff)


def test_new_metric_passes():
    assert verdicts({LORA: {"multimodal.recall_at_5": entry(None, 0.3)}}) == {
        (LORA, "multimodal.recall_at_5"): "new"
    }


def test_markdown_table():
    diff = {
        LORA: {
            "text_to_image.recall_at_5": entry(0.5, 0.4),
            "text_to_image.gallery_size": entry(250, 251),
            "mrr": entry(0.3, 0.35),
        }
    }
    text = markdown(decide(diff, 0.01), "origin/main", 0.01)
    lines = text.splitlines()
    assert lines[0].startswith("**cliprec gate: FAIL** — 1 relevance metric")
    assert lines[2] == "| Path | Metric | origin/main | workspace | Change | Verdict |"
    assert lines[4] == f"| {LORA} | text_to_image.recall_at_5 | 0.5000 | 0.4000 | -0.1000 | ❌ regression |"
    assert f"| {LORA} | text_to_image.gallery_size | 250 | 251 | +1.0000 | not gated |" in lines
    assert "PASS" in markdown([], "HEAD", 0.01) and "No metric changed" in markdown([], "HEAD", 0.01)


# --- with DVC -----------------------------------------------------------------------------------------

needs_dvc = pytest.mark.skipif(
    shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc+git"
)

METRICS = {
    "text_to_image": {
        "recall_at_1": 0.2,
        "recall_at_5": 0.5,
        "mrr": 0.3,
        "gallery_size": 250,
        "queries": 250,
    },
    "avg_mean_similarity_at_5": 0.9,
}


def _git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True
    )


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(f"metrics:\n  - {LORA}\n")
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", repo / "params.yaml")
    (repo / LORA).parent.mkdir(parents=True)
    (repo / LORA).write_text(json.dumps(METRICS))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "metrics")
    return repo


def _write(repo, **t2i):
    metrics = json.loads(json.dumps(METRICS))
    metrics["text_to_image"].update(t2i)
    for key in [k for k, v in t2i.items() if v is None]:
        del metrics["text_to_image"][key]
    (repo / LORA).write_text(json.dumps(metrics))


@needs_dvc
def test_gate_end_to_end(dvc_repo, capsys):
    _write(dvc_repo, recall_at_5=0.40, gallery_size=240)  # planted regression
    assert main(["--root", str(dvc_repo), "gate", "--rev", "HEAD"]) == 1
    out = capsys.readouterr().out
    assert (
        "FAIL" in out and "| text_to_image.recall_at_5 | 0.5000 | 0.4000 | -0.1000 | ❌ regression |" in out
    )

    _write(dvc_repo, recall_at_5=0.60)  # better relevance only
    assert main(["--root", str(dvc_repo), "gate"]) == 0  # tolerance from params.yaml, rev HEAD
    assert "PASS" in capsys.readouterr().out

    assert main(["--root", str(dvc_repo), "gate", "--rev", "no-such-rev"]) == 2
    assert "unknown Git revision" in capsys.readouterr().err
