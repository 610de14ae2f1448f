"""Evaluation during training: a held-out set, greedy and sampled completions, every reward, pass@k / mean@k.

Every ``eval.every_steps`` training steps (and after the last) each process decodes its share of the held-out
records (record ``i`` goes to process ``i mod world``) greedily once and samples ``k = eval.num_samples``
completions each; every reward function scores them, the results are gathered and the main process writes

* metrics, merged into that step's ``metrics.jsonl`` record (``R`` = a reward's name, ``reward`` = the weighted
  sum that training optimises; a reward that does not apply to a record's task is left out of its means; the
  names shared with the generation trainer are ``eval/reward/mean`` and ``eval/reward/R``):

  - ``eval/reward/mean`` and ``eval/reward/R``: mean over records of the sampled completions' mean weighted
    reward / reward ``R`` (of the greedy completion's when ``k = 0``);
  - ``eval/reward/greedy``, ``eval/reward/R/greedy``: mean over records of the greedy completion's reward;
  - ``eval/reward/R/mean@k``: mean over records of the mean of the ``k`` samples' rewards;
  - ``eval/reward/R/pass@k`` and ``eval/reward/R/pass@1``: the unbiased pass@k estimator (:func:`pass_at_k`), a
    sample passing when it scores ``>= eval.pass_threshold``, averaged over records (over a record's scored
    samples: ``k`` is capped at their number when a failing reward dropped some);
  - ``eval/completion/length_mean`` (tokens, sampled and greedy), ``eval/records``, ``eval/time_s``;
  - ``eval/reward/dropped_samples``: completions a failing reward left unscored (``reward.nan_policy: drop``;
    they are out of every mean, never a 0; with ``abort`` the failure stops the run);

* every completion to ``eval_completions.jsonl`` in the run folder (step, record id, mode, completion, rewards),
* the first ``eval.tracker_completions`` completions to the tracker as text (a table on wandb).

Sampling draws from its own seed (run seed, step, process) inside a forked RNG, so evaluating leaves the
training run's random stream untouched.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from gen_rl.core.seeding import derive_seed
from gen_rl.vlm.rollout import (
    EncodedPrompt,
    SamplingSettings,
    collate_prompts,
    completion_mask,
    decode_texts,
    generate_completions,
)
from gen_rl.vlm.scoring import RewardFunction, score_completions, unscored

__all__ = [
    "EVAL_COMPLETIONS",
    "EvalSample",
    "Evaluator",
    "eval_metrics",
    "log_completions_to_trackers",
    "log_text_table",
    "pass_at_k",
    "write_completions",
    "drop_completions_after",
]

EVAL_COMPLETIONS = "eval_completions.jsonl"


def pass_at_k(num_samples: int, num_passed: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, eq. 1):
    ``1 - C(n - c, k) / C(n, k)``, the chance that ``k`` of the ``n`` samples drawn without replacement hold a
    pass; computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``."""
    if not 0 < k <= num_samples or not 0 <= num_passed <= num_samples:
        raise ValueError(
            f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={num_samples}, c={num_passed}, k={k}"
        )
    if num_samples - num_passed < k:
        return 1.0
    failure = 1.0
    for i in range(num_samples - num_passed + 1, num_samples + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


@dataclass
class EvalSample:
    """One scored eval completion: record index in the eval set, ``mode`` ("greedy" | "sample"), sample number,
    text, token count, every reward's score (NaN: does not apply) and the weighted total."""

    record: int
    key: str
    mode: str
    sample: int
    text: str
    length: int
    scores: dict[str, float]
    total: float


def _mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN: a sample without a score), NaN when there is none."""
    finite = [value for value in values if math.isfinite(value)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


def eval_metrics(
    samples: Sequence[EvalSample], reward_names: Sequence[str], num_samples: int, pass_threshold: float
) -> dict[str, float]:
    """The ``eval/...`` metrics of scored completions (see the module docstring for each name)."""
    greedy = [sample for sample in samples if sample.mode == "greedy"]
    sampled: dict[int, list[EvalSample]] = {}
    for sample in samples:
        if sample.mode == "sample":
            sampled.setdefault(sample.record, []).append(sample)
    metrics: dict[str, float] = {"eval/records": float(len({sample.record for sample in samples}))}
    if greedy:
        metrics["eval/reward/greedy"] = _mean([sample.total for sample in greedy])
    if sampled:
        metrics["eval/reward/mean"] = _mean([_mean([s.total for s in group]) for group in sampled.values()])
    elif greedy:
        metrics["eval/reward/mean"] = metrics["eval/reward/greedy"]
    for name in reward_names:
        if greedy:
            metrics[f"eval/reward/{name}/greedy"] = _mean([sample.scores[name] for sample in greedy])
        if sampled:
            metrics.update(_sampled_metrics(name, list(sampled.values()), num_samples, pass_threshold))
        headline = f"eval/reward/{name}/mean@{num_samples}" if sampled else f"eval/reward/{name}/greedy"
        metrics[f"eval/reward/{name}"] = metrics[headline]  # the generation trainer's name for the same mean
    metrics["eval/completion/length_mean"] = _mean([float(sample.length) for sample in samples])
    metrics["eval/reward/dropped_samples"] = float(sum(not math.isfinite(sample.total) for sample in samples))
    return metrics


def _sampled_metrics(
    name: str, groups: Sequence[Sequence[EvalSample]], num_samples: int, pass_threshold: float
) -> dict[str, float]:
    """mean@k, pass@k and pass@1 of one reward over records (each record's scored samples, records where the
    reward applies)."""
    means, pass_k, pass_1 = [], [], []
    for group in groups:
        scores = [sample.scores[name] for sample in group if math.isfinite(sample.scores[name])]
        if not scores:
            continue  # the reward does not apply to this record's task
        passed = sum(score >= pass_threshold for score in scores)
        means.append(_mean(scores))
        pass_k.append(pass_at_k(len(scores), passed, min(num_samples, len(scores))))
        pass_1.append(pass_at_k(len(scores), passed, 1))
    return {
        f"eval/reward/{name}/mean@{num_samples}": _mean(means),
        f"eval/reward/{name}/pass@{num_samples}": _mean(pass_k),
        f"eval/reward/{name}/pass@1": _mean(pass_1),
    }


class Evaluator:
    """Decodes and scores the held-out records; :meth:`run` returns the metrics (same on every process).

    ``encode(record) -> (EncodedPrompt, reward metadata)`` is the trainer's own prompt encoding, so eval prompts
    are built exactly as training prompts (images, videos, templates, processed sizes).
    """

    def __init__(
        self,
        records: Sequence[Any],
        reward_functions: Sequence[RewardFunction],
        settings: SamplingSettings,
        encode: Callable[[Any], tuple[EncodedPrompt, dict]],
        *,
        greedy: bool,
        num_samples: int,
        pass_threshold: float,
        batch_size: int = 0,
        seed: int = 0,
        tracker_completions: int = 0,
        nan_policy: str = "abort",
        report: Callable[[str], None] = print,
    ) -> None:
        if not records:
            raise ValueError("the eval set has no records; check eval.data / eval.synthetic")
        self.records = list(records)
        self.reward_functions = list(reward_functions)
        self.settings = settings
        self.encode = encode
        self.greedy = greedy
        self.num_samples = num_samples
        self.pass_threshold = pass_threshold
        self.batch_size = batch_size
        self.seed = seed
        self.tracker_completions = tracker_completions
        self.nan_policy = nan_policy
        self.report = report
        self._encoded: dict[int, tuple[EncodedPrompt, dict]] = {}

    def _prompt(self, index: int) -> tuple[EncodedPrompt, dict]:
        if (
            index not in self._encoded
        ):  # encoded once per evaluation (pixels are not kept between evaluations)
            self._encoded[index] = self.encode(self.records[index])
        return self._encoded[index]

    def _generate(
        self, model, indices: list[int], greedy: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        prompts = [self._prompt(index)[0] for index in indices]
        size = self.batch_size or len(prompts)
        masks, chunks = [], []
        for start in range(0, len(prompts), size):
            batch = collate_prompts(prompts[start : start + size], self.settings.pad_token_id)
            ids, _ = generate_completions(model, batch, self.settings, greedy=greedy)
            ids = ids.cpu()
            chunks.append(ids)
            masks.append(completion_mask(ids, self.settings.eos_token_ids)[0])
        return chunks, masks

    def _score(self, processor, model, indices: list[int], mode: str) -> list[EvalSample]:
        chunks, masks = self._generate(model, indices, greedy=mode == "greedy")
        texts = [
            text
            for ids, mask in zip(chunks, masks, strict=True)
            for text in decode_texts(processor, ids, mask)
        ]
        lengths = [int(length) for mask in masks for length in mask.sum(dim=1)]
        records = [self.records[index] for index in indices]
        metadatas = [self._prompt(index)[1] for index in indices]
        scores = score_completions(
            self.reward_functions, texts, records, metadatas, nan_policy=self.nan_policy, report=self.report
        )
        weights = {reward.name: reward.weight for reward in self.reward_functions}
        total = sum(weights[name] * torch.nan_to_num(values, nan=0.0) for name, values in scores.items())
        total = total.masked_fill(unscored(scores), float("nan"))  # dropped by reward.nan_policy: no score
        samples = []
        for row, index in enumerate(indices):
            repeat = row % self.num_samples if mode == "sample" else 0
            samples.append(
                EvalSample(
                    record=index,
                    key=self.records[index].key,
                    mode=mode,
                    sample=repeat,
                    text=texts[row],
                    length=lengths[row],
                    scores={name: float(values[row]) for name, values in scores.items()},
                    total=float(total[row]),
                )
            )
        return samples

    def local_samples(self, model, processor, step: int, rank: int, world: int) -> list[EvalSample]:
        """This process's scored completions: greedy, then ``num_samples`` samples per record."""
        indices = list(range(rank, len(self.records), world))
        samples = []
        try:
            if indices and self.greedy:
                samples += self._score(processor, model, indices, "greedy")
            if indices and self.num_samples:
                devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(derive_seed(self.seed, "eval", step, rank))
                    repeated = [index for index in indices for _ in range(self.num_samples)]
                    samples += self._score(processor, model, repeated, "sample")
        finally:
            self._encoded.clear()
        return samples

    @torch.no_grad()
    def run(self, accelerator, model, processor, step: int, output_dir: Path) -> dict[str, float]:
        """Evaluate ``model`` (the unwrapped policy) after ``step`` training steps; returns the ``eval/`` metrics
        and, on the main process, appends the completions to ``eval_completions.jsonl`` and the tracker."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            local = self.local_samples(
                model, processor, step, accelerator.process_index, accelerator.num_processes
            )
        finally:
            model.train(was_training)
        samples = [EvalSample(**entry) for entry in gather_object([asdict(sample) for sample in local])]
        names = [reward.name for reward in self.reward_functions]
        metrics = eval_metrics(samples, names, self.num_samples, self.pass_threshold)
        metrics["eval/time_s"] = time.perf_counter() - start
        if accelerator.is_main_process:
            write_completions(Path(output_dir) / EVAL_COMPLETIONS, step, samples, self.records)
            log_completions_to_trackers(accelerator, samples, step, self.tracker_completions)
        return metrics


def write_completions(path: Path, step: int, samples: Sequence[EvalSample], records: Sequence[Any]) -> None:
    """Append one JSON line per eval completion (step, record id, problem, solution, mode, text, rewards)."""
    with path.open("a", encoding="utf-8") as handle:
        for sample in sorted(samples, key=lambda item: (item.record, item.mode, item.sample)):
            record = records[sample.record]
            entry = {
                "step": step,
                "id": sample.key,
                "problem": record.problem,
                "solution": record.solution,
                "mode": sample.mode,
                "sample": sample.sample,
                "completion": sample.text,
                "reward": sample.total if math.isfinite(sample.total) else None,
                "rewards": {
                    name: (value if math.isfinite(value) else None) for name, value in sample.scores.items()
                },
            }
            handle.write(json.dumps(entry, default=str) + "\n")


def drop_completions_after(path: Path, step: int) -> None:
    """Keep only the completions of evaluations at or before ``step`` (a resumed run evaluates the rest again)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    temporary.replace(path)


def log_completions_to_trackers(accelerator, samples: Sequence[EvalSample], step: int, count: int) -> None:
    """The first ``count`` eval completions to the trackers (:func:`log_text_table`, tag ``eval/completions``)."""
    if count <= 0:
        return
    shown = sorted(samples, key=lambda item: (item.record, item.mode, item.sample))[:count]
    rows = [[sample.key, sample.mode, sample.text, round(sample.total, 4)] for sample in shown]
    log_text_table(accelerator, "eval/completions", ["id", "mode", "completion", "reward"], rows, step)


def log_text_table(
    accelerator, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """A table to every tracker of ``accelerator``: a wandb table, or markdown text (tensorboard and others)."""
    if not rows or not accelerator.trackers:
        return
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(str(value).replace("|", "\\|").replace("\n", " ") for value in row) + " |"
        for row in rows
    ]
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_table(tag, columns=list(columns), data=[list(row) for row in rows], step=step)
        else:
            tracker.log({tag: "\n".join(lines)}, step=step)
