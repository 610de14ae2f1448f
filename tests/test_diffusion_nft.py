"""DiffusionNFT (gen_rl/algorithms/diffusion_nft.py) against the paper's equations written here as plain tensor maths.

A tiny linear velocity model behind a minimal policy (sampler.predict_velocity, parameters, swapped, reference)
stands in for the transformer, so every velocity is a closed-form function of known weights:

- the loss and its gradient equal an independent computation of paper eq. 5 with the reference code's adaptive
  x0 weighting, optimality mapping r = 0.5 + 0.5 clip(A / c, -1, 1), scale c / beta and KL to the reference;
- the hand case distinguishes every term: r vs 1 - r, adaptive vs plain weighting, old vs current, no negative;
- select and the loss noise are reproducible from their seeds; the old policy's soft update follows
  eta_i = min(rate (i - flat), max) on hand numbers; state_dict round-trips to an exact resume;
- check / validate refuse a non-flow sampler and CFG with one line.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gen_rl.algorithms import build_algorithm
from gen_rl.algorithms.base import LossBatch
from gen_rl.algorithms.diffusion_nft import DiffusionNFT, optimality_probability
from gen_rl.algorithms.options import AlgorithmOptions, DiffusionNFTOptions
from gen_rl.core.config import ConfigError
from pipelines.base import Rollout

BATCH, STEPS, CHANNELS, SIDE, EMBED = 4, 4, 2, 3, 5
DIM = CHANNELS * SIDE * SIDE


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


class FakeSampler:
    family = "flux"

    def __init__(self, model: LinearVelocity) -> None:
        self.model = model
        self.cfg_scales: list[float] = []

    def predict_velocity(self, latents, timesteps, conditioning, cfg_scale, image_size):
        self.cfg_scales.append(cfg_scale)
        return self.model(latents, timesteps, conditioning["prompt_embeds"])


class FakePolicy:
    """The Policy protocol over the linear model; the reference is the model's initial weights."""

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
        conditioning={"prompt_embeds": torch.randn(BATCH, EMBED, generator=generator)},
        prompts=["a", "a", "b", "b"],
        group_ids=torch.tensor([0, 0, 1, 1]),
        members=torch.tensor([0, 1, 0, 1]),
        seeds=torch.arange(BATCH),
        sde_type="flow_grpo",
        noise_level=0.0,
        cfg_scale=1.0,
        image_size=(SIDE * 8, SIDE * 8),
    )


ADVANTAGES = torch.tensor([2.0, -1.0, 7.0, -3.5])  # r = 0.7, 0.4, 1 (clipped), 0.15 with c = 5
UNITS = torch.tensor([[0], [2], [1], [3]])
NOISE_SEED = 11


def make_algorithm(**overrides) -> DiffusionNFT:
    options = DiffusionNFTOptions(name="diffusion_nft", **overrides)
    return DiffusionNFT(options, seed=0, num_steps=STEPS)


def setup_pair(algorithm: DiffusionNFT, kl_reference: bool = False):
    """A policy whose current (seed 1), old (seed 2) and reference (seed 3) weights all differ."""
    model = LinearVelocity(seed=1)
    reference = list(LinearVelocity(seed=3).parameters()) if kl_reference else None
    policy = FakePolicy(model, [tensor.detach().clone() for tensor in reference] if reference else None)
    algorithm.setup(policy)
    old = [param.detach().clone() for param in LinearVelocity(seed=2).parameters()]
    algorithm.load_state_dict({"updates": 0, "old_tensors": old})
    return policy, old


def make_batch(rollout: Rollout, seed: int = NOISE_SEED, weight: torch.Tensor | None = None) -> LossBatch:
    return LossBatch(
        rollout=rollout,
        units=UNITS,
        advantages=ADVANTAGES,
        weight=torch.ones(BATCH) if weight is None else weight,
        step=3,
        generator=torch.Generator().manual_seed(seed),
    )


# ----- the independent computation (paper eq. 5, Sec. 3.3 and the reference code's scale) ------------------------
def reference_loss(
    current,
    old,
    reference,
    rollout,
    *,
    beta=1.0,
    clip=5.0,
    kl_coef=0.0,
    adaptive=True,
    weight=None,
    flip_r=False,
    negative=True,
):
    rows = torch.arange(BATCH)
    unit = UNITS[:, 0]
    x0 = rollout.latents[:, -1]
    t = rollout.sigmas[rows, unit].view(-1, 1, 1, 1)
    timesteps = rollout.timesteps[rows, unit]
    embeds = rollout.conditioning["prompt_embeds"]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    x_t = (1 - t) * x0 + t * eps
    v_target = eps - x0
    v_theta = velocity_of(current, x_t, timesteps, embeds)
    v_old = velocity_of(old, x_t, timesteps, embeds)
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    r = torch.clamp(0.5 + 0.5 * ADVANTAGES / clip, 0.0, 1.0)
    if flip_r:
        r = 1 - r

    def error(v):
        if not adaptive:
            return ((v - v_target) ** 2).mean(dim=(1, 2, 3))
        diff = x_t - t * v - x0
        return (diff**2).mean(dim=(1, 2, 3)) / diff.abs().mean(dim=(1, 2, 3)).detach()

    per_sample = r * error(v_pos) + ((1 - r) * error(v_neg) if negative else 0.0)
    w = torch.ones(BATCH) if weight is None else weight
    loss = clip * (w * per_sample / beta).mean()
    if kl_coef:
        v_ref = velocity_of(reference, x_t, timesteps, embeds)
        loss = loss + kl_coef * (w * ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3))).mean()
    return loss


def leaves(params):
    return [param.detach().clone().requires_grad_(True) for param in params]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"beta": 0.1},
        {"reward_clip": 2.0, "adaptive_weight": False},
        {"kl_coef": 0.3},
    ],
    ids=["defaults-no-kl", "beta-0.1", "clip-2-plain-weight", "kl"],
)
def test_loss_and_gradient_equal_the_papers_objective(settings):
    settings = {"kl_coef": 0.0, **settings}
    algorithm = make_algorithm(**settings)
    policy, old = setup_pair(algorithm, kl_reference=True)
    rollout = make_rollout()
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0])  # a dropped sample contributes nothing
    loss, stats = algorithm.loss(make_batch(rollout, weight=weight), policy)
    loss.backward()

    current = leaves(policy.parameters)
    expected = reference_loss(
        current,
        old,
        policy.reference_tensors,
        rollout,
        beta=settings.get("beta", 1.0),
        clip=settings.get("reward_clip", 5.0),
        kl_coef=settings["kl_coef"],
        adaptive=settings.get("adaptive_weight", True),
        weight=weight,
    )
    expected_grads = torch.autograd.grad(expected, current)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for param, grad in zip(policy.parameters, expected_grads, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["loss/total"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["nft/r_mean"], torch.tensor([0.7, 0.4, 1.0, 0.15]).mean())
    # the old policy and the reference pass left the trained weights as they were, and no CFG was used
    torch.testing.assert_close(
        policy.parameters[0].detach(), list(LinearVelocity(seed=1).parameters())[0].detach()
    )
    assert set(policy.sampler.cfg_scales) == {1.0}


def test_each_term_of_the_hand_case_changes_the_value():
    """The hand case tells apart r / 1 - r, adaptive / plain weighting, old / current and a dropped negative
    term, so the equality test above fails for each of these mistakes."""
    algorithm = make_algorithm(kl_coef=0.0)
    policy, old = setup_pair(algorithm)
    rollout = make_rollout()
    loss, _ = algorithm.loss(make_batch(rollout), policy)
    current = [param.detach() for param in policy.parameters]
    same = reference_loss(current, old, None, rollout)
    torch.testing.assert_close(loss.detach(), same, rtol=1e-5, atol=1e-6)
    mistakes = {
        "1 - r": reference_loss(current, old, None, rollout, flip_r=True),
        "no adaptive weight": reference_loss(current, old, None, rollout, adaptive=False),
        "old and current swapped": reference_loss(old, current, None, rollout),
        "no negative term": reference_loss(current, old, None, rollout, negative=False),
        "beta 0.5": reference_loss(current, old, None, rollout, beta=0.5),
    }
    for name, value in mistakes.items():
        assert abs(float(value) - float(same)) > 1e-2 * abs(float(same)), name


def test_with_the_old_policy_equal_to_the_current_r_does_not_matter():
    """v+ = v- = v_theta when theta_old = theta: the loss is c / beta x the flow-matching error whatever r."""
    algorithm = make_algorithm(kl_coef=0.0, adaptive_weight=False, beta=0.5)
    policy = FakePolicy(LinearVelocity(seed=1))
    algorithm.setup(policy)
    rollout = make_rollout()
    loss, stats = algorithm.loss(make_batch(rollout), policy)
    flipped_batch = make_batch(rollout)  # same noise seed
    flipped_batch.advantages = -flipped_batch.advantages
    flipped, _ = algorithm.loss(flipped_batch, policy)
    torch.testing.assert_close(loss, flipped)
    torch.testing.assert_close(stats["nft/positive_loss"], stats["nft/negative_loss"])
    torch.testing.assert_close(stats["nft/old_deviation"], torch.tensor(0.0))


def test_optimality_probability_maps_advantages_to_the_unit_interval():
    advantages = torch.tensor([-10.0, -5.0, -2.5, 0.0, 1.0, 2.5, 5.0, 10.0])
    expected = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 0.75, 1.0, 1.0])
    torch.testing.assert_close(optimality_probability(advantages, 5.0), expected)
    torch.testing.assert_close(
        optimality_probability(torch.tensor([0.5, -2.0]), 1.0), torch.tensor([0.75, 0.0])
    )


def test_select_draws_distinct_grid_points_reproducibly():
    rollout = make_rollout()
    algorithm = make_algorithm()
    units = algorithm.select(rollout, step=5)
    assert units.shape == (BATCH, 3)  # floor(4 x 0.99) = 3 of the 4 grid points, as the reference's 9 of 10
    assert all(len(set(row.tolist())) == 3 for row in units)
    assert int(units.min()) >= 0 and int(units.max()) < STEPS
    assert torch.equal(units, make_algorithm().select(rollout, step=5))
    assert not torch.equal(units, algorithm.select(rollout, step=6))
    other_seed = DiffusionNFT(DiffusionNFTOptions(name="diffusion_nft"), seed=1, num_steps=STEPS)
    assert not torch.equal(units, other_seed.select(rollout, step=5))
    everything = make_algorithm(step_fraction=1.0).select(rollout, step=5)
    assert torch.equal(everything, torch.arange(STEPS).expand(BATCH, -1))


def test_the_loss_noise_comes_from_the_batch_generator():
    algorithm = make_algorithm()
    policy, _ = setup_pair(algorithm)
    rollout = make_rollout()
    first, _ = algorithm.loss(make_batch(rollout, seed=5), policy)
    again, _ = algorithm.loss(make_batch(rollout, seed=5), policy)
    other, _ = algorithm.loss(make_batch(rollout, seed=6), policy)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sampling_runs_the_ode():
    assert make_algorithm().sampling(0) == {"noise_level": 0.0}
    assert DiffusionNFT.needs == frozenset({"clean_latents"})


def test_rollout_context_swaps_in_the_old_policy():
    algorithm = make_algorithm()
    policy, old = setup_pair(algorithm)
    current = [param.detach().clone() for param in policy.parameters]
    with algorithm.rollout_context(policy):
        assert all(torch.equal(param, tensor) for param, tensor in zip(policy.parameters, old, strict=True))
    assert all(torch.equal(param, tensor) for param, tensor in zip(policy.parameters, current, strict=True))


def _fill(policy: FakePolicy, value: float) -> None:
    with torch.no_grad():
        for param in policy.parameters:
            param.fill_(value)


def test_the_old_policy_soft_update_follows_the_schedule():
    """eta_i = 0 for i < flat, then min(rate (i - flat), max): with theta_i = i the old weights are hand values."""
    algorithm = make_algorithm(old_decay_flat=2, old_decay_rate=0.25, old_decay_max=0.6)
    policy = FakePolicy(LinearVelocity(seed=1))
    _fill(policy, 0.0)
    algorithm.setup(policy)
    # eta: 0 (i=1 < flat), 0 (i=2: 0 x 0.25), 0.25, 0.5, 0.6 (capped)
    expected = [1.0, 2.0, 0.25 * 2 + 0.75 * 3, 0.5 * 2.75 + 0.5 * 4, 0.6 * 3.375 + 0.4 * 5]
    for update, value in enumerate(expected, start=1):
        _fill(policy, float(update))
        algorithm.after_update(policy)
        for old in algorithm.old_tensors:
            torch.testing.assert_close(old, torch.full_like(old, value))
    assert algorithm.updates == 5


def test_state_dict_round_trip_resumes_exactly():
    algorithm = make_algorithm(old_decay_rate=0.2)
    policy = FakePolicy(LinearVelocity(seed=1))
    algorithm.setup(policy)
    for seed in (4, 5, 6):
        with torch.no_grad():
            for param, new in zip(policy.parameters, LinearVelocity(seed=seed).parameters(), strict=True):
                param.copy_(new)
        algorithm.after_update(policy)
    buffer = io.BytesIO()
    torch.save(algorithm.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    resumed = make_algorithm(old_decay_rate=0.2)
    resumed.load_state_dict(state)  # before setup: setup keeps the restored old policy
    resumed.setup(FakePolicy(LinearVelocity(seed=9)))
    assert resumed.updates == 3
    for mine, theirs in zip(resumed.old_tensors, algorithm.old_tensors, strict=True):
        assert torch.equal(mine, theirs)
    algorithm.after_update(policy)
    resumed.after_update(policy)
    for mine, theirs in zip(resumed.old_tensors, algorithm.old_tensors, strict=True):
        assert torch.equal(mine, theirs)
    rollout = make_rollout()
    assert torch.equal(
        algorithm.loss(make_batch(rollout), policy)[0], resumed.loss(make_batch(rollout), policy)[0]
    )

    with pytest.raises(ValueError, match="do not match"):
        resumed.load_state_dict({"updates": 1, "old_tensors": state["old_tensors"][:2]})


class DDIMSampler:
    family = "sd"


class FlaggedSampler:
    family = "flux"
    rectified_flow = False


class DDIMStepper:
    family = "my_flux_variant"
    step_kinds = ("ddim",)


@pytest.mark.parametrize(
    "sampler", [DDIMSampler(), FlaggedSampler(), DDIMStepper()], ids=["sd-family", "flag-false", "ddim-steps"]
)
def test_check_refuses_a_sampler_without_the_flow_forward_process(sampler):
    with pytest.raises(ConfigError) as error:
        make_algorithm().check(sampler, {}, SimpleNamespace(cfg_scale=1.0))
    message = str(error.value)
    assert "\n" not in message and "rectified-flow" in message and "flow_grpo" in message


def test_check_on_the_real_samplers_accepts_flow_refuses_ddim_and_cfg():
    from pipelines import FluxSampler, SD3Sampler, SDSampler
    from pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

    algorithm = make_algorithm()
    algorithm.check(FluxSampler(tiny_flux_pipeline(seed=0)), {}, SimpleNamespace(cfg_scale=1.0))
    algorithm.check(SD3Sampler(tiny_sd3_pipeline(seed=0)), {}, SimpleNamespace(cfg_scale=1.0))
    with pytest.raises(ConfigError, match="the sd sampler is not one"):
        algorithm.check(SDSampler(tiny_sd_pipeline(seed=0)), {}, SimpleNamespace(cfg_scale=1.0))
    algorithm.check(FakeSampler(LinearVelocity(0)), {}, SimpleNamespace(cfg_scale=1.0))
    with pytest.raises(ConfigError, match="cfg_scale: 1") as error:
        algorithm.check(FakeSampler(LinearVelocity(0)), {}, SimpleNamespace(cfg_scale=4.5))
    assert "\n" not in str(error.value)


def _run_config(**sample):
    defaults = {"cfg_scale": 1.0, "sde_type": "flow_grpo"}
    return SimpleNamespace(sample=SimpleNamespace(**{**defaults, **sample}), model=SimpleNamespace(lora=True))


@pytest.mark.parametrize(
    ("options", "sample", "lora", "expected"),
    [
        ({}, {"cfg_scale": 4.5}, True, "sample.cfg_scale: 1"),
        ({}, {"sde_type": "ddim"}, True, "rectified-flow forward process"),
        ({"kl_coef": 1e-4}, {}, False, "algorithm.kl_coef: 0"),
        ({"beta": 0.0}, {}, True, "algorithm.beta"),
        ({"step_fraction": 0.0}, {}, True, "algorithm.step_fraction"),
        ({"old_decay_max": 1.0}, {}, True, "algorithm.old_decay_max"),
        ({"reward_clip": -1.0}, {}, True, "algorithm.reward_clip"),
    ],
)
def test_options_validate_refuses_impossible_settings(options, sample, lora, expected):
    config = _run_config(**sample)
    config.model.lora = lora
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")) as error:
        DiffusionNFTOptions(name="diffusion_nft", **options).validate(config)
    assert "\n" not in str(error.value)
    DiffusionNFTOptions(name="diffusion_nft", kl_coef=0.0).validate(_run_config())


def test_options_load_from_the_algorithm_section_and_build_the_algorithm():
    options = AlgorithmOptions.from_config_mapping({"name": "diffusion_nft", "beta": 0.1}, "algorithm")
    assert isinstance(options, DiffusionNFTOptions) and options.beta == 0.1 and options.reward_clip == 5.0
    with pytest.raises(ConfigError, match="old_ema_decay"):
        AlgorithmOptions.from_config_mapping({"name": "diffusion_nft", "old_ema_decay": 0.5}, "algorithm")
    algorithm = build_algorithm(options, seed=0, num_steps=STEPS)
    assert isinstance(algorithm, DiffusionNFT) and algorithm.options.beta == 0.1


# ----- through the generation trainer ---------------------------------------------------------------------------
NFT_DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo" / "tiny_flux_nft_cpu.yaml"


def test_diffusion_nft_through_the_trainer_raises_the_held_out_reward(tmp_path):
    """The NFT demo config shrunk to 6 steps of 16 samples: CFG-free ODE rollouts, and the held-out colour reward
    rises (+0.088 measured; with r flipped to 1 - r it falls)."""
    from gen_rl.core.config import load_config
    from gen_rl.trainer import GenerationTrainer
    from gen_rl.trainer_config import GenerationConfig

    prompts = NFT_DEMO.parent / "prompts"
    overrides = [
        f"log.output_dir={tmp_path}",
        "log.tracker=none",
        "log.progress=false",
        "log.monitors=false",
        "sample.groups_per_step=2",
        "sample.groups_per_rollout=2",
        "train.num_steps=6",
        "train.lr=5.0e-2",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        f"data.train_prompts={prompts / 'colour_train.txt'}",
        f"data.eval_prompts={prompts / 'colour_eval.txt'}",
    ]
    trainer = GenerationTrainer(load_config(GenerationConfig, NFT_DEMO, overrides))
    assert isinstance(trainer.algorithm, DiffusionNFT)
    rollout = trainer.sample(0).rollout
    assert rollout.cfg_scale == 1.0 and rollout.noise_level == 0.0
    assert not bool(rollout.stochastic.any())  # every step was the deterministic ODE
    before = trainer.evaluate(0)["eval/reward/mean"]
    records = [trainer.run_step(step) for step in range(6)]
    after = trainer.evaluate(6)["eval/reward/mean"]
    assert after - before > 0.04, (before, after)
    assert all(math.isfinite(record["loss/total"]) for record in records)
    assert trainer.algorithm.updates == 6  # one soft update of the old policy per optimizer update


def test_a_resumed_nft_run_matches_an_uninterrupted_one(tmp_path):
    """The old policy and its update count are saved with the run: a run stopped after its step-2 checkpoint and
    resumed writes the same metrics and ends with the same old and current weights as one run straight through."""
    from gen_rl.checkpoint import CheckpointManager
    from gen_rl.core.config import load_config
    from gen_rl.trainer import GenerationTrainer
    from gen_rl.trainer_config import GenerationConfig

    prompts = NFT_DEMO.parent / "prompts"

    def config(folder):
        overrides = [
            f"log.output_dir={folder}",
            "log.tracker=none",
            "log.progress=false",
            "log.monitors=false",
            "sample.group_size=4",
            "sample.groups_per_step=2",
            "sample.groups_per_rollout=2",
            "train.samples_per_update=8",
            "train.microbatch_size=8",
            "train.num_steps=4",
            "algorithm.old_decay_rate=0.2",  # the old policy lags: 0.2, 0.4, 0.5, 0.5
            "eval.every_steps=3",
            "eval.max_prompts=2",
            "eval.samples_per_prompt=1",
            "checkpoint.every_steps=2",
            f"data.train_prompts={prompts / 'colour_train.txt'}",
            f"data.eval_prompts={prompts / 'colour_eval.txt'}",
        ]
        return load_config(GenerationConfig, NFT_DEMO, overrides)

    straight = GenerationTrainer(config(tmp_path / "straight"))
    straight.train()
    stopped = GenerationTrainer(config(tmp_path / "stopped"))
    for step in range(3):  # the checkpoint after step 2 is written; step 3 is lost in the "crash"
        stopped.run_step(step)
    assert CheckpointManager(tmp_path / "stopped", 2).latest().name == "checkpoint-000002"
    del stopped
    resumed = GenerationTrainer(config(tmp_path / "stopped"), resume=True)
    assert resumed.start_step == 2 and resumed.algorithm.updates == 2
    resumed.train()

    def metrics(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}
            for line in lines
        ]

    expected, got = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    assert resumed.algorithm.updates == straight.algorithm.updates == 4
    pairs = zip(straight.algorithm.old_tensors, straight.parameters, strict=True)
    lag = max(float((old - param.detach()).abs().max()) for old, param in pairs)
    assert lag > 1e-3  # the old policy is not the current one, so restoring it matters
    for mine, theirs in zip(resumed.algorithm.old_tensors, straight.algorithm.old_tensors, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    for mine, theirs in zip(resumed.parameters, straight.parameters, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_training_rollouts_run_with_the_old_policy(tmp_path, monkeypatch):
    """The trainer samples inside ``rollout_context``: after an update (old != current) a training rollout equals
    the rollout of the current model with the old parameters swapped in by hand, and differs from the current
    model's own rollout (Algorithm 1, line 3: data comes from the old policy)."""
    from contextlib import nullcontext

    from trainer_helpers import small_config

    from gen_rl.core.ema import swapped_parameters
    from gen_rl.trainer import GenerationTrainer

    trainer = GenerationTrainer(small_config(tmp_path, "train.lr=5e-2", base_config=NFT_DEMO))
    trainer.run_step(0)
    assert float(trainer.run_step(1)["nft/old_deviation"]) > 0  # the old policy lags the current one
    with_old = trainer.sample(2).rollout.latents
    monkeypatch.setattr(trainer.algorithm, "rollout_context", lambda policy: nullcontext())
    current = trainer.sample(2).rollout.latents
    with swapped_parameters(trainer.parameters, trainer.algorithm.state_dict()["old_tensors"]):
        by_hand = trainer.sample(2).rollout.latents
    assert torch.equal(with_old, by_hand)
    assert not torch.equal(with_old, current)
