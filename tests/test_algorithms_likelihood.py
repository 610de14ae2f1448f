"""The likelihood-ratio family of issue 16 and DanceGRPO's best-of-N subset, against the papers' equations written
out here on fixed tensors.

A fake policy stands in for the model: each sample's Gaussian step mean is ``mu = base + theta`` (``theta`` the
trained parameter), with the flow SDE's step std ``n = g sqrt(dt)``, ``g = a sqrt(s / (1 - s))`` on a hand grid, so
every quantity of the losses is a closed-form function of known tensors. Each test recomputes the objective from
the paper's formula (with ``torch.distributions.Normal`` for densities, not the package's log-prob) and compares
the loss and its gradient:

- GRPO-Guard: RatioNorm ``rho~ = exp(mean((x - mu_old)(mu - mu_old)) / n)`` and the 1/dt reweighting (both choices);
- Flow-DPPO: the asymmetric divergence mask on hand-arranged cases (dropped / kept far steps, near steps);
- TempFlow-GRPO: the noise-aware weight ``n_k / mean n``; its branch schedule and rollout overrides;
- Flash-GRPO: the rectification weight ``(1 / c_k) / mean (1 / c)`` with ``c = sqrt(dt)/g + g sqrt(dt)(1-s)/(2s)``;
  its stratified schedule visits every candidate step once per block;
- best-of-N: hand-picked rewards, the top and bottom k of each group train with unchanged advantages.

Learning-direction tests run each algorithm for a few steps on the colour demo and check the held-out reward rises.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from gen_rl.algorithms.base import LossBatch
from gen_rl.algorithms.flash_grpo import FlashGRPO
from gen_rl.algorithms.flow_dppo import FlowDPPO
from gen_rl.algorithms.grpo_guard import GRPOGuard
from gen_rl.algorithms.options import PolicyGradientOptions
from gen_rl.algorithms.options_likelihood import (
    FlashGRPOOptions,
    FlowDPPOOptions,
    GRPOGuardOptions,
    TempFlowGRPOOptions,
)
from gen_rl.algorithms.policy_gradient import PolicyGradient, best_of_n_mask
from gen_rl.algorithms.tempflow_grpo import TempFlowGRPO
from pipelines.sde import flow_step_unchecked

BATCH, STEPS, DIM = 6, 4, 12
SIGMAS = torch.tensor([1.0, 0.85, 0.6, 0.3, 0.0])
NOISE_LEVEL = 0.7


def flow_grpo_g(sigma: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient ``a sqrt(s / (1 - s))``, ``s = 1`` replaced by ``sigmas[1]`` below."""
    denominator = torch.where(sigma == 1, torch.full_like(sigma, float(SIGMAS[1])), sigma)
    return NOISE_LEVEL * torch.sqrt(sigma / (1 - denominator))


def step_std(step: torch.Tensor) -> torch.Tensor:
    sigma, sigma_next = SIGMAS[step], SIGMAS[step + 1]
    return flow_grpo_g(sigma) * torch.sqrt(sigma - sigma_next)


@dataclass
class Record:
    """The rollout fields the losses read."""

    latents: torch.Tensor  # [B, S+1, D]
    log_probs: torch.Tensor  # [B, S]
    sigmas: torch.Tensor  # [B, S+1]
    base: torch.Tensor  # [B, S, D] the step means of theta = 0
    alpha_bars: None = None
    sde_type: str = "flow_grpo"
    noise_level: float = NOISE_LEVEL

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]


class FakeSampler:
    """``log_prob``: mean ``base + theta``, std of the flow SDE; ``_levels`` / ``_transition``: the real flow step."""

    def __init__(self, theta: nn.Parameter) -> None:
        self.theta = theta

    def log_prob(self, part: Record, column: torch.Tensor):
        from pipelines.base import StepLogProbs
        from pipelines.sde import gaussian_log_prob

        rows = torch.arange(len(part))
        steps = column[:, 0]
        means = part.base[rows, steps] + self.theta
        stds = step_std(steps)
        log_probs = gaussian_log_prob(part.latents[rows, steps + 1], means, stds)
        return StepLogProbs(log_probs[:, None], means[:, None], stds[:, None])

    def _levels(self, sigmas, alpha_bars):
        return sigmas

    def _transition(self, sde_type, latents, output, level, level_next, noise_level, noise, next_sample):
        return flow_step_unchecked(sde_type)(
            latents, output, level, level_next, noise_level, noise, next_sample
        )


class FakePolicy:
    def __init__(self, theta: nn.Parameter) -> None:
        self.sampler = FakeSampler(theta)
        self.parameters = [theta]

    @contextmanager
    def swapped(self, tensors):
        saved = self.parameters[0].detach().clone()
        with torch.no_grad():
            self.parameters[0].copy_(tensors[0])
        try:
            yield
        finally:
            with torch.no_grad():
                self.parameters[0].copy_(saved)


def make_case(seed: int = 0, shift: float = 0.05):
    """A record sampled by theta_old, and a policy whose theta has moved by ``shift``-sized steps since."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(BATCH, STEPS, DIM, generator=generator)
    theta_old = 0.1 * torch.randn(BATCH, DIM, generator=generator)
    noise = torch.randn(BATCH, STEPS, DIM, generator=generator)
    stds = step_std(torch.arange(STEPS))
    old_means = base + theta_old[:, None]
    latents = torch.zeros(BATCH, STEPS + 1, DIM)
    latents[:, 1:] = old_means + stds[None, :, None] * noise
    log_probs = Normal(old_means, stds[None, :, None]).log_prob(latents[:, 1:]).mean(dim=2)
    record = Record(latents, log_probs, SIGMAS.expand(BATCH, -1).clone(), base)
    theta = nn.Parameter(theta_old + shift * torch.randn(BATCH, DIM, generator=generator))
    return record, theta_old, theta


def sampled_then_updated(algorithm, theta_old: torch.Tensor, theta: nn.Parameter) -> FakePolicy:
    """The algorithm saw the rollout with theta_old, then one optimizer update moved it to theta."""
    policy = FakePolicy(theta)
    current = theta.detach().clone()
    with torch.no_grad():
        theta.copy_(theta_old)
    algorithm.rollout_context(policy)
    with torch.no_grad():
        theta.copy_(current)
    algorithm.after_update(policy)
    return policy


def clipped(advantages, ratio, low, high):
    """PPO's clipped surrogate to minimise (PPO eq. 7)."""
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - low, 1 + high))


def gradient(loss: torch.Tensor, theta: nn.Parameter) -> torch.Tensor:
    return torch.autograd.grad(loss, theta)[0]


ADVANTAGES = torch.tensor([1.5, -0.7, 0.3, -1.2, 2.0, -0.1])
WEIGHT = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # sample 2's reward was dropped


# ----- GRPO-Guard ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reweight", ["inverse_dt", "none"])
def test_grpo_guard_equals_ratio_norm_and_step_reweighting(reweight):
    record, theta_old, theta = make_case()
    options = GRPOGuardOptions(name="grpo_guard", clip_low=0.005, clip_high=0.015, step_reweight=reweight)
    algorithm = GRPOGuard(options, seed=0, num_steps=STEPS)
    policy = sampled_then_updated(algorithm, theta_old, theta)
    steps = torch.tensor([0, 1, 2, 3, 1, 0])
    batch = LossBatch(record, steps[:, None], ADVANTAGES, WEIGHT, step=0)
    loss, stats = algorithm.loss(batch, policy)

    # the paper's RatioNorm: with x = mu_old + n eps, log rho~ = mean(eps (mu - mu_old))
    rows = torch.arange(BATCH)
    x = record.latents[rows, steps + 1]
    mu_old = record.base[rows, steps] + theta_old
    mu = record.base[rows, steps] + theta
    n = step_std(steps)
    eps = (x - mu_old) / n[:, None]
    ratio = torch.exp((eps * (mu - mu_old)).mean(dim=1))
    dt = SIGMAS[steps] - SIGMAS[steps + 1]
    step_weight = 1 / dt if reweight == "inverse_dt" else torch.ones(BATCH)
    expected = (WEIGHT * step_weight * clipped(ADVANTAGES, ratio, 0.005, 0.015)).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7), (loss, expected)
    assert torch.allclose(gradient(loss, theta), gradient(expected, theta), rtol=1e-4, atol=1e-7)
    # the case exercises both clip branches and unclipped samples
    assert 0 < float(stats["policy/clip_fraction"]) < 1
    # the plain Flow-GRPO ratio differs (the normalisation matters here)
    plain = torch.exp(
        Normal(mu, n[:, None]).log_prob(x).mean(dim=1) - Normal(mu_old, n[:, None]).log_prob(x).mean(dim=1)
    )
    assert not torch.allclose(plain, ratio, atol=1e-3)


def test_grpo_guard_before_any_update_has_ratio_one_and_needs_no_extra_forward():
    record, theta_old, _ = make_case()
    theta = nn.Parameter(theta_old.clone())
    algorithm = GRPOGuard(GRPOGuardOptions(name="grpo_guard", clip_low=0.02), seed=0, num_steps=STEPS)
    policy = FakePolicy(theta)
    algorithm.rollout_context(policy)
    calls = []
    log_prob = policy.sampler.log_prob
    policy.sampler.log_prob = lambda *args: calls.append(1) or log_prob(*args)
    steps = torch.tensor([[1]] * BATCH)
    _, stats = algorithm.loss(LossBatch(record, steps, ADVANTAGES, WEIGHT, step=0), policy)
    assert len(calls) == 1 and float(stats["policy/ratio_dev_max"]) < 1e-6


# ----- Flow-DPPO -------------------------------------------------------------------------------------------------
def dppo_case():
    """A case whose 4 farthest steps hold 2 rising and 2 falling ratios, its KL, log-ratios and threshold."""
    steps = torch.tensor([0, 1, 2, 3, 1, 2])
    rows = torch.arange(BATCH)
    for seed in range(50):
        record, theta_old, theta = make_case(seed=seed, shift=0.2)
        x = record.latents[rows, steps + 1]
        mu_old = record.base[rows, steps] + theta_old
        mu = record.base[rows, steps] + theta.detach()
        n = step_std(steps)[:, None]
        kl = ((mu - mu_old) ** 2 / (2 * n**2)).mean(dim=1)  # paper eq. 14, mean over elements
        log_ratio = Normal(mu, n).log_prob(x).mean(dim=1) - Normal(mu_old, n).log_prob(x).mean(dim=1)
        order = torch.argsort(kl)
        if int((log_ratio[order[2:]] > 0).sum()) == 2:
            threshold = float((kl[order[1]] + kl[order[2]]) / 2)
            return record, theta_old, theta, steps, kl, log_ratio, order, threshold
    raise AssertionError("no seed gives the four far cases")


def test_flow_dppo_drops_only_far_over_aggressive_steps():
    record, theta_old, theta, steps, kl, log_ratio, order, threshold = dppo_case()
    rows = torch.arange(BATCH)
    far = kl >= threshold
    # every case once: far rising / falling x aggressive / corrective, and two near steps (one of each)
    advantages = torch.empty(BATCH)
    cases = {}
    seen: dict[tuple[bool, bool], int] = {}
    for position, row in enumerate(order.tolist()):
        up = bool(log_ratio[row] > 0)
        key = (bool(far[row]), up)
        aggressive = seen.get(key, 0) == 0 if key[0] else position == 0
        seen[key] = seen.get(key, 0) + 1
        sign = 1.0 if up == aggressive else -1.0  # aggressive: the ratio moves the way A pushes
        advantages[row] = sign * (0.5 + position / 10)
        cases[row] = (bool(far[row]), up, aggressive)
    expected_drop = torch.tensor([cases[row][0] and cases[row][2] for row in range(BATCH)])
    dropped = {(cases[row][1]) for row in range(BATCH) if expected_drop[row]}
    assert int(expected_drop.sum()) == 2 and dropped == {True, False}  # one per clause of eq. 18
    x = record.latents[rows, steps + 1]
    mu_old = record.base[rows, steps] + theta_old
    n = step_std(steps)[:, None]

    options = FlowDPPOOptions(name="flow_dppo", kl_threshold=threshold)
    algorithm = FlowDPPO(options, seed=0, num_steps=STEPS)
    policy = sampled_then_updated(algorithm, theta_old, theta)
    weight = torch.ones(BATCH)
    loss, stats = algorithm.loss(LossBatch(record, steps[:, None], advantages, weight, step=0), policy)

    mu_grad = record.base[rows, steps] + theta
    ratio = torch.exp(Normal(mu_grad, n).log_prob(x).mean(dim=1) - Normal(mu_old, n).log_prob(x).mean(dim=1))
    expected = torch.where(expected_drop, torch.zeros(BATCH), -advantages * ratio).mean()  # paper eq. 18
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7), (loss, expected)
    assert torch.allclose(gradient(loss, theta), gradient(expected, theta), rtol=1e-4, atol=1e-7)
    assert float(stats["policy/clip_fraction"]) == pytest.approx(2 / BATCH)
    assert float(stats["dppo/kl_old_max"]) == pytest.approx(float(kl.max()), rel=1e-5)
    # no clipping: far from the trust region, a kept step's gradient is not cut (unlike PPO's clip)
    kept_far = [r for r in range(BATCH) if cases[r][0] and not cases[r][2]]
    assert len(kept_far) == 2 and max(abs(float(ratio[r].detach()) - 1) for r in kept_far) > 0.02


# ----- TempFlow-GRPO ---------------------------------------------------------------------------------------------
def test_tempflow_noise_aware_weight_on_the_branch_step():
    record, theta_old, theta = make_case(seed=2)
    options = TempFlowGRPOOptions(name="tempflow_grpo", clip_low=0.05, branch_steps=(0, 1, 2))
    algorithm = TempFlowGRPO(options, seed=0, num_steps=STEPS)
    policy = FakePolicy(theta)
    steps = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = algorithm.loss(LossBatch(record, steps[:, None], ADVANTAGES, WEIGHT, step=0), policy)

    rows = torch.arange(BATCH)
    x = record.latents[rows, steps + 1]
    mu = record.base[rows, steps] + theta
    n = step_std(steps)
    old = record.log_probs[rows, steps]
    ratio = torch.exp(Normal(mu, n[:, None]).log_prob(x).mean(dim=1) - old)
    noise_weight = n / step_std(torch.tensor([0, 1, 2])).mean()  # n_k / mean over the branch points
    expected = (WEIGHT * noise_weight * clipped(ADVANTAGES, ratio, 0.05, 0.05)).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gradient(loss, theta), gradient(expected, theta), rtol=1e-4, atol=1e-7)
    assert noise_weight[0] > noise_weight[2]  # early (high-noise) steps weigh more on this grid


def test_tempflow_branches_once_per_training_step_from_a_shared_prefix():
    algorithm = TempFlowGRPO(
        TempFlowGRPOOptions(name="tempflow_grpo", branch_steps=(0, 1, 2)), seed=5, num_steps=STEPS
    )
    drawn = [algorithm.branch_step(step) for step in range(30)]
    assert set(drawn) == {0, 1, 2}
    assert drawn == [algorithm.branch_step(step) for step in range(30)]  # reproducible from (seed, step)
    for step in range(5):
        branch = algorithm.branch_step(step)
        assert algorithm.sampling(step) == {"sde_window": (branch, branch + 1), "share_initial_noise": True}


# ----- Flash-GRPO ------------------------------------------------------------------------------------------------
def test_flash_rectification_weight_neutralises_the_step_factor():
    record, _, theta = make_case(seed=3)
    options = FlashGRPOOptions(name="flash_grpo", clip_low=0.05, flash_steps=(0, 3))
    algorithm = FlashGRPO(options, seed=0, num_steps=STEPS)
    policy = FakePolicy(theta)
    steps = torch.tensor([0, 1, 2, 2, 1, 0])
    loss, _ = algorithm.loss(LossBatch(record, steps[:, None], ADVANTAGES, WEIGHT, step=0), policy)

    def factor(step: torch.Tensor) -> torch.Tensor:
        """c_k = sqrt(dt)/g + g sqrt(dt)(1 - s)/(2 s) (the reference's 1 / coe)."""
        s = SIGMAS[step]
        dt = s - SIGMAS[step + 1]
        g = flow_grpo_g(s)
        return torch.sqrt(dt) / g + g * torch.sqrt(dt) * (1 - s) / (2 * s)

    inverse = 1 / factor(steps)
    rectify = inverse / (1 / factor(torch.tensor([0, 1, 2]))).mean()
    rows = torch.arange(BATCH)
    mu = record.base[rows, steps] + theta
    n = step_std(steps)[:, None]
    log_density = Normal(mu, n).log_prob(record.latents[rows, steps + 1]).mean(dim=1)
    ratio = torch.exp(log_density - record.log_probs[rows, steps])
    expected = (WEIGHT * rectify * clipped(ADVANTAGES, ratio, 0.05, 0.05)).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gradient(loss, theta), gradient(expected, theta), rtol=1e-4, atol=1e-7)
    # the rectified gradient of log p w.r.t. the model output is the same size at every step: c_k lambda_k const
    assert torch.allclose(factor(steps) * rectify, (factor(steps) * rectify)[0].expand(BATCH), rtol=1e-5)


def test_flash_steps_are_stratified_over_training_steps():
    algorithm = FlashGRPO(FlashGRPOOptions(name="flash_grpo", flash_steps=(0, 3)), seed=1, num_steps=STEPS)
    blocks = [[algorithm.flash_step(block * 3 + i) for i in range(3)] for block in range(6)]
    assert all(sorted(block) == [0, 1, 2] for block in blocks)  # each block visits every step once
    assert len({tuple(block) for block in blocks}) > 1  # in a drawn order
    assert algorithm.sampling(4) == {"sde_window": (blocks[1][1], blocks[1][1] + 1)}


# ----- best-of-N ---------------------------------------------------------------------------------------------------
def test_best_of_n_trains_the_top_and_bottom_k_of_each_group_with_unchanged_advantages():
    # two groups of 6, hand-picked rewards; advantages = (r - group mean) / group std
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7, 0.4, 3.0, 1.0, 2.0, 5.0, 4.0, 0.0])
    group_ids = torch.tensor([0] * 6 + [1] * 6)
    grouped = rewards.view(2, 6)
    advantages = (
        (grouped - grouped.mean(1, keepdim=True)) / grouped.std(1, correction=0, keepdim=True)
    ).flatten()
    chosen = best_of_n_mask(advantages, group_ids, k=2)
    # group 0: top 0.9, 0.7 / bottom 0.1, 0.2; group 1: top 5.0, 4.0 / bottom 0.0, 1.0
    assert torch.nonzero(chosen).flatten().tolist() == [0, 1, 3, 4, 7, 9, 10, 11]

    options = PolicyGradientOptions(name="flow_grpo", best_of_n_k=2)
    algorithm = PolicyGradient(options, seed=0, num_steps=STEPS)
    units = torch.tensor([[0, 1, 2]] * 12)
    unit_advantages, weights = algorithm.unit_advantages(None, group_ids, advantages, units)
    assert torch.equal(unit_advantages, advantages[:, None].expand(-1, 3))  # no renormalisation
    assert torch.equal(weights, chosen[:, None].float().expand(-1, 3))
    assert torch.equal(best_of_n_mask(advantages, group_ids, k=3), torch.ones(12, dtype=torch.bool))
    # without the option every sample trains
    plain = PolicyGradient(PolicyGradientOptions(name="flow_grpo"), seed=0, num_steps=STEPS)
    assert torch.equal(plain.unit_advantages(None, group_ids, advantages, units)[1], torch.ones(12, 3))


def test_best_of_n_is_checked_against_the_group_size(tmp_path):
    from trainer_helpers import small_config

    from gen_rl.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"best_of_n_k \(3\) .* 1 <= 2k <= sample.group_size \(4\)"):
        small_config(tmp_path, "algorithm.best_of_n_k=3")


def test_the_weights_of_this_file_are_not_degenerate():
    """The hand grid gives distinct noise and factor values per step (so a swapped step would be caught)."""
    stds = step_std(torch.arange(STEPS))
    assert len({round(float(v), 6) for v in stds}) == STEPS
    assert math.isfinite(float(stds.sum()))


# ----- learning direction on the colour demo ---------------------------------------------------------------------
# trainer_helpers.LEARNING (4 groups of 8 per step, updates of 16) for 10 steps, as Flow-GRPO's own learning test
# (tests/test_trainer_update.py: +0.024); the held-out reward over 6 prompts x 2 must rise by MIN_RISE
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("grpo_guard", ()),
        ("flow_dppo", ()),
        ("tempflow_grpo", ()),
        ("flash_grpo", ()),
        (
            "flow_grpo",
            ("algorithm.best_of_n_k=2",),
        ),  # best-of-N: the best 2 and the worst 2 of each group of 8
    ],
)
def test_a_short_run_raises_the_held_out_reward(tmp_path, name, overrides):
    """Held-out reward 0.4136 -> GRPO-Guard 0.4895, Flow-DPPO 0.4281, TempFlow-GRPO 0.4542, Flash-GRPO 0.4693,
    best-of-N 0.4374 in 10 steps (Flow-GRPO itself: 0.4136 -> 0.4420)."""
    from trainer_helpers import LEARNING, small_config

    from gen_rl.trainer import GenerationTrainer

    config = small_config(tmp_path, *LEARNING, "train.num_steps=10", f"algorithm.name={name}", *overrides)
    trainer = GenerationTrainer(config)
    before = trainer.evaluate(0)["eval/reward/mean"]
    train_rewards = [trainer.run_step(step)["reward/mean"] for step in range(10)]
    after = trainer.evaluate(10)["eval/reward/mean"]
    print(
        f"{name} {overrides} held-out {before:.4f} -> {after:.4f}; train {[round(r, 4) for r in train_rewards]}"
    )
    assert after - before > MIN_RISE, (before, after)


MIN_RISE = 0.01  # Flow-GRPO's own test asks the same; measured +0.015 (Flow-DPPO) to +0.076 (GRPO-Guard)
