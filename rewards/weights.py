"""Finding reward-model weights: a local file, a local folder, or a Hugging Face hub repository.

A missing checkpoint raises ``MissingWeightsError`` naming the file expected, where it was looked for and
where the weights are published, so the fix is one download command away. ``HF_HUB_OFFLINE=1`` is honoured:
hub ids then resolve only from the local cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

Loaded = TypeVar("Loaded")


class MissingWeightsError(FileNotFoundError):
    """The reward model's weights are not where the config points."""


def resolve_file(source: str, filename: str, *, what: str, published: str) -> Path:
    """Local path of ``filename`` for ``source``: a file path, a folder holding it, or a hub repo id.

    ``what`` names the model ("HPS v2.1 checkpoint"); ``published`` says where it is published, for the error.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        raise MissingWeightsError(
            f"{what}: expected the file {filename!r} in the folder {path}, which does not have it. It is "
            f"published at {published}; download it there or point the reward at the file itself."
        )
    if _looks_like_local_path(source):
        raise MissingWeightsError(
            f"{what}: {source} does not exist. Expected the file {filename!r} (published at {published}); "
            "give its path, a folder holding it, or a hub repo id."
        )
    return _hub_file(source, filename, what=what, published=published)


def load_pretrained(
    loader: Callable[..., Loaded], source: str, *, what: str, published: str, **kwargs: Any
) -> Loaded:
    """``loader(source, **kwargs)`` (a transformers ``from_pretrained``) with a clear error when it is missing."""
    path = Path(source).expanduser()
    if _looks_like_local_path(source) and not path.exists():
        raise MissingWeightsError(
            f"{what}: the folder {source} does not exist. It should hold a transformers save (config.json + "
            f"weights), as published at {published}."
        )
    try:
        return loader(str(path) if path.exists() else source, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:  # missing files, bad config, size mismatches
        where = f"the folder {source}" if path.exists() else f"the hub repo {source!r} (or its local cache)"
        raise MissingWeightsError(
            f"{what}: could not load from {where}: {error}. The weights are published at {published}; with "
            f"HF_HUB_OFFLINE=1 download them first (`huggingface-cli download {source}`) or give a local folder."
        ) from error


def _hub_file(repo_id: str, filename: str, *, what: str, published: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as error:  # offline + not cached, unknown repo, missing file: all end the same way
        raise MissingWeightsError(
            f"{what}: could not get {filename!r} from the hub repo {repo_id!r} ({type(error).__name__}: "
            f"{error}). It is published at {published}; download it with `huggingface-cli download {repo_id} "
            f"{filename}` or give the local path of the file."
        ) from error


def _looks_like_local_path(source: str) -> bool:
    """A path rather than a hub id ``owner/name``: absolute, relative with ./, ~, or more than one slash."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
