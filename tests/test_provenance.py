"""cliprec.provenance: import closures, code identity, and dvc.yaml deps that are complete by construction."""

from __future__ import annotations

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


def test_dvc_yaml_deps_list_exactly_the_project_modules_each_stage_imports():
    for name, body in _stage_bodies().items():
        script = body["cmd"].split()[1]
        closure = {p.as_posix() for p in import_closure(script)}
        deps = {d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])}
        listed = {d for d in deps if d.endswith(".py")}
        assert closure - listed == set(), f"{name}: dvc.yaml deps miss {sorted(closure - listed)}"
        assert listed - closure == set(), f"{name}: dvc.yaml deps list unused {sorted(listed - closure)}"


def test_each_ingest_depends_on_its_own_catalog_fingerprint_and_not_on_the_folder():
    bodies = _stage_bodies()
    assert "catalog" in bodies["catalog"]["deps"]  # the folder: a dependency that always exists
    assert (REPO / "catalog" / "README.md").is_file()
    assert bodies["catalog"]["outs"] == ["data/catalog/${item}/source.json"]
    assert "data/catalog/${item}/source.json" in bodies["ingest"]["deps"]
    assert "catalog" not in bodies["ingest"]["deps"]
