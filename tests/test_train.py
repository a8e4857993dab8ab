import dataclasses
import json
import logging
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import make_catalog, make_clip
from safetensors.torch import load_file

import cliprec.train as tr
from cliprec import precision
from cliprec.artifacts import verify_files
from cliprec.loss import clip_loss
from cliprec.params import load_params
from cliprec.train import warmup_cosine
from cliprec.train_state import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"clip": make_clip(root / "clip"), **make_catalog(root / "data")}


def _cfg(tiny, **kw):
    base = dict(model=str(tiny["clip"]), epochs=2, batch_size=16, lr=1e-2, patience=5, lora=LORA)
    return tr.TrainConfig(**{**base, **kw})


def _run(tiny, root: Path, cfg):
    where = tr.TrainPaths(tiny["products"], tiny["summaries"], tiny["images"], root / "out", root / "ckpt",
                          root / "live", run_log=root / "runs.jsonl")  # fmt: skip
    return tr.train(cfg, where)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _last_run(root: Path) -> dict:
    """The run log's record of the latest finished run."""
    return json.loads((root / "runs.jsonl").read_text().splitlines()[-1])


def _adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "out" / "adapter" / "adapter_model.safetensors")


# --- the loss --------------------------------------------------------------------------------------------


def test_clip_loss_matches_a_hand_computed_reference():
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    text = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, -1.0]])
    logit_scale = torch.tensor(math.log(2.0))
    i = image.numpy() / np.linalg.norm(image.numpy(), axis=1, keepdims=True)
    t = text.numpy() / np.linalg.norm(text.numpy(), axis=1, keepdims=True)
    logits = 2.0 * i @ t.T

    def ce(rows):  # mean of -log softmax at the diagonal
        return np.mean([np.log(np.exp(r).sum()) - r[k] for k, r in enumerate(rows)])

    want = (ce(logits) + ce(logits.T)) / 2
    assert clip_loss(image, text, logit_scale).item() == pytest.approx(want, rel=1e-6)


def test_ddp_local_loss_equals_the_global_loss_and_its_gradient():
    # What two ranks compute: rows [r*b, (r+1)*b) against the gathered batch. The all-gather's backward sums
    # every rank's gradient into the owner, and DDP averages: grad = (1/W) * d(sum_r L_r) = d(mean_r L_r).
    g = torch.Generator().manual_seed(0)
    image = torch.randn(8, 5, generator=g, requires_grad=True)
    text = torch.randn(8, 5, generator=g, requires_grad=True)
    scale = torch.tensor(math.log(10.0))
    full = clip_loss(image, text, scale)
    full_grads = torch.autograd.grad(full, (image, text))
    b = 4
    local = [
        clip_loss(image[r * b : (r + 1) * b], text[r * b : (r + 1) * b], scale, image, text, r * b)
        for r in (0, 1)
    ]
    summed_grads = torch.autograd.grad(sum(local), (image, text))
    assert torch.stack(local).mean().item() == pytest.approx(full.item(), rel=1e-6)
    for want, got in zip(full_grads, summed_grads, strict=True):
        assert torch.allclose(got / 2, want, atol=1e-6)


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, total_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and 0 <= f(19) < 0.02
    assert all(f(s) >= f(s + 1) for s in range(4, 19))


def test_config_from_params_applies_lr_scale():
    p = load_params(REPO / "params.yaml")
    cfg = tr.TrainConfig.from_params(p)
    assert cfg.lr == pytest.approx(p.lr * p.active.train.lr_scale) and cfg.lr != p.lr
    assert cfg.model == p.active.model.name and cfg.lora == p.lora.model_dump() and cfg.amp is p.amp


# --- training runs -----------------------------------------------------------------------------------------


class Killed(Exception):
    pass


@pytest.mark.slow  # three training runs and a killed one: ~10 s here
def test_training_learns_and_resumes_after_a_kill_to_the_same_adapter(tiny, tmp_path, monkeypatch):
    cfg = _cfg(tiny)
    whole = _run(tiny, tmp_path / "whole", cfg)
    assert whole["best"]["val_loss"] < whole["zeroshot"]["val_loss"]
    assert whole["epochs_run"] == 2 and not whole["stopped_early"] and whole["n_train"] == 44
    assert whole["n_val"] == 15  # P0005 (a val product) has no photo and is skipped
    live = tmp_path / "whole" / "live"
    metrics = json.loads((live / "metrics.json").read_text())
    # a DVC metrics file: `dvc exp show` gets the headline (not DVCLive's step), the curves are its plots
    assert metrics == {"best_val_recall_at_5": tr.logged(whole["best"]["val_recall_at_5"])}
    # committed to git: 4 significant digits, so other CPU kernels' ~1e-7 differences don't show
    train_loss = (live / "plots" / "metrics" / "train_loss.tsv").read_text().split()
    assert all(float(f"{float(v):.4g}") == float(v) for v in train_loss[3::2]) and float(train_loss[3]) != 0
    val_loss = (live / "plots" / "metrics" / "val_loss.tsv").read_text().split()
    assert len(val_loss) == 2 + 2 * 2  # header + (step, value) per epoch
    assert float(val_loss[3]) < whole["zeroshot"]["val_loss"]  # one LoRA epoch already lowers the val loss
    assert json.loads((tmp_path / "whole" / "out" / "summary.json").read_text()) == whole
    assert whole["code"] == tr.run_identity()["code"]
    assert {"torch", "transformers", "peft", "python"} <= set(whole["versions"])
    # the directory is a DVC output: nothing about how the run went (wall clock, resume) is in it ...
    assert not {"seconds", "resumed_from_epoch"} & set(whole)
    # ... that goes to the run log, outside the outputs
    assert _last_run(tmp_path / "whole")["resumed_from_epoch"] is None
    assert _last_run(tmp_path / "whole")["epochs_run"] == 2 and _last_run(tmp_path / "whole")["seconds"] > 0
    assert verify_files(tmp_path / "whole" / "out")["files"].keys() >= {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "summary.json"
    }  # fmt: skip

    # killed in the middle of epoch 2 (2 steps per epoch): only epoch 1's checkpoint is on disk
    calls = {"n": 0}
    step = tr._train_step

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return step(*args, **kwargs)

    monkeypatch.setattr(tr, "_train_step", dying_step)
    with pytest.raises(Killed):
        _run(tiny, tmp_path / "killed", cfg)
    monkeypatch.setattr(tr, "_train_step", step)
    assert torch.load(tmp_path / "killed" / "ckpt" / STATE_FILE, weights_only=True)["epoch"] == 1
    resumed = _run(tiny, tmp_path / "killed", cfg)
    assert _last_run(tmp_path / "killed")["resumed_from_epoch"] == 1
    want, got = _adapter(tmp_path / "whole"), _adapter(tmp_path / "killed")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert resumed == whole
    # every output file, byte for byte: what DVC hashes into dvc.lock (the checkpoint dir included)
    for d in ("out", "live", "ckpt"):
        assert _tree(tmp_path / "killed" / d) == _tree(tmp_path / "whole" / d), d

    # a finished run is never re-exported: a forced rerun (`dvc repro -f`) trains again
    calls["n"] = 0
    monkeypatch.setattr(tr, "_train_step", dying_step)
    with pytest.raises(Killed):
        _run(tiny, tmp_path / "killed", cfg)
    assert calls["n"] == 4


def test_a_code_or_library_change_does_not_resume(tiny, tmp_path, monkeypatch, caplog):
    # what cliprec/loss.py edited, or peft upgraded, between a killed run and its rerun looks like
    cfg = _cfg(tiny, epochs=2)
    step = tr._train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return step(*args, **kwargs)

    monkeypatch.setattr(tr, "_train_step", dying_step)
    with pytest.raises(Killed):
        _run(tiny, tmp_path, cfg)
    monkeypatch.setattr(tr, "_train_step", step)
    real = tr.run_identity
    monkeypatch.setattr(
        tr, "run_identity", lambda: {**real(), "versions": {**real()["versions"], "peft": "9"}}
    )
    with caplog.at_level(logging.INFO):
        summary = _run(tiny, tmp_path, cfg)
    assert _last_run(tmp_path)["resumed_from_epoch"] is None and summary["versions"]["peft"] == "9"
    assert any("code/library version; starting over" in r.getMessage() for r in caplog.records)


def test_changed_config_discards_the_checkpoint_and_amp_runs_on_cpu(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    cfg = _cfg(tiny, epochs=1)
    _run(tiny, tmp_path, cfg)
    old = torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=True)["fingerprint"]
    with caplog.at_level(logging.INFO):
        summary = _run(tiny, tmp_path, dataclasses.replace(cfg, amp=True))  # `dvc exp run -S amp=true`
    messages = [r.getMessage() for r in caplog.records]
    assert any("another config" in m and "starting over" in m for m in messages)
    assert not any(m.startswith("resuming") for m in messages)
    assert sum("no native bf16" in m for m in messages) == 1  # warned once, though autocast ran per step
    assert torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=True)["fingerprint"] != old
    assert summary["amp"] and summary["dtype"] == "bfloat16" and summary["epochs_run"] == 1


def _launch_two_ranks(script: Path, tiny: dict, cfg: tr.TrainConfig, root: Path, timeout: int):
    """`accelerate launch` script on 2 CPU processes (gloo) with argv: cfg, train paths, root/ranks."""
    (root / "ranks").mkdir(parents=True)
    paths = {"products_path": str(tiny["products"]), "summaries_path": str(tiny["summaries"]),
             "images_dir": str(tiny["images"]), "out_dir": str(root / "out"),
             "checkpoint_dir": str(root / "ckpt"), "live_dir": str(root / "live")}  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    args = [json.dumps(dataclasses.asdict(cfg)), json.dumps(paths), str(root / "ranks")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [*launch, str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~20 s: two fresh processes import torch + transformers
def test_two_process_ddp_matches_one_process(tiny, tmp_path):
    # dropout 0: the only randomness left is seeded identically, so 2 x 8 rows == 1 x 16 rows per step
    cfg = _cfg(tiny, epochs=1, lora={**LORA, "dropout": 0.0})
    single = _run(tiny, tmp_path / "single", cfg)
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import json, sys\n"
        "import torch.distributed as dist\n"
        "from cliprec.train import TrainConfig, TrainPaths, train\n"
        "cfg, paths, ranks = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]\n"
        "train(TrainConfig(**cfg), TrainPaths(**paths))\n"
        "rank, world = dist.get_rank(), dist.get_world_size()\n"
        "open(f'{ranks}/rank{rank}.json', 'w').write(json.dumps({'rank': rank, 'world_size': world}))\n"
    )
    root = tmp_path / "ddp"
    done = _launch_two_ranks(script, tiny, cfg, root, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted((root / "ranks").glob("rank*.json"))]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    ddp = json.loads((root / "out" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["batch_size"] == single["batch_size"]
    assert ddp["best"]["val_loss"] == pytest.approx(single["best"]["val_loss"], abs=1e-4)
    want, got = _adapter(tmp_path / "single"), _adapter(root)
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-5), (k, (want[k] - got[k]).abs().max())
    assert any(want[k].abs().max() > 1e-3 for k in want if "lora_B" in k)  # it did train


def test_zero_shot_is_a_candidate_and_can_win(tiny, tmp_path, monkeypatch, caplog):
    # an adapter worse than none on val must not ship: rig val so the untouched model scores best
    real, calls = tr.evaluate, {"n": 0}

    def rigged(*args, **kwargs):
        calls["n"] += 1
        return {**real(*args, **kwargs), "val_recall_at_5": 1.0 if calls["n"] == 1 else 0.5}

    monkeypatch.setattr(tr, "evaluate", rigged)
    with caplog.at_level(logging.WARNING):
        summary = _run(tiny, tmp_path, _cfg(tiny, epochs=2))
    assert any("identity (B = 0); the val split is too small" in r.getMessage() for r in caplog.records)
    assert calls["n"] == 3 and summary["epochs_run"] == 2
    assert summary["best_epoch"] == 0 and summary["adapter_is_identity"] is True
    assert summary["best"]["val_recall_at_5"] == summary["zeroshot"]["val_recall_at_5"] == 1.0
    b_matrices = [v for k, v in _adapter(tmp_path).items() if "lora_B" in k]
    assert b_matrices and all(torch.count_nonzero(b) == 0 for b in b_matrices)  # the identity adapter


def test_a_val_split_too_small_to_choose_on_is_warned_in_the_stage_and_the_summary(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = _run(tiny, tmp_path, _cfg(tiny, epochs=1))
    assert summary["n_val"] == 15 < tr.MIN_VAL_PAIRS
    (warning,) = summary["warnings"]
    assert "only 15 val pairs" in warning and "too coarse" in warning
    assert any(warning in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_split_warnings_thresholds():
    (trivial,) = tr.split_warnings(2)  # the catalog of 82 records: 2 val products
    assert "Recall@5 is 1.0 for every adapter" in trivial and "identity" in trivial
    assert tr.split_warnings(tr.RECALL_K) == [trivial.replace("only 2 ", f"only {tr.RECALL_K} ")]
    (coarse,) = tr.split_warnings(tr.MIN_VAL_PAIRS - 1)
    assert f"fewer than {tr.MIN_VAL_PAIRS}" in coarse
    assert tr.split_warnings(tr.MIN_VAL_PAIRS) == []  # the demo's ~270 val products: no warning


@pytest.mark.slow  # ~20 s: two fresh processes
def test_ddp_decisions_are_rank_zeros(tiny, tmp_path):
    # rank 1's own val numbers would early-stop it after epoch 1 while rank 0 goes on: with every rank
    # deciding for itself, rank 1 left the loop and rank 0 hung in the next collective
    cfg = _cfg(tiny, epochs=3, patience=1, lora={**LORA, "dropout": 0.0})
    script = tmp_path / "ddp_decide.py"
    script.write_text(
        "import json, logging, sys\n"
        "import torch.distributed as dist\n"
        "import cliprec.train as tr\n"
        "cfg, paths, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]\n"
        "real, calls = tr.evaluate, {'n': 0}\n"
        "def rigged(*args, **kwargs):\n"
        "    calls['n'] += 1\n"
        "    score = 0.1 * calls['n'] if dist.get_rank() == 0 else 0.0\n"
        "    return {**real(*args, **kwargs), 'val_recall_at_5': score}\n"
        "tr.evaluate = rigged\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "got = tr.train(tr.TrainConfig(**cfg), tr.TrainPaths(**paths))\n"
        "rank = dist.get_rank()\n"
        "open(f'{out}/rank{rank}.json', 'w').write(json.dumps({'epochs_run': got['epochs_run'],\n"
        "                                                      'evaluations': calls['n']}))\n"
    )
    root = tmp_path / "ddp"
    done = _launch_two_ranks(script, tiny, cfg, root, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((root / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"epochs_run": 3, "evaluations": 4}, {"epochs_run": 3, "evaluations": 0}]
    epoch_lines = [line for line in done.stderr.splitlines() if "cliprec.train: epoch " in line]
    assert len(epoch_lines) == 3 and not any("[rank 1]" in line for line in epoch_lines)  # rank 0 speaks


@pytest.mark.parametrize("swapped", ["ingest", "images"])
def test_the_train_stage_refuses_another_categorys_catalog_or_photos(tmp_path, monkeypatch, capsys, swapped):
    made = make_catalog(tmp_path / "data", category="Tiny")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "categories": ["Tiny"]}))
    directory = made["products"].parent if swapped == "ingest" else made["images"]
    manifest = json.loads((directory / "manifest.json").read_text())  # as if copied from category Other
    (directory / "manifest.json").write_text(json.dumps({**manifest, "category": "Other"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/train.py", "Tiny"])
    with pytest.raises(SystemExit) as stop:  # before any model loads or anything is written
        runpy.run_path(str(REPO / "stages" / "train.py"), run_name="__main__")
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: data/{swapped}/Tiny/manifest.json was built for category Other, not Tiny: rebuild it with "
        f"`dvc repro {swapped}@Tiny`\n"
    )
    assert not (tmp_path / "data" / "train").exists()
