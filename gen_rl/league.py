"""The league table: every algorithm on each task config, several seeds, compared at equal compute.

Each run is a real ``gen_rl.trainer.GenerationTrainer`` (passed in by the caller) driven phase by phase, with
two compute meters: the training time (``clock``: wall-clock, or the process's CPU time on a shared machine;
evaluation excluded) and the model evaluations (every sample row through the denoiser's forward, counted by a
forward pre-hook: rollout steps, CFG doubling, training and reference passes, checkpoint recomputation; evaluation
excluded). A run trains until both budgets are spent: ``budget_seconds`` of training time and ``budget_evals``
model evaluations (the reference algorithm's count at the time budget when not given; a run that needs more than
``max_time_factor`` x the time budget to reach it stops there and its equal-evaluations cell says so). It is
evaluated (``trainer.evaluate``: held-out prompts, fixed seeds, optimised and gold rewards) before training, at
each ``1/points`` of the time budget, and at the first step boundary past each budget. Every evaluation is a
record of the run's own ``metrics.jsonl`` with ``league/*`` keys; the table and the plot read only those files.

An algorithm's recipe (``<recipes>/<name>.yaml``, the demo's ``configs/demo/algorithms``) supplies its
``algorithm`` section and the sampling / optimiser keys of :data:`RECIPE_KEYS`; the task config supplies the
model, rewards, prompts and evaluation. Without a recipe the task's ``algorithm`` section is kept with the name
switched (options the algorithm does not have are dropped). An algorithm the trainer refuses for a task (a
non-differentiable reward under reward backprop, ...) is left out with the refusal as the footnote.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gen_rl.algorithms.options import options_class
from gen_rl.core.config import ConfigError, from_dict, merge, read_yaml
from gen_rl.trainer_config import GenerationConfig

# the keys an algorithm's recipe carries over onto a task config (besides its whole ``algorithm`` section)
RECIPE_KEYS: dict[str, tuple[str, ...]] = {
    "sample": ("num_steps", "cfg_scale", "sde_type", "noise_level", "share_initial_noise"),
    "train": ("lr", "samples_per_update", "microbatch_size"),
}
TIME_KEY, EVALS_KEY, CALLS_KEY = "league/train_seconds", "league/model_evals", "league/denoiser_calls"
AT_KEY = "league/at"  # "start", "time_point", "time_budget", "evals_budget" (a record may hold several, joined by +)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class DenoiserCounter:
    """Counts forward calls of a module and the sample rows they carry (the batch size of the first tensor).

    A forward pre-hook on the denoiser sees every call that reaches it, whichever wrapper made it; ``paused()``
    stops counting (evaluation). One call on a CFG-doubled batch of ``2 B`` rows counts ``2 B`` evaluations."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.evaluations = 0
        self.active = True
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        rows = next((t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), 1)
        self.calls += 1
        self.evaluations += int(rows)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Calls inside the block are not counted."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()


@dataclass
class Budget:
    """When a run stops and when it is evaluated."""

    seconds: float
    evals: int | None = None  # model evaluations; None: only the time budget
    points: int = 4  # evaluations at each 1/points of the time budget
    max_time_factor: float = 3.0  # stop chasing the evaluations budget after this many time budgets
    max_steps: int = 100_000
    clock: str = "wall"


@dataclass
class RunResult:
    """One (task, algorithm, seed) run: its folder and evaluation records, or why it did not run."""

    task: str
    algorithm: str
    seed: int
    output_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None
    evals_budget: int | None = None  # the task's equal-evaluations budget

    def at(self, budget: str) -> dict[str, Any] | None:
        """The evaluation record taken at ``budget`` ('time_budget' or 'evals_budget'), if any."""
        return next((r for r in self.records if budget in str(r.get(AT_KEY, "")).split("+")), None)


def task_name(path: str | Path) -> str:
    """A task's name: its config file's stem."""
    return Path(path).stem


def algorithm_section(task_algorithm: dict[str, Any], name: str) -> dict[str, Any]:
    """The task's ``algorithm`` section with ``name`` switched, keeping only the options ``name`` has."""
    own = {f.name for f in dataclasses.fields(options_class(name))}
    return {"name": name, **{k: v for k, v in task_algorithm.items() if k in own and k != "name"}}


def recipe_file(algorithm: str, recipes: str | Path | dict[str, Path] | None) -> Path | None:
    """The recipe YAML of ``algorithm``: ``recipes[algorithm]`` (a mapping), or ``<recipes>/<algorithm>.yaml``
    (a folder) when it exists; None otherwise."""
    if recipes is None:
        return None
    if isinstance(recipes, dict):
        return Path(recipes[algorithm]) if algorithm in recipes else None
    path = Path(recipes) / f"{algorithm}.yaml"
    return path if path.is_file() else None


def league_config_data(
    task_path: str | Path,
    algorithm: str,
    seed: int,
    output_dir: str | Path,
    recipes: str | Path | dict[str, Path] | None = None,
    cpu_threads: int = 0,
) -> dict[str, Any]:
    """The config mapping of one league run: the task, the algorithm's recipe keys on top, the league's settings
    (seed, output folder, no periodic evaluation or checkpoint: the league evaluates at its budgets)."""
    data = read_yaml(task_path)
    recipe_path = recipe_file(algorithm, recipes)
    if recipe_path is not None:
        recipe = read_yaml(recipe_path)
        data["algorithm"] = dict(recipe.get("algorithm") or {}, name=algorithm)
        for section, keys in RECIPE_KEYS.items():
            picked = {k: v for k, v in (recipe.get(section) or {}).items() if k in keys}
            data[section] = merge(data.get(section) or {}, picked)
    else:
        data["algorithm"] = algorithm_section(data.get("algorithm") or {}, algorithm)
    return merge(
        data,
        {
            "train": {
                "seed": seed,
                "num_steps": 100_000,
                "cpu_threads": cpu_threads,
                "lr_schedule": "constant",
            },
            "eval": {"every_steps": 0},
            "checkpoint": {"every_steps": 0},
            "log": {"output_dir": str(output_dir), "tracker": "none", "progress": False},
        },
    )


def build_config(data: dict[str, Any]) -> GenerationConfig:
    """The validated generation config of a mapping."""
    config = from_dict(GenerationConfig, data)
    config.validate()
    return config


def run_one(
    config: GenerationConfig, budget: Budget, make_trainer: Callable[..., Any]
) -> list[dict[str, Any]]:
    """Train ``config`` to ``budget`` with ``make_trainer(config, overwrite=True)`` (``GenerationTrainer``: the
    caller passes it, the layering keeps trainers out of this module); returns the evaluation records (also in
    the run's metrics.jsonl)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run starts from a fresh accelerator
    trainer = make_trainer(config, overwrite=True)
    counter = DenoiserCounter(trainer.policy.denoiser)
    clock = CLOCKS[budget.clock]
    evaluations: list[dict[str, Any]] = []

    def evaluate(step: int, spent: float, reasons: list[str]) -> None:
        with counter.paused():
            record = {"step": step, **trainer.evaluate(step)}
        record.update({TIME_KEY: spent, EVALS_KEY: counter.evaluations, CALLS_KEY: counter.calls})
        record[AT_KEY] = "+".join(reasons)
        trainer.metrics.append(record)
        evaluations.append(record)

    try:
        evaluate(0, 0.0, ["start"])
        spent, next_point = 0.0, 1
        time_done = evals_done = False
        limit = budget.seconds * budget.max_time_factor
        for step in range(budget.max_steps):
            started = clock()
            collected = trainer.collect(step)
            stats = trainer.update(collected.batch, step)
            spent += clock() - started
            trainer.metrics.append(
                {"step": step, **collected.stats, **stats, TIME_KEY: spent, EVALS_KEY: counter.evaluations}
            )
            reasons = []
            while next_point <= budget.points and spent >= budget.seconds * next_point / budget.points:
                next_point += 1
                if "time_point" not in reasons:
                    reasons.append("time_point")
            if not time_done and spent >= budget.seconds:
                time_done = True
                reasons.append("time_budget")
            if not evals_done and budget.evals is not None and counter.evaluations >= budget.evals:
                evals_done = True
                reasons.append("evals_budget")
            if reasons:
                evaluate(step + 1, spent, reasons)
            if time_done and (evals_done or budget.evals is None or spent >= limit):
                break
    finally:
        counter.close()
        trainer.accelerator.end_training()
    return evaluations


def run_league(
    configs: list[str | Path],
    algorithms: list[str],
    seeds: int,
    budget: Budget,
    out: str | Path,
    make_trainer: Callable[..., Any],
    recipes: str | Path | dict[str, Path] | None = None,
    cpu_threads: int = 0,
    reference: str | None = None,
    log: Callable[[str], None] = print,
    first_seed: int = 0,
) -> list[RunResult]:
    """Every (task, algorithm, seed) run, each trained by ``make_trainer`` (``gen_rl.trainer.GenerationTrainer``);
    the evaluations budget of a task is ``budget.evals`` or, when None, the
    mean model evaluations of ``reference`` (default: the first algorithm) at the time budget, run first."""
    out = Path(out)
    results: list[RunResult] = []
    for task_path in configs:
        task = task_name(task_path)
        ordered = list(algorithms)
        first = reference or ordered[0]
        if first in ordered:
            ordered.remove(first)
            ordered.insert(0, first)
        task_budget = dataclasses.replace(budget)
        for algorithm in ordered:
            if task_budget.evals is None and algorithm != first:
                task_budget.evals = reference_evals_budget(results, task, first)
                log(f"[league] {task}: evaluations budget {task_budget.evals} ({first} at the time budget)")
            for seed in range(first_seed, first_seed + seeds):
                run = RunResult(task, algorithm, seed, out / task / algorithm / f"seed{seed}")
                run.evals_budget = task_budget.evals
                results.append(run)
                try:
                    config = build_config(
                        league_config_data(task_path, algorithm, seed, run.output_dir, recipes, cpu_threads)
                    )
                    started = time.perf_counter()
                    run.records = run_one(config, task_budget, make_trainer)
                except ConfigError as error:  # the trainer's start-up refusal (impossible combination)
                    run.refused = " ".join(str(error).split())
                    log(f"[league] {task} {algorithm} seed {seed}: left out: {run.refused}")
                    break  # the other seeds would be refused the same way
                except Exception as error:  # noqa: BLE001 - one failing algorithm must not stop the league
                    run.refused = f"failed: {type(error).__name__}: " + " ".join(str(error).split())
                    log(f"[league] {task} {algorithm} seed {seed}: left out: {run.refused}")
                    break  # the other seeds would be refused the same way
                finally:
                    save_runs(results, out)
                last = run.records[-1]
                run.evals_budget = task_budget.evals
                log(
                    f"[league] {task} {algorithm} seed {seed}: eval/reward/mean "
                    f"{run.records[0]['eval/reward/mean']:.4f} -> {last['eval/reward/mean']:.4f} "
                    f"({last[TIME_KEY]:.1f} s training, {last[EVALS_KEY]} model evaluations, "
                    f"{time.perf_counter() - started:.0f} s in all)"
                )
        for run in results:
            if run.task == task:
                run.evals_budget = task_budget.evals
        save_runs(results, out)
    return results


def save_runs(results: list[RunResult], out: str | Path) -> Path:
    """``<out>/runs.json``: each run's task, algorithm, seed, folder, refusal and evaluations budget (its records
    stay in its own metrics.jsonl); :func:`load_runs` reads it back, so reports can merge several leagues."""
    path = Path(out) / "runs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ("task", "algorithm", "seed", "refused", "evals_budget")
    rows = [{**{k: getattr(run, k) for k in fields}, "output_dir": str(run.output_dir)} for run in results]
    path.write_text(json.dumps(rows, indent=1))
    return path


def load_runs(out: str | Path) -> list[RunResult]:
    """The runs :func:`save_runs` wrote under ``out``: the refused ones and those that reached their time budget
    (a league stopped midway leaves an unfinished run out); each task's evaluations budget filled in."""
    rows = json.loads((Path(out) / "runs.json").read_text())
    runs = [RunResult(**{**row, "output_dir": Path(row["output_dir"])}) for row in rows]
    budgets = {run.task: run.evals_budget for run in runs if run.evals_budget is not None}
    kept = []
    for run in runs:
        run.evals_budget = budgets.get(run.task)
        if run.refused or (
            (run.output_dir / "metrics.jsonl").exists()
            and budget_record(read_evaluations(run.output_dir), "time") is not None
        ):
            kept.append(run)
    return kept


def reference_evals_budget(results: list[RunResult], task: str, reference: str) -> int | None:
    """The equal-evaluations budget of ``task``: the fewest model evaluations any seed of ``reference`` had spent
    at its time budget (so every reference seed has an evaluation at or past it); None without such a run."""
    reached = [
        point[EVALS_KEY]
        for run in results
        if run.task == task and run.algorithm == reference and (point := run.at("time_budget")) is not None
    ]
    return min(reached) if reached else None


# ----- reading the runs back: the table and the plot use only the runs' metrics.jsonl --------------------------
def read_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """The league's evaluation records of one run folder's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if AT_KEY in r]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of ``values``."""
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))


def summarise(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (task, algorithm): start, equal-time and equal-evaluations rewards (mean, spread over seeds),
    gold rewards at the time budget, the compute each budget point used, read from each run's metrics.jsonl."""
    rows: list[dict[str, Any]] = []
    keys: dict[tuple[str, str], list[RunResult]] = {}
    for run in results:
        keys.setdefault((run.task, run.algorithm), []).append(run)
    for (task, algorithm), runs in keys.items():
        refused = next((run.refused for run in runs if run.refused), None)
        row: dict[str, Any] = {"task": task, "algorithm": algorithm, "seeds": len(runs), "refused": refused}
        if refused is None:
            evaluations = [read_evaluations(run.output_dir) for run in runs]
            row.update(_budget_cells(evaluations, runs[0].evals_budget))
        rows.append(row)
    return rows


def budget_record(
    records: list[dict[str, Any]], budget: str, evals: int | None = None
) -> dict[str, Any] | None:
    """The evaluation at the time budget (``budget='time'``: the record tagged ``time_budget``) or at the
    evaluations budget (``'evals'``: the first record with at least ``evals`` model evaluations); None if none."""
    if budget == "time":
        return next((r for r in records if "time_budget" in str(r[AT_KEY]).split("+")), None)
    if evals is None:
        return None
    return next((r for r in records if r[EVALS_KEY] >= evals), None)


def _budget_cells(evaluations: list[list[dict[str, Any]]], evals: int | None) -> dict[str, Any]:
    cells: dict[str, Any] = {"evals_budget": evals}
    starts = [records[0] for records in evaluations]
    cells["start"] = mean_spread([r["eval/reward/mean"] for r in starts])
    for name in ("time", "evals"):
        points = [budget_record(records, name, evals) for records in evaluations]
        if any(point is None for point in points):
            cells[name] = None
            continue
        cells[name] = mean_spread([p["eval/reward/mean"] for p in points])
        cells[f"{name}_seconds"] = mean_spread([p[TIME_KEY] for p in points])[0]
        cells[f"{name}_evals"] = mean_spread([p[EVALS_KEY] for p in points])[0]
        cells[f"{name}_steps"] = mean_spread([p["step"] for p in points])[0]
        golds = sorted(k for k in points[0] if k.startswith("eval/gold/"))
        cells[f"{name}_gold"] = {k[len("eval/gold/") :]: mean_spread([p[k] for p in points]) for k in golds}
        cells[f"{name}_gold_start"] = {
            k[len("eval/gold/") :]: mean_spread([r[k] for r in starts]) for k in golds
        }
    return cells


def _cell(value: tuple[float, float] | None) -> str:
    return "n/a" if value is None else f"{value[0]:.4f} ± {value[1]:.4f}"


def markdown_table(rows: list[dict[str, Any]], budget: Budget) -> str:
    """The league as Markdown: one table per task, footnotes for the algorithms left out."""
    lines: list[str] = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        ran = [row for row in task_rows if row["refused"] is None]
        evals = next((row["evals_budget"] for row in ran if row.get("evals_budget")), None)
        lines += [
            f"### {task}",
            "",
            f"Held-out eval/reward/mean, mean ± std over seeds; equal time = after {budget.seconds:g} s of "
            f"training ({budget.clock} clock); equal evaluations = first evaluation at or past {evals} denoiser "
            "sample-evaluations (evaluation excluded)."
            if evals
            else f"Held-out eval/reward/mean, mean ± std "
            f"over seeds; equal time = after {budget.seconds:g} s of training ({budget.clock} clock).",
            "",
            "| algorithm | seeds | start | equal time | steps | model evals | equal evals | s to evals budget "
            "| gold at equal time (start -> end) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        notes: list[str] = []
        for row in task_rows:
            if row["refused"] is not None:
                notes.append(f"[^{row['algorithm']}-{task}]: {row['algorithm']}: {row['refused']}")
                lines.append(
                    f"| {row['algorithm']} [^{row['algorithm']}-{task}] | - | left out | | | | | | |"
                )
                continue
            gold = "; ".join(
                f"{name} {row['time_gold_start'][name][0]:.4f} -> {_cell(value)}"
                for name, value in (row.get("time_gold") or {}).items()
            )
            evals_seconds = f"{row['evals_seconds']:.1f}" if row.get("evals") is not None else "not reached"
            lines.append(
                f"| {row['algorithm']} | {row['seeds']} | {_cell(row['start'])} | {_cell(row.get('time'))} | "
                f"{row.get('time_steps', 0):.1f} | {row.get('time_evals', 0):.0f} | {_cell(row.get('evals'))} | "
                f"{evals_seconds} | {gold} |"
            )
        lines += ["", *notes, ""] if notes else [""]
    return "\n".join(lines)


def plot_league(results: list[RunResult], path: str | Path) -> None:
    """Reward vs training time and vs model evaluations, one line per algorithm (mean over seeds, interpolated
    on a common grid), a band of ± one std; one row of two panels per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(dict.fromkeys(run.task for run in results))
    names = list(dict.fromkeys(run.algorithm for run in results))  # one colour and style per algorithm
    colours = plt.cm.tab20(np.linspace(0, 1, 20))
    figure, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        by_algorithm: dict[str, list[list[dict[str, Any]]]] = {}
        for run in results:
            if run.task == task and run.refused is None:
                by_algorithm.setdefault(run.algorithm, []).append(read_evaluations(run.output_dir))
        for column, (key, label) in enumerate(
            ((TIME_KEY, "training seconds"), (EVALS_KEY, "model evaluations"))
        ):
            axis = axes[row][column]
            for algorithm, runs in by_algorithm.items():
                end = min(max(r[key] for r in records) for records in runs)
                grid = np.linspace(0.0, end, 50)
                curves = np.stack(
                    [
                        np.interp(grid, [r[key] for r in records], [r["eval/reward/mean"] for r in records])
                        for records in runs
                    ]
                )
                mean, std = curves.mean(0), curves.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(grid)
                index = names.index(algorithm)
                colour = colours[index % 20]
                axis.plot(
                    grid, mean, label=algorithm, color=colour, linestyle=("-", "--", ":")[index // 20 % 3]
                )
                axis.fill_between(grid, mean - std, mean + std, color=colour, alpha=0.12)
            axis.set_xlabel(label)
            axis.set_ylabel("held-out eval/reward/mean")
            axis.set_title(f"{task}: reward vs {label}")
            axis.grid(alpha=0.3)
        if by_algorithm:
            axes[row][1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: list[RunResult], budget: Budget, out: str | Path) -> tuple[Path, Path]:
    """league.md, league.json (the rows) and league.png under ``out``; returns the table's and the plot's paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    table = out / "league.md"
    table.write_text(markdown_table(rows, budget))
    (out / "league.json").write_text(json.dumps(rows, indent=1, default=str))
    plot = out / "league.png"
    plot_league(results, plot)
    return table, plot
