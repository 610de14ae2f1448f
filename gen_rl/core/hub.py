"""Hub and local-weights helpers shared by every layer: cache-only resolution when the hub cannot be used.

When ``HF_HUB_OFFLINE=1`` is set, or the hub cannot be reached, hub ids resolve from the local cache only:
``hub_unusable_reason`` then sets ``HF_HUB_OFFLINE=1`` for the rest of the process so that no loader retries a
network that is not there. Nothing here imports torch or a model library.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from gen_rl.core.config import ConfigError, resolve_path

HUB_PROBE_SECONDS = 2.0


class MissingWeightsError(ConfigError, FileNotFoundError):
    """Model weights are not where the config points (nor in the hub cache when the hub cannot be used)."""


# ----- environment ---------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for cache-only hub access."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in names)


@functools.cache
def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy in the environment) opens within ``timeout`` s."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_unusable_reason() -> str | None:
    """Why hub ids must resolve from the local cache only (offline by setting, or no connection), or None.

    An unreachable hub sets ``HF_HUB_OFFLINE=1`` for this process (huggingface_hub reads it when first
    imported), so that later loaders fail at once instead of retrying a network that is not there.
    """
    if os.environ.get(_PROBE_MARK) == "1":
        return "the hub cannot be reached"
    if hub_offline():
        return "HF_HUB_OFFLINE=1 is set"
    if hub_reachable():
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ[_PROBE_MARK] = "1"
    return "the hub cannot be reached"


_PROBE_MARK = "GEN_RL_HUB_UNREACHABLE"  # set with HF_HUB_OFFLINE=1 when the probe failed (for the message)


# ----- weights -------------------------------------------------------------------------------------------------
def looks_like_local_path(source: str) -> bool:
    """A path rather than a hub id ``owner/name``: absolute, relative with ./, ~, or more than one slash."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def check_weights(source: str, key: str, marker: str) -> None:
    """Weights at ``source`` (local folder or hub id) exist, or can be downloaded; ``marker`` is a file they hold.

    Offline or without a reachable hub, a hub id must already be in the local cache (checked by ``marker``,
    e.g. ``model_index.json`` of a diffusers pipeline). Raises ``MissingWeightsError`` naming the fix.
    """
    path = resolve_path(source)
    if path.exists() or looks_like_local_path(source):
        if not path.is_dir():
            raise MissingWeightsError(
                f"{key}: {path} does not exist; give a local folder holding {marker} or a hub id (owner/name)"
                if not path.exists()
                else f"{key}: {path} is a file; give the folder that holds {marker}"
            )
        if not (path / marker).is_file():
            raise MissingWeightsError(f"{key}: {path} has no {marker}; give the folder of a full checkpoint")
        return
    reason = hub_unusable_reason()
    if reason and cached_hub_file(source, marker) is None:
        raise MissingWeightsError(
            f"{key}: {source!r} is not in the local hub cache and {reason}; run "
            f"`huggingface-cli download {source}` where the hub is reachable, or give a local folder"
        )


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """The cached copy of ``filename`` of hub repo ``repo_id``, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None
