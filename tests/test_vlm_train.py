"""End-to-end VLM training on CPU with the tiny Qwen2-VL: learning, loss modes, LoRA + KL, dynamic sampling,
resume. The tiny model is built into the run folder and loaded back through ``load_policy``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gen_rl.core.config import load_config
from gen_rl.vlm.config import VLMConfig
from gen_rl.vlm.policy import load_policy
from gen_rl.vlm.trainer import VLMTrainer, train

TINY = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_colour_cpu.yaml"


def _config(tmp_path, *overrides: str) -> VLMConfig:
    return load_config(VLMConfig, TINY, [f"log.output_dir={tmp_path}", "log.progress=false", *overrides])


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_the_colour_task(tmp_path):
    """The tiny config: mean reward from ~chance of hitting a colour word (1/33) to mostly right answers.

    Naming any colour regardless of the image scores 0.25, so > 0.5 needs the pixels."""
    summary = train(_config(tmp_path))
    records = _metrics(tmp_path)
    assert len(records) == 60 and summary["steps"] == 60
    curve = tmp_path / "reward_curve.png"  # the same picture the generation trainer draws
    assert curve.stat().st_size > 1000
    assert summary["first_quarter_reward"] < 0.15
    assert summary["last_quarter_reward"] > 0.5
    expected_keys = {  # the names shared with the generation trainer (VOCABULARY.md), then VLM-only ones
        "step", "reward/mean", "reward/std", "reward/exact/mean", "reward/exact/std", "reward/dropped_samples",
        "advantage/mean", "advantage/std", "advantage/abs_mean", "advantage/zero_std_group_fraction", "loss/total",
        "loss/policy", "loss/kl", "policy/clip_fraction", "policy/approx_kl", "policy/ratio_mean",
        "policy/ratio_dev_max", "policy/entropy", "optim/lr", "optim/grad_norm", "optim/updates", "time/sample_s",
        "time/reward_s", "time/update_s", "time/step_s", "perf/samples_per_s",
        "perf/rollout_tokens_per_s", "completion/length_mean", "completion/truncated_fraction", "data/stage",
    }  # fmt: skip
    assert expected_keys <= set(records[0])
    assert all("/" in key for key in records[0] if key != "step")  # every metric is namespaced
    assert all(record["optim/updates"] == 1 for record in records)  # one optimizer update per step here
    assert all(record["policy/ratio_dev_max"] == 0.0 for record in records)
    for record in records:  # the phases' times add up to at most the step's (they are parts of it)
        parts = [record["time/sample_s"], record["time/reward_s"], record["time/update_s"]]
        assert min(parts) > 0 and sum(parts) <= record["time/step_s"]
        assert record["perf/samples_per_s"] == pytest.approx(64 / record["time/step_s"])  # 8 groups x 8
    # GRPO on-policy with one optimizer step per batch: ratio exactly 1, nothing clipped
    assert all(record["policy/ratio_min"] == record["policy/ratio_max"] == 1.0 for record in records)
    assert all(record["policy/clip_fraction"] == 0.0 for record in records)
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 60 * 4 and {"completion", "solution", "reward"} <= set(completions[-1])
    model, _ = load_policy(str(tmp_path / "final"))  # the trained model reloads through the hub-id path
    initial, _ = load_policy(str(tmp_path / "base_model"))
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters(), strict=True)]
    assert all(changed)  # full fine-tuning, vision tower included (freeze_vision_tower: false)


@pytest.mark.parametrize("loss", ["dr_grpo", "gspo", "gspo_token"])
def test_other_loss_modes_train(tmp_path, loss):
    overrides = ["train.num_steps=2", f"algorithm.name={loss}", "train.inner_epochs=2"]
    if loss.startswith("gspo"):
        overrides += ["algorithm.clip_low=0.0003", "algorithm.clip_high=0.0004"]
    train(_config(tmp_path, *overrides))
    records = _metrics(tmp_path)
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(record["loss/total"])) for record in records)
    # the second pass over each batch sees the updated policy: ratios leave 1, the tight GSPO range clips
    assert all(record["policy/ratio_max"] > record["policy/ratio_min"] for record in records)
    if loss.startswith("gspo"):
        assert max(record["policy/clip_fraction"] for record in records) > 0


def test_qwen2_5_vl_trains_with_lora(tmp_path):
    overrides = [
        "model.name_or_path=builtin:tiny-qwen2.5-vl", "train.num_steps=3", "model.lora.enabled=true",
        "model.lora.r=4", "model.freeze_vision_tower=true",
    ]  # fmt: skip
    train(_config(tmp_path, *overrides))
    records = _metrics(tmp_path)
    assert len(records) == 3 and all(record["optim/grad_norm"] > 0 for record in records)
    from peft import PeftModel

    base, _ = load_policy(str(tmp_path / "base_model"))
    assert type(base).__name__ == "Qwen2_5_VLForConditionalGeneration"
    before = {name: value.clone() for name, value in base.state_dict().items()}
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "final")).merge_and_unload()
    changed = {name for name, value in tuned.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all("language_model" in name for name in changed)  # LoRA only on the language model


def test_lora_with_kl_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    overrides = [
        "train.num_steps=4", "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
        "model.freeze_vision_tower=true", "algorithm.kl_coef=0.1", "train.inner_epochs=2",
        "train.samples_per_update=32", "train.microbatch_size=16", "checkpoint.every_steps=2",
        "model.gradient_checkpointing=true",
    ]  # fmt: skip
    whole = tmp_path / "whole"
    train(_config(whole, *overrides))
    records = _metrics(whole)
    assert len(records) == 4
    # 64 completions per step, 32 per update, 2 passes: 4 optimizer updates per step
    assert [record["optim/updates"] for record in records] == [4, 4, 4, 4]
    # the adapters move the policy off the reference (LoRA disabled) within the first step
    assert records[0]["loss/kl"] > 0 and all(record["loss/kl"] >= 0 for record in records)
    assert (whole / "final" / "adapter_config.json").is_file()
    assert not (whole / "final" / "model.safetensors").exists()  # LoRA saves the adapter only
    checkpoints = sorted(path.name for path in (whole / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000002"]

    # resume from the step-2 checkpoint in a fresh trainer: steps 3 and 4 repeat exactly
    (whole / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    VLMTrainer(_config(whole, *overrides), resume=True).run()
    resumed = _metrics(whole)
    assert [record["step"] for record in resumed] == [1, 2, 3, 4]
    for before, after in zip(records[2:], resumed[2:], strict=True):
        for key in (
            "reward/mean",
            "loss/total",
            "loss/kl",
            "advantage/std",
            "optim/grad_norm",
            "completion/length_mean",
        ):
            assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-9), key


def test_dynamic_sampling_keeps_only_groups_with_reward_spread(tmp_path):
    config = _config(
        tmp_path, "algorithm.name=dapo", "algorithm.clip_high=0.28", "algorithm.drop_zero_std_groups=true",
        "algorithm.dynamic_sampling_rounds=3", "sample.groups_per_step=4", "sample.max_new_tokens=2",
    )  # fmt: skip
    trainer = VLMTrainer(config)
    scored = trainer.dynamic_sample(step=0)
    group_size = config.sample.group_size
    assert len(scored.rollout) == 4 * group_size
    groups = scored.total_reward.view(-1, group_size)
    spread = [bool(rewards.max() > rewards.min()) for rewards in groups]
    assert scored.keep.tolist() == [flag for flag in spread for _ in range(group_size)]
    assert spread == sorted(spread, reverse=True)  # groups with spread first, zero-std ones only fill up
    # extra rounds are drawn until the batch is full of groups with spread
    assert scored.rounds == 3 or all(spread)
    assert scored.num_groups == 4 * scored.rounds
    for start, flag in zip(range(0, len(scored.rollout), group_size), spread, strict=True):
        advantages = scored.advantages[start : start + group_size]
        assert bool((advantages != 0).any()) == flag


@pytest.mark.parametrize("model_name", ["builtin:tiny-qwen2-vl", "builtin:tiny-llava"])
def test_one_update_moves_log_probs_towards_the_advantages(tmp_path, model_name):
    """One GRPO step on one batch: the mean token log-prob of each completion moves with its advantage,
    ``sum_i A_i (logp_after_i - logp_before_i) > 0`` (a flipped sign or a dropped advantage fails), for Qwen2-VL
    and for a second architecture, LLaVA (CLIP tower + projector + Llama), through the same trainer."""
    trainer = VLMTrainer(
        _config(tmp_path, f"model.name_or_path={model_name}", "train.num_steps=1", "train.lr=0.002")
    )
    # the reward sees every image's size as the model saw it, whatever the processor (model-agnostic path)
    _, metadata = trainer._encode_record(trainer.stream.curriculum.stages[0].records[0])
    seen = (28, 28) if "llava" in model_name else (56, 56)
    assert metadata["original_sizes"] == [(56, 56)] and metadata["processed_sizes"] == [seen]
    for step in range(10):  # the first batch whose rewards differ within a group
        scored = trainer.dynamic_sample(step)
        if float(scored.advantages.abs().sum()) > 0:
            break
    assert float(scored.advantages.abs().sum()) > 0
    before = trainer._no_grad_log_probs(trainer.model, scored.rollout)
    trainer.optimize(step, scored, None, None)
    after = trainer._no_grad_log_probs(trainer.model, scored.rollout)
    mask = scored.rollout.completion_mask.to(before.device).float()
    change = ((after - before) * mask).sum(dim=1) / mask.sum(dim=1)
    advantages = scored.advantages.to(change.device).float()
    assert float((advantages * change).sum()) > 0
    # completions with positive advantage gain log-prob on average, negative ones lose it
    assert float(change[advantages > 0].mean()) > 0 > float(change[advantages < 0].mean())


def test_llava_learns_the_colour_task(tmp_path):
    """A second transformers architecture (not Qwen) trains end to end: the tiny LLaVA goes from ~0.03 to
    above 0.3 mean reward in 60 steps (naming any colour blindly scores 0.25), loaded through the Auto
    classes, with its processed image size (28 x 28) from the model-agnostic path."""
    summary = train(_config(tmp_path, "model.name_or_path=builtin:tiny-llava"))
    assert summary["first_quarter_reward"] < 0.15
    assert summary["last_quarter_reward"] > 0.3
    model, processor = load_policy(str(tmp_path / "final"))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
