"""bench/study_rehearsal.py: each stage process is attributed to the DVC stage that ran it, and the query
stages' rows count queries (the rehearsal once read embed_queries as an image-embedding stage)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def rehearsal():
    """bench/study_rehearsal.py as a module (bench scripts import their `_common` from their own folder)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("study_rehearsal")
    finally:
        sys.path.remove(str(BENCH))


def _stage_commands(category: str, variant: str) -> list[tuple[str, list[str]]]:
    """Every stage of dvc.yaml for one category (and variant): its DVC name and its command line."""
    out = []
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            out.append((f"{name}@{category}", stage["do"]["cmd"].replace("${item}", category)))
        elif "matrix" in stage:
            cmd = stage["cmd"].replace("${item.category}", category).replace("${item.variant}", variant)
            out.append((f"{name}@{category}-{variant}", cmd))
        else:
            out.append((name, stage["cmd"]))
    return [(name, cmd.split()) for name, cmd in out]


def test_every_dvc_stage_process_maps_to_its_stage_name(rehearsal):
    for name, cmdline in _stage_commands("Appliances", "lora"):
        assert rehearsal.stage_of(cmdline) == name, cmdline


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_query_stage_rows_count_queries(rehearsal, tmp_path):
    data = tmp_path / "data"
    _write(data / "queries/Appliances/report.json", {"kept": 12, "rows_read": 30, "splits": {"val": 4}})
    _write(data / "embed_queries/Appliances/lora/report.json", {"queries": 12, "texts_over_max_length": 1})
    row = rehearsal._throughput("queries", "Appliances", {}, "queries@Appliances", tmp_path)
    assert (row["items"], row["unit"], row["rows_read"]) == (12, "queries kept", 30)
    row = rehearsal._throughput("embed_queries", "Appliances", {}, "embed_queries@Appliances-lora", tmp_path)
    assert (row["items"], row["unit"], row["over_77"]) == (12, "queries", 1)
