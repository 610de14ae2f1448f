"""The phase skeleton of a training run, shared by the trainers: one loop a reader follows top to bottom.

Each training step runs the phases ``sample -> score -> advantages -> update -> log`` and, every N steps,
``evaluate`` (before the step, so step ``t``'s eval describes the weights after ``t`` updates) and ``save``.
``train()`` adds the progress bar, the final evaluation and save, the reward curve, and the one line printed when
a run stops early (its last checkpoint is intact: continue with ``--resume``). A trainer subclasses
:class:`PhaseLoop` and implements the phases; the loop never looks inside a batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

from tqdm.auto import tqdm

from gen_rl.checkpoint import RunError
from gen_rl.metrics import plot_reward_curve


class PhaseLoop:
    """Subclasses set ``config``, ``accelerator``, ``metrics``, ``checkpoints``, ``output_dir``, ``start_step`` and
    implement ``sample``, ``score``, ``advantages``, ``update``, ``evaluate``, ``save`` and ``summary``."""

    config: Any
    accelerator: Any
    metrics: Any
    checkpoints: Any
    output_dir: Any
    start_step: int = 0
    samples_per_step: int = 1  # samples of one training step over all processes (for perf/samples_per_s)

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
        """Held-out evaluation (main process returns the record, the others ``{}``)."""
        raise NotImplementedError

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """What ``train()`` returns."""
        raise NotImplementedError

    # ----- the skeleton --------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run from ``start_step`` to ``train.num_steps``; returns :meth:`summary`."""
        num_steps = self.config.train.num_steps
        show = self.config.log.progress and self.accelerator.is_main_process
        bar = tqdm(range(self.start_step, num_steps), desc="gen-rl", disable=not show, dynamic_ncols=True)
        try:
            for step in bar:
                record = self.run_step(step)
                bar.set_postfix(reward=f"{record.get('reward/mean', float('nan')):.4f}")
            final = {"step": num_steps, **self.evaluate(num_steps)}
            if self.accelerator.is_main_process and len(final) > 1:
                self.metrics.append(final)
            if self.start_step < num_steps or self.checkpoints.latest() is None:
                self.save(num_steps)  # the only save of the last step (run_step skips it)
            self.accelerator.wait_for_everyone()
            summary = self.summary()
            if self.accelerator.is_main_process:
                plot_reward_curve(self.metrics.read(), self.output_dir / "reward_curve.png")
        except (KeyboardInterrupt, RunError):  # also during the final save or plot
            if self.accelerator.is_main_process:
                latest = self.checkpoints.latest()
                where = f"{latest} is intact" if latest else "no checkpoint was written yet"
                print(f"\n[gen-rl] stopped; {where}. Continue with the same command plus --resume.")
            raise
        self.accelerator.end_training()
        return summary

    def run_step(self, step: int) -> dict[str, Any]:
        """One training step: (evaluate), sample, score, advantages, update, log, (save)."""
        config = self.config
        record: dict[str, Any] = {"step": step}
        every_eval = config.eval.every_steps
        if every_eval and step % every_eval == 0:
            record.update(self.evaluate(step))
        started = time.perf_counter()
        batch = self.sample(step)
        sampled = time.perf_counter()
        record.update(self.score(batch))
        scored = time.perf_counter()
        record.update(self.advantages(batch))
        advantaged = time.perf_counter()
        record.update(self.update(batch, step))
        finished = time.perf_counter()
        record.update(
            {
                "time/sample_s": sampled - started,
                "time/reward_s": scored - sampled,
                "time/advantage_s": advantaged - scored,
                "time/update_s": finished - advantaged,
                "time/step_s": finished - started,
                "perf/samples_per_s": self.samples_per_step / (finished - started),
            }
        )
        self.log(record)
        every = config.checkpoint.every_steps
        if every and (step + 1) % every == 0 and step + 1 < config.train.num_steps:  # train() saves the last
            self.save(step + 1)
        return record

    def log(self, record: dict[str, Any]) -> None:
        """Append to metrics.jsonl and the tracker (main process)."""
        if not self.accelerator.is_main_process:
            return
        self.metrics.append(record)
        if self.config.log.tracker != "none":
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.accelerator.log(scalars, step=record["step"])
