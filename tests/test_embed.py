import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import make_catalog, make_clip
from PIL import Image

from cliprec import paths
from cliprec.codec import decode_jpeg
from cliprec.embed import FILES, EmbedOptions, embed_catalog, encode_images, encode_texts
from cliprec.model import decode_side, load_clip
from cliprec.shards import read_image_table
from cliprec.vectors import fuse

REPO = Path(__file__).resolve().parents[1]
CAT = "Tiny"
MANIFEST_KEYS = {
    "model",
    "variant",
    "adapter",
    "d",
    "n",
    "n_alt",
    "text_weight",
    "dtype",
    "amp",
    "device",
    "category",
    "catalog_sha256",
    "adapter_sha256",
    "files",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project dir: params.yaml, models/tiny-clip, data/ laid out like cliprec.paths."""
    root = tmp_path_factory.mktemp("project")
    make_clip(root / "models" / "tiny-clip")
    make_catalog(root / "data", category=CAT)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(categories=[CAT], epochs=1, batch_size=16)
    params["lora"]["r"] = 4
    params["embed"]["batch_size"] = 8  # several batches, and a short last one
    params["setups"]["demo"]["model"]["name"] = "models/tiny-clip"
    params["setups"]["demo"]["train"]["lr_scale"] = 500  # the tiny random model needs a big step
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def model(project):
    return load_clip(project / "models" / "tiny-clip", device="cpu")


def _stage(project, monkeypatch, *argv):
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [argv[0], *argv[1:]])
    runpy.run_path(str(REPO / argv[0]), run_name="__main__")


def test_encoders_are_unit_norm_and_batch_independent(model):
    model, processor = model
    texts = ["a red shirt", "blue dress, size 4", "x", "a long white scarf " * 10]
    a = encode_texts(model, processor, texts, batch_size=3)
    b = encode_texts(model, processor, texts, batch_size=64)
    assert a.dtype == np.float32 and a.shape == (4, 16)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(a, b, atol=1e-5)  # padding to a batch's longest text changes nothing
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50, 40 + i, 3), dtype=np.uint8)) for i in range(5)]
    images.append(images[0].convert("L"))  # any mode is converted to RGB
    x = encode_images(model, processor, images, batch_size=2)
    assert x.shape == (6, 16) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.allclose(x[:5], encode_images(model, processor, images[:5], batch_size=64), atol=1e-5)
    with torch.no_grad():
        batch = processor(text=texts, images=images[:4], return_tensors="pt", padding=True, truncation=True)
        out = model(**batch)
    assert np.allclose(a, out.text_embeds.numpy(), atol=1e-5)
    assert np.allclose(x[:4], out.image_embeds.numpy(), atol=1e-5)
    assert encode_texts(model, processor, []).shape == (0, 16)


def test_fuse():
    t = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    i = np.array([[0.0, 1.0], [0.0, -1.0]], np.float32)
    f = fuse(t, i, 0.75)
    assert f.dtype == np.float32
    assert np.allclose(f[0], np.array([0.75, 0.25]) / np.hypot(0.75, 0.25))
    assert np.allclose(f[1], [0.0, 1.0])  # 0.75 - 0.25 = 0.5, normalised
    assert np.allclose(fuse(t, i, 1.0), t) and np.allclose(fuse(t, i, 0.0), i)
    assert np.all(np.isfinite(fuse(t, -t, 0.5)))  # opposite vectors: no division by zero


def test_embed_catalog_rows_line_up_with_the_catalog(project, model, tmp_path):
    model, processor = model
    data = project / "data"
    manifest = embed_catalog(
        model, processor, data / "images" / CAT, data / "summaries" / CAT / "summaries.parquet", tmp_path,
        options=EmbedOptions(batch_size=8, text_weight=0.3),
        info={"model": "tiny", "variant": "zeroshot", "adapter": None},
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert set(manifest) == MANIFEST_KEYS
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    table = read_image_table(data / "images" / CAT)
    main, alt = table[table["view"] == "main"], table[table["view"] == "alt"]
    ids = (tmp_path / "ids.txt").read_text().split()
    alt_ids = (tmp_path / "alt_ids.txt").read_text().split()
    assert ids == main["id"].tolist() and "P0005" not in ids  # P0005 has no photo
    assert alt_ids == alt["id"].tolist() and len(alt_ids) < len(ids)
    assert manifest["n"] == len(ids) and manifest["n_alt"] == len(alt_ids) and manifest["d"] == 16
    arrays = {name: np.load(tmp_path / f"{name}.npy") for name in ("image", "text", "fused", "alt_image")}
    for name, arr in arrays.items():
        assert arr.dtype == np.float32
        assert arr.shape == ((len(alt_ids) if name == "alt_image" else len(ids)), 16)
        assert np.allclose(np.linalg.norm(arr, axis=1), 1, atol=1e-5), name
    # row k is product ids[k]: recompute a few rows from the raw data
    summaries = pd.read_parquet(data / "summaries" / CAT / "summaries.parquet").set_index("id")["summary"]
    side = decode_side(processor)  # the stage decodes JPEGs at the model's size, so must we
    for k in (0, 7, len(ids) - 1):
        image = encode_images(model, processor, [decode_jpeg(main["jpeg"].iloc[k], side)])[0]
        text = encode_texts(model, processor, [summaries[ids[k]]])[0]
        assert np.allclose(arrays["image"][k], image, atol=1e-5)
        assert np.allclose(arrays["text"][k], text, atol=1e-5)
    k = len(alt_ids) - 1
    alt_image = encode_images(model, processor, [decode_jpeg(alt["jpeg"].iloc[k], side)])[0]
    assert np.allclose(arrays["alt_image"][k], alt_image, atol=1e-5)
    assert np.allclose(arrays["fused"], fuse(arrays["text"], arrays["image"], 0.3), atol=1e-6)


def test_stages_train_then_embed_zeroshot_and_lora(project, monkeypatch):
    _stage(project, monkeypatch, "stages/train.py", CAT)
    summary = json.loads((project / paths.train_dir(CAT) / "summary.json").read_text())
    assert summary["lr"] == pytest.approx(2e-5 * 500) and summary["epochs_run"] == 1
    assert (project / paths.live_dir(CAT) / "metrics.json").is_file()
    assert not (project / "dvc.yaml").exists()  # DVCLive must not write a dvc.yaml of its own
    vectors = {}
    for variant in paths.VARIANTS:
        _stage(project, monkeypatch, "stages/embed.py", CAT, variant)
        out = project / paths.embed_dir(CAT, variant)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["variant"] == variant and manifest["model"] == "models/tiny-clip"
        assert (manifest["adapter"] is None) == (variant == "zeroshot")
        assert manifest["category"] == CAT and manifest["catalog_sha256"] is not None
        assert (manifest["adapter_sha256"] is None) == (variant == "zeroshot")
        vectors[variant] = {name: np.load(out / f"{name}.npy") for name in ("image", "text")}
        zeroshot_ids = project / paths.embed_dir(CAT, "zeroshot") / "ids.txt"
        assert (out / "ids.txt").read_text() == zeroshot_ids.read_text()
    for name in ("image", "text"):
        diff = np.abs(vectors["lora"][name] - vectors["zeroshot"][name]).max()
        assert diff > 1e-3, name  # the trained adapter is applied


def _stage_error(project, monkeypatch, capsys, *argv) -> str:
    """The one line a stage prints for a user error (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        _stage(project, monkeypatch, *argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0].removeprefix("error: ")


def test_the_embed_stage_refuses_another_categorys_adapter_or_photos(project, monkeypatch, capsys, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("embed"))
    if not (root / paths.train_dir(CAT) / "manifest.json").is_file():
        _stage(root, monkeypatch, "stages/train.py", CAT)
    for directory in (paths.train_dir(CAT), paths.images_dir(CAT)):  # as if copied from category Other
        manifest = json.loads((root / directory / "manifest.json").read_text())
        (root / directory / "manifest.json").write_text(json.dumps({**manifest, "category": "Other"}))
    assert _stage_error(root, monkeypatch, capsys, "stages/embed.py", CAT, "zeroshot") == (
        f"{paths.images_dir(CAT)}/manifest.json was built for category Other, not {CAT}: rebuild it with "
        f"`dvc repro images@{CAT}`"
    )
    shutil.copy(project / paths.images_dir(CAT) / "manifest.json", root / paths.images_dir(CAT))
    assert _stage_error(root, monkeypatch, capsys, "stages/embed.py", CAT, "lora") == (
        f"{paths.train_dir(CAT)}/manifest.json was built for category Other, not {CAT}: rebuild it with "
        f"`dvc repro train@{CAT}`"
    )
    assert not (root / paths.embed_dir(CAT, "lora")).exists()


@pytest.mark.slow  # ~20 s: two fresh processes import torch + transformers
def test_two_process_embed_writes_what_one_process_writes(project, monkeypatch, tmp_path):
    # `accelerate launch --multi_gpu --num_processes 2 stages/embed.py ...`, the way a GPU box runs it
    _stage(project, monkeypatch, "stages/embed.py", CAT, "zeroshot")
    one = project / paths.embed_dir(CAT, "zeroshot")
    single = {f: (one / f).read_bytes() for f in FILES}
    shutil.rmtree(one)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [*launch, str(REPO / "stages" / "embed.py"), CAT, "zeroshot"]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    for f in FILES:
        if f.endswith(".npy"):
            a, b = np.load(io.BytesIO(single[f])), np.load(one / f)
            assert a.shape == b.shape and np.allclose(a, b, atol=1e-6), f  # 1 vs 2 threads per process
        elif f != "manifest.json":
            assert (one / f).read_bytes() == single[f], f
    assert json.loads((one / "manifest.json").read_text())["n"] == json.loads(single["manifest.json"])["n"]
