"""The phase skeleton of a training run, shared by the trainers: one loop a reader follows top to bottom.

Each training step runs the phases ``collect -> update -> log``; ``collect`` is ``sample -> score -> advantages``
(a trainer that repeats them, as the VLM's DAPO dynamic sampling does, overrides :meth:`PhaseLoop.collect`).
Every N steps the loop runs ``evaluate`` and ``save``. ``train()`` adds the progress bar, :meth:`PhaseLoop.finish`
(the final evaluation and save) and the one line printed when a run stops early (its last checkpoint is intact:
continue with ``--resume``; a failed checkpoint write's error says so itself). A trainer subclasses
:class:`PhaseLoop` and implements the phases; the loop never looks inside a batch.

Two step-numbering policies (:attr:`PhaseLoop.records_after_update`):

* ``False`` (generation): step ``t``'s record is ``step: t`` and its evaluation runs before the update, so it
  describes the weights after ``t`` updates; ``finish`` adds a record ``step: num_steps`` with the final eval.
* ``True`` (VLM): step ``t``'s record is ``step: t + 1``, evaluated after the update (every N steps and after the
  last step), so each record describes the weights after ``t + 1`` updates and there is no extra final record.

Either way a checkpoint ``s`` holds the weights after ``s`` updates, and a resume from it runs step ``s`` next.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from gen_rl.checkpoint import CheckpointWriteError, RunError
from gen_rl.metrics import plot_reward_curve


@dataclass
class Collected:
    """What the ``collect`` phase hands to the rest of the step.

    Attributes:
        batch: this process's share of the step's scored rollouts, with advantages (what ``update`` trains on).
        stats: the record's reward / advantage statistics.
        timings: the record's ``time/`` entries of the collect phases (written after the update's statistics).
    """

    batch: Any
    stats: dict[str, Any]
    timings: dict[str, float]


class PhaseLoop:
    """Subclasses set ``config``, ``accelerator``, ``metrics``, ``checkpoints``, ``output_dir``, ``start_step`` and
    implement ``sample``, ``score``, ``advantages`` (or override ``collect``), ``update``, ``evaluate``, ``save``
    and ``summary``."""

    config: Any
    accelerator: Any
    metrics: Any
    checkpoints: Any
    output_dir: Any
    start_step: int = 0
    samples_per_step: int = 1  # samples of one training step over all processes (for perf/samples_per_s)
    records_after_update: bool = False  # the step-numbering policy (module docstring)
    progress_name: str = "gen-rl"  # the progress bar's label
    started_at: float = 0.0  # time.perf_counter() when train() began (for summaries)

    # ----- phases (implemented by each trainer) ------------------------------------------------------------------
    def sample(self, step: int) -> Any:
        """This process's share of step ``step``'s rollouts."""
        raise NotImplementedError

    def score(self, batch: Any) -> dict[str, float]:
        """Score the batch in place; returns statistics."""
        raise NotImplementedError

    def advantages(self, batch: Any) -> dict[str, float]:
        """Gather rewards across processes, set the batch's advantages; returns reward / advantage statistics."""
        raise NotImplementedError

    def update(self, batch: Any, step: int) -> dict[str, float]:
        """Optimizer updates on the batch; returns loss / policy / optimizer statistics."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out evaluation after ``step`` updates (main process returns the record, the others ``{}``)."""
        raise NotImplementedError

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """What ``train()`` returns."""
        raise NotImplementedError

    # ----- hooks with a default --------------------------------------------------------------------------------
    def collect(self, step: int) -> Collected:
        """The step's batch: ``sample -> score -> advantages``, each once, with their statistics and timings."""
        started = time.perf_counter()
        batch = self.sample(step)
        sampled = time.perf_counter()
        stats = dict(self.score(batch))
        scored = time.perf_counter()
        stats.update(self.advantages(batch))
        advantaged = time.perf_counter()
        timings = {
            "time/sample_s": sampled - started,
            "time/reward_s": scored - sampled,
            "time/advantage_s": advantaged - scored,
        }
        return Collected(batch, stats, timings)

    def eval_due(self, step: int) -> bool:
        """Whether the weights after ``step`` updates are evaluated inside a step's record: every
        ``eval.every_steps``, and after the last step when records follow the update (else ``finish`` does)."""
        every = self.config.eval.every_steps
        if not every:
            return False
        last = self.records_after_update and step == self.config.train.num_steps
        return step % every == 0 or last

    def log(self, record: dict[str, Any], batch: Any = None) -> None:
        """Append the step's record to metrics.jsonl and the tracker (main process); redraw the reward curve when
        the record holds an evaluation. A trainer that also logs samples of ``batch`` (the VLM:
        completions.jsonl) extends it."""
        if not self.accelerator.is_main_process:
            return
        self.metrics.append(record)
        if self.config.log.tracker != "none":
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.accelerator.log(scalars, step=record["step"])
        if any(key.startswith("eval/") for key in record):
            plot_reward_curve(self.metrics.read(), self.output_dir / "reward_curve.png")

    def describe_run(self) -> list[tuple[str, str]]:
        """(what, value) lines of the start-up summary: model, algorithm, rewards, processes, batch sizes, output
        folder. Trainers fill it."""
        return []

    def finish(self, num_steps: int) -> None:
        """After the last step: a record ``step: num_steps`` with the final evaluation (unless the last step's
        record holds it), the checkpoint of the last step (its only save: ``run_step`` skips it), the reward
        curve."""
        if not self.records_after_update:
            final = {"step": num_steps, **self.evaluate(num_steps)}
            if self.accelerator.is_main_process and len(final) > 1:
                self.metrics.append(final)
        if self.start_step < num_steps or self.checkpoints.latest() is None:
            self.save(num_steps)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            plot_reward_curve(self.metrics.read(), self.output_dir / "reward_curve.png")

    # ----- the skeleton --------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run from ``start_step`` to ``train.num_steps``, then :meth:`finish`; returns :meth:`summary`.

        The main process prints the start-up summary (and the checkpoint a resumed run continues from) before the
        first step, and a few lines in words when the run ends."""
        self.started_at = time.perf_counter()
        num_steps = self.config.train.num_steps
        show = self.config.log.progress and self.accelerator.is_main_process
        accelerator = self.accelerator
        if accelerator.num_processes > 1:  # every process says it is there (a launch that ran one shows it)
            print(f"[gen-rl] process {accelerator.process_index} of {accelerator.num_processes} ready on "
                  f"{accelerator.device}", flush=True)  # fmt: skip
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            print(startup_text(self.describe_run(), self.start_step, num_steps, self.checkpoints.latest()))
        steps = range(self.start_step, num_steps)
        bar = tqdm(
            steps, desc=self.progress_name, total=num_steps, initial=self.start_step, disable=not show,
            dynamic_ncols=True,
        )  # fmt: skip
        shown: dict[str, str] = {}
        try:
            for step in bar:
                record = self.run_step(step)
                shown.update(progress_fields(record))
                bar.set_postfix(shown, refresh=False)
            self.finish(num_steps)
            summary = self.summary()
        except (KeyboardInterrupt, RunError) as error:  # also during the final save or plot
            quiet = isinstance(error, CheckpointWriteError)  # its own one line names the intact checkpoint
            if self.accelerator.is_main_process and not quiet:
                latest = self.checkpoints.latest()
                where = f"{latest} is intact" if latest else "no checkpoint was written yet"
                print(f"\n[gen-rl] stopped; {where}. Continue with the same command plus --resume.")
            raise
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            print(closing_text(self.metrics.read(), self.start_step, num_steps, time.perf_counter() - self.started_at,
                               self.output_dir))  # fmt: skip
        return summary

    def run_step(self, step: int) -> dict[str, Any]:
        """One training step: (evaluate), collect, update, (evaluate), log, (save); returns the record."""
        after = self.records_after_update
        record: dict[str, Any] = {"step": step + 1 if after else step}
        if not after and self.eval_due(step):
            record.update(self.evaluate(step))
        started = time.perf_counter()
        collected = self.collect(step)
        record.update(collected.stats)
        updating = time.perf_counter()
        record.update(self.update(collected.batch, step))
        finished = time.perf_counter()
        record.update(collected.timings)
        record.update(
            {
                "time/update_s": finished - updating,
                "time/step_s": finished - started,
                "perf/samples_per_s": self.samples_per_step / (finished - started),
            }
        )
        if after and self.eval_due(step + 1):
            record.update(self.evaluate(step + 1))
        self.log(record, collected.batch)
        every, last = self.config.checkpoint.every_steps, self.config.train.num_steps
        if every and (step + 1) % every == 0 and step + 1 < last:  # finish saves (or exports) the last
            self.save(step + 1)
        return record


# the progress bar shows these metrics under their metrics.jsonl names (the last value seen of each)
PROGRESS_KEYS = ("reward/mean", "eval/reward/mean", "loss/total", "policy/approx_kl")


def progress_fields(record: dict[str, Any]) -> dict[str, str]:
    """The record's :data:`PROGRESS_KEYS` values, formatted for the bar (keys exactly as in metrics.jsonl)."""
    return {key: f"{record[key]:.4g}" for key in PROGRESS_KEYS if isinstance(record.get(key), (int, float))}


def startup_text(lines: list[tuple[str, str]], start_step: int, num_steps: int, latest: Any) -> str:
    """The start-up summary: one aligned line per (what, value), then where the run starts."""
    width = max((len(what) for what, _ in lines), default=0)
    text = ["[gen-rl] run"] + [f"  {what:<{width}}  {value}" for what, value in lines]
    if start_step > 0:
        text.append(f"  resumed from {latest} (step {start_step} of {num_steps})")
    else:
        text.append(f"  starting at step 0 of {num_steps}")
    return "\n".join(text)


def closing_text(
    records: list[dict[str, Any]], start_step: int, num_steps: int, seconds: float, output_dir: Any
) -> str:
    """A few lines in words: steps and time, the reward (held-out when evaluated) first to last, where things are."""
    minutes, rest = divmod(int(round(seconds)), 60)
    text = [f"[gen-rl] finished steps {start_step}..{num_steps} in {minutes} min {rest} s"]
    for key, what in (("eval/reward/mean", "held-out reward"), ("reward/mean", "training reward")):
        values = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if len(values) >= 2:
            (first_step, first), (last_step, last) = values[0], values[-1]
            text.append(f"  {what}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
    golds = sorted({key for r in records for key in r if key.startswith("eval/gold/")})
    for key in golds:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if len(values) >= 2:
            text.append(
                f"  gold {key[len('eval/gold/') :]} (not optimised): {values[0]:.4f} -> {values[-1]:.4f}"
            )
    text.append(f"  outputs: {output_dir} (metrics.jsonl, reward_curve.png, checkpoints; --resume continues)")
    return "\n".join(text)
