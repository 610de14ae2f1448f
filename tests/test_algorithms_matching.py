"""AWM, DGPO, SFT and few-step GRPO (gen_rl/algorithms/{awm,dgpo,sft,few_step}.py) against the papers' equations
written out here as plain tensor maths, and through the generation trainer on the CPU colour demo.

A tiny linear velocity model behind a minimal policy (sampler.predict_velocity / encode_prompts / encode,
parameters, swapped, reference) stands in for the transformer, so every velocity is a closed-form function of
known weights and the independent side recomputes each loss from those weights:

- AWM: rho = exp(l_old - l_theta) at shared (t, eps), l = w(t) mean (v - (eps - x0))^2, PPO's clipped surrogate,
  mean over samples, plus the KL; at rho = 1 its gradient is the advantage-weighted matching gradient;
- DGPO: z_g = beta / G sum_g A_i (l_theta,i - l_ref,i) with group-shared noise, L = mean_g softplus(z_g); its
  gradient is beta x the gradient of the reference code's surrogate mean_i sigmoid(sg z_g) A_i l_theta,i;
- SFT: the flow-matching loss on encoded reference images with their prompts' embeddings;
- few_step_grpo: the few-step checks refuse a long grid, CFG and a partial step selection.

Mutations tried (each turns the equality tests red): AWM ratio exp(l_theta - l_old) (sign flip); DGPO
softplus(-z) (sign flip); SFT target x0 - eps (sign flip).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional
from trainer_helpers import LEARNING, small_config

from gen_rl.algorithms import build_algorithm
from gen_rl.algorithms.awm import AWM
from gen_rl.algorithms.base import LossBatch
from gen_rl.algorithms.dgpo import DGPO
from gen_rl.algorithms.few_step import FewStepGRPO
from gen_rl.algorithms.options_matching import AWMOptions, DGPOOptions, DiffusionDPOOptions, SFTOptions
from gen_rl.algorithms.sft import SFT
from gen_rl.core.config import ConfigError
from pipelines.base import Rollout

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ROOT / "configs" / "demo" / "algorithms"
BATCH, STEPS, CHANNELS, SIDE, EMBED = 4, 4, 3, 3, 5
DIM = CHANNELS * SIDE * SIDE
NOISE_SEED = 11


# ----- a tiny deterministic velocity model behind a minimal Policy ---------------------------------------------
class LinearVelocity(nn.Module):
    """v = W flatten(x) + b + (timestep / 1000) u + P embedding, reshaped like x."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(0.3 * torch.randn(DIM, DIM, generator=generator))
        self.bias = nn.Parameter(0.3 * torch.randn(DIM, generator=generator))
        self.time = nn.Parameter(torch.randn(DIM, generator=generator))
        self.text = nn.Parameter(0.3 * torch.randn(DIM, EMBED, generator=generator))

    def forward(self, latents, timesteps, embeds):
        return velocity_of(list(self.parameters()), latents, timesteps, embeds)


def velocity_of(params, latents, timesteps, embeds):
    """The linear model as a function of explicit weights (the independent side of the tests uses this)."""
    mix, bias, time, text = params
    flat = latents.flatten(1) @ mix.T + bias + (timesteps / 1000.0)[:, None] * time + embeds @ text.T
    return flat.view_as(latents)


def prompt_embedding(prompt: str) -> torch.Tensor:
    """A fixed embedding [EMBED] per prompt text (the fake text encoder)."""
    generator = torch.Generator().manual_seed(sum(ord(char) * (i + 1) for i, char in enumerate(prompt)))
    return torch.randn(EMBED, generator=generator)


class FakeSampler:
    """Flow sampler stand-in: velocity, prompt encoding, pixel <-> latent maps (latent = 2 pixel - 1)."""

    family = "flux"
    device = torch.device("cpu")

    def __init__(self, model: LinearVelocity) -> None:
        self.model = model
        self.cfg_scales: list[float] = []

    def predict_velocity(self, latents, timesteps, conditioning, cfg_scale, image_size):
        self.cfg_scales.append(cfg_scale)
        return self.model(latents, timesteps, conditioning["prompt_embeds"])

    def encode_prompts(self, prompts, options, num_per_prompt):
        assert options.cfg_scale == 1.0
        embeds = torch.stack([prompt_embedding(p) for p in prompts for _ in range(num_per_prompt)])
        return {"prompt_embeds": embeds}

    def encode(self, pixels, generator=None):
        return pixels * 2.0 - 1.0

    def decode(self, latents, image_size):
        return torch.sigmoid(latents)


class FakePolicy:
    """The Policy protocol over the linear model; the reference is a separately seeded set of weights."""

    def __init__(self, model: LinearVelocity, reference: list[torch.Tensor] | None = None) -> None:
        self.sampler = FakeSampler(model)
        self.parameters = list(model.parameters())
        self.reference_tensors = reference or [param.detach().clone() for param in self.parameters]

    @contextmanager
    def swapped(self, tensors):
        backup = [param.detach().clone() for param in self.parameters]
        with torch.no_grad():
            for param, tensor in zip(self.parameters, tensors, strict=True):
                param.copy_(tensor)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.parameters, backup, strict=True):
                    param.copy_(saved)

    @contextmanager
    def reference(self):
        with torch.no_grad(), self.swapped(self.reference_tensors):
            yield


PROMPTS = ["a red ball", "a red ball", "a blue car", "a blue car"]


def make_rollout(seed: int = 0) -> Rollout:
    """A rollout record with hand-made tensors: trajectory [B, S+1, C, H, W], a shifted grid ending at 0."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.25, 0.0]).expand(BATCH, -1).clone()
    return Rollout(
        latents=torch.randn(BATCH, STEPS + 1, CHANNELS, SIDE, SIDE, generator=generator),
        sigmas=sigmas,
        timesteps=sigmas[:, :STEPS] * 1000,
        log_probs=torch.full((BATCH, STEPS), float("nan")),
        stochastic=torch.zeros(BATCH, STEPS, dtype=torch.bool),
        conditioning={"prompt_embeds": torch.stack([prompt_embedding(p) for p in PROMPTS])},
        prompts=list(PROMPTS),
        group_ids=torch.tensor([0, 0, 1, 1]),
        members=torch.tensor([0, 1, 0, 1]),
        seeds=torch.arange(BATCH),
        sde_type="flow_grpo",
        noise_level=0.0,
        cfg_scale=1.0,
        image_size=(SIDE, SIDE),
    )


ADVANTAGES = torch.tensor([1.5, -0.7, 0.4, -2.0])
UNITS = torch.tensor([[0], [2], [1], [3]])


def make_batch(rollout: Rollout, units=UNITS, weight=None, advantages=ADVANTAGES) -> LossBatch:
    return LossBatch(
        rollout=rollout,
        units=units,
        advantages=advantages,
        weight=torch.ones(BATCH) if weight is None else weight,
        step=3,
        generator=torch.Generator().manual_seed(NOISE_SEED),
    )


def leaves(params):
    return [param.detach().clone().requires_grad_(True) for param in params]


def weights(seed):
    return [param.detach().clone() for param in LinearVelocity(seed).parameters()]


def forward_point(rollout, units):
    """t, model time, x0, embeddings of each sample at its grid point (independent indexing)."""
    t = torch.stack([rollout.sigmas[b, units[b, 0]] for b in range(BATCH)])
    timesteps = torch.stack([rollout.timesteps[b, units[b, 0]] for b in range(BATCH)])
    return t, timesteps, rollout.latents[:, -1], rollout.conditioning["prompt_embeds"]


# ----- AWM -------------------------------------------------------------------------------------------------------
def awm_reference(current, old, reference, rollout, *, clip_low, clip_high, weighting, kl_coef, weight):
    """AWM as the paper / Flow-Factory write it: PPO clip of exp(l_old - l_theta) at the same (t, eps)."""
    t, timesteps, x0, embeds = forward_point(rollout, UNITS)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    target = eps - x0

    def matching(params):
        error = ((velocity_of(params, x_t, timesteps, embeds) - target) ** 2).mean(dim=(1, 2, 3))
        return error * t if weighting == "t" else error

    ratio = torch.exp(matching(old).detach() - matching(current))
    unclipped = -ADVANTAGES * ratio
    clipped = -ADVANTAGES * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = (weight * torch.maximum(unclipped, clipped)).mean()
    if kl_coef:
        v = velocity_of(current, x_t, timesteps, embeds)
        v_ref = velocity_of(reference, x_t, timesteps, embeds)
        loss = loss + kl_coef * (weight * ((v - v_ref) ** 2).mean(dim=(1, 2, 3))).mean()
    return loss


@pytest.mark.parametrize(
    "settings",
    [{}, {"weighting": "t"}, {"clip_low": 0.002, "clip_high": 0.01}, {"kl_coef": 0.3}],
    ids=["uniform", "t-weighting", "tight-clip", "kl"],
)
def test_awm_loss_and_gradient_equal_the_clipped_advantage_weighted_matching(settings):
    settings = {"clip_low": 0.2, "clip_high": None, "weighting": "uniform", "kl_coef": 0.0, **settings}
    algorithm = AWM(AWMOptions(name="awm", **settings), seed=0, num_steps=STEPS)
    policy = FakePolicy(LinearVelocity(seed=1), weights(3))
    old = weights(2)
    algorithm.old_tensors = [tensor.clone() for tensor in old]
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])
    rollout = make_rollout()
    loss, stats = algorithm.loss(make_batch(rollout, weight=weight), policy)
    loss.backward()

    current = leaves(policy.parameters)
    clip_high = settings["clip_high"] if settings["clip_high"] is not None else settings["clip_low"]
    expected = awm_reference(
        current,
        old,
        policy.reference_tensors,
        rollout,
        clip_low=settings["clip_low"],
        clip_high=clip_high,
        weighting=settings["weighting"],
        kl_coef=settings["kl_coef"],
        weight=weight,
    )
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    for param, grad in zip(policy.parameters, torch.autograd.grad(expected, current), strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-7)
    if settings["clip_low"] < 0.1:  # the hand case clips some samples and not others
        assert 0.0 < float(stats["policy/clip_fraction"]) < 1.0
    assert set(policy.sampler.cfg_scales) == {1.0}


def test_awm_gradient_at_ratio_one_is_the_advantage_weighted_matching_gradient():
    """With the old policy equal to the current one, grad L = mean_b A_b grad l_b (the paper's L_AWM)."""
    algorithm = AWM(AWMOptions(name="awm"), seed=0, num_steps=STEPS)
    policy = FakePolicy(LinearVelocity(seed=1))
    algorithm.rollout_context(policy)  # snapshots the sampling policy = the current one
    rollout = make_rollout()
    loss, stats = algorithm.loss(make_batch(rollout), policy)
    loss.backward()
    torch.testing.assert_close(stats["policy/ratio_mean"], torch.tensor(1.0))

    current = leaves(policy.parameters)
    t, timesteps, x0, embeds = forward_point(rollout, UNITS)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    matching = ((velocity_of(current, x_t, timesteps, embeds) - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    weighted = (ADVANTAGES * matching).mean()
    for param, grad in zip(policy.parameters, torch.autograd.grad(weighted, current), strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-7)


def test_awm_select_is_reproducible_and_per_sample():
    algorithm = AWM(AWMOptions(name="awm", step_fraction=0.5), seed=0, num_steps=STEPS)
    units = algorithm.select(make_rollout(), step=2)
    assert units.shape == (BATCH, 2)
    assert torch.equal(units, algorithm.select(make_rollout(), step=2))
    assert not torch.equal(units, algorithm.select(make_rollout(), step=3))


# ----- DGPO ------------------------------------------------------------------------------------------------------
def dgpo_reference(current, reference, rollout, units, *, beta, weight):
    """DGPO: groups {0, 1} and {2, 3}; noise shared within a group; softplus(z_g) = -log sigmoid(-z_g)."""
    t, timesteps, x0, embeds = forward_point(rollout, units)
    group_noise = torch.randn((2, *x0.shape[1:]), generator=torch.Generator().manual_seed(NOISE_SEED))
    eps = group_noise[torch.tensor([0, 0, 1, 1])]
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    target = eps - x0

    def matching(params):
        return ((velocity_of(params, x_t, timesteps, embeds) - target) ** 2).mean(dim=(1, 2, 3))

    errors, reference_errors = matching(current), matching(reference).detach()
    advantages = ADVANTAGES * weight
    z = torch.stack(
        [
            beta / 2 * sum(advantages[i] * (errors[i] - reference_errors[i]) for i in members)
            for members in ([0, 1], [2, 3])
        ]
    )
    loss = -functional.logsigmoid(-z).mean()
    surrogate = (torch.sigmoid(z.detach())[torch.tensor([0, 0, 1, 1])] * advantages * errors).mean()
    return loss, surrogate


SHARED_UNITS = torch.tensor([[2], [2], [2], [2]])


@pytest.mark.parametrize("beta", [100.0, 7.0])
def test_dgpo_loss_equals_the_group_preference_and_its_gradient_the_reference_surrogate(beta):
    algorithm = DGPO(DGPOOptions(name="dgpo", beta=beta), seed=0, num_steps=STEPS)
    algorithm.check(FakeSampler(LinearVelocity(1)), {}, SimpleNamespace(cfg_scale=1.0, group_size=2))
    policy = FakePolicy(LinearVelocity(seed=1), weights(3))
    rollout = make_rollout()
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0])
    loss, _ = algorithm.loss(make_batch(rollout, units=SHARED_UNITS, weight=weight), policy)
    loss.backward()

    current = leaves(policy.parameters)
    expected, surrogate = dgpo_reference(
        current, policy.reference_tensors, rollout, SHARED_UNITS, beta=beta, weight=weight
    )
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    expected_grads = torch.autograd.grad(expected, current, retain_graph=True)
    surrogate_grads = torch.autograd.grad(surrogate, current)
    for param, grad, reference_grad in zip(policy.parameters, expected_grads, surrogate_grads, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(param.grad, beta * reference_grad, rtol=1e-4, atol=1e-6)


def test_dgpo_with_the_reference_equal_to_the_policy_is_log_two():
    """z_g = 0 when theta = theta_ref: every group's preference is 1/2 and L = log 2."""
    algorithm = DGPO(DGPOOptions(name="dgpo"), seed=0, num_steps=STEPS)
    policy = FakePolicy(LinearVelocity(seed=1))
    loss, stats = algorithm.loss(make_batch(make_rollout(), units=SHARED_UNITS), policy)
    torch.testing.assert_close(loss.detach(), torch.tensor(math.log(2.0)))
    torch.testing.assert_close(stats["dgpo/preference"], torch.tensor(0.5))


def test_dgpo_trains_the_same_times_for_every_sample_and_refuses_split_groups():
    algorithm = DGPO(DGPOOptions(name="dgpo", step_fraction=0.5), seed=0, num_steps=STEPS)
    units = algorithm.select(make_rollout(), step=1)
    assert units.shape == (BATCH, 2) and bool((units == units[:1]).all())
    algorithm.check(FakeSampler(LinearVelocity(1)), {}, SimpleNamespace(cfg_scale=1.0, group_size=2))
    part = make_rollout().select([0, 1, 2])  # group "a blue car" is split
    batch = LossBatch(
        part, SHARED_UNITS[:3], ADVANTAGES[:3], torch.ones(3), 0, torch.Generator().manual_seed(0)
    )
    with pytest.raises(RuntimeError, match="not whole groups of 2"):
        algorithm.loss(batch, FakePolicy(LinearVelocity(seed=1)))


# ----- SFT -------------------------------------------------------------------------------------------------------
def write_images(folder: Path) -> Path:
    """Two 3x3 reference images and a JSONL naming them (paths relative to the file)."""
    Image.new("RGB", (SIDE, SIDE), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (SIDE, SIDE), (0, 0, 255)).save(folder / "blue.png")
    path = folder / "images.jsonl"
    path.write_text(
        json.dumps({"prompt": "a red ball", "image": "red.png"})
        + "\n"
        + json.dumps({"prompt": "a blue car", "image": "blue.png"})
        + "\n"
    )
    return path


def test_sft_loss_is_the_flow_matching_loss_on_the_encoded_reference_images(tmp_path):
    images = write_images(tmp_path)
    algorithm = SFT(SFTOptions(name="sft", images=str(images)), seed=0, num_steps=STEPS)
    policy = FakePolicy(LinearVelocity(seed=1))
    rollout = make_rollout()
    batch = make_batch(rollout)
    loss, _ = algorithm.loss(batch, policy)
    loss.backward()

    # the records the algorithm draws: uniform indices from the batch generator's first draw
    generator = torch.Generator().manual_seed(NOISE_SEED)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    indices = torch.randint(2, (BATCH,), generator=torch.Generator().manual_seed(seed)).tolist()
    red, blue = torch.zeros(3, SIDE, SIDE), torch.zeros(3, SIDE, SIDE)
    red[0], blue[2] = 1.0, 1.0
    x0 = torch.stack([red if i == 0 else blue for i in indices]) * 2 - 1  # the fake VAE: 2 pixel - 1
    embeds = torch.stack([prompt_embedding("a red ball" if i == 0 else "a blue car") for i in indices])
    t, timesteps, _, _ = forward_point(rollout, UNITS)
    eps = torch.randn(x0.shape, generator=generator)  # drawn after the record indices
    tt = t.view(-1, 1, 1, 1)
    current = leaves(policy.parameters)
    velocity = velocity_of(current, (1 - tt) * x0 + tt * eps, timesteps, embeds)
    expected = ((velocity - (eps - x0)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    for param, grad in zip(policy.parameters, torch.autograd.grad(expected, current), strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-7)
    assert set(indices) == {0, 1}  # the hand case draws both images


def test_sft_refuses_a_missing_image_file_with_its_line(tmp_path):
    path = tmp_path / "images.jsonl"
    path.write_text(json.dumps({"prompt": "a red ball", "image": "nowhere.png"}) + "\n")
    good = DEMOS / "data" / "sft_images.jsonl"
    config = small_config(tmp_path / "run", f"algorithm.images={good}", base_config=DEMOS / "sft.yaml")
    options = SFTOptions(name="sft", images=str(path))
    with pytest.raises(ConfigError, match=r"images.jsonl:1: 'image' file .*nowhere.png does not exist"):
        options.validate(config)


# ----- checks shared by the forward-process algorithms -------------------------------------------------------------
@pytest.mark.parametrize("name", ["awm", "dgpo", "diffusion_dpo"])
def test_check_refuses_a_ddim_sampler_and_cfg_with_one_line(name):
    options = {"awm": AWMOptions, "dgpo": DGPOOptions, "diffusion_dpo": DiffusionDPOOptions}[name]
    algorithm = build_algorithm(options(name=name), seed=0, num_steps=STEPS)
    ddim = SimpleNamespace(family="sd", step_kinds=("ddim",))
    with pytest.raises(ConfigError, match="not one. Use a FLUX or SD3 model"):
        algorithm.check(ddim, {}, SimpleNamespace(cfg_scale=1.0, group_size=2))
    with pytest.raises(ConfigError, match="set sample.cfg_scale: 1"):
        algorithm.check(FakeSampler(LinearVelocity(1)), {}, SimpleNamespace(cfg_scale=4.5, group_size=2))


@pytest.mark.parametrize("name", ["dgpo", "diffusion_dpo"])
def test_group_algorithms_refuse_microbatches_that_split_groups(tmp_path, name):
    """4 groups of 8 in microbatches of 4: a microbatch would hold half a group."""
    with pytest.raises(
        ConfigError, match=r"train.microbatch_size \(4\) must be a multiple of sample.group_size"
    ):
        small_config(tmp_path, *LEARNING, "train.microbatch_size=4", base_config=DEMOS / f"{name}.yaml")


@pytest.mark.parametrize("name", ["dgpo", "diffusion_dpo"])
def test_group_algorithms_train_on_group_ordered_minibatches(tmp_path, name):
    """4 groups of 8 in updates of 16 and microbatches of 8: the trainer orders the samples group by group
    (``whole_groups``), so every microbatch holds one whole group (the loss refuses anything else at run time)."""
    from gen_rl.trainer import GenerationTrainer

    config = small_config(tmp_path, *LEARNING, "train.microbatch_size=8", base_config=DEMOS / f"{name}.yaml")
    trainer = GenerationTrainer(config)
    assert trainer.algorithm.whole_groups
    record = trainer.run_step(0)
    assert record["optim/updates"] == 2 and math.isfinite(record["loss/total"])


# ----- few-step GRPO ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sample.num_steps=8"], "sample.num_steps is 8"),
        (["sample.cfg_scale=3.0"], "for distilled CFG-free models"),
        (["algorithm.step_selection=first", "algorithm.step_fraction=0.5"], "set it to all"),
    ],
)
def test_few_step_grpo_refuses_what_is_not_a_few_step_run(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, "sample.num_steps=2", *overrides, base_config=DEMOS / "few_step_grpo.yaml")


# ----- through the generation trainer ---------------------------------------------------------------------------
FAST = (
    "sample.groups_per_step=2",
    "sample.groups_per_rollout=2",
    "train.samples_per_update=16",
    "train.microbatch_size=16",
)


def run_demo(tmp_path, name: str, steps: int, *overrides: str):
    """``steps`` training steps of the algorithm's demo config (2 groups of 8); eval reward before / after."""
    from gen_rl.trainer import GenerationTrainer

    config = small_config(
        tmp_path, *LEARNING, *FAST, f"train.num_steps={steps}", *overrides, base_config=DEMOS / f"{name}.yaml"
    )
    trainer = GenerationTrainer(config)
    before = trainer.evaluate(0)["eval/reward/mean"]
    records = [trainer.run_step(step) for step in range(steps)]
    after = trainer.evaluate(steps)["eval/reward/mean"]
    assert all(math.isfinite(record["loss/total"]) for record in records)
    train = [record["reward/mean"] for record in records]
    print(f"{name} {overrides}: held-out {before:.4f} -> {after:.4f}; train {[round(r, 4) for r in train]}")
    return trainer, before, after, train


def test_awm_through_the_trainer_raises_the_held_out_reward(tmp_path):
    """AWM on the colour demo (ODE rollouts, 2 of the 4 grid times per sample): the held-out reward rises."""
    trainer, before, after, _ = run_demo(tmp_path, "awm", 4, "algorithm.step_fraction=0.5")
    assert isinstance(trainer.algorithm, AWM)
    assert after - before > 0.03, (before, after)


def test_dgpo_through_the_trainer_raises_the_held_out_reward(tmp_path):
    """DGPO on the colour demo: one microbatch holds the whole step (both groups); held-out reward rises."""
    trainer, before, after, _ = run_demo(tmp_path, "dgpo", 4, "algorithm.step_fraction=0.5")
    assert isinstance(trainer.algorithm, DGPO)
    assert after - before > 0.02, (before, after)


def test_sft_through_the_trainer_raises_the_held_out_reward(tmp_path):
    """SFT on solid reference images of each prompt's colour: the held-out colour reward rises."""
    images = DEMOS / "data" / "sft_images.jsonl"
    trainer, before, after, _ = run_demo(
        tmp_path, "sft", 4, f"algorithm.images={images}", "algorithm.step_fraction=0.5"
    )
    assert isinstance(trainer.algorithm, SFT)
    assert after - before > 0.03, (before, after)


def test_few_step_grpo_through_the_trainer_raises_the_two_step_reward(tmp_path):
    """Flow-GRPO on the model's own 2-step grid: both steps stochastic and trained; the 2-step reward rises."""
    trainer, before, after, _ = run_demo(tmp_path, "few_step_grpo", 6, "sample.num_steps=2")
    assert isinstance(trainer.algorithm, FewStepGRPO)
    rollout = trainer.sample(0).rollout
    assert rollout.num_steps == 2 and bool(rollout.stochastic.all())
    assert after - before > 0.015, (before, after)
