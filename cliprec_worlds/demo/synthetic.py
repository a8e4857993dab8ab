"""Offline demo catalog in the exact Amazon Reviews 2023 item-metadata schema, with drawn product images.

Every product is a combination of attributes (product type, colour, secondary colour, pattern, material,
brand) that shows in BOTH its images (silhouette, fill, pattern, texture, brand mark) and its text (title,
features, description, details), with realistic noise on the text side. So a retrieval model can learn
the catalog, while a generic model only gets part of the way. A small, counted fraction of records is
defective the way real dumps are (no title, no images, duplicate parent_asin, a malformed line), so the
ingest report exercises every drop reason. Same seed -> byte-identical JSONL and JPEGs.

The drawing primitives (`PALETTE`, `Look`, `Pose`, `render`, `SHAPE_SPECS`) are shared with
cliprec_worlds.demo_clip, which pre-trains the demo CLIP on generic shapes drawn the same way. The tables
are data next to this module: drawing.json (palette, patterns, textures, shapes, brand-mark colours) and
vocabulary.json (colour names, the hand-written vocabularies of Amazon_Fashion and Appliances, and what a
category without one draws on).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_SIZE = 224  # what the images stage stores (params images.side): it then re-encodes without resampling
JPEG_QUALITY = 90
POOL_MIN_JOBS = 200  # below this, starting worker processes costs more than it saves
DEFECT_KINDS = ("no_title", "no_image", "duplicate_id", "malformed_line")

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------------------
# Drawing (shared with demo_clip). Everything is defined in the object's unit square, so a product keeps
# its pattern, texture and brand mark whatever the pose of the shot.

_HERE = Path(__file__).parent


def _table(name: str) -> dict[str, Any]:
    """One of the JSON tables next to this module (drawing.json, vocabulary.json)."""
    return json.loads((_HERE / name).read_text(encoding="utf-8"))


_DRAWING = _table("drawing.json")
PALETTE: dict[str, RGB] = {name: tuple(rgb) for name, rgb in _DRAWING["palette"].items()}
# the colour words of a generic captioner; catalog colours outside this set are new words to the demo CLIP
BASIC_COLOURS: tuple[str, ...] = tuple(_DRAWING["basic_colours"])
PATTERNS: tuple[str, ...] = tuple(_DRAWING["patterns"])
TEXTURES: tuple[str, ...] = tuple(_DRAWING["textures"])
MARK_STYLES: tuple[str, ...] = tuple(_DRAWING["mark_styles"])
REF = 256.0  # pattern periods are in pixels of a 256-px object box, so patterns scale with the object

# Shapes (drawing.json `shapes`) are in the unit square, one op per ";" of `ops`: `poly x y x y ...`,
# `ell x0 y0 x1 y1`, `rect x0 y0 x1 y1 [radius]`, `pie x0 y0 x1 y1 start end` (degrees),
# `ring x0 y0 x1 y1 width`, `line x0 y0 x1 y1 width`; a leading "-" cuts a hole (windows, slots, seams).
# `mark_at` is where the brand mark sits. Products, generic products, then the geometric shapes of the
# demo CLIP's generic pre-training (never a product).
SHAPE_SPECS: dict[str, tuple[str, tuple[float, float]]] = {
    name: (spec["ops"], tuple(spec["mark_at"])) for name, spec in _DRAWING["shapes"].items()
}
GEOMETRIC_SHAPES: tuple[str, ...] = tuple(_DRAWING["geometric_shapes"])


def _arc(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int
) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(a0, a1, n)]


def _op_polygons(kind: str, v: list[float]) -> list[tuple[bool, list[tuple[float, float]]]]:
    """One spec op as (keep, polygon) pairs in unit coordinates."""
    if kind == "poly":
        return [(True, list(zip(v[::2], v[1::2], strict=True)))]
    x0, y0, x1, y1 = v[:4]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "ell":
        return [(True, _arc(cx, cy, rx, ry, 0, 2 * math.pi, 48))]
    if kind == "ring":
        w = v[4]
        return [
            (True, _arc(cx, cy, rx, ry, 0, 2 * math.pi, 48)),
            (False, _arc(cx, cy, rx - w, ry - w, 0, 2 * math.pi, 48)),
        ]
    if kind == "pie":
        return [(True, [(cx, cy), *_arc(cx, cy, rx, ry, math.radians(v[4]), math.radians(v[5]), 32)])]
    if kind == "rect":
        r = v[4] if len(v) > 4 else 0.0
        if r <= 0:
            return [(True, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])]
        pts = (
            _arc(x1 - r, y0 + r, r, r, -math.pi / 2, 0, 6)
            + _arc(x1 - r, y1 - r, r, r, 0, math.pi / 2, 6)
            + _arc(x0 + r, y1 - r, r, r, math.pi / 2, math.pi, 6)
            + _arc(x0 + r, y0 + r, r, r, math.pi, 1.5 * math.pi, 6)
        )
        return [(True, pts)]
    if kind == "line":
        w = v[4] / 2
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy) or 1.0
        ox, oy = -dy / n * w, dx / n * w
        return [(True, [(x0 + ox, y0 + oy), (x1 + ox, y1 + oy), (x1 - ox, y1 - oy), (x0 - ox, y0 - oy)])]
    raise ValueError(f"unknown shape op {kind!r}")


@cache
def shape_polygons(shape: str) -> tuple[tuple[bool, np.ndarray], ...]:
    """The shape as (keep, Nx2 unit-coordinate polygon) pairs, drawn in order."""
    if shape not in SHAPE_SPECS:
        raise ValueError(f"unknown shape {shape!r}")
    out = []
    for op in SHAPE_SPECS[shape][0].split(";"):
        kind, *nums = op.split()
        cut = kind.startswith("-")
        for keep, pts in _op_polygons(kind.lstrip("-"), [float(x) for x in nums]):
            out.append((keep and not cut, np.asarray(pts, dtype=np.float64)))
    return tuple(out)


@dataclass(frozen=True)
class Mark:
    """A brand's visual signature on its products: a coloured badge, dot, band or corner."""

    colour: RGB
    style: str


@dataclass(frozen=True)
class Look:
    """How an object is painted: fill pattern, material texture, brand mark (all in object coordinates)."""

    primary: RGB
    secondary: RGB = (255, 255, 255)
    pattern: str = "solid"
    period: float = 26.0  # pattern period in REF pixels
    phase: tuple[float, float] = (0.0, 0.0)
    texture: str = "flat"
    mark: Mark | None = None
    texture_seed: int = 0  # same seed -> same texture in every shot of a product


@dataclass(frozen=True)
class Pose:
    """Where the object's unit square lands on the canvas: size, rotation (degrees), offset, mirror."""

    scale: float = 0.9
    angle: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)  # fraction of the canvas
    flip: bool = False


def _to_canvas(pts: np.ndarray, pose: Pose, size: int) -> list[tuple[float, float]]:
    u = 1.0 - pts[:, 0] if pose.flip else pts[:, 0]
    lx, ly = (u - 0.5) * pose.scale * size, (pts[:, 1] - 0.5) * pose.scale * size
    a = math.radians(pose.angle)
    c, s = math.cos(a), math.sin(a)
    cx, cy = size * (0.5 + pose.offset[0]), size * (0.5 + pose.offset[1])
    return list(zip((cx + c * lx - s * ly).tolist(), (cy + s * lx + c * ly).tolist(), strict=True))


@cache
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _object_coords(pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit object coordinates (u, v) of every canvas pixel centre (inverse of `_to_canvas`)."""
    yy, xx = _pixel_centres(size)
    dx, dy = xx - size * (0.5 + pose.offset[0]), yy - size * (0.5 + pose.offset[1])
    a = math.radians(pose.angle)
    c, s = math.cos(a), math.sin(a)
    k = 1.0 / (pose.scale * size)
    u, v = (c * dx + s * dy) * k + 0.5, (-s * dx + c * dy) * k + 0.5
    return (1.0 - u if pose.flip else u), v


def shape_mask(shape: str, pose: Pose, size: int) -> Image.Image:
    """L-mode silhouette (255 = object) of a named shape in a pose."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for keep, pts in shape_polygons(shape):
        draw.polygon(_to_canvas(pts, pose, size), fill=255 if keep else 0)
    return img


def _mod(a: np.ndarray, p: float) -> np.ndarray:
    # numpy's float % is ~10x slower than this on large arrays
    p = np.float32(p)
    return a - p * np.floor(a * (1 / p))


def pattern_mask(pattern: str, pu: np.ndarray, pv: np.ndarray, period: float) -> np.ndarray | None:
    """Where the secondary colour goes, from pattern coordinates in REF pixels (None = solid)."""
    p = float(period)
    if pattern == "solid":
        return None
    if pattern == "stripes":
        return _mod(pv, p) < p * 0.45
    if pattern == "dots":
        return (_mod(pu, p) - p / 2) ** 2 + (_mod(pv, p) - p / 2) ** 2 < (p * 0.26) ** 2
    if pattern == "checks":
        return _mod(np.floor(pu * (1 / p)) + np.floor(pv * (1 / p)), 2) == 1
    if pattern == "zigzag":
        tri = np.abs(_mod(pu, p) - p / 2)
        return _mod(pv + tri, p) < p * 0.35
    if pattern == "floral":
        cx, cy = _mod(pu, p) - p / 2, _mod(pv, p) - p / 2
        r2, d = (p * 0.16) ** 2, p * 0.26
        sel = np.zeros(pu.shape, dtype=bool)
        for k in range(5):
            a = 2 * math.pi * k / 5
            sel |= (cx - d * math.cos(a)) ** 2 + (cy - d * math.sin(a)) ** 2 < r2
        return sel
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray | None:
    """Brightness multiplier of a material, in object coordinates (None = flat)."""
    rng = np.random.default_rng(seed)
    n = 256
    iu, iv = np.clip(u * n, 0, n - 1).astype(np.intp), np.clip(v * n, 0, n - 1).astype(np.intp)
    if texture in ("flat", "glass"):
        return None
    if texture == "fine":
        return 0.94 + 0.12 * rng.random(u.shape, dtype=np.float32)
    if texture == "twill":
        return 1.0 + 0.1 * np.sin((u + v) * (2 * math.pi * n / 5.0))
    if texture == "gloss":
        cu, cv = rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.4)
        return 1.0 + 0.45 * np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * 0.12**2))
    if texture == "coarse":
        field = Image.fromarray((rng.random((12, 12)) * 255).astype(np.uint8)).resize((n, n), Image.BILINEAR)
        return 0.8 + 0.4 * np.asarray(field, dtype=np.float32)[iv, iu] / 255.0
    if texture == "slub":
        rows, cols = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
        return 0.9 + 0.1 * (rows[iv] + cols[iu])
    if texture == "sheen":
        return 1.0 + 0.22 * np.sin(u * (2 * math.pi / 0.45) + rng.uniform(0, 6.3))
    if texture == "brushed":
        rows = rng.random(n, dtype=np.float32)
        return 0.88 + 0.2 * rows[iv] + 0.15 * (1.0 - v)
    if texture == "grain":
        return 1.0 + 0.12 * np.sin((v * n + 6 * np.sin(u * n / 17.0)) * (2 * math.pi / 9.0))
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _mark_mask(mark: Mark, label: tuple[float, float], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    du, dv, s = u - label[0], v - label[1], 0.075
    if mark.style == "badge":
        return (np.abs(du) < s) & (np.abs(dv) < s) & (du**2 + dv**2 > (0.4 * s) ** 2)
    if mark.style == "dot":
        return du**2 + dv**2 < s**2
    if mark.style == "band":
        return np.abs(dv) < 0.45 * s
    if mark.style == "corner":
        return (np.abs(du) < s) & (np.abs(dv) < s) & (du - dv > 0)
    raise ValueError(f"unknown mark style {mark.style!r}; expected one of {MARK_STYLES}")


_HEART = (250, 220, 60)


def render(
    shape: str, look: Look, pose: Pose, size: int, background: RGB | np.ndarray, shadow: bool = True
) -> Image.Image:
    """Draw one shot: the shaped, patterned, textured, branded object in a pose over a background."""
    u, v = _object_coords(pose, size)
    # paint by layer index into a small colour table: cheaper than writing RGB through boolean masks
    layer = np.zeros((size, size), dtype=np.uint8)
    pu, pv = u * REF + look.phase[1], v * REF + look.phase[0]
    sel = pattern_mask(look.pattern, pu, pv, look.period)
    if sel is not None:
        layer[sel] = 1
    if look.pattern == "floral":  # flower hearts, so that floral does not read as dots
        p = look.period
        layer[(_mod(pu, p) - p / 2) ** 2 + (_mod(pv, p) - p / 2) ** 2 < (p * 0.1) ** 2] = 2
    if look.mark is not None:
        layer[_mark_mask(look.mark, SHAPE_SPECS[shape][1], u, v)] = 3
    fill = Image.frombytes("P", (size, size), layer.tobytes())
    fill.putpalette([*look.primary, *look.secondary, *_HEART, *(look.mark.colour if look.mark else _HEART)])
    fill = fill.convert("RGB")
    m = _texture(look.texture, u, v, look.texture_seed)
    if m is not None:
        fill = Image.fromarray(np.clip(np.asarray(fill) * m[..., None], 0, 255).astype(np.uint8), "RGB")
    if isinstance(background, np.ndarray):
        canvas = Image.fromarray(background, "RGB")
    else:
        canvas = Image.new("RGB", (size, size), background)
    mask = shape_mask(shape, pose, size)
    if shadow:  # a soft drop shadow keeps white objects visible on white, as in studio shots
        d = max(1, size // 64)
        shade = Image.new("L", (size, size), 0)
        shade.paste(mask, (d, d))
        shade = shade.filter(ImageFilter.BoxBlur(max(1, size // 96))).point(lambda x: x * 2 // 5)
        canvas = Image.composite(Image.new("RGB", (size, size), 0), canvas, shade)
    if look.texture == "glass":  # see-through
        mask = mask.point(lambda x: x * 4 // 5)
    return Image.composite(fill, canvas, mask)


def gradient_background(size: int, top: RGB, bottom: RGB) -> np.ndarray:
    """Vertical two-colour gradient, HxWx3 uint8."""
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    col = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(col, (size, size, 3)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------
# Category vocabularies


@dataclass
class ProductType:
    """A product type: its drawn silhouette, the names sellers give it, and its price range."""

    key: str
    shape: str
    names: list[str]
    price: tuple[float, float]
    materials: list[str] | None = None  # None = the category's list


@dataclass
class CategoryVocab:
    """Everything the generator draws on for one category."""

    name: str
    main_categories: list[tuple[str, float]]
    types: list[ProductType]
    colours: list[str]
    colour_names: dict[str, list[str]]
    pattern_weights: dict[str, float]
    pattern_names: dict[str, list[str]]
    materials: dict[str, tuple[list[str], str]]  # key -> (names, texture)
    brands: list[str]
    fillers: list[str]
    feature_pool: list[str]
    sentences: list[str]
    category_paths: list[list[str]]
    audiences: list[str] = field(default_factory=list)
    general_materials: list[str] | None = None  # materials of types without their own list (None = all)


_VOCABULARY = _table("vocabulary.json")
COLOUR_NAMES: dict[str, list[str]] = _VOCABULARY["colour_names"]


def _vocab(spec: dict[str, Any]) -> CategoryVocab:
    """A hand-written vocabulary of vocabulary.json (JSON's pairs become the dataclasses' tuples)."""
    fields = {**spec, "colour_names": COLOUR_NAMES}
    fields["main_categories"] = [tuple(m) for m in spec["main_categories"]]
    fields["types"] = [ProductType(**{**t, "price": tuple(t["price"])}) for t in spec["types"]]
    fields["materials"] = {k: (names, texture) for k, (names, texture) in spec["materials"].items()}
    return CategoryVocab(**fields)


FASHION = _vocab(_VOCABULARY["categories"]["Amazon_Fashion"])
APPLIANCES = _vocab(_VOCABULARY["categories"]["Appliances"])
_GENERIC = _VOCABULARY["generic"]  # what a category without a hand-written vocabulary draws on
_GENERIC_TYPES: dict[str, list[str]] = _GENERIC["types"]
_SYLLABLES: list[str] = _GENERIC["brand_syllables"]
_MONTHS: list[str] = _VOCABULARY["months"]


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def stable_rng(*parts: object) -> np.random.Generator:
    """A generator seeded from the parts' sha256, so it is stable across processes and platforms."""
    return np.random.default_rng(_stable_int(*parts))


def _generic_vocab(category: str) -> CategoryVocab:
    """A deterministic vocabulary for a category without a hand-written one."""
    rng = stable_rng("vocab", category)
    label = category.replace("_and_", " & ").replace("_", " ")
    words = [w for w in label.replace("&", " ").split() if w]
    keys = list(_GENERIC_TYPES)
    chosen = [keys[i] for i in sorted(rng.choice(len(keys), size=10, replace=False))]
    types = [
        ProductType(
            k,
            k,
            [f"{words[-1]} {n}" if rng.random() < 0.3 else n for n in _GENERIC_TYPES[k]],
            (float(lo := rng.integers(5, 40)), float(lo * rng.integers(2, 6))),
        )
        for k in chosen
    ]
    brands = []
    while len(brands) < 12:
        b = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
        if b not in brands:
            brands.append(b)
    colours = [c for c in PALETTE if rng.random() < 0.7] or list(BASIC_COLOURS)
    return CategoryVocab(
        name=category,
        main_categories=[(label, 1.0)],
        types=types,
        colours=colours,
        colour_names=COLOUR_NAMES,
        pattern_weights=dict(_GENERIC["pattern_weights"]),
        pattern_names=FASHION.pattern_names,
        materials={k: (names, texture) for k, (names, texture) in _GENERIC["materials"].items()},
        brands=brands,
        fillers=list(_GENERIC["fillers"]),
        feature_pool=list(_GENERIC["feature_pool"]),
        sentences=[s.format(label=label.lower()) for s in _GENERIC["sentences"]],
        category_paths=[[label], [label, words[0]]],
    )


VOCABS = {"Amazon_Fashion": FASHION, "Appliances": APPLIANCES}


def category_vocab(category: str) -> CategoryVocab:
    """The hand-written vocabulary of Amazon_Fashion / Appliances, else a generated one."""
    return VOCABS.get(category) or _generic_vocab(category)


_BRAND_MARK_COLOURS: list[RGB] = [tuple(rgb) for rgb in _DRAWING["brand_mark_colours"]]


def brand_mark(brand: str) -> Mark:
    """A brand's logo colour and style, fixed by the brand name."""
    h = _stable_int("brand", brand)
    return Mark(_BRAND_MARK_COLOURS[h % len(_BRAND_MARK_COLOURS)], MARK_STYLES[(h >> 8) % len(MARK_STYLES)])


# --------------------------------------------------------------------------------------------------------
# Products


@dataclass
class Product:
    """The attributes a product is drawn and described from."""

    ptype: ProductType
    colour: str
    secondary: str
    pattern: str
    material: str
    brand: str
    look: Look


def _pick(rng: np.random.Generator, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def luma(c: RGB) -> float:
    """Perceived brightness of an RGB colour (0-255)."""
    return 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]


def _sample_product(vocab: CategoryVocab, rng: np.random.Generator) -> Product:
    ptype = _pick(rng, vocab.types)
    colour = _pick(rng, vocab.colours)
    # a secondary colour that reads against the primary one
    contrasting = [c for c in PALETTE if abs(luma(PALETTE[c]) - luma(PALETTE[colour])) > 60]
    secondary = _pick(rng, contrasting)
    patterns = list(vocab.pattern_weights)
    w = np.asarray([vocab.pattern_weights[p] for p in patterns])
    pattern = patterns[int(rng.choice(len(patterns), p=w / w.sum()))]
    material = _pick(rng, ptype.materials or vocab.general_materials or list(vocab.materials))
    brand = _pick(rng, vocab.brands)
    look = Look(
        primary=PALETTE[colour],
        secondary=PALETTE[secondary],
        pattern=pattern,
        period=float(rng.uniform(20, 34)),
        phase=(float(rng.uniform(0, 40)), float(rng.uniform(0, 40))),
        texture=vocab.materials[material][1],
        mark=brand_mark(brand),
        texture_seed=int(rng.integers(2**31)),
    )
    return Product(ptype, colour, secondary, pattern, material, brand, look)


def render_views(
    shape: str, look: Look, rng: np.random.Generator, n_views: int, size: int = IMAGE_SIZE
) -> list[Image.Image]:
    """MAIN (studio shot: centred, white) plus alternative shots (other pose, scale, background)."""
    main_bg = (255, 255, 255) if rng.random() < 0.85 else (238, 238, 238)
    views = [render(shape, look, Pose(scale=float(rng.uniform(0.86, 0.96))), size, main_bg)]
    for _ in range(n_views - 1):
        pastel = tuple(int(v) for v in rng.integers(185, 250, size=3))
        if rng.random() < 0.5:
            bg: RGB | np.ndarray = gradient_background(size, pastel, tuple(int(v * 0.8) for v in pastel))
        else:
            bg = pastel if rng.random() < 0.7 else (255, 255, 255)
        pose = Pose(
            scale=float(rng.uniform(0.55, 0.8)),
            angle=float(rng.uniform(8, 35)) * (1 if rng.random() < 0.5 else -1),
            offset=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12))),
            flip=bool(rng.random() < 0.5),
        )
        views.append(render(shape, look, pose, size, bg))
    return views


def _render_job(job: tuple[int, int, str, str, Look, list[str], int]) -> None:
    """Draw and save one product's shots (runs in a worker process; its own RNG keeps it deterministic)."""
    seed, index, category, shape, look, paths, size = job
    rng = stable_rng(seed, category, "image", index)
    for img, path in zip(render_views(shape, look, rng, len(paths), size), paths, strict=True):
        img.save(path, "JPEG", quality=JPEG_QUALITY)


def _maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _title(product: Product, vocab: CategoryVocab, rng: np.random.Generator, audience: str | None) -> str:
    colour = _pick(rng, vocab.colour_names[product.colour])
    if product.pattern != "solid" and _maybe(rng, 0.35):
        colour = f"{colour} and {_pick(rng, vocab.colour_names[product.secondary])}"
    core: list[str] = []
    if product.pattern != "solid" or _maybe(rng, 0.3):
        core.append(_pick(rng, vocab.pattern_names[product.pattern]))
    if _maybe(rng, 0.55):
        core.append(_pick(rng, vocab.materials[product.material][0]))
    core.append(_pick(rng, product.ptype.names))
    # the colour leads the noun phrase, trails the title ("... - Navy Blue"), or is missing from it
    placement = rng.random()
    if placement < 0.55:
        core.insert(0, colour)
    head = [product.brand.upper() if _maybe(rng, 0.1) else product.brand] if _maybe(rng, 0.75) else []
    if audience and _maybe(rng, 0.6):
        head.append(audience)
    fillers = [str(f) for f in rng.permutation(vocab.fillers)[: int(rng.integers(0, 3))]]
    words = head + fillers + core
    if _maybe(rng, 0.2):  # sellers' keyword salad
        rng.shuffle(words)
    title = " ".join(words)
    tail = [colour] if 0.55 <= placement < 0.85 else []
    if _maybe(rng, 0.3):
        tail.append(_pick(rng, ["Small", "Medium", "Large", "X-Large", "One Size", "Pack of 2", "US Plug"]))
    if tail:
        title += _pick(rng, [" - ", ", ", " | ", " "]) + ", ".join(tail)
    if _maybe(rng, 0.03):
        title = title.replace(" and ", " &amp; ") if " and " in title else title + " &amp; More"
    return title


def _description(product: Product, vocab: CategoryVocab, rng: np.random.Generator) -> list[str]:
    if _maybe(rng, 0.15):
        return []
    noun = _pick(rng, product.ptype.names).lower()
    colour = _pick(rng, vocab.colour_names[product.colour]).lower()
    second = _pick(rng, vocab.colour_names[product.secondary]).lower()
    material = _pick(rng, vocab.materials[product.material][0]).lower()
    pattern = _pick(rng, vocab.pattern_names[product.pattern]).lower()
    if product.pattern == "solid":
        lead = _pick(
            rng,
            [
                f"This {colour} {noun} is made of {material}.",
                f"A classic {material} {noun} in {colour}.",
                f"Clean lines and a {pattern} {colour} finish make this {noun} easy to match.",
            ],
        )
    else:
        lead = _pick(
            rng,
            [
                f"This {colour} {noun} features a {second} {pattern} design.",
                f"{pattern.capitalize()} {noun} in {colour} and {second}, made of {material}.",
                f"Made of {material}, this {noun} shows a {pattern} pattern in {second} on {colour}.",
            ],
        )
    brand_line = _pick(
        rng,
        [
            f"From {product.brand}.",
            f"{product.brand}™ quality.",
            f"{product.brand} — designed with care.",
            "",
        ],
    )
    extras = [s for s in rng.permutation(vocab.sentences)[: int(rng.integers(0, 3))]]
    parts = [lead] + ([brand_line] if brand_line else []) + [str(s) for s in extras]
    if _maybe(rng, 0.12):  # some sellers paste HTML
        parts = [f"<b>{parts[0]}</b><br>" + " ".join(parts[1:])]
    elif _maybe(rng, 0.5):
        parts = [" ".join(parts)]
    return parts


def _features(product: Product, vocab: CategoryVocab, rng: np.random.Generator) -> list[str]:
    if _maybe(rng, 0.08):
        return []
    material = _pick(rng, vocab.materials[product.material][0])
    feats = [str(f) for f in rng.permutation(vocab.feature_pool)[: int(rng.integers(1, 5))]]
    if _maybe(rng, 0.6):
        feats.insert(0, material if "%" in material else f"Material: {material}")
    if _maybe(rng, 0.4):
        feats.append(f"Color: {_pick(rng, vocab.colour_names[product.colour])}")
    if product.pattern != "solid" and _maybe(rng, 0.3):
        feats.append(f"Pattern: {_pick(rng, vocab.pattern_names[product.pattern])}")
    if vocab is APPLIANCES and _maybe(rng, 0.5):
        feats.append(f"{int(rng.integers(6, 18)) * 100} Watts")
    return feats


def _details(
    product: Product, vocab: CategoryVocab, rng: np.random.Generator, audience: str | None
) -> dict[str, Any]:
    d: dict[str, Any] = {}
    a, b, c = sorted(np.round(rng.uniform(1, 30, size=3), 1).tolist(), reverse=True)
    weight = round(float(rng.uniform(1, 80)), 1)
    if vocab is APPLIANCES:
        d["Brand"] = product.brand
        d["Color"] = _pick(rng, vocab.colour_names[product.colour])
        d["Material"] = _pick(rng, vocab.materials[product.material][0])
        d["Product Dimensions"] = f'{a}"D x {b}"W x {c}"H'
        d["Item Weight"] = f"{weight} Pounds"
        if _maybe(rng, 0.6):
            d["Wattage"] = f"{int(rng.integers(6, 18)) * 100} watts"
        if _maybe(rng, 0.5):
            d["Voltage"] = _pick(rng, ["120 Volts", "110 Volts", "220 Volts"])
        if _maybe(rng, 0.4):
            d["Capacity"] = f"{round(float(rng.uniform(0.5, 20)), 1)} Liters"
    else:
        d["Package Dimensions"] = f"{a} x {b} x {c} inches; {weight} Ounces"
        if audience and _maybe(rng, 0.7):
            d["Department"] = audience.lower().replace("'", "")
    d["Item model number"] = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ0123456789"), size=8))
    date = dt.date(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 4200)))
    d["Date First Available"] = f"{_MONTHS[date.month - 1]} {date.day}, {date.year}"
    if _maybe(rng, 0.7):
        d["Manufacturer"] = product.brand
    if _maybe(rng, 0.1):
        d["Best Sellers Rank"] = {vocab.main_categories[0][0].title(): int(rng.integers(1000, 2_000_000))}
    keys = list(d)
    if _maybe(rng, 0.3):  # field order differs between listings
        rng.shuffle(keys)
    return {k: d[k] for k in keys}


def _image_entries(paths: list[tuple[str, str]], rng: np.random.Generator) -> list[dict[str, str | None]]:
    """Amazon-2023 image dicts; hi_res is sometimes missing so consumers must fall back to large."""
    out = []
    for variant, path in paths:
        hi_res = None if _maybe(rng, 0.25) else path
        # Amazon's key order: thumb, large, variant, hi_res
        out.append({"thumb": path, "large": path, "variant": variant, "hi_res": hi_res})
    return out


def _record(
    product: Product,
    vocab: CategoryVocab,
    rng: np.random.Generator,
    asin: str,
    images: list[dict[str, str | None]],
) -> dict[str, Any]:
    mains = [m for m, _ in vocab.main_categories]
    w = np.asarray([p for _, p in vocab.main_categories])
    main_category = mains[int(rng.choice(len(mains), p=w / w.sum()))]
    audience = _pick(rng, vocab.audiences) if vocab.audiences else None
    lo, hi = product.ptype.price
    price = None if _maybe(rng, 0.3) else round(math.floor(float(rng.uniform(lo, hi))) + 0.99, 2)
    rating_number = int(rng.geometric(1 / 60.0))
    videos = []
    if _maybe(rng, 0.05):
        videos.append(
            {
                "title": f"{product.brand} {_pick(rng, product.ptype.names)} review",
                "url": f"https://www.amazon.com/vdp/{rng.integers(16**12):012x}",
                "user_id": "",
            }
        )
    categories: list[str] = []
    if vocab is not FASHION or _maybe(rng, 0.3):  # real Amazon_Fashion mostly has no category path
        categories = list(_pick(rng, vocab.category_paths))
        if vocab is not FASHION and _maybe(rng, 0.5):
            categories.append(_pick(rng, product.ptype.names) + "s")
    return {
        "main_category": main_category,
        "title": _title(product, vocab, rng, audience),
        "average_rating": round(float(np.clip(rng.normal(4.2, 0.5), 1.0, 5.0)), 1),
        "rating_number": rating_number,
        "features": _features(product, vocab, rng),
        "description": _description(product, vocab, rng),
        "price": price,
        "images": images,
        "videos": videos,
        "store": None if _maybe(rng, 0.02) else product.brand,
        "categories": categories,
        "details": _details(product, vocab, rng, audience),
        "parent_asin": asin,
        "bought_together": None,
        "subtitle": None,
        "author": None,
    }


TRUTH_FILE = "truth_{category}.jsonl"  # beside meta_<category>.jsonl: the world's hidden attributes


def truth_record(asin: str, product: Product) -> dict[str, Any]:
    """What the world knows of a product and its listing does not say outright: its attributes and look."""
    look = product.look
    return {
        "parent_asin": asin,
        "type": product.ptype.key,
        "shape": product.ptype.shape,
        "colour": product.colour,
        "secondary": product.secondary,
        "pattern": product.pattern,
        "material": product.material,
        "brand": product.brand,
        "look": {
            "period": look.period,
            "phase": list(look.phase),
            "texture": look.texture,
            "texture_seed": look.texture_seed,
        },
    }


def look_of(truth: dict[str, Any]) -> Look:
    """The Look a truth record's product is drawn with (as `_sample_product` made it)."""
    look = truth["look"]
    return Look(
        primary=PALETTE[truth["colour"]],
        secondary=PALETTE[truth["secondary"]],
        pattern=truth["pattern"],
        period=float(look["period"]),
        phase=(float(look["phase"][0]), float(look["phase"][1])),
        texture=look["texture"],
        mark=brand_mark(truth["brand"]),
        texture_seed=int(look["texture_seed"]),
    )


def read_truth(raw_dir: Path, category: str) -> dict[str, dict[str, Any]]:
    """{asin: truth record} that `generate_catalog` wrote beside the raw catalog."""
    path = Path(raw_dir) / TRUTH_FILE.format(category=category)
    with open(path, encoding="utf-8") as f:
        return {rec["parent_asin"]: rec for rec in map(json.loads, f)}


def _asins(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    seen: set[str] = set()
    out = []
    while len(out) < n:
        a = "B0" + "".join(rng.choice(alphabet, size=8))
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def defect_counts(n_products: int) -> dict[str, int]:
    """How many records of each defect kind a catalog of `n_products` carries (~1.6% in all)."""
    k = max(1, round(n_products * 0.004))
    return dict.fromkeys(DEFECT_KINDS, k)


def n_valid_products(n_products: int) -> int:
    """Valid, distinct products written: a 1% margin over n_products, so ingest has something to sample."""
    return n_products + max(1, math.ceil(n_products / 100))


def default_workers() -> int:
    """Processes to draw with: the CPUs this process may run on (at most 8)."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))


def _render_in_pool(jobs: list, workers: int, bar: dict[str, Any]) -> None:
    # spawn, not fork: the caller may hold torch/OpenMP threads that a forked child would deadlock on
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for _ in tqdm(pool.map(_render_job, jobs, chunksize=32), **bar):
                pass
    except BrokenProcessPool:
        # e.g. a calling script without `if __name__ == "__main__":`, which spawned workers re-run
        log.warning("image worker processes failed to start; drawing in this process instead")
        for job in tqdm(jobs, **bar):
            _render_job(job)


def generate_catalog(
    category: str,
    n_products: int,
    seed: int,
    raw_dir: Path,
    workers: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """Write raw_dir/meta_<category>.jsonl + raw_dir/images/<asin>_<variant>.jpg; return the JSONL path.

    Also raw_dir/truth_<category>.jsonl: each valid product's hidden attributes (`truth_record`).

    `image_size` other than the default draws smaller, cheaper photos (bench/scale.py at 200k products).
    """
    if n_products < 1:
        raise ValueError(f"n_products must be >= 1, got {n_products}")
    raw_dir = Path(raw_dir)
    vocab = category_vocab(category)
    img_dir = raw_dir / "images"
    if img_dir.exists():  # stale images of an earlier, bigger catalog would otherwise linger
        shutil.rmtree(img_dir)
    img_dir.mkdir(parents=True)

    n_valid = n_valid_products(n_products)
    defects = defect_counts(n_products)
    kinds = ["valid"] * n_valid + [k for k, c in defects.items() for _ in range(c)]
    kinds = [kinds[i] for i in stable_rng(seed, category, "plan").permutation(len(kinds))]
    # a duplicate repeats an earlier product, so the catalog opens with a valid one
    first_valid = kinds.index("valid")
    kinds[0], kinds[first_valid] = kinds[first_valid], kinds[0]
    asins = _asins(stable_rng(seed, category, "asins"), len(kinds))

    jobs: list[tuple[int, int, str, str, Look, list[str], int]] = []
    lines: list[str] = []
    written: list[dict[str, Any]] = []
    truth: list[str] = []
    for i, kind in enumerate(kinds):
        rng = stable_rng(seed, category, "product", i)
        if kind == "duplicate_id":
            # the same listing crawled twice, with a new price and more ratings
            orig = written[int(rng.integers(len(written)))]
            rec = copy.deepcopy(orig)
            rec["price"] = None if orig["price"] is None else round(orig["price"] + 1.0, 2)
            rec["rating_number"] = orig["rating_number"] + int(rng.integers(1, 5))
            lines.append(json.dumps(rec, ensure_ascii=False))
            continue
        product = _sample_product(vocab, rng)
        images: list[dict[str, str | None]] = []
        if kind != "no_image":
            variants = ["MAIN", "PT01", "PT02"][: 3 if _maybe(rng, 0.15) else 2]
            refs = [(v, str(raw_dir / "images" / f"{asins[i]}_{v}.jpg")) for v in variants]
            jobs.append(
                (seed, i, category, product.ptype.shape, product.look, [p for _, p in refs], image_size)
            )
            images = _image_entries(refs, rng)
        rec = _record(product, vocab, rng, asins[i], images)
        if kind == "no_title":
            rec["title"] = "" if _maybe(rng, 0.5) else None
        line = json.dumps(rec, ensure_ascii=False)
        if kind == "malformed_line":  # a line cut off mid-write
            line = line[: len(line) * 2 // 3]
        elif kind == "valid":
            written.append(rec)
            truth.append(json.dumps(truth_record(asins[i], product), ensure_ascii=False))
        lines.append(line)

    workers = workers or default_workers()
    bar = dict(total=len(jobs), desc=f"images {category}", unit="product", mininterval=1.0)
    if workers == 1 or len(jobs) < POOL_MIN_JOBS:
        for job in tqdm(jobs, **bar):
            _render_job(job)
    else:
        _render_in_pool(jobs, workers, bar)
    path = raw_dir / f"meta_{category}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
    # the world's truth, for the demo's shoppers only (cliprec_worlds.demo_queries): no model reads it
    truth_path = raw_dir / TRUTH_FILE.format(category=category)
    truth_path.write_text("".join(line + "\n" for line in truth), encoding="utf-8", newline="\n")
    log.info(
        "synthetic %s: %d records (%d valid, defects %s), %d images in %s",
        category,
        len(kinds),
        n_valid,
        defects,
        sum(len(j[5]) for j in jobs),
        img_dir,
    )
    return path
