"""``metrics.jsonl`` (one JSON object per training step) and the reward-curve picture drawn from it.

Each record is appended as one whole line (write, flush, fsync). A kill or a full disk mid-append can leave a
torn last line (no newline, or not JSON): reading drops it with a warning, and ``--resume`` rewrites the file
without it. A broken line anywhere else is not ours to guess about: it is an error naming the line.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from gen_rl import faults
from gen_rl.checkpoint import CheckpointWriteError


class MetricsLog:
    """Append-only JSON lines; ``truncate_after(step)`` makes a resumed run continue the file seamlessly."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as a whole line and fsync it (a crash loses at most the line being written)."""
        line = json.dumps({key: _plain(value) for key, value in record.items()}, allow_nan=True)
        data = (line + "\n").encode("utf-8")
        try:
            with self.path.open("ab") as handle:
                faults.reached(
                    "metrics.append", before_kill=lambda: _write_synced(handle, data[: len(data) // 2])
                )
                _write_synced(handle, data)
        except OSError as error:
            raise CheckpointWriteError(
                f"appending to {self.path} failed: {error.strerror}; the last checkpoint is intact. Free space "
                "(or fix the folder), then run the same command with --resume."
            ) from error

    def read(self) -> list[dict[str, Any]]:
        """All whole records written so far (a torn last line is dropped with a warning)."""
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Keep only records of steps <= ``step`` (later ones came from a run that stopped before its next
        checkpoint) and drop a torn tail; the file is replaced atomically."""
        kept = [record for record in self.read() if record.get("step", -1) <= step]
        self.rewrite(kept)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file's content by ``records`` atomically (temporary file, fsync, rename)."""
        temporary = self.path.with_suffix(".jsonl.tmp")
        with temporary.open("wb") as handle:
            _write_synced(handle, "".join(json.dumps(record) + "\n" for record in records).encode("utf-8"))
        temporary.replace(self.path)
        descriptor = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _write_synced(handle: Any, data: bytes) -> None:
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file ([] if it does not exist); a torn last line is dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    *lines, tail = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if tail.strip():  # text after the last newline: an append that never finished
        print(
            f"[gen-rl] warning: {path}:{len(lines) + 1}: dropped a torn last line ({len(tail)} characters "
            "without a newline: a write was cut off)",
            file=sys.stderr,
        )
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number} is not a JSON record ({error.msg}); fix or delete that line"
                ) from error
    return records


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plot_reward_curve(records: list[dict[str, Any]], path: str | Path) -> Path:
    """PNG of the training reward (mean +- std band) and the eval reward against the training step.

    When gold rewards (scored at eval, never optimised) are logged, a second panel shows every eval reward's
    change since the first eval: an optimised reward that rises while the gold ones fall is reward hacking.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("reward/mean") is not None]
    evals = [r for r in records if r.get("eval/reward/mean") is not None]
    gold_keys = sorted({key for r in evals for key in r if key.startswith("eval/gold/")})
    figure, axes = plt.subplots(1, 2 if gold_keys else 1, figsize=(11 if gold_keys else 6, 3.5), dpi=120)
    axis = axes[0] if gold_keys else axes
    if train:
        steps = [r["step"] for r in train]
        mean = [r["reward/mean"] for r in train]
        std = [r.get("reward/std") or 0.0 for r in train]
        axis.plot(steps, mean, label="train reward (mean)", color="tab:blue")
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        axis.fill_between(steps, low, high, color="tab:blue", alpha=0.15, label="train reward (std)")
    if evals:
        axis.plot(
            [r["step"] for r in evals],
            [r["eval/reward/mean"] for r in evals],
            "o-",
            color="tab:orange",
            label="eval reward (held-out, fixed seeds)",
        )
    _style(axis, "reward")
    if gold_keys:
        _plot_changes(axes[1], evals, ["eval/reward/mean", *gold_keys])
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(path)
    return path


def _plot_changes(axis: Any, evals: list[dict[str, Any]], keys: list[str]) -> None:
    """Each eval series minus its first value: optimised against gold rewards."""
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if not points:
            continue
        label = (
            "optimised (eval)" if key == "eval/reward/mean" else key.removeprefix("eval/gold/") + " (gold)"
        )
        axis.plot([p[0] for p in points], [p[1] - points[0][1] for p in points], "o-", label=label)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    _style(axis, "change since first eval")


def _style(axis: Any, ylabel: str) -> None:
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
