"""cliprec.hub and the study's local hub copy: offline (HF_HUB_OFFLINE=1, or no network) the study fails at
once with one line naming what it could not reach and the param that points it at a local copy; a local
copy of the hub repo is a `hub_root` under catalog/."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import run_probed

from cliprec import catalog, hub
from cliprec.errors import CliprecError
from cliprec.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())
CATEGORY = "Appliances"


# --- hub_root: a local copy of the hub repo --------------------------------------------------------------


def test_a_local_hub_copy_without_the_category_is_one_line(tmp_path):
    with pytest.raises(CliprecError, match=r"setups\.study\.ingest\.hub_root = .* must hold a copy") as e:
        catalog.build_catalog(
            CATEGORY, catalog.CatalogSource("amazon", hub_root=str(tmp_path / "empty")), tmp_path / "out"
        )
    assert "\n" not in str(e.value)


def _params(tmp_path: Path, change) -> Path:
    raw = copy.deepcopy(RAW)
    change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_hub_root_param(tmp_path):
    study = load_params(_params(tmp_path, lambda r: r.update(setup="study")))
    assert study.active.ingest.hub_root is None  # null: the hub
    local = load_params(
        _params(tmp_path, lambda r: r["setups"]["study"]["ingest"].update(hub_root="catalog/hub"))
    )
    assert local.setups["study"].ingest.hub_root == "catalog/hub"
    for value, message in [
        ("/data/amazon", "must be a directory under catalog/"),
        ("catalog", "must be a directory under catalog/"),
        ("catalog/../x", "must be a directory under catalog/"),
    ]:
        with pytest.raises(ParamsError, match=message):
            load_params(
                _params(tmp_path, lambda r, v=value: r["setups"]["study"]["ingest"].update(hub_root=v))
            )
    with pytest.raises(ParamsError, match="hub_root is only read by source 'amazon'"):
        load_params(_params(tmp_path, lambda r: r["setups"]["demo"]["ingest"].update(hub_root="catalog/x")))


# --- offline: one line -----------------------------------------------------------------------------------


def test_offline_the_study_ingest_stage_exits_2_with_one_line(tmp_path):
    # queries from a local copy of C4 (their offline line: tests/test_queries.py), the catalog from the hub
    raw = copy.deepcopy(RAW)
    raw["setup"], raw["setups"]["study"]["queries"]["hub_root"] = "study", "catalog/amazon-c4"
    shutil.copytree(REPO / "tests" / "fixtures" / "amazon-c4", tmp_path / "catalog" / "amazon-c4")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this checkout's cliprec
    done, probe = run_probed(
        REPO / "stages" / "ingest.py", "Amazon_Fashion", cwd=tmp_path, env=env, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "error: ingest Amazon_Fashion: cannot reach hf://datasets/McAuley-Lab/Amazon-Reviews-2023/raw/"
        "meta_categories/meta_Amazon_Fashion.jsonl on the Hugging Face hub "
        "(offline mode: HF_HUB_OFFLINE is set)"
    )
    assert "point setups.study.ingest.hub_root at a local copy" in lines[0]
    assert "python scripts/build_study_standins.py" in lines[0]
    assert probe["network"] == []  # it failed without trying the network (so without retries, too)


def test_offline_the_models_fail_at_once_in_one_line(offline, monkeypatch):
    import transformers

    from cliprec.model import load_clip
    from cliprec.summarize import load_seq2seq

    tried = []  # from_pretrained would retry the hub before giving up: it must not even be called
    loaders = (transformers.CLIPModel, transformers.CLIPProcessor)
    for cls in (*loaders, transformers.AutoTokenizer, transformers.AutoModelForSeq2SeqLM):
        monkeypatch.setattr(cls, "from_pretrained", lambda name, *a, cls=cls, **k: tried.append((cls, name)))
    with pytest.raises(hub.HubError) as clip:
        load_clip("openai/clip-vit-base-patch32")
    with pytest.raises(hub.HubError) as bart:
        load_seq2seq("facebook/bart-large-cnn")
    assert tried == []
    for e, setting in ((clip, "setups.study.model.name"), (bart, "setups.study.summarize.model")):
        text = str(e.value)
        assert "\n" not in text and "(offline mode: HF_HUB_OFFLINE is set)" in text
        assert f"point {setting} at a local copy" in text and "hf download" in text


def test_unreachable_hub_uses_the_cache_or_fails_in_one_line(monkeypatch):
    import huggingface_hub
    import huggingface_hub.utils

    class NoNetwork:
        def head(self, *args, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: NoNetwork())
    hub.unreachable.cache_clear()
    try:
        assert hub.unreachable() == "ConnectionError: [Errno -2] Name or service not known"
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
        assert hub.pretrained_kwargs("org/model", "CLIP", hub.CLIP_SETTING) == {"local_files_only": True}
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
        with pytest.raises(hub.HubError, match="cannot reach org/model .*Name or service not known"):
            hub.pretrained_kwargs("org/model", "CLIP", hub.CLIP_SETTING)
    finally:
        hub.unreachable.cache_clear()


def test_hub_errors_only_wrap_hub_failures_of_hub_ids(tmp_path):
    import socket

    setting = hub.SUMMARIZER_SETTING
    with (
        pytest.raises(hub.HubError, match="summarize: cannot reach org/model"),
        hub.hub_errors("org/model", "summarize", setting),
    ):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    # a local directory's problem stays what it is; so does a bug (not a hub failure)
    with pytest.raises(OSError, match="corrupt"), hub.hub_errors(str(tmp_path), "summarize", setting):
        raise OSError("corrupt")
    with pytest.raises(ValueError), hub.hub_errors("org/model", "summarize", setting):
        raise ValueError("bug")
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        assert hub.is_network_failure(e)
    assert not hub.is_network_failure(ValueError("x"))
