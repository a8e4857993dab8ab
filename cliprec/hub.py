"""Reaching the Hugging Face hub for the study: one line when it cannot, instead of a long traceback.

The study reads three things from the hub: the Amazon-2023 catalog (`datasets`, an hf:// path), the CLIP
and the BART summariser (`transformers` from_pretrained). Offline (`HF_HUB_OFFLINE=1`, or no network)
each library ends in a traceback of dozens of lines, and from_pretrained first retries for a long while.
Here:

- `pretrained_kwargs` decides, before from_pretrained, how a hub id can be loaded: as usual when the hub
  answers one request (no retries: at once when DNS fails), from the local HF cache when it does not but
  the model is cached, else a `HubError` at once.
- `hub_errors` turns whatever a hub access still raises (a network error anywhere in the exception chain,
  or transformers' OSError for a name that is not a local directory) into a `HubError`.

A `HubError` is one line: what could not be reached, why, and which param points it at a local copy (the
overrides the study rehearsal uses: docs/study.md "Study rehearsal"). Local paths are never touched: their
errors stay what they are.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cliprec.errors import CliprecError, one_line

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
# an exception raised by one of these libraries during a hub access is a failure to reach the hub
NETWORK_LIBRARIES = frozenset(
    {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "aiohttp", "huggingface_hub"}
)
STANDINS_HINT = "stand-ins: python scripts/build_study_standins.py, docs/study.md 'Study rehearsal'"
# The param of each hub resource (only the study setup reads from the hub).
CATALOG_SETTING = "setups.study.ingest.hub_root"
CLIP_SETTING = "setups.study.model.name"
SUMMARIZER_SETTING = "setups.study.summarize.model"


class HubError(CliprecError):
    """Something the study needs could not be read from the Hugging Face hub."""


def is_local(name: str | Path) -> bool:
    """Whether `name` is a path on this machine (a directory or file), not a hub id."""
    return Path(name).exists()


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or its aliases) is set: the hub libraries will not even try the network."""
    import huggingface_hub

    return bool(huggingface_hub.is_offline_mode())


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        x = x.__cause__ or x.__context__


def is_network_failure(e: BaseException) -> bool:
    """A connection/DNS/timeout error, or an error of a hub or HTTP library, anywhere in e's chain."""
    for x in _chain(e):
        if isinstance(x, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if type(x).__module__.split(".")[0] in NETWORK_LIBRARIES:
            return True
    return False


def reason(e: BaseException) -> str:
    """The innermost message of a failure, on one line (e.g. 'Name or service not known')."""
    if offline_mode():
        return "offline mode: HF_HUB_OFFLINE is set"
    *_, root = _chain(e)
    return f"{type(root).__name__}: {one_line(root)}"[:200]


@functools.cache
def unreachable() -> str | None:
    """Why the hub cannot be reached now (None when it answers); one request, no retries, cached."""
    if offline_mode():
        return "offline mode: HF_HUB_OFFLINE is set"
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as e:
        if not is_network_failure(e):
            raise
        return reason(e)
    return None


def message(what: str, name: str, setting: str, why: str, how: str) -> str:
    """The one line of a HubError."""
    return (
        f"{what}: cannot reach {name} on the Hugging Face hub ({why}); point {setting} at a local copy "
        f"({how}; {STANDINS_HINT})"
    )


def model_hint(name: str) -> str:
    """How to make a local copy of hub model `name`."""
    return f"a save_pretrained directory, e.g. `hf download {name} --local-dir models/{Path(name).name}`"


def pretrained_kwargs(name: str, what: str, setting: str) -> dict[str, Any]:
    """Extra from_pretrained kwargs for `name`: {} (local dir, or the hub answers), local_files_only
    when the hub is unreachable but the model is in the HF cache; else raise HubError at once."""
    if is_local(name):
        return {}
    why = unreachable()
    if why is None:
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        log.warning("%s: the hub is unreachable (%s); loading %s from the local HF cache", what, why, name)
        return {"local_files_only": True}
    raise HubError(message(what, name, setting, why, model_hint(name)))


@contextlib.contextmanager
def hub_errors(name: str, what: str, setting: str, how: str | None = None) -> Iterator[None]:
    """Raise a HubError for a failure to read hub resource `name` inside the block; local names pass."""
    try:
        yield
    except Exception as e:
        # from_pretrained turns every hub problem into an OSError ("couldn't connect", "not a valid
        # model identifier"); for a hub id each of them means: it could not get the files
        if is_local(name) or not (is_network_failure(e) or isinstance(e, OSError)):
            raise
        raise HubError(message(what, name, setting, reason(e), how or model_hint(name))) from e
