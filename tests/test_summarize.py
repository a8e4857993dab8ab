from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cliprec import summarize
from cliprec.params import Bart, Extractive
from cliprec.summarize import cap_words, input_token_limit, load_seq2seq, source_text, summarize_catalog
from cliprec.text import clean_text

TEXTS = [
    "Men's fleece zip jacket with warm lining and two pockets.",
    "Waterproof hiking boots with a Vibram outsole and leather upper.",
    "Silk scarf, hand wash only, printed with a floral pattern.",
    "Café crème Strickjacke für Damen, Größe M, 日本製.",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    """A tiny random BART + byte-level BPE tokenizer saved like a hub model (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    path = tmp_path_factory.mktemp("tiny-bart")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TEXTS * 5,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(path))
    tok = BartTokenizer.from_pretrained(str(path))
    config = BartConfig(
        vocab_size=len(tok),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _products(n: int = 7) -> pd.DataFrame:
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"P{i:03d}",
                "title": f"Product {i} <b>{['Jacket', 'Boots', 'Scarf'][i % 3]}</b>",
                "features": [TEXTS[i % 4], f"Feature number {i} is rare{i}"] if i % 4 != 3 else [],
                "description": [TEXTS[(i + 1) % 4] + " " + " ".join(["filler"] * 30)] if i % 4 != 3 else [],
            }
        )
    return pd.DataFrame(rows)


def _extractive_params(**kw) -> Extractive:
    return Extractive(**{"method": "extractive", "max_words": 20, "chunk_size": 3, **kw})


def _bart_params(model_path, **kw) -> Bart:
    return Bart(
        **{
            "method": "bart",
            "model": str(model_path),
            "max_input_tokens": 1024,
            "max_length": 8,
            "min_length": 2,
            "num_beams": 2,
            "batch_size": 2,
            "max_words": 8,
            "chunk_size": 3,
            **kw,
        }
    )


def _last_run(root: Path) -> dict:
    """The run log's record of the latest finished run."""
    return json.loads((root / "runs.jsonl").read_text().splitlines()[-1])


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_extractive_catalog(tmp_path):
    products = _products()
    run_log = tmp_path / "runs.jsonl"
    report = summarize_catalog(
        products, tmp_path / "out", tmp_path / "progress", _extractive_params(), run_log=run_log
    )
    out = pd.read_parquet(tmp_path / "out" / "summaries.parquet")
    assert list(out.columns) == ["id", "summary"]
    assert out["id"].tolist() == products["id"].tolist()
    for title, s in zip(products["title"], out["summary"]):
        clean_title = title.replace("<b>", "").replace("</b>", "")
        assert s.startswith(clean_title)
        assert 1 <= len(s.split()) <= 20
    assert out["summary"][3] == "Product 3 Jacket"  # nothing but a title: the title
    assert "rare0" in out["summary"][0]  # the rare feature beats the filler description
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "extractive" and report["n"] == 7 and report["chunks"] == 3
    # an output's hash follows its inputs alone: how the run went is in the run log, not in the report
    assert not {"seconds", "resumed_chunks"} & set(report)
    run = _last_run(tmp_path)
    assert run["resumed_chunks"] == 0 and run["chunks"] == 3 and run["seconds"] >= 0 and "finished" in run
    assert report["code"] == summarize.run_identity()["code"] and "transformers" in report["versions"]
    assert report["mean_words"] == pytest.approx(out["summary"].str.split().str.len().mean(), abs=1e-3)
    assert report["title_fallbacks"] == 1  # P003 has no features and no description
    assert sorted(p.name for p in (tmp_path / "progress").iterdir()) == [
        "chunk-00000.parquet",
        "chunk-00001.parquet",
        "chunk-00002.parquet",
        "fingerprint.json",
    ]


def test_bart_generation_through_local_model(tmp_path, tiny_bart, monkeypatch):
    from transformers import BartForConditionalGeneration

    calls = []
    real_generate = summarize.generate_summaries

    def spy(model, tokenizer, texts, **kw):
        out = real_generate(model, tokenizer, texts, **kw)
        calls.append((model, list(texts), out))
        return out

    monkeypatch.setattr(summarize, "generate_summaries", spy)
    gen_kwargs = []
    real_model_generate = BartForConditionalGeneration.generate

    def generate_spy(self, *args, **kwargs):
        gen_kwargs.append(kwargs)
        return real_model_generate(self, *args, **kwargs)

    monkeypatch.setattr(BartForConditionalGeneration, "generate", generate_spy)
    products = _products()
    report = summarize_catalog(products, tmp_path / "out", tmp_path / "progress", _bart_params(tiny_bart))
    out = pd.read_parquet(tmp_path / "out" / "summaries.parquet")
    assert out["id"].tolist() == products["id"].tolist()
    assert out["summary"][3] == "Product 3 Jacket"  # empty body: the title, the model is not asked
    assert isinstance(calls[0][0], BartForConditionalGeneration)
    texts = [t for c in calls for t in c[1]]
    generated = [g for c in calls for g in c[2]]
    assert texts == [
        source_text(*products.loc[i, ["title", "features", "description"]]) for i in (0, 1, 2, 4, 5, 6)
    ]
    for i, g in zip((0, 1, 2, 4, 5, 6), generated):  # cleaned, capped model output, else the title
        assert out["summary"][i] == (
            cap_words(clean_text(g), 8) or cap_words(clean_text(products["title"][i]), 8)
        )
    assert all(1 <= len(s.split()) <= 8 for s in out["summary"])
    assert all(k["num_beams"] == 2 and k["max_length"] == 8 and k["min_length"] == 2 for k in gen_kwargs)
    assert len(gen_kwargs) == 4  # batches of 2 within chunks of 3: [P0 P1][P2] [P4 P5] [P6] (P3: no body)
    # inputs are truncated to the model's 64 positions, not the 1024 of the params
    assert max(k["input_ids"].shape[1] for k in gen_kwargs) == 64
    assert report["method"] == "bart" and report["model"] == str(tiny_bart) and report["n"] == 7


def test_input_token_limit(tiny_bart):
    model, tok, device = load_seq2seq(str(tiny_bart), device="cpu")
    assert device == "cpu" and not model.training
    assert input_token_limit(model, tok, 1024) == 64
    assert input_token_limit(model, tok, 16) == 16
    assert input_token_limit(model, tok, None) == 64


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["extractive", "bart"])
def test_resume_after_kill(tmp_path, tiny_bart, monkeypatch, method):
    products = _products()
    params = _extractive_params() if method == "extractive" else _bart_params(tiny_bart)
    summarize_catalog(products, tmp_path / "ref", tmp_path / "ref-progress", params)

    def kill_after_first_chunk(i):
        if i == 0:
            raise Killed

    progress = tmp_path / "progress"
    with pytest.raises(Killed):
        summarize_catalog(products, tmp_path / "out", progress, params, on_chunk_done=kill_after_first_chunk)
    assert (progress / "chunk-00000.parquet").exists()
    assert not (progress / "chunk-00001.parquet").exists()
    assert not (tmp_path / "out" / "summaries.parquet").exists()

    done = []
    if method == "extractive":
        real = summarize.extractive_summary
        monkeypatch.setattr(
            summarize, "extractive_summary", lambda title, *a, **k: done.append(title) or real(title, *a, **k)
        )
    else:
        real = summarize.generate_summaries
        monkeypatch.setattr(
            summarize,
            "generate_summaries",
            lambda m, t, texts, **k: done.extend(texts) or real(m, t, texts, **k),
        )
    report = summarize_catalog(products, tmp_path / "out", progress, params, run_log=tmp_path / "runs.jsonl")
    assert _last_run(tmp_path)["resumed_chunks"] == 1
    # only the products of chunks 1 and 2 were summarised again (bart skips the body-less P003)
    assert len(done) == (4 if method == "extractive" else 3)
    assert all("Product 0 " not in t and "Product 1 " not in t and "Product 2 " not in t for t in done)
    # the outputs and the progress dir, byte for byte: what DVC hashes into dvc.lock
    assert _tree(tmp_path / "out") == _tree(tmp_path / "ref")
    assert _tree(progress) == _tree(tmp_path / "ref-progress")
    assert report == json.loads((tmp_path / "ref" / "report.json").read_text())

    # a finished run is never reused: DVC reran the stage (forced, or something changed), so it computes
    done.clear()
    summarize_catalog(products, tmp_path / "out", progress, params, run_log=tmp_path / "runs.jsonl")
    assert _last_run(tmp_path)["resumed_chunks"] == 0
    assert len(done) == (7 if method == "extractive" else 6)


def test_a_code_or_library_change_does_not_resume(tmp_path, monkeypatch):
    products = _products()
    progress = tmp_path / "progress"

    def kill_after_first_chunk(i):
        if i == 0:
            raise Killed

    with pytest.raises(Killed):
        summarize_catalog(
            products, tmp_path / "out", progress, _extractive_params(), on_chunk_done=kill_after_first_chunk
        )
    real = summarize.run_identity
    monkeypatch.setattr(summarize, "run_identity", lambda: {**real(), "code": "edited cliprec/text.py"})
    summarize_catalog(
        products, tmp_path / "out", progress, _extractive_params(), run_log=tmp_path / "r.jsonl"
    )
    assert json.loads((tmp_path / "r.jsonl").read_text())["resumed_chunks"] == 0


def test_fingerprint_mismatch_clears_progress(tmp_path):
    products = _products()
    progress, run_log = tmp_path / "progress", tmp_path / "runs.jsonl"
    summarize_catalog(products, tmp_path / "out", progress, _extractive_params())
    stale = progress / "chunk-00009.parquet"
    stale.write_bytes(b"left over from an older, bigger catalog")
    old_fp = json.loads((progress / "fingerprint.json").read_text())

    # a param change
    summarize_catalog(products, tmp_path / "out", progress, _extractive_params(max_words=5), run_log=run_log)
    assert _last_run(tmp_path)["resumed_chunks"] == 0
    assert not stale.exists()
    assert json.loads((progress / "fingerprint.json").read_text()) != old_fp
    assert all(
        len(s.split()) <= 5 for s in pd.read_parquet(tmp_path / "out" / "summaries.parquet")["summary"]
    )

    # an input change (same ids, one new text)
    changed = products.copy()
    changed.loc[5, "title"] = "Renamed product"
    summarize_catalog(changed, tmp_path / "out", progress, _extractive_params(max_words=5), run_log=run_log)
    assert _last_run(tmp_path)["resumed_chunks"] == 0
    assert pd.read_parquet(tmp_path / "out" / "summaries.parquet")["summary"][5].startswith("Renamed product")

    # the same inputs and params again, after a finished run: computed again, not resumed
    summarize_catalog(changed, tmp_path / "out", progress, _extractive_params(max_words=5), run_log=run_log)
    assert _last_run(tmp_path)["resumed_chunks"] == 0
    assert len(run_log.read_text().splitlines()) == 3  # one line per finished run


def test_corrupt_chunk_is_recomputed(tmp_path):
    products = _products()
    progress = tmp_path / "progress"
    summarize_catalog(products, tmp_path / "ref", tmp_path / "ref-progress", _extractive_params())

    def kill_after_last_chunk(i):
        if i == 2:
            raise Killed  # every chunk on disk, but the run did not finish

    with pytest.raises(Killed):
        summarize_catalog(
            products, tmp_path / "out", progress, _extractive_params(), on_chunk_done=kill_after_last_chunk
        )
    (progress / "chunk-00001.parquet").write_bytes(b"truncated")
    summarize_catalog(
        products, tmp_path / "out", progress, _extractive_params(), run_log=tmp_path / "r.jsonl"
    )
    assert json.loads((tmp_path / "r.jsonl").read_text())["resumed_chunks"] == 2
    assert (tmp_path / "out" / "summaries.parquet").read_bytes() == (
        tmp_path / "ref" / "summaries.parquet"
    ).read_bytes()


def test_bad_params(tiny_bart):
    with pytest.raises(ValueError, match="min_length 50 exceeds max_length 8"):
        _bart_params(tiny_bart, min_length=50)


def test_source_text():
    assert (
        source_text("Scarf", ["Silk", "Hand wash."], ["<p>Floral</p>"]) == "Scarf. Silk. Hand wash. Floral."
    )
    assert source_text("Scarf", [], []) == "Scarf"


def test_summarize_stage_wiring(tmp_path, monkeypatch):
    """stages/summarize.py reads params.yaml and products.parquet from the cwd, writes data/summaries/."""
    import runpy

    import yaml

    from cliprec.catalog import CatalogSource, build_catalog

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["setup"] = "demo"
    params["setups"]["demo"]["summarize"] = {"method": "extractive", "max_words": 12, "chunk_size": 4}
    fixture = Path("tests/fixtures/meta_Amazon_Fashion.jsonl").resolve()
    stage = Path("stages/summarize.py").resolve()
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    build_catalog("Amazon_Fashion", CatalogSource("jsonl", path=str(fixture)), "data/ingest/Amazon_Fashion")
    runpy.run_path(str(stage), run_name="stage")["main"](["Amazon_Fashion"])
    products = pd.read_parquet("data/ingest/Amazon_Fashion/products.parquet")
    out = pd.read_parquet("data/summaries/Amazon_Fashion/summaries.parquet")
    assert out["id"].tolist() == products["id"].tolist()
    assert all(len(s.split()) <= 12 for s in out["summary"])
    assert json.loads(Path("data/summaries/Amazon_Fashion/report.json").read_text())["chunks"] == 2
    (run,) = map(json.loads, Path("data/runs/summarize/Amazon_Fashion.jsonl").read_text().splitlines())
    assert run["stage"] == "summarize" and run["resumed_chunks"] == 0  # outside data/summaries and progress
    assert sorted(p.name for p in Path("data/progress/summarize/Amazon_Fashion").glob("chunk-*")) == [
        "chunk-00000.parquet",
        "chunk-00001.parquet",
    ]
