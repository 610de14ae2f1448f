"""The generation update goes the right way: each test fails when the loss, its sign, its scale, the reference,
the step choice or the advantages are wrong, by comparing with a computation written here from the papers.

- learning: a short run on the tiny colour task raises the held-out reward;
- one update: the best sample's log-prob rises and the worst one's falls;
- the update under plain SGD equals ``-lr x`` the gradient of the hand-written objective (sign, the mean over the
  K trained steps and the samples, the KL term to an independently built base model);
- the KL to the reference against a separately built base model (exact and Flow-GRPO estimators);
- the per-prompt tracker against a DDPO tracker written here, over two steps with the prompts reordered;
- clip-high, the variety of the trained steps, DanceGRPO's trainable range.
"""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from trainer_helpers import LEARNING, small_config

from gen_rl.algorithms.options import PolicyGradientOptions
from gen_rl.objective import step_loss
from gen_rl.trainer import GenerationTrainer, StepBatch
from pipelines import FluxSampler
from pipelines.tiny import tiny_flux_pipeline


def test_a_short_run_raises_the_held_out_reward(tmp_path):
    """10 steps of Flow-GRPO on the colour task: held-out reward +0.024 measured (a flipped sign loses ~0.02)."""
    trainer = GenerationTrainer(small_config(tmp_path, *LEARNING, "train.num_steps=10"))
    before = trainer.evaluate(0)["eval/reward/mean"]
    train_rewards = [trainer.run_step(step)["reward/mean"] for step in range(10)]
    after = trainer.evaluate(10)["eval/reward/mean"]
    assert after - before > 0.01, (before, after)
    assert sum(train_rewards[-3:]) / 3 > sum(train_rewards[:3]) / 3


def _recomputed(trainer: GenerationTrainer, rollout, steps: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return trainer.sampler.log_prob(rollout, steps).log_probs.mean(dim=1)


def test_one_update_raises_the_best_samples_log_prob_and_lowers_the_worst(tmp_path):
    config = small_config(tmp_path, "train.optimizer=sgd", "train.lr=0.05", "train.samples_per_update=8")
    trainer = GenerationTrainer(config)
    batch = trainer.sample(0)
    trainer.score(batch)
    trainer.advantages(batch)
    advantages = batch.advantages
    best, worst = int(advantages.argmax()), int(advantages.argmin())
    assert advantages[best] > 0.5 and advantages[worst] < -0.5
    steps = trainer.algorithm.select(batch.rollout, 0)
    before = _recomputed(trainer, batch.rollout, steps)
    trainer.update(batch, 0)
    change = _recomputed(trainer, batch.rollout, steps) - before
    assert change[best] > 0 > change[worst], change
    # and on average, samples move with their advantage
    assert float((change * advantages).sum()) > 0


# ----- the update equals the hand-written objective ------------------------------------------------------------
def _perturb_lora(trainer: GenerationTrainer, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in trainer.sampler.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def _base_sampler() -> FluxSampler:
    """The frozen base model built again from scratch: what the LoRA-disabled reference must equal."""
    sampler = FluxSampler(tiny_flux_pipeline(seed=0, pixel_decoder=True))
    sampler.transformer.requires_grad_(False)
    return sampler


def _flow_grpo_g(sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_1: float, a: float) -> torch.Tensor:
    """Flow-GRPO's std_dev_t: ``a sqrt(s / (1 - s))`` with ``s = 1`` replaced by ``sigmas[1]`` in the denominator."""
    denominator = torch.where(sigma == 1, torch.full_like(sigma, sigma_1), sigma)
    return a * torch.sqrt(sigma / (1 - denominator))


def _hand_objective(trainer, base, rollout, advantages, steps, kl_coef, estimator):
    """``mean_i mean_k [-A_i rho_ik + beta KL_ik]`` written from the Flow-GRPO paper, with ``rho = 1`` at start."""
    old = rollout.log_probs.gather(1, steps)
    out = trainer.sampler.log_prob(rollout, steps)
    rho = torch.exp(out.log_probs - old)
    loss = (-advantages[:, None] * rho).mean()
    if kl_coef:
        with torch.no_grad():
            reference = base.log_prob(rollout, steps)
        rows = torch.arange(len(rollout))[:, None]
        sigma, sigma_next = rollout.sigmas[rows, steps], rollout.sigmas[rows, steps + 1]
        squared = (out.means - reference.means).square().flatten(2).mean(dim=2)  # [B, K]
        g = _flow_grpo_g(sigma, sigma_next, float(rollout.sigmas[0, 1]), rollout.noise_level)
        variance = (
            g**2 * (sigma - sigma_next) if estimator == "gaussian" else g**2
        )  # step variance, or theirs
        loss = loss + kl_coef * (squared / (2 * variance)).mean()
    return loss


@pytest.mark.parametrize(
    ("selection", "kl_coef", "estimator"),
    [
        ("all", 0.0, "gaussian"),
        ("first", 0.0, "gaussian"),
        ("all", 2.0, "gaussian"),
        ("first", 2.0, "flow_grpo"),
    ],
)
def test_sgd_update_equals_minus_lr_times_the_hand_written_gradient(tmp_path, selection, kl_coef, estimator):
    lr = 0.5
    config = small_config(
        tmp_path,
        "train.optimizer=sgd",
        f"train.lr={lr}",
        "train.weight_decay=0",
        "train.max_grad_norm=0",
        "train.samples_per_update=8",  # one update per step, two microbatches of 2 x K backward calls
        f"algorithm.step_selection={selection}",
        "algorithm.step_fraction=0.5",
        f"algorithm.kl_coef={kl_coef}",
        f"algorithm.kl_estimator={estimator}",
        "reward.advantage_clip=null",
    )
    trainer = GenerationTrainer(config)
    _perturb_lora(trainer)  # a policy away from the reference, so the KL and its gradient are not zero
    batch = trainer.sample(0)
    trainer.score(batch)
    trainer.advantages(batch)
    advantages = batch.advantages
    steps = trainer.algorithm.select(batch.rollout, 0)
    assert steps.shape[1] == (2 if selection == "first" else 4)

    parameters = trainer.parameters
    start = [p.detach().clone() for p in parameters]
    expected = _hand_objective(
        trainer, _base_sampler() if kl_coef else None, batch.rollout, advantages, steps, kl_coef, estimator
    )
    gradients = torch.autograd.grad(expected, parameters, allow_unused=True)
    record = trainer.update(batch, 0)
    if kl_coef:
        assert record["loss/kl"] > 0
    num, den = 0.0, 0.0
    for parameter, before, gradient in zip(parameters, start, gradients, strict=True):
        want = torch.zeros_like(before) if gradient is None else -lr * gradient
        num += float((parameter.detach() - before - want).square().sum())
        den += float(want.square().sum())
    assert den > 0
    assert math.sqrt(num / den) < 1e-3, math.sqrt(num / den)


def test_kl_to_the_reference_equals_the_kl_to_a_separately_built_base_model(tmp_path):
    trainer = GenerationTrainer(small_config(tmp_path, "algorithm.kl_coef=0.1"))
    _perturb_lora(trainer)
    batch = trainer.sample(0)
    rollout = batch.rollout
    column = torch.full((len(rollout), 1), 1, dtype=torch.long)
    with torch.no_grad():
        policy = trainer.sampler.log_prob(rollout, column)
        base = _base_sampler().log_prob(rollout, column)
        got = trainer.algorithm.reference_kl(
            trainer.policy, rollout, column, policy.means[:, 0], policy.stds[:, 0]
        )
    sigma, sigma_next = rollout.sigmas[:, 1], rollout.sigmas[:, 2]
    std = rollout.noise_level * torch.sqrt(sigma / (1 - sigma)) * torch.sqrt(sigma - sigma_next)
    squared = (policy.means[:, 0] - base.means[:, 0]).square().flatten(1).mean(dim=1)
    want = squared / (2 * std**2)
    assert float(want.min()) > 1e-6  # the perturbed LoRA moved the policy: a reference with LoRA on gives 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)

    trainer.config.algorithm.kl_estimator = "flow_grpo"
    with torch.no_grad():
        got_flow_grpo = trainer.algorithm.reference_kl(
            trainer.policy, rollout, column, policy.means[:, 0], policy.stds[:, 0]
        )
    g = rollout.noise_level * torch.sqrt(sigma / (1 - sigma))  # Flow-GRPO divides by 2 g^2, not 2 std^2
    torch.testing.assert_close(got_flow_grpo, squared / (2 * g**2), rtol=1e-4, atol=0)


# ----- advantages ----------------------------------------------------------------------------------------------
def _ddpo_tracker(history, prompts, rewards, buffer, min_count, eps=1e-6):
    """DDPO's per-prompt stat tracking, written from the paper: history first, then normalise."""
    batch_mean, batch_std = rewards.mean(), rewards.std(correction=0)
    for prompt, reward in zip(prompts, rewards.tolist(), strict=True):
        history.setdefault(prompt, deque(maxlen=buffer)).append(reward)
    out = []
    for prompt, reward in zip(prompts, rewards.tolist(), strict=True):
        past = torch.tensor(list(history[prompt]), dtype=torch.float64)
        mean, std = (
            (batch_mean, batch_std) if len(past) < min_count else (past.mean(), past.std(correction=0))
        )
        out.append((reward - float(mean)) / (float(std) + eps))
    return torch.tensor(out, dtype=torch.float32)


def test_the_per_prompt_tracker_sees_each_reward_under_its_own_prompt(tmp_path):
    config = small_config(
        tmp_path, "reward.per_prompt_tracker=true", "reward.tracker_min_count=6", "reward.tracker_buffer=8"
    )
    trainer = GenerationTrainer(config)
    options = trainer.rollout_options(0)
    offsets = {"a red hat": 1.0, "a blue car": -2.0, "a red ball": 5.0}
    history: dict = {}
    steps = (["a red hat", "a blue car"], ["a blue car", "a red ball"], ["a red hat", "a red ball"])
    for step, prompts in enumerate(steps):
        rollout = trainer.sampler.rollout(prompts, options, group_size=4, epoch=step)
        members = rollout.members.float()
        rewards = torch.tensor([offsets[p] for p in rollout.prompts]) + 0.3 * members * (step + 1)
        group_ids = torch.arange(2).repeat_interleave(4)
        batch = StepBatch(rollout=rollout, group_ids=group_ids, rewards={"colour": rewards})
        trainer.advantages(batch)
        got = batch.advantages
        want = _ddpo_tracker(history, rollout.prompts, rewards.double(), 8, 6).clamp(-5, 5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----- clipping and step choice ----------------------------------------------------------------------------------
def test_step_loss_clips_above_at_clip_high_and_below_at_clip_low():
    train = PolicyGradientOptions(clip_low=0.1, clip_high=0.5)
    ratios = torch.tensor([1.3, 1.7, 0.85, 0.85, 1.3])
    advantages = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(5, 1)
    log_probs = torch.log(ratios)[:, None].requires_grad_(True)
    loss, stats = step_loss(train, log_probs, old, advantages, torch.ones(5))
    loss.backward()
    # PPO by hand: max(-A rho, -A clip(rho, 0.9, 1.5)); the clipped branch carries no gradient
    clipped = [False, True, True, False, False]
    per_sample = [
        max(-a * r, -a * min(max(r, 0.9), 1.5))
        for a, r in zip(advantages.tolist(), ratios.tolist(), strict=True)
    ]
    assert loss.item() == pytest.approx(sum(per_sample) / 5, rel=1e-6)
    gradient = log_probs.grad[:, 0]
    for index, is_clipped in enumerate(clipped):
        want = 0.0 if is_clipped else -float(advantages[index] * ratios[index]) / 5
        assert float(gradient[index]) == pytest.approx(want, rel=1e-5, abs=1e-8), index
    assert float(stats["policy/clip_fraction"]) == pytest.approx(2 / 5)


def test_random_fraction_draws_new_steps_every_training_step_and_respects_the_trainable_range(tmp_path):
    config = small_config(
        tmp_path,
        "sample.num_steps=8",
        "algorithm.step_selection=random_fraction",
        "algorithm.step_fraction=0.5",
    )
    trainer = GenerationTrainer(config)
    batch = trainer.sample(0)
    draws = torch.stack([trainer.algorithm.select(batch.rollout, step) for step in range(30)])  # [30, B, 4]
    assert draws.shape[1:] == (8, 4)
    first_sample_sets = {tuple(row) for row in draws[:, 0].tolist()}
    assert len(first_sample_sets) >= 20  # of C(8, 4) = 70 subsets, 30 draws repeat rarely
    assert len({tuple(row) for row in draws[0].tolist()}) > 1  # samples differ within a step (DanceGRPO)
    frequency = torch.bincount(draws.flatten(), minlength=8).float() / (30 * 8)
    assert ((frequency - 0.5).abs() < 0.12).all(), frequency  # each step trained about half the time

    trainer.config.algorithm.trainable_steps = (0, 7)  # DanceGRPO never trains the last step
    ranged = torch.stack([trainer.algorithm.select(batch.rollout, step) for step in range(10)])
    assert ranged.shape[-1] == 3 and int(ranged.max()) < 7  # floor(0.5 * 7) = 3 of the first 7 steps


# ----- the other paths the shipped configs use ---------------------------------------------------------------------
def test_a_second_pass_over_the_batch_sees_the_updated_policy_and_clips(tmp_path):
    config = small_config(
        tmp_path, "train.inner_epochs=2", "train.samples_per_update=8", "algorithm.clip_low=1e-5"
    )
    trainer = GenerationTrainer(config)
    record = trainer.run_step(0)
    assert record["optim/updates"] == 2  # one optimizer update per pass
    assert record["policy/ratio_dev_max"] > 1e-5  # the second pass recomputes under the updated weights ...
    assert (
        0 < record["policy/clip_fraction"] <= 0.5
    )  # ... and clips there, never in the first pass (ratio == 1)


def test_full_fine_tuning_updates_the_transformer_weights(tmp_path):
    trainer = GenerationTrainer(small_config(tmp_path, "model.lora=false", "train.lr=1e-3"))
    names = [name for name, p in trainer.sampler.transformer.named_parameters() if p.requires_grad]
    assert names and not any("lora" in name for name in names)
    before = {name: p.detach().clone() for name, p in trainer.sampler.transformer.named_parameters()}
    record = trainer.run_step(0)
    assert record["ratio_check/floor"] <= record["ratio_check/tolerance"]
    changed = [
        name for name, p in trainer.sampler.transformer.named_parameters() if not torch.equal(p, before[name])
    ]
    assert len(changed) > len(names) // 2
