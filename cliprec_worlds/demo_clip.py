"""The demo CLIP: a small CLIP built and pre-trained offline, so the demo setup needs no hub download.

It is pre-trained contrastively on a synthetic stand-in for CLIP's WEB pre-training: pictures drawn with
the catalog generator's primitives (cliprec_worlds.demo.synthetic), captioned like alt-texts, not the
way listings are. Half are geometric shapes ("a large red striped circle on a white background"), half are
everyday objects in the wild - the catalog's product silhouettes at any angle, size and position on
coloured backgrounds - named with everyday words ("a blue striped shirt", "a small grey fridge"). As
OpenAI's web data does, it teaches the common words well and the catalog's own vocabulary only weakly:
product-type jargon ("chinos", "pashmina", "chimney hood"), colour names beyond the basic ones ("navy",
"ochre", "seafoam"; a navy object is usually just "blue"), material names and the floral print appear in
`rare_word_prob` of the captions; brand names and their logos are never named; studio shots (centred,
upright, on white) are rare. Captions carry filler, shop boilerplate and punctuation, so every token a
catalog summary uses has a trained embedding, as in a real CLIP. Zero-shot retrieval on the demo catalog
is therefore well above chance, and LoRA has the real gap to close: jargon, colour and material names,
brands, catalog text and studio photos.
"""

from __future__ import annotations

import heapq
import html
import json
import logging
import math
import multiprocessing as mp
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from cliprec.loss import clip_loss
from cliprec.metrics import retrieval_metrics
from cliprec_worlds.demo import synthetic

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77


@dataclass
class BuildConfig:
    """Everything that decides the demo CLIP (recorded in its README)."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 128
    intermediate_size: int = 512
    heads: int = 4
    text_layers: int = 2
    vision_layers: int = 3
    projection_dim: int = 128
    vocab_size: int = 4096  # an upper bound: the BPE stops once every corpus word is one token (~3000)
    # one fused op each way on a CPU, where OpenAI's quick_gelu (x * sigmoid(1.702 x)) runs ~2.7x longer
    hidden_act: str = "gelu"
    n_images: int = 12000  # distinct pre-training images; captions are re-drawn every time one is used
    n_eval: int = 1000  # held-out generic pairs for the reported accuracy
    render_size: int = 96  # drawn at this size, then downscaled like a catalog photo
    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    long_caption_frac: float = 0.25  # batches whose captions are padded with filler up to ~60 tokens
    object_frac: float = 0.5  # pictures of everyday objects (product silhouettes) instead of geometric shapes
    rare_word_prob: float = 0.1  # a caption names an attribute with a catalog word (jargon) this often
    workers: int | None = None  # drawing processes (None = the CPUs this process may use)
    # one thread: reproducible on any machine, and on the shared 2-vCPU VM two threads were ~8x SLOWER
    threads: int = 1


# --------------------------------------------------------------------------------------------------------
# Generic synthetic pairs

GENERIC_PATTERNS = ("solid", "stripes", "dots", "checks", "zigzag")  # floral stays new to the model
_PATTERN_WEIGHTS = np.array([0.4, 0.15, 0.15, 0.15, 0.15])
_PATTERN_ADJ = {
    "solid": ["plain", "solid", "", ""],
    "stripes": ["striped", "stripy", "striped"],
    "dots": ["dotted", "polka dot", "spotted"],
    "checks": ["checkered", "checked", "checkered"],
    "zigzag": ["zigzag", "zig zag"],
}
_PATTERN_NOUN = {"stripes": "stripes", "dots": "dots", "checks": "checks", "zigzag": "zigzags"}
_SIZES = {"small": (0.35, 0.55), "medium": (0.55, 0.72), "large": (0.72, 0.95)}
_SIZE_WORDS = {
    "small": ["small", "little", "tiny"],
    "medium": ["", "medium"],
    "large": ["large", "big", "huge"],
}
_POSITIONS = {
    "center": (0.0, 0.0),
    "left": (-0.2, 0.0),
    "right": (0.2, 0.0),
    "top": (0.0, -0.2),
    "bottom": (0.0, 0.2),
}
_BACKGROUNDS = {
    "white": (255, 255, 255),
    "grey": (200, 200, 204),
    "light blue": (200, 222, 245),
    "beige": (232, 220, 196),
    "pink": (246, 214, 222),
    "light green": (214, 238, 214),
}
_TEXTURES = ("flat", "flat", "flat", "fine", "gloss", "coarse", "brushed", "sheen")
# words a web caption carries besides the description; they teach the model to look past filler and
# put its end-of-text token at every position a catalog text can reach
_FILLER_TEXT = (
    "photo image picture shot of the a an this that is with for and in on at very really just new nice "
    "great cool simple clean item object thing design style look best today here one only some our your "
    "my good high quality free fast shipping cheap sale buy now classic modern made perfect gift ideal "
    "daily everyday home use easy fun lovely pretty beautiful small set pack size fits all more "
)
FILLER = tuple(_FILLER_TEXT.split())

# a general English vocabulary for the tokenizer: a real CLIP tokenizer knows most words, even the ones
# its pre-training captions never used (their embeddings then start untrained)
_ENGLISH_TEXT = (
    "the be to of and a in that have i it for not on with he as you do at this but his by from they we "
    "say her she or an will my one all would there their what so up out if about who get which go me when "
    "make can like time no just him know take people into year your good some could them see other than "
    "then now look only come its over think also back after use two how our work first well way even new "
    "want because any these give day most us is are was were been has had did said each many more very "
    "much made find long down side been water call oil sit number sound part place where help through "
    "line right too mean old same tell boy follow came show around form three small set put end does "
    "another well large must big high such turn here why ask went men read need land different home move "
    "try kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should world school light plant cover food sun four between state "
    "keep eye never last let thought city tree cross farm hard start might story saw far sea draw left "
    "late run while press close night real life few north open seem together next white children begin "
    "got walk example ease paper group always music those both mark often until mile river car feet care "
    "second book carry took science eat room friend began idea fish mountain stop once base hear horse "
    "cut sure watch color colour face wood main enough plain girl usual young ready above ever red list "
    "though feel talk bird soon body dog family direct pose leave song measure door product black short "
    "numeral class wind question happen complete ship area half rock order fire south problem piece told "
    "knew pass since top whole king space heard best hour better true during hundred five remember step "
    "early hold west ground interest reach fast verb sing listen six table travel less morning ten simple "
    "several vowel toward war lay against pattern slow center love person money serve appear road map "
    "rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine "
    "note wait plan figure star box noun field rest correct able pound done beauty drive stood contain "
    "front teach week final gave green oh quick develop ocean warm free minute strong special mind behind "
    "clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide "
    "surface deep moon island foot system busy test record boat common gold possible plane stead dry "
    "wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes "
    "distant fill east paint language among grand ball yet wave drop heart am present heavy dance engine "
    "position arm wide sail material size vary settle speak weight general ice matter circle pair include "
    "divide syllable felt perhaps pick sudden count square reason length represent art subject region "
    "energy hunt probable bed brother egg ride cell believe fraction forest sit race window store summer "
    "train sleep prove lone leg exercise wall catch mount wish sky board joy winter sat written wild "
    "instrument kept glass grass cow job edge sign visit past soft bright gas weather month million bear "
    "finish happy hope flower clothe strange gone jump baby eight village meet root buy raise solve metal "
    "whether push seven paragraph third shall held hair describe cook floor either result burn hill safe "
    "cat century consider type law bit coast copy phrase silent tall sand soil roll temperature finger "
    "industry value fight lie beat excite natural view sense ear else quite broke case middle kill son "
    "lake moment scale loud spring observe child straight consonant nation dictionary milk speed method "
    "organ pay age section dress cloud surprise quiet stone tiny climb cool design poor lot experiment "
    "bottom key iron single stick flat twenty skin smile crease hole trade melody trip office receive row "
    "mouth exact symbol die least trouble shout except wrote seed tone join suggest clean break lady yard "
    "rise bad blow blood touch grew cent mix team wire cost lost brown wear garden equal sent choose fell "
    "fit flow fair bank collect save control decimal gentle woman captain practice separate difficult "
    "doctor please protect noon whose locate ring character insect caught period indicate radio spoke "
    "atom human history effect electric expect crop modern element hit student corner party supply bone "
    "rail imagine provide agree thus capital chair danger fruit rich thick soldier process operate guess "
    "necessary sharp wing create neighbor wash bat rather crowd corn compare poem string bell depend meat "
    "rub tube famous dollar stream fear sight thin triangle planet hurry chief colony clock mine tie "
    "enter major fresh search send yellow gun allow print dead spot desert suit current lift rose "
    "continue block chart hat sell success company subtract event particular deal swim term opposite wife "
    "shoe shoulder spread arrange camp invent cotton born determine quart nine truck noise level chance "
    "gather shop stretch throw shine property column molecule select wrong gray grey repeat require broad "
    "prepare salt nose plural anger claim continent oxygen sugar death pretty skill women men season "
    "solution magnet silver thank branch match suffix especially fig afraid huge sister steel discuss "
    "forward similar guide experience score apple bought led pitch coat mass card band rope slip win "
    "dream evening condition feed tool total basic smell valley nor double seat arrive master track "
    "parent shore division sheet substance favor connect post spend chord fat glad original share station "
    "dad bread charge proper bar offer segment slave duck instant market degree populate chick dear enemy "
    "reply drink occur support speech nature range steam motion path liquid log meant quotient teeth "
    "shell neck orange purple pink stripe dot check zigzag spot round oval hexagon diamond crescent "
    "rectangle cross background photo left right center "
)
ENGLISH = tuple(_ENGLISH_TEXT.split())
_DESCRIBING = {
    *synthetic.PALETTE,
    *synthetic.GEOMETRIC_SHAPES,
    *_SIZE_WORDS,
    *_POSITIONS,
    *_BACKGROUNDS,
    *(w for words in _PATTERN_ADJ.values() for adj in words for w in adj.split()),
    *_PATTERN_NOUN.values(),
    "gray",
    "gold",
    "color",
    "colour",
    "stripe",
    "dot",
    "check",
    "spot",
    "round",
    "oval",
    "star",
    "heart",
    "ring",
    "background",
    "big",
    "huge",
    "little",
    "tiny",
}
# --------------------------------------------------------------------------------------------------------
# Everyday objects of the web: product silhouettes with the words a web caption uses for them

WEB_NOUNS: dict[str, tuple[str, ...]] = {
    "tshirt": ("t-shirt", "shirt", "tee shirt"),
    "dress": ("dress",),
    "trousers": ("pants", "trousers"),
    "shorts": ("shorts",),
    "skirt": ("skirt",),
    "hoodie": ("hoodie", "sweatshirt"),
    "cap": ("cap", "hat"),
    "handbag": ("handbag", "bag"),
    "backpack": ("backpack", "bag"),
    "sneaker": ("shoe", "shoes", "sneakers"),
    "sock": ("sock", "socks"),
    "scarf": ("scarf",),
    "sunglasses": ("sunglasses", "glasses"),
    "watch": ("watch", "wristwatch"),
    "refrigerator": ("fridge", "refrigerator"),
    "microwave": ("microwave",),
    "toaster": ("toaster",),
    "kettle": ("kettle",),
    "blender": ("blender",),
    "washing_machine": ("washing machine", "washer"),
    "coffee_maker": ("coffee maker", "coffee machine"),
    "vacuum": ("vacuum cleaner", "vacuum"),
    "fan": ("fan", "electric fan"),
    "air_fryer": ("air fryer", "fryer"),
    "water_filter": ("water filter", "filter"),
    "range_hood": ("cooker hood", "hood"),
    "dishwasher": ("dishwasher",),
    "ice_maker": ("ice maker", "ice machine"),
    "bottle": ("bottle",),
    "jar": ("jar",),
    "box": ("box",),
    "tube": ("tube",),
    "book": ("book",),
    "mug": ("mug", "cup"),
    "ball": ("ball",),
    "lamp": ("lamp",),
    "phone": ("phone",),
    "pouch": ("pouch",),
    "cushion": ("cushion", "pillow"),
    "tray": ("tray",),
}
# how a web caption names a palette colour: by its basic colour word (the catalog's own names are rare)
WEB_COLOUR: dict[str, str] = {
    **{c: c for c in synthetic.BASIC_COLOURS},
    "charcoal": "grey",
    "silver": "silver",
    "burgundy": "red",
    "mustard": "yellow",
    "olive": "green",
    "mint": "green",
    "teal": "blue",
    "navy": "blue",
    "beige": "brown",
    "cream": "white",
    "copper": "orange",
}
OBJECT_PATTERNS = synthetic.PATTERNS  # floral included: the web has it, but names it only rarely
_OBJECT_PATTERN_WEIGHTS = np.array([0.4, 0.12, 0.12, 0.12, 0.12, 0.12])


def _catalog_names(table_of: str) -> dict[str, tuple[str, ...]]:
    """The hand-written categories' own words for each type / colour / pattern / material, lower case."""
    out: dict[str, list[str]] = defaultdict(list)
    for vocab in synthetic.VOCABS.values():
        if table_of == "type":
            items = [(t.shape, n) for t in vocab.types for n in t.names]
        elif table_of == "colour":
            items = [(c, n) for c, names in vocab.colour_names.items() for n in names]
        elif table_of == "pattern":
            items = [(p, n) for p, names in vocab.pattern_names.items() for n in names]
        else:
            items = [(m, n) for m, (names, _) in vocab.materials.items() for n in names]
        for key, name in items:
            if name.lower() not in out[key]:
                out[key].append(name.lower())
    if table_of == "type":
        for shape, names in synthetic._GENERIC_TYPES.items():
            out[shape].extend(n.lower() for n in names if n.lower() not in out[shape])
    return {k: tuple(v) for k, v in out.items()}


CATALOG_TYPE_NAMES = _catalog_names("type")
CATALOG_COLOUR_NAMES = _catalog_names("colour")
CATALOG_PATTERN_NAMES = _catalog_names("pattern")
CATALOG_MATERIAL_NAMES = _catalog_names("material")
# material -> texture, over both hand-written categories (same key, same texture in both)
MATERIAL_TEXTURES = {m: tex for v in synthetic.VOCABS.values() for m, (_, tex) in v.materials.items()}
_VISUAL_WORDS = {
    w
    for table in (
        WEB_NOUNS,
        CATALOG_TYPE_NAMES,
        CATALOG_COLOUR_NAMES,
        CATALOG_PATTERN_NAMES,
        CATALOG_MATERIAL_NAMES,
        {"c": tuple(WEB_COLOUR.values())},
    )
    for names in table.values()
    for name in names
    for w in name.replace("-", " ").split()
}
# English words that describe nothing a generic picture shows: noise a caption may carry
DISTRACTORS = tuple(w for w in ENGLISH if w not in _DESCRIBING and w not in _VISUAL_WORDS)


def shop_words() -> tuple[str, ...]:
    """Words of the catalog's boilerplate (features, sentences, fillers) that name nothing visible.

    Web alt-texts are often shop listings, so a real CLIP has seen "warranty" or "machine wash" many
    times, next to pictures they do not describe: the demo's captions carry them as filler.
    """
    words: set[str] = set()
    for vocab in synthetic.VOCABS.values():
        for text in (*vocab.fillers, *vocab.feature_pool, *vocab.sentences):
            for w in re.findall(r"[^\W\d_]+(?:['-][^\W\d_]+)*", html.unescape(text).lower()):
                if w not in _VISUAL_WORDS and w not in _DESCRIBING:
                    words.add(w)
    return tuple(sorted(words))


SHOP_WORDS = shop_words()
_PUNCTUATION = (". ", ", ", " - ", " | ", ": ")  # between two filler words, 1 time in 5


def _pick(rng: np.random.Generator, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def generic_attributes(rng: np.random.Generator, object_frac: float = 0.5) -> dict[str, Any]:
    """Random attributes of one web picture: shape or object, colours, pattern, material, size, place."""
    is_object = rng.random() < object_frac
    colours = tuple(synthetic.PALETTE) if is_object else synthetic.BASIC_COLOURS
    colour = _pick(rng, colours)
    luma = synthetic.luma(synthetic.PALETTE[colour])
    contrasting = [c for c in colours if abs(synthetic.luma(synthetic.PALETTE[c]) - luma) > 60]
    attrs = {
        "kind": "object" if is_object else "shape",
        "shape": _pick(rng, list(WEB_NOUNS) if is_object else synthetic.GEOMETRIC_SHAPES),
        "colour": colour,
        "secondary": _pick(rng, contrasting),
    }
    if is_object:
        pattern = OBJECT_PATTERNS[int(rng.choice(len(OBJECT_PATTERNS), p=_OBJECT_PATTERN_WEIGHTS))]
        attrs.update(pattern=pattern, material=_pick(rng, sorted(MATERIAL_TEXTURES)))
    else:
        attrs["pattern"] = GENERIC_PATTERNS[int(rng.choice(len(GENERIC_PATTERNS), p=_PATTERN_WEIGHTS))]
    attrs.update(
        size=_pick(rng, list(_SIZES)),
        position=_pick(rng, list(_POSITIONS)) if rng.random() < 0.5 else "center",
        background=_pick(rng, list(_BACKGROUNDS)) if rng.random() < 0.5 else "white",
    )
    return attrs


def draw_generic(attrs: dict[str, Any], rng: np.random.Generator, size: int, out_size: int) -> np.ndarray:
    """The picture of `attrs`: drawn at `size`, downscaled (bicubic, as CLIP's processor does) to out_size."""
    lo, hi = _SIZES[attrs["size"]]
    scale = float(rng.uniform(lo, hi))
    px, py = _POSITIONS[attrs["position"]]
    slack = max(0.0, (1.0 - scale) / 2 - 0.02)  # keep the object on the canvas
    offset = (
        float(np.clip(px + rng.uniform(-0.04, 0.04), -slack, slack)),
        float(np.clip(py + rng.uniform(-0.04, 0.04), -slack, slack)),
    )
    mark = None
    if rng.random() < 0.25:  # logos exist in the wild; they are never named in the caption
        mark = synthetic.Mark(
            tuple(int(v) for v in rng.integers(0, 256, 3)), _pick(rng, synthetic.MARK_STYLES)
        )
    texture = _pick(rng, _TEXTURES)
    if "material" in attrs:
        texture = MATERIAL_TEXTURES[attrs["material"]]
    look = synthetic.Look(
        primary=synthetic.PALETTE[attrs["colour"]],
        secondary=synthetic.PALETTE[attrs["secondary"]],
        pattern=attrs["pattern"],
        period=float(rng.uniform(20, 34)),
        phase=(float(rng.uniform(0, 40)), float(rng.uniform(0, 40))),
        texture=texture,
        mark=mark,
        texture_seed=int(rng.integers(2**31)),
    )
    pose = synthetic.Pose(
        scale=scale, angle=float(rng.uniform(-40, 40)), offset=offset, flip=bool(rng.random() < 0.5)
    )
    img = synthetic.render(attrs["shape"], look, pose, size, _BACKGROUNDS[attrs["background"]])
    return np.asarray(img.resize((out_size, out_size), Image.BICUBIC))


def _object_words(
    attrs: dict[str, Any], rng: np.random.Generator, rare: float
) -> tuple[str, str, str, str, str | None]:
    """(noun, colour, secondary colour, pattern adjective, material) of an object, as a web caption words
    them: everyday words, and with probability `rare` each, the catalog's own (rarely seen) word."""

    def word(common: tuple[str, ...] | list[str], catalog: tuple[str, ...]) -> str:
        return _pick(rng, catalog) if catalog and rng.random() < rare else _pick(rng, common)

    noun = word(WEB_NOUNS[attrs["shape"]], CATALOG_TYPE_NAMES.get(attrs["shape"], ()))
    colour = word([WEB_COLOUR[attrs["colour"]]], CATALOG_COLOUR_NAMES.get(attrs["colour"], ()))
    second = word([WEB_COLOUR[attrs["secondary"]]], CATALOG_COLOUR_NAMES.get(attrs["secondary"], ()))
    pattern = attrs["pattern"]
    catalog_pattern = CATALOG_PATTERN_NAMES.get(pattern, ())
    if pattern == "floral":  # the web shows flower prints without a word for them, except rarely
        adj = _pick(rng, catalog_pattern) if rng.random() < rare else ""
    else:
        adj = word(_PATTERN_ADJ[pattern], catalog_pattern if pattern != "solid" else ())
    material = _pick(rng, CATALOG_MATERIAL_NAMES[attrs["material"]]) if rng.random() < rare else None
    return noun, colour, second, adj, material


def generic_caption(
    attrs: dict[str, Any], rng: np.random.Generator, long: bool = False, rare_word_prob: float = 0.1
) -> str:
    """One of many phrasings of `attrs`; `long` pads it with up to ~45 filler words, else a few at most.

    Objects are named with everyday words; each attribute takes the catalog's own word (jargon, a
    colour name beyond the basic ones, a material) with probability `rare_word_prob`.
    """
    size = _pick(rng, _SIZE_WORDS[attrs["size"]]) if rng.random() < 0.6 else ""
    pattern = attrs["pattern"]
    if attrs.get("kind") == "object":
        shape, colour, second, adj, material = _object_words(attrs, rng, rare_word_prob)
        if material:
            shape = f"{material} {shape}"
    else:
        shape, colour, second = attrs["shape"], attrs["colour"], attrs["secondary"]
        adj = _pick(rng, _PATTERN_ADJ[pattern])
    two_tone = pattern != "solid" and rng.random() < 0.5
    colours = f"{colour} and {second}" if two_tone else colour
    form = rng.random()
    if pattern in _PATTERN_NOUN and form < 0.3:
        core = f"{size} {colour} {shape} with {second} {_PATTERN_NOUN[pattern]}"
    elif form < 0.85:
        core = f"{size} {colours} {adj} {shape}"
    else:
        core = f"{adj} {shape}, {colours}"
    parts = [core]
    if attrs["position"] != "center" and rng.random() < 0.5:
        parts.append(_pick(rng, ["on the", "in the", "at the"]) + " " + attrs["position"])
    if rng.random() < 0.3:
        parts.append(f"on a {attrs['background']} background")
    text = ("a " if rng.random() < 0.6 else "") + " ".join(parts)
    if rng.random() < (0.8 if long else 0.3):
        n = int(rng.integers(1, 45 if long else 5))
        before = int(rng.integers(0, n + 1))
        # web-caption filler, other English words and shop boilerplate, with the punctuation of
        # alt-texts: the text tower learns to find the describing words among words it has no use for
        pools = (FILLER, DISTRACTORS, SHOP_WORDS)
        words = [str(_pick(rng, pools[int(rng.choice(3, p=[0.4, 0.3, 0.3]))])) for _ in range(n)]
        joined = [
            w + (_pick(rng, _PUNCTUATION) if i < n - 1 and rng.random() < 0.2 else " ")
            for i, w in enumerate(words)
        ]
        head, tail = "".join(joined[:before]).strip(), "".join(joined[before:]).strip()
        text = " ".join([head, text, tail])
    return " ".join(text.split())


def _draw_chunk(job: tuple[int, int, int, int, int, float]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    seed, start, stop, size, out_size, object_frac = job
    images, attrs = [], []
    for i in range(start, stop):
        rng = synthetic.stable_rng(seed, "generic", i)
        a = generic_attributes(rng, object_frac)
        images.append(draw_generic(a, rng, size, out_size))
        attrs.append(a)
    return np.stack(images), attrs


def generic_dataset(
    n: int, seed: int, size: int, out_size: int, workers: int = 1, offset: int = 0, object_frac: float = 0.5
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """n web pictures (N x out x out x 3 uint8) and their attributes; deterministic in (seed, index)."""
    chunk = 250
    jobs = [
        (seed, s, min(s + chunk, offset + n), size, out_size, object_frac)
        for s in range(offset, offset + n, chunk)
    ]
    bar = dict(total=len(jobs), desc="web pictures", unit="chunk", mininterval=1.0)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(tqdm(pool.map(_draw_chunk, jobs), **bar))
    else:
        parts = [_draw_chunk(j) for j in tqdm(jobs, **bar)]
    return np.concatenate([p[0] for p in parts]), [a for p in parts for a in p[1]]


# --------------------------------------------------------------------------------------------------------
# Tokenizer, processor, model


def retail_words() -> Iterator[str]:
    """The everyday words of the catalog generator's vocabulary tables (product names, colour, pattern and
    material names, title fillers, feature and description sentences, category paths), NOT its brands.

    A real CLIP tokenizer (49,408 tokens) knows such words whole; without them the demo's BPE spent ~2.5
    tokens per catalog word, so 77 tokens held only ~30 words and the text tower cost twice what it
    should. Only the tokenizer sees them: the pre-training captions never use them, so their embeddings
    start untrained, and the invented brand names are still split into pieces.
    """
    for vocab in synthetic.VOCABS.values():
        yield from (name for t in vocab.types for name in t.names)
        for table in (vocab.colour_names, vocab.pattern_names):
            yield from (name for names in table.values() for name in names)
        yield from (name for names, _ in vocab.materials.values() for name in names)
        yield from (*vocab.fillers, *vocab.feature_pool, *vocab.sentences, *vocab.audiences)
        yield from (*(part for path in vocab.category_paths for part in path), *dict(vocab.main_categories))


def tokenizer_corpus(attrs: list[dict[str, Any]], seed: int, rare_word_prob: float = 0.1) -> Iterator[str]:
    """Captions of the pre-training pictures plus a general English word list and `retail_words`."""
    rng = np.random.default_rng(seed)
    for a in attrs:
        yield generic_caption(a, rng, long=rng.random() < 0.25, rare_word_prob=rare_word_prob)
    for _ in range(3):  # a few times, so common words become whole tokens
        yield from ENGLISH
        yield from retail_words()


def _bpe_merges(
    word_counts: dict[tuple[str, ...], int], n_merges: int, min_count: int = 2
) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties broken by the pair itself.

    `tokenizers`' BpeTrainer breaks ties in hash-map order, which changes from one process to the next:
    the same corpus gave a different vocabulary on every run. This plain incremental BPE is deterministic.
    """
    words = [list(w) for w in word_counts]
    freq = list(word_counts.values())
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:], strict=False):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n_merges:
        neg, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -neg:  # stale entry: its count changed since it was pushed
            continue
        if -neg < min_count:
            break
        merges.append(best)
        merged = best[0] + best[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(best, ())):
            w = words[i]
            for pair in zip(w, w[1:], strict=False):
                pairs[pair] -= freq[i]
                touched.add(pair)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:], strict=False):
                pairs[pair] += freq[i]
                where[pair].add(i)
                touched.add(pair)
        pairs.pop(best, None)
        for pair in sorted(touched):
            if pairs.get(pair, 0) > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            else:
                pairs.pop(pair, None)
    return merges


def train_tokenizer(corpus: Iterator[str], vocab_size: int) -> CLIPTokenizer:
    """A byte-level BPE with CLIP's normaliser, pre-tokeniser and `</w>` word ends, as a CLIPTokenizer."""
    backend = CLIPTokenizer().backend_tokenizer  # empty vocab, CLIP's normaliser + pre-tokeniser
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for text in corpus:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            counts[(*piece[:-1], piece[-1] + "</w>")] += 1
    vocab = {BOS: 0, EOS: 1}
    # every byte with and without </w>: otherwise a one-character word (or a rare byte) becomes UNK, and
    # CLIP's UNK is the end-of-text token that the text tower pools at
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
        vocab[sym + "</w>"] = len(vocab)
    merges = _bpe_merges(dict(sorted(counts.items())), max(0, vocab_size - len(vocab)))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def make_processor(tokenizer: CLIPTokenizer, image_size: int) -> CLIPProcessor:
    """CLIPProcessor with the Pillow image processor (torchvision is not installed) at the model's size."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_model(tokenizer: CLIPTokenizer, cfg: BuildConfig) -> CLIPModel:
    """A randomly initialised small CLIP whose text config matches the tokenizer's special ids."""
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.heads,
            "hidden_act": cfg.hidden_act,
            "max_position_embeddings": MAX_TOKENS,
            "projection_dim": cfg.projection_dim,
            **ids,
        },
        vision_config={
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.heads,
            "hidden_act": cfg.hidden_act,
            "projection_dim": cfg.projection_dim,
        },
        projection_dim=cfg.projection_dim,
    )
    # CLIPConfig copies special ids from the text config; set them on the top level too (generation utils
    # and pooling read them from different places)
    for k, v in ids.items():
        setattr(config, k, v)
    return CLIPModel(config)


def normalise_pixels(images: np.ndarray, processor: CLIPProcessor) -> torch.Tensor:
    """N x H x W x 3 uint8 at the model's size -> pixel_values, exactly as the processor computes them."""
    ip = processor.image_processor
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() * float(ip.rescale_factor)
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------------
# Pre-training


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(model: CLIPModel, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or name == "logit_scale" else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def _batch_accuracy(image: torch.Tensor, text: torch.Tensor) -> float:
    sims = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    target = torch.arange(len(sims))
    return float(((sims.argmax(1) == target).float().mean() + (sims.argmax(0) == target).float().mean()) / 2)


@torch.no_grad()
def _generic_eval(
    model: CLIPModel,
    processor: CLIPProcessor,
    images: np.ndarray,
    attrs: list[dict[str, Any]],
    seed: int,
    rare_word_prob: float = 0.1,
) -> dict[str, float]:
    """Held-out generic pictures: text->image Recall@1/5 over the whole held-out set."""
    model.eval()
    rng = np.random.default_rng(seed + 1)
    texts = [generic_caption(a, rng, bool(i % 2), rare_word_prob) for i, a in enumerate(attrs)]
    img = model.get_image_features(pixel_values=normalise_pixels(images, processor)).pooler_output
    tok = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    txt = model.get_text_features(**tok).pooler_output
    img = torch.nn.functional.normalize(img, dim=-1).numpy()
    txt = torch.nn.functional.normalize(txt, dim=-1).numpy()
    m = retrieval_metrics(txt, img, np.arange(len(texts)), ks=(1, 5))
    model.train()
    return {"generic_t2i_recall_at_1": m["recall_at_1"], "generic_t2i_recall_at_5": m["recall_at_5"]}


def pretrain(
    model: CLIPModel,
    processor: CLIPProcessor,
    images: np.ndarray,
    attrs: list[dict[str, Any]],
    cfg: BuildConfig,
) -> dict[str, float]:
    """Contrastive pre-training on generic pairs; returns the last steps' mean loss and in-batch accuracy."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = _optimizer(model, cfg.lr, cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    order = np.concatenate(
        [rng.permutation(len(images)) for _ in range(math.ceil(cfg.steps * cfg.batch_size / len(images)))]
    )
    losses, accs = [], []
    model.train()
    bar = tqdm(range(cfg.steps), desc="pre-train demo CLIP", unit="step", mininterval=2.0)
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        long = rng.random() < cfg.long_caption_frac  # per batch: padding follows the longest caption
        texts = [generic_caption(attrs[i], rng, long, cfg.rare_word_prob) for i in idx]
        tok = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_at(step, cfg.steps, warmup)
        out = model(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            pixel_values=normalise_pixels(images[idx], processor),
        )
        loss = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        accs.append(_batch_accuracy(out.image_embeds.detach(), out.text_embeds.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", acc=f"{np.mean(accs[-10:]):.2f}")
    tail = max(1, min(50, cfg.steps // 5))
    return {
        "final_loss": float(np.mean(losses[-tail:])),
        "final_batch_accuracy": float(np.mean(accs[-tail:])),
        "first_loss": float(losses[0]),
        "logit_scale": float(model.logit_scale.detach().exp()),
    }


def _workers(cfg: BuildConfig) -> int:
    return cfg.workers or synthetic.default_workers()


def build_demo_clip(out_dir: Path, cfg: BuildConfig | None = None) -> dict[str, Any]:
    """Draw the generic set, train tokenizer + model, save_pretrained into out_dir; return build stats."""
    cfg = cfg or BuildConfig()
    t0 = time.perf_counter()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out_dir, cfg, t0)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(out_dir: Path, cfg: BuildConfig, t0: float) -> dict[str, Any]:
    images, attrs = generic_dataset(
        cfg.n_images + cfg.n_eval,
        cfg.seed,
        cfg.render_size,
        cfg.image_size,
        workers=_workers(cfg),
        object_frac=cfg.object_frac,
    )
    t_data = time.perf_counter() - t0
    train_images, train_attrs = images[: cfg.n_images], attrs[: cfg.n_images]
    eval_images, eval_attrs = images[cfg.n_images :], attrs[cfg.n_images :]
    tokenizer = train_tokenizer(tokenizer_corpus(train_attrs, cfg.seed, cfg.rare_word_prob), cfg.vocab_size)
    processor = make_processor(tokenizer, cfg.image_size)
    torch.manual_seed(cfg.seed)
    model = make_model(tokenizer, cfg)
    log.info(
        "demo CLIP: %.2fM parameters, vocab %d, generic set %d (+%d held out) drawn in %.0f s",
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(tokenizer),
        cfg.n_images,
        cfg.n_eval,
        t_data,
    )
    t1 = time.perf_counter()
    stats = pretrain(model, processor, train_images, train_attrs, cfg)
    t_train = time.perf_counter() - t1
    stats.update(_generic_eval(model, processor, eval_images, eval_attrs, cfg.seed, cfg.rare_word_prob))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    stats.update(
        {
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "vocab_size": len(tokenizer),
            "data_seconds": round(t_data, 1),
            "train_seconds": round(t_train, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "size_bytes": int(sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "config": asdict(cfg),
        }
    )
    log.info("demo CLIP saved to %s: %s", out_dir, {k: v for k, v in stats.items() if k != "config"})
    return stats


# --------------------------------------------------------------------------------------------------------
# Zero-shot check on the demo catalog


def _first_sentence(description: list[str]) -> str:
    import html
    import re

    text = html.unescape(re.sub(r"<[^>]+>", " ", " ".join(description))).strip()
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m.group(1) if m else text).strip()


def catalog_queries(jsonl: Path) -> list[tuple[str, str, str]]:
    """(parent_asin, query text = title + first description sentence, MAIN image path) of valid records."""
    seen, out = set(), []
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not rec.get("title") or not rec.get("images") or rec["parent_asin"] in seen:
            continue
        seen.add(rec["parent_asin"])
        img = rec["images"][0]
        path = img.get("hi_res") or img.get("large") or img.get("thumb")
        text = " ".join(x for x in (rec["title"], _first_sentence(rec.get("description") or [])) if x)
        out.append((rec["parent_asin"], text, path))
    return out


@torch.no_grad()
def encode(
    model: CLIPModel,
    processor: CLIPProcessor,
    texts: list[str],
    image_paths: list[str],
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised text and image embeddings (images resized to 224 first, like the images stage)."""
    model.eval()
    txt, img = [], []
    for s in range(0, len(texts), batch_size):
        tok = processor.tokenizer(
            texts[s : s + batch_size], padding=True, truncation=True, return_tensors="pt"
        )
        txt.append(model.get_text_features(**tok).pooler_output)
        ims = [
            Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC)
            for p in image_paths[s : s + batch_size]
        ]
        px = processor.image_processor(images=ims, return_tensors="pt")["pixel_values"]
        img.append(model.get_image_features(pixel_values=px).pooler_output)
    norm = torch.nn.functional.normalize
    return norm(torch.cat(txt), dim=-1).numpy(), norm(torch.cat(img), dim=-1).numpy()


def zero_shot_recall(model_dir: Path, jsonl: Path, gallery_size: int = 250, seed: int = 0) -> dict[str, Any]:
    """Text->image retrieval of the catalog's products over disjoint galleries of `gallery_size`.

    Every product is a query once (against the gallery it falls in); reports the mean and spread over
    galleries, plus chance level (k / gallery_size).
    """
    model = CLIPModel.from_pretrained(model_dir)
    processor = CLIPProcessor.from_pretrained(model_dir)
    rows = catalog_queries(jsonl)
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    txt, img = encode(model, processor, [r[1] for r in rows], [r[2] for r in rows])
    per = []
    for s in range(0, len(rows) - gallery_size + 1, gallery_size):
        sl = slice(s, s + gallery_size)
        per.append(retrieval_metrics(txt[sl], img[sl], np.arange(gallery_size), ks=(1, 5, 10)))
    keys = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr")
    return {
        "products": len(rows),
        "galleries": len(per),
        "gallery_size": gallery_size,
        **{k: float(np.mean([m[k] for m in per])) for k in keys},
        **{f"{k}_std": float(np.std([m[k] for m in per])) for k in keys},
        "chance_recall_at_5": 5 / gallery_size,
    }


def write_readme(
    out_dir: Path, stats: dict[str, Any], zero_shot: dict[str, dict[str, Any]], command: str
) -> Path:
    """models/demo-clip/README.md: how the model was built and how well it does."""
    cfg = stats["config"]
    lines = [
        "# demo-clip",
        "",
        "A small CLIP built by this project, offline, for the `demo` setup (no hub download).",
        "Pre-trained contrastively (`cliprec.loss.clip_loss`) on a synthetic stand-in for CLIP's WEB",
        "pre-training, never on the demo catalog: pictures drawn with the catalog generator's primitives,",
        "half geometric shapes, half everyday objects (the catalog's product silhouettes) in the wild - any",
        'angle, size and position, coloured backgrounds - with alt-text-style captions ("a small blue',
        'striped shirt", "a grey fridge on the left", padded with filler, shop boilerplate and',
        "punctuation). Like OpenAI's web data it names things with everyday words and uses the catalog's",
        "own words - product-type jargon, colour names beyond the basic ones, materials, floral prints -",
        f"for only {cfg.get('rare_word_prob', 0):.0%} of the mentions; brand names are never said, logos",
        "never named, and studio shots (centred, upright, on white) are rare. Every token a catalog summary",
        "uses has been trained, as in a real CLIP; what LoRA fine-tuning has to learn is the catalog's gap:",
        "its jargon, colour and material names, brands, listing-style text and studio photos.",
        "",
        "Built with (deterministic from the seed; CPU):",
        "",
        "```",
        command,
        "```",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | CLIPModel, hidden {cfg['hidden_size']}, text {cfg['text_layers']} / vision "
        f"{cfg['vision_layers']} layers, {cfg['heads']} heads, projection {cfg['projection_dim']}, "
        f"{cfg['hidden_act']} |",
        f"| images | {cfg['image_size']} px, patch {cfg['patch_size']}, `CLIPImageProcessorPil` |",
        "| tokenizer | byte-level BPE (CLIP normaliser / pre-tokeniser, `</w>`), "
        f"{stats['vocab_size']} tokens: pre-training captions, general English, `retail_words()` |",
        f"| parameters | {stats['parameters'] / 1e6:.2f} M ({stats['size_bytes'] / 1e6:.1f} MB on disk) |",
        f"| pre-training | {cfg['steps']} steps x batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, "
        f"{cfg['n_images']} web pictures ({cfg.get('object_frac', 0):.0%} everyday objects) |",
        f"| final loss | {stats['final_loss']:.3f} (first step {stats['first_loss']:.3f}) |",
        f"| final in-batch accuracy | {stats['final_batch_accuracy']:.3f} "
        f"(chance {1 / cfg['batch_size']:.3f}) |",
        f"| held-out web text->image R@1 / R@5 | {stats['generic_t2i_recall_at_1']:.3f} / "
        f"{stats['generic_t2i_recall_at_5']:.3f} (gallery {cfg['n_eval']}) |",
        f"| build time | {stats['total_seconds']:.0f} s ({stats['data_seconds']:.0f} s drawing, "
        f"{stats['train_seconds']:.0f} s pre-training; {stats['threads']} thread, torch {stats['torch']})"
        f" + {stats.get('verify_seconds', 0):.0f} s zero-shot check |",
        "",
    ]
    if zero_shot:
        lines += [
            "Zero-shot on the demo catalog (seed 0; query = title + first description sentence, MAIN image;",
            "disjoint galleries of test size, every product a query once):",
            "",
            "| category | products | gallery | R@1 | R@5 | R@10 | MRR | chance R@5 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for cat, z in zero_shot.items():
            lines.append(
                f"| {cat} | {z['products']} | {z['gallery_size']} | {z['recall_at_1']:.3f} | "
                f"{z['recall_at_5']:.3f} ± {z['recall_at_5_std']:.3f} | {z['recall_at_10']:.3f} | "
                f"{z['mrr']:.3f} | "
                f"{z['chance_recall_at_5']:.3f} |"
            )
        lines.append("")
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (Path(out_dir) / "build_stats.json").write_text(
        json.dumps({**stats, "zero_shot": zero_shot}, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return path
