"""LoRA fine-tuning of CLIP on (summary, product photo) pairs: resumable, one process or DDP.

One run: the train and val pairs are streamed (cliprec.pairs: summaries in memory, photos spooled to
one file and decoded per batch a few batches ahead, so memory does not grow with the catalog), the val
Recall@5 of the untouched model is measured (LoRA starts as the identity), then
each epoch trains with the symmetric InfoNCE loss, validates (val loss, text->image Recall@5), logs to
DVCLive and checkpoints. The adapter of the best candidate (by val Recall@5, ties by val loss) is what
gets written, and zero-shot is a candidate: if no epoch beats the untouched model on val, the saved
adapter is the identity (B = 0) and summary.json says `adapter_is_identity: true`.

Resume: each epoch's end writes `state.pt` to the checkpoint dir (`cliprec.train_state`: LoRA weights,
optimizer, scheduler, scaler, every rank's RNG states, history, best so far); a rerun continues after the last
finished epoch and reaches the same adapter as an uninterrupted run. The state carries a fingerprint of the
config, the model, the data, the code (the import closure of this module) and the library versions; a state
that does not match (e.g. after `-S amp=true`, an edit of cliprec/loss.py or a peft upgrade) is deleted and
the run starts over, and so is the state of a FINISHED run (`dvc repro -f` retrains). summary.json says the
code/library identity; whether the run was resumed (and how long it took) is no property of the adapter, so it
goes to the log and to the run log (`run_log`, outside the DVC outputs), and a killed and resumed run writes
the same bytes as an uninterrupted one. DVCLive's files are rebuilt from the state's history on every start,
because `dvc repro` deletes a stage's metrics before running it; its summary (metrics.json, a DVC metrics
file) holds the headline only (`LIVE_SUMMARY`), the curves are its plots.

Small splits: val Recall@5 is what picks the best epoch and stops early. With fewer than
`MIN_VAL_PAIRS` val pairs one query moves it by more than 0.01 and its standard error is 0.05 or more (at
R@5 = 0.5), so epochs cannot be told apart; with 5 or fewer every adapter scores 1.0 and zero-shot (the
identity) wins on the first tie-break it does not lose. Then the stage warns, and summary.json's
`warnings` says so.

DDP (`accelerate launch --multi_gpu --num_processes N stages/train.py <cat>`, CPU or GPU): rank 0
evaluates and makes every decision (best epoch, early stop) and broadcasts it, so the ranks cannot part
ways; it alone logs progress (other ranks log warnings, tagged with their rank). `batch_size`
is the global batch; each rank takes its slice of every global batch, features are all-gathered with
gradients, and every rank scores its rows against the global batch (open_clip's local loss). The
all-gather's backward sums the gradients of all ranks' losses, i.e. N x the gradient of the global mean
loss, and DDP averages over the N ranks: the update equals one process with the whole batch.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cliprec import provenance
from cliprec.artifacts import model_identity, write_json, write_manifest
from cliprec.errors import CliprecError
from cliprec.loss import clip_loss
from cliprec.metrics import retrieval_metrics
from cliprec.model import (
    MAX_LOGIT_SCALE,
    add_lora,
    clip_module,
    image_features,
    load_clip,
    normalize_pixels,
    save_adapter,
    text_features,
    text_max_length,
)
from cliprec.pairs import PairData, load_pairs, prefetch
from cliprec.params import Params
from cliprec.paths import ADAPTER_DIR
from cliprec.precision import amp_dtype, autocast, grad_scaler
from cliprec.provenance import append_run_log
from cliprec.train_state import (
    load_checkpoint,
    load_trainable_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)

log = logging.getLogger(__name__)

TRAIN_LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "accelerate",
    "safetensors",
    "numpy",
    "pillow",
)
LOGGED_DIGITS = 4  # significant digits of the DVCLive figures (see `logged`)
SUMMARY_FILE = "summary.json"
ALT_VIEW_PROB = 0.5  # an example shows its "alt" photo instead of MAIN this often: cheap augmentation
MIN_VAL_PAIRS = 100  # below this, val Recall@5 is too coarse to choose an epoch or stop on (module doc)
RECALL_K = 5  # val Recall@5 decides: a val set of 5 pairs or fewer scores 1.0 whatever the model
# DVCLive's metrics.json, which `dvc exp show` shows, holds only this: the
# per-epoch curves are its plots, the rest of the run is in summary.json
LIVE_SUMMARY = "best_val_recall_at_5"


# The learning-rate schedule of LoRA fine-tuning: linear warm-up, then cosine decay.
#
# Not transformers' `get_cosine_schedule_with_warmup`: its warm-up factor is step / warmup (0 at the first
# step), this one's (step + 1) / warmup, so the numbers differ and swapping it in would change the adapter.
# The demo CLIP's builder (cliprec_worlds/demo_clip.py `_lr_at`) keeps its own copy: it computes the cosine's
# argument as pi * (step - warmup) / n where this takes pi * ((step - warmup) / n), which rounds differently
# in the last bit at some steps, so sharing one would change either the adapter or a rebuilt demo CLIP.
def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up to 1 over `warmup_steps`, then cosine decay towards 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained adapter (all of it goes into the checkpoint fingerprint)."""

    model: str
    epochs: int = 10
    batch_size: int = 128  # global: split over the DDP ranks
    lr: float = 2.0e-5  # effective peak lr (params lr x train.lr_scale)
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3
    train_logit_scale: bool = False
    amp: bool = False
    seed: int = 0
    lora: Mapping[str, Any] = field(
        default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    )

    @classmethod
    def from_params(cls, p: Params) -> TrainConfig:
        """The validated params' shared training keys + the active setup's model and lr_scale."""
        t = p.train
        return cls(
            model=p.active.model.name,
            epochs=p.epochs,
            batch_size=p.batch_size,
            lr=p.effective_lr,
            weight_decay=t.weight_decay,
            warmup_frac=t.warmup_frac,
            grad_clip=t.grad_clip,
            patience=t.patience,
            train_logit_scale=t.train_logit_scale,
            amp=p.amp,
            seed=p.seed,
            lora=p.lora.model_dump(),
        )


# --- model pieces ---------------------------------------------------------------------------------------


class _Towers(torch.nn.Module):
    """Both towers in one forward, so DDP sees (and syncs) every trainable parameter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = image_features(self.model, pixel_values)
        text = text_features(self.model, input_ids, attention_mask)
        return image, text, clip_module(self.model).logit_scale


# --- validation -----------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    processor: Any,
    data: PairData,
    batch_size: int,
    device: torch.device,
    amp: bool,
    max_length: int,
) -> dict[str, float]:
    """val_loss (batches of `batch_size` in order) and text->image Recall@1/5/10, MRR over the split."""
    was_training = model.training
    model.eval()
    images, texts = [], []

    def photos(start: int) -> tuple[int, torch.Tensor]:
        return start, data.pixels(range(start, min(start + batch_size, len(data))), processor)

    for start, pixels in prefetch(photos, range(0, len(data), batch_size)):
        ids, mask = data.tokens(range(start, start + len(pixels)), processor, max_length)
        with autocast(device, amp):
            images.append(image_features(model, normalize_pixels(pixels.to(device), processor)).float())
            texts.append(text_features(model, ids.to(device), mask.to(device)).float())
    model.train(was_training)
    image, text = torch.cat(images), torch.cat(texts)
    scale = clip_module(model).logit_scale.detach().float()
    total = sum(
        clip_loss(image[s : s + batch_size], text[s : s + batch_size], scale).item()
        * len(image[s : s + batch_size])
        for s in range(0, len(image), batch_size)
    )
    m = retrieval_metrics(text.cpu().numpy(), image.cpu().numpy(), np.arange(len(data)), ks=(1, 5, 10))
    return {
        "val_loss": total / len(data),
        "val_recall_at_1": m["recall_at_1"],
        "val_recall_at_5": m["recall_at_5"],
        "val_recall_at_10": m["recall_at_10"],
        "val_mrr": m["mrr"],
    }


def _better(metrics: Mapping[str, float], best: Mapping[str, float]) -> bool:
    # Higher val Recall@5 wins; on a tie (frequent on a small val set) the lower val loss does.
    r, b = metrics["val_recall_at_5"], best["val_recall_at_5"]
    return r > b or (r == b and metrics["val_loss"] < best["val_loss"])


# --- checkpoint + DVCLive -------------------------------------------------------------------------------


def run_identity() -> dict[str, Any]:
    """The code (this module's import closure) and library versions a run uses."""
    return provenance.run_identity(__name__, TRAIN_LIBRARIES)


def fingerprint(
    cfg: TrainConfig, data: Mapping[str, PairData], world_size: int, identity: Mapping[str, Any]
) -> str:
    """Digest of what decides the result: config, model files, data, world size (it shards the data),
    code and library versions."""
    inputs = {
        "config": asdict(cfg),
        "model": model_identity(cfg.model),
        "data": {split: d.digest for split, d in sorted(data.items())},
        "world_size": world_size,
        "alt_view_prob": ALT_VIEW_PROB,
    }
    return provenance.fingerprint_digest(provenance.resume_fingerprint(inputs, identity))


def _open_live(live_dir: Path, params: Mapping[str, Any], history: Sequence[Mapping[str, float]]):
    from dvclive import Live  # imported here: only rank 0 needs it, and it is slow to import
    from scmrepo.exceptions import SCMError

    try:
        live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False)  # dvc.yaml declares metrics/plots
    except SCMError as e:  # DVCLive reads the git HEAD even when it saves no experiment (dvclive#522)
        raise CliprecError(f"DVCLive cannot start ({e}): make a first `git commit`, then rerun") from e
    live.log_params(dict(params))
    for record in history:
        _log_epoch(live, record)
    return live


def _log_epoch(live: Any, record: Mapping[str, Any]) -> None:
    live.step = int(record["epoch"]) - 1
    for name in ("train_loss", "val_loss", "val_recall_at_5", "lr"):
        live.log_metric(name, logged(record[name]))
    live.summary = {LIVE_SUMMARY: logged(record[LIVE_SUMMARY])}  # DVCLive documents editing its summary
    live.next_step()


def logged(x: float) -> float:
    """A training figure as committed to git: 4 significant digits.

    Losses differ across CPU types (AVX2 vs AVX-512 kernels) by ~1e-7 relative; at 4 digits a committed
    figure changes only when a value falls that close to a rounding boundary.
    """
    return float(f"{x:.{LOGGED_DIGITS}g}")


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn import all_gather  # the autograd-aware one: gradients flow back to each rank

    with warnings.catch_warnings():  # deprecated in favour of a private API; semantics verified by tests
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(all_gather(x))


# --- training -------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One training run's fixed pieces: what the loop, its steps and its epochs share."""

    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    model: torch.nn.Module  # with LoRA
    processor: Any
    max_length: int
    train_data: PairData
    val_data: PairData
    batch: int  # global batch (a tiny split gets a smaller one)
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    trainable: list[torch.nn.Parameter]  # what the gradient clip sees
    towers: torch.nn.Module | None = None  # set by `acc.prepare`, after the state is restored

    @property
    def local(self) -> int:
        """This rank's share of the global batch."""
        return self.batch // self.acc.num_processes

    def validate(self) -> dict[str, float]:
        """The val metrics of the model as it is now (see `evaluate`)."""
        return evaluate(self.model, self.processor, self.val_data, self.batch, self.acc.device, self.cfg.amp,
                        self.max_length)  # fmt: skip


@dataclass(frozen=True)
class TrainPaths:
    """What a run reads (catalog, summaries, photos) and where it writes (outputs, checkpoint, DVCLive)."""

    products_path: str | Path
    summaries_path: str | Path
    images_dir: str | Path
    out_dir: str | Path  # adapter/ + summary.json + manifest.json
    checkpoint_dir: str | Path  # state.pt between runs (cliprec.train_state)
    live_dir: str | Path  # DVCLive
    run_log: str | Path | None = None  # how the run went (cliprec.provenance.append_run_log)


def train(cfg: TrainConfig, where: TrainPaths, *, lineage: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune, resumably; write out_dir/adapter/ (best epoch) + out_dir/summary.json; return the latter.

    `lineage` (category, catalog_sha256: what the adapter was trained on) goes into manifest.json.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.time()
    out_dir, checkpoint_dir, live_dir = Path(where.out_dir), Path(where.checkpoint_dir), Path(where.live_dir)
    # cpu=True without CUDA: `accelerate launch --multi_gpu` then gives real gloo DDP (see stack notes).
    # Mixed precision is ours (cliprec.precision), so accelerate's stays off.
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    if cfg.batch_size % acc.num_processes:
        world = acc.num_processes
        raise CliprecError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    if not acc.is_main_process:
        _quiet_other_rank(acc.process_index)
    set_seed(cfg.seed % 2**32)  # numpy takes 32-bit seeds only; params allow any seed >= 0
    model, processor = load_clip(cfg.model, device=acc.device)
    data = load_pairs(where.products_path, where.summaries_path, where.images_dir)
    try:
        run = _setup(cfg, acc, model, processor, data)
        fp = fingerprint(cfg, data, acc.num_processes, identity := run_identity())
        state, resumed_from = _start_or_resume(run, checkpoint_dir, fp)
        _loop(run, state, checkpoint_dir, live_dir)
        summary = None
        if acc.is_main_process:
            summary = _write_adapter(run, state, out_dir, {**identity, "lineage": lineage or {}})
            log.info("best epoch %d: %s -> %s (%s, %.0f s)", state["best"]["epoch"], _fmt(state["best"]),
                     out_dir / ADAPTER_DIR, "from scratch" if resumed_from is None else
                     f"resumed after epoch {resumed_from}", time.time() - started)  # fmt: skip
            if where.run_log is not None:
                append_run_log(where.run_log, {"stage": "train", "out": out_dir.as_posix(),
                               "resumed_from_epoch": resumed_from, "epochs_run": summary["epochs_run"],
                               "best_epoch": summary["best_epoch"], "world_size": acc.num_processes,
                               "seconds": round(time.time() - started, 1)})  # fmt: skip
        acc.wait_for_everyone()
        return summary if summary is not None else {"rank": acc.process_index, "epochs_run": state["epoch"]}
    finally:
        for split in data.values():
            split.close()


def _setup(
    cfg: TrainConfig, acc: Any, model: torch.nn.Module, processor: Any, data: Mapping[str, PairData]
) -> _Run:
    """Batch sizes, the LoRA-wrapped model (the same init on every rank), optimizer, scheduler, scaler."""
    world = acc.num_processes
    train_data, val_data = data["train"], data["val"]
    if len(train_data) < 2 * world or len(val_data) == 0:
        raise CliprecError(f"too little data to train: {len(train_data)} train / {len(val_data)} val pairs")
    batch = min(cfg.batch_size, len(train_data) // world * world)  # a tiny split still gets one step
    steps_per_epoch = len(train_data) // batch  # drop_last: equal, full batches on every rank
    if acc.is_main_process:
        for warning in split_warnings(len(val_data)):  # said before training, and again in summary.json
            log.warning("train: %s", warning)
    max_length = text_max_length(model, processor)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    model = add_lora(model, cfg.lora, cfg.train_logit_scale)
    optimizer, scheduler = _optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _Run(cfg, acc, model, processor, max_length, train_data, val_data, batch, steps_per_epoch,
                optimizer, scheduler, grad_scaler(acc.device, cfg.amp), trainable)  # fmt: skip


def _start_or_resume(run: _Run, checkpoint_dir: Path, fp: str) -> tuple[dict[str, Any], int | None]:
    """(the run's state, the epoch it resumes after: None from scratch); wraps the model for DDP."""
    acc = run.acc
    state = load_checkpoint(checkpoint_dir, fp)
    acc.wait_for_everyone()  # every rank has read it before rank 0 may delete it
    if state is None:
        if acc.is_main_process and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        # rank 0 evaluates and decides; the others take its answer (no rank can leave the loop alone)
        zeroshot = _from_rank0(run.validate, acc.num_processes)
        log.info("zero-shot val: %s", _fmt(zeroshot))
        # the untrained adapter (B = 0: the identity) is the first candidate: an epoch must beat it
        state = {"fingerprint": fp, "epoch": 0, "done": False, "history": [], "zeroshot": zeroshot,
                 "best": {"epoch": 0, **zeroshot}, "best_weights": trainable_state(run.model),
                 "bad_epochs": 0, "live_step": 0}  # fmt: skip
        torch.manual_seed(run.cfg.seed + 1 + acc.process_index)  # dropout masks differ across ranks
        resumed_from = None
    else:
        resumed_from = state["epoch"]
        log.info("resuming after epoch %d of %d from %s", state["epoch"], run.cfg.epochs, checkpoint_dir)
        load_trainable_state(run.model, state["weights"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][acc.process_index])
    run.towers = acc.prepare(_Towers(run.model))  # DDP-wrapped when world > 1
    return state, resumed_from


def _loop(run: _Run, state: dict[str, Any], checkpoint_dir: Path, live_dir: Path) -> None:
    """The epochs from the state's on: train, validate, keep the best, stop early, checkpoint."""
    acc, cfg = run.acc, run.cfg
    params_log = {**asdict(cfg), "lora": dict(cfg.lora), "world_size": acc.num_processes,
                  "device": acc.device.type}  # fmt: skip
    live = _open_live(live_dir, params_log, state["history"]) if acc.is_main_process else None
    for epoch in range(state["epoch"], cfg.epochs):
        if state["done"]:
            break
        train_loss, lr = _train_epoch(run, epoch)

        def decide() -> dict[str, Any]:
            metrics = run.validate()
            return {"metrics": metrics, "better": _better(metrics, state["best"])}

        decision = _from_rank0(decide, acc.num_processes)
        record = _record_epoch(run, state, epoch, decision, {"train_loss": train_loss, "lr": lr})
        rngs = _all_ranks(rng_state(), acc.num_processes)  # each rank has its own dropout stream
        if acc.is_main_process:
            _log_epoch(live, record)
            save_checkpoint(checkpoint_dir, {**state, "weights": trainable_state(run.model),
                            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                            "scaler": run.scaler.state_dict(), "rng": rngs})  # fmt: skip
        acc.wait_for_everyone()
    if live is not None:
        live.end()
        # DVCLive adds its `step` to the summary: one more `dvc exp show` column per category, and the
        # best epoch is in summary.json already
        write_json({LIVE_SUMMARY: live.summary[LIVE_SUMMARY]}, live_dir / "metrics.json")


def _train_epoch(run: _Run, epoch: int) -> tuple[float, float]:
    """One epoch's optimizer steps; (train loss, mean over the ranks and steps; the last step's lr)."""
    acc, rank = run.acc, run.acc.process_index
    run.towers.train()
    order, rows = epoch_plan(run.train_data, run.cfg.seed, epoch)
    # this rank's slice of each step's global batch; its photos are decoded a few steps ahead
    b, local = run.batch, run.local
    slices = [order[s * b + rank * local : s * b + (rank + 1) * local] for s in range(run.steps_per_epoch)]
    photos = functools.partial(_photos, run.train_data, rows, run.processor)
    losses, lr = [], 0.0
    desc = f"epoch {epoch + 1}/{run.cfg.epochs}"
    bar = tqdm(total=run.steps_per_epoch, desc=desc, disable=not acc.is_main_process, leave=False)
    for idx, pixels in prefetch(photos, slices):
        input_ids, mask = run.train_data.tokens(idx, run.processor, run.max_length)
        lr = run.optimizer.param_groups[0]["lr"]
        loss = _train_step(run, input_ids, mask, pixels)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    train_loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64, device=acc.device)
    return float(acc.reduce(train_loss, reduction="mean")), lr


def _record_epoch(
    run: _Run, state: dict[str, Any], epoch: int, decision: Mapping[str, Any], train: Mapping[str, float]
) -> dict[str, Any]:
    """Update the state with rank 0's decision (best so far, bad epochs, early stop); the epoch's record."""
    metrics = decision["metrics"]
    if decision["better"]:
        best = {"epoch": epoch + 1, **metrics}
        state.update(best=best, best_weights=trainable_state(run.model), bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    record = {"epoch": epoch + 1, "train_loss": train["train_loss"], **metrics, "lr": train["lr"],
              "best_val_recall_at_5": state["best"]["val_recall_at_5"]}  # fmt: skip
    log.info("epoch %d/%d: %s", epoch + 1, run.cfg.epochs, _fmt(record))
    state["history"].append(record)
    stop = state["bad_epochs"] >= run.cfg.patience
    if stop:
        log.info("early stop: val Recall@5 has not improved for %d epochs", run.cfg.patience)
    state.update(epoch=epoch + 1, done=stop or epoch + 1 == run.cfg.epochs, live_step=epoch + 1)
    return record


def _write_adapter(
    run: _Run, state: Mapping[str, Any], out_dir: Path, provenance_: Mapping[str, Any]
) -> dict[str, Any]:
    """Rank 0: the best candidate's adapter, summary.json and manifest.json into out_dir; the summary."""
    load_trainable_state(run.model, state["best_weights"])
    adapter_dir = out_dir / ADAPTER_DIR
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(run.model, adapter_dir)
    lineage = provenance_["lineage"]
    identity = {k: v for k, v in provenance_.items() if k != "lineage"}
    # neither wall-clock time nor the resume in it: the directory is a DVC output, its hash must follow
    # from the inputs alone (how the run went goes to the log and the run log)
    summary = {**_summary(run, state), "warnings": split_warnings(len(run.val_data)), **identity}
    write_json(summary, out_dir / SUMMARY_FILE)
    files = [p.relative_to(out_dir).as_posix() for p in adapter_dir.rglob("*") if p.is_file()]
    write_manifest(out_dir, [*files, SUMMARY_FILE], {"model": run.cfg.model, **lineage})
    if summary["adapter_is_identity"]:
        why = "; the val split is too small to tell them apart (summary.json warnings)"
        log.warning(
            "no epoch beat zero-shot on val: the saved adapter is the identity (B = 0)%s",
            why if summary["warnings"] else "",
        )
    return summary


def split_warnings(n_val: int) -> list[str]:
    """Why the val split is too small to choose the best epoch or stop early on (module doc), or []."""
    if n_val <= RECALL_K:
        return [
            f"only {n_val} val pairs: val Recall@{RECALL_K} is 1.0 for every adapter, so no epoch can be "
            f"chosen or stopped on and zero-shot (the identity) wins unless an epoch lowers the val loss; "
            f"use a catalog with at least {MIN_VAL_PAIRS} val products (or a larger split.val)"
        ]
    if n_val < MIN_VAL_PAIRS:
        return [
            f"only {n_val} val pairs (fewer than {MIN_VAL_PAIRS}): one query moves val Recall@{RECALL_K} by "
            f"{1 / n_val:.3f}, too coarse to choose the best epoch or stop early on; use a larger catalog or "
            f"split.val"
        ]
    return []


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    # AdamW with weight decay on the LoRA matrices only (never on the temperature), warm-up + cosine.
    logit_scale = clip_module(model).logit_scale
    lora = [p for p in model.parameters() if p.requires_grad and p is not logit_scale]
    groups = [{"params": lora, "weight_decay": cfg.weight_decay}]
    if cfg.train_logit_scale:
        groups.append({"params": [logit_scale], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    warmup = max(1, round(cfg.warmup_frac * total_steps)) if cfg.warmup_frac > 0 else 0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))


def epoch_plan(data: PairData, seed: int, epoch: int) -> tuple[np.ndarray, torch.Tensor]:
    """The epoch's example order and each example's photo slot (MAIN or, at random, alt); from seed + epoch.

    Independent of the world size and of the global RNG, so every rank and every resume agrees.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(data))
    use_alt = torch.from_numpy(rng.random(len(data)) < ALT_VIEW_PROB) & (data.alt_slot >= 0)
    n = len(data)
    return order, torch.where(use_alt, n + data.alt_slot, torch.arange(n))


def _photos(
    data: PairData, rows: torch.Tensor, processor: Any, idx: np.ndarray
) -> tuple[np.ndarray, torch.Tensor]:
    return idx, data.pixels(rows[idx].tolist(), processor)


def _from_rank0(fn: Callable[[], Any], world: int) -> Any:
    """fn() on rank 0, its result broadcast to every rank: one decision for all, never a hang."""
    if world == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([fn() if dist.get_rank() == 0 else None], from_process=0)[0]


class _RankTag(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


def _quiet_other_rank(rank: int) -> None:
    """Ranks > 0 log warnings only, tagged with their rank: rank 0 speaks for the run."""
    logger = logging.getLogger("cliprec")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _RankTag) for f in logger.filters):
        logger.addFilter(_RankTag(rank))


def _all_ranks(obj: Any, world: int) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank."""
    if world == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _train_step(run: _Run, input_ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> float:
    """One optimizer step on this rank's slice of the global batch (uint8 pixels); returns the local loss."""
    device, cfg = run.acc.device, run.cfg
    pixels = normalize_pixels(pixels.to(device), run.processor)
    with autocast(device, cfg.amp):
        image, text, logit_scale = run.towers(input_ids.to(device), mask.to(device), pixels)
    image, text = image.float(), text.float()
    if run.acc.num_processes > 1:
        offset = run.acc.process_index * len(pixels)
        loss = clip_loss(image, text, logit_scale, _all_gather(image), _all_gather(text), offset=offset)
    else:
        loss = clip_loss(image, text, logit_scale)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)  # clip the true gradient, not the fp16-scaled one
    torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if cfg.train_logit_scale:
        with torch.no_grad():
            logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return float(loss.detach())


def _summary(run: _Run, state: Mapping[str, Any]) -> dict[str, Any]:
    cfg, device = run.cfg, run.acc.device
    best = dict(state["best"])
    return {
        "model": cfg.model,
        "best_epoch": best["epoch"],
        "adapter_is_identity": best.pop("epoch") == 0,  # no epoch beat zero-shot on val
        "best": best,
        "zeroshot": dict(state["zeroshot"]),
        "epochs_run": state["epoch"],
        "epochs": cfg.epochs,
        "stopped_early": state["epoch"] < cfg.epochs,
        "lr": cfg.lr,
        "batch_size": run.batch,
        "steps_per_epoch": run.steps_per_epoch,
        "n_train": len(run.train_data),
        "n_val": len(run.val_data),
        "device": device.type,
        "amp": cfg.amp,
        "dtype": str(amp_dtype(device)).removeprefix("torch.") if cfg.amp else "float32",
        "world_size": run.acc.num_processes,
    }


def _fmt(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
