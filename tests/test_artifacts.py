"""cliprec.artifacts: what a manifest says an artefact is, and the one-line errors of its loaders."""

from __future__ import annotations

import json
import shutil

import pytest

from cliprec.artifacts import (
    ArtifactError,
    catalog_identity,
    check_built,
    manifest_sha256,
    sha256_file,
    verify_artifact,
    write_manifest,
)
from cliprec.catalog import CatalogSource, build_catalog

FIXTURE = "tests/fixtures/meta_{category}.jsonl"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """data/ingest/Amazon_Fashion as the ingest stage writes it (from the jsonl fixture)."""
    root = tmp_path_factory.mktemp("ingest")
    build_catalog(
        "Amazon_Fashion",
        CatalogSource("jsonl", path=FIXTURE),
        root / "data" / "ingest" / "Amazon_Fashion",
        seed=0,
    )
    return root / "data" / "ingest" / "Amazon_Fashion"


def test_ingest_writes_a_manifest_that_loaders_verify(ingested):
    manifest = json.loads((ingested / "manifest.json").read_text())
    assert manifest["category"] == "Amazon_Fashion" and set(manifest["files"]) == {"products.parquet"}
    assert catalog_identity(ingested / "products.parquet", "Amazon_Fashion") == {
        "category": "Amazon_Fashion",
        "catalog_sha256": sha256_file(ingested / "products.parquet"),
    }
    assert catalog_identity(ingested / "products.parquet")["category"] == "Amazon_Fashion"


def test_a_truncated_catalog_is_one_line(ingested, tmp_path):
    # it once was a 29-line ArrowInvalid traceback
    copy = tmp_path / "data" / "ingest" / "Amazon_Fashion"
    shutil.copytree(ingested, copy)
    data = (copy / "products.parquet").read_bytes()
    (copy / "products.parquet").write_bytes(data[:1000])
    with pytest.raises(ArtifactError) as e:
        catalog_identity(copy / "products.parquet", "Amazon_Fashion")
    assert str(e.value) == (
        f"{copy}/products.parquet has 1000 bytes, its manifest says {len(data)} (truncated or replaced): "
        "rebuild it with `dvc repro ingest@Amazon_Fashion`"
    )


def test_another_categorys_catalog_is_refused(ingested, tmp_path):
    copy = tmp_path / "data" / "ingest" / "Appliances"
    shutil.copytree(ingested, copy)  # manifest and bytes intact, but Amazon_Fashion's
    with pytest.raises(ArtifactError) as e:
        catalog_identity(copy / "products.parquet", "Appliances")
    assert str(e.value) == (
        f"{copy}/manifest.json was built for category Amazon_Fashion, not Appliances: rebuild it with "
        "`dvc repro ingest@Appliances`"
    )
    (copy / "manifest.json").unlink()
    with pytest.raises(
        ArtifactError, match="Appliances/manifest.json is missing: rebuild it with `dvc repro"
    ):
        catalog_identity(copy / "products.parquet", "Appliances")
    write_manifest(copy, ["products.parquet"], {})  # an older cliprec's: it says no category
    with pytest.raises(ArtifactError, match="manifest.json records no category .*ingest@Appliances"):
        catalog_identity(copy / "products.parquet")


def test_check_built_names_the_mismatch(tmp_path):
    where = tmp_path / "data" / "embed" / "Appliances" / "lora"
    where.mkdir(parents=True)
    (where / "ids.txt").write_text("a\n")
    built = {"category": "Appliances", "variant": "lora", "adapter_sha256": "a" * 64}
    write_manifest(where, ["ids.txt"], built)
    assert verify_artifact(where, built)["variant"] == "lora"
    rebuild = "rebuild it with `dvc repro embed_lora@Appliances`"
    cases = {
        "variant": ("zeroshot", f"was built for variant lora, not zeroshot: {rebuild}"),
        "adapter_sha256": ("b" * 64, "was not built from the current LoRA adapter (sha256 aaaaaaaaaaaa "
                           f"recorded, bbbbbbbbbbbb now): {rebuild}"),
        "embeddings_sha256": ("c" * 64, f"records no embeddings (built by an older cliprec?): {rebuild}"),
    }  # fmt: skip
    for key, (want, message) in cases.items():
        with pytest.raises(ArtifactError) as e:
            check_built(where, json.loads((where / "manifest.json").read_text()), {key: want})
        assert str(e.value) == f"{where}/manifest.json {message}"
    assert manifest_sha256(where) == sha256_file(where / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        manifest_sha256(tmp_path)
