"""Adv-GRPO's adversarial reward on a tiny DINOv2 built in code: the head separates two colour distributions, a
short policy-gradient run moves the samples toward the references, the hinge step equals an independent one on
normalised tokens, both schedules, and an exact resume through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewards import REWARDS, RewardStateError, RewardUpdate, build_reward, score_reward, update_reward
from rewards.adversarial import AdversarialReward, sample_patches
from rewards.base import check_reward_sources
from rewards.tiny import save_tiny_dino

RED, BLUE = (0.85, 0.2, 0.2), (0.2, 0.3, 0.85)


def colours(centre, count: int, generator: torch.Generator, spread: float = 0.08) -> torch.Tensor:
    return (torch.tensor(centre) + spread * torch.randn(count, 3, generator=generator)).clamp(0, 1)


def solid(rgb: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Images ``[N, 3, size, size]``, each one colour of ``rgb`` ``[N, 3]``."""
    return rgb[:, :, None, None].expand(-1, 3, size, size).clone()


def write_images(folder, rgb: torch.Tensor):
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(solid(rgb)):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    generator = torch.Generator().manual_seed(0)
    return {
        "dino": str(save_tiny_dino(root / "dino")),
        "references": str(write_images(root / "red", colours(RED, 24, generator))),
    }


def make(assets, **kwargs) -> AdversarialReward:
    options = {"hidden": 32, "num_patches": 8, "lr": 1e-2, **kwargs}
    return AdversarialReward(assets["references"], model=assets["dino"], **options)


def update_of(pixels: torch.Tensor, scores: torch.Tensor | None = None, step: int = 0) -> RewardUpdate:
    batch = pixels.shape[0]
    return RewardUpdate(
        pixels=pixels,
        prompts=["p"] * batch,
        metadata=[{}] * batch,
        group_ids=torch.arange(batch) // 4,
        scores=torch.zeros(batch) if scores is None else scores,
        step=step,
    )


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties half."""
    difference = positive[:, None] - negative[None, :]
    return float((difference > 0).float().mean() + 0.5 * (difference == 0).float().mean())


def test_head_separates_reference_from_generated_colours(assets):
    generator = torch.Generator().manual_seed(1)
    reward = make(assets)
    held_red, held_blue = solid(colours(RED, 16, generator)), solid(colours(BLUE, 16, generator))
    before = auc(
        score_reward(reward, held_red, ["p"] * 16).scores, score_reward(reward, held_blue, ["p"] * 16).scores
    )
    for step in range(25):
        stats = update_reward(reward, update_of(solid(colours(BLUE, 8, generator)), step=step))
    red = score_reward(reward, held_red, ["p"] * 16).scores
    blue = score_reward(reward, held_blue, ["p"] * 16).scores
    assert auc(red, blue) == 1.0 and before < 0.9  # learned, not there by chance
    assert float(red.mean() - blue.mean()) > 1.0 and stats["adv_accuracy"] == 1.0
    assert "adversarial" in REWARDS and reward.trained_steps == 25


def test_policy_samples_move_toward_the_references(assets):
    """REINFORCE with group-normalised advantages on a Gaussian over colours, the reward updated every step."""
    generator = torch.Generator().manual_seed(2)
    reward = make(assets)
    held_out = colours(RED, 64, generator)  # never seen by the discriminator
    mean = torch.tensor([-1.0, -1.0, 1.0], requires_grad=True)  # starts blue
    optimizer = torch.optim.Adam([mean], lr=0.15)
    groups, size = 2, 8

    def draw():
        latent = mean.detach() + 0.5 * torch.randn(groups * size, 3, generator=generator)
        return latent, solid(torch.sigmoid(latent))

    def distance(pixels):
        return float((pixels[:, :, 0, 0].mean(0) - held_out.mean(0)).norm())

    first_latent, first = draw()
    for step in range(25):
        latent, pixels = (first_latent, first) if step == 0 else draw()
        scores = score_reward(reward, pixels, ["p"] * len(pixels)).scores
        grouped = scores.view(groups, size)
        advantages = (
            (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
        ).flatten()
        log_probs = torch.distributions.Normal(mean, 0.5).log_prob(latent).sum(dim=1)
        optimizer.zero_grad()
        (-(advantages * log_probs).mean()).backward()
        optimizer.step()
        update_reward(reward, update_of(pixels, scores, step))
    _, last = draw()
    assert distance(last) < 0.5 * distance(first)  # the held-out distance to the references halves
    final_first = score_reward(reward, first, ["p"] * len(first)).scores.mean()
    final_last = score_reward(reward, last, ["p"] * len(last)).scores.mean()
    assert final_last > final_first + 0.2  # the discriminator prefers where the policy went


def test_training_step_is_the_hinge_loss_on_normalised_tokens(assets):
    """An independent Adam step on ``L_cls + 0.3 L_patch`` of L2-normalised Dinov2Model tokens, same draws."""
    generator = torch.Generator().manual_seed(3)
    reward = make(assets, lr=1e-2)
    fake_pixels = solid(colours(BLUE, 4, generator))
    head, draws = copy.deepcopy(reward.head), torch.Generator().set_state(reward.generator.get_state())
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    update_reward(reward, update_of(fake_pixels))

    def tokens(pixels):
        hidden = reward.tokens.model(pixel_values=reward.tokens.preprocess(pixels)).last_hidden_state
        return hidden / (hidden.norm(dim=-1, keepdim=True) + 1e-6)

    indices = torch.randint(0, len(reward.references), (4,), generator=draws)
    real = torch.cat([tokens(reward.references[int(i)][None].float() / 255) for i in indices])
    fake = tokens(fake_pixels)
    real_patches, fake_patches = sample_patches(real, 8, draws), sample_patches(fake, 8, draws)

    def hinge(real_logits, fake_logits):
        return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())

    loss = hinge(head(real[:, 0]), head(fake[:, 0])) + 0.3 * hinge(head(real_patches), head(fake_patches))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, value in head.state_dict().items():
        torch.testing.assert_close(reward.head.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    # scoring: 0.7 h(cls) + 0.3 mean over every patch of h(patch), on the same normalised tokens
    probe = solid(colours(RED, 3, generator))
    logits = reward.head(tokens(probe)).detach()
    expected = 0.7 * logits[:, 0] + 0.3 * logits[:, 1:].mean(dim=1)
    torch.testing.assert_close(score_reward(reward, probe, ["p"] * 3).scores, expected, rtol=1e-5, atol=1e-6)


def test_k_updates_per_step_and_the_while_ahead_gate(assets):
    generator = torch.Generator().manual_seed(4)
    pixels = solid(colours(BLUE, 4, generator))
    every = make(assets, updates_per_step=3)
    update_reward(every, update_of(pixels))
    assert every.trained_steps == 3
    gated = make(assets, schedule="while_ahead")
    start = copy.deepcopy(gated.head.state_dict())
    behind = update_reward(gated, update_of(pixels, scores=torch.full((4,), -100.0)))
    assert behind["adv_trained"] == 0.0 and gated.trained_steps == 0
    assert all(torch.equal(start[k], v) for k, v in gated.head.state_dict().items())
    ahead = update_reward(gated, update_of(pixels, scores=torch.full((4,), 100.0)))
    assert ahead["adv_trained"] == 1.0 and gated.trained_steps == 1
    assert ahead["adv_reference_mean"] < 100.0 and gated.updates == 2


def test_state_resumes_exactly(assets):
    generator = torch.Generator().manual_seed(5)
    batches = [solid(colours(BLUE, 4, generator)) for _ in range(4)]
    probe = solid(torch.rand(5, 3, generator=generator))
    original = make(assets, updates_per_step=2)
    for step, pixels in enumerate(batches[:2]):
        update_reward(original, update_of(pixels, step=step))
    buffer = io.BytesIO()
    torch.save({"parts": {"reward/adversarial": original.state_dict()}}, buffer)
    buffer.seek(0)
    restored = make(assets, updates_per_step=2, seed=7)  # another init: everything must come from the state
    restored.load_state_dict(torch.load(buffer, weights_only=True)["parts"]["reward/adversarial"])
    fresh = make(assets, updates_per_step=2)
    assert not torch.equal(
        score_reward(fresh, probe, ["p"] * 5).scores, score_reward(original, probe, ["p"] * 5).scores
    )
    for step, pixels in enumerate(batches[2:], start=2):
        assert update_reward(restored, update_of(pixels, step=step)) == update_reward(
            original, update_of(pixels, step=step)
        )
    assert torch.equal(
        score_reward(restored, probe, ["p"] * 5).scores, score_reward(original, probe, ["p"] * 5).scores
    )
    assert (restored.updates, restored.trained_steps) == (original.updates, original.trained_steps) == (4, 8)
    state = original.state_dict()
    with pytest.raises(RewardStateError, match="same DINOv2 model"):
        make(assets).load_state_dict({**state, "dimension": 64})


def test_missing_backbone_and_references_are_one_line(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="adversarial reference .* does not exist"):
        AdversarialReward(str(tmp_path / "none"), model=assets["dino"])
    with pytest.raises(Exception, match="does not exist") as error:
        check_reward_sources(AdversarialReward, {"model": str(tmp_path / "no_dino")}, "reward.terms[0]")
    assert "reward.terms[0].kwargs.model" in str(error.value) and "\n" not in str(error.value)
    built = build_reward("adversarial", references=assets["references"], model=assets["dino"], hidden=8)
    assert built.learns and built.head.layers[0].out_features == 8


def test_a_resumed_run_restores_the_head_and_ends_like_an_uninterrupted_one(assets, tmp_path):
    """Through the trainer: colour (weight 1) + adversarial (weight 0.5), stopped after step 3, resumed from the
    step-2 checkpoint; the head, its Adam state and its generator come back and the runs end alike."""
    from trainer_helpers import small_config

    from gen_rl.checkpoint import CheckpointManager
    from gen_rl.trainer import GenerationTrainer

    terms = (
        "reward.terms=[{name: colour, weight: 1.0}, {name: adversarial, weight: 0.5, kwargs: "
        f"{{references: '{assets['references']}', model: '{assets['dino']}', hidden: 16, num_patches: 4, "
        "lr: 0.01, updates_per_step: 2}}]"
    )
    overrides = (
        terms,
        "train.num_steps=3",
        "checkpoint.every_steps=2",
        "eval.every_steps=0",
        "sample.num_steps=2",
    )
    overrides += ("sample.group_size=2", "log.monitors=false")

    def state(trainer):
        return trainer.reward_models["adversarial_1"].state_dict()

    straight = GenerationTrainer(small_config(tmp_path / "straight", *overrides))
    straight.train()
    stopped = GenerationTrainer(small_config(tmp_path / "stopped", *overrides))
    for step in range(2):
        stopped.run_step(step)
    saved = state(stopped)
    record = stopped.run_step(2)  # lost in the "crash": the head learned from it, the checkpoint did not
    assert record["reward/adversarial_1/adv_trained"] == 2.0
    assert CheckpointManager(tmp_path / "stopped", 2).latest().name == "checkpoint-000002"
    del stopped
    resumed = GenerationTrainer(small_config(tmp_path / "stopped", *overrides), resume=True)
    restored = state(resumed)
    assert all(torch.equal(restored["head"][k], v) for k, v in saved["head"].items())
    assert torch.equal(restored["generator"], saved["generator"]) and restored["trained_steps"] == 4
    resumed.train()
    final, expected = state(resumed), state(straight)
    assert final["trained_steps"] == expected["trained_steps"] == 6
    for key, value in expected["head"].items():
        torch.testing.assert_close(final["head"][key], value, rtol=1e-5, atol=1e-6)
