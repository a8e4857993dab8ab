"""How much of the demo's LoRA gain exists only by construction of the demo world.

The demo CLIP (cliprec_worlds/demo_clip.py) is pre-trained on captions that never name a brand and use
the catalog's own words (product-type jargon, colour, pattern and material names) only on a rare path
(`BuildConfig.rare_word_prob` of the mentions); many listing words never occur in them at all. LoRA on
the catalog learns exactly those words, so part of its T->I gain is a cue the demo world hands it. This
script re-scores the committed T->I evaluation with those cues removed from the test queries:

1. `as_is`: the queries as the evaluate stage builds them (each test product's summary, embedded with
   the variant's model in the embed stage's batches). Must reproduce the committed ranks, metrics and
   LoRA - zero-shot comparison exactly: checked (NotReproduced), so the rebuilt evaluation is the pipeline's.
2. `no_brands`: every brand name of the category's vocabulary removed (whole names, any case).
3. `no_brands_no_catalog_words`: also every catalog-only word removed: a word of the category's
   summaries that a pre-training caption never uses on its common path (`generic_caption` with
   `rare_word_prob=0`, plus the filler pools it draws from), i.e. one it has only rarely or never.
Two controls, so that a cue's share of the gain is told from merely shorter queries: each removes from
every query as many words as its condition does, drawn at random among the words that condition keeps.
`random_words_as_brands` (brands kept) is condition 2's control; `no_brands_random_words` (brands
removed) is condition 3's. A condition that loses no more gain than its control shows no cue of its own.

Queries and gallery are otherwise the committed ones: the test products' MAIN-image vectors of each
variant's committed embeddings. For each condition: zero-shot and LoRA Recall@1/5/10 and MRR, the paired
LoRA - zero-shot difference with its bootstrap CI and sign-flip p-value (cliprec.metrics.per_query and
cliprec.stats.paired_comparisons, as the compare stage), and the fraction of the as-is gain that remains,
with a bootstrap CI over queries. A control's per-query values are the mean over `--draws` draws.

Run (from the repo root; reads the artefacts of --root, writes bench/results/cue_ablation.json; ~30 s):
    PYTHONPATH=$PWD python bench/cue_ablation.py --root /path/to/a/reproduced/checkout
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO_ROOT, print_table, write_results

RESULTS_NAME = "cue_ablation"
CONDITIONS = (
    "as_is",
    "no_brands",
    "random_words_as_brands",
    "no_brands_no_catalog_words",
    "no_brands_random_words",
)
METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr")
MODE = "text_to_image"
VARIANTS = ("zeroshot", "lora")
CAPTION_SAMPLES = 20_000  # pre-training captions drawn to find the common path's words (and frequencies)
WORD = re.compile(r"[^\W_]+")  # a run of letters or digits: "Off-White" is two words, "Women's" two
# condition -> its control: the same number of words removed, drawn among the words the condition keeps
CONTROLS = {"no_brands": "random_words_as_brands", "no_brands_no_catalog_words": "no_brands_random_words"}
DRAWS = 5  # random draws per control: its per-query values are their mean, so one draw's luck averages out
TEXT_ATOL = 1e-5  # re-encoded summaries vs the committed text.npy (float32, other BLAS blocking)


class NotReproduced(RuntimeError):
    """The rebuilt as-is evaluation is not the committed one: the other conditions would mean nothing."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise NotReproduced(message)


def words(text: str) -> list[str]:
    """The lower-case words of a text (runs of letters or digits)."""
    return [w.lower() for w in WORD.findall(text)]


def strip_words(text: str, phrases: Iterable[str]) -> str:
    """text without every whole-word occurrence of the phrases (any case); spaces collapsed, punctuation kept.

    A phrase of several words ("Marlowe Lane") is removed only where its words follow one another; with
    no phrases the text is returned unchanged.
    """
    parts = sorted({p.strip().lower() for p in phrases if p.strip()}, key=len, reverse=True)
    if not parts:
        return text
    alternatives = "|".join(r"\s+".join(map(re.escape, p.split())) for p in parts)
    pattern = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])", re.IGNORECASE)
    return " ".join(pattern.sub(" ", text).split())


def drop_random_words(text: str, exclude: set[str], n: int, rng: np.random.Generator) -> str:
    """text without n of its word occurrences, drawn at random among those not in `exclude` (lower case)."""
    spans = [m.span() for m in WORD.finditer(text) if m.group().lower() not in exclude]
    picked = sorted(rng.choice(len(spans), size=min(n, len(spans)), replace=False).tolist(), reverse=True)
    for i in picked:
        a, b = spans[i]
        text = text[:a] + " " + text[b:]
    return " ".join(text.split())


def caption_words(samples: int, rare_word_prob: float, seed: int = 0) -> Counter[str]:
    """Word counts of `samples` demo-CLIP pre-training captions, drawn as its pre-training draws them."""
    from cliprec_worlds import demo_clip

    cfg = demo_clip.BuildConfig()
    rng = np.random.default_rng(seed)
    counts: Counter[str] = Counter()
    for _ in range(samples):
        attrs = demo_clip.generic_attributes(rng, cfg.object_frac)
        long = rng.random() < cfg.long_caption_frac
        counts.update(words(demo_clip.generic_caption(attrs, rng, long, rare_word_prob)))
    return counts


def common_caption_vocabulary(samples: int = CAPTION_SAMPLES) -> set[str]:
    """Words a pre-training caption uses on its common path: captions drawn with no catalog word, plus
    every word of the filler pools they draw from (so a filler word missed by the sample still counts)."""
    from cliprec_worlds import demo_clip

    pools = (*demo_clip.FILLER, *demo_clip.DISTRACTORS, *demo_clip.SHOP_WORDS)
    return set(caption_words(samples, rare_word_prob=0.0)) | {w for p in pools for w in words(p)}


def catalog_only_words(texts: Iterable[str], common: set[str], brands: Sequence[str]) -> list[str]:
    """Words of `texts` that are neither in `common` nor part of a brand name, sorted."""
    brand_words = {w for b in brands for w in words(b)}
    return sorted({w for t in texts for w in words(t)} - common - brand_words)


@dataclass(frozen=True)
class Settings:
    """What the ablation reads from params.yaml: the evaluation's statistics and the embed batch size."""

    ks: tuple[int, ...]
    resamples: int
    confidence: float
    seed: int
    batch_size: int
    draws: int = DRAWS


@dataclass
class Variant:
    """One variant's committed artefacts: embeddings, gallery, committed ranks and metrics, its model."""

    emb: Any
    gallery: Any
    ranks: list[int]
    metrics: dict[str, Any]
    model: Any
    processor: Any


def load_variant(root: Path, category: str, variant: str) -> Variant:
    """The committed embeddings, gallery and T->I results of one variant, and the model that made them."""
    from cliprec import paths
    from cliprec.artifacts import ArtifactError, catalog_identity, manifest_sha256
    from cliprec.compare import load_ranks
    from cliprec.evaluate import Embeddings, _gallery, gallery_digest
    from cliprec.model import load_clip

    products = root / paths.products_path(category)
    emb = Embeddings(
        root / paths.embed_dir(category, variant), {**catalog_identity(products), "variant": variant}
    )
    gallery = _gallery(products, emb)
    ranks_doc = load_ranks(root / paths.ranks_path(category, variant))
    if ranks_doc["test_set"]["ids_sha256"] != gallery_digest(gallery.ids):
        raise ArtifactError(f"{category}/{variant}: the committed ranks are of another test set")
    model_name = emb.manifest["model"]
    model_path = root / model_name if (root / model_name).exists() else model_name
    adapter = None
    if variant == "lora":
        train_dir = root / paths.train_dir(category)
        if manifest_sha256(train_dir) != emb.manifest["adapter_sha256"]:
            raise ArtifactError(
                f"{train_dir}: not the adapter the committed {variant} embeddings were made with"
            )
        adapter = train_dir / paths.ADAPTER_DIR
    model, processor = load_clip(model_path, adapter=adapter, device="cpu")
    detail = json.loads((root / paths.metrics_detail_path(category, variant)).read_text())
    return Variant(emb, gallery, ranks_doc["ranks"][MODE], detail[MODE], model, processor)


def query_ranks(v: Variant, text_of: dict[str, str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(target ranks of the test queries, their text vectors): every catalog summary embedded in the embed
    stage's order and batches (so padding, hence the vectors, are the stage's), test rows ranked."""
    from cliprec.embed import encode_texts
    from cliprec.metrics import target_ranks

    text = encode_texts(v.model, v.processor, [text_of[i] for i in v.emb.ids], batch_size=batch_size)
    queries = text[v.gallery.rows]
    return target_ranks(queries, v.gallery.image, np.arange(len(queries))), queries


def check_as_is(v: Variant, ranks: np.ndarray, queries: np.ndarray, ks: tuple[int, ...], where: str) -> None:
    """NotReproduced unless the rebuilt as-is evaluation is the committed one: vectors, ranks, metrics."""
    from cliprec.metrics import per_query

    committed = np.asarray(v.gallery.text)
    _require(np.allclose(queries, committed, atol=TEXT_ATOL), f"{where}: text vectors differ from text.npy")
    _require(ranks.tolist() == v.ranks, f"{where}: ranks differ from the committed ranks file")
    for name, values in per_query(ranks, ks).items():
        want = v.metrics[name]
        _require(
            round(float(values.mean()), 6) == want, f"{where}: {name} {values.mean()} != committed {want}"
        )


def ratio_ci(gain: np.ndarray, base: np.ndarray, s: Settings) -> dict[str, float | None]:
    """mean(gain) / mean(base) with a percentile bootstrap CI over queries (the same draws for both).

    The CI is None when some resample's base gain is <= 0: a ratio to a gain that may vanish is unbounded.
    """
    from cliprec.stats import bootstrap_counts

    counts = list(bootstrap_counts(len(gain), s.resamples, s.seed))
    gains, bases = (np.concatenate([c @ x for c in counts]) for x in (gain, base))
    value = round(float(gain.mean() / base.mean()), 4)
    if (bases <= 0).any():
        return {"value": value, "low": None, "high": None}
    tail = (1.0 - s.confidence) / 2
    low, high = np.quantile(gains / bases, [tail, 1.0 - tail])
    return {"value": value, "low": round(float(low), 4), "high": round(float(high), 4)}


def summaries(root: Path, category: str) -> dict[str, str]:
    """id -> summary of every product with a summary, as the embed stage reads them."""
    import pandas as pd

    from cliprec import paths
    from cliprec.errors import CliprecError

    path = root / paths.summaries_dir(category) / "summaries.parquet"
    if not path.is_file():
        raise CliprecError(f"{path} is missing: run `dvc repro` (or `dvc checkout`) in {root} first")
    frame = pd.read_parquet(path, columns=["id", "summary"])
    return {i: s for i, s in zip(frame["id"], frame["summary"], strict=True) if s}


def condition_texts(
    text_of: dict[str, str], cues: tuple[Sequence[str], Sequence[str]], seed: int, draws: int
) -> dict[str, list[dict[str, str]]]:
    """{condition: [id -> query text, ...]} for `CONDITIONS`: one text set per condition, `draws` per
    control (product k's words of draw d from rng [seed, k, control, d]). `cues`: brands, catalog-only."""
    brands, catalog_only = cues
    no_brands = {i: strip_words(t, brands) for i, t in text_of.items()}
    no_cues = {i: strip_words(t, catalog_only) for i, t in no_brands.items()}
    brand_words, catalog = {w for b in brands for w in words(b)}, set(catalog_only)
    # a control removes as many words as its condition, drawn among the words that the condition keeps
    controls = {
        "random_words_as_brands": (text_of, no_brands, brand_words),
        "no_brands_random_words": (no_brands, no_cues, catalog),
    }
    out = {"as_is": [text_of], "no_brands": [no_brands], "no_brands_no_catalog_words": [no_cues]}
    for c, (before, after, exclude) in enumerate(controls.values()):
        n = {i: len(words(before[i])) - len(words(after[i])) for i in text_of}
        out[list(controls)[c]] = [
            {
                i: drop_random_words(before[i], exclude, n[i], np.random.default_rng([seed, k, c, d]))
                for k, i in enumerate(text_of)
            }
            for d in range(draws)
        ]
    return {name: out[name] for name in CONDITIONS}


def query_stats(
    texts: list[dict[str, str]], test_ids: Sequence[str], as_is: dict[str, str]
) -> dict[str, Any]:
    """Words per test query, the share of the as-is words removed, and empty queries (over all draws)."""
    kept = [len(words(t[i])) for t in texts for i in test_ids]
    before = [len(words(as_is[i])) for _ in texts for i in test_ids]
    return {
        "words_per_query": round(float(np.mean(kept)), 2),
        "words_removed_share": round(1.0 - sum(kept) / sum(before), 4),
        "empty_queries": sum(k == 0 for k in kept),
        "draws": len(texts),
    }


def condition_values(
    variants: dict[str, Variant], texts: list[dict[str, str]], s: Settings, check: str | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """{variant: {metric: per-query values}}, averaged over the condition's text sets (draws); with `check`
    (a label), the as-is ranks are first checked to be the committed ones (`check_as_is`)."""
    from cliprec.metrics import per_query

    out = {}
    for v, var in variants.items():
        runs = []
        for t in texts:
            ranks, queries = query_ranks(var, t, s.batch_size)
            if check:
                check_as_is(var, ranks, queries, s.ks, f"{check}/{v}")
            runs.append(per_query(ranks, s.ks))
        out[v] = {m: np.mean([r[m] for r in runs], axis=0) for m in METRICS}
    return out


def compare_condition(
    values: dict[str, dict[str, np.ndarray]], base_diff: dict[str, np.ndarray] | None, s: Settings
) -> dict[str, Any]:
    """Per metric: both variants' values, LoRA - zero-shot paired over the queries (cliprec.stats, as the
    compare stage computes it), and the share of the base condition's gain that remains."""
    from cliprec.stats import paired_comparisons

    new, old = (np.stack([values[v][m] for m in METRICS]) for v in ("lora", "zeroshot"))
    comparisons = paired_comparisons(new, old, s.resamples, s.confidence, s.seed)
    out = {}
    for m, comparison in zip(METRICS, comparisons, strict=True):
        c = comparison.as_dict()
        gain = values["lora"][m] - values["zeroshot"][m]
        out[m] = {
            "zeroshot": c["old_mean"],
            "lora": c["new_mean"],
            "difference": c,
            "gain_remaining": ratio_ci(gain, base_diff[m], s) if base_diff is not None else None,
        }
    return out


def gain_vs_control(
    gain: dict[str, np.ndarray], control: dict[str, np.ndarray], s: Settings
) -> dict[str, dict[str, Any]]:
    """Per metric: the condition's LoRA - zero-shot gain minus its control's, paired over the queries.

    Below zero (CI and p) = the removed cue words carry more of the gain than as many other words."""
    from cliprec.stats import paired_comparisons

    new, old = (np.stack([g[m] for m in METRICS]) for g in (gain, control))
    comparisons = paired_comparisons(new, old, s.resamples, s.confidence, s.seed)
    return {m: c.as_dict() for m, c in zip(METRICS, comparisons, strict=True)}


def ablate_category(
    root: Path, category: str, captions: tuple[set[str], Counter[str]], s: Settings
) -> dict[str, Any]:
    """The conditions of one category (module doc), the as-is one checked against its committed results.

    `captions`: the common caption vocabulary and the word counts of pre-training captions."""
    from cliprec import paths
    from cliprec_worlds.demo.synthetic import category_vocab

    brands = category_vocab(category).brands
    text_of = summaries(root, category)
    catalog_only = catalog_only_words(text_of.values(), captions[0], brands)
    variants = {v: load_variant(root, category, v) for v in VARIANTS}
    g = variants["lora"].gallery
    _require(g.ids == variants["zeroshot"].gallery.ids, f"{category}: the variants' galleries differ")
    committed = json.loads((root / paths.compare_detail_path(category)).read_text())
    stats = (committed["resamples"], committed["confidence"])
    _require(stats == (s.resamples, s.confidence), f"{category}: compare.detail.json used other statistics")
    conditions: dict[str, Any] = {}
    texts = condition_texts(text_of, (brands, catalog_only), s.seed, s.draws)
    as_is = condition_values(variants, texts["as_is"], s, check=category)
    base = {m: as_is["lora"][m] - as_is["zeroshot"][m] for m in METRICS}
    gains = {}
    for name, sets in texts.items():
        values = as_is if name == "as_is" else condition_values(variants, sets, s)
        metrics = compare_condition(values, None if name == "as_is" else base, s)
        conditions[name] = {**query_stats(sets, g.ids, text_of), "metrics": metrics}
        gains[name] = {m: values["lora"][m] - values["zeroshot"][m] for m in METRICS}
    for name, control in CONTROLS.items():
        conditions[name]["gain_vs_control"] = gain_vs_control(gains[name], gains[control], s)
    want = committed["lora_minus_zeroshot"][MODE]
    same = all(conditions["as_is"]["metrics"][m]["difference"] == want[m] for m in METRICS)
    _require(same, f"{category}: the as-is comparison is not the committed compare.detail.json")
    cues = {"brands": sorted(brands), "catalog_only_words": catalog_only}
    shares = word_shares(cues, [text_of[i] for i in g.ids], captions[1])
    return {**cues, "word_shares": shares, "conditions": conditions}


def word_shares(
    cues: dict[str, Any], test_texts: Iterable[str], caption_counts: Counter[str]
) -> dict[str, float]:
    """Share of the test queries' words, and of pre-training caption words, that are brand / catalog-only."""
    brand_words = {w for b in cues["brands"] for w in words(b)}
    catalog = set(cues["catalog_only_words"])
    query = Counter(w for t in test_texts for w in words(t))
    n_query, n_caption = sum(query.values()), sum(caption_counts.values())
    return {
        "brand_share_of_query_words": round(sum(query[w] for w in brand_words) / n_query, 4),
        "catalog_only_share_of_query_words": round(sum(query[w] for w in catalog) / n_query, 4),
        "brand_share_of_pretraining_words": round(sum(caption_counts[w] for w in brand_words) / n_caption, 5),
        "catalog_only_share_of_pretraining_words": round(
            sum(caption_counts[w] for w in catalog) / n_caption, 5
        ),
    }


def _remaining(g: dict[str, float | None] | None) -> str:
    """A gain-remaining cell: '-' for the base condition, the value alone where its CI is unbounded."""
    if g is None:
        return "-"
    if g["low"] is None:
        return f"{g['value']:.2f} (CI unbounded)"
    return f"{g['value']:.2f} [{g['low']:.2f}, {g['high']:.2f}]"


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One printed row per category, condition and metric."""
    rows = []
    for cat, r in results.items():
        for cond, c in r["conditions"].items():
            for m, e in c["metrics"].items():
                d = e["difference"]
                diff = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                left = _remaining(e["gain_remaining"])
                rows.append({"category": cat, "queries": cond, "metric": m, "zero-shot": e["zeroshot"],
                             "LoRA": e["lora"], "LoRA - zero-shot [95% CI]": diff, "p": d["p_value"],
                             "gain remaining [95% CI]": left})  # fmt: skip
    return rows


def control_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One printed row per category, condition with a control, and metric: the gain minus the control's."""
    rows = []
    for cat, r in results.items():
        for cond, control in CONTROLS.items():
            for m, d in r["conditions"][cond]["gain_vs_control"].items():
                diff = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                rows.append({"category": cat, "queries": cond, "control": control, "metric": m,
                             "gain - control's gain [95% CI]": diff, "p": d["p_value"]})  # fmt: skip
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: --root, --params, --categories, --draws."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--root", type=Path, default=REPO_ROOT, help="project whose artefacts to read (read only)"
    )
    ap.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml", help="params.yaml to follow")
    ap.add_argument("--categories", nargs="+", help="default: params.yaml `categories`")
    ap.add_argument("--draws", type=int, default=DRAWS, help="random draws per control (averaged per query)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Ablate every category, print the table, write bench/results/cue_ablation.json."""
    from cliprec.evaluate import EvalSettings
    from cliprec.params import load_params
    from cliprec_worlds.demo_clip import BuildConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    p = load_params(args.params)
    ev = EvalSettings.from_params(p)
    s = Settings(ev.ks, ev.resamples, ev.confidence, ev.seed, p.embed.batch_size, args.draws)
    common = common_caption_vocabulary()
    rare = BuildConfig().rare_word_prob
    caption_counts = caption_words(CAPTION_SAMPLES, rare)
    results = {}
    for cat in args.categories or p.categories:
        results[cat] = ablate_category(args.root.resolve(), cat, (common, caption_counts), s)
    print_table(table_rows(results), title=f"T->I on the committed test queries, cues removed ({args.root})")
    print_table(
        control_rows(results), title="LoRA - zero-shot gain with the cues removed, minus its control's"
    )
    config = {
        "root": str(args.root), "mode": MODE, "caption_samples": CAPTION_SAMPLES, "rare_word_prob": rare,
        "common_caption_words": len(common), "resamples": s.resamples, "confidence": s.confidence,
        "seed": s.seed, "embed_batch_size": s.batch_size, "control_draws": s.draws,
    }  # fmt: skip
    print(f"\nwrote {write_results(RESULTS_NAME, {'config': config, 'categories': results})}")


if __name__ == "__main__":
    from cliprec.errors import CliprecError

    try:
        main()
    except (CliprecError, NotReproduced, OSError) as e:  # missing or stale artefacts: say which, no traceback
        raise SystemExit(f"error: {e}") from None
