"""The demo's shopper queries: written from the world's hidden attributes, judged from them.

The synthetic world knows every product's type, colour, pattern, material and brand (the truth file that
`synthetic.generate_catalog` writes beside the raw catalog). A shopper is drawn for a product of the
catalog (any split: a shopper does not know the split) and writes what they want the way shoppers write
it, in words the listings do not use (shoppers.json): a need or occasion instead of the product type
("something warm for winter walks"), everyday colour words ("dark blue" for navy), sometimes a pattern,
a material or a negation ("not wool"), a brand, who it is for ("for my mum"), and typos. Some queries are
a photo of the product instead, or a photo plus a few words: the world's own renderer draws the product
in another pose on a room-like background (never one of the catalog's shots).

Every query states what it wants (`Wants`: the type always, and what the words or the photo say: a photo
shows the colour and the pattern). Its relevance, for every product of the catalog (`grade`):
    3  the product it was written from
    2  same type, and every stated attribute (colour, pattern, material, brand), not the negated material
    1  same type and the stated colour, not the negated material, but another stated attribute differs
       (only when a colour is stated: a colour-less query would otherwise judge a whole type relevant)
    0  everything else (left out of `relevant`)
Deterministic: the same seed, category and catalog give the same queries and photos, byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from cliprec_worlds.demo.synthetic import (
    IMAGE_SIZE,
    TRUTH_FILE,
    Pose,
    category_vocab,
    look_of,
    read_truth,
    render,
    stable_rng,
)

PHOTO_SHARE = 0.25  # queries that are a photo alone
PHOTO_TEXT_SHARE = 0.15  # a photo and a few words
PHOTO_QUALITY = 85  # a phone's JPEG, not the catalog's
__all__ = ["TRUTH_FILE", "Wants", "draw_photo", "generate_queries", "grade", "misspell", "write_query"]
TRAITS = ("need", "brand", "negation", "misspelling", "recipient", "pattern", "material", "photo")


@cache
def _words() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "shoppers.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Wants:
    """What a query asks for: the product type always, the rest where its words or photo say it."""

    type: str
    colour: str | None = None
    pattern: str | None = None
    material: str | None = None
    not_material: str | None = None
    brand: str | None = None


def grade(wants: Wants, product: dict[str, Any], source: str) -> int:
    """The relevance (0-3) of a product (a truth record) to a query written from product `source`."""
    if product["parent_asin"] == source:
        return 3
    if product["type"] != wants.type or product["material"] == wants.not_material:
        return 0
    if wants.colour is not None and product["colour"] != wants.colour:
        return 0
    if all(getattr(wants, k) in (None, product[k]) for k in ("pattern", "material", "brand")):
        return 2
    return 1 if wants.colour is not None else 0


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _type_words(category: str, type_key: str) -> dict[str, list[str]]:
    """A type's everyday names and needs; a category without hand-written ones uses its listing names."""
    words = _words()
    spec = words["categories"].get(category, {}).get("types", {}).get(type_key)
    if spec is not None:
        return spec
    ptype = next(t for t in category_vocab(category).types if t.key == type_key)
    return {"words": [n.lower() for n in ptype.names[:2]], "needs": words["generic"]["needs"]}


def _other_material(category: str, truth: dict[str, Any], rng: np.random.Generator) -> str | None:
    """A material this type comes in that the product is not made of (what a negation names)."""
    vocab = category_vocab(category)
    ptype = next(t for t in vocab.types if t.key == truth["type"])
    options = ptype.materials or vocab.general_materials or list(vocab.materials)
    others = [m for m in options if m != truth["material"] and m in _words()["material_words"]]
    return _pick(rng, others) if others else None


def misspell(word: str, rng: np.random.Generator) -> str:
    """One typo in a word: two letters swapped, one dropped or one doubled (first letter kept)."""
    i = int(rng.integers(1, len(word) - 1))
    how = int(rng.integers(3))
    if how == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if how == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def _typo(text: str, protect: str | None, rng: np.random.Generator) -> str:
    """The text with one of its longer words misspelt (never the brand)."""
    words = text.split(" ")
    spots = [
        i for i, w in enumerate(words) if re.fullmatch(r"[a-z]{5,}", w) and (not protect or w not in protect)
    ]
    if not spots:
        return text
    i = _pick(rng, spots)
    words[i] = misspell(words[i], rng)
    return " ".join(words)


def _plural(noun: str) -> bool:
    """Whether an English product noun is plural (socks, trousers; not dress)."""
    return noun.endswith("s") and not noun.endswith("ss")


@dataclass
class _Draft:
    """A query being written: its parts, what it wants, what it shows."""

    wants: Wants
    parts: list[str]
    traits: set[str]


def _describe(category: str, truth: dict[str, Any], rng: np.random.Generator) -> _Draft:
    """A text query's head and its attributes, each stated with its own chance."""
    words, tw = _words(), _type_words(category, truth["type"])
    use_need = bool(rng.random() < 0.45)
    colour = bool(rng.random() < 0.85)
    pattern = bool(rng.random() < (0.4 if truth["pattern"] != "solid" else 0.1))
    wants = Wants(type=truth["type"])
    colour_word = _pick(rng, words["colour_words"][truth["colour"]])
    head = _pick(rng, tw["needs"]) if use_need else _pick(rng, tw["words"])
    if colour or not pattern:  # a query states a colour or a pattern: else it would want a whole type
        wants = replace(wants, colour=truth["colour"])
        head = f"{head}, {colour_word}" if use_need else f"{colour_word} {head}"
    opener = _pick(rng, words["openers"])
    if opener and not use_need and not _plural(head.split()[-1]):
        head = f"{'an' if head[0] in 'aeiou' else 'a'} {head}"
    draft = _Draft(wants, [f"{opener} {head}".strip()], set())
    if use_need:
        draft.traits.add("need")
    if pattern:
        draft.wants = replace(draft.wants, pattern=truth["pattern"])
        draft.parts.append(_pick(rng, words["pattern_words"][truth["pattern"]]))
        draft.traits.add("pattern")
    return draft


def _constrain(draft: _Draft, category: str, truth: dict[str, Any], rng: np.random.Generator) -> None:
    """Add a material, a negation, a brand, a recipient, each with its own chance."""
    words = _words()
    material_word = words["material_words"].get(truth["material"])
    if material_word and rng.random() < 0.15:
        draft.wants = replace(draft.wants, material=truth["material"])
        draft.parts.append(f"in {material_word}")
        draft.traits.add("material")
    elif rng.random() < 0.18 and (other := _other_material(category, truth, rng)):
        draft.wants = replace(draft.wants, not_material=other)
        draft.parts.append(_pick(rng, words["negations"]).format(m=words["material_words"][other]))
        draft.traits.add("negation")
    if rng.random() < 0.2:
        draft.wants = replace(draft.wants, brand=truth["brand"])
        draft.parts.append(_pick(rng, words["brand_phrases"]).format(b=truth["brand"]))
        draft.traits.add("brand")
    if rng.random() < 0.15:
        recipients = words["categories"].get(category, words["generic"])["recipients"]
        draft.parts.append(_pick(rng, recipients))
        draft.traits.add("recipient")


def _photo_words(draft: _Draft, category: str, truth: dict[str, Any], rng: np.random.Generator) -> str:
    """The few words that come with a photo: none to add, a negation or a brand."""
    words = _words()
    roll = rng.random()
    other = _other_material(category, truth, rng)
    if roll < 0.3 and other:
        draft.wants = replace(draft.wants, not_material=other)
        draft.traits.add("negation")
        neg = _pick(rng, words["negations"]).format(m=words["material_words"][other])
        return _pick(rng, words["photo_constraint_texts"]["negation"]).format(neg=neg)
    if roll < 0.55:
        draft.wants = replace(draft.wants, brand=truth["brand"])
        draft.traits.add("brand")
        brand = _pick(rng, words["brand_phrases"]).format(b=truth["brand"])
        return _pick(rng, words["photo_constraint_texts"]["brand"]).format(brand=brand)
    return _pick(rng, words["photo_texts"])


def draw_photo(truth: dict[str, Any], rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A shopper's photo of the product: another pose, on a wall-and-table background, a little soft."""
    wall = rng.integers(70, 215, size=3)
    table = rng.integers(40, 170, size=3)
    horizon = int(rng.integers(int(size * 0.55), int(size * 0.8)))
    bg = np.empty((size, size, 3), dtype=np.float32)
    bg[:horizon], bg[horizon:] = wall, table
    bg += rng.normal(0.0, 6.0, size=bg.shape).astype(np.float32)
    pose = Pose(
        scale=float(rng.uniform(0.5, 0.75)),
        angle=float(rng.uniform(10, 45)) * (1 if rng.random() < 0.5 else -1),
        offset=(float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15))),
        flip=bool(rng.random() < 0.5),
    )
    img = render(truth["shape"], look_of(truth), pose, size, np.clip(bg, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(0.7))


def write_query(
    category: str, truth: dict[str, Any], rng: np.random.Generator
) -> tuple[str | None, bool, _Draft]:
    """(text, with a photo, draft) of one shopper's query for the product `truth` describes."""
    roll = rng.random()
    if roll < PHOTO_SHARE + PHOTO_TEXT_SHARE:  # the photo shows the colour and the pattern
        draft = _Draft(Wants(truth["type"], colour=truth["colour"], pattern=truth["pattern"]), [], {"photo"})
        text = _photo_words(draft, category, truth, rng) if roll >= PHOTO_SHARE else None
        return text, True, draft
    draft = _describe(category, truth, rng)
    _constrain(draft, category, truth, rng)
    text = ", ".join(draft.parts)
    if rng.random() < 0.2:
        typo = _typo(text, truth["brand"].lower(), rng)
        if typo != text:
            text = typo
            draft.traits.add("misspelling")
    return text, False, draft


def _judge(wants: Wants, source: str, same_type: list[dict[str, Any]]) -> dict[str, int]:
    """{product id: grade} of the query over the catalog's products of its type (grade >= 1 only)."""
    graded = {p["parent_asin"]: grade(wants, p, source) for p in same_type}
    return {pid: g for pid, g in sorted(graded.items()) if g > 0}


def generate_queries(
    category: str, catalog_ids: Sequence[str], raw_dir: Path, n_queries: int, seed: int, out_dir: Path
) -> tuple[Path, dict[str, list[str]]]:
    """Write out_dir/queries.jsonl (cliprec.queries' schema) + photos/; return it and each query's traits.

    `catalog_ids`: the products ingest kept (queries are written from and judged over these only);
    `raw_dir`: where generate_catalog wrote the truth file. Photo paths are relative to out_dir.
    """
    truth = read_truth(raw_dir, category)
    products = [truth[pid] for pid in sorted(catalog_ids) if pid in truth]
    if not products:
        raise ValueError(f"shoppers {category}: no product of the catalog is in the world's truth file")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for p in products:
        by_type.setdefault(p["type"], []).append(p)
    (out_dir / "photos").mkdir(parents=True, exist_ok=True)
    lines, traits = [], {}
    for i in range(n_queries):
        rng = stable_rng(seed, category, "shopper", i)
        source = products[int(rng.integers(len(products)))]
        qid = f"{category}-q{i:04d}"
        text, photo, draft = write_query(category, source, rng)
        image = None
        if photo:
            image = f"photos/{qid}.jpg"
            draw_photo(source, rng).save(out_dir / image, "JPEG", quality=PHOTO_QUALITY)
        relevant = _judge(draft.wants, source["parent_asin"], by_type[source["type"]])
        lines.append(json.dumps({"query_id": qid, "text": text, "image": image, "relevant": relevant}))
        traits[qid] = sorted(draft.traits)
    path = out_dir / "queries.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path, traits
