"""Build the demo CLIP into models/demo-clip (offline, CPU, deterministic) and write its README.

    python scripts/build_demo_clip.py [--out models/demo-clip] [--steps N] [--no-verify]

Pre-trains on synthetic web-style pictures and captions (cliprec_worlds.demo_clip), then checks zero-shot
text->image retrieval on a freshly generated demo catalog of each category and records everything in
<out>/README.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

from cliprec_worlds.demo.synthetic import generate_catalog
from cliprec_worlds.demo_clip import BuildConfig, build_demo_clip, write_readme, zero_shot_recall

log = logging.getLogger("build_demo_clip")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build, verify, write the README."""
    defaults = BuildConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/demo-clip"))
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--n-images", type=int, default=defaults.n_images)
    ap.add_argument("--verify-categories", nargs="*", default=["Amazon_Fashion", "Appliances"])
    ap.add_argument("--verify-products", type=int, default=2500, help="catalog size of the zero-shot check")
    ap.add_argument("--gallery-size", type=int, default=250, help="test-split-sized gallery (10%% of 2500)")
    ap.add_argument("--no-verify", action="store_true", help="skip the zero-shot check on the demo catalog")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = BuildConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, n_images=args.n_images)
    stats = build_demo_clip(args.out, cfg)
    zero_shot = {}
    t0 = time.perf_counter()
    if not args.no_verify:
        with tempfile.TemporaryDirectory(prefix="demo-clip-check-") as tmp:
            for category in args.verify_categories:
                jsonl = generate_catalog(category, args.verify_products, args.seed, Path(tmp) / category)
                zero_shot[category] = zero_shot_recall(args.out, jsonl, args.gallery_size, args.seed)
                log.info("zero-shot %s: %s", category, zero_shot[category])
    stats["verify_seconds"] = round(time.perf_counter() - t0, 1)
    command = "python scripts/build_demo_clip.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    readme = write_readme(args.out, stats, zero_shot, command.strip())
    log.info("wrote %s", readme)


if __name__ == "__main__":
    main()
