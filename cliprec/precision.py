"""Device and mixed-precision choices, in one place (cf. open_clip's precision.py)."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_warned_slow_bf16 = False


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else cuda when available, else cpu."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: str | torch.device) -> torch.dtype:
    """What autocast computes in: bf16 where supported (no GradScaler needed), else fp16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16  # CPU autocast's native dtype; fp16 on a CPU is slower still
    return torch.float16


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU does bf16 math in hardware (x86 AVX512-BF16/AMX, ARM BF16); cheap, cached."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:  # not Linux: we cannot tell, so we do not nag
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast(device: str | torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Context for forward passes: torch.autocast in `amp_dtype(device)` when `amp`, else a no-op."""
    if not amp:
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type == "cpu" and not cpu_has_native_bf16():
        _warn_slow_bf16()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def grad_scaler(device: str | torch.device, amp: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 autocast (bf16 has fp32's range and needs none)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)


def _warn_slow_bf16() -> None:
    global _warned_slow_bf16
    if not _warned_slow_bf16:
        _warned_slow_bf16 = True
        log.warning(
            "amp is on, but this CPU has no native bf16: autocast emulates it and runs many times SLOWER "
            "than fp32 (bench/results/train_step.*.json). AMP pays off on GPUs; set amp: false here."
        )
