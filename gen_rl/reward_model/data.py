"""Preference records for the reward-model trainer, checked before training (no torch imported here).

Formats (``data.format``), one record per JSONL line unless said otherwise; image paths are relative to
``data.image_root`` (default: the data file's folder) unless absolute:

- ``pairs``: ``{"prompt", "image_a", "image_b", "label"}`` with ``label`` = P(a preferred): 1, 0 or 0.5 (a tie),
  or ``{"prompt", "chosen", "rejected"}``;
- ``ranked``: ``{"prompt", "ranking": [best, ..., worst]}`` (at least two images);
- ``implicit``: one image per line, ``{"prompt", "image", "engagement": count, "group": optional}``, turned
  into pairs by :func:`engagement_pairs` (Social Reward's use of implicit feedback: compare within a context);
- ``pickapic``: Pick-a-Pic rows (JSONL, or parquet with pyarrow) ``{"caption", "jpg_0", "jpg_1", "label_0"}``
  where ``jpg_*`` are image paths (images extracted to files), or ``image_0_uid`` / ``image_1_uid`` naming
  ``<uid>.jpg`` files; ``has_label: false`` and ``are_different: false`` rows are bad records;
- ``hpd``: an HPDv2 JSON list (or JSONL) of ``{"prompt", "image_path": [...], "human_preference": [...]}``
  (the image marked 1 is preferred to each other one: pairs) or ``{..., "rank": [...]}`` (lower rank is
  better: a ranked list). Bad records of a JSON list are numbered by entry (1-based) instead of line.

Every record is checked (JSON, keys, each image exists and opens as an image, no image twice); bad records are
reported with their line numbers by ``gen_rl.data.report_bad_records``, then the run aborts or skips them.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_rl.core.config import resolve_path
from gen_rl.data import BadRecords, DataError, read_text_lines, report_bad_records


@dataclass(frozen=True)
class Comparison:
    """One preference record: a pair (``label`` = P(first image preferred)) or a ranked list (``label`` None)."""

    prompt: str
    images: tuple[Path, ...]  # a pair (a, b), or a ranked list best first
    label: float | None
    category: str | None
    line: int  # line (JSON list: entry) of the record in its file; implicit pairs: the preferred image's line
    source: str

    @property
    def ranked(self) -> bool:
        """Whether this is a ranked list (no label) rather than a pair."""
        return self.label is None


def load_comparisons(
    path: str | Path,
    data_format: str,
    image_root: str = "",
    bad_records: BadRecords = "abort",
    category_key: str = "category",
    min_log_gap: float = math.log(2.0),
    max_pairs_per_group: int = 64,
    key: str = "data.train_file",
) -> list[Comparison]:
    """Every good record of a preference file; bad ones are reported with line numbers (abort or skip)."""
    shown = resolve_path(path)
    root = resolve_path(image_root) if image_root else shown.parent
    if image_root and not root.is_dir():
        raise DataError(f"data.image_root {root} is not a folder; fix the path")
    entries = _numbered_entries(shown, data_format, key)
    if not entries:
        raise DataError(f"preference file {shown} ({key}) holds no records; add some")
    parse = {
        "pairs": _parse_pair,
        "ranked": _parse_ranked,
        "implicit": _parse_implicit,
        "pickapic": _parse_pickapic,
        "hpd": _parse_hpd,
    }[data_format]
    comparisons: list[Comparison] = []
    problems: list[tuple[int, str]] = []
    images_seen: dict[Path, str | None] = {}
    implicit_rows: list[tuple[int, dict[str, Any]]] = []
    for number, record in entries:
        if isinstance(record, str):  # a JSON error message
            problems.append((number, record))
            continue
        try:
            parsed = parse(record)
        except ValueError as error:
            problems.append((number, str(error)))
            continue
        category = _category(record, category_key)
        for prompt, paths, label in parsed:
            resolved = tuple(_resolve_image(root, item) for item in paths)
            problem = _image_problem(resolved, images_seen)
            if problem:
                problems.append((number, problem))
                break
            if data_format == "implicit":
                row = {"prompt": prompt, "image": resolved[0], "category": category, **label}
                implicit_rows.append((number, row))
            else:
                comparisons.append(Comparison(prompt, resolved, label, category, number, str(shown)))
    report_bad_records(shown, problems, bad_records, total=len(entries))
    if data_format == "implicit":
        comparisons = engagement_pairs(implicit_rows, str(shown), min_log_gap, max_pairs_per_group)
        if not comparisons:
            raise DataError(
                f"{shown}: no two images of one context differ enough in engagement to make a pair; lower "
                "data.implicit.min_log_gap or check the 'group' keys"
            )
    return comparisons


def engagement_pairs(
    rows: list[tuple[int, dict[str, Any]]], source: str, min_log_gap: float, max_pairs_per_group: int
) -> list[Comparison]:
    """Implicit feedback to pairs: within each context, the image with clearly more engagement is preferred.

    A context is the rows' ``group`` (e.g. one creator and day), else their prompt, so that popularity is only
    compared between images shown to a comparable audience (Social Reward, Isajanyan et al. 2024). A pair
    ``(i, j)`` is formed when ``log1p(c_i) - log1p(c_j) >= min_log_gap``, ``i`` preferred (label 1); at most
    ``max_pairs_per_group`` pairs per context, the widest gaps first (0: all). Never a tie.
    """
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for number, row in rows:
        groups[str(row["group"]) if row.get("group") is not None else f"prompt:{row['prompt']}"].append(
            (number, row)
        )
    pairs: list[Comparison] = []
    for members in groups.values():
        candidates = []
        for number_i, row_i in members:
            for _, row_j in members:
                gap = math.log1p(row_i["engagement"]) - math.log1p(row_j["engagement"])
                if gap >= min_log_gap and row_i["image"] != row_j["image"]:
                    candidates.append((gap, number_i, row_i, row_j))
        candidates.sort(key=lambda item: (-item[0], item[1]))
        if max_pairs_per_group:
            candidates = candidates[:max_pairs_per_group]
        for _, number, row_i, row_j in candidates:
            images = (row_i["image"], row_j["image"])
            pairs.append(Comparison(row_i["prompt"], images, 1.0, row_i.get("category"), number, source))
    return pairs


def split_comparisons(
    comparisons: list[Comparison], fraction: float, seed: int
) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out): a seeded ``fraction`` of the records held out (at least one, never all)."""
    order = list(range(len(comparisons)))
    random.Random(seed).shuffle(order)
    held = max(1, min(len(comparisons) - 1, round(fraction * len(comparisons))))
    held_out = set(order[:held])
    train = [item for index, item in enumerate(comparisons) if index not in held_out]
    evaluation = [item for index, item in enumerate(comparisons) if index in held_out]
    if not train:
        raise DataError("too few records to hold some out; give data.eval_file or more records")
    return train, evaluation


def as_pairs(comparisons: list[Comparison]) -> list[Comparison]:
    """Pairs only: a ranked list becomes all its ``n (n - 1) / 2`` ordered pairs (better first, label 1)."""
    pairs = []
    for item in comparisons:
        if not item.ranked:
            pairs.append(item)
            continue
        for first in range(len(item.images)):
            for second in range(first + 1, len(item.images)):
                images = (item.images[first], item.images[second])
                pairs.append(Comparison(item.prompt, images, 1.0, item.category, item.line, item.source))
    return pairs


# ----- parsing ----------------------------------------------------------------------------------------------
ParsedRecord = list[tuple[str, list[Any], Any]]  # (prompt, image references, label or implicit extras)


def _numbered_entries(path: Path, data_format: str, key: str) -> list[tuple[int, dict[str, Any] | str]]:
    """``(line or entry number, record or a message saying why it is not one)`` for each record."""
    if path.suffix == ".parquet":
        return _parquet_rows(path, key)
    lines = read_text_lines(path, "preference file", key)
    if path.suffix == ".json":
        try:
            data = json.loads("\n".join(lines))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file") from error
        if not isinstance(data, list):
            raise DataError(
                f"{path} must hold a JSON list of records (HPD layout); got {type(data).__name__}"
            )
        return list(enumerate(data, start=1))
    entries: list[tuple[int, dict[str, Any] | str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            entries.append((number, f"not valid JSON ({error.msg} at column {error.colno})"))
    return entries


def _parquet_rows(path: Path, key: str) -> list[tuple[int, dict[str, Any] | str]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise DataError(f"{path} ({key}) is parquet, which needs pyarrow; pip install pyarrow") from error
    rows = parquet.read_table(path).to_pylist()
    return [(index, row) for index, row in enumerate(rows, start=1)]


def _text(record: dict[str, Any], name: str) -> str:
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"needs a non-empty string {name!r}")
    return value


def _parse_pair(record: dict[str, Any]) -> ParsedRecord:
    prompt = _text(record, "prompt")
    if "chosen" in record or "rejected" in record:
        return [(prompt, [_text(record, "chosen"), _text(record, "rejected")], 1.0)]
    label = record.get("label")
    if label not in (0, 1, 0.5) or isinstance(label, bool):
        raise ValueError(f"'label' must be 1 (image_a preferred), 0 (image_b) or 0.5 (a tie); got {label!r}")
    return [(prompt, [_text(record, "image_a"), _text(record, "image_b")], float(label))]


def _parse_ranked(record: dict[str, Any]) -> ParsedRecord:
    prompt = _text(record, "prompt")
    ranking = record.get("ranking")
    if not isinstance(ranking, list) or len(ranking) < 2 or not all(isinstance(x, str) for x in ranking):
        raise ValueError("'ranking' must be a list of at least two image paths, best first")
    return [(prompt, ranking, None)]


def _parse_implicit(record: dict[str, Any]) -> ParsedRecord:
    prompt = _text(record, "prompt")
    count = record.get("engagement")
    if isinstance(count, bool) or not isinstance(count, int | float) or not count >= 0:
        raise ValueError(f"'engagement' must be a count >= 0; got {count!r}")
    extras = {"engagement": float(count), "group": record.get("group")}
    return [(prompt, [_text(record, "image")], extras)]


def _parse_pickapic(record: dict[str, Any]) -> ParsedRecord:
    prompt = _text(record, "caption")
    if record.get("has_label") is False:
        raise ValueError("has_label is false (no preference recorded)")
    if record.get("are_different") is False:
        raise ValueError("the same image twice (are_different is false)")
    images = []
    for index in (0, 1):
        value = record.get(f"jpg_{index}")
        if isinstance(value, bytes | bytearray):
            raise ValueError(
                f"jpg_{index} holds image bytes; extract the images to files and give their paths"
            )
        if isinstance(value, str) and value:
            images.append(value)
        elif isinstance(record.get(f"image_{index}_uid"), str):
            images.append(f"{record[f'image_{index}_uid']}.jpg")
        else:
            raise ValueError(f"needs jpg_{index} (an image path) or image_{index}_uid")
    label = record.get("label_0")
    if label not in (0, 1, 0.5) or isinstance(label, bool):
        raise ValueError(f"'label_0' must be 1, 0 or 0.5; got {label!r}")
    return [(prompt, images, float(label))]


def _parse_hpd(record: dict[str, Any]) -> ParsedRecord:
    prompt = _text(record, "prompt")
    paths = record.get("image_path")
    if not isinstance(paths, list) or len(paths) < 2 or not all(isinstance(x, str) for x in paths):
        raise ValueError("'image_path' must be a list of at least two image paths")
    if isinstance(record.get("rank"), list):
        ranks = record["rank"]
        if len(ranks) != len(paths) or len(set(ranks)) != len(ranks):
            raise ValueError("'rank' needs one distinct rank per image (lower is better)")
        return [(prompt, [path for _, path in sorted(zip(ranks, paths, strict=True))], None)]
    preference = record.get("human_preference")
    if not isinstance(preference, list) or len(preference) != len(paths) or sorted(preference)[-1] != 1:
        raise ValueError("needs 'rank' or 'human_preference' (one 0/1 per image, 1 = preferred)")
    chosen = preference.index(1)
    others = [path for index, path in enumerate(paths) if index != chosen]
    return [(prompt, [paths[chosen], other], 1.0) for other in others]


def _category(record: Any, category_key: str) -> str | None:
    if not category_key or not isinstance(record, dict) or record.get(category_key) is None:
        return None
    return str(record[category_key])


def _resolve_image(root: Path, reference: str) -> Path:
    path = Path(reference).expanduser()
    return path if path.is_absolute() else root / path


def _image_problem(paths: tuple[Path, ...], seen: dict[Path, str | None]) -> str | None:
    """Why these images cannot be used (the same one twice, missing, unreadable), or None."""
    if len(set(paths)) != len(paths):
        twice = next(path for path in paths if paths.count(path) > 1)
        return f"the same image twice ({twice})"
    for path in paths:
        if path not in seen:
            seen[path] = _unreadable(path)
        if seen[path]:
            return seen[path]
    return None


def _unreadable(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return f"image {path} does not exist"
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        return f"image {path} cannot be read as an image ({type(error).__name__})"
    return None
