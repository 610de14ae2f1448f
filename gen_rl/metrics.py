"""``metrics.jsonl`` (one JSON object per training step) and the reward-curve picture drawn from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON lines; ``truncate_after(step)`` makes a resumed run continue the file seamlessly."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and flush it to disk (so a crash loses at most the current step)."""
        line = json.dumps({key: _plain(value) for key, value in record.items()}, allow_nan=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records written so far."""
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written by a run that crashed before its next checkpoint)."""
        kept = [record for record in self.read() if record.get("step", -1) <= step]
        temporary = self.path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        temporary.replace(self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file ([] if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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

    train = [r for r in records if r.get("reward_mean") is not None]
    evals = [r for r in records if r.get("eval_reward_mean") is not None]
    gold_keys = sorted({key for r in evals for key in r if key.startswith("eval_gold_")})
    figure, axes = plt.subplots(1, 2 if gold_keys else 1, figsize=(11 if gold_keys else 6, 3.5), dpi=120)
    axis = axes[0] if gold_keys else axes
    if train:
        steps = [r["step"] for r in train]
        mean = [r["reward_mean"] for r in train]
        std = [r.get("reward_std") or 0.0 for r in train]
        axis.plot(steps, mean, label="train reward (mean)", color="tab:blue")
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        axis.fill_between(steps, low, high, color="tab:blue", alpha=0.15, label="train reward (std)")
    if evals:
        axis.plot(
            [r["step"] for r in evals],
            [r["eval_reward_mean"] for r in evals],
            "o-",
            color="tab:orange",
            label="eval reward (held-out, fixed seeds)",
        )
    _style(axis, "reward")
    if gold_keys:
        _plot_changes(axes[1], evals, ["eval_reward_mean", *gold_keys])
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
            "optimised (eval)" if key == "eval_reward_mean" else key.removeprefix("eval_gold_") + " (gold)"
        )
        axis.plot([p[0] for p in points], [p[1] - points[0][1] for p in points], "o-", label=label)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    _style(axis, "change since first eval")


def _style(axis: Any, ylabel: str) -> None:
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
