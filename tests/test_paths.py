"""dvc.yaml and cliprec/paths.py must describe the same layout."""

from pathlib import Path

import yaml

from cliprec import paths

DVC_YAML = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]


def _outs(stage: str) -> set[str]:
    body = DVC_YAML[stage].get("do", DVC_YAML[stage])
    names = set()
    for section in ("outs", "metrics", "plots"):
        for entry in body.get(section, []):
            names.add(entry if isinstance(entry, str) else next(iter(entry)))
    return names


def _fill(template: str, category: str, variant: str | None = None) -> str:
    out = template.replace("${item.category}", category).replace("${item}", category)
    return out.replace("${item.variant}", variant) if variant else out


def test_stage_outputs_match_paths():
    cat = "Amazon_Fashion"
    expected = {
        "catalog": {paths.catalog_source_path(cat), paths.catalog_queries_path(cat)},
        "ingest": {paths.ingest_dir(cat)},
        "queries": {paths.queries_dir(cat)},
        "summarize": {paths.summaries_dir(cat), paths.summarize_progress_dir(cat)},
        "images": {paths.images_dir(cat)},
        "train": {
            paths.train_dir(cat),
            paths.checkpoint_dir(cat),
            paths.live_dir(cat) / "metrics.json",
            paths.live_dir(cat) / "plots",
        },
        "embed_zeroshot": {paths.embed_dir(cat, "zeroshot")},
        "embed_lora": {paths.embed_dir(cat, "lora")},
    }
    for stage, want in expected.items():
        assert {Path(_fill(o, cat)) for o in _outs(stage)} == want, stage
    for variant in paths.VARIANTS:
        assert {Path(_fill(o, cat, variant)) for o in _outs("index")} == {paths.index_dir(cat, variant)}
        assert {Path(_fill(o, cat, variant)) for o in _outs("evaluate")} == {
            paths.metrics_path(cat, variant),
            paths.metrics_detail_path(cat, variant),
            paths.recall_plot_path(cat, variant),
            paths.ranks_path(cat, variant),
        }
    assert {Path(_fill(o, cat)) for o in _outs("compare")} == {
        paths.compare_path(cat),
        paths.compare_detail_path(cat),
    }


def test_every_stage_script_exists():
    for stage, spec in DVC_YAML.items():
        cmd = spec.get("do", spec)["cmd"]
        script = cmd.split()[1]
        assert Path(script).is_file(), f"{stage}: {script} missing"
