"""bench/fanout.py: the static fan-out table follows dvc.yaml, docs/layout.md carries it, and the layout goals
that hold already (an edit to the demo world reruns nothing in setup=study)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def fanout():
    """bench/fanout.py as a module (bench scripts import their `_common` from their own folder)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("fanout")
    finally:
        sys.path.remove(str(BENCH))


def _tiny_repo(root: Path) -> Path:
    """A dvc.yaml with a plain, a foreach and a matrix stage, one dep per setup through `${setup}`."""
    for rel in ("cliprec/a.py", "cliprec/b.py", "cliprec_worlds/demo/gen.py", "cliprec_worlds/demo/t.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    (root / "params.yaml").write_text("setup: demo\ncategories: [A, B]\n")
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  check:\n    cmd: c\n    deps: [cliprec/a.py]\n"
        "  ingest:\n    foreach: ${categories}\n    do:\n      cmd: i\n"
        "      deps:\n        - cliprec/a.py\n        - cliprec_worlds/${setup}\n"
        "  index:\n    matrix:\n      category: ${categories}\n      variant: [z, l]\n"
        "    cmd: x\n    deps:\n      - cliprec/b.py\n      - data/${item.category}\n"
    )
    return root


def test_static_table_names_the_stages_whose_deps_hold_the_module(fanout, tmp_path):
    table = fanout.static_table(_tiny_repo(tmp_path))
    assert table["demo"] == {
        "cliprec/a.py": ["check", "ingest@A", "ingest@B"],
        "cliprec/b.py": ["index@A-z", "index@A-l", "index@B-z", "index@B-l"],
        "cliprec_worlds/demo/gen.py": ["ingest@A", "ingest@B"],  # through the folder dep
        "cliprec_worlds/demo/t.json": ["ingest@A", "ingest@B"],
    }
    assert table["study"]["cliprec_worlds/demo/gen.py"] == []
    assert table["study"]["cliprec/a.py"] == table["demo"]["cliprec/a.py"]
    assert fanout.summary(table["demo"]["cliprec/a.py"]) == "check, ingest ×2"


def test_docs_layout_carries_the_static_table_of_dvc_yaml(fanout):
    text = (REPO / "docs" / "layout.md").read_text()
    carried = text.split(fanout.BEGIN, 1)[1].split(fanout.END, 1)[0].strip()
    assert carried == fanout.docs_table(REPO), "docs/layout.md is stale: python bench/fanout.py --write-docs"
    assert "docs/layout.md" in (REPO / "README.md").read_text()


def test_an_edit_to_the_demo_world_reruns_nothing_in_the_study(fanout):
    table = fanout.static_table(REPO)
    worlds = [m for m in table["study"] if m.startswith("cliprec_worlds/")]
    assert "cliprec_worlds/demo/synthetic.py" in worlds and "cliprec_worlds/demo/vocabulary.json" in worlds
    assert {m: table["study"][m] for m in worlds} == {m: [] for m in worlds}
    # the shoppers draw on the world's truth and renderer; an edit to the shoppers reruns no ingest
    assert {s.split("@")[0] for s in table["demo"]["cliprec_worlds/demo/synthetic.py"]} == {
        "ingest",
        "queries",
    }
    assert {s.split("@")[0] for s in table["demo"]["cliprec_worlds/demo_queries/shoppers.py"]} == {"queries"}
    assert not any(m.startswith("cliprec/") and ("synthetic" in m or "standins" in m) for m in table["demo"])


def test_the_committed_measurement_agrees_with_its_static_table():
    for name in ("fanout", "fanout.before"):
        result = json.loads((BENCH / "results" / f"{name}.json").read_text())
        assert set(result["measured"]) == {"demo", "study"}, name
        for setup, measured in result["measured"].items():
            assert measured == result["static"][setup], f"{name} {setup}: dvc status != dvc.yaml"
            assert result["stale_before_edit"][setup] == [], f"{name} {setup}: the clone was not up to date"
