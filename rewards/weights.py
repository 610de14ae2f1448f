"""Finding reward-model weights: a local file, a local folder, or a Hugging Face hub repository.

A missing checkpoint raises ``MissingWeightsError`` naming the file expected, where it was looked for and
where the weights are published, so the fix is one download command away. When ``HF_HUB_OFFLINE=1`` is set or
the hub cannot be reached (``gen_rl.core.hub.hub_unusable_reason``), hub ids resolve from the local cache only
(``local_files_only``): a missing model fails at once instead of after a minute of retries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gen_rl.core.hub import MissingWeightsError, hub_unusable_reason, looks_like_local_path

__all__ = ["MissingWeightsError", "load_pretrained", "resolve_file"]

Loaded = TypeVar("Loaded")


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
    if looks_like_local_path(source):
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
    if looks_like_local_path(source) and not path.exists():
        raise MissingWeightsError(
            f"{what}: the folder {source} does not exist. It should hold a transformers save (config.json + "
            f"weights), as published at {published}."
        )
    offline = None if path.exists() else hub_unusable_reason()
    if offline:
        kwargs = {**kwargs, "local_files_only": True}
    try:
        return loader(str(path) if path.exists() else source, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:  # missing files, bad config, size mismatches
        where = f"the folder {source}" if path.exists() else f"the hub repo {source!r} (or its local cache)"
        why = f" ({offline})" if offline else ""
        raise MissingWeightsError(
            f"{what}: could not load from {where}{why}: {_first_line(error)}. The weights are published at "
            f"{published}; download them first (`huggingface-cli download {source}`) or give a local folder."
        ) from error


def _hub_file(repo_id: str, filename: str, *, what: str, published: str) -> Path:
    from huggingface_hub import hf_hub_download

    offline = hub_unusable_reason()
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=offline is not None))
    except Exception as error:  # offline + not cached, unknown repo, missing file: all end the same way
        why = f"{offline}; " if offline else ""
        raise MissingWeightsError(
            f"{what}: could not get {filename!r} from the hub repo {repo_id!r} ({why}{type(error).__name__}: "
            f"{_first_line(error)}). It is published at {published}; download it with `huggingface-cli download "
            f"{repo_id} {filename}` or give the local path of the file."
        ) from error


def _first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message (library errors often span several)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
