"""Long shopper queries: how many exceed the text tower's tokens, and which `embed.long_text` wins on val.

For each category of params.yaml and each variant, the VAL queries of data/queries/<cat>/queries.jsonl
(never the test ones: they report results) are embedded under both policies (cliprec.query_embed:
`truncate`, `windows`) with that variant's model, searched exactly over the fused product vectors of
data/embed/<cat>/<variant> to depth 100, and scored with cliprec.graded. Printed per category x variant:
val queries, texts over the limit, nDCG@10 under each policy, and windows - truncate paired over the same
queries with its 95 % bootstrap CI and two-sided permutation p (cliprec.stats). Also the token counts of
tests/fixtures/c4_like_requests.txt (long first-person requests in the style of Amazon-C4's queries).

The rule (docs/metrics.md, "Long queries"): the default is `windows` only when windows - truncate on val
nDCG@10 is positive and significant (p < gate.alpha) in every category x variant where a val text is
over the limit, and never negative-significant anywhere; otherwise `truncate`. The script prints the
choice; with --write it records everything in bench/results/long_queries.json.

Run from the project root after `dvc repro` (needs data/queries, data/embed, data/train):
    python bench/long_queries.py [--root .] [--write]
Cost: a few seconds per category x variant on 2 cores (a model load and a few hundred texts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_table, write_results  # noqa: E402
from cliprec import paths  # noqa: E402
from cliprec.evaluate import exact_topk  # noqa: E402
from cliprec.graded import GRADED_DEPTH, graded_per_query  # noqa: E402
from cliprec.model import load_clip, text_max_length  # noqa: E402
from cliprec.params import load_params  # noqa: E402
from cliprec.query_embed import LONG_TEXT, QueryEmbedOptions, query_vectors, read_queries, token_counts  # noqa: E402
from cliprec.query_eval import judge  # noqa: E402
from cliprec.stats import paired_comparisons  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "c4_like_requests.txt"


def _val_ndcg(root: Path, category: str, variant: str, p: Any) -> dict[str, Any]:
    """One category x variant: val nDCG@10 per policy and their paired difference."""
    adapter = root / paths.train_dir(category) / paths.ADAPTER_DIR if variant == "lora" else None
    model, processor = load_clip(root / p.active.model.name, adapter=adapter)
    qdir = root / paths.queries_dir(category)
    val = [q for q in read_queries(qdir) if q.split == "val"]
    embed_dir = root / paths.embed_dir(category, variant)
    fused = np.load(embed_dir / "fused.npy")
    row_of = {pid: i for i, pid in enumerate((embed_dir / "ids.txt").read_text().splitlines())}
    meta = [{"relevant": q.relevant} for q in val]
    max_length = text_max_length(model, processor)
    tokens = token_counts(processor, [q.text for q in val if q.text])
    ndcg = {}
    for policy in LONG_TEXT:
        opt = QueryEmbedOptions(p.embed.batch_size, p.embed.text_weight, policy)
        vectors, _ = query_vectors(model, processor, qdir, val, opt)
        positions, _ = exact_topk(vectors, fused, min(GRADED_DEPTH, len(fused)))
        ndcg[policy] = graded_per_query(judge(positions, meta, row_of))["ndcg_at_10"]
    c = paired_comparisons(ndcg["windows"][None], ndcg["truncate"][None], p.evaluate.resamples)[0]
    return {
        "category": category, "variant": variant, "val_queries": len(val), "val_texts": len(tokens),
        "over_max_length": sum(n > max_length for n in tokens), "max_tokens": max(tokens, default=0),
        **{f"ndcg10_{k}": float(v.mean()) for k, v in ndcg.items()},
        "windows_minus_truncate": c.value, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p_value,
    }  # fmt: skip


def choose(rows: list[dict[str, Any]], alpha: float) -> str:
    """The documented rule: windows only if significantly better wherever a val text is long, never worse."""
    long = [r for r in rows if r["over_max_length"]]
    worse = any(r["windows_minus_truncate"] < 0 and r["p"] < alpha for r in rows)
    better = bool(long) and all(r["windows_minus_truncate"] > 0 and r["p"] < alpha for r in long)
    return "windows" if better and not worse else "truncate"


def _fixture_tokens(root: Path, p: Any) -> dict[str, Any]:
    model, processor = load_clip(root / p.active.model.name)
    texts = [t for t in FIXTURE.read_text().splitlines() if t.strip()]
    counts = token_counts(processor, texts)
    limit = text_max_length(model, processor)
    return {"texts": len(texts), "mean_chars": float(np.mean([len(t) for t in texts])),
            "over_max_length": sum(n > limit for n in counts), "max_tokens": max(counts),
            "max_length": limit}  # fmt: skip


def main() -> None:
    """Measure, print, choose; --write records the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="the project root (after `dvc repro`)")
    ap.add_argument("--write", action="store_true", help="write bench/results/long_queries.json")
    args = ap.parse_args()
    p = load_params(args.root / "params.yaml")
    rows = [_val_ndcg(args.root, c, v, p) for c in p.categories for v in paths.VARIANTS]
    fixture = _fixture_tokens(args.root, p)
    print_table(rows, title="Val nDCG@10 by long-text policy (exact search, depth 100)")
    print_table([fixture], title=f"Token counts of {FIXTURE.name} (C4-like first-person requests)")
    choice = choose(rows, p.gate.alpha)
    print(f"\nchoice by the rule: embed.long_text = {choice} (params.yaml has {p.embed.long_text})")
    if args.write:
        print(write_results("long_queries", {"val": rows, "c4_like_fixture": fixture, "choice": choice}))


if __name__ == "__main__":
    main()
