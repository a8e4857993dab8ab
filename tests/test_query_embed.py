"""cliprec.query_embed: the long-text policies, the query-set reader, and embedding a query set."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CAT, make_clip, photo_file, shared_project
from PIL import Image

from cliprec import paths
from cliprec.artifacts import ArtifactError, catalog_identity, verify_artifact, write_manifest
from cliprec.embed import encode_images, encode_texts
from cliprec.model import load_clip, text_features, text_max_length
from cliprec.query_embed import (
    QueryEmbedOptions,
    embed_queries,
    encode_long_texts,
    read_queries,
    text_windows,
    token_counts,
)
from cliprec.vectors import fuse, l2_normalise

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "c4_like_requests.txt"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_clip(make_clip(tmp_path_factory.mktemp("clip") / "clip"))


@pytest.mark.parametrize("n", [0, 1, 62, 63, 100, 187, 250])
def test_windows_cover_every_token_and_overlap(n):
    ids = list(range(10, 10 + n))
    windows = text_windows(ids, max_length=64, bos=0, eos=1)
    assert all(w[0] == 0 and w[-1] == 1 and len(w) <= 64 for w in windows)
    bodies = [w[1:-1] for w in windows]
    if n <= 62:
        assert bodies == [ids]
        return
    assert all(len(b) == 62 for b in bodies) and bodies[0] == ids[:62] and bodies[-1] == ids[-62:]
    covered = sorted({t for b in bodies for t in b})
    assert covered == ids
    starts = [ids.index(b[0]) for b in bodies]
    assert all(0 < b - a <= 31 for a, b in zip(starts, starts[1:]))  # overlap of at least half a window


def test_a_text_that_fits_is_embedded_the_same_under_both_policies(clip):
    model, processor = clip
    texts = ["a red shirt", "something warm for winter walks, dark blue, not wool"]
    truncated, w1 = encode_long_texts(model, processor, texts, QueryEmbedOptions(long_text="truncate"))
    windowed, w2 = encode_long_texts(model, processor, texts, QueryEmbedOptions(long_text="windows"))
    np.testing.assert_allclose(windowed, truncated, atol=1e-5)
    assert w1 == w2 == [1, 1]


def test_windows_average_the_window_vectors_and_truncate_ignores_the_tail(clip):
    model, processor = clip
    limit = text_max_length(model, processor)
    long_a = "a blue coat for my dog walks " * 6
    long_b = long_a[: limit * 2] + " and a green hat with yellow dots for the beach please " * 3
    assert min(token_counts(processor, [long_a, long_b])) > limit
    opt = QueryEmbedOptions(batch_size=2, long_text="windows")  # batches cut across one text's windows
    windowed, counts = encode_long_texts(model, processor, [long_a, long_b], opt)
    tok = processor.tokenizer
    for text, vec, n in zip([long_a, long_b], windowed, counts):
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        windows = text_windows(ids, limit, tok.bos_token_id, tok.eos_token_id)
        assert n == len(windows) > 1
        with torch.no_grad():
            each = [
                text_features(model, torch.tensor([w]), torch.ones(1, len(w), dtype=torch.long))
                for w in windows
            ]
        expect = l2_normalise(torch.cat(each).numpy().mean(axis=0, keepdims=True))[0]
        np.testing.assert_allclose(vec, expect, atol=1e-5)
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
    truncated, _ = encode_long_texts(model, processor, [long_a, long_b], QueryEmbedOptions())
    np.testing.assert_allclose(truncated[0], truncated[1], atol=1e-5)  # their first 64 tokens are the same
    assert not np.allclose(windowed[0], windowed[1], atol=1e-3)  # windows read the tails


def test_the_c4_like_fixture_holds_long_first_person_requests(clip):
    texts = [t for t in FIXTURE.read_text().splitlines() if t.strip()]
    assert len(texts) >= 10 and all(t.startswith(("I", "My", "Our", "Looking", "Please")) for t in texts)
    model, processor = clip  # the tiny CLIP reads characters: every request is over its 64 tokens
    assert min(token_counts(processor, texts)) > text_max_length(model, processor)


def _query_set(root: Path, rows: list[dict]) -> Path:
    (root / "photos").mkdir(parents=True, exist_ok=True)
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    photos = [f"photos/{p.name}" for p in (root / "photos").iterdir()]
    write_manifest(root, ["queries.jsonl", *photos], {"category": "Cat"})
    return root


def _row(qid: str, text: str | None, image: str | None, **extra) -> dict:
    kind = "+".join(k for k, v in (("text", text), ("image", image)) if v)
    row = {"query_id": qid, "text": text, "image": image, "relevant": {"P0001": 3}, "split": "test",
           "target_split": "train", "kind": kind}  # fmt: skip
    return {**row, **extra}


def test_embed_queries_text_photo_and_both_fused_as_products(clip, tmp_path):
    model, processor = clip
    qdir = tmp_path / "queries"
    (qdir / "photos").mkdir(parents=True)
    photo_file(qdir / "photos" / "red.jpg", "red")
    rows = [_row("q1", "a red dress", None), _row("q2", None, "photos/red.jpg"),
            _row("q3", "a red dress", "photos/red.jpg", split="val")]  # fmt: skip
    _query_set(qdir, rows)
    out = tmp_path / "out"
    manifest = embed_queries(
        model, processor, qdir, out, QueryEmbedOptions(text_weight=0.3), {"variant": "lora"}
    )
    vectors = np.load(out / "vectors.npy")
    text = encode_texts(model, processor, ["a red dress"])[0]
    image = encode_images(model, processor, [Image.open(qdir / "photos" / "red.jpg")])[0]
    np.testing.assert_allclose(vectors[0], text, atol=1e-5)
    np.testing.assert_allclose(vectors[1], image, atol=1e-4)
    np.testing.assert_allclose(vectors[2], fuse(text[None], image[None], 0.3)[0], atol=1e-4)
    meta = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    assert [m["query_id"] for m in meta] == ["q1", "q2", "q3"] and meta[2]["split"] == "val"
    assert [m["windows"] for m in meta] == [1, 0, 1] and meta[1]["tokens"] == 0
    report = json.loads((out / "report.json").read_text())
    assert (
        report["by_kind"] == {"text": 1, "image": 1, "text+image": 1} and report["texts_over_max_length"] == 0
    )
    assert manifest["variant"] == "lora" and manifest["long_text"] == "truncate" and manifest["n"] == 3
    verify_artifact(out, {"variant": "lora"})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (_row("q1", "x", None, split="train"), "split 'train'"),
        (_row("q1", "x", None, kind="image"), "kind 'image' but it has text"),
        (_row("q1", "x", None, relevant={}), "no relevant product"),
        (_row("q1", "x", None, relevant={"P1": 0}), "a grade is not an integer >= 1"),
        ({"query_id": "q1"}, "not a query row"),
    ],
)
def test_a_malformed_query_row_is_one_line_naming_file_and_line(tmp_path, row, message):
    _query_set(tmp_path, [_row("q0", "fine", None), row])
    with pytest.raises(ArtifactError, match=f"queries.jsonl:2: .*{message}"):
        read_queries(tmp_path)


def test_a_duplicate_query_id_and_an_unreadable_photo_are_refused(clip, tmp_path):
    _query_set(tmp_path / "dup", [_row("q0", "a", None), _row("q0", "b", None)])
    with pytest.raises(ArtifactError, match="query_id 'q0' appears twice"):
        read_queries(tmp_path / "dup")
    bad = tmp_path / "bad"
    (bad / "photos").mkdir(parents=True)
    (bad / "photos" / "x.jpg").write_bytes(b"not a jpeg")
    _query_set(bad, [_row("q0", None, "photos/x.jpg")])
    with pytest.raises(ArtifactError, match="x.jpg: unreadable query photo"):
        embed_queries(*clip, bad, tmp_path / "out")


def test_the_stages_embed_the_queries_and_evaluate_them_on_the_whole_catalog(
    tmp_path_factory, tmp_path, monkeypatch
):
    """stages/embed_queries.py then stages/evaluate.py in a fake project (cwd = its root, as under dvc)."""
    root = tmp_path / "project"
    shutil.copytree(shared_project(tmp_path_factory), root)
    monkeypatch.chdir(root)
    ids = (paths.embed_dir(CAT, "lora") / "ids.txt").read_text().split()
    qdir = paths.queries_dir(CAT)
    (qdir / "photos").mkdir(parents=True)
    photo_file(qdir / "photos" / "q1.jpg", "red")
    rows = [
        _row(f"q{i}", f"a {c} thing", None, relevant={ids[i]: 3}) for i, c in enumerate(["red", "blue"] * 4)
    ]
    rows[1] = _row("q1", None, "photos/q1.jpg", relevant={ids[1]: 2, ids[2]: 1})
    rows = [{**r, "split": "val"} if i == 7 else r for i, r in enumerate(rows)]
    _query_set(qdir, rows)
    write_manifest(qdir, ["queries.jsonl", "photos/q1.jpg"], catalog_identity(paths.products_path(CAT), CAT))
    for variant in paths.VARIANTS:
        runpy.run_path(str(REPO / "stages" / "embed_queries.py"))["main"]([CAT, variant])
        runpy.run_path(str(REPO / "stages" / "evaluate.py"))["main"]([CAT, variant])
        manifest = verify_artifact(
            paths.embed_queries_dir(CAT, variant), {"variant": variant, "category": CAT}
        )
        assert manifest["n"] == 8 and manifest["long_text"] == "truncate"
        q = json.loads(paths.metrics_detail_path(CAT, variant).read_text())["queries"]
        assert q["queries"] == 7 and q["gallery_size"] == len(ids) and set(q["by_target_split"]) == {"train"}
        shown = json.loads(paths.metrics_path(CAT, variant).read_text())[CAT]["queries"]
        assert shown["queries"] == 7 and shown["ndcg_at_10"] == q["ndcg_at_10"]
    lora, zeroshot = (np.load(paths.embed_queries_dir(CAT, v) / "vectors.npy") for v in ("lora", "zeroshot"))
    assert not np.allclose(lora, zeroshot)  # each variant's own model
    shutil.rmtree(paths.embed_queries_dir(CAT, "lora"))
    shutil.copytree(paths.embed_queries_dir(CAT, "zeroshot"), paths.embed_queries_dir(CAT, "lora"))
    with pytest.raises(ArtifactError, match=f"built for variant zeroshot.*embed_queries@{CAT}-lora"):
        runpy.run_path(str(REPO / "stages" / "evaluate.py"))["main"]([CAT, "lora"])
