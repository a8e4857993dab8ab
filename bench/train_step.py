"""LoRA training-step time, fp32 against AMP (bf16 autocast), for the demo CLIP and a ViT-B/32-shaped CLIP.

The step is the library's own: `cliprec.train._train_step` (both towers under
`cliprec.precision.autocast`, `cliprec.loss.clip_loss`, backward through the `grad_scaler`, grad-norm
clip, AdamW + warm-up/cosine scheduler from `cliprec.train._optimizer`) on a model wrapped by
`cliprec.model.add_lora` with params.yaml's `lora:` block (r 8, alpha 16, dropout 0.1, q_proj/v_proj)
and its `train:` settings. The batch comes from `cliprec.train.load_pairs` over synthetic demo-catalog
products made the way the pipeline makes them (bench/_common.synthetic_products): token ids trimmed to
the batch's longest summary, 224 px uint8 photos resized/cropped for the model, MAIN or alt at random.

Models: the demo CLIP (models/demo-clip) and transformers' default CLIPConfig (ViT-B/32 shape, random fp32
weights; bench/_common.vit_b32_clip). fp32 and AMP share one LoRA model and optimizer; their steps
alternate (after --warmup steps of each), so load drifting on a shared machine hits both alike.
Reported per model and precision: median ms/step, steps/s, samples/s and the time ratio to fp32. On a CPU
without native bf16 (this one) AMP is expected to be several times slower; the script only measures.

Run from the repo root:
    python bench/train_step.py                    # batch 32, 5 steps each: ~45 min on 2 CPU cores, nearly all
                                                  # of it ViT-B/32 AMP steps (emulated bf16, minutes each)
    python bench/train_step.py --quick            # smoke test: batch 4, 1 step, 1-layer ViT-B/32, < 1 min
    python bench/train_step.py --device cuda --steps 20 --warmup 3   # GPU: AMP = bf16 autocast; all offline
Writes bench/results/train_step.json (with --quick: bench/results/train_step.quick.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import tempfile
import types
from collections.abc import Sequence
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
from transformers.utils import logging as hf_logging

from cliprec.model import add_lora, text_max_length
from cliprec.pairs import PairData, load_pairs
from cliprec.params import load_params
from cliprec.precision import amp_dtype, grad_scaler, pick_device
from cliprec.train import TrainConfig, _optimizer, _Run, _Towers, _train_step, epoch_plan

MODELS = ("demo", "vitb32")
FULL = {"batch_size": 32, "steps": 5, "warmup": 1, "vitb32_layers": 12}
# bf16 matmuls are emulated on this CPU: one full-depth ViT-B/32 AMP step alone would take minutes
QUICK = {"batch_size": 4, "steps": 1, "warmup": 1, "vitb32_layers": 1}
BATCHES = 2  # distinct batches the steps cycle through (products = BATCHES x batch size)


def make_pairs(n: int, work_dir: Path, seed: int) -> PairData:
    """n (summary, photo) training pairs via the library's loader, every product in the train split."""
    with quiet():
        images_dir, summaries = synthetic_products(n, work_dir / "catalog", seed=seed)
    products_path, summaries_path = work_dir / "products.parquet", work_dir / "summaries.parquet"
    pd.DataFrame({"id": summaries["id"], "split": "train"}).to_parquet(products_path)
    summaries.to_parquet(summaries_path)
    with quiet():
        return load_pairs(products_path, summaries_path, images_dir, splits=("train",))["train"]


def bench_model(
    name: str, args: argparse.Namespace, device: torch.device, work_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time alternating fp32 and AMP LoRA steps of one model; return (table rows, details for the JSON)."""
    model, processor = bench_clip(name, device, args.vitb32_layers)
    if name == "vitb32" and args.vitb32_layers != 12:
        name = f"vitb32 ({args.vitb32_layers} layers)"
    params = load_params(REPO_ROOT / "params.yaml")
    base = dataclasses.replace(TrainConfig.from_params(params), model=name, batch_size=args.batch_size)
    data = make_pairs(BATCHES * args.batch_size, work_dir, args.seed)
    max_length = text_max_length(model, processor)

    torch.manual_seed(base.seed)
    model = add_lora(model, base.lora, base.train_logit_scale)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_steps = 2 * (args.warmup + args.steps)
    optimizer, scheduler = _optimizer(model, base, total_steps)
    towers = _Towers(model).train()
    order, rows = epoch_plan(data, base.seed, 0)
    # decoded once: the benchmark times the step (forward, loss, backward, update), not JPEG decoding
    prepared = []
    for i in range(BATCHES):
        idx = order[i * args.batch_size : (i + 1) * args.batch_size]
        prepared.append(
            (*data.tokens(idx, processor, max_length), data.pixels(rows[idx].tolist(), processor))
        )
    data.close()
    batches = itertools.cycle(prepared)
    configs = {"fp32": dataclasses.replace(base, amp=False), "amp": dataclasses.replace(base, amp=True)}
    # the step reads only the device and its rank/world from the Accelerator: one process here
    acc = types.SimpleNamespace(device=device, num_processes=1, process_index=0)
    runs = {
        key: _Run(
            cfg=cfg,
            acc=acc,
            model=model,
            processor=processor,
            max_length=max_length,
            train_data=data,
            val_data=data,
            batch=args.batch_size,
            steps_per_epoch=BATCHES,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=grad_scaler(device, cfg.amp),
            trainable=trainable,
            towers=towers,
        )
        for key, cfg in configs.items()
    }
    token_lengths: list[int] = []

    def step(key: str) -> None:
        """One library training step on the next batch, in `key`'s precision (fp32 or amp)."""
        input_ids, mask, pixels = next(batches)
        token_lengths.append(int(input_ids.shape[1]))  # padded to the batch's longest text
        _train_step(runs[key], input_ids, mask, pixels)
        synchronize(device)

    times = interleaved_times({key: functools.partial(step, key) for key in configs}, args.steps, args.warmup)
    med = {key: statistics.median(t) for key, t in times.items()}
    precision = {"fp32": "fp32", "amp": f"amp ({str(amp_dtype(device)).removeprefix('torch.')} autocast)"}
    table = [
        {
            "model": name,
            "precision": precision[key],
            "batch": args.batch_size,
            "ms/step": 1000 * med[key],
            "steps/s": 1 / med[key],
            "samples/s": args.batch_size / med[key],
            "time / fp32": med[key] / med["fp32"],
        }
        for key in ("fp32", "amp")
    ]
    details = {
        "times_s": times,
        "median_s": med,
        "amp_over_fp32": med["amp"] / med["fp32"],
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "text_tokens_mean": statistics.mean(token_lengths),
        "image_size": int(prepared[0][2].shape[-1]),
        "lora": dict(base.lora),
        "grad_clip": base.grad_clip,
        "lr": base.lr,
    }
    return table, details


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; --quick fills in the tiny sizes for what is not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {FULL['batch_size']}")
    p.add_argument(
        "--steps", type=int, default=None, help=f"timed steps per precision (default {FULL['steps']})"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help=f"untimed steps per precision (default {FULL['warmup']})"
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument(
        "--vitb32-layers", type=int, default=None, help="layers per ViT-B/32 tower (default 12, --quick 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic catalog seed")
    p.add_argument("--out", default=None, help="results name: bench/results/<out>.json (default train_step)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test {QUICK} (< 1 min on 2 cores); writes train_step.quick.json",
    )
    args = p.parse_args(argv)
    return fill_defaults(args, {**FULL, **(QUICK if args.quick else {})})


def main(argv: Sequence[str] | None = None) -> None:
    """Time every model, print the table, write the JSON."""
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # "Loading weights" bars
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        for name in args.models:
            work_dir = Path(tmp) / name
            work_dir.mkdir()
            model_rows, details[name] = bench_model(name, args, device, work_dir)
            rows += model_rows
    print_table(
        rows,
        title=f"LoRA train step on {device.type}, batch {args.batch_size}, median of {args.steps} steps "
        f"(after {args.warmup} warm-up)",
    )
    config = {
        "device": device.type,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": args.quick,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    payload = {"config": config, "rows": rows, "models": details}
    out = args.out or ("train_step.quick" if args.quick else "train_step")
    print(f"\nwrote {write_results(out, payload)}")


if __name__ == "__main__":
    main()
