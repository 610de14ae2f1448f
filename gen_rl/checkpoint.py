"""Atomic, rotating run checkpoints: ``checkpoint-000010/`` folders written under a temporary name first.

A checkpoint folder either exists complete or not at all: it is filled as ``.tmp-checkpoint-000010`` and
renamed when every file is written, so a crash or Ctrl-C mid-save leaves only a temporary folder, which is
ignored by :meth:`CheckpointManager.latest` and removed by the next save.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointManager:
    """Names, commits, finds and prunes the checkpoints in ``<output_dir>/checkpoints``."""

    def __init__(self, output_dir: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def staging_dir(self, step: int) -> Path:
        """An empty temporary folder to write checkpoint ``step`` into (main process only)."""
        path = self.root / f".tmp-checkpoint-{step:06d}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, step: int) -> Path:
        """Rename the staged folder to ``checkpoint-<step>`` (replacing an older one) and prune old ones."""
        staged = self.root / f".tmp-checkpoint-{step:06d}"
        final = self.root / f"checkpoint-{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
        for path in self.root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def all(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [path for path in self.root.iterdir() if _PATTERN.match(path.name) and path.is_dir()]
        return sorted(found, key=lambda path: int(_PATTERN.match(path.name).group(1)))

    def latest(self) -> Path | None:
        """The newest committed checkpoint, or None."""
        found = self.all()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: Path) -> int:
        """The training step a checkpoint folder was saved after."""
        match = _PATTERN.match(Path(path).name)
        if match is None:
            raise ValueError(f"{path} is not a checkpoint folder (checkpoint-NNNNNN)")
        return int(match.group(1))
