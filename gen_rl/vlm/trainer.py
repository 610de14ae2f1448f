"""GRPO-family training of a vision-language model on verifiable rewards.

``accelerate launch gen_rl/train.py --config configs/vlm/<run>.yaml`` calls :func:`train`. The step loop is the
shared :class:`gen_rl.loop.PhaseLoop` (records after the update: step ``t``'s record is ``step: t + 1``); this
module implements its phases:

1. ``collect`` (:meth:`VLMTrainer.dynamic_sample`): draw prompts from the curriculum stage, sample ``G``
   completions each, score them, compute group-relative advantages (shared core); with DAPO dynamic sampling,
   extra rounds replace groups whose rewards are all equal.
2. ``update``: ``reference_pass`` / ``old_pass``, the no-grad token log-probs of the KL reference
   (``algorithm.kl_coef > 0``) and of the sampling policy (only when the batch feeds more than one optimizer step;
   otherwise ratio 1 is exact and the current log-probs, detached, stand in); then :meth:`VLMTrainer.optimize`,
   ``train.inner_epochs`` passes of optimizer updates (``train.samples_per_update`` completions per process
   each), each accumulated over microbatches whose losses are divided by the whole update's denominators (over
   every process).
3. ``evaluate`` (every ``eval.every_steps`` and after the last step: held-out greedy and sampled completions,
   :mod:`gen_rl.vlm.evaluation`), ``log`` (``metrics.jsonl`` through the shared :class:`gen_rl.metrics.MetricsLog`,
   with the metric names shared with the generation trainer; ``completions.jsonl``, ``eval_completions.jsonl``,
   the tracker) and ``save`` (every ``checkpoint.every_steps``, the shared
   :func:`gen_rl.checkpoint.write_checkpoint`); ``finish`` exports ``final/`` (the last step is not checkpointed).

Prompts are encoded once per record by ``_encode_record`` (images, sampled video frames, templates, sizes),
for training and evaluation alike.

Groups are whole on each process (each process samples all ``G`` completions of its prompts). Rewards are
gathered from every process, advantages computed over the whole batch (a global std, REINFORCE++ and the
high-entropy token threshold need it) and each process keeps its own slice; loss denominators are summed over
processes, so two processes train exactly as one process on the same samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs

from gen_rl.checkpoint import (
    ACCELERATE_DIR,
    CheckpointManager,
    CheckpointWriteError,
    disk_full,
    publish,
    write_checkpoint,
)
from gen_rl.core.config import ConfigError, to_dict
from gen_rl.core.seeding import derive_seed
from gen_rl.loop import Collected, PhaseLoop
from gen_rl.metrics import MetricsLog, plot_reward_curve
from gen_rl.run_folder import VLM_TUNABLES
from gen_rl.run_state import apply_optimizer_settings, install_hooks, open_run, refusing_code
from gen_rl.vlm.config import VLMConfig
from gen_rl.vlm.data import (
    Curriculum,
    PromptStream,
    Stage,
    load_images,
    load_videos,
    read_checked_records,
    read_records,
)
from gen_rl.vlm.evaluation import EVAL_COMPLETIONS, Evaluator, drop_completions_after, log_text_table
from gen_rl.vlm.objectives import (
    ADVANTAGE_FUNCTIONS,
    LOSS_MODES,
    MiniBatchNorms,
    entropy_threshold,
    policy_loss,
)
from gen_rl.vlm.policy import (
    ReferencePolicy,
    apply_lora,
    enable_gradient_checkpointing,
    eos_token_ids,
    freeze_vision_tower,
    load_policy,
)
from gen_rl.vlm.rollout import (
    Rollout,
    SamplingSettings,
    check_video_support,
    completion_log_probs,
    encode_prompt,
    sample_rollout,
    sequence_inputs,
    vision_token_ids,
)
from gen_rl.vlm.scoring import advantages_of, build_reward_functions, reward_metadata, score_completions
from gen_rl.vlm.video import VideoSampling

__all__ = ["train", "VLMTrainer", "ScoredRollout", "BUILTIN_MODELS"]

BUILTIN_MODELS = {
    "builtin:tiny-qwen2-vl": "qwen2_vl",
    "builtin:tiny-qwen2.5-vl": "qwen2_5_vl",
    "builtin:tiny-llava": "llava",
}
TRAINER_STATE = "trainer_state.json"


def train(config: VLMConfig, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
    """Run the whole training described by ``config``; returns a summary (first / last mean reward, ...)."""
    return VLMTrainer(config, resume=resume, overwrite=overwrite).train()


@dataclass
class _Group:
    """One prompt's completions with their rewards and advantages (internal)."""

    rollout: Rollout
    scores: dict[str, torch.Tensor]
    total: torch.Tensor
    advantages: torch.Tensor

    @property
    def has_spread(self) -> bool:
        scored = self.total[torch.isfinite(self.total)]  # dropped samples (reward.nan_policy) have no score
        return bool(scored.numel() > 1 and scored.max() > scored.min())


@dataclass
class ScoredRollout:
    """A rollout with its rewards and advantages (one process's share of the batch).

    Attributes:
        rollout: the completions.
        scores: ``{reward name: [N]}`` (NaN where a reward does not apply).
        total_reward: ``[N]`` weighted reward.
        advantages: ``[N]`` group-relative advantages.
        keep: ``[N]`` bool, completion counts in the loss (False for dropped zero-std groups).
        num_groups / num_zero_std_groups: over all processes, summed over rounds (before refilling).
        rounds: dynamic-sampling rounds used.
        generated_tokens / rollout_seconds: for tokens/s; rollout_seconds is the time in ``generate``.
        reward_seconds: the time scoring the completions.
    """

    rollout: Rollout
    scores: dict[str, torch.Tensor]
    total_reward: torch.Tensor
    advantages: torch.Tensor
    keep: torch.Tensor
    num_groups: int
    num_zero_std_groups: int
    rounds: int
    generated_tokens: int
    rollout_seconds: float
    reward_seconds: float = 0.0


class VLMTrainer(PhaseLoop):
    """Owns the accelerator, policy, reference, optimizer, data stream and logs of one run; the step loop is
    :class:`gen_rl.loop.PhaseLoop`'s."""

    records_after_update = True  # step t's record is "step: t + 1", evaluated after its update
    progress_name = "vlm-grpo"

    def __init__(self, config: VLMConfig, resume: bool = False, overwrite: bool = False) -> None:
        config.validate()
        self.config = config
        self.output_dir = Path(config.log.output_dir)
        use_cpu = config.accelerator.cpu or not torch.cuda.is_available()
        # a trainable vision tower gets no gradient from a process whose prompts have no image: let DDP allow it
        trainable_vision = not (config.model.freeze_vision_tower or config.model.lora.enabled)
        self.accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=config.accelerator.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=trainable_vision)],
            log_with=None if config.log.tracker == "none" else config.log.tracker,
            project_dir=str(self.output_dir),
        )
        if self.accelerator.device.type == "cpu" and config.accelerator.cpu_threads > 0:
            torch.set_num_threads(config.accelerator.cpu_threads)
        self._check_process_split()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_folder = open_run(  # claim the folder, pick and check the checkpoint: before the model loads
            self.accelerator,
            config,
            resume=resume,
            overwrite=overwrite,
            keep_last=config.checkpoint.keep_last,
            tunables=VLM_TUNABLES,
        )
        torch.manual_seed(derive_seed(config.seed, "init"))

        self.model, self.processor = self._build_policy()
        self.reference = self._build_reference()
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        if not trainable:
            raise ConfigError("no trainable parameters: check model.lora and model.freeze_vision_tower")
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=config.train.lr,
            betas=tuple(config.train.adam_betas),
            weight_decay=config.train.weight_decay,
        )
        warmup = config.train.warmup_updates
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler
        )
        if self.reference is not None and self.reference.mode == "frozen_copy":
            self.reference.frozen_copy.to(self.accelerator.device)
        install_hooks(self.accelerator)

        self.settings = self._sampling_settings()
        self.reward_functions = build_reward_functions(config.reward.terms)
        self.stream = PromptStream(self._build_curriculum(), seed=config.seed, shuffle=config.data.shuffle)
        self.evaluator = self._build_evaluator()
        self._check_video_support()
        if self.accelerator.is_main_process and config.log.tracker != "none":
            self.accelerator.init_trackers(config.log.run_name)
        self.samples_per_step = config.batch_size
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.checkpoints = CheckpointManager(self.output_dir, keep_last=config.checkpoint.keep_last)
        self.start_step = self._resume() if resume else 0
        if resume and self.accelerator.is_main_process:  # evals after the checkpoint are run again
            drop_completions_after(self.output_dir / EVAL_COMPLETIONS, self.start_step)
        if not resume and self.accelerator.is_main_process:
            for name in ("metrics.jsonl", "completions.jsonl", EVAL_COMPLETIONS):
                (self.output_dir / name).unlink(missing_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    # ------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def _check_process_split(self) -> None:
        config, world = self.config, self.accelerator.num_processes
        if config.sample.groups_per_step % world:
            raise ConfigError(
                f"sample.groups_per_step={config.sample.groups_per_step} must be divisible by the "
                f"{world} processes (each process samples whole groups); pick a multiple of {world}"
            )
        share, update = config.batch_size // world, config.samples_per_update(world)
        if share % update:
            raise ConfigError(
                f"train.samples_per_update={update} must divide each process's share of the batch "
                f"(sample.groups_per_step x sample.group_size / {world} processes = {share}); pick a divisor"
            )
        if config.train.microbatch_size and update % config.train.microbatch_size:
            raise ConfigError(
                f"train.microbatch_size={config.train.microbatch_size} must divide the {update} completions of "
                "an optimizer update on a process (train.samples_per_update); pick a divisor or 0"
            )

    def _model_path(self) -> str:
        name = self.config.model.name_or_path
        if not name.startswith("builtin:"):
            return name
        if name not in BUILTIN_MODELS:
            raise ConfigError(
                f"model.name_or_path {name!r} is not a builtin model; known: {', '.join(BUILTIN_MODELS)}"
            )
        folder = self.output_dir / "base_model"
        if self.accelerator.is_main_process and not (folder / "config.json").is_file():
            from gen_rl.vlm.tiny import TINY_BUILDERS

            model, processor = TINY_BUILDERS[BUILTIN_MODELS[name]](seed=self.config.seed)
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
        self.accelerator.wait_for_everyone()
        return str(folder)

    def _build_policy(self):
        section = self.config.model
        model, processor = load_policy(
            self._model_path(),
            dtype=section.dtype,
            attn_implementation=section.attn_implementation,
            min_pixels=section.min_pixels,
            max_pixels=section.max_pixels,
        )
        if section.freeze_vision_tower:
            freeze_vision_tower(model)
        self._frozen_copy = None
        if self.config.algorithm.kl_coef > 0 and self._reference_mode() == "frozen_copy":
            self._frozen_copy = ReferencePolicy.copy_of(model)
        if section.lora.enabled:
            lora = section.lora
            model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        if section.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        return model, processor

    def _reference_mode(self) -> str:
        mode = self.config.model.reference
        if mode == "auto":
            return "disable_adapter" if self.config.model.lora.enabled else "frozen_copy"
        return mode

    def _build_reference(self) -> ReferencePolicy | None:
        if self.config.algorithm.kl_coef <= 0:
            return None
        if self._reference_mode() == "frozen_copy":
            return self._frozen_copy
        return ReferencePolicy.adapter_disabled(self.model)

    def _sampling_settings(self) -> SamplingSettings:
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = self.processor.tokenizer
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos_token_ids(model, self.processor)[0]
        return SamplingSettings(
            max_new_tokens=self.config.sample.max_new_tokens,
            temperature=self.config.sample.temperature,
            eos_token_ids=eos_token_ids(model, self.processor),
            pad_token_id=int(pad_token_id),
            suppress_token_ids=vision_token_ids(model.config, self.processor),
        )

    def _build_curriculum(self) -> Curriculum:
        stages = []
        for index, section in enumerate(self.config.data.stages):
            if section.synthetic:
                records = self._synthetic_records(
                    f"stage{index}_{section.synthetic}",
                    section.synthetic,
                    section.synthetic_records,
                    self.config.seed,
                )
            else:
                records = [
                    record
                    for path in section.files
                    for record in read_checked_records(
                        path, self.config.data.image_root, self.config.data.bad_records
                    )
                ]
            if section.tasks:
                records = [record for record in records if record.task in section.tasks]
            stages.append(Stage(name=section.name, records=records, steps=section.steps))
        return Curriculum(stages)

    def _synthetic_records(self, name: str, task: str, num_records: int, seed: int) -> list:
        from gen_rl.vlm.synthetic import SYNTHETIC_TASKS

        folder = self.output_dir / "data" / name
        if self.accelerator.is_main_process:
            SYNTHETIC_TASKS[task](folder, num_records, seed=seed)
        self.accelerator.wait_for_everyone()
        return read_records(folder / f"{task}.jsonl", folder)

    def _encode_record(self, record) -> tuple:
        """``(EncodedPrompt, reward metadata)`` of a record: its images and sampled video frames through the
        processor (a video the processor cannot take is an error, never a text-only prompt)."""
        data = self.config.data
        images = load_images(record)
        video = data.video
        sampling = VideoSampling(video.num_frames, video.fps, video.max_frames, video.frames_fps)
        videos = load_videos(record, sampling)
        prompt = encode_prompt(
            self.processor,
            record.problem,
            images,
            system_prompt=data.system_prompt,
            max_prompt_length=data.max_prompt_length,
            question_template=data.question_template,
            videos=videos,
            video_pixels=(video.min_pixels, video.max_pixels),
        )
        if prompt.num_videos != len(record.videos):
            raise RuntimeError(
                f"record {record.key!r}: {len(record.videos)} video(s) but {prompt.num_videos} encoded"
            )
        original_sizes = [(image.height, image.width) for image in images]
        metadata = reward_metadata(record, original_sizes, prompt.processed_sizes)
        if videos:  # seconds of each video (temporal grounding answers are in seconds)
            metadata.setdefault("video_duration", videos[0].duration)
        return prompt, metadata

    def _check_video_support(self) -> None:
        """Before training: records with a video need a processor that takes videos (never text only)."""
        stages = self.stream.curriculum.stages
        records = [record for stage in stages for record in stage.records]
        records += self.evaluator.records if self.evaluator is not None else []
        if any(record.videos for record in records):
            check_video_support(self.processor)

    def _build_evaluator(self) -> Evaluator | None:
        section = self.config.eval
        if not section.every_steps:
            return None
        if section.synthetic:
            records = self._synthetic_records(
                f"eval_{section.synthetic}", section.synthetic, section.synthetic_records,
                seed=derive_seed(self.config.seed, "eval-data"),
            )  # fmt: skip
        else:
            data = self.config.data
            records = [
                record
                for path in section.data
                for record in read_checked_records(path, data.image_root, data.bad_records, key="eval.data")
            ]
        if section.max_records:
            records = records[: section.max_records]
        settings = dataclasses.replace(
            self.settings, temperature=section.temperature or self.settings.temperature
        )
        return Evaluator(
            records, self.reward_functions, settings, self._encode_record, greedy=section.greedy,
            num_samples=section.num_samples, pass_threshold=section.pass_threshold,
            batch_size=section.batch_size, seed=self.config.seed, tracker_completions=section.tracker_completions,
            nan_policy=self.config.reward.nan_policy, report=self.accelerator.print,
        )  # fmt: skip

    def evaluate(self, step: int) -> dict[str, float]:
        """The held-out ``eval/`` metrics after ``step`` completed steps ({} when eval is off or not due)."""
        every = self.config.eval.every_steps
        if self.evaluator is None or not (step % every == 0 or step == self.config.train.num_steps):
            return {}
        policy = self.accelerator.unwrap_model(self.model)
        return self.evaluator.run(self.accelerator, policy, self.processor, step, self.output_dir)

    # ------------------------------------------------------------------------------------------------
    # phase 1: collect
    # ------------------------------------------------------------------------------------------------

    def _local_prompts(self, step: int) -> list:
        groups_per_step = self.config.sample.groups_per_step
        records = self.stream.draw(step, groups_per_step)
        share = groups_per_step // self.world_size
        rank = self.accelerator.process_index
        return records[rank * share : (rank + 1) * share]

    def _sample_round(self, step: int, round_index: int):
        config = self.config
        records = self._local_prompts(step)
        encoded, metadatas = [], []
        for record in records:
            prompt, metadata = self._encode_record(record)
            encoded.append(prompt)
            metadatas.append(metadata)
        first_group = (
            step * config.algorithm.dynamic_sampling_rounds + round_index
        ) * config.sample.groups_per_step
        first_group += self.accelerator.process_index * len(records)
        group_ids = [first_group + index for index in range(len(records))]

        torch.manual_seed(
            derive_seed(config.seed, "rollout", step, round_index, self.accelerator.process_index)
        )
        policy = self.accelerator.unwrap_model(self.model)
        policy.eval()
        start = time.perf_counter()
        rollout = sample_rollout(
            policy,
            self.processor,
            encoded,
            records,
            group_ids,
            self.settings,
            config.sample.group_size,
            config.sample.generation_batch_size,
        )
        seconds = time.perf_counter() - start
        policy.train()
        group_size = config.sample.group_size
        sample_metadata = [metadatas[index // group_size] for index in range(len(rollout))]
        start = time.perf_counter()
        scores = score_completions(
            self.reward_functions, rollout.texts, rollout.records, sample_metadata,
            nan_policy=config.reward.nan_policy, report=self.accelerator.print,
        )  # fmt: skip
        return rollout, scores, seconds, time.perf_counter() - start

    def _advantages(self, rollout: Rollout, scores: dict[str, torch.Tensor]):
        """Advantages over the rewards of every process (so ``std_mode: global`` uses the whole batch); each
        process keeps its own slice. Returns ``(local total reward, local advantages, global AdvantageOutput)``."""
        config = self.config
        std_mode = config.reward.std_mode or LOSS_MODES[config.algorithm.name].std_mode
        all_scores = {name: self._gathered(values) for name, values in scores.items()}
        all_group_ids = self._gathered(rollout.group_ids).long()
        total, output = advantages_of(
            all_scores,
            self.reward_functions,
            all_group_ids,
            combine=config.reward.combine,
            std_mode=std_mode,
            eps=config.reward.std_eps,
            clip=config.reward.advantage_clip,
        )
        estimator = config.reward.advantage_estimator
        if estimator != "grpo":  # on the weighted reward sum, over the whole batch
            output = ADVANTAGE_FUNCTIONS[estimator](
                total,
                all_group_ids,
                eps=config.reward.std_eps,
                clip=config.reward.advantage_clip,
            )
        start = self.accelerator.process_index * len(rollout)
        local = slice(start, start + len(rollout))
        return total[local], output.advantages[local], output

    def collect(self, step: int) -> Collected:
        """The loop's collect phase: :meth:`dynamic_sample` with its statistics over every process."""
        scored = self.dynamic_sample(step)
        stats, timings = self._collect_stats(step, scored)
        return Collected(scored, stats, timings)

    def dynamic_sample(self, step: int) -> ScoredRollout:
        """Sample, score and compute advantages. With ``algorithm.drop_zero_std_groups``, groups whose rewards
        are all equal are left out of the loss, and extra rounds (up to ``algorithm.dynamic_sampling_rounds``,
        DAPO dynamic sampling) replace them by groups with reward spread, keeping the batch size fixed."""
        config, algorithm = self.config, self.config.algorithm
        group_size = config.sample.group_size
        local_prompts = config.sample.groups_per_step // self.world_size
        groups: list[_Group] = []
        num_groups = num_zero_std = rounds = generated = 0
        seconds = reward_seconds = 0.0
        for round_index in range(algorithm.dynamic_sampling_rounds):
            rollout, scores, round_seconds, round_reward_seconds = self._sample_round(step, round_index)
            total, advantages, advantage_output = self._advantages(rollout, scores)
            rounds += 1
            seconds += round_seconds
            reward_seconds += round_reward_seconds
            generated += int(rollout.completion_mask.sum())
            num_groups += advantage_output.num_groups
            num_zero_std += advantage_output.num_zero_std_groups
            for start in range(0, len(rollout), group_size):
                rows = list(range(start, start + group_size))
                groups.append(
                    _Group(
                        rollout=rollout.select(rows),
                        scores={name: values[rows] for name, values in scores.items()},
                        total=total[rows],
                        advantages=advantages[rows],
                    )
                )
            if not algorithm.drop_zero_std_groups:
                break
            if self._everyone_has(sum(group.has_spread for group in groups), local_prompts):
                break
        if algorithm.drop_zero_std_groups:  # groups with spread first, zero-std ones (masked) fill up
            groups = [group for group in groups if group.has_spread] + [g for g in groups if not g.has_spread]
        chosen = groups[:local_prompts]
        keep = torch.cat(
            [
                torch.full((group_size,), group.has_spread or not algorithm.drop_zero_std_groups)
                & torch.isfinite(group.total)  # samples dropped by reward.nan_policy stay out of the loss
                for group in chosen
            ]
        )
        return ScoredRollout(
            rollout=_concat_rollouts([group.rollout for group in chosen], self.settings.pad_token_id),
            scores={name: torch.cat([group.scores[name] for group in chosen]) for name in chosen[0].scores},
            total_reward=torch.cat([group.total for group in chosen]),
            advantages=torch.cat([group.advantages for group in chosen]),
            keep=keep,
            num_groups=num_groups,
            num_zero_std_groups=num_zero_std,
            rounds=rounds,
            generated_tokens=generated,
            rollout_seconds=seconds,
            reward_seconds=reward_seconds,
        )

    def _everyone_has(self, count: int, needed: int) -> bool:
        """Whether every process holds ``needed`` groups with reward spread (all processes get the same answer)."""
        have = torch.tensor([min(count, needed)], device=self.accelerator.device)
        return bool(self.accelerator.gather(have).min() >= needed)

    # ------------------------------------------------------------------------------------------------
    # phase 2: old / reference log-probs
    # ------------------------------------------------------------------------------------------------

    def _micro_batches(self, indices: list[int]) -> list[list[int]]:
        size = self.config.train.microbatch_size or len(indices)
        return [indices[start : start + size] for start in range(0, len(indices), size)]

    def _log_probs(self, model, rollout: Rollout, indices: list[int], with_entropy: bool = False):
        """Token log-probs ``[n, width]`` of completions ``indices``; ``width`` = their longest completion
        (with ``with_entropy``, a pair: log-probs and the sampling distribution's entropy per token)."""
        part = rollout.select(indices)
        width = max(int(part.completion_mask.sum(dim=1).max()), 1)
        completion_ids, mask = part.completion_ids[:, :width], part.completion_mask[:, :width]
        batch = sequence_inputs(part.prompts, completion_ids, mask, self.settings.pad_token_id)
        with self.accelerator.autocast():
            return completion_log_probs(
                model,
                batch,
                completion_ids.to(self.accelerator.device),
                self.settings.temperature,
                self.settings.suppress_token_ids,
                with_entropy,
            )

    @torch.no_grad()
    def _no_grad_log_probs(self, model, rollout: Rollout, with_entropy: bool = False):
        """``[N, C]`` float32 token log-probs of the whole rollout (zeros past each micro-batch's width); with
        ``with_entropy`` a pair (log-probs, entropies)."""
        shape = rollout.completion_ids.shape
        full = torch.zeros(shape, dtype=torch.float32, device=self.accelerator.device)
        entropy = torch.zeros_like(full)
        for indices in self._micro_batches(list(range(len(rollout)))):
            values = self._log_probs(model, rollout, indices, with_entropy)
            rows = torch.tensor(indices, device=full.device)
            if with_entropy:
                values, entropies = values
                entropy[rows, : entropies.shape[1]] = entropies.float()
            full[rows, : values.shape[1]] = values.float()
        return (full, entropy) if with_entropy else full

    def reference_pass(self, rollout: Rollout) -> torch.Tensor | None:
        """Token log-probs of the KL reference (None when ``beta == 0``)."""
        if self.reference is None:
            return None
        with self.reference.active(self.model) as reference_model:
            return self._no_grad_log_probs(reference_model, rollout)

    def old_pass(self, rollout: Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Sampling-policy ``(log-probs, entropies)``: log-probs when the batch feeds more than one optimizer
        update, entropies when only high-entropy tokens train (``algorithm.top_entropy_fraction < 1``)."""
        config = self.config
        share = config.batch_size // self.world_size
        optimizer_steps = config.train.inner_epochs * (share // config.samples_per_update(self.world_size))
        if config.algorithm.top_entropy_fraction < 1:
            log_probs, entropies = self._no_grad_log_probs(self.model, rollout, with_entropy=True)
            return (log_probs if optimizer_steps > 1 else None), entropies
        if optimizer_steps == 1:
            return None, None
        return self._no_grad_log_probs(self.model, rollout), None

    # ------------------------------------------------------------------------------------------------
    # phase 3: update
    # ------------------------------------------------------------------------------------------------

    def loss_mask(self, scored: ScoredRollout) -> torch.Tensor:
        """``[N, C]`` tokens that count in the loss: completion tokens of kept groups, minus truncated
        completions (no EOS within ``max_new_tokens``) when ``sample.mask_truncated`` (the default)."""
        rollout = scored.rollout
        mask = rollout.completion_mask & scored.keep[:, None]
        if self.config.sample.mask_truncated:
            mask &= ~rollout.is_truncated[:, None]
        return mask.to(self.accelerator.device)

    def _entropy_gate(self, sampling_entropy: torch.Tensor | None, loss_mask: torch.Tensor):
        """``[N, C]`` float 1 on loss tokens among the top ``algorithm.top_entropy_fraction`` by entropy over the
        whole batch (every process), else 0; None when every token trains."""
        if sampling_entropy is None:
            return None
        local = sampling_entropy[loss_mask].float()
        padded = self.accelerator.pad_across_processes(local, dim=0, pad_index=float("nan"))
        everyone = self.accelerator.gather(padded)
        threshold = entropy_threshold(
            everyone[~torch.isnan(everyone)], self.config.algorithm.top_entropy_fraction
        )
        return ((sampling_entropy >= threshold) & loss_mask).float()

    def update(self, batch: ScoredRollout, step: int) -> dict[str, float]:
        """The loop's update phase: the reference and sampling-policy passes, then :meth:`optimize`; returns its
        statistics with the learning rate after the step (and the peak GPU memory)."""
        ref_log_probs = self.reference_pass(batch.rollout)
        old_log_probs, sampling_entropy = self.old_pass(batch.rollout)
        stats = self.optimize(step, batch, old_log_probs, ref_log_probs, sampling_entropy)
        stats["optim/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        if self.accelerator.device.type == "cuda":
            stats["perf/peak_memory_mb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**20
        return stats

    def optimize(
        self, step: int, scored: ScoredRollout, old_log_probs, ref_log_probs, sampling_entropy=None
    ) -> dict[str, float]:
        """``train.inner_epochs`` passes of optimizer updates over the rollout; ``sampling_entropy``
        (from :meth:`old_pass`) restricts the policy gradient to high-entropy tokens."""
        config = self.config
        rollout = scored.rollout
        loss_mask = self.loss_mask(scored)
        token_gate = self._entropy_gate(sampling_entropy, loss_mask)
        advantages = scored.advantages.to(self.accelerator.device)
        mini_size = config.samples_per_update(self.world_size)
        totals: dict[str, list[float]] = {}
        entropy_sums = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        for iteration in range(config.train.inner_epochs):
            generator = np.random.default_rng(derive_seed(config.seed, "minibatch", step, iteration))
            order = generator.permutation(len(rollout)).tolist()
            for start in range(0, len(order), mini_size):
                mini = order[start : start + mini_size]
                stats = self._optimizer_step(
                    rollout, mini, loss_mask, advantages, old_log_probs, ref_log_probs, token_gate,
                    entropy_sums if iteration == 0 else None,
                )  # fmt: skip
                for key, value in stats.items():
                    totals.setdefault(key, []).append(value)
        reducers = {"policy/ratio_min": np.min, "policy/ratio_max": np.max}
        result = {key: float(reducers.get(key, np.mean)(values)) for key, values in totals.items()}
        result["policy/ratio_dev_max"] = max(result["policy/ratio_max"] - 1, 1 - result["policy/ratio_min"])
        result["optim/updates"] = float(len(totals["loss/total"]))
        entropy_sums = self.accelerator.gather(entropy_sums[None]).sum(dim=0)
        result["policy/entropy"] = float(entropy_sums[0] / entropy_sums[1].clamp_min(1))
        if token_gate is not None:
            trained = self._gathered(torch.stack([token_gate.sum(), loss_mask.sum()])).view(-1, 2).sum(dim=0)
            result["policy/trained_token_fraction"] = float(trained[0] / trained[1].clamp_min(1))
        return result

    def _global_norms(self, loss_mask: torch.Tensor) -> MiniBatchNorms:
        """Mini-batch denominators over every process, divided by the process count (DDP averages the
        gradients), so that each aggregation means the same with one process or several."""
        local = torch.stack([(loss_mask.sum(dim=1) > 0).sum(), loss_mask.sum()])
        total = self._gathered(local).view(-1, 2).sum(dim=0)
        world = self.world_size
        return MiniBatchNorms(
            completions=float(total[0].clamp_min(1)) / world, tokens=float(total[1].clamp_min(1)) / world
        )

    def _optimizer_step(
        self, rollout, mini, loss_mask, advantages, old_log_probs, ref_log_probs, token_gate, entropy_sums
    ):
        config, algorithm = self.config, self.config.algorithm
        norms = self._global_norms(loss_mask[mini])
        micro_batches = self._micro_batches(mini)
        sums = {"loss/total": 0.0, "loss/policy": 0.0, "loss/kl": 0.0}
        surrogate: dict[str, list[float]] = {}
        for position, micro in enumerate(micro_batches):
            index = torch.tensor(micro, device=loss_mask.device)
            is_last = position == len(micro_batches) - 1
            sync = self.accelerator.no_sync(self.model) if not is_last else contextlib.nullcontext()
            with sync:
                log_probs, entropy = self._log_probs(self.model, rollout, micro, with_entropy=True)
                width = log_probs.shape[1]
                old = old_log_probs[index, :width] if old_log_probs is not None else log_probs.detach()
                ref = ref_log_probs[index, :width] if ref_log_probs is not None else None
                output = policy_loss(
                    algorithm.name,
                    log_probs,
                    old,
                    advantages[index],
                    loss_mask[index, :width],
                    clip_low=algorithm.clip_low,
                    clip_high=algorithm.clip_high_or_low,
                    max_completion_length=config.sample.max_new_tokens,
                    norms=norms,
                    ref_log_probs=ref,
                    kl_coef=algorithm.kl_coef,
                    kl_estimator=algorithm.kl_estimator,
                    aggregation=algorithm.loss_aggregation,
                    dual_clip=algorithm.dual_clip,
                    tau_pos=algorithm.sapo_tau_pos,
                    tau_neg=algorithm.sapo_tau_neg,
                    token_weights=token_gate[index, :width] if token_gate is not None else None,
                )
                self.accelerator.backward(output.loss)
            if entropy_sums is not None:  # over every completion token, the first pass over the batch
                completion = rollout.completion_mask[micro, :width].to(entropy.device)
                entropy_sums += torch.stack([entropy[completion].double().sum(), completion.sum().double()])
            sums["loss/total"] += float(output.loss.detach())
            sums["loss/policy"] += float(output.policy_loss)
            sums["loss/kl"] += float(output.kl)
            for key, value in output.stats.items():
                surrogate.setdefault(key, []).append(value)
        grad_norm = float("nan")
        if config.train.max_grad_norm > 0:
            grad_norm = float(
                self.accelerator.clip_grad_norm_(self.model.parameters(), config.train.max_grad_norm)
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = dict(sums)
        stats["optim/grad_norm"] = grad_norm
        stats["policy/clip_fraction"] = float(np.mean(surrogate["clip_fraction"]))
        stats["policy/ratio_mean"] = float(np.mean(surrogate["ratio_mean"]))
        stats["policy/ratio_min"] = float(np.min(surrogate["ratio_min"]))
        stats["policy/ratio_max"] = float(np.max(surrogate["ratio_max"]))
        stats["policy/approx_kl"] = float(np.mean(surrogate["approx_kl"]))
        return stats

    # ------------------------------------------------------------------------------------------------
    # phase 4: log, checkpoint, save
    # ------------------------------------------------------------------------------------------------

    def _gathered(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(values.to(self.accelerator.device, torch.float64)).cpu()

    def _collect_stats(self, step: int, scored: ScoredRollout) -> tuple[dict[str, Any], dict[str, float]]:
        """The batch's part of the step's record, over every process, under the names shared with the generation
        trainer (``reward/``, ``advantage/``, ``perf/``) and VLM-only ones (``completion/``, ``sample/``,
        ``data/stage``); and its timings: ``time/sample_s`` (the slowest process's ``generate``) and
        ``time/reward_s``."""
        rollout = scored.rollout
        metrics: dict[str, Any] = {"data/stage": self.stream.curriculum.stage_at(step).name}
        total = self._gathered(scored.total_reward)
        metrics["reward/dropped_samples"] = int((~torch.isfinite(total)).sum())  # reward.nan_policy: drop
        total = total[torch.isfinite(total)]
        metrics["reward/mean"] = float(total.mean()) if total.numel() else float("nan")
        metrics["reward/std"] = float(total.std(correction=0)) if total.numel() else float("nan")
        for name, values in scored.scores.items():
            gathered = self._gathered(values)
            finite = gathered[torch.isfinite(gathered)]
            metrics[f"reward/{name}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
            metrics[f"reward/{name}/std"] = (
                float(finite.std(correction=0)) if finite.numel() else float("nan")
            )
        advantages = self._gathered(scored.advantages)
        metrics["advantage/mean"] = float(advantages.mean())
        metrics["advantage/std"] = float(advantages.std(correction=0))
        metrics["advantage/abs_mean"] = float(advantages.abs().mean())
        metrics["advantage/abs_max"] = float(advantages.abs().max())
        metrics["advantage/zero_std_group_fraction"] = scored.num_zero_std_groups / max(scored.num_groups, 1)
        metrics["sample/kept_fraction"] = float(self._gathered(scored.keep.float()).mean())
        metrics["sample/rounds"] = float(scored.rounds)
        lengths = self._gathered(rollout.completion_mask.sum(dim=1).float())
        metrics["completion/length_mean"] = float(lengths.mean())
        metrics["completion/truncated_fraction"] = float(self._gathered(rollout.is_truncated.float()).mean())
        timings = self._gathered(
            torch.tensor([scored.generated_tokens, scored.rollout_seconds, scored.reward_seconds])
        ).view(-1, 3)
        metrics["perf/rollout_tokens_per_s"] = float(timings[:, 0].sum() / timings[:, 1].max())
        return metrics, {
            "time/sample_s": float(timings[:, 1].max()),
            "time/reward_s": float(timings[:, 2].max()),
        }

    def log(self, record: dict[str, Any], batch: ScoredRollout | None = None) -> None:
        """The loop's log phase, then the first ``log.log_completions`` completions of the batch."""
        super().log(record)
        if batch is not None:
            self._log_completions(record["step"], batch)

    def _log_completions(self, step: int, scored: ScoredRollout) -> None:
        """``completions.jsonl`` and the tracker's table, under the record's ``step``."""
        count = min(self.config.log.log_completions, len(scored.rollout))
        if count <= 0 or not self.accelerator.is_main_process:
            return
        with (self.output_dir / "completions.jsonl").open("a") as handle:
            for index in range(count):
                record = scored.rollout.records[index]
                entry = {
                    "step": step,
                    "problem": record.problem,
                    "solution": record.solution,
                    "completion": scored.rollout.texts[index],
                    "reward": float(scored.total_reward[index]),
                    "advantage": float(scored.advantages[index]),
                }
                handle.write(json.dumps(entry, default=str) + "\n")
        rows = [
            [str(record.problem), scored.rollout.texts[index], round(float(scored.total_reward[index]), 4)]
            for index, record in enumerate(scored.rollout.records[:count])
        ]
        log_text_table(self.accelerator, "train/completions", ["problem", "completion", "reward"], rows, step)

    def save(self, step: int) -> None:
        """Crash-safe resumable checkpoint after ``step`` completed steps (weights, optimizer, RNG, data cursor,
        config), committed by :meth:`CheckpointManager.commit`; a failed write raises CheckpointWriteError."""

        def write_files(staging: Path) -> None:
            state = {"step": step, "stream": self.stream.state_dict()}
            (staging / TRAINER_STATE).write_text(json.dumps(state))
            (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))

        write_checkpoint(self.accelerator, self.checkpoints, step, self.run_folder.run_id, write_files)

    def _resume(self) -> int:
        """Restore the checkpoint ``open_run`` chose (0 and fresh logs when there is none); the config's
        learning rate and AdamW settings replace the saved ones."""
        checkpoint, main = self.run_folder.resume_from, self.accelerator.is_main_process
        if checkpoint is None:
            if main:
                self.metrics.rewrite([])
                (self.output_dir / "completions.jsonl").unlink(missing_ok=True)
            return 0
        with refusing_code(checkpoint):
            self.accelerator.load_state(str(checkpoint / ACCELERATE_DIR))
        train = self.config.train
        apply_optimizer_settings(
            self.optimizer,
            self.lr_scheduler.scheduler,
            train.lr,
            weight_decay=train.weight_decay,
            betas=tuple(train.adam_betas),
        )
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        self.stream.load_state_dict(state["stream"])
        step = int(state["step"])
        if main:
            self.metrics.truncate_after(step)
        return step

    def save_final(self) -> Path:
        """``save_pretrained`` of the adapter (LoRA) or the whole model, plus the processor, into ``final/``.

        Written to ``.tmp-final`` and swapped in whole: a crash never leaves a half-written ``final/``.
        """
        folder, staged = self.output_dir / "final", self.output_dir / ".tmp-final"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            try:
                shutil.rmtree(staged, ignore_errors=True)
                model.save_pretrained(staged)
                self.processor.save_pretrained(staged)
                publish(staged, folder)
            except Exception as error:  # a full disk surfaces as OSError, SafetensorError or RuntimeError
                full = disk_full(error, self.output_dir)
                shutil.rmtree(staged, ignore_errors=True)
                if not (full or isinstance(error, OSError)):
                    raise
                cause = "no space left on device" if full else error
                raise CheckpointWriteError(
                    f"writing {folder} failed: {cause}; the last checkpoint is intact. Free space, then run the "
                    "same command with --resume."
                ) from error
        self.accelerator.wait_for_everyone()
        return folder

    # ------------------------------------------------------------------------------------------------
    # the end of the run (the loop itself is PhaseLoop.train)
    # ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """Train from ``start_step`` to ``train.num_steps`` (:meth:`PhaseLoop.train`); returns the summary."""
        return self.train()

    def finish(self, num_steps: int) -> None:
        """After the last step (whose record already holds the final eval): export ``final/`` (no checkpoint) and
        plot the reward curve."""
        self.save_final()
        if self.accelerator.is_main_process:
            plot_reward_curve(self.metrics.read(), self.output_dir / "reward_curve.png")

    def describe_run(self) -> list[tuple[str, str]]:
        """The start-up summary's lines: model, algorithm, rewards, processes, batch sizes, output folder."""
        config, accelerator = self.config, self.accelerator
        lora = config.model.lora
        trained = f"LoRA r={lora.r}" if lora.enabled else "all language-model weights"
        rewards = ", ".join(f"{term.name} x {term.weight:g}" for term in config.reward.terms)
        threads = f", {torch.get_num_threads()} CPU threads" if accelerator.device.type == "cpu" else ""
        return [
            ("model", f"{config.model.name_or_path} ({config.model.dtype}, {trained})"),
            ("algorithm", f"{config.algorithm.name}, kl_coef {config.algorithm.kl_coef:g}"),
            ("rewards", rewards),
            ("processes", f"{accelerator.num_processes} on {accelerator.device.type}{threads}"),
            (
                "batch",
                f"{config.sample.groups_per_step} prompts x {config.sample.group_size} completions per step; "
                f"updates of {config.train.samples_per_update} per process",
            ),
            ("output", str(self.output_dir)),
        ]

    def summary(self) -> dict[str, float]:
        """Records, seconds since ``train()`` began, first / last (quarter) mean rewards."""
        records = self.metrics.read() if self.accelerator.is_main_process else []
        rewards = [record["reward/mean"] for record in records if record.get("reward/mean") is not None]
        summary = {"steps": float(len(records)), "seconds": time.perf_counter() - self.started_at}
        if rewards:
            quarter = max(len(rewards) // 4, 1)
            summary.update(
                {
                    "first_reward": rewards[0],
                    "last_reward": rewards[-1],
                    "first_quarter_reward": float(np.mean(rewards[:quarter])),
                    "last_quarter_reward": float(np.mean(rewards[-quarter:])),
                }
            )
        return summary


def _concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout from several (completion tensors right-padded to the longest)."""
    width = max(rollout.completion_ids.shape[1] for rollout in rollouts)

    def pad(tensor: torch.Tensor, value) -> torch.Tensor:
        missing = width - tensor.shape[1]
        if missing == 0:
            return tensor
        return torch.cat([tensor, tensor.new_full((tensor.shape[0], missing), value)], dim=1)

    return Rollout(
        prompts=[prompt for rollout in rollouts for prompt in rollout.prompts],
        records=[record for rollout in rollouts for record in rollout.records],
        group_ids=torch.cat([rollout.group_ids for rollout in rollouts]),
        completion_ids=torch.cat([pad(rollout.completion_ids, pad_token_id) for rollout in rollouts]),
        completion_mask=torch.cat([pad(rollout.completion_mask, False) for rollout in rollouts]),
        is_truncated=torch.cat([rollout.is_truncated for rollout in rollouts]),
        texts=[text for rollout in rollouts for text in rollout.texts],
    )
