"""SRUM's unified path on a tiny ``JanusForConditionalGeneration`` built in code: sampled image-token log-probs equal
the teacher-forced ones (ratio 1), the model's own P(yes) equals a softmax of its logits computed here, the local
(SRUM map) self-reward is the hand-worked combination, and a short self-rewarded GRPO run raises the model's own
reward with a held-out gold reward reported beside it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gen_rl.vlm.unified import SelfRewardConfig, UnifiedPolicy, train_self_rewarding
from rewards import ColourReward
from rewards.tiny_judges import tiny_janus

QUESTION = "does this image show a red square ? answer yes or no ."


@pytest.fixture
def one_thread():
    """The run is a few hundred tiny ops: one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_policy(**overrides) -> UnifiedPolicy:
    model, processor = tiny_janus(seed=0)
    return UnifiedPolicy(model, processor, SelfRewardConfig(**overrides))


def test_sampled_log_probs_equal_teacher_forced_ones(one_thread):
    policy = make_policy()
    tokens, sampled = policy.sample("a red square", 4, torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 16) and int(tokens.max()) < 32
    forced = policy.log_probs("a red square", tokens)
    torch.testing.assert_close(forced, sampled, rtol=0, atol=1e-5)
    hotter = make_policy(temperature=2.0).log_probs("a red square", tokens)  # temperature divides the logits
    assert float((hotter - forced).detach().abs().max()) > 1e-3
    pixels = policy.decode(tokens)
    assert pixels.shape == (4, 3, 16, 16) and float(pixels.min()) >= 0 and float(pixels.max()) <= 1


def test_classifier_free_guidance_is_the_guided_distribution(one_thread):
    """With CFG (w = 5, Janus's default) the sampled log-probs are those of ``log_softmax(l_u + w (l_c - l_u))``
    of conditional and unconditional log-softmaxes, recomputed here with the unconditional prompt built by hand."""
    policy = make_policy(guidance_scale=5.0)
    tokens, sampled = policy.sample("a red square", 3, torch.Generator().manual_seed(4))
    # w = 5 multiplies float32 rounding of the two log-softmaxes: 1e-4, against 1e-5 without guidance
    torch.testing.assert_close(policy.log_probs("a red square", tokens), sampled, rtol=0, atol=1e-4)
    model, pad = policy.model, policy.tokenizer.pad_token_id
    conditional = policy.prompt_ids("a red square")
    unconditional = torch.where(conditional == policy.boi_id, conditional, torch.full_like(conditional, pad))

    def head_log_softmax(ids):
        embeds = torch.cat(
            [
                model.get_input_embeddings()(ids[None].expand(3, -1)),
                model.prepare_embeddings_for_image_generation(tokens[:, :-1]),
            ],
            dim=1,
        )
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state[:, len(ids) - 1 :]
        return torch.log_softmax(model.model.generation_head(hidden), dim=-1)

    with torch.no_grad():
        cond, uncond = head_log_softmax(conditional), head_log_softmax(unconditional)
    guided = torch.log_softmax(uncond + 5.0 * (cond - uncond), dim=-1).gather(2, tokens[..., None])[..., 0]
    torch.testing.assert_close(sampled, guided, rtol=0, atol=1e-4)
    plain = make_policy().log_probs("a red square", tokens).detach()
    assert float((plain - guided).abs().max()) > 1e-2  # guidance changes the policy


def test_own_yes_probability_equals_an_independent_softmax(one_thread):
    policy = make_policy()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = policy.yes_probability(list(images), [QUESTION] * 3)
    tokenizer = policy.processor.tokenizer
    yes = [tokenizer.convert_tokens_to_ids(word) for word in ("yes", "Yes")]
    no = [tokenizer.convert_tokens_to_ids(word) for word in ("no", "No")]
    for index, image in enumerate(images):
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        text = f"<|User|>: <image_placeholder> {QUESTION} <|Assistant|>:"
        encoded = policy.processor(text=[text], images=[pil], return_tensors="pt")
        with torch.no_grad():
            logits = policy.model(**encoded).logits[0, -1].double().tolist()
        peak = max(logits[i] for i in yes + no)
        expected = sum(math.exp(logits[i] - peak) for i in yes) / sum(
            math.exp(logits[i] - peak) for i in yes + no
        )
        assert float(ours[index]) == pytest.approx(expected, abs=1e-6)
    assert float(ours.max() - ours.min()) > 0.01  # the understanding reads the image


def test_self_reward_with_objects_is_the_srum_map(one_thread):
    policy = make_policy()
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    metadata = {"objects": [{"name": "red", "box": [0, 0, 0.5, 0.5]}]}
    reward, global_p = policy.self_reward(pixels, "a red square", metadata)
    crops = [
        torch.nn.functional.interpolate(image[None, :, :8, :8], size=(16, 16), mode="bilinear")[0]
        for image in pixels
    ]
    local = policy.yes_probability(crops, ["does this image show red ? answer yes or no ."] * 2)
    expected = [
        float(global_p[i]) * (64 * max(0.5, float(local[i])) + 192 * 0.5) / 256 for i in range(2)
    ]  # the box covers 64 of 256 pixels
    assert reward.tolist() == pytest.approx(expected, abs=1e-6)
    plain, _ = policy.self_reward(pixels, "a red square", {})
    assert plain.tolist() == pytest.approx(global_p.tolist())


def test_self_rewarded_run_raises_its_own_reward(one_thread):
    policy = make_policy(num_steps=15, group_size=8, lr=3e-2)
    judge_before = {
        name: value.clone() for name, value in policy.model.model.language_model.state_dict().items()
    }
    head_before = policy.model.model.generation_head.proj_out.weight.clone()
    history = train_self_rewarding(policy, ["a red square", "a blue circle"], gold=ColourReward())
    own = [record["reward/mean"] for record in history]
    gold = [record["eval/gold/ColourReward"] for record in history]
    assert sum(own[-3:]) / 3 > sum(own[:3]) / 3 + 0.05  # its own reward rises (0.27 -> 0.41 measured)
    assert all(math.isfinite(value) for value in gold)  # reported beside it (flat here: 0.487 -> 0.485)
    assert not torch.equal(policy.model.model.generation_head.proj_out.weight, head_before)
    for name, value in policy.model.model.language_model.state_dict().items():
        assert torch.equal(value, judge_before[name])  # trainable="generation": the judge stays fixed


def test_training_everything_moves_the_judge_too(one_thread):
    policy = make_policy(num_steps=1, group_size=4, trainable="all")
    before = policy.model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    train_self_rewarding(policy, ["a red square"])
    assert not torch.equal(policy.model.model.language_model.layers[0].mlp.up_proj.weight, before)
    with pytest.raises(ValueError, match="trainable must be"):
        make_policy(trainable="lm").trainable_parameters()
