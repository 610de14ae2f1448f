"""Prompt sets: a text file (one prompt per line) or JSONL (``prompt`` plus metadata passed to rewards).

``load_prompts`` checks the whole file before training starts: a missing, empty or non-UTF-8 file fails with
its resolved path, and every bad JSONL record is reported with its line number; ``bad_records`` then decides
whether the run stops (``abort``) or trains on the good records (``skip``). Importing this module does not
import torch, so ``gen_rl/train.py`` checks the data before any model library loads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gen_rl.core.config import ConfigError, resolve_path

logger = logging.getLogger(__name__)

BadRecords = Literal["abort", "skip"]
# JSONL keys holding a source file (image-to-video and editing sources, reference videos): resolved against the
# prompt file's folder and checked to exist when the file loads
MEDIA_KEYS = ("image", "video")


class DataError(ConfigError):
    """A data file that cannot be used; the message names the file (resolved path), the line and the fix."""


@dataclass(frozen=True)
class PromptSet:
    """Prompts with per-prompt metadata (JSONL keys other than ``prompt``; empty for text files)."""

    prompts: list[str]
    metadata: list[dict[str, Any]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(
    path: str | Path, bad_records: BadRecords = "abort", key: str = "data.train_prompts"
) -> PromptSet:
    """Read ``.txt`` (one prompt per non-blank line) or ``.jsonl`` (``{"prompt": ..., **metadata}``).

    Every record is checked. ``bad_records="abort"`` raises a ``DataError`` naming each bad line;
    ``"skip"`` logs one warning line per bad record and keeps the rest. ``key`` names the config key in errors.
    """
    shown = resolve_path(path)
    lines = read_text_lines(shown, "prompt file", key)
    numbered = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DataError(f"prompt file {shown} ({key}) is empty; put one prompt per line (or JSONL records)")
    if shown.suffix == ".jsonl":
        prompts, metadata, problems = _parse_jsonl(numbered, shown.parent)
    else:
        prompts, metadata, problems = [line for _, line in numbered], [{} for _ in numbered], []
    report_bad_records(shown, problems, bad_records, total=len(numbered))
    return PromptSet(prompts=prompts, metadata=metadata, source=str(shown))


def read_text_lines(path: Path, what: str, key: str = "") -> list[str]:
    """The lines of a UTF-8 text file; a missing, unreadable or non-UTF-8 file raises a ``DataError``.

    Messages read ``<what> <resolved path> (<key>) <problem>; <fix>``.
    """
    name = f"{what} {path} ({key})" if key else f"{what} {path}"
    if not path.exists():
        raise DataError(
            f"{name} does not exist; fix the path (relative paths start at the working directory)"
        )
    if not path.is_file():
        raise DataError(f"{name} is a folder, not a file; point the config at the file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {name}: {error.strerror}; check its permissions") from error
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{name} is not UTF-8 text (line {line}, byte {error.start}); re-save it as UTF-8, e.g. with "
            "iconv -f latin1 -t utf-8"
        ) from error


def report_bad_records(
    path: Path, problems: list[tuple[int, str]], bad_records: BadRecords, total: int
) -> None:
    """Abort with every bad record in the message, or log one line per record and go on (``skip``).

    ``problems`` holds ``(line number, what is wrong)``; ``total`` is the number of records in the file.
    """
    if not problems:
        return
    listed = "; ".join(f"{path}:{number}: {problem}" for number, problem in problems)
    if bad_records == "abort":
        count = f"{len(problems)} bad records" if len(problems) > 1 else "a bad record"
        raise DataError(
            f"{listed} ({count} of {total}); fix them, or set data.bad_records: skip to train on the rest"
        )
    if len(problems) == total:
        raise DataError(f"{listed}; every record of {path} is bad, nothing is left to train on")
    for number, problem in problems:
        logger.warning("skipping %s:%d: %s", path, number, problem)


def _parse_jsonl(
    numbered: list[tuple[int, str]], root: Path
) -> tuple[list[str], list[dict[str, Any]], list[tuple[int, str]]]:
    prompts, metadata, problems = [], [], []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append((number, f"not valid JSON ({error.msg} at column {error.colno})"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            problems.append((number, "each JSONL record needs a non-empty string 'prompt' key"))
            continue
        problem = _resolve_media(record, root)
        if problem:
            problems.append((number, problem))
            continue
        prompts.append(record.pop("prompt"))
        metadata.append(record)
    return prompts, metadata, problems


def _resolve_media(record: dict[str, Any], root: Path) -> str:
    """Make the record's media paths (``MEDIA_KEYS``) absolute, relative to the prompt file's folder; a problem
    line for a missing file (empty when all exist)."""
    for key in MEDIA_KEYS:
        if key not in record:
            continue
        if not isinstance(record[key], str) or not record[key]:
            return f"'{key}' must be a file path (relative to the prompt file), got {record[key]!r}"
        path = Path(record[key]).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            return f"'{key}' file {path} does not exist"
        record[key] = str(path)
    return ""


def prompt_indices_for_step(num_prompts: int, step: int, groups_per_step: int, seed: int) -> list[int]:
    """Dataset indices of the ``groups_per_step`` prompts of training step ``step``.

    The dataset is walked in epochs, each a fresh permutation seeded by ``(seed, "prompts", epoch)``; step
    ``t`` takes positions ``[t * G, (t + 1) * G)`` of that endless sequence, so every prompt is used once per
    epoch and the choice depends only on the seed and the step (which makes resume and multi-process exact).
    """
    import torch  # here, not at the top: the entry point checks prompt files before torch is imported

    from gen_rl.core.seeding import derive_seed

    permutations: dict[int, list[int]] = {}
    indices = []
    for position in range(step * groups_per_step, (step + 1) * groups_per_step):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(derive_seed(seed, "prompts", epoch))
            permutations[epoch] = torch.randperm(num_prompts, generator=generator).tolist()
        indices.append(permutations[epoch][offset])
    return indices
