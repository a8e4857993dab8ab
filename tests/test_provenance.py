"""cliprec.provenance: import closures, code identity, and dvc.yaml deps that are complete by construction."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from cliprec.provenance import code_identity, import_closure, library_versions

REPO = Path(__file__).resolve().parents[1]


def _package(root: Path) -> Path:
    pkg = root / "cliprec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""only a docstring"""\n')
    (pkg / "a.py").write_text("from cliprec import b\nimport os\n")
    (pkg / "b.py").write_text("def f():\n    from cliprec.c import g  # an import inside a function counts\n")
    (pkg / "c.py").write_text("g = 1\n")
    (pkg / "d.py").write_text("import cliprec.a\n")
    (root / "stage.py").write_text("from cliprec.a import b\n")
    return root


def test_closure_follows_every_import_statement(tmp_path):
    root = _package(tmp_path)
    closure = [p.as_posix() for p in import_closure("stage.py", root=root)]
    assert closure == ["cliprec/a.py", "cliprec/b.py", "cliprec/c.py", "stage.py"]  # not d, not os
    assert [p.as_posix() for p in import_closure("cliprec.c", root=root)] == ["cliprec/c.py"]


def test_code_identity_changes_with_any_module_of_the_closure(tmp_path):
    root = _package(tmp_path)
    before = code_identity("stage.py", root=root)
    (root / "cliprec" / "d.py").write_text("x = 2\n")  # not imported by the stage
    assert code_identity("stage.py", root=root) == before
    (root / "cliprec" / "c.py").write_text("g = 2\n")  # imported inside a function of b
    assert code_identity("stage.py", root=root) != before
    assert code_identity("cliprec.train") != code_identity("cliprec.summarize")


def test_library_versions():
    versions = library_versions("torch", "no-such-package")
    assert (
        versions["torch"].startswith("2.")
        and versions["no-such-package"] == "absent"
        and "python" in versions
    )


def _stage_bodies() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


SETUPS = list(yaml.safe_load((REPO / "params.yaml").read_text())["setups"])
WORLDS = "cliprec_worlds"


def _listed_modules(body: dict, setup: str) -> set[str]:
    """The project modules a stage's deps name under `setup`: .py files, and the modules of code folders."""
    out: set[str] = set()
    for dep in body.get("deps", []):
        path = (dep if isinstance(dep, str) else next(iter(dep))).replace("${setup}", setup)
        if path.endswith(".py"):
            out.add(path)
        elif path.startswith(WORLDS + "/"):
            assert (REPO / path).is_dir(), f"{path} (setup {setup}) does not exist: DVC would fail the stage"
            files = sorted((REPO / path).rglob("*.py"))
            out.update(p.as_posix() for p in import_closure(*files) if (REPO / p) in files)
    return out


def _closure_in(script: str, setup: str) -> set[str]:
    """A stage script's import closure, less the other setups' worlds (imported only for their source)."""
    others = tuple(f"{WORLDS}/{s}{kind}/" for s in SETUPS if s != setup for kind in ("", "_queries"))
    return {p.as_posix() for p in import_closure(script) if not p.as_posix().startswith(others)}


def test_dvc_yaml_deps_list_exactly_the_project_modules_each_stage_imports():
    for setup in SETUPS:
        for name, body in _stage_bodies().items():
            closure = _closure_in(body["cmd"].split()[1], setup)
            listed = _listed_modules(body, setup)
            assert closure - listed == set(), f"{name} ({setup}): deps miss {sorted(closure - listed)}"
            assert listed - closure == set(), f"{name} ({setup}): deps list unused {sorted(listed - closure)}"


def test_the_demo_generator_is_a_dependency_of_the_demo_ingest_only():
    demo = _listed_modules(_stage_bodies()["ingest"], "demo")
    assert "cliprec_worlds/demo/synthetic.py" in demo
    for name, body in _stage_bodies().items():
        assert not {m for m in _listed_modules(body, "study") if m.startswith(WORLDS)}, name


def test_the_runtime_imports_the_demo_world_only_inside_the_synthetic_source():
    importers = []
    for path in sorted((REPO / "cliprec").rglob("*.py")) + sorted((REPO / "stages").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n.split(".")[0] == WORLDS for n in names):
                importers.append((path.relative_to(REPO).as_posix(), id(node) in top))
    # one import each, inside the synthetic branch: build_catalog's, and the query set's (the demo's shoppers)
    assert importers == [("cliprec/catalog.py", False), ("cliprec/query_set.py", False)]


def test_each_ingest_depends_on_its_own_catalog_fingerprint_and_not_on_the_folder():
    bodies = _stage_bodies()
    assert "catalog" in bodies["catalog"]["deps"]  # the folder: a dependency that always exists
    assert (REPO / "catalog" / "README.md").is_file()
    fingerprints = ["data/catalog/${item}/source.json", "data/catalog/${item}/queries.json"]
    assert bodies["catalog"]["outs"] == fingerprints
    assert "data/catalog/${item}/source.json" in bodies["ingest"]["deps"]
    assert "catalog" not in bodies["ingest"]["deps"]
    # the query set likewise: its stage (and ingest, which samples its targets) reads the fingerprint
    for stage in ("ingest", "queries"):
        assert "data/catalog/${item}/queries.json" in bodies[stage]["deps"]
        assert "catalog" not in bodies[stage]["deps"]
