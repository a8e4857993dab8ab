"""cliprec.gate: paired, noise-aware verdicts on per-query ranks; then end to end against a git revision."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ranks_doc, with_queries

from cliprec.audit import expected_detail
from cliprec.cli import main
from cliprec.evaluate import EvalSettings, headline
from cliprec.gate import GateRule, decide, markdown, seed_bound
from cliprec.params import load_params

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


def rule(**kw) -> GateRule:
    return GateRule(**({"tolerance": 0.01, "alpha": 0.05, "resamples": 2000} | kw))


def verdicts(new, old=None, noise=None, **kw) -> dict[tuple[str, str], str]:
    got = decide({LORA: new}, {LORA: old or baseline()}, rule(**kw), noise)
    return {(v.mode, v.metric): v.status for v in got}


def failed(new, old=None, noise=None, **kw) -> bool:
    return any(v.failed for v in decide({LORA: new}, {LORA: old or baseline()}, rule(**kw), noise))


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
    allowed = decide({LORA: shrunk}, {LORA: baseline()}, rule(allow_new_test_set=True))
    assert [v.status for v in allowed] == ["new_test_set_allowed"] and not any(v.failed for v in allowed)
    report = markdown(allowed, "HEAD", rule())
    assert "PASS" in report and "NEW TEST SET" in report and "NOT compared" in report
    assert "improved" not in report


def test_a_missing_evaluation_mode_or_metric_fails():
    gone = decide({}, {LORA: baseline()}, rule())
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
    report = markdown(decide({LORA: dropped}, {LORA: baseline()}, rule()), "main", rule())
    assert report.startswith("**cliprec gate: FAIL**")
    assert "uncorrected" in report  # no noise file: the stricter rule, and the report says which rule
    row = next(line for line in report.splitlines() if "| text_to_image | recall_at_5 |" in line)
    assert "| 0.3000 | 0.1500 | -0.1500 [" in row and "(0 better, 30 worse of 200)" in row
    assert "❌ regression" in row and "no noise file" in row


# --- training-seed noise and the corrected family -----------------------------------------------------------


def noise_doc(sd: float = 0.0, pair_min: float = 0.0, test_set: dict | None = None, runs: int = 5) -> dict:
    """A noise file (cliprec.noise) for LORA's category: every LoRA metric has this seed sd and pair range."""
    doc = baseline()
    entry = {"values": [0.3] * runs, "sd": sd, "diff": {"pairs": runs * (runs - 1), "sd": sd * 1.4,
             "q025": pair_min, "q975": -pair_min, "min": pair_min, "max": -pair_min}}  # fmt: skip
    modes = {m: {k: entry for k in ("recall_at_1", "recall_at_5", "recall_at_10", "mrr", "ndcg_at_10")}
             for m in doc["ranks"]}  # fmt: skip
    return {"Amazon_Fashion": {"test_set": test_set or doc["test_set"], "variants": {"lora": modes}}}


def test_seed_bound_is_a_t_prediction_bound_and_never_inside_the_seen_range():
    entry = {"values": [0.3] * 5, "sd": 0.01, "diff": {"pairs": 20, "min": -0.2, "max": 0.05}}
    assert seed_bound(entry, 0.05, 1) == pytest.approx(0.2)  # the seen range is wider
    entry = {"values": [0.3] * 5, "sd": 0.02, "diff": {"pairs": 20, "min": -0.03, "max": 0.03}}
    # t with 4 df at 1 - 0.05 / 20 = 0.9975 is 5.598 (tables), times sqrt(2) * sd
    assert seed_bound(entry, 0.05, 20) == pytest.approx(5.598 * 2**0.5 * 0.02, rel=1e-3)
    nine = {**entry, "values": [0.3] * 9}  # more seeds: a narrower bound for the same sd
    assert seed_bound(nine, 0.05, 20) < seed_bound(entry, 0.05, 20)
    assert seed_bound(None, 0.05, 40) == 0.0 and seed_bound({"diff": {"pairs": 0}}, 0.05, 40) == 0.0


def test_a_drop_within_what_retraining_moves_passes_and_a_larger_one_fails():
    dropped = with_t2i(baseline(), {i: 20 for i in range(30, 60)})  # R@5 -0.15, very significant
    assert failed(dropped)  # no noise file: the strict rule
    assert not failed(dropped, noise=noise_doc(sd=0.08, pair_min=-0.16))  # retraining alone moves 0.16
    assert verdicts(dropped, noise=noise_doc(sd=0.08, pair_min=-0.16))[("text_to_image", "recall_at_5")] == (
        "within_noise"
    )
    assert failed(dropped, noise=noise_doc(sd=0.01, pair_min=-0.03))  # far beyond the seed range
    other = noise_doc(sd=0.08, pair_min=-0.16, test_set={"ids_sha256": "0" * 64, "gallery_size": N})
    assert failed(dropped, noise=other)  # a noise file for another test set does not apply


def test_holm_corrects_the_family_where_noise_applies():
    # 6 queries lose their top-1 hit: R@1 drops 0.03, uncorrected p ~ 0.016 passes the strict rule's 0.05
    # threshold, but not after Holm over the 20 gated metrics
    small = with_t2i(baseline(), {i: 3 for i in range(6)})
    assert verdicts(small)[("text_to_image", "recall_at_1")] == "regression"
    assert verdicts(small, noise=noise_doc())[("text_to_image", "recall_at_1")] == "within_noise"
    got = decide({LORA: small}, {LORA: baseline()}, rule(), noise_doc())
    r1 = next(v for v in got if v.metric == "recall_at_1" and v.mode == "text_to_image")
    assert r1.p_corrected > r1.comparison.p_drop


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
    write_evaluation(repo, baseline())
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "metrics")
    return repo


def write_evaluation(repo: Path, ranks: dict) -> None:
    """LORA and the metrics files the evaluate stage writes from it (cliprec.audit recomputes them)."""
    detail = expected_detail(ranks, EvalSettings.from_params(load_params(REPO / "params.yaml")))
    (repo / LORA).write_text(json.dumps(ranks))
    (repo / LORA.replace(".ranks", ".detail")).write_text(json.dumps(detail))
    (repo / LORA.replace(".ranks", "")).write_text(json.dumps(headline(detail, "Amazon_Fashion", "lora")))


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@needs_git
def test_gate_end_to_end(repo, capsys):
    assert main(["--root", str(repo), "gate", "--rev", "HEAD"]) == 0
    out = capsys.readouterr().out
    assert (
        "Every per-query rank is unchanged" in out
        and "has no metrics/Amazon_Fashion/noise.detail.json" in out
    )

    write_evaluation(repo, with_t2i(baseline(), {i: 20 for i in range(30, 60)}))
    assert main(["--root", str(repo), "gate"]) == 1
    assert "❌ regression" in capsys.readouterr().out

    write_evaluation(repo, baseline())  # the ranks as committed, but a headline edited by hand
    (repo / LORA.replace(".ranks", "")).write_text(json.dumps({"Amazon_Fashion": {"lora_t2i_r5": 0.45}}))
    assert main(["--root", str(repo), "gate"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "Every per-query rank is unchanged" not in out
    assert (
        "| metrics/Amazon_Fashion/lora.json | — | — | | | Amazon_Fashion.lora_t2i_r5: stated 0.45, its "
        in out
    )

    write_evaluation(repo, ranks_doc([1] * 10))  # a hand-shrunk, "perfect" test set
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
    metrics = repo / LORA.replace(".ranks", ".detail")
    committed = json.loads(metrics.read_text())
    metrics.write_text(json.dumps(committed | {"avg_mean_similarity_at_5": 1e-6}))
    assert main(["--root", str(repo), "gate", "--reproduce"]) == 1  # a new key
    edited = json.loads(json.dumps(committed))
    edited["text_to_image"]["recall_at_5"] = 0.305
    metrics.write_text(json.dumps(edited))
    assert main(["--root", str(repo), "gate", "--reproduce"]) == 1
    assert "text_to_image.recall_at_5: 0.3 -> 0.305" in capsys.readouterr().out
    metrics.write_text(json.dumps(committed))
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
