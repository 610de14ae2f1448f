"""Prompts for VLM training: JSONL records, an image root, and a multi-stage curriculum.

A record is one JSON object per line::

    {"image": "coco/0001.jpg" | ["a.png", "b.png"] | null, "problem": "...", "solution": ...,
     "task": "grounding", "metadata": {...},
     "video": "clips/0001" | "clips/0001.mp4" | [...], "video_fps": 2.0}

(``images`` / ``videos`` are accepted for ``image`` / ``video``; ``id`` is optional). A video is a folder of
frame images (``video_fps``: their frame rate, else ``data.video.frames_fps``) or a video file (PyAV, the
``video`` extra); see :mod:`gen_rl.vlm.video`. Relative image and video paths are resolved against the
image root. The curriculum (RewardMap-style: perception stages first, then reasoning) is a list of stages,
each with its files, an optional task filter and a number of steps; prompts are drawn from the current stage
in a seeded shuffled order, epoch after epoch, through a cursor that checkpoints can save and restore.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gen_rl.core.seeding import derive_seed
from gen_rl.vlm.video import VideoClip, VideoSampling, read_video

__all__ = [
    "VLMRecord",
    "Stage",
    "Curriculum",
    "PromptStream",
    "parse_record",
    "read_records",
    "load_images",
    "load_videos",
]


@dataclass
class VLMRecord:
    """One prompt: its images and videos (absolute paths), problem text, ground truth, task and reward
    metadata; ``video_fps`` is the frame rate of frame-folder videos (0 = the config's)."""

    images: list[str]
    problem: str
    solution: Any
    task: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    videos: list[str] = field(default_factory=list)
    video_fps: float = 0.0


def parse_record(raw: dict[str, Any], image_root: str | Path = "", where: str = "record") -> VLMRecord:
    """Validate one JSON object and resolve its image paths against ``image_root``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    missing = [key for key in ("problem", "solution") if key not in raw]
    if missing:
        raise ValueError(f"{where}: missing {missing}; every record needs 'problem' and 'solution'")
    paths = _paths(raw.get("image", raw.get("images")), "image", where)
    video_paths = _paths(raw.get("video", raw.get("videos")), "video", where)
    video_fps = raw.get("video_fps", 0.0)
    if isinstance(video_fps, bool) or not isinstance(video_fps, int | float) or video_fps < 0:
        raise ValueError(f"{where}: 'video_fps' must be a number >= 0 (frames per second), got {video_fps!r}")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: 'metadata' must be an object, got {type(metadata).__name__}")
    root = Path(image_root)
    return VLMRecord(
        images=[str(path if Path(path).is_absolute() else root / path) for path in paths],
        problem=str(raw["problem"]),
        solution=raw["solution"],
        task=str(raw.get("task", "")),
        metadata=dict(metadata),
        key=str(raw.get("id", where)),
        videos=[str(path if Path(path).is_absolute() else root / path) for path in video_paths],
        video_fps=float(video_fps),
    )


def _paths(value: Any, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError(f"{where}: '{name}' must be a path, a list of paths or null, got {value!r}")


def read_records(path: str | Path, image_root: str | Path = "") -> list[VLMRecord]:
    """All records of a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; check data.stages[*].files")
    records = []
    with path.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
            records.append(parse_record(raw, image_root, where))
    return records


def read_checked_records(
    path: str | Path, image_root: str | Path = "", bad_records: str = "abort", key: str = ""
) -> list[VLMRecord]:
    """All records of a JSONL file, each checked at start-up: JSON, keys, and that every image / video exists.

    Every bad record is named with its line (and ``id``); ``bad_records="abort"`` raises one ``DataError``
    listing them, ``"skip"`` logs one warning per bad record and returns the others. Paths show resolved.
    """
    from gen_rl.core.config import resolve_path
    from gen_rl.data import read_text_lines, report_bad_records

    shown = resolve_path(path)
    lines = read_text_lines(shown, "data file", key)
    records, problems, total = [], [], 0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        total += 1
        where = f"{shown.name}:{line_number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append((line_number, f"not valid JSON ({error.msg} at column {error.colno})"))
            continue
        try:
            record = parse_record(raw, image_root, where)
        except ValueError as error:
            problems.append((line_number, str(error).removeprefix(f"{where}: ")))
            continue
        media = [*record.images, *getattr(record, "videos", [])]
        missing = [item for item in media if not Path(item).exists()]
        if missing:
            named = f" (record {raw['id']!r})" if "id" in raw else ""
            problems.append((line_number, f"{resolve_path(missing[0])} does not exist{named}"))
            continue
        records.append(record)
    report_bad_records(shown, problems, bad_records, total=total)
    return records


def load_images(record: VLMRecord) -> list[Image.Image]:
    """The record's images as RGB PIL images, in order."""
    images = []
    for path in record.images:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def load_videos(record: VLMRecord, sampling: VideoSampling) -> list[VideoClip]:
    """The record's videos, each with its frames sampled per ``sampling``, in order."""
    return [read_video(path, sampling, record.video_fps) for path in record.videos]


@dataclass
class Stage:
    """A curriculum stage: its records and the number of steps it lasts (0 = until the end of training)."""

    name: str
    records: list[VLMRecord]
    steps: int = 0


class Curriculum:
    """Stages run in order; ``stage_at(step)`` is the stage that serves rollout batch ``step`` (0-based)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        for stage in stages:
            if not stage.records:
                raise ValueError(
                    f"curriculum stage {stage.name!r} has no records (check its files and tasks)"
                )
        self.stages = list(stages)

    def stage_index(self, step: int) -> int:
        """Index of the stage serving ``step``; the last stage continues past its own steps."""
        start = 0
        for index, stage in enumerate(self.stages[:-1]):
            if step < start + stage.steps:
                return index
            start += stage.steps
        return len(self.stages) - 1

    def stage_at(self, step: int) -> Stage:
        """The stage serving rollout batch ``step``."""
        return self.stages[self.stage_index(step)]


class PromptStream:
    """Records of one stage in a seeded shuffled order, epoch after epoch, with a saveable cursor.

    Epoch ``e`` of stage ``s`` visits the records in the permutation seeded by ``(seed, s, e)``, so a restored
    cursor continues exactly where the saved run was.
    """

    def __init__(self, curriculum: Curriculum, seed: int, shuffle: bool = True) -> None:
        self.curriculum = curriculum
        self.seed = seed
        self.shuffle = shuffle
        self.cursors = [0] * len(curriculum.stages)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, stage_index: int, epoch: int) -> np.ndarray:
        if (stage_index, epoch) not in self._orders:
            count = len(self.curriculum.stages[stage_index].records)
            if self.shuffle:
                generator = np.random.default_rng(derive_seed(self.seed, "prompts", stage_index, epoch))
                order = generator.permutation(count)
            else:
                order = np.arange(count)
            self._orders = {(stage_index, epoch): order}  # keep only the current epoch's order
        return self._orders[(stage_index, epoch)]

    def draw(self, step: int, count: int) -> list[VLMRecord]:
        """The next ``count`` records of the stage serving ``step``."""
        stage_index = self.curriculum.stage_index(step)
        records = self.curriculum.stages[stage_index].records
        drawn = []
        for _ in range(count):
            cursor = self.cursors[stage_index]
            epoch, position = divmod(cursor, len(records))
            drawn.append(records[int(self._order(stage_index, epoch)[position])])
            self.cursors[stage_index] = cursor + 1
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """The cursors (one per stage), for checkpoints."""
        return {"cursors": list(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore cursors saved by :meth:`state_dict`."""
        cursors = list(state["cursors"])
        if len(cursors) != len(self.cursors):
            raise ValueError(
                f"checkpoint has {len(cursors)} curriculum stages, the config has {len(self.cursors)}; "
                "resume with the config the run started with"
            )
        self.cursors = cursors
