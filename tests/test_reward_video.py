"""Video rewards: InstructVideo's segmental reward (SegVR + TAR) and DINOv2 temporal consistency.

Expected values are written out by hand from the frames' known per-frame rewards.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import rewards.video  # noqa: F401  (registers "segmental" and "temporal_consistency")
from rewards import ColourReward, Reward, RewardOutput, build_reward
from rewards.dino import DinoEmbedder
from rewards.tiny import save_tiny_dino
from rewards.video import (
    SegmentalVideoReward,
    TemporalConsistency,
    segment_frame_indices,
    temporal_attenuation,
)

SIZE = 8  # frames are SIZE x SIZE for the weight-free rewards


def _ramp_video(num_frames: int, step: float = 0.1, size: int = SIZE) -> Tensor:
    """One video ``[1, 3, T, size, size]`` whose frame ``t`` is the constant ``t * step``."""
    values = torch.arange(num_frames, dtype=torch.float32) * step
    return values.view(1, 1, num_frames, 1, 1).expand(1, 3, num_frames, size, size).clone()


def _constant_video(value: float, num_frames: int, size: int = SIZE) -> Tensor:
    return torch.full((1, 3, num_frames, size, size), value)


class MeanPixel(Reward):
    """Test image reward: the mean pixel value; component ``double`` = 2 * mean. Counts its calls."""

    def __init__(self, nan_above: float | None = None) -> None:
        self.calls: list[tuple[Tensor, list[str], list[dict]]] = []
        self.nan_above = nan_above

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        self.calls.append((pixels.clone(), list(prompts), list(metadata)))
        means = pixels.mean(dim=(1, 2, 3))
        if self.nan_above is not None:
            means = means.masked_fill(means > self.nan_above, float("nan"))
        return RewardOutput(scores=means, components={"double": 2 * means})


# ----- frame selection ---------------------------------------------------------------------------------------
def test_segment_indices_for_16_frames_in_4_segments():
    # segments [0, 4), [4, 8), [8, 12), [12, 16)
    assert segment_frame_indices(16, 4, selection="first").tolist() == [[0], [4], [8], [12]]
    assert segment_frame_indices(16, 4, 2, selection="first").tolist() == [[0, 1], [4, 5], [8, 9], [12, 13]]
    # uniform: centres at (j + 1/2) * 4 / k inside each segment -> offset 2 for k = 1, offsets 1 and 3 for k = 2
    assert segment_frame_indices(16, 4).tolist() == [[2], [6], [10], [14]]
    assert segment_frame_indices(16, 4, 2).tolist() == [[1, 3], [5, 7], [9, 11], [13, 15]]
    assert segment_frame_indices(16, 4, 4).tolist() == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    assert segment_frame_indices(16, 4).dtype == torch.long


def test_segment_boundaries_keep_the_tail_when_segments_do_not_divide_frames():
    # floor(s * 10 / 4) = 0, 2, 5, 7, 10: segments of 2, 3, 2, 3 frames (VGen's span 2 would drop frames 8, 9)
    assert segment_frame_indices(10, 4, selection="first").tolist() == [[0], [2], [5], [7]]
    assert segment_frame_indices(10, 4, 2, selection="first").tolist() == [[0, 1], [2, 3], [5, 6], [7, 8]]
    # uniform k = 1: offset floor(L / 2) -> 0 + 1, 2 + 1, 5 + 1, 7 + 1
    assert segment_frame_indices(10, 4).tolist() == [[1], [3], [6], [8]]
    assert segment_frame_indices(10, 10).tolist() == [[t] for t in range(10)]


def test_random_selection_stays_in_its_segment_and_follows_the_generator():
    bounds = [0, 2, 5, 7, 10]
    draws = [segment_frame_indices(10, 4, 2, "random", torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])  # same seed, same frames
    generator = torch.Generator().manual_seed(7)
    sequence = [segment_frame_indices(10, 4, 2, "random", generator) for _ in range(20)]
    assert torch.equal(sequence[0], draws[0])
    for indices in sequence:
        for s, (first, second) in enumerate(indices.tolist()):
            assert bounds[s] <= first < second < bounds[s + 1]  # distinct, ascending, inside segment s
    assert len({tuple(indices.flatten().tolist()) for indices in sequence}) > 1  # the generator advances
    seen = {t for indices in sequence for t in indices.flatten().tolist()}
    assert seen == set(range(10))  # every frame of every segment gets picked sometime


def test_segment_selection_errors():
    with pytest.raises(ValueError, match="3 frames cannot be split into 4 segments"):
        segment_frame_indices(3, 4)
    with pytest.raises(ValueError, match="segment 0 .* has 2 frames, fewer than frames_per_segment=3"):
        segment_frame_indices(10, 4, 3)
    with pytest.raises(ValueError, match="selection must be one of"):
        segment_frame_indices(16, 4, selection="middle")
    with pytest.raises(ValueError, match="segments must be >= 1"):
        segment_frame_indices(16, 0)


def test_temporal_attenuation_coefficients():
    indices = torch.tensor([[0], [4], [8], [12]])
    # T // 2 = 8: distances 8, 4, 0, 4
    expected = [math.exp(-4.0), math.exp(-2.0), 1.0, math.exp(-2.0)]
    coefficients = temporal_attenuation(indices, 16, 0.5)
    assert coefficients.shape == (4, 1) and coefficients.dtype == torch.float32
    assert coefficients.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    # T = 7: T // 2 = 3 (VGen's integer centre)
    assert temporal_attenuation(torch.tensor([2, 3, 6]), 7, 1.0).tolist() == pytest.approx(
        [math.exp(-1.0), 1.0, math.exp(-3.0)], rel=1e-6
    )
    assert temporal_attenuation(indices, 16, 0.0).tolist() == [[1.0]] * 4
    with pytest.raises(ValueError, match=">= 0"):
        temporal_attenuation(indices, 16, -1.0)


# ----- SegVR / TAR -------------------------------------------------------------------------------------------
def test_segmental_reward_values_by_hand():
    # sample 0: frame t is t / 10 (T = 8); "first" picks frames 0, 2, 4, 6 -> rewards 0, 0.2, 0.4, 0.6.
    # sample 1: every frame 0.5.
    video = torch.cat([_ramp_video(8), _constant_video(0.5, 8)])
    prompts = ["a", "b"]

    plain = SegmentalVideoReward(MeanPixel(), segments=4, selection="first")(video, prompts)
    assert plain.scores.tolist() == pytest.approx([0.3, 0.5], abs=1e-6)
    assert [plain.components[f"segment_{s}"][0].item() for s in range(4)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.6], abs=1e-6
    )
    assert plain.components["segment_spread"].tolist() == pytest.approx([0.6, 0.0], abs=1e-6)
    assert plain.components["double"].tolist() == pytest.approx([0.6, 1.0], abs=1e-6)

    # TAR, lambda 0.5: T // 2 = 4, distances 4, 2, 0, 2 -> c = e^-2, e^-1, 1, e^-1
    e1, e2 = math.exp(-1.0), math.exp(-2.0)
    vgen = SegmentalVideoReward(MeanPixel(), segments=4, selection="first", attenuation=0.5)(video, prompts)
    # VGen: mean over segments of c * r, not renormalised
    expected_vgen = [(0.0 * e2 + 0.2 * e1 + 0.4 * 1.0 + 0.6 * e1) / 4, 0.5 * (e2 + 2 * e1 + 1.0) / 4]
    assert vgen.scores.tolist() == pytest.approx(expected_vgen, abs=1e-6)
    assert expected_vgen[0] == pytest.approx(0.17358, abs=1e-5)
    # the segment components stay unweighted
    assert vgen.components["segment_3"].tolist() == pytest.approx([0.6, 0.5], abs=1e-6)

    normalized = SegmentalVideoReward(
        MeanPixel(), segments=4, selection="first", attenuation=0.5, normalize_weights=True
    )(video, prompts)
    expected_normalized = [(0.2 * e1 + 0.4 + 0.6 * e1) / (e2 + 2 * e1 + 1.0), 0.5]
    assert normalized.scores.tolist() == pytest.approx(expected_normalized, abs=1e-6)
    assert expected_normalized[0] == pytest.approx(0.37106, abs=1e-5)


def test_segmental_reward_with_uniform_selection_and_two_frames_per_segment():
    # T = 8, S = 2, k = 2, uniform: segments [0, 4), [4, 8) -> frames 1, 3 | 5, 7 -> rewards 0.1, 0.3 | 0.5, 0.7
    video = _ramp_video(8)
    output = SegmentalVideoReward(MeanPixel(), segments=2, frames_per_segment=2)(video, ["a"])
    assert output.scores.item() == pytest.approx(0.4, abs=1e-6)
    assert output.components["segment_0"].item() == pytest.approx(0.2, abs=1e-6)
    assert output.components["segment_1"].item() == pytest.approx(0.6, abs=1e-6)
    assert output.components["segment_spread"].item() == pytest.approx(0.4, abs=1e-6)
    # TAR lambda 1 with T // 2 = 4: distances 3, 1, 1, 3
    tar = SegmentalVideoReward(MeanPixel(), segments=2, frames_per_segment=2, attenuation=1.0)(video, ["a"])
    e1, e3 = math.exp(-1.0), math.exp(-3.0)
    assert tar.scores.item() == pytest.approx((0.1 * e3 + 0.3 * e1 + 0.5 * e1 + 0.7 * e3) / 4, abs=1e-6)


def test_the_image_reward_gets_all_selected_frames_in_one_call():
    inner = MeanPixel()
    reward = SegmentalVideoReward(inner, segments=4, frames_per_segment=2, selection="first")
    video = torch.cat([_ramp_video(8), _ramp_video(8, step=0.05)])
    reward(video, ["p0", "p1"], [{"id": 0}, {"id": 1}])
    reward(video, ["p0", "p1"])
    assert len(inner.calls) == 2  # one inner call per outer call
    frames, prompts, metadata = inner.calls[0]
    assert frames.shape == (16, 3, SIZE, SIZE)  # B * S * k frames, video-major
    assert frames[:, 0, 0, 0].tolist() == pytest.approx(
        [0.1 * t for t in range(8)] + [0.05 * t for t in range(8)], abs=1e-6
    )
    assert prompts == ["p0"] * 8 + ["p1"] * 8
    assert metadata == [{"id": 0}] * 8 + [{"id": 1}] * 8
    assert inner.calls[1][2] == [{}] * 16


def test_nan_frame_reward_gives_a_nan_video_only():
    # frames of sample 0 are t / 10; the inner reward is NaN above 0.55 -> frame 6 (picked by "first") is NaN
    video = torch.cat([_ramp_video(8), _constant_video(0.5, 8)])
    output = SegmentalVideoReward(MeanPixel(nan_above=0.55), segments=4, selection="first")(video, ["a", "b"])
    assert math.isnan(output.scores[0].item())
    assert output.scores[1].item() == pytest.approx(0.5, abs=1e-6)
    assert output.components["segment_0"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(output.components["segment_3"][0].item())


def test_random_selection_is_reproducible_and_advances():
    # frame t is t / 20, so the score (mean of one frame per segment) reveals the frames picked
    video = torch.cat([_ramp_video(16, step=0.05)] * 3)

    def run(seed: int) -> list[list[float]]:
        reward = SegmentalVideoReward(MeanPixel(), segments=4, selection="random", seed=seed)
        return [reward(video, ["a"] * 3).scores.tolist() for _ in range(4)]

    first, again = run(3), run(3)
    assert first == again  # same seed, same sequence of draws
    flattened = [score for call in first for score in call]
    assert len({round(first[0][0], 6), round(first[1][0], 6), round(first[2][0], 6)}) > 1  # across calls
    # as VGen, each video of the batch gets its own draw: identical videos score differently in one call
    assert any(len({round(score, 6) for score in call}) > 1 for call in first)
    for score in flattened:
        # frames s * 4 + u with u in [0, 4): score = (24 + sum u) / 4 * 0.05 in [0.3, 0.45]
        assert 0.3 - 1e-6 <= score <= 0.45 + 1e-6
        assert (score / 0.05 * 4) == pytest.approx(round(score / 0.05 * 4), abs=1e-3)


def _colour_video(*colours: tuple[float, float, float]) -> Tensor:
    """One video ``[1, 3, T, SIZE, SIZE]`` whose frame ``t`` is the solid colour ``colours[t]``."""
    frames = torch.tensor(colours, dtype=torch.float32).T  # [3, T]
    return frames.view(1, 3, len(colours), 1, 1).expand(1, 3, len(colours), SIZE, SIZE).contiguous()


RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
BLUE_FOR_RED = 1 - math.sqrt(2 / 3)  # colour score of a pure blue frame for "red": 1 - sqrt(2) / sqrt(3)


def test_segmental_colour_reward_built_by_name():
    # frames red, red, blue, blue; 2 segments, uniform -> frames 1 (red) and 3 (blue)
    video = _colour_video(RED, RED, BLUE, BLUE)
    reward = build_reward("segmental", reward="colour", segments=2)
    assert isinstance(reward, SegmentalVideoReward) and isinstance(reward.reward, ColourReward)
    output = reward(video, ["a red car"])
    assert output.scores.item() == pytest.approx((1.0 + BLUE_FOR_RED) / 2, abs=1e-6)
    assert output.components["segment_0"].item() == pytest.approx(1.0, abs=1e-6)
    assert output.components["segment_1"].item() == pytest.approx(BLUE_FOR_RED, abs=1e-6)
    assert output.components["segment_spread"].item() == pytest.approx(math.sqrt(2 / 3), abs=1e-6)
    assert output.components["colour_distance"].item() == pytest.approx(math.sqrt(2) / 2, abs=1e-6)
    # a prompt naming no colour -> NaN from the colour reward -> NaN for the video
    assert math.isnan(reward(video, ["a car"]).scores.item())


def test_segmental_selection_and_inner_kwargs_reach_the_frames():
    # frames red, blue, blue, blue; segments [0, 2), [2, 4)
    video = _colour_video(RED, BLUE, BLUE, BLUE)
    uniform = build_reward("segmental", reward="colour", segments=2)  # frames 1, 3: blue, blue
    first = build_reward(
        "segmental", reward="colour", segments=2, selection="first"
    )  # frames 0, 2: red, blue
    assert uniform(video, ["a red car"]).scores.item() == pytest.approx(BLUE_FOR_RED, abs=1e-6)
    assert first(video, ["a red car"]).scores.item() == pytest.approx((1.0 + BLUE_FOR_RED) / 2, abs=1e-6)
    # kwargs build the inner reward: a palette where "red" is pure blue
    remapped = build_reward("segmental", reward="colour", kwargs={"colours": {"red": [0, 0, 1]}}, segments=2)
    assert remapped(video, ["a red car"]).scores.item() == pytest.approx(1.0, abs=1e-6)


def test_modality_errors_name_images_and_videos():
    video, image = _ramp_video(4), torch.full((1, 3, SIZE, SIZE), 0.5)
    segmental = SegmentalVideoReward(MeanPixel(), segments=2)
    with pytest.raises(
        ValueError, match=r"video reward and takes pixels \[B, C, T, H, W\]; got image pixels"
    ):
        segmental(image, ["a"])
    with pytest.raises(ValueError, match=r"image reward and takes pixels \[B, C, H, W\]; got video pixels"):
        ColourReward()(video, ["a red car"])
    with pytest.raises(ValueError, match="4 frames cannot be split into 8 segments"):
        SegmentalVideoReward(MeanPixel(), segments=8)(video, ["a"])


def test_segmental_refuses_a_video_reward_inside():
    with pytest.raises(ValueError, match="TemporalConsistency is a video reward"):
        build_reward("segmental", reward="temporal_consistency")  # refused before any model is loaded
    inner_video = SegmentalVideoReward(MeanPixel())
    with pytest.raises(ValueError, match="SegmentalVideoReward is a video reward"):
        SegmentalVideoReward(inner_video)
    with pytest.raises(ValueError, match="kwargs only with a reward name"):
        SegmentalVideoReward(MeanPixel(), kwargs={"a": 1})
    with pytest.raises(ValueError, match="selection must be one of"):
        SegmentalVideoReward(MeanPixel(), selection="TSN")
    with pytest.raises(ValueError, match=">= 0"):
        SegmentalVideoReward(MeanPixel(), attenuation=-0.5)


# ----- temporal consistency ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> str:
    return str(save_tiny_dino(tmp_path_factory.mktemp("tiny_dino")))


def _two_images() -> tuple[Tensor, Tensor]:
    """Two different 32 x 32 images ``[3, 32, 32]`` in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    first = torch.rand(3, 32, 32, generator=generator)
    ramp = torch.linspace(0, 1, 32)
    second = torch.stack(
        [
            ramp.view(1, 32).expand(32, 32),
            ramp.view(32, 1).expand(32, 32),
            1 - ramp.view(1, 32).expand(32, 32),
        ]
    )
    return first, second


def _video_of(frames: list[Tensor]) -> Tensor:
    return torch.stack(frames, dim=1).unsqueeze(0)  # [1, 3, T, H, W]


def test_temporal_consistency_static_and_alternating(tiny_dino):
    first, second = _two_images()
    embedder = DinoEmbedder(tiny_dino, device="cpu")
    features = embedder.embed(torch.stack([first, second]))
    cosine = float(features[0] @ features[1])
    assert cosine < 0.99  # the two images really differ for the tiny model

    reward = build_reward("temporal_consistency", model=tiny_dino, device="cpu")
    assert isinstance(reward, TemporalConsistency)
    static = _video_of([first] * 5)
    alternating = _video_of([first, second, first, second, first])
    output = reward(torch.cat([static, alternating]), ["a", "b"])
    assert output.scores.tolist() == pytest.approx([1.0, cosine], abs=1e-5)
    assert output.components["min_frame_similarity"].tolist() == pytest.approx([1.0, cosine], abs=1e-5)


def test_temporal_consistency_stride(tiny_dino):
    first, second = _two_images()
    features = DinoEmbedder(tiny_dino, device="cpu").embed(torch.stack([first, second]))
    cosine = float(features[0] @ features[1])
    # frames A, A, B, B: stride 1 compares AA, AB, BB; stride 2 compares AB, AB
    video = _video_of([first, first, second, second])
    stride_1 = TemporalConsistency(tiny_dino, device="cpu")(video, ["a"])
    stride_2 = TemporalConsistency(tiny_dino, device="cpu", stride=2)(video, ["a"])
    assert stride_1.scores.item() == pytest.approx((2.0 + cosine) / 3, abs=1e-5)
    assert stride_1.components["min_frame_similarity"].item() == pytest.approx(cosine, abs=1e-5)
    assert stride_2.scores.item() == pytest.approx(cosine, abs=1e-5)
    # alternating A, B, A, B with stride 2 compares A with A and B with B only
    alternating = _video_of([first, second, first, second])
    stride_2_alternating = TemporalConsistency(tiny_dino, device="cpu", stride=2)(alternating, ["a"])
    assert stride_2_alternating.scores.item() == pytest.approx(1.0, abs=1e-5)


def test_temporal_consistency_errors(tiny_dino):
    first, _ = _two_images()
    reward = TemporalConsistency(tiny_dino, device="cpu")
    with pytest.raises(ValueError, match=">= 2 frames"):
        reward(_video_of([first]), ["a"])
    with pytest.raises(ValueError, match="stride 3 needs videos of > 3 frames"):
        TemporalConsistency(tiny_dino, device="cpu", stride=3)(_video_of([first] * 3), ["a"])
    with pytest.raises(ValueError, match=r"video reward .* got image pixels"):
        reward(first.unsqueeze(0), ["a"])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        TemporalConsistency(tiny_dino, device="cpu", stride=0)
