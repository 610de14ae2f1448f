"""Rollouts on tiny Qwen2-VL, Qwen2.5-VL and LLaVA models saved to disk and loaded back through ``load_policy``.

Ratio 1 (recomputed log-probs = sampling log-probs) on left-padded batches of prompts with 0, 1 and 2 images,
pixel alignment under any batching, suppressed vision tokens, prompt truncation that spares image tokens,
the processed image size of every image for grid (Qwen) and per-image-tensor (LLaVA) processors.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from gen_rl.vlm.policy import eos_token_ids, load_policy
from gen_rl.vlm.rollout import (
    SamplingSettings,
    collate_prompts,
    completion_log_probs,
    completion_mask,
    encode_prompt,
    generate_completions,
    processed_image_sizes,
    sample_rollout,
    sequence_inputs,
    uses_mrope,
    vision_token_ids,
)
from gen_rl.vlm.tiny import TINY_BUILDERS

TEMPERATURE = 0.7
RED, BLUE, GREEN = (220, 30, 30), (30, 40, 220), (30, 200, 40)


MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}


@pytest.fixture(scope="module", params=sorted(TINY_BUILDERS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def policy(tmp_path_factory, family):
    folder = tmp_path_factory.mktemp(f"tiny_{family}")
    model, processor = TINY_BUILDERS[family](seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return load_policy(str(folder), dtype="float32")


def _image(rgb, size=(56, 56)):
    return Image.new("RGB", size, rgb)


def _settings(model, processor, max_new_tokens=6, temperature=TEMPERATURE):
    return SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=eos_token_ids(model, processor),
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_token_ids=vision_token_ids(model.config, processor),
    )


@pytest.fixture(scope="module")
def mixed_prompts(policy):
    """Three prompts of different lengths: one image, two images (different sizes), no image."""
    _, processor = policy
    return [
        encode_prompt(processor, "what colour ?", [_image(RED)]),
        encode_prompt(
            processor, "what is the colour of this image ?", [_image(BLUE), _image(GREEN, (56, 28))]
        ),
        encode_prompt(processor, "what is the answer ?", []),
    ]


def test_loaded_policy_is_the_saved_model(policy, family):
    model, processor = policy
    original, _ = TINY_BUILDERS[family](seed=0)
    for (name, loaded), (_, expected) in zip(
        model.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert torch.equal(loaded, expected), name
    assert type(model).__name__ == MODEL_CLASSES[family]
    assert processor.tokenizer.padding_side == "left"
    assert uses_mrope(model) == (family != "llava")  # LLaVA takes explicit position ids


def test_collate_keeps_pixels_aligned_with_prompts(policy, mixed_prompts, family):
    _, processor = policy
    batch = collate_prompts(mixed_prompts, processor.tokenizer.pad_token_id)
    lengths = [len(prompt) for prompt in mixed_prompts]
    assert len(set(lengths)) == 3  # really left-padded
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    if family == "llava":  # one 28 x 28 pixel tensor per image, 2 x 2 patches = 4 image tokens each
        assert batch["pixel_values"].shape == (3, 3, 28, 28)
        expected = torch.cat(
            [mixed_prompts[0].visual["pixel_values"], mixed_prompts[1].visual["pixel_values"]]
        )
        assert torch.equal(batch["pixel_values"], expected)
        image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
        assert image_tokens == [4, 8, 0]
        return
    # 56x56 -> 4x4 patches of 14 px; 56 wide x 28 high is below min_pixels and is upscaled to 84 x 56 -> 6x4
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 6]]
    expected_pixels = torch.cat(
        [mixed_prompts[0].visual["pixel_values"], mixed_prompts[1].visual["pixel_values"]]
    )
    assert torch.equal(batch["pixel_values"], expected_pixels)
    image_token = processor.image_token_id
    image_tokens = (batch["input_ids"] == image_token).sum(dim=1).tolist()
    assert image_tokens == [4, 4 + 6, 0]  # 2 x 2 patches merge into one token
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == image_tokens


def test_recomputed_log_probs_equal_sampling_log_probs(policy, mixed_prompts):
    """Ratio 1: log-softmax of the scores ``generate`` sampled from == a forward pass on prompt + completion."""
    model, processor = policy
    settings = _settings(model, processor, max_new_tokens=8)
    prompts = [prompt for prompt in mixed_prompts for _ in range(3)]
    torch.manual_seed(0)
    completion_ids, scores = generate_completions(
        model, collate_prompts(prompts, settings.pad_token_id), settings, return_scores=True
    )
    mask, _ = completion_mask(completion_ids, settings.eos_token_ids)
    sampled = torch.log_softmax(scores.float(), dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)

    batch = sequence_inputs(prompts, completion_ids, mask, settings.pad_token_id)
    with torch.no_grad():
        recomputed = completion_log_probs(
            model, batch, completion_ids, settings.temperature, settings.suppress_token_ids
        )
    torch.testing.assert_close(recomputed[mask], sampled[mask], rtol=0, atol=1e-5)
    ratio = torch.exp(recomputed - sampled)[mask]
    assert float((ratio - 1).abs().max()) < 1e-5
    # the check has teeth: another temperature, or no suppression, gives different numbers
    with torch.no_grad():
        hotter = completion_log_probs(model, batch, completion_ids, 1.0, settings.suppress_token_ids)
        unsuppressed = completion_log_probs(model, batch, completion_ids, settings.temperature, [])
    assert float((hotter - sampled)[mask].abs().max()) > 1e-2
    assert float((unsuppressed - sampled)[mask].abs().max()) > 1e-4


def test_log_probs_do_not_depend_on_batching(policy, mixed_prompts):
    """Each completion scored alone (no padding) == scored in a padded multi-image batch in another order."""
    model, processor = policy
    settings = _settings(model, processor)
    torch.manual_seed(1)
    rollout = sample_rollout(
        model, processor, mixed_prompts, ["a", "b", "c"], [0, 1, 2], settings, group_size=2
    )
    order = [5, 0, 3, 2, 4, 1]
    part = rollout.select(order)
    batch = sequence_inputs(part.prompts, part.completion_ids, part.completion_mask, settings.pad_token_id)
    with torch.no_grad():
        together = completion_log_probs(
            model, batch, part.completion_ids, settings.temperature, settings.suppress_token_ids
        )
        for position, index in enumerate(order):
            alone = rollout.select([index])
            single = sequence_inputs(
                alone.prompts, alone.completion_ids, alone.completion_mask, settings.pad_token_id
            )
            values = completion_log_probs(
                model, single, alone.completion_ids, settings.temperature, settings.suppress_token_ids
            )
            row_mask = alone.completion_mask[0]
            torch.testing.assert_close(together[position][row_mask], values[0][row_mask], rtol=0, atol=1e-5)


def test_images_change_the_log_probs(policy):
    """Guard for the alignment tests: the tiny model's outputs do depend on the pixels."""
    model, processor = policy
    settings = _settings(model, processor)
    red = encode_prompt(processor, "what colour ?", [_image(RED)])
    blue = encode_prompt(processor, "what colour ?", [_image(BLUE)])
    completion = torch.tensor([[processor.tokenizer.convert_tokens_to_ids("red")] * 3])
    mask = torch.ones_like(completion, dtype=torch.bool)
    with torch.no_grad():
        values = [
            completion_log_probs(
                model,
                sequence_inputs([prompt], completion, mask, settings.pad_token_id),
                completion,
                settings.temperature,
                [],
            )
            for prompt in (red, blue)
        ]
    assert float((values[0] - values[1]).abs().max()) > 1e-3


def test_vision_tokens_are_never_generated(policy, mixed_prompts):
    model, processor = policy
    settings = _settings(model, processor, max_new_tokens=16, temperature=2.0)
    vision_ids = set(vision_token_ids(model.config, processor))
    assert processor.image_token_id in vision_ids
    start_id = getattr(model.config, "vision_start_token_id", None)
    assert start_id is None or start_id in vision_ids
    prompts = [prompt for prompt in mixed_prompts for _ in range(8)]
    torch.manual_seed(2)
    completion_ids, scores = generate_completions(
        model, collate_prompts(prompts, settings.pad_token_id), settings, return_scores=True
    )
    assert not set(completion_ids.flatten().tolist()) & vision_ids
    assert torch.isneginf(scores[..., sorted(vision_ids)]).all()


def test_completion_mask_stops_after_the_first_eos():
    completion_ids = torch.tensor([[5, 6, 2, 7, 2], [5, 9, 9, 9, 9], [0, 2, 0, 0, 0]])
    mask, truncated = completion_mask(completion_ids, eos_token_ids=[2, 0])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
    ]
    assert truncated.tolist() == [False, True, False]


def test_prompt_truncation_never_cuts_image_tokens(policy):
    _, processor = policy
    images = [_image(RED), _image(BLUE)]
    problem = " ".join(["what is the colour of this image ?"] * 6)
    full = encode_prompt(processor, problem, images)
    budget = len(full) - 20
    cut = encode_prompt(processor, problem, images, max_prompt_length=budget)
    image_token = processor.image_token_id
    assert len(cut) <= budget
    assert int((cut.input_ids == image_token).sum()) == int((full.input_ids == image_token).sum()) == 8
    assert torch.equal(cut.visual["pixel_values"], full.visual["pixel_values"])
    with pytest.raises(ValueError, match="image tokens are never cut"):
        encode_prompt(processor, problem, images, max_prompt_length=12)


def test_prompt_truncation_keeps_the_question_template(policy):
    _, processor = policy
    template = "{problem} answer with one word ."
    problem = " ".join(["what is the colour of this image ?"] * 6)
    full = encode_prompt(processor, problem, [_image(RED)], question_template=template)
    cut = encode_prompt(
        processor, problem, [_image(RED)], max_prompt_length=len(full) - 10, question_template=template
    )
    text = processor.tokenizer.decode(cut.input_ids)
    assert len(cut) <= len(full) - 10
    assert "answer with one word ." in text and text.count("colour") < problem.count("colour")


def test_processed_image_sizes_for_any_processor(policy, family):
    """The pixel frame each image is seen in: Qwen's smart resize (grid x 14 px, here within 56 x 56 pixels
    min/max) or LLaVA's fixed 28 x 28 resize; one entry per image, in order."""
    _, processor = policy
    images = [_image(RED, (56, 56)), _image(BLUE, (112, 28)), _image(GREEN, (40, 90))]
    prompt = encode_prompt(processor, "what colour ?", images)
    if family == "llava":
        expected = [(28, 28)] * 3
    else:  # every image scaled to about 56 * 56 pixels, sides multiples of 28 (patch 14 x merge 2)
        grid = prompt.visual["image_grid_thw"].tolist()
        assert len(grid) == 3
        expected = [(rows * 14, columns * 14) for _, rows, columns in grid]
        assert expected[0] == (56, 56)
        assert expected[1][1] > expected[1][0] and expected[2][0] > expected[2][1]  # aspect ratios kept
    assert prompt.processed_sizes == expected
    assert processed_image_sizes(processor, prompt.visual, num_images=0) == []


def test_processed_sizes_of_a_tiling_processor_are_unknown():
    """Several crops per image (pixel rows != images): no single frame, so no size rather than a wrong one."""
    crops = {"pixel_values": torch.zeros(5, 3, 28, 28)}
    assert processed_image_sizes(None, crops, num_images=2) == []
    five_d = {"pixel_values": torch.zeros(2, 4, 3, 28, 28)}
    assert processed_image_sizes(None, five_d, num_images=2) == []
    per_image = {"pixel_values": torch.zeros(2, 3, 32, 48)}
    assert processed_image_sizes(None, per_image, num_images=2) == [(32, 48), (32, 48)]
