"""cliprec.audit: metrics files recomputed from their per-query files; a hand edit is named, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import ranks_doc

from cliprec import compare, evaluate, paths
from cliprec.audit import audit, expected_detail

CAT = "Appliances"
SETTINGS = evaluate.EvalSettings(resamples=1000)


def write_evaluation(root: Path, variant: str, seed: int) -> dict:
    """The three files the evaluate stage writes from one ranks file (ranks drawn from `seed`)."""
    rng = np.random.default_rng(seed)
    alt = [
        int(r) if i % 3 else None for i, r in enumerate(rng.integers(1, 30, 80))
    ]  # 1 in 3 has no 2nd photo
    ranks = ranks_doc([int(r) for r in rng.integers(1, 30, 80)], alt)
    detail = expected_detail(ranks, SETTINGS)
    files = {paths.ranks_path(CAT, variant): ranks, paths.metrics_detail_path(CAT, variant): detail,
             paths.metrics_path(CAT, variant): evaluate.headline(detail, CAT, variant)}  # fmt: skip
    for path, doc in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(doc))
    return ranks


def project(root: Path) -> Path:
    lora, zeroshot = write_evaluation(root, "lora", 1), write_evaluation(root, "zeroshot", 2)
    doc = {compare.KEY: compare.comparison_doc(compare.compare_ranks(lora, zeroshot, SETTINGS.resamples))}
    (root / paths.compare_detail_path(CAT)).write_text(json.dumps(doc))
    (root / paths.compare_path(CAT)).write_text(json.dumps(compare.headline(doc, CAT)))
    return root


def edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_files_written_from_their_ranks_agree(tmp_path):
    assert audit(project(tmp_path), SETTINGS) == []


def test_a_hand_edited_or_stale_metric_is_named(tmp_path):
    root = project(tmp_path)
    edit(root / paths.metrics_path(CAT, "lora"), lambda d: d[CAT].update(lora_t2i_r5=0.9))
    edit(
        root / paths.metrics_detail_path(CAT, "zeroshot"),
        lambda d: d["text_to_image"].update(gallery_size=10),
    )
    edit(root / paths.compare_path(CAT), lambda d: d[CAT].update(lora_gain_t2i_r5=0.5))
    problems = audit(root, SETTINGS)
    assert len(problems) == 3
    assert problems[0].startswith(
        f"metrics/{CAT}/lora.json: {CAT}.lora_t2i_r5: stated 0.9, its per-query file gives"
    )
    gallery = "text_to_image.gallery_size: stated 10, its per-query file gives 80"
    assert problems[1] == f"metrics/{CAT}/zeroshot.detail.json: {gallery}"
    assert problems[2].startswith(f"metrics/{CAT}/compare.json: {CAT}.lora_gain_t2i_r5: stated 0.5")


def test_lists_are_compared_value_by_value():
    from cliprec.audit import _mismatches

    assert list(_mismatches([0.1234561, 0.5], [0.12345612345, 0.5], "ci.")) == []
    assert list(_mismatches([0.2, 0.5], [0.1, 0.5], "ci.")) == [
        "ci.0: stated 0.2, its per-query file gives 0.1"
    ]
    assert "gives 2 values" in next(_mismatches([0.1], [0.1, 0.5], "ci."))


def test_a_changed_ci_or_a_missing_file_is_named(tmp_path):
    root = project(tmp_path)
    edit(
        root / paths.metrics_detail_path(CAT, "lora"),
        lambda d: d["image_to_image"]["ci95"]["mrr"].update(low=0.0),
    )
    (root / paths.compare_detail_path(CAT)).unlink()
    problems = audit(root, SETTINGS)
    assert any("lora.detail.json: image_to_image.ci95.mrr.low: stated 0.0" in p for p in problems)
    assert f"metrics/{CAT}/compare.detail.json: missing" in problems
