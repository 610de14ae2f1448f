"""Preference pairs for offline Diffusion-DPO: a JSONL file, one ``{"prompt", "chosen", "rejected"}`` per line.

``chosen`` is the preferred image, ``rejected`` the other one; both are file paths, relative to the JSONL file's
folder unless absolute. Every record is checked when the file loads (before any model library is imported):
each bad line is reported with its number and what is wrong, and the run does not start. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gen_rl.core.config import resolve_path
from gen_rl.data import DataError, read_text_lines

IMAGE_KEYS = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferencePairs:
    """Prompts and the absolute paths of their preferred (``chosen``) and other (``rejected``) images."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def load_preference_pairs(path: str | Path, key: str = "algorithm.pairs") -> PreferencePairs:
    """Read and check a pair file; a ``DataError`` lists every bad line (``<file>:<line>: <problem>``)."""
    shown = resolve_path(path)
    if shown.suffix != ".jsonl":
        raise DataError(
            f"preference pairs {shown} ({key}) must be a .jsonl file of "
            '{"prompt": ..., "chosen": "a.png", "rejected": "b.png"} records'
        )
    lines = read_text_lines(shown, "preference pair file", key)
    numbered = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DataError(f"preference pair file {shown} ({key}) is empty; put one JSON record per line")
    prompts: list[str] = []
    images: dict[str, list[str]] = {name: [] for name in IMAGE_KEYS}
    problems: list[tuple[int, str]] = []
    for number, line in numbered:
        record, problem = _parse_record(line, shown.parent)
        if problem:
            problems.append((number, problem))
            continue
        prompts.append(record["prompt"])
        for name in IMAGE_KEYS:
            images[name].append(record[name])
    if problems:
        listed = "; ".join(f"{shown}:{number}: {problem}" for number, problem in problems)
        count = f"{len(problems)} bad records" if len(problems) > 1 else "a bad record"
        raise DataError(f"{listed} ({count} of {len(numbered)}); fix them ({key})")
    return PreferencePairs(prompts, images["chosen"], images["rejected"], str(shown))


def _parse_record(line: str, root: Path) -> tuple[dict[str, str], str]:
    """The record with absolute image paths, or an empty record and what is wrong with the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return {}, f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict):
        return {}, f"a record must be a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        return {}, "each record needs a non-empty string 'prompt'"
    resolved = {"prompt": record["prompt"]}
    for name in IMAGE_KEYS:
        value = record.get(name)
        if not isinstance(value, str) or not value:
            return {}, f"'{name}' must be an image path (relative to the pair file), got {value!r}"
        image = Path(value).expanduser()
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            return {}, f"'{name}' image {image} does not exist"
        resolved[name] = str(image)
    if resolved["chosen"] == resolved["rejected"]:
        return {}, "'chosen' and 'rejected' are the same image; a pair needs two different images"
    return resolved, ""
