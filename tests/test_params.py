"""params.yaml: the two setups, the shared training keys, and the setup merge."""

from pathlib import Path

import pytest
import yaml

from cliprec.params import load_params


def test_training_defaults_are_the_documented_ones():
    p = load_params()
    assert (p["batch_size"], p["lr"], p["epochs"], p["amp"]) == (128, 2.0e-5, 10, False)
    assert isinstance(p["lr"], float)  # PyYAML reads `2e-5` as a string; params.yaml must say 2.0e-5


def test_setups_differ_only_in_their_blocks(tmp_path):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["setup"] = "study"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    demo, study = load_params(), load_params(path)
    assert demo["model"]["name"] == "models/demo-clip"
    assert study["model"]["name"] == "openai/clip-vit-base-patch32"
    assert study["ingest"]["source"] == "amazon" and study["ingest"]["n_products"] == 20000
    assert study["summarize"]["model"] == "facebook/bart-large-cnn"
    # shared blocks merge with the setup's block; shared scalars are the same in both worlds
    assert demo["train"]["weight_decay"] == study["train"]["weight_decay"]
    assert "lr_scale" in demo["train"] and "lr_scale" in study["train"]
    for key in ("batch_size", "lr", "epochs", "amp", "seed", "lora", "images", "index"):
        assert demo[key] == study[key]


def test_unknown_setup_is_a_clear_error(tmp_path):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["setup"] = "nope"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="setup 'nope'"):
        load_params(path)
