"""Helpers shared by the test modules (fixtures are in conftest.py); no test module imports another.

The tiny world (seconds on a CPU, no network, no models/ dir): make_clip(dir) saves a 2-layer, 32-d CLIP
on 32 px images + a character-level CLIP tokenizer + the PIL image processor, like models/demo-clip;
make_catalog(root) writes products.parquet (id, title, split) with its manifest, summaries.parquet (id,
summary) and image shards in the images-stage format, where a product's colour is both in its summary and
in its photo, so a few LoRA steps have something to learn. shared_project() builds, once per session, the
fake project the recommend CLI and `cliprec serve` read.

`cliprec serve` as a process: serve_process() and wait_listening() start it on port 0 and read the port it
bound back from its `serve: listening on` line (a port picked by the test and released before the server
binds it could be taken by then); wait_healthy() polls /healthz.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip import CLIPImageProcessorPil

from cliprec import paths
from cliprec.artifacts import catalog_identity, manifest_sha256, write_manifest
from cliprec.embed import EmbedOptions, embed_catalog
from cliprec.evaluate import gallery_digest
from cliprec.index import build_from_embeddings
from cliprec.model import add_lora, load_clip, save_adapter
from cliprec.params import load_params
from cliprec.shards import SHARD_SCHEMA

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
ITEMS = ("shirt", "dress", "shoe", "hat", "bag", "scarf")


def make_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random tiny CLIPModel + CLIPProcessor (char-level tokenizer, PIL processor) to `path`."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):  # every byte, with and without the end-of-word mark
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": 8,
        },
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config)
    path = Path(path)
    model.save_pretrained(str(path))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(path))
    return path


def _photo(rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 64) -> bytes:
    base = np.array(rgb, dtype=np.float64)
    img = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255)
    x0, y0 = rng.integers(0, size // 2, 2)
    img[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.integers(0, 256, 3)  # a distracting patch
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_catalog(
    root: str | Path, category: str = "Tiny", n: int = 64, seed: int = 0, shard_size: int = 40
) -> dict[str, Path]:
    """Write a tiny catalog laid out like cliprec.paths under `root` (= data/); returns its paths.

    {products, summaries, images}: 1/4 of the products are val, 1/16 test, the rest train.

    Every third product has no "alt" photo, and product 5 has no photo at all (a product the images
    stage could not fetch), so readers must skip it.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = list(COLORS)
    rows, summaries, shard_rows = [], [], []
    for i in range(n):
        pid = f"P{i:04d}"
        color, item = names[i % len(names)], ITEMS[(i // len(names)) % len(ITEMS)]
        split = "val" if i % 4 == 1 else ("test" if i % 16 == 3 else "train")
        rows.append({"id": pid, "title": f"{color} {item}", "split": split})
        summaries.append({"id": pid, "summary": f"a {color} {item}, style {i % 5}"})
        if i == 5:
            continue
        views = ["main"] if i % 3 == 0 else ["main", "alt"]
        for view in views:
            jpeg = _photo(COLORS[color], rng)
            shard_rows.append({"id": pid, "view": view, "variant": "MAIN" if view == "main" else "PT01",
                               "url": f"file://{pid}_{view}.jpg", "jpeg": jpeg})  # fmt: skip
    paths = {
        "products": root / "ingest" / category / "products.parquet",
        "summaries": root / "summaries" / category / "summaries.parquet",
        "images": root / "images" / category,
    }
    for p in paths.values():
        (p if p.suffix == "" else p.parent).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(paths["products"], index=False)
    write_manifest(
        paths["products"].parent, [paths["products"].name], {"category": category}
    )  # as ingest does
    pd.DataFrame(summaries).to_parquet(paths["summaries"], index=False)
    shards = []
    for k in range(0, len(shard_rows), shard_size):
        table = pa.Table.from_pylist(shard_rows[k : k + shard_size], schema=SHARD_SCHEMA)
        shards.append(f"shard-{k // shard_size:05d}.parquet")
        pq.write_table(table, paths["images"] / shards[-1])
    # what the images stage writes last: readers verify it
    write_manifest(paths["images"], shards, catalog_identity(paths["products"], category))
    return paths


# --- the fake project of the recommend CLI and `cliprec serve` ---------------------------------------

REPO = Path(__file__).resolve().parents[1]
CAT = "Amazon_Fashion"


def build_project(root: Path) -> Path:
    """params.yaml + models/demo-clip + every file the recommend CLI reads, for CAT and both variants."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    make_clip(root / load_params(root / "params.yaml").active.model.name)
    build_category(root, CAT, n=32)
    return root


def build_category(root: Path, category: str, n: int, seed: int = 0) -> None:
    """What the pipeline writes for one category of the project in `root`, manifests as the stages write."""
    p = load_params(root / "params.yaml")
    model_name = p.active.model.name
    made = make_catalog(root / "scratch" / category, category=category, n=n, seed=seed)
    shutil.copytree(made["products"].parent, root / paths.ingest_dir(category))
    summaries = root / paths.summaries_dir(category) / "summaries.parquet"
    summaries.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(made["summaries"], summaries)
    shutil.copytree(made["images"], root / paths.images_dir(category))
    # a LoRA adapter with random (not zero) B matrices, so that the lora variant differs from zero-shot
    base, _ = load_clip(root / model_name)
    peft = add_lora(base, p.lora.model_dump())
    torch.manual_seed(1 + seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    train_dir = root / paths.train_dir(category)
    save_adapter(peft, train_dir / paths.ADAPTER_DIR)
    adapter_files = [f"{paths.ADAPTER_DIR}/{f.name}" for f in (train_dir / paths.ADAPTER_DIR).iterdir()]
    lineage = catalog_identity(root / paths.products_path(category), category)
    write_manifest(train_dir, adapter_files, {"model": model_name, **lineage})  # as train does
    for variant in paths.VARIANTS:
        adapter = train_dir / paths.ADAPTER_DIR if variant == "lora" else None
        model, processor = load_clip(root / model_name, adapter=adapter)
        embed_catalog(
            model,
            processor,
            root / paths.images_dir(category),
            summaries,
            root / paths.embed_dir(category, variant),
            options=EmbedOptions(text_weight=p.embed.text_weight),
            info={
                "model": model_name,
                "variant": variant,
                "adapter": str(adapter) if adapter else None,
                **lineage,
                "adapter_sha256": manifest_sha256(train_dir) if adapter else None,
            },
        )  # as stages/embed.py does
        build_from_embeddings(
            root / paths.embed_dir(category, variant),
            root / paths.index_dir(category, variant),
            factory=p.index.factory,
            memory_budget_mb=p.index.memory_budget_mb,
            variant=variant,
            category=category,
        )


def photo_file(path: Path, color: str = "red") -> Path:
    """An 80 x 60 JPEG of one of COLORS at `path`."""
    Image.new("RGB", (80, 60), COLORS[color]).save(path, "JPEG")
    return path


def shared_project(tmp_path_factory) -> Path:
    """Build the fake project once per test session (the recommend, CLI and serve tests share it)."""
    root = tmp_path_factory.getbasetemp() / "recommend-project"
    done = root / ".built"
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: threads only add contention on a busy 2-core box
        try:
            build_project(root)
        finally:
            torch.set_num_threads(threads)
        done.write_text("ok\n")
    return root


# --- the evaluate stage's ranks file ----------------------------------------------------------------------


def ranks_doc(t2i: list[int], alt: list[int | None] | None = None, ids: list[str] | None = None) -> dict:
    """A ranks file as the evaluate stage writes it (two modes are enough here)."""
    ids = ids or [f"P{i:03d}" for i in range(len(t2i))]
    alt = alt if alt is not None else [None] * len(t2i)
    return {
        "test_set": {"ids_sha256": gallery_digest(ids), "gallery_size": len(ids)},
        "ks": [1, 5, 10],
        "ids": ids,
        "ranks": {"text_to_image": t2i, "image_to_image": alt},
    }


def with_queries(doc: dict, judged: list[list[list[int]]], ids: list[str] | None = None) -> dict:
    """A ranks file with a shopper `queries` mode as the evaluate stage writes it ([rank, grade] lists)."""
    from cliprec.query_eval import query_digest

    ids = ids or [f"q{i:03d}" for i in range(len(judged))]
    out = {**doc, "ranks": {**doc["ranks"], "queries": judged}, "exact": {"queries": judged}}
    out["query_sets"] = {"queries": {"ids_sha256": query_digest(ids), "queries": len(ids), "depth": 100,
                                     "ids": ids, "target_split": ["test"] * len(ids)}}  # fmt: skip
    return out


# --- `cliprec serve` as a process -------------------------------------------------------------------------

LISTENING = re.compile(r"serve: listening on (http://\S+) \(")


def serve_command(root: Path, *args: str) -> list[str]:
    """`cliprec serve` of this checkout on a port the kernel picks (it logs the one it bound)."""
    return [sys.executable, "-m", "cliprec.cli", "--root", str(root), "serve", "--port", "0", *args]


def listening_url(log: str) -> str | None:
    """The base url of a `serve: listening on ...` line in `log`, if any."""
    found = LISTENING.search(log)
    return found.group(1) if found else None


def _default_sigint() -> None:
    # a terminal's Ctrl-C: the default SIGINT action, also when pytest itself runs in the background
    # (a non-interactive shell starts background jobs with SIGINT ignored, and the child would inherit it)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def serve_process(root: Path, *args: str) -> tuple[subprocess.Popen, str, str]:
    """`cliprec serve` on port 0, output piped: (process, its base url, its output up to that line)."""
    proc = subprocess.Popen(
        serve_command(root, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )
    head = []
    for line in proc.stdout:
        head.append(line)
        if url := listening_url(line):
            return proc, url, "".join(head)
    proc.wait()
    raise AssertionError(f"cliprec serve exited with {proc.returncode} before listening:\n{''.join(head)}")


def wait_listening(proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> str:
    """The base url `proc` (a `cliprec serve` writing to `log`) logs once it has bound its port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if url := listening_url(log.read_text()):
            return url
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"cliprec serve did not listen within {timeout_s:.0f} s:\n{log.read_text()}")


def wait_healthy(url: str, timeout_s: float, poll_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url/healthz until 200; fail when timeout_s passes or proc (the server process, if any) exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc is None or proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        time.sleep(poll_s)
    raise AssertionError(f"the server at {url} did not get ready in {timeout_s:.0f} s")


def listening_socket() -> socket.socket:
    """A loopback socket bound to a port the kernel picks, to hand to a server (uvicorn's sockets=)."""
    return socket.create_server(("127.0.0.1", 0))


# --- a script run in a subprocess, watched from the inside -----------------------------------------------

_PROBE = """\
import json, runpy, sys
from pathlib import Path
report, script, *args = sys.argv[1:]
network = []  # name look-ups and connections: where DNS fails no connect is ever tried
def watch(event, args):
    if event == "socket.getaddrinfo":
        network.append(f"look-up {args[0]}")
    elif event == "socket.connect":
        network.append(f"connect {args[1]!r}")
sys.addaudithook(watch)
sys.argv, sys.path[0] = [script, *args], str(Path(script).parent)  # as `python script args` sets them
try:
    runpy.run_path(script, run_name="__main__")
finally:
    Path(report).write_text(json.dumps({"modules": sorted(sys.modules), "network": network}))
"""


def run_probed(
    script: Path, *args: str, cwd: Path, env: dict, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `python script args` in cwd: (its CompletedProcess, {"modules": what it had imported when it
    ended, "network": the names it looked up and addresses it connected to}), seen from inside it."""
    report = cwd / "probe.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(report), str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, json.loads(report.read_text())
