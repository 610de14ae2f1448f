"""A run folder belongs to one run: its id in ``run.json``, its config changes in ``config_history.jsonl``.

A fresh run into a folder that holds another run's checkpoints or metrics is refused with the three ways on
(``--resume``, another ``log.output_dir``, ``--overwrite``); ``--overwrite`` moves the old run aside to a sibling
folder and never deletes it. On ``--resume`` the config is compared with the one the checkpoint was saved with:
keys its state depends on (model, LoRA shape, algorithm) must match, tunables (learning rate, length, eval and
checkpoint cadence, logging) may change and are printed and appended to the history. Torch-free.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gen_rl.checkpoint import CheckpointManager, RunError
from gen_rl.core.config import to_dict

RUN_FILE = "run.json"
HISTORY_FILE = "config_history.jsonl"

# Keys that may change on --resume (exact dotted keys, or prefixes ending in "."); any other change is refused.
GENERATION_TUNABLES = (
    "train.lr",
    "train.num_steps",
    "train.lr_schedule",
    "train.warmup_updates",
    "train.weight_decay",
    "train.adam_betas",
    "train.adam_eps",
    "train.max_grad_norm",
    "train.microbatch_size",
    "train.mixed_precision",
    "train.check_log_probs",
    "train.ratio_check_fraction",
    "sample.groups_per_rollout",
    "model.gradient_checkpointing",
    "model.vae_tiling",
    "model.vae_slicing",
    "train.cpu_threads",
    "reward.nan_policy",
    "data.eval_prompts",
    "data.bad_records",
    "eval.",
    "log.",
    "checkpoint.",
)
VLM_TUNABLES = (
    "train.lr",
    "train.num_steps",
    "train.weight_decay",
    "train.adam_betas",
    "train.warmup_updates",
    "train.max_grad_norm",
    "train.microbatch_size",
    "sample.generation_batch_size",
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "accelerator.",
    "log.",
    "checkpoint.",
)
IGNORED = ("log.output_dir", "log.progress", "log.progress_bar")  # where / how the run is shown, not what


class RunFolderError(RunError):
    """``log.output_dir`` holds another run (or the flags contradict each other)."""


class ConfigChangeError(RunError):
    """``--resume`` with a change to what the saved state depends on."""


@dataclass
class RunFolder:
    """The claimed run folder: its id and, on resume, the checkpoint to continue from."""

    root: Path
    run_id: str
    resume_from: Path | None = None


def holdings(root: Path) -> list[str]:
    """What of a run ``root`` holds (its id, checkpoints, metrics rows); [] when it holds no checkpoint or metrics."""
    held = []
    checkpoints = root / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        names = [path.name for path in CheckpointManager(root, 1).all()]
        held.append(f"{len(names)} checkpoint(s)" + (f", newest {names[-1]}" if names else ""))
    metrics = root / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        rows = sum(1 for line in metrics.read_bytes().split(b"\n") if line.strip())
        held.append(f"metrics.jsonl with {rows} row(s)")
    run = _read_run(root)
    if held and run is not None:
        held.insert(0, f"run {run['run_id']}")
    return held


def check_claim(root: str | Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Raise the RunFolderError :func:`claim` would raise, changing nothing; returns what ``root`` holds.

    Torch-free, for start-up checks before anything heavy is imported.
    """
    root = Path(root)
    if resume and overwrite:
        raise RunFolderError(
            f"--resume continues the run in {root} and --overwrite moves it aside for a fresh one: pass only one"
        )
    held = holdings(root)
    if held and not resume and not overwrite:
        raise RunFolderError(
            f"log.output_dir {root} already holds a run ({'; '.join(held)}): continue it with --resume, choose "
            f"another log.output_dir, or pass --overwrite to move it aside to {root.name}.previous-<time> "
            "(nothing is deleted)"
        )
    return held


def check_start(config: Any, *, resume: bool, overwrite: bool) -> None:
    """Start-up check of the run folder before anything heavy is imported (changes nothing): a used folder on a
    fresh run, and on ``--resume`` a config change the newest complete checkpoint's state forbids."""
    check_claim(config.log.output_dir, resume=resume, overwrite=overwrite)
    root, run = Path(config.log.output_dir), _read_run(Path(config.log.output_dir))
    if not resume or run is None:
        return
    checkpoint, _ = CheckpointManager(root, 1).newest_complete(run["run_id"], promote=False)
    if checkpoint is not None and (checkpoint / "config.yaml").is_file():
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
        tunables = VLM_TUNABLES if config.task == "vlm" else GENERATION_TUNABLES
        check_resume_config(saved, to_dict(config), tunables, checkpoint)


def claim(root: str | Path, *, resume: bool, overwrite: bool) -> RunFolder:
    """Make ``root`` this run's folder (main process only): adopt its run on resume, else start a new one.

    A fresh run into a folder holding a run is refused unless ``overwrite``, which moves that run aside.
    """
    root = Path(root)
    held = check_claim(root, resume=resume, overwrite=overwrite)
    if resume:
        run = _read_run(root)
        return RunFolder(root, run["run_id"]) if run else _start(root)
    if held:
        moved = move_aside(root)
        print(f"[gen-rl] --overwrite: moved the previous run in {root} to {moved} (nothing was deleted)")
    return _start(root)


def move_aside(root: Path) -> Path:
    """Rename ``root`` to a new sibling ``<name>.previous-<UTC time>[-k]`` and return it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = root.with_name(f"{root.name}.previous-{stamp}")
    index = 1
    while target.exists():
        target = root.with_name(f"{root.name}.previous-{stamp}-{index}")
        index += 1
    root.rename(target)
    return target


def _start(root: Path) -> RunFolder:
    root.mkdir(parents=True, exist_ok=True)
    run = {"run_id": uuid.uuid4().hex[:12], "created": _now()}
    _write_json_atomically(root / RUN_FILE, run)
    return RunFolder(root, run["run_id"])


def _read_run(root: Path) -> dict[str, Any] | None:
    path = root / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunFolderError(
            f"{path} is unreadable ({error}); restore it or move the folder aside"
        ) from error
    if not isinstance(run, dict) or not isinstance(run.get("run_id"), str):
        raise RunFolderError(f"{path} has no run_id; restore it or move the folder aside")
    return run


# ----- config changes on resume ----------------------------------------------------------------------------
def config_changes(
    saved: dict[str, Any], current: dict[str, Any], tunables: tuple[str, ...]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(tunable, fixed) changes between two config trees, each ``{dotted key: (saved, current)}``."""
    before, after = _flatten(_plain(saved)), _flatten(_plain(current))
    tunable, fixed = {}, {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, "<absent>"), after.get(key, "<absent>")
        if old == new or key in IGNORED:
            continue
        allowed = any(key == name or (name.endswith(".") and key.startswith(name)) for name in tunables)
        (tunable if allowed else fixed)[key] = (old, new)
    return tunable, fixed


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], tunables: tuple[str, ...], checkpoint: Path
) -> dict[str, tuple[Any, Any]]:
    """The tunable changes since ``checkpoint``; raises ConfigChangeError listing any change its state forbids."""
    tunable, fixed = config_changes(saved, current, tunables)
    if fixed:
        listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in fixed.items())
        raise ConfigChangeError(
            f"--resume from {checkpoint}: {listed} changed, and the saved state depends on "
            f"{'it' if len(fixed) == 1 else 'them'}; resume with the saved value(s), or start a fresh run in "
            "another log.output_dir"
        )
    return tunable


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key old -> new, ...`` for a printout."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def record_history(root: Path, event: dict[str, Any]) -> None:
    """Append one event (fresh start, resume and its changes) to ``config_history.jsonl`` as a whole line."""
    line = json.dumps({"time": _now(), **_plain(event)}) + "\n"
    with (root / HISTORY_FILE).open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_history(root: Path) -> list[dict[str, Any]]:
    """Events of ``config_history.jsonl`` (oldest first)."""
    path = root / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----- helpers ---------------------------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(
            _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        )
    return flat


def _plain(value: Any) -> Any:
    """JSON-shaped copy (tuples become lists) so a YAML round trip compares equal."""
    return json.loads(json.dumps(value, default=str))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
