"""Reward-hacking monitors: image statistics and diversity against hand-worked values; the trainer's wiring."""

from __future__ import annotations

import colorsys
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import small_config

from gen_rl.core.config import ConfigError
from gen_rl.metrics import plot_reward_curve
from gen_rl.monitoring import HackingMonitor
from gen_rl.trainer import GenerationTrainer
from gen_rl.trainer_config import GenerationConfig
from rewards.monitors import group_diversity, image_statistics, pixel_features


def constant_image(red: float, green: float, blue: float, size: int = 8) -> torch.Tensor:
    return torch.tensor([red, green, blue]).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_statistics_of_a_constant_colour_are_hand_worked():
    red, green, blue = 0.8, 0.4, 0.2
    stats = image_statistics(constant_image(red, green, blue))
    assert stats["brightness"].item() == pytest.approx(0.299 * red + 0.587 * green + 0.114 * blue, abs=1e-6)
    assert stats["contrast"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["saturation"].item() == pytest.approx((0.8 - 0.2) / 0.8, abs=1e-6)
    rg, yb = red - green, (red + green) / 2 - blue  # no spread: only the 0.3 * |mean| term
    assert stats["colourfulness"].item() == pytest.approx(0.3 * (rg**2 + yb**2) ** 0.5, abs=1e-6)


def test_statistics_of_two_halves_are_hand_worked():
    black_white = torch.zeros(1, 3, 4, 4)
    black_white[..., 2:] = 1.0
    stats = image_statistics(black_white)
    assert stats["brightness"].item() == pytest.approx(0.5)
    assert stats["contrast"].item() == pytest.approx(0.5)
    assert stats["saturation"].item() == pytest.approx(0.0)
    assert stats["colourfulness"].item() == pytest.approx(0.0, abs=1e-6)
    red_green = torch.zeros(1, 3, 4, 4)
    red_green[:, 0, :, :2] = 1.0
    red_green[:, 1, :, 2:] = 1.0
    # rg = +-1 (variance 1, mean 0); yb = 0.5 everywhere (variance 0, mean 0.5): 1 + 0.3 * 0.5
    assert image_statistics(red_green)["colourfulness"].item() == pytest.approx(1.15, abs=1e-6)
    assert image_statistics(red_green)["saturation"].item() == pytest.approx(1.0)


def test_saturation_matches_colorsys_per_pixel():
    pixels = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    expected = []
    for image in pixels.numpy():
        values = [colorsys.rgb_to_hsv(*image[:, y, x])[1] for y in range(5) for x in range(6)]
        expected.append(np.mean(values))
    assert image_statistics(pixels)["saturation"].numpy() == pytest.approx(np.array(expected), abs=1e-6)


def test_video_statistics_pool_all_frames():
    video = torch.rand(2, 3, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    stats = image_statistics(video)
    for sample in range(2):
        tiled = torch.cat(list(video[sample].unbind(dim=1)), dim=-1)[None]  # frames side by side
        for name, value in image_statistics(tiled).items():
            assert stats[name][sample].item() == pytest.approx(value.item(), abs=1e-6), name


def test_group_diversity_hand_worked():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    group_ids = torch.tensor([7, 7, 3, 3, 9])
    ids, diversity = group_diversity(features, group_ids)
    assert ids.tolist() == [3, 7, 9]
    assert diversity[0].item() == 0.0  # identical members: collapse
    assert diversity[1].item() == pytest.approx(5.0 / 2**0.5)  # |a - b| / sqrt(D)
    assert torch.isnan(diversity[2])  # one member: undefined
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    _, cosine = group_diversity(three, torch.zeros(3, dtype=torch.long), metric="cosine")
    # pairs: (1 - 0), (1 - (-1)), (1 - 0) -> mean 4 / 3
    assert cosine.item() == pytest.approx(4.0 / 3.0)
    with pytest.raises(ValueError, match="rms' or 'cosine"):
        group_diversity(three, torch.zeros(3, dtype=torch.long), metric="l1")


def test_pixel_features_average_areas():
    pixels = torch.zeros(1, 3, 4, 4)
    pixels[..., :2, :] = 1.0
    features = pixel_features(pixels, size=2).view(3, 2, 2)
    assert torch.equal(features[:, 0], torch.ones(3, 2)) and torch.equal(features[:, 1], torch.zeros(3, 2))


def test_video_pixel_features_are_every_frame_and_feed_diversity():
    video = torch.rand(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    features = pixel_features(video, size=2)
    per_frame = [pixel_features(video[:, :, frame], size=2) for frame in range(4)]
    assert torch.equal(features, torch.cat(per_frame, dim=1))  # frame-major: [B, T * C * size * size]
    blocks = video.reshape(3, 3, 4, 2, 4, 2, 4).mean(
        dim=(4, 6)
    )  # independent 4x4 block means [B, C, T, 2, 2]
    blocks = blocks.transpose(1, 2).flatten(1)
    torch.testing.assert_close(features, blocks, rtol=0, atol=1e-6)
    assert pixel_features(video.double(), size=2).dtype == torch.float64
    _, diversity = group_diversity(features, torch.tensor([0, 0, 1]))
    expected = (blocks[0] - blocks[1]).norm() / blocks.shape[1] ** 0.5
    assert diversity[0].item() == pytest.approx(expected.item(), abs=1e-6) and torch.isnan(diversity[1])
    same = video[[0, 0]].clone()  # a collapsed group of two videos: diversity 0
    assert group_diversity(pixel_features(same), torch.zeros(2, dtype=torch.long))[1].item() == 0.0


def test_trainer_logs_monitors_and_gold_rewards(tmp_path):
    config = small_config(
        tmp_path,
        "train.num_steps=1",
        "eval.every_steps=1",
        "eval.samples_per_prompt=2",
        "eval.gold=[{name: colour}, {name: jpeg_compressibility}]",
    )
    trainer = GenerationTrainer(config)
    batch = trainer.sample(0)
    record = trainer.monitors(batch)
    expected = image_statistics(batch.rollout.pixels)
    for name, values in expected.items():
        assert record[f"monitor/{name}"] == pytest.approx(values.mean().item(), abs=1e-6)
    _, diversity = group_diversity(pixel_features(batch.rollout.pixels), batch.group_ids)
    assert record["monitor/diversity"] == pytest.approx(diversity.mean().item(), abs=1e-6)
    assert record["monitor/diversity"] > 0

    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    evals = [r for r in records if "eval/reward/mean" in r]
    assert len(evals) == 2
    for r in evals:
        # the same reward optimised and gold gives the same number; the gold-only one is logged too
        assert r["eval/gold/colour"] == pytest.approx(r["eval/reward/colour"], abs=1e-6)
        assert math.isfinite(r["eval/gold/jpeg_compressibility_1"])
        assert r["eval/monitor/diversity"] > 0
        assert 0.0 <= r["eval/monitor/brightness"] <= 1.0
    assert "reward/jpeg_compressibility_1/mean" not in records[0]  # gold rewards are never optimised
    assert all("monitor/saturation" in r for r in records if "reward/mean" in r)
    with Image.open(tmp_path / "reward_curve.png") as image:
        assert image.width > 1000  # the optimised-vs-gold panel sits beside the reward curve


def test_monitors_can_be_switched_off(tmp_path):
    trainer = GenerationTrainer(small_config(tmp_path, "log.monitors=false"))
    batch = trainer.sample(0)
    assert trainer.monitors(batch) == {}


def test_eval_monitor_with_one_sample_per_prompt_has_no_diversity():
    record = HackingMonitor.record(torch.rand(4, 4), torch.full((4,), float("nan")), prefix="eval/monitor/")
    assert "eval/monitor/diversity" not in record and "eval/monitor/brightness" in record


def test_remote_drop_with_nan_abort_is_a_config_error(tmp_path):
    terms = "reward.terms=[{name: remote, kwargs: {url: 'http://127.0.0.1:1', on_failure: drop}}]"
    with pytest.raises(ConfigError, match="nan_policy: drop"):
        small_config(tmp_path, terms, "reward.nan_policy=abort")
    assert isinstance(small_config(tmp_path, terms, "reward.nan_policy=drop"), GenerationConfig)


def test_plot_without_gold_has_one_panel(tmp_path):
    records = [{"step": 0, "reward/mean": 0.1, "reward/std": 0.0, "eval/reward/mean": 0.2}]
    with Image.open(plot_reward_curve(records, tmp_path / "curve.png")) as image:
        assert image.width < 1000
