"""HPS v2 / v2.1 (tiny random open_clip ViT of the ViT-H-14 family, saved like the published files) and the
thresholded (DanceGRPO binary) reward."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from rewards import Reward, RewardOutput, build_reward
from rewards.binary import BinaryReward
from rewards.hps import HPS_PUBLISHED, CheckpointMismatchError, HPSReward, hps_filename
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rewards.tiny import save_tiny_hps
from rewards.weights import MissingWeightsError

PROMPTS = ["a photo of a cat", "an oil painting of a dog", "a photo of a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config JSON, the folder of its two checkpoints and the v2.1 reward loaded from them."""
    folder = tmp_path_factory.mktemp("tiny_hps")
    config_path, _ = save_tiny_hps(folder, seed=0)
    reward = build_reward("hps", arch=str(config_path), checkpoint=str(folder), version="v2.1", device="cpu")
    return {"config": config_path, "folder": folder, "reward": reward}


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _black_white_noise(height: int, width: int, seed: int) -> np.ndarray:
    """Pixels 0 or 255: the bicubic resize overshoots [0, 1] (a clamp would show)."""
    return (np.random.default_rng(seed).integers(0, 2, size=(height, width, 3)) * 255).astype(np.uint8)


def _as_pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(array).permute(2, 0, 1) for array in arrays]).float() / 255


def _hpsv2_eval_transform(image_size: int) -> T.Compose:
    """The hpsv2 open_clip fork's ``image_transform(is_train=False)``: ToTensor first, then a tensor resize."""
    return T.Compose(
        [
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.Normalize(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
        ]
    )


def _reference_inputs(arrays: list[np.ndarray], image_size: int) -> torch.Tensor:
    transform = _hpsv2_eval_transform(image_size)
    return torch.stack([transform(Image.fromarray(array)) for array in arrays])


def _reference_model(tiny, version: str = "v2.1") -> torch.nn.Module:
    """The tiny model built and loaded with open_clip directly, as hpsv2 does (no reward code)."""
    model = open_clip.create_model(tiny["config"].stem, pretrained=None)
    checkpoint = torch.load(tiny["folder"] / hps_filename(version), map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


# ----- preprocessing -----------------------------------------------------------------------------------------
def test_preprocess_matches_the_hpsv2_eval_transform(tiny):
    reward = tiny["reward"]
    assert reward.model.visual.image_size == (32, 32)
    # 53x72 -> 32x43: an odd crop margin (11, offset round(5.5) = 6, not floor 5); 40x80: a 2:1 landscape.
    odd = _black_white_noise(53, 72, seed=2)
    for array in (_noise(53, 72, seed=0), odd, _noise(40, 80, seed=1)):
        expected = _reference_inputs([array], 32)
        got = reward.preprocess(_as_pixels([array]))
        assert got.shape == expected.shape == (1, 3, 32, 32)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the comparison can tell the rounding and the clamp apart
    odd = _as_pixels([odd])
    for variant in ({"crop_rounding": "floor"}, {"clamp": True}):
        other = dataclasses.replace(reward.preprocess, **variant)
        assert (other(odd) - reward.preprocess(odd)).abs().max() > 1e-2


# ----- score -------------------------------------------------------------------------------------------------
def test_hps_score_is_the_diagonal_of_open_clip_features(tiny):
    reward = tiny["reward"]
    assert isinstance(reward, HPSReward) and reward.checkpoint_path.name == "HPS_v2.1_compressed.pt"
    arrays = [_noise(53, 72, seed=seed) for seed in range(3)]
    model = _reference_model(tiny)
    with torch.no_grad():
        image_features, text_features, _ = model(
            _reference_inputs(arrays, 32), open_clip.get_tokenizer(tiny["config"].stem)(PROMPTS)
        )
    expected = torch.diagonal(image_features @ text_features.T)

    output = reward(_as_pixels(arrays), PROMPTS)
    torch.testing.assert_close(output.scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward.embed_images(_as_pixels(arrays)), image_features, atol=1e-5, rtol=0)
    # the prompt of each sample matters: pairing the images with other prompts changes the scores
    swapped = reward(_as_pixels(arrays), PROMPTS[1:] + PROMPTS[:1]).scores
    assert (swapped - output.scores).abs().max() > 1e-3


def test_versions_pick_their_files_and_a_bare_state_dict_loads(tiny, tmp_path):
    pixels, prompts = _as_pixels([_noise(48, 40, seed=5), _noise(48, 40, seed=6)]), PROMPTS[:2]
    v21 = tiny["reward"](pixels, prompts).scores
    v2 = build_reward(
        "hps", arch=str(tiny["config"]), checkpoint=str(tiny["folder"]), version="v2", device="cpu"
    )
    assert v2.checkpoint_path.name == "HPS_v2_compressed.pt" == hps_filename("v2.0")
    assert (v2(pixels, prompts).scores - v21).abs().min() > 1e-4

    bare = tmp_path / "bare.pt"  # a bare state dict, given as a file path
    state = torch.load(tiny["folder"] / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save(state, bare)
    from_bare = HPSReward(checkpoint=str(bare), arch=str(tiny["config"]), device="cpu", batch_size=1)
    torch.testing.assert_close(from_bare(pixels, prompts).scores, v21, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"v2\.1"):
        HPSReward(version="v3", checkpoint=str(tiny["folder"]), arch=str(tiny["config"]))


# ----- errors ------------------------------------------------------------------------------------------------
def test_missing_checkpoints_name_the_file_and_where_it_is_published(tiny, tmp_path, monkeypatch):
    arch = str(tiny["config"])
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt") as error:
        HPSReward(checkpoint=str(tmp_path), arch=arch)
    assert HPS_PUBLISHED == "https://huggingface.co/xswu/HPSv2" and HPS_PUBLISHED in str(error.value)
    with pytest.raises(MissingWeightsError, match="HPS_v2_compressed.pt") as error:
        HPSReward(version="v2", checkpoint=str(tmp_path / "nowhere" / "hps.pt"), arch=arch)
    assert HPS_PUBLISHED in str(error.value)

    # the default hub repo, offline and not cached: fails before building ViT-H-14, without the network
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt") as error:
        build_reward("hps")
    assert "xswu/HPSv2" in str(error.value) and HPS_PUBLISHED in str(error.value)


def test_a_checkpoint_that_does_not_fit_the_arch_names_keys(tiny, tmp_path):
    state = torch.load(tiny["folder"] / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    del state["text_projection"]
    state["score_predictor.weight"] = torch.zeros(1, 32)
    state["positional_embedding"] = torch.zeros(10, 32)
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(CheckpointMismatchError) as error:
        HPSReward(checkpoint=str(tmp_path), arch=str(tiny["config"]), device="cpu")
    message = str(error.value)
    for name in (tiny["config"].stem, "text_projection", "score_predictor.weight", "positional_embedding"):
        assert name in message

    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="state_dict"):
        HPSReward(checkpoint=str(tmp_path / "odd.pt"), arch=str(tiny["config"]))


# ----- gradients ---------------------------------------------------------------------------------------------
def test_hps_score_is_differentiable_in_the_pixels(tiny):
    reward = tiny["reward"]
    pixels = (
        0.2 + 0.6 * torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    ).requires_grad_()
    reward(pixels, PROMPTS[:2]).scores.sum().backward()
    gradient = pixels.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    # the gradient is the score's: a central difference along it matches its norm
    direction = gradient / gradient.norm()
    step = 1e-2
    with torch.no_grad():
        plus = reward(pixels + step * direction, PROMPTS[:2]).scores.sum()
        minus = reward(pixels - step * direction, PROMPTS[:2]).scores.sum()
    assert ((plus - minus) / (2 * step)).item() == pytest.approx(gradient.norm().item(), rel=0.05)


# ----- binary (DanceGRPO) ------------------------------------------------------------------------------------
def _solid(rgb: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size)


class _Constant(Reward):
    """A video reward scoring ``metadata["value"]``."""

    modality = "video"

    def score(self, pixels: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(
            scores=torch.tensor([record["value"] for record in metadata], dtype=torch.float32)
        )


def test_binary_thresholds_the_inner_score():
    red, grey = _solid((1.0, 0.0, 0.0)), _solid((0.5, 0.5, 0.5))
    pixels = torch.stack([red, grey, red])
    prompts = ["a red ball", "a red ball", "a green ball"]
    # colour scores: red on red 1; grey on red 1 - (sqrt(3) / 2) / sqrt(3) = 0.5; red on green 1 - sqrt(2/3)
    raw = [1.0, 0.5, 1 - math.sqrt(2 / 3)]
    output = build_reward("binary", reward="colour", threshold=0.5)(pixels, prompts)
    assert output.scores.tolist() == [1.0, 0.0, 0.0]  # 0.5 is not above 0.5
    assert output.components["colour_raw"].tolist() == pytest.approx(raw, abs=1e-6)
    assert "colour_distance" in output.components
    custom = BinaryReward("colour", threshold=0.1, above=2.0, below=-1.0)(pixels, prompts)
    assert custom.scores.tolist() == [2.0, 2.0, 2.0]
    assert BinaryReward("colour", threshold=0.7, above=2.0, below=-1.0)(pixels, prompts).scores.tolist() == [
        2.0,
        -1.0,
        -1.0,
    ]


def test_binary_propagates_nan():
    pixels = torch.stack([_solid((1.0, 0.0, 0.0))] * 3)
    pixels[2, 0, 0, 0] = float("nan")  # a diverged decode
    output = BinaryReward("colour", threshold=0.5)(pixels, ["a red ball", "a ball", "a red ball"])
    assert output.scores[0].item() == 1.0
    assert torch.isnan(output.scores[1:]).all() and torch.isnan(output.components["colour_raw"][1:]).all()


def test_binary_follows_the_inner_modality_and_name():
    binary = BinaryReward(_Constant(), threshold=0.0)
    assert binary.modality == "video" and BinaryReward("colour", threshold=0.0).modality == "image"
    output = binary(torch.zeros(3, 3, 2, 4, 4), ["a", "b", "c"], [{"value": v} for v in (-1.0, 0.0, 3.0)])
    assert output.scores.tolist() == [0.0, 0.0, 1.0]
    assert output.components["_Constant_raw"].tolist() == [-1.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="video reward"):
        binary(torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
    with pytest.raises(ValueError, match="kwargs"):
        BinaryReward(_Constant(), threshold=0.0, kwargs={"value": 1})


def test_binary_builds_the_inner_reward_by_name_with_its_kwargs():
    binary = build_reward("binary", reward="jpeg_incompressibility", threshold=1.0, kwargs={"quality": 10})
    assert binary.inner.quality == 10
    with pytest.raises(TypeError, match="quality"):
        build_reward("binary", reward="jpeg_incompressibility", threshold=1.0, kwargs={"qualty": 10})
    with pytest.raises(ValueError, match=r"unknown reward 'colur'.*Known: .*colour"):
        build_reward("binary", reward="colur", threshold=0.5)
