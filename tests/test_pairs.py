"""cliprec.pairs: streamed (summary, photo) pairs read back exactly what the image shards hold."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import make_catalog, make_clip

from cliprec.errors import CliprecError
from cliprec.model import decode_pixels, load_clip
from cliprec.pairs import load_pairs, prefetch
from cliprec.shards import read_image_table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"clip": make_clip(root / "clip"), **make_catalog(root / "data")}


def test_pairs_hold_the_splits_photos_and_summaries(tiny):
    _, processor = load_clip(tiny["clip"], device="cpu")
    pairs = load_pairs(tiny["products"], tiny["summaries"], tiny["images"])
    products = pd.read_parquet(tiny["products"])
    summaries = pd.read_parquet(tiny["summaries"]).set_index("id")["summary"]
    shards = read_image_table(tiny["images"]).set_index(["id", "view"])["jpeg"]
    try:
        for split, data in pairs.items():
            want = [i for i in products.loc[products["split"] == split, "id"] if (i, "main") in shards.index]
            assert data.ids == want and data.texts == [summaries[i] for i in want]
            n = len(data)
            slots = list(range(n))
            assert torch.equal(
                data.pixels(slots, processor), decode_pixels(processor, [shards[(i, "main")] for i in want])
            )
            with_alt = [k for k, i in enumerate(want) if (i, "alt") in shards.index]
            if split == "train":
                assert [k for k in range(n) if data.alt_slot[k] >= 0] == with_alt
                alt = [n + int(data.alt_slot[k]) for k in with_alt]
                expect = decode_pixels(processor, [shards[(want[k], "alt")] for k in with_alt])
                assert torch.equal(data.pixels(alt, processor), expect)
            else:
                assert bool((data.alt_slot < 0).all())  # val is scored on MAIN only
            ids, mask = data.tokens([0, 2], processor, 64)
            assert ids.shape == mask.shape and ids.shape[0] == 2
        assert "P0005" not in pairs["val"].ids  # a val product without a photo is skipped
    finally:
        spool = pairs["train"].main.path
        for data in pairs.values():
            data.close()
    assert not spool.exists()


def test_digest_follows_the_texts(tiny, tmp_path):
    one = load_pairs(tiny["products"], tiny["summaries"], tiny["images"], splits=("val",))["val"]
    summaries = pd.read_parquet(tiny["summaries"])
    summaries.loc[1, "summary"] += " (edited)"
    edited = tmp_path / "summaries.parquet"
    summaries.to_parquet(edited)
    two = load_pairs(tiny["products"], edited, tiny["images"], splits=("val",))["val"]
    assert one.digest != two.digest
    one.close()
    two.close()


def test_shards_out_of_products_order_are_refused(tiny, tmp_path):
    products = pd.read_parquet(tiny["products"])
    flipped = tmp_path / "products.parquet"
    products.iloc[::-1].to_parquet(flipped)
    with pytest.raises(CliprecError, match="not in products.parquet order"):
        load_pairs(flipped, tiny["summaries"], tiny["images"])


def test_prefetch_keeps_order():
    assert list(prefetch(lambda x: x * x, range(20), workers=3, depth=2)) == [x * x for x in range(20)]
