"""Embedding throughput: the embed stage's data path + model against a bare forward loop, images and texts.

Measured for the demo CLIP (models/demo-clip) and for a ViT-B/32-shaped CLIP (transformers' default
CLIPConfig, random fp32 weights: the FLOPs of openai/clip-vit-base-patch32, ~8.8 GFLOP per image and
~6.0 per 77-token text), each under torch.inference_mode, fp32 or (--amp) cliprec.precision.autocast:

- images, path: cliprec.embed's image loop as in `embed_catalog`: parquet shards -> `_view_batches` ->
  JPEG decode + resize/crop (`decode_jpeg`, `image_pixels`) in `prefetch`'s threads -> `_images`
  (normalise on the device, forward, features back to the host).
- images, bare: `image_features` on one pre-made normalised pixel batch on the device, same batch sizes.
- texts, path: `cliprec.embed.encode_texts` (tokenise, padded to the longest text of each batch, forward).
- texts, bare: `text_features` on pre-tokenised ids padded/truncated to 77 tokens (the stated 6.0 GFLOP).
- catalog: `embed_catalog` end to end (MAIN + alt photos, summaries, fusion, .npy memmaps) against the
  bare time of the same photos and texts.

Input: --n synthetic demo-catalog products made the way the pipeline makes them
(bench/_common.synthetic_products): 2 photos each as 224 px JPEG q90 in parquet shards, and extractive
summaries of at most 60 words. Times are medians of --repeats rounds; each round runs every variant once
in turn (after --warmup rounds), so that load drifting on a shared machine hits path and bare alike.
Reported: items/s, the ratio path/bare (goal >= 0.9: decoding, resizing and batching must not be the
bottleneck), GFLOP per item counted with torch.utils.flop_counter.FlopCounterMode, and GFLOP/s achieved.

Run from the repo root:
    python bench/embed_throughput.py                      # n=512, batch 256, 5 repeats: ~45 min on 2 cores
    python bench/embed_throughput.py --quick              # smoke test: tiny sizes, < 1 min on 2 cores
    python bench/embed_throughput.py --device cuda --amp  # GPU, bf16 autocast (all offline)
Writes bench/results/embed_throughput.json (with --quick: bench/results/embed_throughput.quick.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import (
    REPO_ROOT,
    bench_clip,
    fill_defaults,
    interleaved_times,
    print_table,
    quiet,
    synchronize,
    synthetic_products,
    write_results,
)
from torch.utils import flop_counter
from transformers import CLIPProcessor
from transformers.utils import logging as hf_logging

from cliprec.embed import PREFETCH, EmbedOptions, _images, _view_batches, embed_catalog, encode_texts
from cliprec.model import (
    decode_pixels,
    image_features,
    normalize_pixels,
    text_features,
    text_max_length,
    tokenize,
)
from cliprec.pairs import prefetch
from cliprec.params import load_params
from cliprec.precision import amp_dtype, autocast, pick_device
from cliprec.shards import read_image_table

GOAL_RATIO = 0.9
MODELS = ("demo", "vitb32")
BARE_TEXT_TOKENS = 77  # CLIP's context: the ~6.0 GFLOP per ViT-B/32 text assume full-length texts
FULL = {"n": 512, "repeats": 5, "warmup": 1}
QUICK = {"n": 4, "batch_size": 4, "repeats": 1, "warmup": 1}


# --- what is timed --------------------------------------------------------------------------------------


def image_path(
    model: torch.nn.Module,
    processor: CLIPProcessor,
    images_dir: Path,
    keep: set[str],
    batch_size: int,
    device: torch.device,
    amp: bool,
) -> int:
    """embed_catalog's image loop: shards -> decode + resize/crop in threads -> model; returns the count."""

    def prepare(batch: tuple[str, list[str], list[bytes]]) -> torch.Tensor:
        return decode_pixels(processor, batch[2])  # embed_catalog's own preparation

    workers = min(4, os.cpu_count() or 1)  # embed_catalog's default
    n = 0
    for pixels in prefetch(prepare, _view_batches(images_dir, keep, batch_size), workers, PREFETCH):
        n += len(_images(model, processor, pixels, device, amp))
    return n


def catalog_path(
    model: torch.nn.Module,
    processor: CLIPProcessor,
    images_dir: Path,
    summaries_path: Path,
    out_dir: Path,
    batch_size: int,
    device: torch.device,
    amp: bool,
) -> None:
    """The whole embed stage minus model loading: embed_catalog (its progress bar silenced)."""
    with quiet():
        embed_catalog(
            model,
            processor,
            images_dir,
            summaries_path,
            out_dir,
            options=EmbedOptions(batch_size=batch_size, amp=amp, device=device),
        )


@torch.inference_mode()
def bare_images(
    model: torch.nn.Module, pixels: torch.Tensor, sizes: Sequence[int], device: torch.device, amp: bool
) -> None:
    """image_features on slices of one pre-made normalised batch already on the device."""
    with autocast(device, amp):
        for k in sizes:
            image_features(model, pixels[:k])
    synchronize(device)


@torch.inference_mode()
def bare_texts(
    model: torch.nn.Module,
    tokens: dict[str, torch.Tensor],
    sizes: Sequence[int],
    device: torch.device,
    amp: bool,
) -> None:
    """text_features on slices of one pre-tokenised batch already on the device."""
    with autocast(device, amp):
        for k in sizes:
            text_features(model, tokens["input_ids"][:k], tokens["attention_mask"][:k])
    synchronize(device)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches that split n items into batch_size chunks (the last may be short)."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


# --- FLOPs ----------------------------------------------------------------------------------------------


def _sdpa_cpu_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of the CPU flash-attention kernel: the formula torch uses for the GPU ones."""
    return flop_counter.sdpa_flop_count(query, key, value)


def count_cpu_attention() -> None:
    """Make FlopCounterMode count scaled_dot_product_attention on the CPU (torch 2.13 leaves it out)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op)(_sdpa_cpu_flops)


@torch.inference_mode()
def flops_per_item(fn: Callable[[], Any], n_items: int) -> float:
    """FLOPs of one call of fn (FlopCounterMode: matmuls, convolutions, attention) per item."""
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / n_items


def path_text_flops(
    model: torch.nn.Module,
    processor: CLIPProcessor,
    texts: Sequence[str],
    batch_size: int,
    device: torch.device,
) -> tuple[float, float]:
    """(mean FLOPs per text, mean padded length) of encode_texts, whose batches pad to their longest text."""
    max_length = text_max_length(model, processor)
    flops_at: dict[int, float] = {}
    total = tokens = 0.0
    for start in range(0, len(texts), batch_size):
        batch = tokenize(processor, texts[start : start + batch_size], max_length)
        length = batch["input_ids"].shape[1]
        if length not in flops_at:
            ids, mask = batch["input_ids"][:1].to(device), batch["attention_mask"][:1].to(device)
            flops_at[length] = flops_per_item(lambda ids=ids, mask=mask: text_features(model, ids, mask), 1)
        k = len(batch["input_ids"])
        total += k * flops_at[length]
        tokens += k * length
    return total / len(texts), tokens / len(texts)


# --- one model ------------------------------------------------------------------------------------------


def bench_model(
    name: str,
    model: torch.nn.Module,
    processor: CLIPProcessor,
    images_dir: Path,
    summaries: pd.DataFrame,
    work_dir: Path,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time every variant for one model; return (table rows, details for the JSON)."""
    bs, amp = args.batch_size, args.amp
    texts = summaries["summary"].tolist()
    keep = set(summaries["id"])
    summaries_path = work_dir / "summaries.parquet"
    summaries.to_parquet(summaries_path)
    views = read_image_table(images_dir, columns=["id", "view"])
    n_main, n_alt = int((views["view"] == "main").sum()), int((views["view"] == "alt").sum())
    image_sizes = batch_sizes(n_main, bs) + batch_sizes(n_alt, bs)
    text_sizes = batch_sizes(len(texts), bs)

    # pre-made inputs of the bare loops: real photos and summaries, prepared once, already on the device
    jpegs = read_image_table(images_dir, columns=["jpeg"])["jpeg"].tolist()[: max(image_sizes)]
    pixels = normalize_pixels(decode_pixels(processor, jpegs).to(device), processor)
    tokens = processor.tokenizer(
        texts[: max(text_sizes)],
        padding="max_length",
        truncation=True,
        max_length=BARE_TEXT_TOKENS,
        return_tensors="pt",
    ).to(device)

    image_flops = flops_per_item(lambda: image_features(model, pixels[:2]), len(pixels[:2]))
    bare_text_flops = flops_per_item(
        lambda: text_features(model, tokens["input_ids"][:2], tokens["attention_mask"][:2]),
        len(tokens["input_ids"][:2]),
    )
    text_flops, path_tokens = path_text_flops(model, processor, texts, bs, device)
    print(
        f"{name}: GFLOP per item (FlopCounterMode): image {image_flops / 1e9:.3f}, "
        f"text at {BARE_TEXT_TOKENS} tokens {bare_text_flops / 1e9:.3f}, "
        f"text as encode_texts pads it (mean {path_tokens:.1f} tokens) {text_flops / 1e9:.3f}"
    )

    fns: dict[str, Callable[[], Any]] = {
        "images_path": lambda: image_path(model, processor, images_dir, keep, bs, device, amp),
        "images_bare": lambda: bare_images(model, pixels, image_sizes, device, amp),
        "texts_path": lambda: encode_texts(model, processor, texts, bs, device, amp),
        "texts_bare": lambda: bare_texts(model, tokens, text_sizes, device, amp),
    }
    if not args.no_catalog:
        fns["catalog_path"] = lambda: catalog_path(
            model, processor, images_dir, summaries_path, work_dir / "embed", bs, device, amp
        )
    times = interleaved_times(fns, args.repeats, args.warmup)
    med = {key: statistics.median(t) for key, t in times.items()}

    n_img, n_txt = len(views), len(texts)
    rows = [
        _row(name, "images", n_img, med["images_path"], med["images_bare"], image_flops, image_flops),
        _row(name, "texts", n_txt, med["texts_path"], med["texts_bare"], text_flops, bare_text_flops),
    ]
    if "catalog_path" in med:
        # bare equivalent of a product: its photos and its text through the bare loops
        bare = med["images_bare"] + med["texts_bare"]
        path_flops = (n_img * image_flops + n_txt * text_flops) / n_txt
        bare_flops = (n_img * image_flops + n_txt * bare_text_flops) / n_txt
        rows.append(_row(name, "catalog", n_txt, med["catalog_path"], bare, path_flops, bare_flops))
    details = {
        "times_s": times,
        "median_s": med,
        "n_images": {"main": n_main, "alt": n_alt},
        "n_texts": n_txt,
        "image_batch_sizes": image_sizes,
        "text_batch_sizes": text_sizes,
        "gflop_per_image": image_flops / 1e9,
        "gflop_per_text_bare": bare_text_flops / 1e9,
        "gflop_per_text_path": text_flops / 1e9,
        "bare_text_tokens": BARE_TEXT_TOKENS,
        "path_text_tokens_mean": path_tokens,
        "summary_words_mean": float(summaries["summary"].str.split().str.len().mean()),
    }
    return rows, details


def _row(
    model: str, what: str, items: int, path_s: float, bare_s: float, path_flops: float, bare_flops: float
) -> dict[str, Any]:
    """One table row: rates, ratio, FLOPs per item and GFLOP/s of the path and the bare loop."""
    path_rate, bare_rate = items / path_s, items / bare_s
    ratio = path_rate / bare_rate
    return {
        "model": model,
        "input": what,
        "items": items,
        "path items/s": path_rate,
        "bare items/s": bare_rate,
        "path/bare": ratio,
        f">= {GOAL_RATIO}": ratio >= GOAL_RATIO,
        "path GFLOP/item": path_flops / 1e9,
        "bare GFLOP/item": bare_flops / 1e9,
        "path GFLOP/s": path_rate * path_flops / 1e9,
        "bare GFLOP/s": bare_rate * bare_flops / 1e9,
    }


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; --quick fills in the tiny sizes for what is not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true", help="cliprec.precision.autocast (bf16) around the forwards")
    p.add_argument("--batch-size", type=int, default=None, help="default: params.yaml embed.batch_size")
    p.add_argument("--n", type=int, default=None, help=f"products, 2 photos each (default {FULL['n']})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed rounds (default {FULL['repeats']})")
    p.add_argument(
        "--warmup", type=int, default=None, help=f"untimed rounds first (default {FULL['warmup']})"
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--no-catalog", action="store_true", help="skip the end-to-end embed_catalog variant")
    p.add_argument("--seed", type=int, default=0, help="synthetic catalog seed")
    p.add_argument(
        "--out", default=None, help="results name: bench/results/<out>.json (default embed_throughput)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test {QUICK} (< 1 min on 2 cores); writes embed_throughput.quick.json instead",
    )
    args = p.parse_args(argv)
    batch_size = load_params(REPO_ROOT / "params.yaml").embed.batch_size
    return fill_defaults(args, {**FULL, "batch_size": batch_size, **(QUICK if args.quick else {})})


def main(argv: Sequence[str] | None = None) -> None:
    """Make the catalog, time every model, print the table, write the JSON."""
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    count_cpu_attention()
    hf_logging.disable_progress_bar()  # "Loading weights" bars
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        with quiet():
            images_dir, summaries = synthetic_products(args.n, Path(tmp) / "catalog", seed=args.seed)
        for name in args.models:
            model, processor = bench_clip(name, device)
            work_dir = Path(tmp) / name
            work_dir.mkdir()
            model_rows, details[name] = bench_model(
                name, model, processor, images_dir, summaries, work_dir, args, device
            )
            rows += model_rows
            del model
    precision = str(amp_dtype(device)).removeprefix("torch.") + " autocast" if args.amp else "fp32"
    print_table(
        rows,
        title=f"Embedding throughput on {device.type} ({precision}), batch {args.batch_size}, "
        f"{args.n} products, median of {args.repeats}",
    )
    config = {
        "device": device.type,
        "amp": args.amp,
        "precision": precision,
        "batch_size": args.batch_size,
        "n_products": args.n,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "prefetch_workers": min(4, os.cpu_count() or 1),
    }
    payload = {"config": config, "goal_ratio": GOAL_RATIO, "rows": rows, "models": details}
    out = args.out or ("embed_throughput.quick" if args.quick else "embed_throughput")
    print(f"\nwrote {write_results(out, payload)}")


if __name__ == "__main__":
    main()
