"""bench/_common.write_results: results of a dirty tree do not land in bench/results/ unmarked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def common(tmp_path, monkeypatch):
    """bench/_common.py as a module, writing under tmp_path, with a machine_info whose commit we set."""
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(module, "SCRATCH_DIR", tmp_path / "scratch")
    monkeypatch.setattr(module, "REPO_ROOT", tmp_path)
    monkeypatch.delenv(module.ALLOW_DIRTY, raising=False)
    return module


def _as_of(common, monkeypatch, commit: str) -> None:
    monkeypatch.setattr(common, "machine_info", lambda: {"git_commit": commit, "cpu": "test"})


def test_clean_tree_writes_to_results(common, monkeypatch, tmp_path):
    _as_of(common, monkeypatch, "abc123")
    path = common.write_results("x", {"figure": 1})
    assert path == tmp_path / "results" / "x.json"
    doc = json.loads(path.read_text())
    assert doc["figure"] == 1 and "dirty" not in doc


def test_dirty_tree_goes_to_scratch_with_a_warning(common, monkeypatch, tmp_path, capsys):
    _as_of(common, monkeypatch, "abc123+dirty")
    path = common.write_results("x", {"figure": 1})
    assert path == tmp_path / "scratch" / "x.json"
    assert not (tmp_path / "results").exists()
    assert "uncommitted changes" in capsys.readouterr().err


def test_dirty_tree_allowed_is_marked(common, monkeypatch, tmp_path):
    _as_of(common, monkeypatch, "abc123+dirty")
    monkeypatch.setenv(common.ALLOW_DIRTY, "1")
    path = common.write_results("x", {"figure": 1})
    assert path == tmp_path / "results" / "x.json"
    assert json.loads(path.read_text())["dirty"] is True
