"""Reward backprop (gen_rl/algorithms/reward_backprop.py): DRaFT-K, ReFL and partial-chain editing.

The linear velocity model of test_algorithms_matching behind a fake sampler whose decoder is sigmoid(latents)
(pixels [B, 3, 3, 3]) and the real, differentiable colour reward. The independent side unrolls the Euler ODE
x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i) by hand and writes the colour score out:

- DRaFT-K: from the stored latent at S - K, K steps with gradients; the loss -sum_kept r / B and its gradient
  equal the hand computation, with and without gradient checkpointing; the chain recomputed from x_0 reproduces
  the rollout's own x0 exactly (the ODE the rollout ran);
- ReFL: r(decode(x_t - sigma_t v(x_t))) at each sample's step;
- partial edit: x0 noised to S - edit_steps with the batch generator's noise, denoised, gradients only through
  the last grad_steps steps;
- reward weights scale the loss; a dropped sample contributes nothing; a reward that does not declare
  ``differentiable = True`` is refused at start-up with one line;
- each of the three raises the held-out reward of the CPU colour demo.

Mutation tried: loss = +sum r / B (sign flip) turns the equality tests red and the training tests fail.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_algorithms_matching import (
    BATCH,
    NOISE_SEED,
    PROMPTS,
    STEPS,
    FakePolicy,
    LinearVelocity,
    leaves,
    make_batch,
    make_rollout,
    run_demo,
    velocity_of,
)

from gen_rl.algorithms.base import LossBatch
from gen_rl.algorithms.options_matching import DraftOptions, PartialEditOptions, ReFLOptions
from gen_rl.algorithms.reward_backprop import DRaFT, PartialEdit, ReFL
from gen_rl.core.config import ConfigError
from rewards import build_reward

TARGETS = {"a red ball": torch.tensor([1.0, 0.0, 0.0]), "a blue car": torch.tensor([0.0, 0.0, 1.0])}
SAMPLE = SimpleNamespace(cfg_scale=1.0, group_size=2)


def ode_rollout(params) -> object:
    """A rollout whose trajectory is the Euler ODE of the linear model with ``params`` from random x_0."""
    rollout = make_rollout()
    embeds = rollout.conditioning["prompt_embeds"]
    latents = [rollout.latents[:, 0]]
    for i in range(STEPS):
        x = latents[-1]
        velocity = velocity_of(params, x, rollout.timesteps[:, i], embeds)
        latents.append(x + (rollout.sigmas[:, i + 1] - rollout.sigmas[:, i]).view(-1, 1, 1, 1) * velocity)
    rollout.latents = torch.stack(latents, dim=1).detach()
    return rollout


def colour_score(latents, prompts):
    """The colour reward written out: 1 - mean over pixels of ||sigmoid(x) - target|| / sqrt 3."""
    pixels = torch.sigmoid(latents)
    targets = torch.stack([TARGETS[p] for p in prompts]).view(-1, 3, 1, 1)
    return 1.0 - (pixels - targets).square().sum(dim=1).sqrt().mean(dim=(1, 2)) / math.sqrt(3.0)


def euler(params, x, rollout, index, rows):
    embeds = rollout.conditioning["prompt_embeds"][rows]
    velocity = velocity_of(params, x, rollout.timesteps[rows, index], embeds)
    return x + (rollout.sigmas[rows, index + 1] - rollout.sigmas[rows, index]).view(-1, 1, 1, 1) * velocity


def prepared(algorithm, weights=None):
    model = LinearVelocity(seed=1)
    policy = FakePolicy(model)
    if weights is not None:
        policy.reward_weights = weights
    algorithm.check(SimpleNamespace(family="flux"), {"colour": build_reward("colour")}, SAMPLE)
    return policy, ode_rollout([param.detach() for param in model.parameters()])


def assert_same(loss, policy, expected, current):
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    for param, grad in zip(policy.parameters, torch.autograd.grad(expected, current), strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("grad_steps", [1, 3])
def test_draft_loss_and_gradient_equal_the_unrolled_chain(grad_steps, checkpointing):
    algorithm = DRaFT(
        DraftOptions(name="draft", grad_steps=grad_steps, checkpointing=checkpointing),
        seed=0,
        num_steps=STEPS,
    )
    policy, rollout = prepared(algorithm, {"colour": 2.0})
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0])  # sample 2 dropped
    loss, _ = algorithm.loss(make_batch(rollout, weight=weight), policy)
    loss.backward()

    current = leaves(policy.parameters)
    kept = torch.tensor([0, 1, 3])
    x = rollout.latents[kept, STEPS - grad_steps]
    for index in range(STEPS - grad_steps, STEPS):
        x = euler(current, x, rollout, index, kept)
    expected = -2.0 * colour_score(x, [PROMPTS[i] for i in kept]).sum() / BATCH
    assert_same(loss, policy, expected, current)


def test_the_recomputed_chain_reproduces_the_rollouts_own_x0():
    algorithm = DRaFT(DraftOptions(name="draft", grad_steps=STEPS), seed=0, num_steps=STEPS)
    policy, rollout = prepared(algorithm)
    clean = algorithm.denoise(policy, rollout, rollout.latents[:, 0].float(), 0, 0, checkpointing=True)
    torch.testing.assert_close(clean, rollout.latents[:, -1], rtol=1e-6, atol=1e-6)


def test_refl_rewards_the_one_step_prediction_from_each_samples_step():
    algorithm = ReFL(ReFLOptions(name="refl"), seed=0, num_steps=STEPS)
    policy, rollout = prepared(algorithm)
    units = torch.tensor([[2], [3], [2], [3]])
    loss, _ = algorithm.loss(make_batch(rollout, units=units), policy)
    loss.backward()

    current = leaves(policy.parameters)
    rows = torch.arange(BATCH)
    x_t = rollout.latents[rows, units[:, 0]]
    sigma = rollout.sigmas[rows, units[:, 0]].view(-1, 1, 1, 1)
    velocity = velocity_of(
        current, x_t, rollout.timesteps[rows, units[:, 0]], rollout.conditioning["prompt_embeds"]
    )
    expected = -colour_score(x_t - sigma * velocity, PROMPTS).sum() / BATCH
    assert_same(loss, policy, expected, current)
    drawn = algorithm.select(rollout, step=5)
    assert drawn.shape == (BATCH, 1) and int(drawn.min()) >= STEPS // 2 and int(drawn.max()) < STEPS


@pytest.mark.parametrize("grad_steps", [None, 1])
def test_partial_edit_noises_x0_to_the_edit_point_and_denoises_with_gradients(grad_steps):
    options = PartialEditOptions(name="partial_edit", edit_steps=2, grad_steps=grad_steps)
    algorithm = PartialEdit(options, seed=0, num_steps=STEPS)
    policy, rollout = prepared(algorithm)
    loss, _ = algorithm.loss(make_batch(rollout), policy)
    loss.backward()

    current = leaves(policy.parameters)
    rows = torch.arange(BATCH)
    start = STEPS - 2
    x0 = rollout.latents[:, -1]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    sigma = rollout.sigmas[:, start].view(-1, 1, 1, 1)
    x = (1 - sigma) * x0 + sigma * eps
    for index in range(start, STEPS):
        if grad_steps == 1 and index == start:
            x = euler([p.detach() for p in current], x, rollout, index, rows)
        else:
            x = euler(current, x, rollout, index, rows)
    expected = -colour_score(x, PROMPTS).sum() / BATCH
    assert_same(loss, policy, expected, current)


@pytest.mark.parametrize("name", ["draft", "refl", "partial_edit"])
def test_a_reward_that_is_not_differentiable_is_refused_with_one_line(name):
    algorithm = {"draft": DRaFT, "refl": ReFL, "partial_edit": PartialEdit}[name](
        {"draft": DraftOptions, "refl": ReFLOptions, "partial_edit": PartialEditOptions}[name](name=name),
        seed=0,
        num_steps=STEPS,
    )
    rewards = {"colour": build_reward("colour"), "jpeg_compressibility": build_reward("jpeg_compressibility")}
    with pytest.raises(ConfigError, match="reward 'jpeg_compressibility' is not differentiable") as error:
        algorithm.check(SimpleNamespace(family="flux"), rewards, SAMPLE)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="Use a FLUX or SD3 model"):
        algorithm.check(
            SimpleNamespace(family="sd", step_kinds=("ddim",)), {"colour": rewards["colour"]}, SAMPLE
        )
    algorithm.check(SimpleNamespace(family="flux"), {"colour": rewards["colour"]}, SAMPLE)
    assert algorithm.sampling(0) == {"noise_level": 0.0}


def test_the_trainer_refuses_a_non_differentiable_reward_before_training(tmp_path):
    from test_algorithms_matching import DEMOS
    from trainer_helpers import small_config

    from gen_rl.trainer import GenerationTrainer

    config = small_config(
        tmp_path, "reward.terms=[{name: jpeg_compressibility}]", base_config=DEMOS / "draft.yaml"
    )
    with pytest.raises(ConfigError, match="reward 'jpeg_compressibility' is not differentiable"):
        GenerationTrainer(config)


def test_loss_batch_without_a_generator_still_draws_reproducible_edit_noise():
    algorithm = PartialEdit(PartialEditOptions(name="partial_edit"), seed=0, num_steps=STEPS)
    policy, rollout = prepared(algorithm)
    batch = LossBatch(
        rollout, torch.zeros(BATCH, 1, dtype=torch.long), torch.zeros(BATCH), torch.ones(BATCH), 2
    )
    first, _ = algorithm.loss(batch, policy)
    second, _ = algorithm.loss(batch, policy)
    torch.testing.assert_close(first, second)


# ----- through the generation trainer ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["draft", "refl", "partial_edit"])
def test_reward_backprop_through_the_trainer_raises_the_held_out_reward(tmp_path, name):
    """4 steps on the colour demo (ODE rollouts, gradients of the colour reward): the held-out reward rises."""
    _, before, after, train = run_demo(tmp_path, name, 4)
    assert after - before > 0.02, (name, before, after)
    assert train[-1] > train[0]
