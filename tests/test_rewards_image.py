"""Weight-free image rewards (DDPO's JPEG sizes, the colour reward), the reward protocol and the registry."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import REWARDS, ColourReward, Reward, RewardOutput, build_reward
from rewards.compression import JpegCompressibility, JpegIncompressibility


def _as_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 arrays to ``[B, 3, H, W]`` floats in [0, 1]."""
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images]).float() / 255


def _pil_jpeg_kb(image: np.ndarray, quality: int) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def _solid(rgb: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size)


# ----- JPEG (DDPO) -------------------------------------------------------------------------------------------
def test_jpeg_rewards_equal_the_pil_file_size_in_kb():
    flat = np.full((64, 64, 3), (200, 40, 90), dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    pixels = _as_pixels([flat, noise])
    expected_kb = [_pil_jpeg_kb(flat, 95), _pil_jpeg_kb(noise, 95)]
    assert expected_kb[0] < 2 and expected_kb[1] > 5  # the flat image compresses far better than noise

    compressibility = JpegCompressibility()(pixels, ["a", "b"])
    incompressibility = JpegIncompressibility()(pixels, ["a", "b"], [{}, {}])
    assert compressibility.scores.tolist() == pytest.approx([-kb for kb in expected_kb], rel=1e-6)
    assert incompressibility.scores.tolist() == pytest.approx(expected_kb, rel=1e-6)
    assert compressibility.components["jpeg_kb"].tolist() == pytest.approx(expected_kb, rel=1e-6)
    assert compressibility.scores[0] > compressibility.scores[1]


def test_jpeg_quality_is_used_and_checked():
    noise = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    score = JpegIncompressibility(quality=10)(_as_pixels([noise]), ["a"]).scores.item()
    assert score == pytest.approx(_pil_jpeg_kb(noise, 10), rel=1e-6)
    assert score < _pil_jpeg_kb(noise, 95)
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        JpegCompressibility(quality=0)


# ----- colour ------------------------------------------------------------------------------------------------
def test_colour_score_of_a_solid_image():
    grey, red = _solid((0.5, 0.5, 0.5)), _solid((1.0, 0.0, 0.0))
    output = ColourReward()(torch.stack([grey, red, red]), ["A RED ball", "a red ball", "green, then red"])
    # grey to red: sqrt(0.5^2 * 3) = sqrt(3) / 2, half the cube diagonal -> 0.5; red to red: 1.
    # "green, then red": the first colour in the prompt is green; red to green is sqrt(2).
    expected_distance = [math.sqrt(3) / 2, 0.0, math.sqrt(2)]
    assert output.components["colour_distance"].tolist() == pytest.approx(expected_distance, abs=1e-6)
    assert output.scores.tolist() == pytest.approx([0.5, 1.0, 1 - math.sqrt(2 / 3)], abs=1e-6)


def test_colour_score_of_a_two_half_image():
    image = torch.zeros(1, 3, 4, 6)
    image[0, 0, :, :3] = 1.0  # left half pure red: distance 0
    image[0, 2, :, 3:] = 1.0  # right half pure blue: distance sqrt(2) to red
    output = ColourReward()(image, ["a red and blue flag"])
    assert output.components["colour_distance"].item() == pytest.approx(math.sqrt(2) / 2, abs=1e-6)
    assert output.scores.item() == pytest.approx(1 - 1 / math.sqrt(6), abs=1e-6)


def test_metadata_colour_overrides_the_prompt():
    blue, grey = _solid((0.0, 0.0, 1.0)), _solid((0.5, 0.5, 0.5))
    records = [{"colour": "Blue"}, {"color": [0.5, 0.5, 0.5]}, {"colour": None}]
    output = ColourReward()(torch.stack([blue, grey, grey]), ["a red ball"] * 3, records)
    assert output.scores.tolist() == pytest.approx([1.0, 1.0, 0.5], abs=1e-6)
    with pytest.raises(ValueError, match="not in the palette"):
        ColourReward()(blue[None], ["a red ball"], [{"colour": "vermilion"}])
    with pytest.raises(ValueError, match=r"3 numbers \[r, g, b\] in \[0, 1\]"):
        ColourReward()(blue[None], ["a red ball"], [{"colour": [0, 0, 255]}])


def test_prompt_without_a_colour_word_gets_nan():
    pixels = torch.stack([_solid((1.0, 0.0, 0.0))] * 5)
    prompts = ["a bored cat", "Fred's credit card", "a redder sky", "a dog", "red"]
    output = ColourReward()(pixels, prompts)
    assert (
        torch.isnan(output.scores[:4]).all() and torch.isnan(output.components["colour_distance"][:4]).all()
    )
    assert output.scores[4].item() == 1.0


def test_custom_palette_replaces_the_default():
    reward = ColourReward(colours={"Teal": [0.0, 0.5, 0.5], "sky blue": [0.5, 0.8, 1.0]})
    assert reward.colour_in("a red teal boat") == "teal"
    assert reward.colour_in("a SKY   BLUE kite") == "sky blue"
    assert reward.colour_in("a red boat") is None
    with pytest.raises(ValueError, match="colour 'bad'"):
        ColourReward(colours={"bad": [1.0, 2.0, 0.0]})


# ----- the protocol ------------------------------------------------------------------------------------------
class _FramesMean(Reward):
    """A real (tiny) video reward: the mean pixel value, returned as float64 on purpose."""

    modality = "video"

    def score(self, pixels, prompts, metadata):
        return RewardOutput(scores=pixels.double().mean(dim=(1, 2, 3, 4)))


def test_input_validation_names_the_fix():
    reward = ColourReward()
    pixels = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"pass pixels in \[0, 1\]"):
        reward(pixels * 255, ["red", "red"])
    with pytest.raises(ValueError, match="float tensor"):
        reward((pixels * 255).to(torch.uint8), ["red", "red"])
    with pytest.raises(ValueError, match=r"image reward .* got video pixels \[B, C, T, H, W\]"):
        reward(torch.rand(2, 3, 5, 4, 4), ["red", "red"])
    with pytest.raises(ValueError, match=r"video reward .* got image pixels \[B, C, H, W\]"):
        _FramesMean()(pixels, ["red", "red"])
    with pytest.raises(ValueError, match="2 samples, 1 prompts"):
        reward(pixels, ["red"])
    with pytest.raises(ValueError, match="3 metadata records"):
        reward(pixels, ["red", "red"], [{}, {}, {}])


def test_output_is_float32_cpu_with_nan_for_non_finite_pixels():
    video = torch.full((3, 3, 2, 4, 4), 0.25, dtype=torch.float64)
    video[1, 0, 0, 0, 0] = float("nan")
    video[2] = 1.00005  # inside the 1e-4 tolerance: accepted and clamped to 1
    output = _FramesMean()(video, ["a", "b", "c"], [])
    assert output.scores.dtype == torch.float32 and output.scores.device.type == "cpu"
    assert output.scores[0].item() == 0.25 and math.isnan(output.scores[1]) and output.scores[2].item() == 1.0


# ----- the registry ------------------------------------------------------------------------------------------
def test_registry_names_aliases_and_dotted_paths():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "colour", "color"} <= set(REWARDS)
    assert type(build_reward("colour")) is ColourReward and type(build_reward("color")) is ColourReward
    assert build_reward("jpeg_compressibility", quality=50).quality == 50
    custom = build_reward("rewards.colour:ColourReward", colours={"red": [1, 0, 0]})
    assert type(custom) is ColourReward and list(custom.palette) == ["red"]


def test_registry_errors_name_the_fix():
    with pytest.raises(ValueError, match="Did you mean 'jpeg_compressibility'"):
        build_reward("jpeg_compresibility")
    with pytest.raises(TypeError, match=r"'colour' \(ColourReward\).*'colors'.*accepts: colours"):
        build_reward("colour", colors={"red": [1, 0, 0]})
    with pytest.raises(TypeError, match="not a Reward subclass"):
        build_reward("gen_rl.core.images:to_uint8")


def test_deduplicate_keeps_first_seen_order_and_maps_every_prompt():
    from rewards.base import deduplicate

    unique, rows = deduplicate(["b", "a", "b", "c", "a"])
    assert unique == ["b", "a", "c"] and rows == [0, 1, 0, 2, 1]
    assert deduplicate([]) == ([], [])


def test_per_sample_text_fills_empty_metadata_and_names_the_owner_of_a_mismatch():
    from rewards.base import per_sample_text

    prompts, records = per_sample_text(("a", "b"), None, 2, "owner")
    assert prompts == ["a", "b"] and records == [{}, {}]
    with pytest.raises(ValueError, match="owner got 2 samples, 1 prompts and 2 metadata records"):
        per_sample_text(["a"], [{}, {}], 2, "owner")
