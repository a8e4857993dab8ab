"""bench/cue_ablation.py: the word removal behind its conditions removes exactly the listed words."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def cue():
    """bench/cue_ablation.py as a module (bench scripts import their `_common` from their own folder)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("cue_ablation")
    finally:
        sys.path.remove(str(BENCH))


def test_strip_words_removes_listed_words_in_any_case_and_keeps_the_rest(cue):
    text = "ORRIN Womens Navy Mini-Skirt, by Orrin. Navy-blue; Minimal navyish trim (Marlowe Lane) Lane"
    out = cue.strip_words(text, ["orrin", "Navy", "mini", "marlowe lane"])
    assert out == "Womens -Skirt, by . -blue; Minimal navyish trim ( ) Lane"
    assert cue.words(out) == ["womens", "skirt", "by", "blue", "minimal", "navyish", "trim", "lane"]


def test_strip_words_handles_accents_digits_and_an_empty_list(cue):
    assert cue.strip_words("Crème 1000 Watts, crème™ quality", ["CRÈME", "1000"]) == "Watts, ™ quality"
    assert cue.strip_words("  kept   as is ", []) == "  kept   as is "


def test_catalog_only_words_are_the_unseen_words_outside_brand_names(cue):
    texts = ["Marlowe Lane Navy Chinos", "A red shirt, 2023 Model"]
    common = {"a", "red", "shirt", "model"}
    assert cue.catalog_only_words(texts, common, ["Marlowe Lane"]) == ["2023", "chinos", "navy"]


def test_drop_random_words_drops_n_words_never_an_excluded_one(cue):
    text = "Navy blue cotton shirt, soft and light"
    out = cue.drop_random_words(text, {"navy", "cotton"}, 3, np.random.default_rng(0))
    kept = cue.words(out)
    assert len(kept) == len(cue.words(text)) - 3
    assert {"navy", "cotton"} <= set(kept) and "," in out
    assert cue.drop_random_words(text, set(cue.words(text)), 3, np.random.default_rng(0)) == text
