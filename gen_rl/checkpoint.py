"""Crash-safe, rotating run checkpoints: ``checkpoints/checkpoint-000010/`` folders committed in four stages.

A commit (1) fills ``.tmp-checkpoint-000010``, (2) fsyncs every file and folder in it, (3) writes
``manifest.json`` LAST (each file's size and sha256, the step and the run id: a folder with a manifest that
verifies is complete) and (4) renames the folder into place. A folder of the same step already in place is moved
aside before the rename, never deleted first. Old checkpoints are pruned by renaming them to ``.trash-*``
before deleting, so a kill mid-delete never leaves a half-deleted ``checkpoint-*``. Resuming takes the newest
folder whose manifest verifies (a staged folder whose manifest was written is complete and is renamed into
place) and names every newer folder it skipped and why. Pruning only touches checkpoints of this run's id.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gen_rl import faults

MANIFEST = "manifest.json"
_NAME = re.compile(r"^(checkpoint|\.tmp-checkpoint|\.old-checkpoint)-(\d+)$")
_RANK = {"checkpoint": 0, ".tmp-checkpoint": 1, ".old-checkpoint": 2}  # preference at equal step
_LEFTOVER_PREFIXES = (".tmp-checkpoint-", ".old-checkpoint-", ".trash-")


class RunError(RuntimeError):
    """A run cannot go on for a reason outside the code (disk full, a used run folder, a changed config).

    The message is one line naming the problem and the fix; ``gen_rl/train.py`` prints it without a traceback.
    """


class CheckpointWriteError(RunError):
    """Writing a checkpoint (or the metrics file) failed; the previous checkpoint is untouched."""


class CheckpointManager:
    """Names, commits, verifies, finds and prunes the checkpoints in ``<output_dir>/checkpoints``."""

    def __init__(self, output_dir: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    # ----- names ---------------------------------------------------------------------------------------
    def path(self, step: int) -> Path:
        """Where checkpoint ``step`` lives once committed."""
        return self.root / f"checkpoint-{step:06d}"

    def staging_path(self, step: int) -> Path:
        """Where checkpoint ``step`` is written before its commit."""
        return self.root / f".tmp-checkpoint-{step:06d}"

    def staging_dir(self, step: int) -> Path:
        """An empty staging folder for checkpoint ``step`` (main process only)."""
        path = self.staging_path(step)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    @staticmethod
    def step_of(path: Path) -> int:
        """The training step a checkpoint folder was saved after."""
        match = _NAME.match(Path(path).name)
        if match is None:
            raise ValueError(f"{path} is not a checkpoint folder (checkpoint-NNNNNN)")
        return int(match.group(2))

    # ----- commit --------------------------------------------------------------------------------------
    def commit(self, step: int, run_id: str) -> Path:
        """Sync the staged folder, write its manifest last, rename it into place, prune this run's old ones."""
        staged, final = self.staging_path(step), self.path(step)
        faults.reached("checkpoint.staged")
        _fsync_tree(staged)
        faults.reached("checkpoint.synced")
        write_manifest(staged, step, run_id)
        faults.reached("checkpoint.manifest")
        if (
            final.exists()
        ):  # a copy of this step is in place (an earlier, maybe broken, save): swap, never delete
            aside = self.root / f".old-checkpoint-{step:06d}"
            _remove(aside)
            final.rename(aside)
            faults.reached("checkpoint.aside")
        staged.rename(final)
        _fsync_dir(self.root)
        faults.reached("checkpoint.renamed")
        self.prune(run_id)
        return final

    def discard_staging(self, step: int) -> None:
        """Remove the staging folder of a failed save (best effort: the disk may be full)."""
        shutil.rmtree(self.staging_path(step), ignore_errors=True)

    def write_failure(self, step: int, error: Exception) -> str | None:
        """One line for a failed checkpoint write (what failed, that the previous one is intact, what to do), or
        None when ``error`` is neither an OSError nor a full disk (a bug: let it raise as it is).

        Call it before the staging folder is removed: a full disk is also recognised by its free space, since
        safetensors and ``torch.save`` report it as ``SafetensorError`` / ``RuntimeError``.
        """
        full = disk_full(error, self.root)
        if not (full or isinstance(error, OSError)):
            return None
        previous = self.latest()
        intact = f"{previous} is intact" if previous else "no earlier checkpoint exists"
        cause = "no space left on device" if full else error.strerror or str(error)
        where = getattr(error, "filename", None) or "write"
        return (
            f"writing checkpoint-{step:06d} under {self.root} failed: {cause} ({where}); {intact}. Free space "
            "(or fix the folder), then run the same command with --resume."
        )

    # ----- prune ---------------------------------------------------------------------------------------
    def prune(self, run_id: str) -> None:
        """Keep this run's newest ``keep_last`` complete checkpoints; clear leftovers of interrupted saves."""
        mine = [path for path in self.all() if _manifest_run(path) == run_id]
        for old in mine[: -self.keep_last]:
            self._discard(old)
        self.clear_leftovers()

    def clear_leftovers(self) -> None:
        """Delete the staged, set-aside and trashed folders interrupted saves left (after a resume chose)."""
        for path in list(self.root.iterdir()) if self.root.is_dir() else []:
            if path.name.startswith(_LEFTOVER_PREFIXES):
                _remove(path)

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".trash-{path.name}")
        _remove(trash)
        path.rename(trash)  # atomic: a kill from here on leaves no half-deleted checkpoint-* behind
        faults.reached("checkpoint.pruning")
        _remove(trash)

    # ----- find ----------------------------------------------------------------------------------------
    def all(self) -> list[Path]:
        """Folders named ``checkpoint-NNNNNN`` (complete or not), oldest first."""
        return [path for _, rank, path in self._candidates() if rank == 0]

    def latest(self) -> Path | None:
        """The newest ``checkpoint-*`` whose manifest lists files of the right sizes (no hashing), or None."""
        for path in reversed(self.all()):
            if problem_of(path, check_hashes=False) is None:
                return path
        return None

    def newest_complete(self, run_id: str | None, promote: bool = True) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that fully verifies, and one line per newer folder skipped with the reason.

        A staged (or set-aside) folder whose manifest verifies is complete: it is renamed into place first
        (unless ``promote`` is False: a look without changing anything).
        """
        skipped = []
        for step, _, path in reversed(self._candidates()):
            problem = problem_of(path, run_id=run_id)
            if problem is None:
                return (self._promote(path, step) if promote else path), skipped
            skipped.append(f"{path.name}: {problem}")
        return None, skipped

    def _candidates(self) -> list[tuple[int, int, Path]]:
        """(step, -preference, path) of every checkpoint-like folder, sorted so the best is last."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(2)), _RANK[match.group(1)], path))
        return sorted(found, key=lambda item: (item[0], -item[1]))

    def _promote(self, path: Path, step: int) -> Path:
        final = self.path(step)
        if path == final:
            return final
        if final.exists():  # a broken copy: keep it aside rather than delete it
            broken = self.root / f".old-checkpoint-{step:06d}"
            _remove(broken)
            final.rename(broken)
        path.rename(final)
        _fsync_dir(self.root)
        return final


ACCELERATE_DIR = "accelerate"  # accelerate's save_state folder inside a checkpoint


def write_checkpoint(
    accelerator: Any, manager: CheckpointManager, step: int, run_id: str, write_files: Callable[[Path], None]
) -> Path | None:
    """Stage checkpoint ``step`` (accelerate state from every process, then ``write_files(staging)`` on the main
    process), then commit it; the committed folder on the main process, None elsewhere. Both trainers save
    through this one writer. A failed write (a full disk) removes the staged folder and raises
    :class:`CheckpointWriteError` with one line; the previous checkpoint is untouched.
    """
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            manager.staging_dir(step)
        accelerator.wait_for_everyone()
        staging = manager.staging_path(step)
        accelerator.save_state(str(staging / ACCELERATE_DIR))
        if accelerator.is_main_process:
            write_files(staging)
        accelerator.wait_for_everyone()
        final = manager.commit(step, run_id) if accelerator.is_main_process else None
    except Exception as error:  # a full disk surfaces as OSError, SafetensorError or RuntimeError
        message = manager.write_failure(step, error)
        if accelerator.is_main_process:
            manager.discard_staging(step)
        if message is None:
            raise
        raise CheckpointWriteError(message) from error
    accelerator.wait_for_everyone()
    return final


def publish(staged: Path, final: Path) -> Path:
    """Sync the finished folder ``staged`` and swap it in as ``final`` (an old ``final`` is set aside first, then
    removed): ``final`` is at every moment absent, the old one whole, or the new one whole."""
    _fsync_tree(staged)
    aside = final.with_name(f".old-{final.name}")
    _remove(aside)
    if final.exists():
        final.rename(aside)
    staged.rename(final)
    _fsync_dir(final.parent)
    _remove(aside)
    return final


# ----- manifest ------------------------------------------------------------------------------------------
def write_manifest(folder: Path, step: int, run_id: str) -> Path:
    """Write ``manifest.json`` (every file's size and sha256, the step, the run id) atomically and durably."""
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format": 1, "step": step, "run_id": run_id, "files": files}
    temporary = folder / (MANIFEST + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.rename(folder / MANIFEST)
    _fsync_dir(folder)
    return folder / MANIFEST


def read_manifest(folder: Path) -> dict:
    """The parsed ``manifest.json`` of a checkpoint folder (raises OSError / ValueError when unreadable)."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("no 'files' table")
    return manifest


def problem_of(folder: Path, *, run_id: str | None = None, check_hashes: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint of run ``run_id`` (None: it is)."""
    if not (folder / MANIFEST).is_file():
        return "no manifest.json (its save was interrupted before it completed)"
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as error:
        return f"manifest.json is unreadable ({error})"
    if run_id is not None and manifest.get("run_id") != run_id:
        return f"belongs to run {manifest.get('run_id')}, not to this folder's run {run_id}"
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {entry['bytes']}"
        if check_hashes and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def _manifest_run(folder: Path) -> str | None:
    try:
        return read_manifest(folder).get("run_id")
    except (OSError, ValueError):
        return None


# ----- files ---------------------------------------------------------------------------------------------
_FULL_MARKERS = ("no space left on device", "os error 28", "disk quota exceeded")


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` (an OSError, a SafetensorError, torch.save's RuntimeError, ...) came from a full disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(marker in str(error).lower() for marker in _FULL_MARKERS):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20  # what a non-root writer may still use
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and the folder) to disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
