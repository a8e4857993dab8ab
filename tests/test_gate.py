"""cliprec.gate: paired, noise-aware verdicts on per-query ranks; then end to end against a git revision."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ranks_doc, with_queries

from cliprec.cli import main
from cliprec.gate import decide, markdown

REPO = Path(__file__).resolve().parents[1]
LORA = "metrics/Amazon_Fashion/lora.ranks.json"
N = 200


def baseline() -> dict:
    """200 test queries, 60 of them in the top 5 (R@5 0.30), alt photos for half of the products."""
    t2i = [1 if i < 30 else 3 if i < 60 else 20 for i in range(N)]
    alt = [2 if i % 2 == 0 else None for i in range(N)]
    return ranks_doc(t2i, alt)


def with_t2i(doc: dict, changes: dict[int, int]) -> dict:
    out = copy.deepcopy(doc)
    for i, rank in changes.items():
        out["ranks"]["text_to_image"][i] = rank
    return out


def verdicts(new, old=None, **kw) -> dict[tuple[str, str], str]:
    kw = {"tolerance": 0.01, "alpha": 0.05, "resamples": 2000} | kw
    got = decide({LORA: new}, {LORA: old or baseline()}, **kw)
    return {(v.mode, v.metric): v.status for v in got}


def failed(new, old=None, **kw) -> bool:
    kw = {"tolerance": 0.01, "alpha": 0.05, "resamples": 2000} | kw
    return any(v.failed for v in decide({LORA: new}, {LORA: old or baseline()}, **kw))


def test_unchanged_ranks_pass():
    assert set(verdicts(baseline()).values()) == {"unchanged"}
    assert not failed(baseline())


def test_a_two_query_wobble_is_noise_not_a_regression():
    # 0.30 -> 0.29 and back: what the old absolute 0.01 tolerance failed on
    new = with_t2i(baseline(), {59: 20, 61: 3, 40: 20})
    got = verdicts(new)
    assert got[("text_to_image", "recall_at_5")] == "within_noise" and not failed(new)


def test_a_significant_drop_fails_and_a_significant_gain_is_reported():
    dropped = with_t2i(baseline(), {i: 20 for i in range(30, 60)})  # 30 queries lose their top-5 hit
    got = verdicts(dropped)
    assert got[("text_to_image", "recall_at_5")] == "regression" and failed(dropped)
    assert got[("text_to_image", "recall_at_1")] == "unchanged"
    assert not failed(dropped, tolerance=0.2)  # significant, but smaller than a looser tolerance
    gained = with_t2i(baseline(), {i: 2 for i in range(60, 90)})
    assert verdicts(gained)[("text_to_image", "recall_at_5")] == "improved" and not failed(gained)


def test_a_shrunk_test_set_fails_unless_allowed_and_then_says_so_loudly():
    shrunk = ranks_doc([1] * 10)  # 10 products, every one found: R@5 1.0
    assert verdicts(shrunk) == {("—", "—"): "new_test_set"} and failed(shrunk)
    kw = {"tolerance": 0.01, "alpha": 0.05, "resamples": 2000}
    allowed = decide({LORA: shrunk}, {LORA: baseline()}, allow_new_test_set=True, **kw)
    assert [v.status for v in allowed] == ["new_test_set_allowed"] and not any(v.failed for v in allowed)
    report = markdown(allowed, "HEAD", 0.01, 0.05)
    assert "PASS" in report and "NEW TEST SET" in report and "NOT compared" in report
    assert "improved" not in report


def test_a_missing_evaluation_mode_or_metric_fails():
    kw = {"tolerance": 0.01, "alpha": 0.05, "resamples": 2000}
    gone = decide({}, {LORA: baseline()}, **kw)
    assert [(v.status, v.failed) for v in gone] == [("missing", True)]
    no_alt = copy.deepcopy(baseline())
    del no_alt["ranks"]["image_to_image"]
    assert verdicts(no_alt)[("image_to_image", "—")] == "missing" and failed(no_alt)
    fewer_ks = copy.deepcopy(baseline())
    fewer_ks["ks"] = [5]
    got = verdicts(fewer_ks)
    assert got[("text_to_image", "recall_at_1")] == "missing" and failed(fewer_ks)


def test_markdown_lists_changes_with_ci_and_p():
    dropped = with_t2i(baseline(), {i: 20 for i in range(30, 60)})
    kw = {"tolerance": 0.01, "alpha": 0.05, "resamples": 2000}
    report = markdown(decide({LORA: dropped}, {LORA: baseline()}, **kw), "main", 0.01, 0.05)
    assert report.startswith("**cliprec gate: FAIL**")
    row = next(line for line in report.splitlines() if "| text_to_image | recall_at_5 |" in line)
    assert "| 0.3000 | 0.1500 | -0.1500 [" in row and "(0 better, 30 worse of 200)" in row
    assert "❌ regression" in row


# --- end to end: a git repository with committed ranks ----------------------------------------------------


def _git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True
    )


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / LORA).parent.mkdir(parents=True)
    _git(repo, "init", "-q")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    (repo / LORA).write_text(json.dumps(baseline()))
    (repo / LORA.replace(".ranks", "")).write_text(json.dumps({"text_to_image": {"recall_at_5": 0.3}}))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "metrics")
    return repo


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@needs_git
def test_gate_end_to_end(repo, capsys):
    assert main(["--root", str(repo), "gate", "--rev", "HEAD"]) == 0
    assert "Every per-query rank is unchanged" in capsys.readouterr().out

    (repo / LORA).write_text(json.dumps(with_t2i(baseline(), {i: 20 for i in range(30, 60)})))
    assert main(["--root", str(repo), "gate"]) == 1
    assert "❌ regression" in capsys.readouterr().out

    (repo / LORA).write_text(json.dumps(ranks_doc([1] * 10)))  # a hand-shrunk, "perfect" test set
    assert main(["--root", str(repo), "gate"]) == 1
    assert "NEW TEST SET" in capsys.readouterr().out
    assert main(["--root", str(repo), "gate", "--allow-new-test-set"]) == 0
    assert "NOT compared" in capsys.readouterr().out

    assert main(["--root", str(repo), "gate", "--rev", "no-such-rev"]) == 2
    assert "unknown git revision 'no-such-rev'" in capsys.readouterr().err


@needs_git
def test_reproduce_requires_equal_ranks_and_metrics(repo, capsys):
    assert main(["--root", str(repo), "gate", "--reproduce"]) == 0
    assert "PASS" in capsys.readouterr().out
    metrics = repo / LORA.replace(".ranks", "")
    metrics.write_text(json.dumps({"text_to_image": {"recall_at_5": 0.3}, "avg_mean_similarity_at_5": 1e-6}))
    assert main(["--root", str(repo), "gate", "--reproduce"]) == 1  # a new key
    metrics.write_text(json.dumps({"text_to_image": {"recall_at_5": 0.305}}))
    assert main(["--root", str(repo), "gate", "--reproduce"]) == 1
    assert "text_to_image.recall_at_5: 0.3 -> 0.305" in capsys.readouterr().out
    metrics.write_text(json.dumps({"text_to_image": {"recall_at_5": 0.3}}))
    (repo / LORA).write_text(json.dumps(with_t2i(baseline(), {199: 19})))  # one rank moved
    assert main(["--root", str(repo), "gate", "--reproduce"]) == 1
    assert "ranks.text_to_image.199: 20 -> 19" in capsys.readouterr().out


def test_the_gate_gates_the_queries_modes_own_metrics():
    judged = [[[1 if i < 100 else 0, 3], [0, 1]] for i in range(N)]
    old = with_queries(baseline(), judged)
    got = verdicts(copy.deepcopy(old), old)
    queries = {metric: status for (mode, metric), status in got.items() if mode == "queries"}
    assert queries == dict.fromkeys(
        ["ndcg_at_10", "ndcg_at_100", "recall_at_10", "recall_at_100", "mrr"], "unchanged"
    )
    worse = with_queries(baseline(), [[[0, 3], [0, 1]] if i < 40 else j for i, j in enumerate(judged)])
    got = verdicts(worse, old)
    assert got[("queries", "ndcg_at_10")] == "regression" and failed(worse, old)
    assert got[("text_to_image", "recall_at_5")] == "unchanged"
