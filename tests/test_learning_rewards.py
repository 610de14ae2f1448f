"""Rewards that see groups, learn and are differentiable: the running-reference reward against hand-worked EMAs,
exact save / restore, the gather hook (a real two-"process" exchange), group ids, plain callables, NaN safety,
and the colour reward's gradient against finite differences."""

from __future__ import annotations

import io
import json
import math
import threading

import pytest
import torch
from trainer_helpers import small_config, without_timing

from gen_rl.checkpoint import CheckpointManager
from gen_rl.trainer import GenerationTrainer
from rewards import (
    REWARDS,
    ColourReward,
    JpegCompressibility,
    LearningReward,
    Reward,
    RewardOutput,
    RewardStateError,
    RewardUpdate,
    RunningReferenceReward,
    build_reward,
    check_reward_state,
    reward_learns,
    score_reward,
    update_reward,
)
from rewards.remote import RemoteReward
from rewards.serve import RewardServer


def solid(*colours: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    """Images ``[len(colours), 3, size, size]`` each filled with one RGB colour."""
    return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, 3, size, size).clone()


def update_of(pixels: torch.Tensor, gather=None, step: int = 0) -> RewardUpdate:
    batch = pixels.shape[0]
    extra = {} if gather is None else {"gather": gather}
    return RewardUpdate(
        pixels=pixels,
        prompts=["a prompt"] * batch,
        metadata=[{} for _ in range(batch)],
        group_ids=torch.arange(batch) // 2,
        scores=torch.zeros(batch),
        step=step,
        **extra,
    )


def colour_reference(**kwargs) -> RunningReferenceReward:
    return RunningReferenceReward(features="colour", decay=0.5, **kwargs)


# ----- the running reference: hand-worked EMA and closed-form scores -------------------------------------------
def test_updates_follow_the_hand_worked_per_sample_ema():
    reward = colour_reference()
    assert reward.reference is None and reward_learns(reward) and "running_reference" in REWARDS
    update_reward(reward, update_of(solid((1, 0, 0), (0, 0, 1))))  # first update: reference = batch mean
    assert reward.reference.tolist() == [0.5, 0.0, 0.5]
    stats = update_reward(reward, update_of(solid((0, 1, 0))))  # k = 1: keep 0.5^1
    assert reward.reference.tolist() == [0.25, 0.5, 0.25]
    assert stats == {
        "reference_samples": 1.0,
        "reference_shift": pytest.approx(math.sqrt((0.0625 * 2 + 0.25) / 3)),
    }
    update_reward(reward, update_of(solid((1, 1, 1), (1, 1, 1))))  # k = 2: keep 0.25
    assert reward.reference.tolist() == [0.25 * 0.25 + 0.75, 0.25 * 0.5 + 0.75, 0.25 * 0.25 + 0.75]
    assert (reward.samples_seen, reward.updates) == (5, 3)


def test_scores_before_and_after_an_update_match_the_closed_form():
    images = solid((1, 1, 1), (0.5, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 1, 0.5))
    prompts = ["p"] * 4
    novelty, similarity = colour_reference(), colour_reference(mode="similarity")
    # before any update the reference is initial = 0.5 everywhere: d = RMS distance to mid-grey
    before = [0.5, 0.0, math.sqrt(0.25 / 3), math.sqrt(0.25 / 3)]
    assert score_reward(novelty, images, prompts).scores.tolist() == pytest.approx(before, abs=1e-7)
    assert score_reward(similarity, images, prompts).scores.tolist() == pytest.approx([1 - d for d in before])
    for reward in (novelty, similarity):
        update_reward(reward, update_of(solid((1, 0, 0), (0, 0, 1))))  # reference (0.5, 0, 0.5)
    after = [math.sqrt((0.25 + 1 + 0.25) / 3), math.sqrt((0 + 0.25 + 0) / 3), 0.0, math.sqrt(1 / 3)]
    output = score_reward(novelty, images, prompts)
    assert output.scores.tolist() == pytest.approx(after, abs=1e-7)
    assert output.components["reference_distance"].tolist() == pytest.approx(after, abs=1e-7)
    assert score_reward(similarity, images, prompts).scores.tolist() == pytest.approx([1 - d for d in after])


def test_pixel_features_reference_is_the_mean_of_block_averages():
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    reward = RunningReferenceReward(features="pixels", size=4, decay=0.9)
    update_reward(reward, update_of(pixels))
    blocks = pixels.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5)).flatten(1)  # independent 2x2 block means
    torch.testing.assert_close(reward.reference, blocks.mean(dim=0), rtol=0, atol=1e-12)
    later = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double()
    expected = 0.9**2 * reward.reference + (1 - 0.9**2) * later.reshape(2, 3, 4, 2, 4, 2).mean(
        dim=(3, 5)
    ).flatten(1).mean(0)
    update_reward(reward, update_of(later))
    torch.testing.assert_close(reward.reference, expected, rtol=0, atol=1e-12)
    distances = (blocks - expected).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(score_reward(reward, pixels, ["p"] * 3).scores, distances.float())


def test_video_samples_use_every_frame():
    video = torch.rand(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    reward = RunningReferenceReward(features="colour", decay=0.5, modality="video")
    update_reward(reward, update_of(video))
    torch.testing.assert_close(reward.reference, video.double().mean(dim=(0, 2, 3, 4)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"video reward and takes pixels \[B, C, T, H, W\]"):
        score_reward(reward, video[:, :, 0], ["p"] * 2)


# ----- save / restore -----------------------------------------------------------------------------------------
def test_state_dict_restores_bit_identical_scores_and_future_updates():
    generator = torch.Generator().manual_seed(3)
    batches = [torch.rand(4, 3, 8, 8, generator=generator) for _ in range(4)]
    probe = torch.rand(5, 3, 8, 8, generator=generator)
    original = RunningReferenceReward(size=4, decay=0.8)
    for batch in batches[:2]:
        update_reward(original, update_of(batch))
    buffer = io.BytesIO()
    torch.save({"parts": {"reward/running_reference": original.state_dict()}}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # the trainer's checkpoint loader refuses pickled objects
    restored = RunningReferenceReward(size=4, decay=0.8)
    restored.load_state_dict(saved["parts"]["reward/running_reference"])
    assert torch.equal(
        score_reward(restored, probe, ["p"] * 5).scores, score_reward(original, probe, ["p"] * 5).scores
    )
    for batch in batches[2:]:
        assert update_reward(restored, update_of(batch)) == update_reward(original, update_of(batch))
        assert torch.equal(restored.reference, original.reference)
    assert torch.equal(
        score_reward(restored, probe, ["p"] * 5).scores, score_reward(original, probe, ["p"] * 5).scores
    )
    assert (restored.samples_seen, restored.updates) == (original.samples_seen, original.updates) == (16, 4)
    fresh = RunningReferenceReward(
        size=4, decay=0.8
    )  # without the state the scores differ: the test can fail
    assert not torch.equal(
        score_reward(fresh, probe, ["p"] * 5).scores, score_reward(original, probe, ["p"] * 5).scores
    )


def test_state_that_does_not_fit_is_refused_in_one_line():
    reward = colour_reference()
    update_reward(reward, update_of(solid((1, 0, 0))))
    state = reward.state_dict()
    with pytest.raises(
        RewardStateError, match="features='colour', size=8; this reward has features='pixels'"
    ):
        RunningReferenceReward().load_state_dict(state)
    broken = {**state, "reference": torch.tensor([0.5, math.nan, 0.5], dtype=torch.float64)}
    with pytest.raises(RewardStateError, match="^running_reference state 'reference' is not finite"):
        colour_reference().load_state_dict(broken)
    with pytest.raises(
        RewardStateError, match="^reward 'r' in the checkpoint: learned state 'reference' has 1 of 3"
    ):
        check_reward_state(
            broken, "reward 'r' in the checkpoint"
        )  # the generic check, for any learning reward
    learned_on_small = RunningReferenceReward(size=2)
    update_reward(learned_on_small, update_of(solid((1, 0, 0), size=2)))  # 3 x 2 x 2 = 12 features
    with pytest.raises(RewardStateError, match="reference of 12 features but the samples have 4; keep"):
        score_reward(learned_on_small, torch.zeros(1, 1, 2, 2), ["p"])  # one channel: 1 x 2 x 2 features


# ----- the gather hook ----------------------------------------------------------------------------------------
def test_a_duplicating_gather_updates_like_two_processes_with_the_same_batch():
    single, doubled = colour_reference(), colour_reference()
    for reward in (single, doubled):
        update_reward(reward, update_of(solid((1, 0, 0), (0, 0, 1))))  # reference (0.5, 0, 0.5)
    batch = solid((0, 1, 0))
    update_reward(doubled, update_of(batch, gather=lambda tensor: torch.cat([tensor, tensor])))
    # two processes with one sample each: k = 2, keep 0.5^2 (one process would keep 0.5)
    assert doubled.reference.tolist() == [0.25 * 0.5, 0.75, 0.25 * 0.5]
    update_reward(single, update_of(torch.cat([batch, batch])))
    assert torch.equal(doubled.reference, single.reference) and doubled.samples_seen == single.samples_seen


def thread_gather(barrier: threading.Barrier, slots: list, rank: int):
    """A gather over threads: each "process" posts its tensor, waits, and concatenates all in rank order."""

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        slots[rank] = tensor.clone()
        barrier.wait()
        gathered = torch.cat(list(slots))
        barrier.wait()  # nobody overwrites a slot before everyone has read it
        return gathered

    return gather


def test_two_processes_end_with_identical_state_equal_to_one_process():
    generator = torch.Generator().manual_seed(4)
    steps = [torch.rand(6, 3, 8, 8, generator=generator) for _ in range(3)]
    steps[1][4, 0, 0, 0] = math.nan  # a diverged decode on the second "process": left out everywhere
    replicas = [RunningReferenceReward(size=4, decay=0.9) for _ in range(2)]
    barrier, slots = threading.Barrier(2), [None, None]

    def run(rank: int) -> None:
        gather = thread_gather(barrier, slots, rank)
        for step, pixels in enumerate(steps):
            update_reward(
                replicas[rank], update_of(pixels[rank * 3 : rank * 3 + 3], gather=gather, step=step)
            )

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert torch.equal(replicas[0].reference, replicas[1].reference)
    alone = RunningReferenceReward(size=4, decay=0.9)
    for pixels in steps:
        update_reward(alone, update_of(pixels))
    torch.testing.assert_close(replicas[0].reference, alone.reference, rtol=0, atol=1e-12)
    assert replicas[0].samples_seen == alone.samples_seen == 17


# ----- group ids ----------------------------------------------------------------------------------------------
class InGroupWinRate(Reward):
    """Pref-GRPO style: the fraction of the other members of its group a sample is brighter than."""

    def score(self, pixels, prompts, metadata, group_ids):
        brightness = pixels.mean(dim=(1, 2, 3))
        wins = (brightness[:, None] > brightness[None, :]) & (group_ids[:, None] == group_ids[None, :])
        members = (group_ids[:, None] == group_ids[None, :]).sum(dim=1)
        return RewardOutput(scores=wins.sum(dim=1) / (members - 1).clamp_min(1))


def test_group_ids_reach_a_reward_that_takes_them():
    reward = InGroupWinRate()
    assert reward.uses_group_ids and not ColourReward.uses_group_ids
    pixels = solid((0.1,) * 3, (0.9,) * 3, (0.5,) * 3, (0.3,) * 3, (0.2,) * 3, (0.4,) * 3)
    group_ids = torch.tensor([0, 0, 0, 5, 5, 5])
    scores = score_reward(reward, pixels, ["p"] * 6, None, group_ids).scores
    assert scores.tolist() == [0.0, 1.0, 0.5, 0.5, 0.0, 1.0]
    # other groups do not count: one group of six ranks the samples differently
    assert score_reward(reward, pixels, ["p"] * 6, None, torch.zeros(6, dtype=torch.long)).scores[2] == 0.8
    with pytest.raises(
        ValueError, match="needs group_ids \\[B\\]; call it through rewards.base.score_reward"
    ):
        score_reward(reward, pixels, ["p"] * 6)
    with pytest.raises(ValueError, match="group_ids of shape \\(5,\\); give one id per sample"):
        score_reward(reward, pixels, ["p"] * 6, None, group_ids[:5])
    with pytest.raises(TypeError, match="sets uses_group_ids but its score\\(\\) has no group_ids parameter"):

        class Declared(Reward):
            uses_group_ids = True

            def score(self, pixels, prompts, metadata):
                return RewardOutput(scores=torch.zeros(pixels.shape[0]))


def test_group_ids_are_ignored_by_rewards_that_do_not_take_them():
    pixels = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = ["a red ball", "a blue sky", "green", "red"]
    with_groups = score_reward(ColourReward(), pixels, prompts, None, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(with_groups.scores, ColourReward()(pixels, prompts).scores)


def test_plain_callables_still_work_and_get_group_ids_when_they_ask():
    pixels = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    pixels[2, 0, 0, 0] = math.inf  # a diverged sample gets NaN, as with a Reward

    def brightness(pixels, prompts, metadata):
        assert metadata == [{}] * 4  # no metadata: one empty record per sample
        return RewardOutput(scores=pixels.nan_to_num(posinf=1.0).mean(dim=(1, 2, 3)).double())

    output = score_reward(brightness, pixels, ["p"] * 4, None, torch.tensor([0, 0, 1, 1]))
    assert output.scores.dtype == torch.float32 and output.scores.isnan().tolist() == [
        False,
        False,
        True,
        False,
    ]
    expected = pixels.mean(dim=(1, 2, 3))
    assert output.scores[[0, 1, 3]].tolist() == pytest.approx(expected[[0, 1, 3]].tolist())

    seen = {}

    def grouped(pixels, prompts, metadata, group_ids):
        seen["group_ids"] = group_ids
        return RewardOutput(scores=group_ids.float())

    assert score_reward(grouped, pixels, ["p"] * 4, None, torch.tensor([3, 3, 7, 7])).scores[
        [0, 3]
    ].tolist() == [3, 7]
    assert seen["group_ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="must have shape \\[B=4\\]"):
        score_reward(lambda p, q, m: RewardOutput(scores=torch.zeros(3)), pixels, ["p"] * 4)


def test_a_remote_reward_keeps_working_through_score_reward():
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    prompts = ["a red apple", "blue sky", "green grass"]
    server = RewardServer(ColourReward())
    server.start()
    try:
        remote = RemoteReward(server.url, fmt="safetensors_float32", timeout_s=5.0, retries=0)
        output = score_reward(remote, pixels, prompts, None, torch.tensor([0, 0, 1]))
    finally:
        server.stop()
    assert torch.equal(output.scores, ColourReward()(pixels, prompts).scores)
    assert not remote.learns and not remote.uses_group_ids


# ----- NaN safety ---------------------------------------------------------------------------------------------
def test_non_finite_samples_never_reach_the_learned_state():
    reward = colour_reference()
    pixels = solid((1, 0, 0), (0, 0, 1), (0, 1, 0))
    pixels[2, 1, 0, 0] = math.nan
    update_reward(reward, update_of(pixels))
    assert reward.reference.tolist() == [0.5, 0.0, 0.5] and reward.samples_seen == 2
    all_bad = torch.full((2, 3, 4, 4), math.nan)
    assert update_reward(reward, update_of(all_bad)) == {"reference_samples": 0.0, "reference_shift": 0.0}
    assert reward.reference.tolist() == [0.5, 0.0, 0.5] and reward.updates == 1


class BrokenLearner(LearningReward):
    """Learns a NaN: update_reward must stop it in one line."""

    def __init__(self) -> None:
        self.offset = torch.zeros(2)

    def score(self, pixels, prompts, metadata):
        return RewardOutput(scores=pixels.mean(dim=(1, 2, 3)) + self.offset.sum())

    def update(self, batch):
        self.offset = self.offset / batch.scores.sum()  # 0 / 0
        return {}

    def state_dict(self):
        return {"head": {"offset": self.offset}}

    def load_state_dict(self, state):
        self.offset = state["head"]["offset"]


def test_a_learning_reward_whose_state_turns_nan_raises_one_line():
    with pytest.raises(RewardStateError) as error:
        update_reward(BrokenLearner(), update_of(solid((0, 0, 0))), name="broken_0")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "reward 'broken_0' after its update at step 0: learned state 'head.offset' has 2 of 2"
    )


def test_flags_default_off_and_wrappers_refuse_learning_rewards():
    assert (Reward.learns, Reward.differentiable, Reward.uses_group_ids) == (False, False, False)
    assert not JpegCompressibility.differentiable and not reward_learns(ColourReward())
    assert update_reward(ColourReward(), update_of(solid((1, 0, 0)))) == {}
    assert ColourReward.differentiable and RunningReferenceReward.learns
    with pytest.raises(ValueError, match="binary cannot wrap RunningReferenceReward: it learns"):
        build_reward("binary", reward="running_reference", threshold=0.5)
    with pytest.raises(ValueError, match="decay must be in \\[0, 1\\)"):
        build_reward("running_reference", decay=1.0)


# ----- differentiable colour ----------------------------------------------------------------------------------
def test_colour_gradient_matches_finite_differences_and_the_closed_form():
    pixels = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    pixels[0, :, 0, 0] = torch.tensor(
        [1.0, 0.0, 0.0], dtype=torch.float64
    )  # exactly on target: subgradient 0
    prompts, reward = ["a red ball", "green"], ColourReward()
    pixels.requires_grad_(True)
    torch.autograd.gradcheck(lambda x: reward.score(x, prompts, [{}, {}]).scores, (pixels,))
    scores = reward(pixels, prompts).scores  # through __call__ (its clamp passes the gradient)
    assert scores.grad_fn is not None
    (gradient,) = torch.autograd.grad(scores.sum(), pixels)
    targets = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)[:, :, None, None]
    difference = pixels.detach() - targets
    norm = difference.norm(dim=1, keepdim=True)
    expected = torch.where(norm > 0, -difference / norm.clamp_min(1e-30), 0.0) / (9 * math.sqrt(3))
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)
    assert gradient[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]
    edge = torch.full((1, 3, 2, 2), 1.0 + 5e-5, requires_grad=True)  # within tolerance above 1
    (edge_gradient,) = torch.autograd.grad(reward(edge, ["green"]).scores.sum(), edge)
    assert edge_gradient[0, 0].abs().min() > 0  # red is off target; the clamp did not cut its gradient


class TrainedHead(LearningReward):
    """A learned offset fitted by one SGD step per update: the update needs autograd."""

    def __init__(self) -> None:
        self.offset = torch.zeros(1, requires_grad=True)

    def score(self, pixels, prompts, metadata):
        return RewardOutput(scores=(pixels.mean(dim=(1, 2, 3)) + self.offset).detach())

    def update(self, batch):
        loss = (self.offset - batch.pixels.mean()).pow(2).sum()
        (gradient,) = torch.autograd.grad(loss, self.offset)
        with torch.no_grad():
            self.offset -= 0.5 * gradient
        return {"loss": loss.item()}

    def state_dict(self):
        return {"offset": self.offset.detach().clone()}

    def load_state_dict(self, state):
        self.offset = state["offset"].clone().requires_grad_(True)


def test_an_update_can_train_a_head_when_the_trainer_scores_under_no_grad():
    head = TrainedHead()
    with torch.no_grad():
        stats = update_reward(head, update_of(solid((0.5, 0.5, 0.5))))
    assert stats == {"loss": 0.25} and head.offset.item() == 0.5  # 0 - 0.5 * 2 * (0 - 0.5)


# ----- the trainer: a learning reward's state is saved with the run and resumed exactly ------------------------
LEARNING_TERMS = (
    "reward.terms=[{name: colour, weight: 1.0}, "
    "{name: running_reference, weight: 0.5, kwargs: {features: pixels, size: 4, decay: 0.9}}]"
)


def reference_state(trainer: GenerationTrainer) -> dict:
    return trainer.reward_models["running_reference_1"].state_dict()


def test_a_resumed_run_has_the_same_reward_state_and_metrics_as_an_uninterrupted_one(tmp_path):
    overrides = (LEARNING_TERMS, "train.num_steps=3", "checkpoint.every_steps=2", "eval.every_steps=2")
    straight = GenerationTrainer(small_config(tmp_path / "straight", *overrides))
    straight.train()

    stopped = GenerationTrainer(small_config(tmp_path / "stopped", *overrides))
    for step in range(2):
        stopped.run_step(step)
    saved = reference_state(stopped)  # the state the checkpoint after step 2 holds
    stopped.run_step(2)  # lost in the "crash": the reward learned from it, the checkpoint did not
    assert CheckpointManager(tmp_path / "stopped", 2).latest().name == "checkpoint-000002"
    del stopped
    resumed = GenerationTrainer(small_config(tmp_path / "stopped", *overrides), resume=True)
    assert resumed.start_step == 2
    restored = reference_state(resumed)
    assert torch.equal(restored["reference"], saved["reference"]) and restored["updates"] == 2
    resumed.train()

    final, expected_final = reference_state(resumed), reference_state(straight)
    assert (
        (final["updates"], final["samples_seen"])
        == (expected_final["updates"], expected_final["samples_seen"])
        == (3, 24)
    )
    torch.testing.assert_close(final["reference"], expected_final["reference"], rtol=0, atol=1e-7)
    expected = [without_timing(json.loads(line)) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    got = [without_timing(json.loads(line)) for line in (tmp_path / "stopped" / "metrics.jsonl").open()]
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1, 2, 3]
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)
    trained = [r for r in expected if "reward/running_reference_1/reference_samples" in r]
    assert [r["reward/running_reference_1/reference_samples"] for r in trained] == [8.0, 8.0, 8.0]
    assert all(r["reward/running_reference_1/reference_shift"] > 0 for r in trained)  # it learned every step
