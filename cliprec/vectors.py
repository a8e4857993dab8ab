"""Vector math shared by embedding, indexing, evaluation and serving: the fused product vector.

Apart from cliprec/index.py so that the stages which only fuse vectors (`embed`) do not depend on FAISS's
index choice: an edit to the `auto` rules reruns only `index` and what reads the index.
"""

from __future__ import annotations

import numpy as np


def l2_normalise(v: np.ndarray) -> np.ndarray:
    """Row-wise unit vectors (a zero row stays zero), float32."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)


def fuse(text: np.ndarray, image: np.ndarray, text_weight: float) -> np.ndarray:
    """Row-wise normalise(w * text + (1 - w) * image), float32."""
    v = text_weight * np.asarray(text, np.float32) + (1.0 - text_weight) * np.asarray(image, np.float32)
    return l2_normalise(v)
