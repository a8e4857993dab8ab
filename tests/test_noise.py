"""cliprec.noise: seed spreads against a brute-force reference; collecting runs from git refs; the CLI."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import ranks_doc

from cliprec.cli import main
from cliprec.noise import NoiseError, Runs, collect, experiment_ref, headline, retrain, summarise

REPO = Path(__file__).resolve().parents[1]
CAT = "Amazon_Fashion"
N = 120


def run_docs(seed: int) -> dict[str, dict]:
    """One training seed's ranks files: zero-shot fixed, LoRA's ranks redrawn by the seed."""
    rng = np.random.default_rng(seed)
    zeroshot = ranks_doc([int(r) for r in np.random.default_rng(99).integers(1, 40, N)])
    lora = ranks_doc([int(r) for r in rng.integers(1, 30, N)])
    return {"zeroshot": zeroshot, "lora": lora}


def test_summarise_matches_a_brute_force_reference():
    seeds = [0, 3, 5, 7]
    docs = {s: run_docs(s) for s in seeds}
    runs = Runs("b" * 40, {s: f"{s}" * 40 for s in seeds}, {s: f"run {s}" for s in seeds})
    doc = summarise(CAT, docs, runs)
    r5 = [float(np.mean(np.array(docs[s]["lora"]["ranks"]["text_to_image"]) <= 5)) for s in seeds]
    got = doc["variants"]["lora"]["text_to_image"]["recall_at_5"]
    assert got["values"] == pytest.approx(r5, abs=1e-6)
    assert got["sd"] == pytest.approx(np.std(r5, ddof=1), abs=1e-6)
    pairs = [a - b for a, b in itertools.permutations(r5, 2)]
    assert got["diff"]["pairs"] == 12 and got["diff"]["min"] == pytest.approx(min(pairs), abs=1e-6)
    assert got["diff"]["q025"] == pytest.approx(np.quantile(pairs, 0.025), abs=1e-6)
    zs = doc["variants"]["zeroshot"]["text_to_image"]["recall_at_5"]
    assert zs["sd"] == 0 and zs["diff"]["max"] == 0  # zero-shot does not depend on the training seed
    gain = doc["lora_minus_zeroshot"]["text_to_image"]["recall_at_5"]
    assert gain["mean"] == pytest.approx(np.mean(r5) - zs["mean"], abs=1e-6)
    assert doc["test_set"] == docs[0]["lora"]["test_set"] and doc["seeds"] == seeds
    assert headline(doc) == {CAT: {"seeds": 4, "seeds_lora_t2i_r5_sd": got["sd"],
                                   "seeds_lora_t2i_r5_diff_q025": got["diff"]["q025"]}}  # fmt: skip


def test_summarise_refuses_runs_on_another_test_set():
    docs = {0: run_docs(0), 1: run_docs(1)}
    docs[1]["lora"] = ranks_doc([1] * N, ids=[f"Q{i:03d}" for i in range(N)])
    runs = Runs("b" * 40, {0: "a" * 40, 1: "c" * 40}, {0: "commit", 1: "exp seed-1"})
    with pytest.raises(NoiseError, match="seed 1 \\(exp seed-1\\) is on another test set"):
        summarise(CAT, docs, runs)


# --- from git: the committed run and experiments as refs/exps ---------------------------------------------

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          check=True, capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip()


def _commit_run(repo: Path, seed: int) -> str:
    params = (REPO / "params.yaml").read_text().replace("\nseed: 0", f"\nseed: {seed}", 1)
    (repo / "params.yaml").write_text(params)
    for variant, doc in run_docs(seed).items():
        path = repo / "metrics" / CAT / f"{variant}.ranks.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", f"seed {seed}")
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    """A git repo whose HEAD is the seed-0 run and which holds two DVC-style experiment refs."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    base = _commit_run(repo, 0)
    for seed in (1, 2):
        rev = _commit_run(repo, seed)
        _git(repo, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/seed-{seed}", rev)
    _git(repo, "reset", "-q", "--hard", base)
    return repo


@needs_git
def test_collect_and_write_from_experiment_refs(repo, capsys):
    base = _git(repo, "rev-parse", "HEAD")
    assert experiment_ref(repo, base, "seed-2") and experiment_ref(repo, base, "seed-9") is None
    runs = collect(repo, ["seed-1", "seed-2"], base_seed=0)
    assert sorted(runs.by_seed) == [0, 1, 2] and runs.by_seed[0] == base
    assert main(["--root", str(repo), "noise", "--exps", "seed-1", "seed-2", "--category", CAT]) == 0
    assert "LoRA T→I R@5 over seeds [0, 1, 2]" in capsys.readouterr().out
    detail = json.loads((repo / "metrics" / CAT / "noise.detail.json").read_text())
    assert detail["base"] == base and detail["seeds"] == [0, 1, 2]
    assert detail["runs"]["1"] == experiment_ref(repo, base, "seed-1")
    assert json.loads((repo / "metrics" / CAT / "noise.json").read_text())[CAT]["seeds"] == 3


@needs_git
def test_retrain_reuses_finished_experiments_and_refuses_a_dirty_tree(repo):
    runs = retrain(repo, [1, 2, 0], base_seed=0)  # both experiments exist: no `dvc exp run`
    assert runs.names == {0: f"commit {runs.base[:7]}", 1: "exp seed-1", 2: "exp seed-2"}
    (repo / "params.yaml").write_text("seed: 5\n")
    with pytest.raises(NoiseError, match="uncommitted changes"):
        retrain(repo, [1], base_seed=0)


@needs_git
def test_collect_errors_name_the_run(repo, capsys):
    with pytest.raises(NoiseError, match="'nope' is neither an experiment of HEAD"):
        collect(repo, ["nope"], base_seed=0)
    assert main(["--root", str(repo), "noise", "--exps", "seed-1", "seed-1"]) == 2
    assert "training seed 1 is already among the runs" in capsys.readouterr().err
