"""Held-out evaluation of a preference model: pairwise accuracy, accuracy by category, calibration, a report.

The predicted preference probability of a pair is Bradley-Terry's ``sigmoid(s_a - s_b)``. Calibration is
measured on both orientations of every pair (``p`` against label ``y``, and ``1 - p`` against ``1 - y``), so
the reliability diagram does not depend on which image a file lists first. With ``K`` equal-width bins of the
predicted probability, the expected calibration error is ``ECE = sum_k (n_k / N) |mean(p in k) - mean(y in k)|``
(Guo et al. 2017, eq. 3). Ties (label 0.5) count in the loss and calibration, not in the accuracy.

The report (``<log.output_dir>/eval``): ``report.md`` (a Markdown table of the metrics, by category, and the
reliability bins), ``reliability.png`` (matplotlib) and ``scores.jsonl`` (every held-out pair's scores).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gen_rl.data import DataError
from gen_rl.reward_model.data import Comparison
from gen_rl.reward_model.losses import bradley_terry_loss, pairwise_accuracy, preference_probability
from rewards.preference_model import PreferenceScorer, score_images


def load_image(path: Path, comparison: Comparison | None = None) -> Tensor:
    """An image file as pixels ``[3, H, W]`` float32 in [0, 1] (RGB); a DataError names the record when it fails."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as error:
        where = f"{comparison.source}:{comparison.line}: " if comparison is not None else ""
        raise DataError(f"{where}image {path} cannot be read ({error}); fix or remove the record") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


@dataclass
class CalibrationBin:
    """One reliability bin: predicted probabilities in ``[low, high)`` (the last bin includes 1)."""

    low: float
    high: float
    count: int
    mean_predicted: float
    mean_observed: float


def calibration_bins(probability: Tensor, label: Tensor, bins: int) -> list[CalibrationBin]:
    """Reliability bins of ``(p, y)`` and ``(1 - p, 1 - y)`` over ``bins`` equal-width bins of [0, 1]."""
    predicted = torch.cat([probability, 1.0 - probability]).double()
    observed = torch.cat([label, 1.0 - label]).double()
    index = (predicted * bins).floor().clamp(0, bins - 1).long()
    result = []
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        result.append(
            CalibrationBin(
                low=k / bins,
                high=(k + 1) / bins,
                count=count,
                mean_predicted=float(predicted[members].mean()) if count else math.nan,
                mean_observed=float(observed[members].mean()) if count else math.nan,
            )
        )
    return result


def expected_calibration_error(bins: list[CalibrationBin]) -> float:
    """``sum_k (n_k / N) |mean predicted - mean observed|`` over the non-empty bins (Guo et al. 2017, eq. 3)."""
    total = sum(item.count for item in bins)
    return sum(
        item.count / total * abs(item.mean_predicted - item.mean_observed) for item in bins if item.count
    )


@dataclass
class Evaluation:
    """The held-out metrics, the reliability bins and every pair's scores."""

    metrics: dict[str, float]
    bins: list[CalibrationBin]
    pairs: list[dict[str, Any]]


def pair_metrics(
    score_a: Tensor, score_b: Tensor, label: Tensor, categories: list[str | None], bins: int
) -> tuple[dict[str, float], list[CalibrationBin]]:
    """``eval/accuracy``, ``eval/loss``, ``eval/ece``, counts and ``eval/accuracy/<category>``; the bins."""
    reliability = calibration_bins(preference_probability(score_a, score_b), label, bins)
    metrics = {
        "eval/accuracy": float(pairwise_accuracy(score_a, score_b, label)),
        "eval/loss": float(bradley_terry_loss(score_a, score_b, label)),
        "eval/ece": expected_calibration_error(reliability),
        "eval/pairs": float(label.numel()),
        "eval/ties": float((label == 0.5).sum()),
    }
    for category in sorted({item for item in categories if item is not None}):
        members = torch.tensor([item == category for item in categories])
        metrics[f"eval/accuracy/{category}"] = float(
            pairwise_accuracy(score_a[members], score_b[members], label[members])
        )
    return metrics, reliability


def evaluate_pairs(
    scorer: PreferenceScorer,
    pairs: list[Comparison],
    batch_size: int,
    bins: int,
    image_loader: Callable[[Path, Comparison], Tensor] = load_image,
) -> Evaluation:
    """Score every held-out pair (images in the order a1, b1, a2, b2, ..., ``batch_size`` per forward)."""
    images, prompts = [], []
    for pair in pairs:
        for path in pair.images:
            images.append(image_loader(path, pair))
            prompts.append(pair.prompt)
    scores = score_images(scorer, images, prompts, batch_size)
    score_a, score_b = scores[0::2], scores[1::2]
    label = torch.tensor([pair.label for pair in pairs], dtype=torch.float32)
    metrics, reliability = pair_metrics(score_a, score_b, label, [pair.category for pair in pairs], bins)
    rows = [
        {
            "line": pair.line,
            "prompt": pair.prompt,
            "image_a": str(pair.images[0]),
            "image_b": str(pair.images[1]),
            "label": pair.label,
            "score_a": float(a),
            "score_b": float(b),
            "category": pair.category,
        }
        for pair, a, b in zip(pairs, score_a.tolist(), score_b.tolist(), strict=True)
    ]
    return Evaluation(metrics=metrics, bins=reliability, pairs=rows)


def write_report(evaluation: Evaluation, folder: str | Path, title: str = "Preference model") -> Path:
    """``report.md``, ``reliability.png`` and ``scores.jsonl`` in ``folder``; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "scores.jsonl").open("w", encoding="utf-8") as handle:
        for row in evaluation.pairs:
            handle.write(json.dumps(row) + "\n")
    plot_reliability(evaluation.bins, folder / "reliability.png")
    metrics = evaluation.metrics
    lines = [f"# {title}: held-out evaluation", "", "| metric | value |", "|---|---|"]
    for name in ("eval/accuracy", "eval/loss", "eval/ece", "eval/pairs", "eval/ties"):
        lines.append(f"| {name.removeprefix('eval/')} | {_shown(metrics[name])} |")
    categories = sorted(name for name in metrics if name.startswith("eval/accuracy/"))
    if categories:
        lines += ["", "## Accuracy by category", "", "| category | accuracy |", "|---|---|"]
        lines += [
            f"| {name.removeprefix('eval/accuracy/')} | {_shown(metrics[name])} |" for name in categories
        ]
    lines += [
        "",
        "## Calibration (both orientations of every pair)",
        "",
        "| predicted P(a > b) | pairs | mean predicted | observed |",
        "|---|---|---|---|",
    ]
    for item in evaluation.bins:
        lines.append(
            f"| [{item.low:.2f}, {item.high:.2f}) | {item.count} | {_shown(item.mean_predicted)} | "
            f"{_shown(item.mean_observed)} |"
        )
    lines += ["", "![reliability](reliability.png)", ""]
    report = folder / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def plot_reliability(bins: list[CalibrationBin], path: Path) -> Path:
    """A reliability diagram: observed preference rate against the predicted probability, per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [item for item in bins if item.count]
    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    width = bins[0].high - bins[0].low if bins else 0.1
    axis.bar(
        [item.low for item in filled],
        [item.mean_observed for item in filled],
        width=width,
        align="edge",
        alpha=0.6,
        edgecolor="black",
        label="observed",
    )
    axis.plot(
        [item.mean_predicted for item in filled], [item.mean_observed for item in filled], "o-", label="bins"
    )
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(a preferred)", ylabel="observed rate")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _shown(value: float) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"
