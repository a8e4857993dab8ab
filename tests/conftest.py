"""Fixtures shared by several test modules."""

import os
from pathlib import Path

import faiss
import pytest
import torch

# Subprocesses (stage scripts, accelerate launch, dvc repro) import the cliprec of this checkout, whatever
# checkout an editable install points at.
REPO = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def one_faiss_thread():
    """OpenMP spin-waits make tiny k-means runs ~100x slower on a busy 2-core box; 1 thread is steady."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads, and spinning OpenMP threads crawl on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline(monkeypatch):
    """The hub libraries in offline mode, with nothing in the HF cache."""
    import huggingface_hub

    from cliprec import hub

    monkeypatch.setattr(hub, "offline_mode", lambda: True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    hub.unreachable.cache_clear()
    yield
    hub.unreachable.cache_clear()
