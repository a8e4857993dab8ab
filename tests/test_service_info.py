"""Service.info: each variant's metrics as the page shows them, whichever file layout the project has."""

from __future__ import annotations

import json
import shutil

from helpers import CAT, shared_project

from cliprec import paths
from cliprec.evaluate import headline
from cliprec.service import Service

MODE = {"recall_at_1": 0.1, "recall_at_5": 0.25, "recall_at_10": 0.4, "mrr": 0.2, "ndcg_at_10": 0.3,
        "ci95": {"recall_at_5": {"low": 0.2, "high": 0.3}, "mrr": {"low": 0.15, "high": 0.25}},
        "gallery_size": 4, "queries": 4}  # fmt: skip
DETAIL = {"text_to_image": MODE, "image_to_text": MODE, "ann_recall_at_10": 1.0}


def test_info_returns_every_metric_with_its_ci95_from_the_detail_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("info") / "project"
    shutil.copytree(shared_project(tmp_path_factory), root)
    (root / paths.metrics_path(CAT, "lora")).parent.mkdir(parents=True, exist_ok=True)
    # as the evaluate stage writes them now: the DVC metrics file is the headline, the CIs are in the detail
    (root / paths.metrics_path(CAT, "lora")).write_text(json.dumps(headline(DETAIL, CAT, "lora")))
    (root / paths.metrics_detail_path(CAT, "lora")).write_text(json.dumps(DETAIL))
    # as a project evaluated before the detail files existed has it: everything in the metrics file
    (root / paths.metrics_path(CAT, "zeroshot")).write_text(json.dumps(DETAIL))
    variants = Service(root, [CAT]).info()["categories"][CAT]["variants"]
    assert variants["lora"]["metrics"] == DETAIL
    assert variants["lora"]["metrics"]["text_to_image"]["ci95"]["recall_at_5"] == {"low": 0.2, "high": 0.3}
    assert variants["zeroshot"]["metrics"] == DETAIL
