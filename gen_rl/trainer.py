"""The generation GRPO loop (Flow-GRPO / DanceGRPO family), in named phases.

Each training step: ``sample`` groups on every process -> ``score`` them -> ``gather`` rewards across
processes -> group ``advantages`` -> ``update`` the policy over the selected denoising steps (clipped
surrogate, Flow-GRPO eq. 8 / DanceGRPO eq. 9, optional KL to the LoRA-disabled reference) -> ``log``;
``evaluate`` and ``save`` every N steps. Step ``t``'s metrics describe the weights after ``t`` updates.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from gen_rl import run_state
from gen_rl.checkpoint import CheckpointManager, RunError
from gen_rl.core.advantages import AdvantageOutput, PerPromptStatTracker
from gen_rl.core.config import to_dict
from gen_rl.core.ema import ParameterEMA
from gen_rl.core.seeding import derive_seed
from gen_rl.core.step_selection import sde_window, train_step_indices
from gen_rl.data import PromptSet, load_prompts, prompt_indices_for_step
from gen_rl.metrics import MetricsLog, plot_reward_curve
from gen_rl.monitoring import HackingMonitor
from gen_rl.objective import compute_advantages, log_probs_in_convention, step_loss, transition_kl
from gen_rl.policy import load_sampler, make_trainable
from gen_rl.run_folder import GENERATION_TUNABLES
from gen_rl.trainer_config import GenerationConfig
from pipelines import Rollout, RolloutOptions
from pipelines.base import worst_log_prob_mismatch
from rewards import build_reward

ALL_NAN_STEP_LIMIT = 3  # consecutive steps with no finite reward at all before the run stops


class RewardError(RunError):
    """A reward returned NaN / inf under ``reward.nan_policy: abort``, or none was finite for several steps
    (a RunError: ``gen_rl/train.py`` prints its one-line message and exits non-zero)."""


class RatioCheckError(RuntimeError):
    """Before the first update, recomputed log-probs differ from the rollout's by more than the tolerance."""


@dataclass
class StepBatch:
    """One process's share of a training step: the rollout plus its global group ids and rewards."""

    rollout: Rollout
    group_ids: torch.Tensor  # [n] global position of each sample's prompt within the step
    rewards: dict[str, torch.Tensor]  # name -> [n] raw scores (NaN: no score)


class GenerationTrainer:
    """Online RL of a rectified-flow generator against rewards; ``train()`` runs the whole schedule."""

    def __init__(self, config: GenerationConfig, *, resume: bool = False, overwrite: bool = False) -> None:
        self.config = config
        log = config.log
        self.output_dir = Path(log.output_dir)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.train.mixed_precision,
            log_with=None if log.tracker == "none" else log.tracker,
            project_dir=str(self.output_dir),
        )
        config.validate(num_processes=self.accelerator.num_processes)
        # claim the run folder, pick and check the checkpoint to resume: before any model loads
        self.run = run_state.open_run(
            self.accelerator,
            config,
            resume=resume,
            overwrite=overwrite,
            keep_last=config.checkpoint.keep_last,
            tunables=GENERATION_TUNABLES,
        )
        data = config.data
        self.train_set = load_prompts(data.train_prompts, data.bad_records, "data.train_prompts")
        self.eval_set: PromptSet | None = (
            load_prompts(data.eval_prompts, data.bad_records, "data.eval_prompts")
            if data.eval_prompts
            else None
        )
        self.reward_models = {
            _reward_key(i, term.name): build_reward(term.name, **term.kwargs)
            for i, term in enumerate(config.reward.terms)
        }
        self.reward_weights = {
            key: term.weight for key, term in zip(self.reward_models, config.reward.terms, strict=True)
        }
        self.gold_models = {
            _reward_key(i, term.name): build_reward(term.name, **term.kwargs)
            for i, term in enumerate(config.eval.gold)
        }
        self.monitor = HackingMonitor(log.diversity_model, self.accelerator.device) if log.monitors else None
        self.sampler = load_sampler(config.model, self.accelerator.device)
        self.parameters = make_trainable(self.sampler, config.model)
        self.optimizer = _build_optimizer(self.parameters, config.train)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        model, self.optimizer = self.accelerator.prepare(self.sampler.transformer, self.optimizer)
        self.sampler.forward_module = model
        self.model = model
        self.ema = ParameterEMA(self.parameters, config.train.ema_decay) if config.train.ema else None
        self.stat_tracker = (
            PerPromptStatTracker(config.reward.tracker_buffer, config.reward.tracker_min_count)
            if config.reward.per_prompt_tracker
            else None
        )
        self.checkpoints = CheckpointManager(self.output_dir, config.checkpoint.keep_last)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        run_state.install_hooks(self.accelerator)
        self.start_step = 0
        self.all_nan_steps = 0  # consecutive steps in which every sample's reward was NaN / inf
        self.log_probs_checked = not config.train.check_log_probs
        self.ratio_check_record: dict[str, float] = {}
        if resume:
            self._resume()
        elif self.accelerator.is_main_process and self.metrics.path.exists():
            self.metrics.path.unlink()  # a fresh run starts a fresh metrics file
        if self.accelerator.is_main_process and log.tracker != "none":
            self.accelerator.init_trackers(log.run_name, config=_flat_hparams(to_dict(config)))

    # ----- schedule ----------------------------------------------------------------------------------------
    @property
    def samples_per_process(self) -> int:
        sample = self.config.sample
        return sample.groups_per_step // self.accelerator.num_processes * sample.group_size

    @property
    def updates_per_step(self) -> int:
        return (
            self.config.train.inner_epochs * self.samples_per_process // self.config.train.samples_per_update
        )

    def _lr_factor(self, update: int) -> float:
        train = self.config.train
        if update < train.warmup_updates:
            return (update + 1) / (train.warmup_updates + 1)
        total = max(1, train.num_steps * self.updates_per_step - train.warmup_updates)
        progress = min(1.0, (update - train.warmup_updates) / total)
        if train.lr_schedule == "linear":
            return 1.0 - progress
        if train.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    # ----- the loop ----------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run from ``start_step`` to ``train.num_steps``; returns a summary (first / last eval reward)."""
        config = self.config
        steps = range(self.start_step, config.train.num_steps)
        show = config.log.progress and self.accelerator.is_main_process
        bar = tqdm(steps, desc="gen-rl", disable=not show, dynamic_ncols=True)
        try:
            for step in bar:
                record = self.run_step(step)
                bar.set_postfix(reward=f"{record['reward_mean']:.4f}", kl=f"{record.get('approx_kl', 0):.2e}")
            final = {"step": config.train.num_steps, **self.evaluate(config.train.num_steps)}
            if self.accelerator.is_main_process and len(final) > 1:
                self.metrics.append(final)
            if self.start_step < config.train.num_steps or self.checkpoints.latest() is None:
                self.save(config.train.num_steps)  # the only save of the last step (run_step skips it)
            self.accelerator.wait_for_everyone()
            summary = self._summary()
            if self.accelerator.is_main_process:
                plot_reward_curve(self.metrics.read(), self.output_dir / "reward_curve.png")
        except (KeyboardInterrupt, RewardError):  # also during the final save or plot
            if self.accelerator.is_main_process:
                latest = self.checkpoints.latest()
                where = f"{latest} is intact" if latest else "no checkpoint was written yet"
                print(f"\n[gen-rl] stopped; {where}. Continue with the same command plus --resume.")
            raise
        self.accelerator.end_training()
        return summary

    def run_step(self, step: int) -> dict[str, Any]:
        """One training step: sample, score, gather, advantages, update, log, maybe evaluate / save."""
        config = self.config
        record: dict[str, Any] = {"step": step}
        if self.eval_set is not None and config.eval.every_steps and step % config.eval.every_steps == 0:
            record.update(self.evaluate(step))
        started = time.perf_counter()
        batch, sample_seconds = self.sample(step)
        scored_at = time.perf_counter()
        batch.rewards = self.score(batch.rollout)
        reward_seconds = time.perf_counter() - scored_at
        advantages, valid, reward_stats = self.advantages(batch)
        record.update(self.monitors(batch))
        update_started = time.perf_counter()
        record.update(self.update(batch.rollout, advantages, valid, step))
        update_seconds = time.perf_counter() - update_started
        total = time.perf_counter() - started
        record.update(reward_stats)
        record.update(self.ratio_check_record)
        self.ratio_check_record = {}
        record.update(
            sample_seconds=sample_seconds,
            reward_seconds=reward_seconds,
            update_seconds=update_seconds,
            step_seconds=total,
            samples_per_second=config.sample.groups_per_step * config.sample.group_size / total,
            lr=self.optimizer.param_groups[0]["lr"],
            peak_memory_mb=_peak_memory_mb(self.accelerator.device),
        )
        self.log(record)
        every = config.checkpoint.every_steps
        if every and (step + 1) % every == 0 and step + 1 < config.train.num_steps:  # train() saves the last
            self.save(step + 1)
        return record

    # ----- phases ------------------------------------------------------------------------------------------
    def rollout_options(
        self,
        step: int,
        *,
        seed: int | None = None,
        noise_level: float | None = None,
        window: tuple[int, int] | None = None,
    ) -> RolloutOptions:
        """The sampling options of the config for one call (eval sets its own seed and never shares noise)."""
        sample = self.config.sample
        return RolloutOptions(
            num_steps=sample.num_steps,
            height=sample.height,
            width=sample.width,
            cfg_scale=sample.cfg_scale,
            negative_prompt=sample.negative_prompt,
            guidance=sample.guidance,
            shift=sample.shift,
            sde_type=sample.sde_type,
            noise_level=sample.noise_level if noise_level is None else noise_level,
            sde_window=window,
            share_initial_noise=sample.share_initial_noise and seed is None,
            seed=self.config.train.seed if seed is None else seed,
            max_sequence_length=sample.max_sequence_length,
        )

    @torch.no_grad()
    def sample(self, step: int) -> tuple[StepBatch, float]:
        """This process's groups of step ``step``: whole groups, prompt keys = position within the step."""
        config, accelerator = self.config, self.accelerator
        train = config.train
        started = time.perf_counter()
        indices = prompt_indices_for_step(
            len(self.train_set), step, config.sample.groups_per_step, train.seed
        )
        per_process = config.sample.groups_per_step // accelerator.num_processes
        positions = list(
            range(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
        )
        window = sde_window(
            train.step_selection,
            step,
            config.sample.num_steps,
            window_size=train.window_size,
            window_range=train.window_range,
            stride=train.window_stride,
            every=train.window_every,
            seed=train.seed,
        )
        options = self.rollout_options(step, window=window)
        rollouts = []
        chunk = config.sample.groups_per_rollout
        for start in range(0, per_process, chunk):
            chunk_positions = positions[start : start + chunk]
            rollouts.append(
                self.sampler.rollout(
                    [self.train_set.prompts[indices[p]] for p in chunk_positions],
                    options,
                    group_size=config.sample.group_size,
                    epoch=step,
                    prompt_keys=[f"step-position-{p}" for p in chunk_positions],
                    metadata=[self.train_set.metadata[indices[p]] for p in chunk_positions],
                )
            )
        rollout = Rollout.cat(rollouts)
        group_ids = torch.tensor(positions).repeat_interleave(config.sample.group_size)
        seconds = time.perf_counter() - started
        if not self.log_probs_checked:
            self.ratio_check_record = self.check_ratio(rollout)
            self.log_probs_checked = True
        return StepBatch(rollout=rollout, group_ids=group_ids, rewards={}), seconds

    @torch.no_grad()
    def score(self, rollout: Rollout, models: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Raw scores ``[n]`` of every reward model (default: the optimised ones) for this process's samples."""
        metadata = rollout.metadata or [{} for _ in range(len(rollout))]
        models = self.reward_models if models is None else models
        return {
            key: model(rollout.pixels, rollout.prompts, metadata).scores.float().cpu()
            for key, model in models.items()
        }

    def monitors(self, batch: StepBatch) -> dict[str, float]:
        """Reward-hacking monitors over the whole step: image statistics and in-group diversity."""
        if self.monitor is None:
            return {}
        statistics, diversity = self.monitor.local(batch.rollout.pixels, batch.group_ids)
        device = self.accelerator.device
        statistics = self.accelerator.gather(statistics.to(device)).cpu()
        diversity = self.accelerator.gather(diversity.to(device)).cpu()
        return HackingMonitor.record(statistics, diversity)

    def advantages(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Gather every process's rewards, compute group advantages over the whole step, keep this slice.

        Returns ``advantages`` [n], ``valid`` [n] (all rewards finite) and reward / advantage statistics.
        """
        config, accelerator = self.config, self.accelerator
        names = list(self.reward_models)
        local = torch.stack([batch.rewards[name] for name in names], dim=1).to(accelerator.device)
        rewards = accelerator.gather(local).cpu()
        group_ids = accelerator.gather(batch.group_ids.to(accelerator.device)).cpu()
        invalid = ~torch.isfinite(rewards)
        if invalid.any() and config.reward.nan_policy == "abort":
            sample, column = (int(i) for i in torch.nonzero(invalid)[0])
            raise RewardError(
                f"reward {names[column]!r} returned {rewards[sample, column].item()} for sample {sample} of the "
                f"step ({int(invalid.any(dim=1).sum())} samples affected); set reward.nan_policy: drop to drop "
                "such samples, or fix the reward. The last checkpoint is intact."
            )
        if invalid.any():
            _report_dropped(names, rewards, invalid, accelerator)
        self.all_nan_steps = self.all_nan_steps + 1 if bool(invalid.any(dim=1).all()) else 0
        if self.all_nan_steps >= ALL_NAN_STEP_LIMIT:
            raise RewardError(
                f"every sample's reward was NaN / inf for {self.all_nan_steps} consecutive steps, so nothing "
                "trains; fix the reward (score a few images with it by hand). The last checkpoint is intact."
            )
        rewards = torch.where(invalid, torch.full_like(rewards, float("nan")), rewards)
        by_name = {name: rewards[:, column] for column, name in enumerate(names)}
        output = self._advantages(by_name, group_ids, batch)
        start = accelerator.process_index * len(batch.rollout)
        local_slice = slice(start, start + len(batch.rollout))
        valid = ~invalid.any(dim=1)
        stats = _reward_stats(by_name, self.reward_weights, output, valid, config.sample.groups_per_step)
        return (
            output.advantages[local_slice].to(accelerator.device),
            valid[local_slice].to(accelerator.device),
            stats,
        )

    def _advantages(self, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor, batch: StepBatch):
        prompts = gather_object(batch.rollout.prompts) if self.stat_tracker is not None else []
        return compute_advantages(
            self.config.reward,
            self.config.train,
            rewards,
            self.reward_weights,
            group_ids,
            prompts,
            self.stat_tracker,
        )

    @torch.no_grad()
    def check_ratio(self, rollout: Rollout) -> dict[str, float]:
        """The ratio == 1 check before the first update, recomputed exactly as training recomputes.

        Log-probs are recomputed at the training microbatch size, through the prepared model and autocast, in
        the loss's log-prob convention. Their largest difference from the stored ones (the *floor*) is
        returned as ``log_prob_floor``; above ``train.ratio_check_fraction x min(clip_low, clip_high)`` the run
        stops with :class:`RatioCheckError`, since the first update would then clip on numerical noise.
        """
        train = self.config.train
        with self.accelerator.autocast():
            recomputed, stds = self.sampler.recompute_log_probs(rollout, train.microbatch_size)
        convention = train.log_prob_convention
        worst_step, worst = worst_log_prob_mismatch(
            log_probs_in_convention(recomputed, stds, convention),
            log_probs_in_convention(rollout.log_probs.float().to(stds.device), stds, convention),
            rollout.stochastic,
        )
        # every process decides on the largest floor of any process, so all stop together (no hung collective)
        floor = float(self.accelerator.gather(worst.reshape(1).to(self.accelerator.device)).max())
        clip = min(train.clip_range, train.clip_range_high or train.clip_range)
        tolerance = train.ratio_check_fraction * clip
        if not floor <= tolerance:
            raise RatioCheckError(
                f"ratio check failed before the first update: recomputed log-probs differ from the rollout's by "
                f"{floor:.3g} at denoising step {worst_step} (model dtype {self.sampler.dtype}, mixed precision "
                f"{train.mixed_precision}, microbatch {train.microbatch_size}), above the tolerance {tolerance:.3g} = "
                f"train.ratio_check_fraction {train.ratio_check_fraction} x clip range {clip:g}, so the first update "
                "would clip on numerical noise. Fix: run the denoiser in float32 (model.dtype: float32, "
                "train.mixed_precision: no), raise train.clip_range, or use a deterministic attention backend"
            )
        return {"log_prob_floor": floor, "log_prob_tolerance": tolerance}

    def trained_steps(self, rollout: Rollout, step: int) -> torch.Tensor:
        """``[B, K]`` denoising steps trained at training step ``step`` (drawn afresh from ``(seed, step)``)."""
        train = self.config.train
        return train_step_indices(
            rollout.stochastic,
            train.step_selection,
            fraction=train.step_fraction,
            seed=train.seed,
            step=step,
            trainable=train.trainable_steps,
        ).to(rollout.log_probs.device)

    def reference_kl(self, part: Rollout, column: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
        """KL ``[b]`` of the policy's step (``means`` [b, ...] with grad, ``stds`` [b]) to the frozen reference's.

        The reference is the same model with its LoRA disabled, run without the distributed wrapper and
        without gradients; the KL keeps the gradient of ``means``.
        """
        with torch.no_grad(), _adapters_disabled(self.sampler.transformer), _plain_forward(self.sampler):
            reference = self.sampler.log_prob(part, column)
        rows = torch.arange(len(part), device=column.device)
        return transition_kl(
            means,
            reference.means[:, 0],
            stds,
            part.sigmas[rows, column[:, 0]],
            part.sigmas[rows, column[:, 0] + 1],
            sde_type=part.sde_type,
            estimator=self.config.train.kl_estimator,
        )

    def update(
        self, rollout: Rollout, advantages: torch.Tensor, valid: torch.Tensor, step: int
    ) -> dict[str, float]:
        """Policy-gradient updates over the selected steps; the loss is a mean over samples and trained steps.

        Gradients accumulate over ``samples_per_update / microbatch_size`` microbatches and the K trained steps
        of each, each backward scaled by ``1 / (microbatches * K)``: the update's size does not depend on how
        many steps are trained. Samples with a dropped reward (``valid`` False) carry zero loss.
        """
        config, accelerator = self.config, self.accelerator
        train = config.train
        step_indices = self.trained_steps(rollout, step)
        old_log_probs = rollout.log_probs.gather(1, step_indices)
        num_trained = step_indices.shape[1]
        totals: dict[str, torch.Tensor] = {}
        calls, grad_norms = 0, []
        for inner in range(train.inner_epochs):
            generator = torch.Generator().manual_seed(
                derive_seed(train.seed, "minibatch", step, inner, accelerator.process_index)
            )
            order = torch.randperm(len(rollout), generator=generator)
            for update_indices in order.split(train.samples_per_update):
                microbatches = update_indices.split(train.microbatch_size)
                scale = 1.0 / (len(microbatches) * num_trained)
                for position, micro in enumerate(microbatches):
                    part = rollout.select(micro)  # indexed once per microbatch, not once per trained step
                    part_steps, part_old = step_indices[micro], old_log_probs[micro]
                    part_advantages, part_weight = advantages[micro], valid[micro].float()
                    for k in range(num_trained):
                        last = position == len(microbatches) - 1 and k == num_trained - 1
                        stats = self._backward(
                            part,
                            part_steps[:, k : k + 1],
                            part_old[:, k : k + 1],
                            part_advantages,
                            part_weight,
                            scale,
                            sync=last,
                        )
                        _accumulate(totals, stats)
                        calls += 1
                grad_norms.append(self._optimizer_step())
        record = {
            key: float(value) if key == "ratio_max_abs_dev" else float(value) / calls
            for key, value in totals.items()
        }
        record["grad_norm"] = sum(grad_norms) / len(grad_norms)
        record["trained_steps"] = num_trained
        record["updates"] = len(grad_norms)
        return record

    def _backward(self, part, column, old_log_probs, advantages, weight, scale, *, sync):
        """Loss and backward of one microbatch at one trained step (``column`` [b, 1] step indices)."""
        train = self.config.train
        context = nullcontext() if sync else self.accelerator.no_sync(self.model)
        with context, self.accelerator.autocast():
            out = self.sampler.log_prob(part, column)
            stds = out.stds.detach()
            kl = self.reference_kl(part, column, out.means[:, 0], stds[:, 0]) if train.kl_coef > 0 else None
            loss, stats = step_loss(
                train,
                log_probs_in_convention(out.log_probs, stds, train.log_prob_convention),
                log_probs_in_convention(old_log_probs, stds, train.log_prob_convention),
                advantages,
                weight,
                kl,
            )
            self.accelerator.backward(loss * scale)
        return stats

    def _optimizer_step(self) -> float:
        train = self.config.train
        grad_norm = 0.0
        if train.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.parameters, train.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return grad_norm

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Reward of the held-out prompts at fixed seeds (the same noise every time); saves an image grid."""
        if self.eval_set is None:
            return {}
        config, accelerator = self.config, self.accelerator
        count = min(len(self.eval_set), config.eval.max_prompts)
        options = self.rollout_options(step, seed=config.eval.seed, noise_level=config.eval.noise_level)
        mine = list(range(accelerator.process_index, count, accelerator.num_processes))
        ema = self.ema.swapped_in() if self.ema is not None else nullcontext()
        with ema, _plain_forward(self.sampler), accelerator.autocast():
            rollout = (
                self.sampler.rollout(
                    [self.eval_set.prompts[i] for i in mine],
                    options,
                    group_size=config.eval.samples_per_prompt,
                    epoch=0,
                    prompt_keys=[f"eval-{i}" for i in mine],
                    metadata=[self.eval_set.metadata[i] for i in mine],
                )
                if mine
                else None
            )
        models = {**self.reward_models, **{f"gold_{key}": model for key, model in self.gold_models.items()}}
        scores = (
            self.score(rollout, models) if rollout is not None else {name: torch.empty(0) for name in models}
        )
        gathered = gather_object(
            [
                (
                    mine,
                    {k: v.tolist() for k, v in scores.items()},
                    rollout.pixels.cpu() if rollout is not None else None,
                )
            ]
        )
        if not accelerator.is_main_process:
            return {}
        return self._eval_record(step, gathered)

    def _eval_record(self, step: int, gathered: list) -> dict[str, Any]:
        from gen_rl.core.images import save_image_grid

        record: dict[str, Any] = {}
        combined = torch.zeros(0)
        per_name: dict[str, list[float]] = {}
        pixels, order = [], []
        for indices, scores, images in gathered:
            for name, values in scores.items():
                per_name.setdefault(name, []).extend(values)
            if images is not None:
                pixels.append(images)
                order.extend(indices)
        for name, values in per_name.items():
            tensor = torch.tensor(values, dtype=torch.float32)
            if name.startswith("gold_"):
                record[f"eval_{name}"] = float(tensor.nanmean())
                continue
            record[f"eval_reward_{name}"] = float(tensor.nanmean())
            combined = tensor * self.reward_weights[name] + (combined if combined.numel() else 0.0)
        record["eval_reward_mean"] = float(combined.nanmean())
        images = torch.cat(pixels)
        rank = sorted(range(len(order)), key=order.__getitem__)
        per_prompt = self.config.eval.samples_per_prompt
        images = torch.cat([images[i * per_prompt : (i + 1) * per_prompt] for i in rank])
        if self.monitor is not None:
            group_ids = torch.arange(len(images)) // per_prompt
            statistics, diversity = self.monitor.local(images.to(self.accelerator.device), group_ids)
            record.update(HackingMonitor.record(statistics.cpu(), diversity.cpu(), prefix="eval_monitor_"))
        save_image_grid(images, self.output_dir / "eval" / f"step-{step:06d}.png", columns=per_prompt)
        return record

    def log(self, record: dict[str, Any]) -> None:
        """Append to metrics.jsonl and the tracker (main process)."""
        if not self.accelerator.is_main_process:
            return
        self.metrics.append(record)
        if self.config.log.tracker != "none":
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.accelerator.log(scalars, step=record["step"])

    # ----- checkpoints -------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps: accelerate state + trainer state + LoRA, committed atomically."""
        run_state.save(self, step)

    def _resume(self) -> None:
        self.start_step = run_state.load(self)

    def _summary(self) -> dict[str, Any]:
        records = self.metrics.read() if self.accelerator.is_main_process else []
        evals = [r["eval_reward_mean"] for r in records if r.get("eval_reward_mean") is not None]
        train = [r["reward_mean"] for r in records if r.get("reward_mean") is not None]
        return {
            "first_eval_reward": evals[0] if evals else None,
            "last_eval_reward": evals[-1] if evals else None,
            "first_train_reward": train[0] if train else None,
            "last_train_reward": train[-1] if train else None,
            "output_dir": str(self.output_dir),
        }


def _reward_key(index: int, name: str) -> str:
    base = name.rsplit(":", 1)[-1]
    return base if index == 0 else f"{base}_{index}"


def _report_dropped(names: list[str], rewards: torch.Tensor, invalid: torch.Tensor, accelerator) -> None:
    """One line per reward naming the samples (indices within the step) whose score was NaN / inf."""
    for column, name in enumerate(names):
        samples = torch.nonzero(invalid[:, column]).flatten().tolist()
        if samples:
            shown = ", ".join(str(i) for i in samples[:8]) + (" ..." if len(samples) > 8 else "")
            values = sorted({str(rewards[i, column].item()) for i in samples})
            accelerator.print(
                f"gen-rl: reward {name!r} returned {'/'.join(values)} for sample(s) {shown} of this step; "
                "dropped (reward.nan_policy: drop), counted in dropped_samples"
            )


def _reward_stats(rewards, weights, output: AdvantageOutput, valid, num_groups: int) -> dict[str, float]:
    stats: dict[str, float] = {}
    combined = sum(weights[name] * value for name, value in rewards.items())
    for name, value in rewards.items():
        stats[f"reward_{name}_mean"] = float(value.nanmean())
        stats[f"reward_{name}_std"] = (
            float(value[torch.isfinite(value)].std()) if int(valid.sum()) > 1 else 0.0
        )
    finite = combined[torch.isfinite(combined)]
    stats["reward_mean"] = float(finite.mean()) if finite.numel() else float("nan")
    stats["reward_std"] = float(finite.std()) if finite.numel() > 1 else 0.0
    stats["dropped_samples"] = int((~valid).sum())
    for name, value in rewards.items():
        stats[f"reward_{name}_nan"] = int((~torch.isfinite(value)).sum())
    advantages = output.advantages
    stats["advantage_mean"] = float(advantages.mean())
    stats["advantage_std"] = float(advantages.std())
    stats["advantage_abs_mean"] = float(advantages.abs().mean())
    stats["zero_std_group_fraction"] = output.num_zero_std_groups / max(1, num_groups)
    return stats


def _accumulate(totals: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Sum statistics over calls (the max for ``ratio_max_abs_dev``), on device: no host sync per backward."""
    for key, value in stats.items():
        if key not in totals:
            totals[key] = value.detach().float()
        elif key == "ratio_max_abs_dev":
            totals[key] = torch.maximum(totals[key], value.detach().float())
        else:
            totals[key] = totals[key] + value.detach().float()


def _build_optimizer(parameters: list[torch.nn.Parameter], train) -> torch.optim.Optimizer:
    """AdamW (the default) or plain SGD without momentum (``train.optimizer``)."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(
        parameters, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, weight_decay=train.weight_decay
    )


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


class _adapters_disabled:  # noqa: N801 - used as a context manager
    """Run the LoRA-disabled transformer (the frozen reference) inside the block."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def __enter__(self) -> None:
        self.transformer.disable_adapters()

    def __exit__(self, *exc: object) -> None:
        self.transformer.enable_adapters()


class _plain_forward:  # noqa: N801 - used as a context manager
    """Bypass the DDP wrapper (evaluation runs on uneven shards, no gradient sync)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.saved = None

    def __enter__(self) -> None:
        self.saved, self.sampler.forward_module = self.sampler.forward_module, None

    def __exit__(self, *exc: object) -> None:
        self.sampler.forward_module = self.saved


def _flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
