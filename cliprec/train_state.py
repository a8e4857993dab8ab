"""Training's state between runs: the resume fingerprint, the checkpoint file, the RNG states, the adapter's
trainable tensors.

The checkpoint is one `state.pt`, written by rank 0 at each epoch's end with every rank's RNG states in it,
and replaced atomically (`os.replace`): a kill leaves the previous epoch's state or the new one, never a
mix. This is why it is not accelerate's `save_state`, which writes model, optimizer, scheduler and one
`random_states_<rank>.pkl` per rank as separate files in place (a kill between two of them leaves a
state that no epoch had), and which saves every prepared model's whole state dict (all of CLIP) into the
checkpoint dir, a DVC `persist` output whose bytes are in dvc.lock, where the LoRA tensors are enough.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors (LoRA A/B, and logit_scale when trained), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put `trainable_state` tensors back into `model`."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(checkpoint_dir: Path, fp: str) -> dict[str, Any] | None:
    """The state of an unfinished run with fingerprint `fp`, else None (the reason is logged).

    A finished run is never resumed: DVC reruns the stage only when something changed or it was
    forced, and either way the run must happen, not be re-exported from the old state.
    """
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: start over rather than crash
        log.warning("checkpoint %s unreadable (%s: %s); starting over", path, type(e).__name__, e)
        return None
    if state.get("fingerprint") != fp:
        log.warning(
            "checkpoint %s is from another config/model/data/code/library version; starting over", path
        )
        return None
    if state.get("done"):
        log.info("checkpoint %s is of a finished run; training again from scratch", path)
        return None
    return _interned(state)


def _interned(obj: Any) -> Any:
    """`obj` with every dict key interned, as the code's own literal keys are.

    Pickle writes a string once per object: the loaded keys ("epoch", "val_loss", ...) are objects of
    their own, so without this a resumed run's state.pt pickles them again and differs from an
    uninterrupted run's, byte for byte, and with it the checkpoint dir's hash in dvc.lock.
    """
    if isinstance(obj, dict):
        return {(sys.intern(k) if isinstance(k, str) else k): _interned(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interned(v) for v in obj]
    return obj


def save_checkpoint(checkpoint_dir: Path, state: Mapping[str, Any]) -> None:
    """Write `state` as checkpoint_dir/state.pt, atomically."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / (STATE_FILE + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, checkpoint_dir / STATE_FILE)  # atomic: a kill leaves the old state or the new one
