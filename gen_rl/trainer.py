"""The generation trainer: any declared algorithm (``gen_rl/algorithms``) over any family sampler (``pipelines``).

The phases come from :class:`gen_rl.loop.PhaseLoop`: ``sample`` groups on every process (with the algorithm's
rollout overrides) -> ``score`` them -> ``advantages`` over rewards gathered from every process -> ``update``:
for each microbatch and each unit the algorithm selects, ``algorithm.loss`` and one backward, an optimizer step
per ``samples_per_update`` -> ``log``; ``evaluate`` and ``save`` every N steps. The loop never branches on an
algorithm's name. Nothing bypasses the prepared (wrapped) model: evaluation shards evenly and runs through it,
and the KL reference is the same wrapped model with its LoRA disabled.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from gen_rl import run_state
from gen_rl.algorithms import build_algorithm
from gen_rl.algorithms.base import Algorithm, LossBatch, finish_stats, reduce_stats
from gen_rl.checkpoint import CheckpointManager, RunError
from gen_rl.core.advantages import AdvantageOutput, PerPromptStatTracker
from gen_rl.core.config import ConfigError, to_dict
from gen_rl.core.ema import ParameterEMA, swapped_parameters
from gen_rl.core.seeding import derive_seed
from gen_rl.data import PromptSet, load_prompts, prompt_indices_for_step
from gen_rl.eval_media import save_eval_samples
from gen_rl.loop import PhaseLoop
from gen_rl.metrics import MetricsLog
from gen_rl.monitoring import HackingMonitor
from gen_rl.objective import compute_advantages, reward_key
from gen_rl.policy import load_sampler, make_trainable
from gen_rl.run_folder import GENERATION_TUNABLES
from gen_rl.sampling import eval_options, sampling_options
from gen_rl.trainer_config import GenerationConfig
from pipelines import Rollout, RolloutOptions
from pipelines.base import worst_log_prob_mismatch
from rewards import build_reward
from rewards.base import RewardUpdate, reward_learns, score_reward, update_reward

ALL_NAN_STEP_LIMIT = 3  # consecutive steps with no finite reward at all before the run stops


class RewardError(RunError):
    """A reward returned NaN / inf under ``reward.nan_policy: abort``, or none was finite for several steps
    (a RunError: ``gen_rl/train.py`` prints its one-line message and exits non-zero)."""


class RatioCheckError(RuntimeError):
    """Before the first update, recomputed log-probs differ from the rollout's by more than the tolerance."""


@dataclass
class StepBatch:
    """One process's share of a training step: the rollout, its global group ids, rewards and advantages."""

    rollout: Rollout
    group_ids: torch.Tensor  # [n] global position of each sample's prompt within the step
    rewards: dict[str, torch.Tensor]  # name -> [n] raw scores (NaN: no score)
    advantages: torch.Tensor | None = None  # [n] on the device
    valid: torch.Tensor | None = None  # [n] bool: every reward finite
    ratio_check: dict[str, float] = dataclasses.field(default_factory=dict)
    step: int = 0


class TrainerPolicy:
    """What an algorithm's loss sees of the trained model (the ``Policy`` protocol of ``gen_rl/algorithms``)."""

    def __init__(self, sampler: Any, parameters: list[torch.nn.Parameter], denoiser: torch.nn.Module) -> None:
        self.sampler = sampler
        self.parameters = parameters
        self.denoiser = (
            denoiser  # the unwrapped module holding the adapters; calls still go through the wrapper
        )
        self.reward_weights: dict[str, float] = {}  # reward key -> weight (the trainer fills it)

    @contextmanager
    def reference(self):
        """The frozen reference: the prepared model with its LoRA adapters disabled, without gradients."""
        denoiser = self.denoiser
        with torch.no_grad():
            _reshard(denoiser)  # peft toggles requires_grad on the registered (FSDP2: sharded) parameters
            denoiser.disable_adapters()
            try:
                yield
            finally:
                _reshard(denoiser)
                denoiser.enable_adapters()

    @contextmanager
    def swapped(self, tensors: list[torch.Tensor]):
        """The trained parameters temporarily hold ``tensors`` (an EMA, an "old" policy), restored after."""
        _reshard(self.denoiser)
        with swapped_parameters(self.parameters, tensors):
            try:
                yield
            finally:
                _reshard(self.denoiser)


def _reshard(module: torch.nn.Module) -> None:
    """FSDP2 keeps the root module unsharded after a forward without backward, so in-place writes to the sharded
    parameters reach the next forward only after a reshard (no-op without FSDP2)."""
    reshard = getattr(module, "reshard", None)
    if callable(reshard):
        reshard()


class GenerationTrainer(PhaseLoop):
    """Online RL of a generator against rewards with a declared algorithm; ``train()`` runs the whole schedule."""

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
        if self.accelerator.device.type == "cpu" and config.train.cpu_threads > 0:
            torch.set_num_threads(config.train.cpu_threads)
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
            reward_key(i, term.name): build_reward(term.name, **term.kwargs)
            for i, term in enumerate(config.reward.terms)
        }
        self.reward_weights = {
            key: term.weight for key, term in zip(self.reward_models, config.reward.terms, strict=True)
        }
        self.gold_models = {
            reward_key(i, term.name): build_reward(term.name, **term.kwargs)
            for i, term in enumerate(config.eval.gold)
        }
        learning_gold = [key for key, model in self.gold_models.items() if reward_learns(model)]
        if learning_gold:
            raise ConfigError(
                f"eval.gold reward(s) {learning_gold} learn, but gold rewards are only scored at eval and never "
                "updated; use a fixed reward as gold, or optimise the learning reward under reward.terms"
            )
        self.algorithm: Algorithm = build_algorithm(
            config.algorithm, seed=config.train.seed, num_steps=config.sample.num_steps
        )
        self.monitor = HackingMonitor(log.diversity_model, self.accelerator.device) if log.monitors else None
        self.sampler = load_sampler(config.model, self.accelerator.device)
        missing = self.algorithm.needs - self.sampler.records
        if missing:
            raise ConfigError(
                f"algorithm {config.algorithm.name!r} needs rollouts that record {sorted(missing)}, which the "
                f"{config.model.family} sampler does not record; choose another algorithm or family"
            )
        self.algorithm.check(self.sampler, self.reward_models, config.sample)
        self.parameters = make_trainable(self.sampler, config.model)
        self.optimizer = _build_optimizer(self.parameters, config.train)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(self.sampler.denoiser, self.optimizer)
        self.sampler.forward_module = self.model
        # FSDP2 (fully_shard) replaces every parameter by a sharded DTensor; accelerate re-points the optimizer,
        # nothing else: clipping, the EMA and the policy's swaps must use the prepared model's parameters
        self.parameters = [param for param in self.model.parameters() if param.requires_grad]
        self.policy = TrainerPolicy(self.sampler, self.parameters, self.accelerator.unwrap_model(self.model))
        self.policy.reward_weights = dict(self.reward_weights)  # reward backprop sums differentiable rewards
        self.algorithm.setup(self.policy)
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
        self.log_probs_checked = not (
            config.train.check_log_probs and self.algorithm.trust_region is not None
        )
        if resume:
            self.start_step = run_state.load(self)
        elif self.accelerator.is_main_process and self.metrics.path.exists():
            self.metrics.path.unlink()  # a fresh run starts a fresh metrics file
        if self.accelerator.is_main_process and log.tracker != "none":
            self.accelerator.init_trackers(log.run_name, config=_flat_hparams(to_dict(config)))

    # ----- state ---------------------------------------------------------------------------------------------
    def stateful(self) -> dict[str, Any]:
        """Every part with state beyond the model and optimizer, by name: saved and restored together."""
        parts: dict[str, Any] = {"lr_scheduler": self.lr_scheduler, "algorithm": self.algorithm}
        if self.ema is not None:
            parts["ema"] = self.ema
        if self.stat_tracker is not None:
            parts["stat_tracker"] = self.stat_tracker
        for key, model in self.reward_models.items():
            if reward_learns(model):
                parts[f"reward/{key}"] = model
        return parts

    # ----- schedule ----------------------------------------------------------------------------------------
    @property
    def samples_per_step(self) -> int:
        return self.config.sample.groups_per_step * self.config.sample.group_size

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

    # ----- phases ------------------------------------------------------------------------------------------
    def rollout_options(self, step: int, **overrides: Any) -> RolloutOptions:
        """The sampling options of the config, with ``overrides`` (the algorithm's, or eval's seed and noise)."""
        return sampling_options(self.config, **overrides)

    @torch.no_grad()
    def sample(self, step: int) -> StepBatch:
        """This process's groups of step ``step``: whole groups, prompt keys = position within the step."""
        config, accelerator = self.config, self.accelerator
        indices = prompt_indices_for_step(
            len(self.train_set), step, config.sample.groups_per_step, config.train.seed
        )
        per_process = config.sample.groups_per_step // accelerator.num_processes
        first = accelerator.process_index * per_process
        positions = list(range(first, first + per_process))
        options = self.rollout_options(step, **self.algorithm.sampling(step))
        rollouts = []
        chunk = config.sample.groups_per_rollout
        with self.algorithm.rollout_context(self.policy):
            for start in range(0, per_process, chunk):
                chunk_positions = positions[start : start + chunk]
                rollouts.append(
                    self.algorithm.rollout(
                        self.sampler,
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
        batch = StepBatch(rollout=rollout, group_ids=group_ids, rewards={}, step=step)
        if not self.log_probs_checked:
            batch.ratio_check = self.check_ratio(rollout)
            self.log_probs_checked = True
        return batch

    @torch.no_grad()
    def score(self, batch: StepBatch) -> dict[str, float]:
        """Raw scores of every optimised reward, the learning rewards' updates, the reward-hacking monitors."""
        rollout = batch.rollout
        batch.rewards = self.score_rollout(rollout, self.reward_models, batch.group_ids)
        record: dict[str, float] = {}
        for key, model in self.reward_models.items():
            update = RewardUpdate(
                pixels=rollout.pixels,
                prompts=rollout.prompts,
                metadata=rollout.metadata or [{} for _ in range(len(rollout))],
                group_ids=batch.group_ids,
                scores=batch.rewards[key],
                gather=self._gather,
                step=batch.step,
            )
            record.update(
                {f"reward/{key}/{name}": value for name, value in update_reward(model, update, key).items()}
            )
        return {**record, **self.monitors(batch), **batch.ratio_check}

    def score_rollout(
        self, rollout: Rollout, models: dict[str, Any], group_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Raw scores ``[n]`` of each reward model for one process's samples (rewards may read group ids)."""
        metadata = rollout.metadata or [{} for _ in range(len(rollout))]
        return {
            key: score_reward(model, rollout.pixels, rollout.prompts, metadata, group_ids)
            .scores.float()
            .cpu()
            for key, model in models.items()
        }

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` concatenated over every process in rank order (the identity on one process)."""
        return self.accelerator.gather(tensor.to(self.accelerator.device)).to(tensor.device)

    def monitors(self, batch: StepBatch) -> dict[str, float]:
        """Reward-hacking monitors over the whole step: image statistics and in-group diversity."""
        if self.monitor is None:
            return {}
        statistics, diversity = self.monitor.local(batch.rollout.pixels, batch.group_ids)
        device = self.accelerator.device
        statistics = self.accelerator.gather(statistics.to(device)).cpu()
        diversity = self.accelerator.gather(diversity.to(device)).cpu()
        return HackingMonitor.record(statistics, diversity)

    def advantages(self, batch: StepBatch) -> dict[str, float]:
        """Gather every process's rewards, compute group advantages over the whole step, keep this slice."""
        config, accelerator = self.config, self.accelerator
        names = list(self.reward_models)
        local = torch.stack([batch.rewards[name] for name in names], dim=1).to(accelerator.device)
        rewards = accelerator.gather(local).cpu()
        group_ids = accelerator.gather(batch.group_ids.to(accelerator.device)).cpu()
        invalid = ~torch.isfinite(rewards)
        self._check_rewards(names, rewards, invalid)
        rewards = torch.where(invalid, torch.full_like(rewards, float("nan")), rewards)
        by_name = {name: rewards[:, column] for column, name in enumerate(names)}
        prompts = gather_object(batch.rollout.prompts) if self.stat_tracker is not None else []
        output = compute_advantages(
            config.reward, by_name, self.reward_weights, group_ids, prompts, self.stat_tracker
        )
        start = accelerator.process_index * len(batch.rollout)
        local_slice = slice(start, start + len(batch.rollout))
        valid = ~invalid.any(dim=1)
        batch.advantages = output.advantages[local_slice].to(accelerator.device)
        batch.valid = valid[local_slice].to(accelerator.device)
        return _reward_stats(by_name, self.reward_weights, output, valid, config.sample.groups_per_step)

    def _check_rewards(self, names: list[str], rewards: torch.Tensor, invalid: torch.Tensor) -> None:
        """Stop on NaN / inf under ``nan_policy: abort`` or after several all-NaN steps; else name the dropped."""
        if invalid.any() and self.config.reward.nan_policy == "abort":
            sample, column = (int(i) for i in torch.nonzero(invalid)[0])
            raise RewardError(
                f"reward {names[column]!r} returned {rewards[sample, column].item()} for sample {sample} of the "
                f"step ({int(invalid.any(dim=1).sum())} samples affected); set reward.nan_policy: drop to drop "
                "such samples, or fix the reward. The last checkpoint is intact."
            )
        if invalid.any():
            _report_dropped(names, rewards, invalid, self.accelerator)
        self.all_nan_steps = self.all_nan_steps + 1 if bool(invalid.any(dim=1).all()) else 0
        if self.all_nan_steps >= ALL_NAN_STEP_LIMIT:
            raise RewardError(
                f"every sample's reward was NaN / inf for {self.all_nan_steps} consecutive steps, so nothing "
                "trains; fix the reward (score a few images with it by hand). The last checkpoint is intact."
            )

    @torch.no_grad()
    def check_ratio(self, rollout: Rollout) -> dict[str, float]:
        """The ratio == 1 check before the first update, recomputed exactly as training recomputes.

        Log-probs are recomputed at the training microbatch size, through the prepared model and autocast, in
        the algorithm's log-prob convention. Their largest difference from the stored ones (the *floor*) is
        logged as ``ratio_check/floor``; above ``train.ratio_check_fraction x`` the algorithm's trust region the
        run stops with :class:`RatioCheckError`, since the first update would then clip on numerical noise.
        """
        train = self.config.train
        with self.accelerator.autocast():
            recomputed, stds = self.sampler.recompute_log_probs(rollout, train.microbatch_size)
        convert = self.algorithm.log_probs_for_ratio
        worst_step, worst = worst_log_prob_mismatch(
            convert(recomputed, stds),
            convert(rollout.log_probs.float().to(stds.device), stds),
            rollout.stochastic,
        )
        # every process decides on the largest floor of any process, so all stop together (no hung collective)
        floor = float(self.accelerator.gather(worst.reshape(1).to(self.accelerator.device)).max())
        clip = self.algorithm.trust_region
        tolerance = train.ratio_check_fraction * clip
        if not floor <= tolerance:
            raise RatioCheckError(
                f"ratio check failed before the first update: recomputed log-probs differ from the rollout's by "
                f"{floor:.3g} at denoising step {worst_step} (model dtype {self.sampler.dtype}, mixed precision "
                f"{train.mixed_precision}, microbatch {train.microbatch_size}), above the tolerance {tolerance:.3g} = "
                f"train.ratio_check_fraction {train.ratio_check_fraction} x clip range {clip:g}, so the first update "
                "would clip on numerical noise. Fix: run the denoiser in float32 (model.dtype: float32, "
                "train.mixed_precision: no), raise algorithm.clip_low, or use a deterministic attention backend"
            )
        return {"ratio_check/floor": floor, "ratio_check/tolerance": tolerance}

    def update(self, batch: StepBatch, step: int) -> dict[str, float]:
        """Updates over the units the algorithm selects; the loss is a mean over samples and trained units.

        Gradients accumulate over ``samples_per_update / microbatch_size`` microbatches and the K units of each,
        each backward scaled by ``1 / (microbatches * K)``: the update's size does not depend on K. Samples with
        a dropped reward carry zero weight. Statistics stay on the device and reach the host once.
        """
        train, accelerator = self.config.train, self.accelerator
        rollout = batch.rollout
        units = self.algorithm.select(rollout, step)
        num_units = units.shape[1]
        device = batch.advantages.device
        unit_advantages, unit_weights = self.algorithm.unit_advantages(
            rollout, batch.group_ids.to(device), batch.advantages, units.to(device)
        )
        unit_weights = unit_weights * batch.valid[:, None].float()
        totals: dict[str, torch.Tensor] = {}
        calls, grad_norms = 0, []
        for inner in range(train.inner_epochs):
            order_seed = derive_seed(train.seed, "minibatch", step, inner, accelerator.process_index)
            order = torch.randperm(len(rollout), generator=torch.Generator().manual_seed(order_seed))
            if self.algorithm.whole_groups:
                order = whole_groups_first(batch.group_ids, order)
            for update_index, update_indices in enumerate(order.split(train.samples_per_update)):
                microbatches = update_indices.split(train.microbatch_size)
                scale = 1.0 / (len(microbatches) * num_units)
                for position, micro in enumerate(microbatches):
                    part = rollout.select(micro)  # indexed once per microbatch, not once per unit
                    device_micro = micro.to(batch.advantages.device)
                    for k in range(num_units):
                        loss_batch = LossBatch(
                            rollout=part,
                            units=units[micro.to(units.device)][:, k : k + 1],
                            advantages=unit_advantages[device_micro, k],
                            weight=unit_weights[device_micro, k],
                            step=step,
                            generator=self._loss_generator(step, inner, update_index, position, k),
                        )
                        last = position == len(microbatches) - 1 and k == num_units - 1
                        reduce_stats(totals, self._backward(loss_batch, scale, sync=last))
                        calls += 1
                grad_norms.append(self._optimizer_step())
                self.algorithm.after_update(self.policy)
        record = finish_stats({**totals, "optim/grad_norm": torch.stack(grad_norms).mean() * calls}, calls)
        record["train/trained_units"] = num_units
        record["optim/updates"] = len(grad_norms)
        record["optim/lr"] = self.optimizer.param_groups[0]["lr"]
        record["perf/peak_memory_mb"] = _peak_memory_mb(accelerator.device)
        return record

    def _loss_generator(self, *keys: Any) -> torch.Generator:
        """A generator on the model's device for noise the loss draws, seeded from the run and the call."""
        seed = derive_seed(self.config.train.seed, "loss", self.accelerator.process_index, *keys)
        return torch.Generator(self.accelerator.device).manual_seed(seed)

    def _backward(self, loss_batch: LossBatch, scale: float, *, sync: bool) -> dict[str, torch.Tensor]:
        """Loss and backward of one microbatch at one unit (gradients synchronise on the last one)."""
        context = nullcontext() if sync else self.accelerator.no_sync(self.model)
        with context, self.accelerator.autocast():
            loss, stats = self.algorithm.loss(loss_batch, self.policy)
            self.accelerator.backward(loss * scale)
        return stats

    def _optimizer_step(self) -> torch.Tensor:
        train = self.config.train
        grad_norm = torch.zeros((), device=self.accelerator.device)
        if train.max_grad_norm > 0:
            grad_norm = (
                self.accelerator.clip_grad_norm_(self.parameters, train.max_grad_norm).detach().float()
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return grad_norm.reshape(())

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Reward of the held-out prompts at fixed seeds (the same noise every time); saves an image grid.

        Every process samples the same number of prompts (the last shard is padded with repeats, dropped after
        the gather), so the prepared model sees the same collectives on every process (DDP buffers, FSDP).
        """
        if self.eval_set is None:
            return {}
        config, accelerator = self.config, self.accelerator
        count = min(len(self.eval_set), config.eval.max_prompts)
        options = eval_options(config)
        mine = _even_shard(count, accelerator.process_index, accelerator.num_processes)
        ema = self.policy.swapped(self.ema.shadow) if self.ema is not None else nullcontext()
        with ema, accelerator.autocast():
            rollout = self.sampler.rollout(
                [self.eval_set.prompts[i] for i in mine],
                options,
                group_size=config.eval.samples_per_prompt,
                epoch=0,
                prompt_keys=[f"eval-{i}" for i in mine],
                metadata=[self.eval_set.metadata[i] for i in mine],
            )
        models = {**self.reward_models, **{f"gold/{key}": model for key, model in self.gold_models.items()}}
        group_ids = torch.arange(len(mine)).repeat_interleave(config.eval.samples_per_prompt)
        scores = self.score_rollout(rollout, models, group_ids)
        gathered = gather_object([(mine, {k: v.tolist() for k, v in scores.items()}, rollout.pixels.cpu())])
        if not accelerator.is_main_process:
            return {}
        return self._eval_record(step, gathered)

    def _eval_record(self, step: int, gathered: list) -> dict[str, Any]:
        per_prompt = self.config.eval.samples_per_prompt
        per_name: dict[str, dict[int, list[float]]] = {}
        images: dict[int, torch.Tensor] = {}
        for indices, scores, pixels in gathered:
            for position, index in enumerate(indices):  # a padded repeat overwrites the same prompt's entry
                images[index] = pixels[position * per_prompt : (position + 1) * per_prompt]
                for name, values in scores.items():
                    per_name.setdefault(name, {})[index] = values[
                        position * per_prompt : (position + 1) * per_prompt
                    ]
        record: dict[str, Any] = {}
        combined: torch.Tensor | None = None
        for name, by_prompt in per_name.items():
            tensor = torch.tensor(
                [v for index in sorted(by_prompt) for v in by_prompt[index]], dtype=torch.float32
            )
            if name.startswith("gold/"):
                record[f"eval/{name}"] = float(tensor.nanmean())
                continue
            record[f"eval/reward/{name}"] = float(tensor.nanmean())
            weighted = tensor * self.reward_weights[name]
            combined = weighted if combined is None else combined + weighted
        record["eval/reward/mean"] = float(combined.nanmean())
        grid = torch.cat([images[index] for index in sorted(images)])
        if self.monitor is not None:
            group_ids = torch.arange(len(grid)) // per_prompt
            statistics, diversity = self.monitor.local(grid.to(self.accelerator.device), group_ids)
            record.update(HackingMonitor.record(statistics.cpu(), diversity.cpu(), prefix="eval/monitor/"))
        prompts = [self.eval_set.prompts[index] for index in sorted(images)]
        save_eval_samples(self, step, grid, prompts, [f"reward {value:.3f}" for value in combined.tolist()])
        return record

    def describe_run(self) -> list[tuple[str, str]]:
        """The start-up summary's lines: model, algorithm, rewards, processes, batch sizes, output folder."""
        config, accelerator = self.config, self.accelerator
        model, sample, train = config.model, config.sample, config.train
        trained = f"LoRA r={model.lora_rank}" if model.lora else "all weights"
        rewards = ", ".join(f"{term.name} x {term.weight:g}" for term in config.reward.terms)
        gold = ", ".join(term.name for term in config.eval.gold)
        threads = f", {torch.get_num_threads()} CPU threads" if accelerator.device.type == "cpu" else ""
        return [
            ("model", f"{model.family} {model.pretrained} ({model.dtype}, {trained})"),
            ("algorithm", f"{config.algorithm.name}, {sample.sde_type} steps x {sample.num_steps}"),
            ("rewards", rewards + (f"; gold (eval only): {gold}" if gold else "")),
            ("processes", f"{accelerator.num_processes} on {accelerator.device.type}{threads}"),
            (
                "batch",
                f"{sample.groups_per_step} prompts x {sample.group_size} samples per step; "
                f"{self.updates_per_step} updates of {train.samples_per_update} per process",
            ),
            ("output", str(self.output_dir)),
        ]

    # ----- checkpoints -------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps: accelerate state + every stateful part + LoRA, committed atomically."""
        run_state.save(self, step)

    def summary(self) -> dict[str, Any]:
        records = self.metrics.read() if self.accelerator.is_main_process else []
        evals = [r["eval/reward/mean"] for r in records if r.get("eval/reward/mean") is not None]
        train = [r["reward/mean"] for r in records if r.get("reward/mean") is not None]
        return {
            "first_eval_reward": evals[0] if evals else None,
            "last_eval_reward": evals[-1] if evals else None,
            "first_train_reward": train[0] if train else None,
            "last_train_reward": train[-1] if train else None,
            "output_dir": str(self.output_dir),
        }


def whole_groups_first(group_ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``order`` with each group's members made adjacent (groups in the order their first member appears), so a
    minibatch of a multiple of ``group_size`` samples holds whole groups."""
    ids = group_ids[order].tolist()
    first: dict[int, int] = {}
    for position, group in enumerate(ids):
        first.setdefault(group, position)
    key = torch.tensor([first[group] for group in ids])
    return order[torch.sort(key, stable=True).indices]


def _even_shard(count: int, rank: int, world: int) -> list[int]:
    """Prompt indices of process ``rank``: strided, padded with the last index so every shard has the same size."""
    size = -(-count // world)
    mine = list(range(rank, count, world))
    return mine + [mine[-1] if mine else count - 1] * (size - len(mine))


def _report_dropped(names: list[str], rewards: torch.Tensor, invalid: torch.Tensor, accelerator) -> None:
    """One line per reward naming the samples (indices within the step) whose score was NaN / inf."""
    for column, name in enumerate(names):
        samples = torch.nonzero(invalid[:, column]).flatten().tolist()
        if samples:
            shown = ", ".join(str(i) for i in samples[:8]) + (" ..." if len(samples) > 8 else "")
            values = sorted({str(rewards[i, column].item()) for i in samples})
            accelerator.print(
                f"gen-rl: reward {name!r} returned {'/'.join(values)} for sample(s) {shown} of this step; "
                "dropped (reward.nan_policy: drop), counted in reward/dropped_samples"
            )


def _reward_stats(rewards, weights, output: AdvantageOutput, valid, num_groups: int) -> dict[str, float]:
    stats: dict[str, float] = {}
    combined = sum(weights[name] * value for name, value in rewards.items())
    for name, value in rewards.items():
        stats[f"reward/{name}/mean"] = float(value.nanmean())
        stats[f"reward/{name}/std"] = (
            float(value[torch.isfinite(value)].std(correction=0)) if int(valid.sum()) > 1 else 0.0
        )
    finite = combined[torch.isfinite(combined)]
    stats["reward/mean"] = float(finite.mean()) if finite.numel() else float("nan")
    stats["reward/std"] = float(finite.std(correction=0)) if finite.numel() > 1 else 0.0
    stats["reward/dropped_samples"] = int((~valid).sum())
    for name, value in rewards.items():
        stats[f"reward/{name}/nan"] = int((~torch.isfinite(value)).sum())
    advantages = output.advantages
    stats["advantage/mean"] = float(advantages.mean())
    stats["advantage/std"] = float(advantages.std(correction=0))
    stats["advantage/abs_mean"] = float(advantages.abs().mean())
    stats["advantage/zero_std_group_fraction"] = output.num_zero_std_groups / max(1, num_groups)
    return stats


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
