"""The learning-rate schedule of LoRA fine-tuning: linear warm-up, then cosine decay.

Not transformers' `get_cosine_schedule_with_warmup`: its warm-up factor is step / warmup (0 at the first
step), this one's (step + 1) / warmup, so the numbers differ and swapping it in would change the adapter.
The demo CLIP's builder (cliprec_worlds/demo_clip.py `_lr_at`) keeps its own copy: it computes the cosine's
argument as pi * (step - warmup) / n where this takes pi * ((step - warmup) / n), which rounds differently
in the last bit at some steps, so sharing one would change either the adapter or a rebuilt demo CLIP.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up to 1 over `warmup_steps`, then cosine decay towards 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
