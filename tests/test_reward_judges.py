"""VLM-as-judge, SRUM and Pref-GRPO on a tiny Qwen2-VL built in code: the judge's P(yes) and expected score equal
softmaxes computed here from logits of unbatched forward passes; SRUM's reward map and the win rate equal
hand-worked numbers; a missing judge model is one line before anything runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from gen_rl.core.config import ConfigError
from gen_rl.core.hub import MissingWeightsError
from rewards import REWARDS, Reward, RewardOutput, build_reward, score_reward
from rewards.base import check_reward_sources
from rewards.pairwise import PairwiseWinRate, group_pairs, pair_outcomes, win_rates
from rewards.srum import SRUMReward, outlined, pixel_box, region_view, reward_map
from rewards.tiny_judges import save_tiny_qwen2_vl_judge
from rewards.vlm_judge import VLMJudge


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    return str(save_tiny_qwen2_vl_judge(tmp_path_factory.mktemp("judge") / "qwen2_vl", seed=3))


@pytest.fixture(scope="module")
def reference(judge_folder):
    """The same checkpoint loaded here, asked one query at a time (no padding, no batching)."""
    model = AutoModelForImageTextToText.from_pretrained(judge_folder).eval()
    processor = AutoProcessor.from_pretrained(judge_folder)

    def logits(images: list[torch.Tensor], text: str) -> list[float]:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        chat = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        pil = [
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            for image in images
        ]
        encoded = processor(text=[chat], images=pil, return_tensors="pt")
        with torch.no_grad():
            return model(**encoded).logits[0, -1].double().tolist()

    def token(word: str) -> int:
        return processor.tokenizer.convert_tokens_to_ids(word)

    return logits, token


def pixels_of(count: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def softmax_share(logits: list[float], chosen: list[int], among: list[int]) -> float:
    """sum_{c in chosen} e^z_c / sum_{a in among} e^z_a, in float64 by hand."""
    peak = max(logits[a] for a in among)
    return sum(math.exp(logits[c] - peak) for c in chosen) / sum(math.exp(logits[a] - peak) for a in among)


# ----- VLM-as-judge ---------------------------------------------------------------------------------------------
def test_yes_probability_equals_an_independent_softmax(judge_folder, reference):
    logits, token = reference
    pixels = pixels_of(3, 0)
    prompts = ["a red apple", "a cat", "the blue square in a green circle"]  # unequal lengths: left padding
    judge = VLMJudge(judge_folder, batch_size=2)  # two batches, one padded
    whole = VLMJudge(judge_folder, normalise="vocabulary")
    yes, no = [token("yes"), token("Yes")], [token("no"), token("No")]
    pair, vocabulary = [], []
    for image, prompt in zip(pixels, prompts, strict=True):
        row = logits([image], f"Does this image show {prompt}? Answer yes or no.")
        pair.append(softmax_share(row, yes, yes + no))
        vocabulary.append(softmax_share(row, yes, list(range(len(row)))))
    assert score_reward(judge, pixels, prompts).scores.tolist() == pytest.approx(pair, abs=2e-6)
    assert score_reward(whole, pixels, prompts).scores.tolist() == pytest.approx(vocabulary, abs=2e-7)
    assert min(pair) != max(pair) and "vlm_judge" in REWARDS  # the scores depend on the sample


def test_expected_score_over_score_tokens(judge_folder, reference):
    logits, token = reference
    pixels = pixels_of(2, 1)
    judge = VLMJudge(judge_folder, answer="score")
    expected = []
    for image in pixels:
        row = logits([image], "Rate from 1 to 10 how well this image matches a dog. Answer with one number.")
        ids = [token(str(k)) for k in range(1, 11)]
        expected.append(sum(k * softmax_share(row, [ids[k - 1]], ids) for k in range(1, 11)))
    assert score_reward(judge, pixels, ["a dog"] * 2).scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_questions_from_metadata_and_templates(judge_folder):
    pixels = pixels_of(2, 2)
    judge = VLMJudge(judge_folder, questions=["is this {colour}?", "does this show {prompt}?"])
    lowest = VLMJudge(judge_folder, questions=["is this {colour}?", "does this show {prompt}?"], reduce="min")
    metadata = [{"colour": "red"}, {"questions": ["is this blue?", "is this a cat?", "is this green?"]}]
    asked = judge.ask(
        [pixels[0], pixels[0], *[pixels[1]] * 3],
        ["is this red?", "does this show a dog?", "is this blue?", "is this a cat?", "is this green?"],
    )
    output = score_reward(judge, pixels, ["a dog", "a cat"], metadata)
    assert output.scores.tolist() == pytest.approx(
        [float(asked[:2].mean()), float(asked[2:].mean())], abs=1e-6
    )
    assert score_reward(lowest, pixels, ["a dog", "a cat"], metadata).scores.tolist() == pytest.approx(
        [float(asked[:2].min()), float(asked[2:].min())], abs=1e-6
    )
    with pytest.raises(ValueError, match=r"field \{colour\} is neither 'prompt' nor a key"):
        score_reward(judge, pixels, ["a dog", "a cat"], [{}, {}])


def test_a_missing_judge_is_one_line_before_anything_runs(judge_folder, tmp_path):
    missing = str(tmp_path / "no_judge")
    for build in (lambda: VLMJudge(missing), lambda: build_reward("srum", model=missing)):
        with pytest.raises(MissingWeightsError, match="judge model .* does not exist") as error:
            build()
        assert "\n" not in str(error.value)
    for name in ("vlm_judge", "srum", "pairwise_win_rate"):  # the start-up check, which loads nothing
        with pytest.raises(MissingWeightsError, match=r"reward.terms\[1\].kwargs.model: .* does not exist"):
            check_reward_sources(REWARDS[name], {"model": missing}, "reward.terms[1]")
    check_reward_sources(REWARDS["vlm_judge"], {"model": judge_folder}, "reward.terms[1]")  # present: passes
    with pytest.raises(ValueError, match="does not read 'maybe' as one known token"):
        VLMJudge(judge_folder, yes_words=("maybe",))


def test_the_trainer_fails_on_a_missing_judge_before_it_samples(tmp_path):
    from trainer_helpers import small_config

    from gen_rl.trainer import GenerationTrainer

    config = small_config(tmp_path / "run")
    config.reward.terms[0].name = "vlm_judge"
    config.reward.terms[0].kwargs = {"model": str(tmp_path / "no_judge")}
    with pytest.raises(MissingWeightsError, match="judge model"):
        GenerationTrainer(config)  # rewards are built before the sampler loads: no rollout can start
    from gen_rl.inputs import check_registered_names

    with pytest.raises(ConfigError, match=r"reward.terms\[0\].kwargs.model: .*no_judge does not exist"):
        check_registered_names(config)  # gen_rl/train.py's stage 2: before any model loads


# ----- SRUM -----------------------------------------------------------------------------------------------------
def test_reward_map_matches_the_hand_worked_combination():
    """8x8 image, box A = top-left 4x4 (P 0.9), box B = centre 4x4 (P 0.3, below the 1/2 floor), global 0.8."""
    a, b = pixel_box([0, 0, 0.5, 0.5], 8, 8), pixel_box([0.25, 0.25, 0.75, 0.75], 8, 8)
    assert (a, b) == ((0, 0, 4, 4), (2, 2, 6, 6))
    grid = reward_map(0.8, [(0.9, a), (0.3, b)], 8, 8)
    # A (16 px, incl. the 4 shared with B) at max(0.5, 0.9); the other 48 px at 0.5 (B's 0.3 is floored)
    assert float(grid.mean()) == pytest.approx(0.8 * (16 * 0.9 + 48 * 0.5) / 64)
    assert float(grid[3, 3]) == pytest.approx(0.8 * 0.9) and float(grid[5, 5]) == pytest.approx(0.4)
    assert float(reward_map(0.6, [], 8, 8).mean()) == pytest.approx(0.3)  # no objects: P_g / 2
    with pytest.raises(ValueError, match="covers no pixel"):
        pixel_box([0.5, 0, 0.5, 1], 8, 8)


def test_srum_reward_combines_the_judges_own_answers(judge_folder):
    pixels = pixels_of(2, 4, size=40)
    metadata = [
        {
            "objects": [
                {"name": "red apple", "box": [0, 0, 0.5, 0.5]},
                {"name": "cat", "box": [0.25, 0.5, 1, 1]},
            ]
        },
        {"objects": ["dog"]},  # no box: the whole image
    ]
    srum = SRUMReward(judge_folder)
    output = score_reward(srum, pixels, ["a red apple and a cat", "a dog"], metadata)
    ask = srum.judge.ask
    g0, g1 = ask(
        [pixels[0], pixels[1]],
        [
            "Does this image show a red apple and a cat? Answer yes or no.",
            "Does this image show a dog? Answer yes or no.",
        ],
    ).tolist()
    box_a, box_b = (0, 0, 20, 20), (10, 20, 40, 40)
    crop_a = F.interpolate(pixels[0:1, :, 0:20, 0:20], size=(40, 40), mode="bilinear", align_corners=False)[0]
    crop_b = F.interpolate(pixels[0:1, :, 20:40, 10:40], size=(40, 40), mode="bilinear", align_corners=False)[
        0
    ]
    pa, pb, pd = ask(
        [crop_a, crop_b, pixels[1]],
        [
            "Does this image show red apple? Answer yes or no.",
            "Does this image show cat? Answer yes or no.",
            "Does this image show dog? Answer yes or no.",
        ],
    ).tolist()
    wa, wb = max(0.5, pa), max(0.5, pb)  # box A: 400 px, box B: 600 px, overlap rows 20-20: none
    expected0 = g0 * (400 * wa + 600 * wb + (1600 - 1000) * 0.5) / 1600
    expected1 = g1 * max(0.5, pd)
    assert output.scores.tolist() == pytest.approx([expected0, expected1], abs=1e-6)
    assert output.components["srum_local"].tolist() == pytest.approx([(pa + pb) / 2, pd], abs=1e-6)
    assert pixel_box([0, 0, 0.5, 0.5], 40, 40) == box_a and pixel_box([0.25, 0.5, 1, 1], 40, 40) == box_b


def test_region_views():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    boxed = outlined(image, (2, 2, 6, 6), width=1)
    assert boxed[:, 2, 2:6].tolist() == [[1.0] * 4, [0.0] * 4, [0.0] * 4]  # the top edge is red
    assert torch.equal(boxed[:, 3:5, 3:5], image[:, 3:5, 3:5]) and torch.equal(boxed[:, 0], image[:, 0])
    crop = region_view(image, (0, 0, 8, 8), "crop")
    torch.testing.assert_close(crop, image)  # the whole image cropped is the image


# ----- Pref-GRPO ------------------------------------------------------------------------------------------------
class RedLevel(Reward):
    """The mean red channel (a pointwise reward the pairwise judge compares)."""

    def score(self, pixels: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(scores=pixels[:, 0].flatten(1).mean(dim=1))


def test_win_rate_matches_hand_worked_counts():
    red = torch.tensor([0.9, 0.2, 0.5, 0.8, 0.5, 0.2, 0.1])
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0])  # interleaved: grouping follows the ids, not the order
    pixels = red[:, None, None, None] * torch.ones(7, 3, 4, 4)
    win_rate = PairwiseWinRate(judge="reward", reward=RedLevel())
    scores = score_reward(win_rate, pixels, ["p"] * 7, group_ids=groups).scores
    # group 0 (0.9, 0.5, 0.5, 0.1): 3/3, (0 + 1/2 + 1)/3 twice, 0/3; group 1 (0.2, 0.8, 0.2): 1/4, 1, 1/4
    assert scores.tolist() == pytest.approx([1.0, 0.25, 0.5, 1.0, 0.5, 0.25, 0.0])
    assert win_rate.uses_group_ids and "pref_grpo" in REWARDS
    with pytest.raises(ValueError, match="needs group_ids"):
        win_rate(pixels, ["p"] * 7)
    lone = score_reward(win_rate, pixels[:3], ["p"] * 3, group_ids=torch.tensor([0, 1, 1])).scores
    assert lone.tolist() == [0.5, 0.0, 1.0]


def test_pair_outcomes_and_soft_win_rates():
    first, second = group_pairs(torch.tensor([4, 4, 4]))
    assert (first.tolist(), second.tolist()) == ([0, 0, 1], [1, 2, 2])
    preference = torch.tensor([0.7, 0.52, 0.2])
    assert pair_outcomes(preference, 0.05, "hard").tolist() == [1.0, 0.5, 0.0]
    soft = win_rates(first, second, pair_outcomes(preference, 0.0, "soft"), torch.tensor([4, 4, 4]))
    assert soft.tolist() == pytest.approx([(0.7 + 0.52) / 2, (0.3 + 0.2) / 2, (0.48 + 0.8) / 2])


def test_vlm_pairwise_preference_equals_an_independent_softmax(judge_folder, reference):
    logits, token = reference
    pixels = pixels_of(3, 6)
    judge = PairwiseWinRate(
        model=judge_folder, first_words=("first",), second_words=("second",), outcome="soft"
    )
    scores = score_reward(judge, pixels, ["a cat"] * 3, group_ids=torch.zeros(3, dtype=torch.long)).scores
    question = "Which image better matches a cat, the first or the second? Answer first or second."
    ids = [token("first"), token("second")]

    def p_first(i: int, j: int) -> float:
        return softmax_share(logits([pixels[i], pixels[j]], question), ids[:1], ids)

    p = {(i, j): 0.5 * (p_first(i, j) + 1 - p_first(j, i)) for i, j in ((0, 1), (0, 2), (1, 2))}
    expected = [(p[0, 1] + p[0, 2]) / 2, (1 - p[0, 1] + p[1, 2]) / 2, (2 - p[0, 2] - p[1, 2]) / 2]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
