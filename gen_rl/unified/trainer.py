"""``task: unified``: a unified multimodal model (Janus) trains its image-token generation on its own judgement.

``python gen_rl/train.py --config configs/unified/<run>.yaml`` builds :class:`UnifiedTrainer`. The step loop is the
shared :class:`gen_rl.loop.PhaseLoop` (generation numbering: step ``t``'s evaluation runs before its update, and
``finish`` adds the final one); the phases are the pieces of :mod:`gen_rl.vlm.unified`:

1. ``sample``: the step's prompts (a seeded per-epoch order, a function of the step), ``sample.group_size`` images
   each (:func:`~gen_rl.vlm.unified.sample_group`, a generator seeded from ``(seed, step)``), decoded.
2. ``score``: the self-reward ``sum_k w_k r_k`` of ``reward.terms`` (SRUM map or global ``P(yes)``, judged by the
   policy's own understanding: :func:`~gen_rl.vlm.unified.score_group`).
3. ``advantages``: GRPO group-relative advantages of the shared core.
4. ``update``: :func:`~gen_rl.vlm.unified.policy_update`, the shared token-level objective over image tokens.
5. ``evaluate``: held-out prompts, fixed-seed samples: ``eval/reward/mean`` (own judgement), ``eval/gold/<name>``
   (``eval.gold`` rewards, not optimised: shows whether the policy hacks its judge), a grid PNG under
   ``eval_images/``.
6. ``save``: the shared :func:`gen_rl.checkpoint.write_checkpoint` (trainable weights, Adam state, step). Every
   random draw derives from ``(seed, step)``, so a resumed run continues bit-exactly.

One process (no distributed sampling).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from gen_rl.checkpoint import ACCELERATE_DIR, CheckpointManager, write_checkpoint
from gen_rl.core.config import ConfigError, to_dict
from gen_rl.core.images import save_image_grid
from gen_rl.core.seeding import derive_seed
from gen_rl.loop import PhaseLoop
from gen_rl.metrics import MetricsLog
from gen_rl.run_state import install_hooks, open_run, refusing_code
from gen_rl.unified.config import UnifiedConfig
from gen_rl.unified.inputs import check_unified_inputs, read_prompt_records
from gen_rl.vlm.unified import (
    SelfRewardConfig,
    SelfRewardGroup,
    UnifiedPolicy,
    UpdateSettings,
    batch_advantages,
    gold_score,
    policy_update,
    sample_group,
    score_group,
)

__all__ = ["UnifiedTrainer", "UNIFIED_TUNABLES", "train"]

TRAINER_STATE = "trainer_state.json"
EVAL_IMAGES = "eval_images"
UNIFIED_TUNABLES = (
    "train.lr",
    "train.num_steps",
    "train.microbatch_size",
    "train.max_grad_norm",
    "train.cpu_threads",
    "eval.",
    "log.",
    "checkpoint.",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train(config: UnifiedConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Build the trainer and run it; returns the summary."""
    return UnifiedTrainer(config, resume=resume, overwrite=overwrite).train()


def check_gold_names(config: UnifiedConfig) -> None:
    """Stage 2 (imports the rewards, loads nothing): every ``eval.gold`` name is registered, its kwargs fit, its
    weights exist; one line naming the key otherwise."""
    import rewards  # noqa: F401  (registers every reward)
    from gen_rl.core.registry import resolve
    from rewards.base import REWARDS, _check_arguments, check_reward_sources

    for index, term in enumerate(config.eval.gold):
        key = f"eval.gold[{index}]"
        try:
            reward_class = resolve(REWARDS, term.name, "reward")
            _check_arguments(reward_class, term.name, term.kwargs)
            check_reward_sources(reward_class, term.kwargs, key)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{key}: {error}") from error


class UnifiedTrainer(PhaseLoop):
    """Owns the accelerator, the unified policy (and a frozen reference with ``algorithm.kl_coef``), Adam, the
    gold rewards and the logs of one run; the step loop is :class:`gen_rl.loop.PhaseLoop`'s."""

    records_after_update = False
    progress_name = "unified-self-reward"

    def __init__(self, config: UnifiedConfig, resume: bool = False, overwrite: bool = False) -> None:
        config.validate()
        check_unified_inputs(config)
        self.config = config
        self.output_dir = Path(config.log.output_dir)
        self.train_records = read_prompt_records(
            config.data.prompts, config.data.prompt_file, "data.prompt_file"
        )
        eval_records = read_prompt_records(config.eval.prompts, config.eval.prompt_file, "eval.prompt_file")
        self.eval_records = eval_records or self.train_records
        self.gold = self._build_gold()  # a bad gold name or missing gold weights: before the model loads
        self.accelerator = Accelerator(cpu=config.train.cpu or not torch.cuda.is_available())
        if self.accelerator.num_processes > 1:
            raise ConfigError(
                "task: unified runs on one process; launch without accelerate's multi-process mode"
            )
        if self.accelerator.device.type == "cpu" and config.train.cpu_threads > 0:
            torch.set_num_threads(config.train.cpu_threads)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_folder = open_run(
            self.accelerator,
            config,
            resume=resume,
            overwrite=overwrite,
            keep_last=config.checkpoint.keep_last,
            tunables=UNIFIED_TUNABLES,
        )
        torch.manual_seed(derive_seed(config.seed, "init"))
        model, processor = self._load_model()
        self.policy = UnifiedPolicy(model, processor, self._policy_settings())
        self.reference = self._build_reference(model, processor)
        self.parameters = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=config.train.lr,
            betas=tuple(config.train.adam_betas),
            weight_decay=config.train.weight_decay,
        )
        self.policy.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        install_hooks(self.accelerator)  # checkpoints hold the trainable weights only
        self.terms = config.self_terms()
        self.settings = self._update_settings()
        self.samples_per_step = config.batch_size
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self.checkpoints = CheckpointManager(self.output_dir, keep_last=config.checkpoint.keep_last)
        self.start_step = self._resume()
        if self.start_step == 0:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    # ----- setup -------------------------------------------------------------------------------------------------
    def _build_gold(self) -> list[tuple[str, Any]]:
        from rewards.base import build_reward

        check_gold_names(self.config)
        return [(term.name, build_reward(term.name, **term.kwargs)) for term in self.config.eval.gold]

    def _load_model(self) -> tuple[Any, Any]:
        section = self.config.model
        if section.name_or_path == "builtin:tiny-janus":
            from rewards.tiny_judges import tiny_janus

            model, processor = tiny_janus(seed=self.config.seed)
        else:
            from transformers import JanusForConditionalGeneration, JanusProcessor

            model = JanusForConditionalGeneration.from_pretrained(
                section.name_or_path, dtype=DTYPES[section.dtype]
            )
            processor = JanusProcessor.from_pretrained(section.name_or_path)
        model = model.to(DTYPES[section.dtype]).to(self.accelerator.device).eval()  # no dropout in rollouts
        return model, processor

    def _policy_settings(self) -> SelfRewardConfig:
        model, first = self.config.model, self.config.reward.terms[0].kwargs
        settings = SelfRewardConfig(
            temperature=model.temperature, guidance_scale=model.guidance_scale, trainable=model.trainable
        )
        if "question" in first:
            settings.question = first["question"]
        return settings

    def _build_reference(self, model: Any, processor: Any) -> UnifiedPolicy | None:
        if self.config.algorithm.kl_coef <= 0:
            return None
        frozen = copy.deepcopy(model).requires_grad_(False)
        return UnifiedPolicy(frozen, processor, self._policy_settings())

    def _update_settings(self) -> UpdateSettings:
        algorithm, train = self.config.algorithm, self.config.train
        return UpdateSettings(
            loss=algorithm.name,
            clip_low=algorithm.clip_low,
            clip_high=algorithm.clip_low if algorithm.clip_high is None else algorithm.clip_high,
            inner_epochs=train.inner_epochs,
            samples_per_update=self.config.samples_per_update,
            microbatch_size=train.microbatch_size,
            max_grad_norm=train.max_grad_norm,
            kl_coef=algorithm.kl_coef,
            kl_estimator=algorithm.kl_estimator,
        )

    def _resume(self) -> int:
        """Restore the checkpoint ``open_run`` chose (0 and a fresh metrics file when there is none)."""
        checkpoint = self.run_folder.resume_from
        if checkpoint is None:
            self.metrics.rewrite([])
            return 0
        with refusing_code(checkpoint):
            self.accelerator.load_state(str(checkpoint / ACCELERATE_DIR))
        for group in self.optimizer.param_groups:  # the config's learning rate is a tunable
            group["lr"] = self.config.train.lr
        step = int(json.loads((checkpoint / TRAINER_STATE).read_text())["step"])
        self.metrics.rewrite([record for record in self.metrics.read() if record.get("step", -1) < step])
        return step

    # ----- phases ------------------------------------------------------------------------------------------------
    def step_records(self, step: int) -> list[dict[str, Any]]:
        """The prompts of training step ``step``: positions ``[s K, (s + 1) K)`` of the epoch-wise shuffled order
        (a function of ``(seed, epoch)``, so a resumed run draws the same prompts)."""
        records, count = self.train_records, self.config.sample.groups_per_step
        picked = []
        for position in range(step * count, (step + 1) * count):
            epoch, offset = divmod(position, len(records))
            order = list(range(len(records)))
            if self.config.data.shuffle:
                generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "order", epoch))
                order = torch.randperm(len(records), generator=generator).tolist()
            picked.append(records[order[offset]])
        return picked

    def sample(self, step: int) -> list[SelfRewardGroup]:
        """``groups_per_step`` groups of ``group_size`` decoded images, drawn with a generator of ``(seed, step)``."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "sample", step))
        size = self.config.sample.group_size
        return [
            sample_group(self.policy, record["prompt"], record, size, generator)
            for record in self.step_records(step)
        ]

    def score(self, batch: list[SelfRewardGroup]) -> dict[str, float]:
        """Self-rewards of every group; ``reward/*`` statistics."""
        for group in batch:
            score_group(self.policy, group, self.terms)
        rewards = torch.cat([group.reward for group in batch]).double()
        stats = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False))}
        stats["reward/global/mean"] = float(torch.cat([group.global_p for group in batch]).mean())
        for name in batch[0].terms:
            values = torch.cat([group.terms[name] for group in batch]).double()
            stats[f"reward/{name}/mean"] = float(values.mean())
            stats[f"reward/{name}/std"] = float(values.std(unbiased=False))
        return stats

    def advantages(self, batch: list[SelfRewardGroup]) -> dict[str, float]:
        """Group-relative advantages of the shared core, kept on the trainer for ``update``."""
        reward = self.config.reward
        self._advantages = batch_advantages(batch, reward.std_mode, reward.std_eps, reward.advantage_clip)
        values = self._advantages.double()
        zero = sum(float(group.reward.std()) == 0.0 for group in batch) / len(batch)
        return {
            "advantage/mean": float(values.mean()),
            "advantage/std": float(values.std(unbiased=False)),
            "advantage/abs_mean": float(values.abs().mean()),
            "advantage/zero_std_group_fraction": zero,
        }

    def update(self, batch: list[SelfRewardGroup], step: int) -> dict[str, float]:
        """Optimizer updates with the token-level objective over the image tokens."""
        stats = policy_update(
            self.policy,
            self.optimizer,
            batch,
            self._advantages,
            self.settings,
            self.reference,
            self.parameters,
        )
        stats["optim/lr"] = float(self.optimizer.param_groups[0]["lr"])
        return stats

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out prompts, the same fixed-seed draws at every evaluation: own reward, gold rewards, a grid."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "eval"))
        size = self.config.eval.samples_per_prompt
        groups = [sample_group(self.policy, r["prompt"], r, size, generator) for r in self.eval_records]
        for group in groups:
            score_group(self.policy, group, self.terms)
        record: dict[str, Any] = {"eval/reward/mean": float(torch.cat([g.reward for g in groups]).mean())}
        for name in groups[0].terms:
            record[f"eval/reward/{name}"] = float(torch.cat([g.terms[name] for g in groups]).mean())
        for name, reward in self.gold:
            record[f"eval/gold/{name}"] = gold_score(reward, groups)
        pixels = torch.cat([group.pixels for group in groups]).float().cpu()
        save_image_grid(pixels, self.output_dir / EVAL_IMAGES / f"step_{step:05d}.png", columns=size)
        return record

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps: trainable weights and Adam state (accelerate), the step, the config."""

        def write_files(staging: Path) -> None:
            (staging / TRAINER_STATE).write_text(json.dumps({"step": step}))
            (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))

        write_checkpoint(self.accelerator, self.checkpoints, step, self.run_folder.run_id, write_files)

    def describe_run(self) -> list[tuple[str, str]]:
        """The start-up summary's lines."""
        config = self.config
        rewards = ", ".join(f"{term.name} (self) x {term.weight:g}" for term in config.reward.terms)
        gold = ", ".join(term.name for term in config.eval.gold) or "none"
        return [
            ("model", f"{config.model.name_or_path} ({config.model.dtype}, trains {config.model.trainable})"),
            ("algorithm", f"{config.algorithm.name}, kl_coef {config.algorithm.kl_coef:g}"),
            ("rewards", f"{rewards}; gold (not optimised): {gold}"),
            (
                "batch",
                f"{config.sample.groups_per_step} prompts x {config.sample.group_size} images per step; "
                f"updates of {config.samples_per_update}",
            ),  # fmt: skip
            ("device", str(self.accelerator.device)),
            ("output", str(self.output_dir)),
        ]

    def summary(self) -> dict[str, Any]:
        """Records, seconds, first / last training reward and held-out rewards."""
        records = self.metrics.read()
        summary: dict[str, Any] = {
            "steps": float(len(records)),
            "seconds": time.perf_counter() - self.started_at,
        }
        for key in ["reward/mean", "eval/reward/mean"] + sorted(
            {k for r in records for k in r if "gold" in k}
        ):
            values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            if values:
                summary[f"first/{key}"], summary[f"last/{key}"] = values[0], values[-1]
        return summary
