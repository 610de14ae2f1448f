"""Shipped configs: every YAML trains two steps on tiny models, and each recipe that names a paper reproduces
that paper's numbers: advantages, log-ratios, KL and loss on fixed tensors equal an implementation of the paper's
reference code written here (Flow-GRPO's scripts/train_sd3.py + sd3_sde_with_logprob.py, DanceGRPO's
fastvideo/train_grpo_flux.py), and the trained steps are theirs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trainer_helpers import DEMO, lora_weights

from gen_rl.core.config import load_config
from gen_rl.core.step_selection import sde_window, train_step_indices
from gen_rl.objective import compute_advantages, log_probs_in_convention, step_loss, transition_kl
from gen_rl.train import task_of
from gen_rl.trainer_config import GenerationConfig
from pipelines.sde import get_flow_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GENERATION = sorted(p for p in CONFIGS.rglob("*.yaml") if task_of(str(p), []) == "generation")
FLOW_GRPO = CONFIGS / "sd3" / "sd35m_pickscore_flowgrpo.yaml"
FLOW_GRPO_FAST = CONFIGS / "sd3" / "sd35m_pickscore_flowgrpo_fast.yaml"
FLOW_GRPO_CPS = CONFIGS / "sd3" / "sd35m_pickscore_flowgrpo_cps.yaml"
DANCE_GRPO = CONFIGS / "flux" / "dev_hps_dancegrpo.yaml"
HALF_LOG_TWO_PI = math.log(math.sqrt(2 * math.pi))


# ----- the papers' formulas, written from their reference code -------------------------------------------------
def flow_grpo_sde(x, v, sigma, sigma_next, sigma_1, a, x_next):
    """Flow-GRPO sde_step_with_logprob (sde_type 'sde'): mean, std_dev_t (= g), mean-reduced log-prob."""
    sigma, sigma_next = sigma.view(-1, 1, 1), sigma_next.view(-1, 1, 1)
    dt = sigma_next - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_1), sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_dev_t * torch.sqrt(-dt)
    log_prob = -((x_next - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - HALF_LOG_TWO_PI
    return mean, std_dev_t.flatten(), log_prob.mean(dim=(1, 2))


def flow_grpo_cps(x, v, sigma, sigma_next, a, x_next):
    """Flow-GRPO sde_step_with_logprob (sde_type 'cps'): every constant of the log-prob dropped."""
    sigma, sigma_next = sigma.view(-1, 1, 1), sigma_next.view(-1, 1, 1)
    std_dev_t = sigma_next * math.sin(a * math.pi / 2)
    x0, x1 = x - sigma * v, x + v * (1 - sigma)
    mean = x0 * (1 - sigma_next) + x1 * torch.sqrt(sigma_next**2 - std_dev_t**2)
    return mean, std_dev_t.flatten(), (-((x_next - mean) ** 2)).mean(dim=(1, 2))


def dance_grpo_step(x, v, sigma, sigma_next, eta, x_next):
    """DanceGRPO flux_step with sde_solver: Euler step plus the score drift, log-prob averaged."""
    sigma, sigma_next = sigma.view(-1, 1, 1), sigma_next.view(-1, 1, 1)
    dsigma = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = eta * torch.sqrt(sigma - sigma_next)
    log_prob = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_TWO_PI
    return mean, std.flatten(), log_prob.mean(dim=(1, 2))


def flow_grpo_advantages(prompts, rewards, clip):
    """PerPromptStatTracker(global_std=True) of one epoch, then the clamp in the loss."""
    advantages = torch.empty_like(rewards)
    std = rewards.std(correction=0) + 1e-4
    for prompt in set(prompts):
        mask = torch.tensor([p == prompt for p in prompts])
        advantages[mask] = (rewards[mask] - rewards[mask].mean()) / std
    return advantages.clamp(-clip, clip)


def dance_grpo_advantages(rewards, group_size, clip):
    """use_group: per group (rewards - mean) / (torch.std (unbiased) + 1e-8), clamped in the loss."""
    advantages = torch.empty_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        advantages[start : start + group_size] = (group - group.mean()) / (group.std() + 1e-8)
    return advantages.clamp(-clip, clip)


def ppo_loss(log_prob, old_log_prob, advantages, clip):
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.mean(
        torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))
    )


# ----- fixed tensors ------------------------------------------------------------------------------------------------
def _grid(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    t = torch.linspace(1, 0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def _step_sigmas(grid: torch.Tensor, index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` sigma and next sigma of step ``index`` of ``grid`` for every sample."""
    return grid[index].expand(batch), grid[index + 1].expand(batch)


def _batch(seed: int = 0, groups: int = 2, group_size: int = 6):
    generator = torch.Generator().manual_seed(seed)
    n = groups * group_size
    prompts = [f"prompt {g}" for g in range(groups) for _ in range(group_size)]
    rewards = torch.randn(n, generator=generator, dtype=torch.float64) + torch.arange(n) % group_size * 0.1
    x = torch.randn(n, 4, 8, generator=generator)
    v_old = torch.randn(n, 4, 8, generator=generator)
    v_new = v_old + 0.02 * torch.randn(n, 4, 8, generator=generator)
    v_ref = v_old + 0.05 * torch.randn(n, 4, 8, generator=generator)
    noise = torch.randn(n, 4, 8, generator=generator)
    return prompts, rewards, x, v_old, v_new, v_ref, noise


def _ours(config: GenerationConfig, x, v_old, v_new, v_ref, noise, sigma, sigma_next, advantages):
    """Loss and log-ratios of one trained step through gen-rl's config-driven objective."""
    step = get_flow_step(config.sample.sde_type)
    a = config.sample.noise_level
    old = step(x, v_old, sigma, sigma_next, a, noise=noise)
    new = step(x, v_new, sigma, sigma_next, a, next_sample=old.next_sample)
    ref = step(x, v_ref, sigma, sigma_next, a, next_sample=old.next_sample)
    convention = config.algorithm.log_prob_convention
    log_probs = log_probs_in_convention(new.log_prob, new.std, convention)[:, None]
    old_log_probs = log_probs_in_convention(old.log_prob, old.std, convention)[:, None]
    kl = None
    if getattr(config.algorithm, "kl_coef", 0) > 0:
        kl = transition_kl(
            new.mean,
            ref.mean,
            new.std,
            sigma,
            sigma_next,
            sde_type=config.sample.sde_type,
            estimator=config.algorithm.kl_estimator,
        )
    loss, _ = step_loss(
        config.algorithm, log_probs, old_log_probs, advantages.float(), torch.ones(len(x)), kl
    )
    return loss, (log_probs - old_log_probs)[:, 0], old.next_sample


@pytest.mark.parametrize("path", [FLOW_GRPO, FLOW_GRPO_FAST], ids=["flowgrpo", "flowgrpo_fast"])
@pytest.mark.parametrize("step_index", [0, 4, 8])
def test_flow_grpo_recipes_reproduce_flow_grpo(path, step_index):
    config = load_config(GenerationConfig, path)
    prompts, rewards, x, v_old, v_new, v_ref, noise = _batch()
    group_ids = torch.arange(len(rewards)) // 6
    ours = compute_advantages(config.reward, {"r": rewards}, {"r": 1.0}, group_ids, prompts)
    theirs = flow_grpo_advantages(prompts, rewards, clip=5.0)
    torch.testing.assert_close(ours.advantages, theirs.float(), rtol=1e-6, atol=1e-6)

    grid = _grid(config.sample.num_steps)
    sigma, sigma_next = _step_sigmas(grid, step_index, len(x))
    loss, log_ratio, x_next = _ours(config, x, v_old, v_new, v_ref, noise, sigma, sigma_next, theirs)
    a, sigma_1 = config.sample.noise_level, float(grid[1])
    mean_new, g, log_prob_new = flow_grpo_sde(x, v_new, sigma, sigma_next, sigma_1, a, x_next)
    _, _, log_prob_old = flow_grpo_sde(x, v_old, sigma, sigma_next, sigma_1, a, x_next)
    mean_ref, _, _ = flow_grpo_sde(x, v_ref, sigma, sigma_next, sigma_1, a, x_next)
    torch.testing.assert_close(log_ratio, log_prob_new - log_prob_old, rtol=1e-4, atol=1e-6)
    kl = ((mean_new - mean_ref) ** 2).mean(dim=(1, 2)) / (2 * g**2)
    clip = config.algorithm.clip_low
    want = ppo_loss(log_prob_new, log_prob_old, theirs.float(), clip) + 0.01 * kl.mean()
    assert config.algorithm.kl_coef == 0.01
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)  # float32 log-probs
    assert float(((log_prob_new - log_prob_old).exp() - 1).abs().max()) > clip  # some samples do clip


def test_flow_grpo_trains_the_first_nine_of_ten_steps():
    config = load_config(GenerationConfig, FLOW_GRPO)
    stochastic = torch.ones(3, config.sample.num_steps, dtype=torch.bool)
    algorithm = config.algorithm
    steps = train_step_indices(
        stochastic,
        algorithm.step_selection,
        fraction=algorithm.step_fraction,
        seed=0,
        step=5,
        trainable=algorithm.trainable_steps,
    )
    assert steps.tolist() == [list(range(int(10 * 0.99)))] * 3


def test_dance_grpo_recipe_reproduces_dance_grpo():
    config = load_config(GenerationConfig, DANCE_GRPO)
    group_size = 6
    prompts, rewards, x, v_old, v_new, v_ref, noise = _batch(seed=1, group_size=group_size)
    group_ids = torch.arange(len(rewards)) // group_size
    ours = compute_advantages(config.reward, {"r": rewards}, {"r": 1.0}, group_ids, prompts)
    theirs = dance_grpo_advantages(rewards, group_size, clip=5.0)
    torch.testing.assert_close(ours.advantages, theirs.float(), rtol=1e-6, atol=1e-6)

    grid = _grid(config.sample.num_steps, shift=config.sample.shift)
    eta = config.sample.noise_level
    for step_index in (0, 7, 14):
        sigma, sigma_next = _step_sigmas(grid, step_index, len(x))
        loss, log_ratio, x_next = _ours(config, x, v_old, v_new, v_ref, noise, sigma, sigma_next, theirs)
        _, _, log_prob_new = dance_grpo_step(x, v_new, sigma, sigma_next, eta, x_next)
        _, _, log_prob_old = dance_grpo_step(x, v_old, sigma, sigma_next, eta, x_next)
        torch.testing.assert_close(log_ratio, log_prob_new - log_prob_old, rtol=1e-4, atol=1e-6)
        want = ppo_loss(log_prob_new, log_prob_old, theirs.float(), config.algorithm.clip_low)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)  # float32 log-probs
    assert config.algorithm.kl_coef == 0

    # train_timesteps = int(15 * 0.6) = 9 per sample, from a fresh per-sample permutation of the first 15 steps
    stochastic = torch.ones(4, config.sample.num_steps, dtype=torch.bool)
    algorithm = config.algorithm
    chosen = [
        train_step_indices(
            stochastic,
            algorithm.step_selection,
            fraction=algorithm.step_fraction,
            seed=0,
            step=step,
            trainable=algorithm.trainable_steps,
        )
        for step in range(20)
    ]
    assert all(c.shape == (4, int(15 * 0.6)) and int(c.max()) < 15 for c in chosen)
    assert len({tuple(c[0].tolist()) for c in chosen}) > 10


def test_cps_recipe_reproduces_flow_grpo_cps():
    config = load_config(GenerationConfig, FLOW_GRPO_CPS)
    prompts, rewards, x, v_old, v_new, v_ref, noise = _batch(seed=2)
    theirs = flow_grpo_advantages(prompts, rewards, clip=5.0)
    grid = _grid(config.sample.num_steps)
    a = config.sample.noise_level
    for step_index in range(5):  # the window range [0, 5)
        sigma, sigma_next = _step_sigmas(grid, step_index, len(x))
        loss, log_ratio, x_next = _ours(config, x, v_old, v_new, v_ref, noise, sigma, sigma_next, theirs)
        _, _, log_prob_new = flow_grpo_cps(x, v_new, sigma, sigma_next, a, x_next)
        _, _, log_prob_old = flow_grpo_cps(x, v_old, sigma, sigma_next, a, x_next)
        # float32: both sides round at ~1e-7 (5 % of the 1e-5 clip range); the exact convention differs by 1/(2 n^2)
        torch.testing.assert_close(log_ratio, log_prob_new - log_prob_old, rtol=1e-3, atol=5e-7)
        want = ppo_loss(log_prob_new, log_prob_old, theirs.float(), 1e-5)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=2e-7)
    algorithm = config.algorithm
    windows = {
        sde_window(
            algorithm.step_selection,
            step,
            config.sample.num_steps,
            window_size=algorithm.window_size,
            window_range=algorithm.window_range,
            stride=algorithm.window_stride,
            every=algorithm.window_every,
            seed=0,
        )
        for step in range(40)
    }
    assert windows == {(0, 3), (1, 4), (2, 5)}  # 3 SDE steps among the first 5, trained


def test_the_exact_kl_is_the_flow_grpo_kl_over_the_step_size():
    """The conversion the README states: exact = Flow-GRPO's / |ds| per step (25 ... 112 on the SD3 10-step grid)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    prompts, rewards, x, v_old, v_new, v_ref, noise = _batch(seed=3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5's scheduler config
    scheduler.set_timesteps(10)
    grid = scheduler.sigmas.float()
    ratios = []
    for index in range(10):
        sigma, sigma_next = _step_sigmas(grid, index, len(x))
        step = get_flow_step("flow_grpo")(x, v_new, sigma, sigma_next, 0.7)
        ref = get_flow_step("flow_grpo")(x, v_ref, sigma, sigma_next, 0.7)
        exact = transition_kl(
            step.mean, ref.mean, step.std, sigma, sigma_next, sde_type="flow_grpo", estimator="gaussian"
        )
        theirs = transition_kl(
            step.mean, ref.mean, step.std, sigma, sigma_next, sde_type="flow_grpo", estimator="flow_grpo"
        )
        ratios.append(float((exact / theirs).mean()))
        assert ratios[-1] == pytest.approx(1 / float(grid[index] - grid[index + 1]), rel=1e-4)
    assert min(ratios) > 3.5 and max(ratios) > 100  # 25, 21, 18, 15, 12, 9.5, 7.3, 5.4, 3.7, 112


# ----- every shipped YAML trains ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_heads(tmp_path_factory):
    """Tiny reward checkpoints in the real formats: what the recipes' reward names load in this test."""
    from rewards.tiny import save_tiny_aesthetic, save_tiny_clip, save_tiny_hps

    root = tmp_path_factory.mktemp("recipe_heads")
    clip = save_tiny_clip(root / "clip", seed=0)
    aesthetic_clip, aesthetic_head = save_tiny_aesthetic(root / "aesthetic", seed=1)
    hps_config, _ = save_tiny_hps(root / "hps", seed=0)
    from rewards.tiny_judges import (
        save_tiny_dino_for_adversarial,
        save_tiny_qwen2_vl_judge,
        save_tiny_references,
    )

    dino, references = (
        save_tiny_dino_for_adversarial(root / "dino"),
        save_tiny_references(root / "references"),
    )
    judge = str(save_tiny_qwen2_vl_judge(root / "judge"))
    return {
        "adversarial": {"model": str(dino), "references": str(references), "hidden": 16},
        "vlm_judge": {"model": judge},
        "srum": {"model": judge},
        "pairwise_win_rate": {"model": judge},
        "pickscore": {"model": str(clip), "processor": str(clip)},
        "clip_score": {"model": str(clip), "processor": str(clip)},
        "aesthetic": {"clip_model": str(aesthetic_clip), "head": str(aesthetic_head)},
        "hps": {"arch": str(hps_config), "checkpoint": str(root / "hps")},
    }


TINY = {"flux": ("tiny:flux", 16), "sd3": ("tiny:sd3", 32), "sd": ("tiny:sd", 16), "sdxl": ("tiny:sdxl", 16)}
TINY.update(
    {
        "qwen_image": ("tiny:qwen_image", 16),
        "flux2": ("tiny:flux2", 16),
        "flux2_klein": ("tiny:flux2_klein", 16),
        "z_image": ("tiny:z_image", 16),
        "flux_kontext": ("tiny:flux_kontext", 16),
    }
)
TINY.update({"wan": ("tiny:wan22", 16), "wan_i2v": ("tiny:wan_i2v", 16)})  # wan: the two-expert layout
# The Wan recipes score frames with PickScore inside the segmental video reward, a nested reward the tiny heads
# above do not reach: on tiny models the segmental reward scores colour instead.
WAN_TINY_REWARD = "reward.terms=[{name: segmental, weight: 1.0, kwargs: {reward: colour, segments: 5}}]"
WAN_PROMPTS = CONFIGS / "wan" / "prompts"
# Families whose prompts carry a source image keep their recipe's JSONL prompts (the colour prompts have none).
EDIT_PROMPTS = CONFIGS / "editing" / "prompts"
# HunyuanVideo recipes: segmental HPS -> colour (as Wan), 5 frames, best-of-N down to the tiny group of 2.
TINY.update(
    {"hunyuan_video": ("tiny:hunyuan_video", 16), "hunyuan_video_i2v": ("tiny:hunyuan_video_i2v", 16)}
)
HUNYUAN_TINY = (
    "reward.terms=[{name: segmental, weight: 1.0, kwargs: {reward: colour, segments: 4}}]",
    "sample.num_frames=5",
)
HUNYUAN_PROMPTS = CONFIGS / "hunyuan_video" / "prompts"
TINY_OVERRIDES = {
    # float32: on the tiny model, CPU bf16 kernels give a batch-of-2 rollout and batch-of-1 recomputation log-probs
    # ~1e-4 apart, above the ratio check's 1e-5 at DanceGRPO's clip 1e-4 (eta 0.25 makes the step stds small)
    "hunyuan_video": (
        *HUNYUAN_TINY,
        "algorithm.best_of_n_k=1",
        "model.dtype=float32",
        "train.mixed_precision='no'",
    ),
    "hunyuan_video_i2v": (
        *HUNYUAN_TINY,
        f"data.train_prompts={HUNYUAN_PROMPTS / 'i2v_train.jsonl'}",
        f"data.eval_prompts={HUNYUAN_PROMPTS / 'i2v_eval.jsonl'}",
    ),
    "flux_kontext": (
        f"data.train_prompts={EDIT_PROMPTS / 'edit_train.jsonl'}",
        f"data.eval_prompts={EDIT_PROMPTS / 'edit_eval.jsonl'}",
    ),
    "wan": (WAN_TINY_REWARD,),
    "wan_i2v": (
        WAN_TINY_REWARD,
        f"data.train_prompts={WAN_PROMPTS / 'i2v_train.jsonl'}",
        f"data.eval_prompts={WAN_PROMPTS / 'i2v_eval.jsonl'}",
    ),
}

# group-level losses (whole_groups) need microbatches of whole groups: one group of 2 here
ALGORITHM_OVERRIDES = {name: ("train.microbatch_size=2",) for name in ("dgpo", "diffusion_dpo")}


@pytest.mark.parametrize("path", GENERATION, ids=[str(p.relative_to(CONFIGS)) for p in GENERATION])
def test_every_generation_config_trains_two_steps_on_tiny_models(
    path, tmp_path, tiny_heads, fresh_accelerator
):
    """Each YAML as shipped (dtype, mixed precision, KL, EMA, CFG, step selection, rewards by name), pointed at tiny
    models and tiny reward checkpoints, and shrunk to two steps of two groups."""
    from gen_rl.trainer import GenerationTrainer

    shipped = load_config(GenerationConfig, path)
    family = shipped.model.family
    pretrained, size = TINY[family]
    config = load_config(
        GenerationConfig,
        path,
        [
            f"model.pretrained={pretrained}",
            f"sample.height={size}",
            f"sample.width={size}",
            "sample.group_size=2",
            "sample.groups_per_step=2",
            "sample.groups_per_rollout=1",
            "train.num_steps=2",
            "train.samples_per_update=2",
            "train.microbatch_size=1",
            "eval.every_steps=1",
            "eval.max_prompts=1",
            "eval.samples_per_prompt=1",
            "checkpoint.every_steps=1",
            f"log.output_dir={tmp_path}",
            "log.tracker=none",
            "log.progress=false",
            f"data.train_prompts={DEMO.parent / 'prompts' / 'colour_train.txt'}",
            f"data.eval_prompts={DEMO.parent / 'prompts' / 'colour_eval.txt'}",
            *TINY_OVERRIDES.get(family, ()),
            *ALGORITHM_OVERRIDES.get(shipped.algorithm.name, ()),
        ],
    )
    for term in [*config.reward.terms, *config.eval.gold]:
        term.kwargs = {**term.kwargs, **tiny_heads.get(term.name, {})}
    trainer = GenerationTrainer(config)
    start = lora_weights(trainer)
    records = [trainer.run_step(step) for step in range(2)]
    if trainer.algorithm.trust_region is not None:  # likelihood-ratio algorithms check ratio == 1 first
        assert records[0]["ratio_check/floor"] <= records[0]["ratio_check/tolerance"]
    else:
        assert "ratio_check/floor" not in records[0]
    assert all(math.isfinite(r["loss/total"]) and math.isfinite(r["reward/mean"]) for r in records)
    moved = [float((after - start[name]).abs().max()) for name, after in lora_weights(trainer).items()]
    assert max(moved) > 0  # the update reached the trained weights
    if getattr(config.algorithm, "kl_coef", 0) > 0:
        assert (
            records[1]["loss/kl"] > 0
        )  # after one update the policy differs from the LoRA-disabled reference
    assert (trainer.ema is not None) == config.train.ema
