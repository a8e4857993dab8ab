"""params.yaml: one validated schema (types, ranges, unknown keys), the two setups, and stage start-up."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_probed

from cliprec.params import DVC_BLIND_KEYS, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())
# Stages run from a temporary directory must import this checkout's cliprec (matching its params.yaml),
# not whichever checkout an editable install points at.
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def write(tmp_path: Path, change) -> Path:
    raw = copy.deepcopy(RAW)
    change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_training_defaults_are_the_documented_ones():
    p = load_params(REPO / "params.yaml")
    assert (p.batch_size, p.lr, p.epochs, p.amp) == (128, 2.0e-5, 10, False)
    assert p.train.optimizer == "adamw"


def test_setups_differ_only_in_their_blocks(tmp_path):
    demo = load_params(REPO / "params.yaml")
    study = load_params(write(tmp_path, lambda r: r.update(setup="study")))
    assert demo.active.model.name == "models/demo-clip"
    assert study.active.model.name == "openai/clip-vit-base-patch32"
    assert study.active.ingest.source == "amazon" and study.active.ingest.n_products == 20000
    assert (
        study.active.summarize.method == "bart" and study.active.summarize.model == "facebook/bart-large-cnn"
    )
    assert study.effective_lr == study.lr  # lr_scale 1.0: the study trains at exactly lr
    assert demo.model_dump(exclude={"setup"}) == study.model_dump(exclude={"setup"})
    # each world splits its own catalog: ~270 demo test queries for power, 2,000 in the study
    assert study.active.split.model_dump() == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert demo.active.split.test >= 0.15


def test_no_param_is_named_what_dvcs_run_cache_ignores():
    # DVC leaves keys named `size`/`nfiles` out of the run-cache key (treeverse/dvc#10296): changing one
    # would restore an old output ("Stage is cached - skipping run") while dvc.lock records the new value
    def walk(node, where=""):
        if isinstance(node, dict):
            for key, value in node.items():
                assert key not in DVC_BLIND_KEYS, f"params.yaml: {where}{key} is invisible to DVC's run-cache"
                yield from walk(value, f"{where}{key}.")
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)
        yield where

    assert len(list(walk(RAW))) > 50


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(amp="maybe"), "amp = 'maybe': must be true or false"),
        (
            lambda r: r.update(amp="false"),
            "amp = 'false': must be true or false (a YAML boolean, not quoted)",
        ),
        (lambda r: r.update(epochs=1.5), "epochs = 1.5: must be an integer"),
        (lambda r: r.update(lr="abc"), "lr = 'abc': must be a number"),
        (lambda r: r.update(lr="2e-5"), "lr = '2e-5': must be a number (PyYAML reads 2e-5 as text"),
        (lambda r: r.update(batch_size=1), "batch_size = 1: input should be greater than or equal to 2"),
        (
            lambda r: r["setups"]["demo"]["split"].update(test=0.6),
            "setups.demo.split: train + val + test = 1.45; the fractions must sum to 1",
        ),
        (
            lambda r: r["setups"]["demo"]["split"].update(val=0.0, train=0.85),
            "setups.demo.split.val = 0.0: input should be greater than 0",
        ),
        (lambda r: r.update(categories=[]), "categories = []: must not be empty"),
        (lambda r: r.update(categories=["A", "A"]), "each category listed once"),
        (lambda r: r["evaluate"].update(ks=[0]), "evaluate.ks: [0]: each K must be an integer >= 1"),
        (lambda r: r["lora"].update(r=0), "lora.r = 0: input should be greater than or equal to 1"),
        (lambda r: r["images"].update(sise=3), "images: unknown key 'sise' (a typo?); allowed: side, resize"),
        (lambda r: r["images"].pop("retries"), "images.retries: missing"),
        (lambda r: r["embed"].update(text_weight=1.5), "embed.text_weight = 1.5: input should be less than"),
        (lambda r: r.update(setup="nope"), "setup = 'nope': not one of the setups: demo, study"),
        (
            lambda r: r["index"].update(factory="IVF64,PQ7"),
            "index.factory = 'IVF64,PQ7': FAISS cannot build it for the 128-d vectors of setup 'demo'",
        ),
        (  # FAISS builds it, but cannot train it: more lists than the setup has products (vectors)
            lambda r: r["index"].update(factory="IVF99999,Flat"),
            "index.factory = 'IVF99999,Flat': its 99999 inverted lists need at least 99999 vectors to train, "
            "but setup 'demo' indexes at most 1800 (setups.demo.ingest.n_products)",
        ),
        (
            lambda r: r["index"].update(
                factory="IVF4096,Flat"
            ),  # the demo's 1,800 are too few, the study's not
            "index.factory = 'IVF4096,Flat': its 4096 inverted lists need at least 4096 vectors to train, "
            "but setup 'demo' indexes at most 1800",
        ),
        (
            lambda r: r["setups"]["demo"]["ingest"].update(source="jsonl", path="my/meta_{category}.jsonl"),
            "setups.demo.ingest: path 'my/meta_{category}.jsonl' must be a file under catalog/",
        ),
        (
            lambda r: r["setups"]["study"]["summarize"].update(min_length=100),
            "setups.study.summarize: min_length 100 exceeds max_length 77",
        ),
    ],
)
def test_bad_values_are_one_line_naming_key_value_and_what_is_allowed(tmp_path, change, message):
    with pytest.raises(ParamsError) as e:
        load_params(write(tmp_path, change))
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{tmp_path / 'params.yaml'}: ") and message in text, text


def test_index_factory_is_checked_against_the_products_a_setup_can_have(tmp_path):
    assert load_params(write(tmp_path, lambda r: r["index"].update(factory="IVF1024,Flat"))).index.factory

    def unbounded(r):  # no n_products: any count is possible, so only the index stage can tell
        r["index"].update(factory="IVF99999,Flat")
        for setup in r["setups"].values():
            setup["ingest"]["n_products"] = None
        r["setups"]["demo"]["ingest"].update(source="jsonl", path="catalog/meta_{category}.jsonl")

    assert load_params(write(tmp_path, unbounded)).index.factory == "IVF99999,Flat"


def test_a_missing_or_broken_file_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("a: [1,\n")
    with pytest.raises(ParamsError, match="cannot read it"):
        load_params(tmp_path / "params.yaml")


def _project(tmp_path: Path, change) -> Path:
    return write(tmp_path, change).parent


@pytest.mark.parametrize("stage", ["train.py Amazon_Fashion", "embed.py Appliances lora", "check_params.py"])
def test_a_stage_with_bad_params_exits_2_with_one_line_before_any_model_loads(tmp_path, stage):
    root = _project(tmp_path, lambda r: r.update(amp="maybe"))
    script, *args = stage.split()
    done, probe = run_probed(REPO / "stages" / script, *args, cwd=root, env=ENV)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: params.yaml: amp = 'maybe': must be true or false (a YAML boolean, not quoted)"
    ]
    heavy = {"torch", "transformers", "faiss", "accelerate"} & set(probe["modules"])
    assert not heavy, f"validation must come before {sorted(heavy)} are imported"


def test_stage_debug_shows_the_traceback(tmp_path):
    root = _project(tmp_path, lambda r: r.update(amp="maybe"))
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / "check_params.py"), "--debug"],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" in done.stderr and "ParamsError" in done.stderr


def test_a_category_not_in_params_is_refused(tmp_path):
    root = _project(tmp_path, lambda r: None)
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / "ingest.py"), "Books"],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: category 'Books' is not in params.yaml categories: Amazon_Fashion, Appliances"
    )
