"""Fixtures shared by several test modules."""

import faiss
import pytest


@pytest.fixture
def one_faiss_thread():
    """OpenMP spin-waits make tiny k-means runs ~100x slower on a busy 2-core box; 1 thread is steady."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)
