"""Read params.yaml and resolve the active setup into one flat view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Return params.yaml with `setups[setup]` merged over the shared blocks.

    A block present in both (e.g. `train`) is merged key by key, the setup's value winning; the
    result has no `setups` key, only what the active setup means.
    """
    with open(path) as f:
        raw = yaml.safe_load(f)
    setups = raw.pop("setups", {})
    name = raw.get("setup", "demo")
    if name not in setups:
        raise ValueError(f"params: setup {name!r} is not one of {sorted(setups)}")
    merged = dict(raw)
    for block, values in setups[name].items():
        if isinstance(values, dict) and isinstance(merged.get(block), dict):
            merged[block] = {**merged[block], **values}
        else:
            merged[block] = values
    return merged
