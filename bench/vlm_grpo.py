"""VLM GRPO: rollout tokens/s and one training step's time, gen-rl's trainer vs TRL's ``GRPOTrainer``, one run.

    python bench/vlm_grpo.py [--steps 8] [--rounds 2] [--prompts 8] [--group 8] [--max-new-tokens 16] [--threads 1]

Both sides train the same tiny Qwen2-VL (built in code, saved, loaded back) on the same synthetic colour data
(JSONL + PNG) with the same settings: GRPO loss (per-sequence token mean), group-std advantages, no KL,
temperature 1 (no top-k / top-p), one optimizer step per rollout batch, AdamW at the same learning rate, full
fine-tuning, float32 on CPU (or the GPU when there is one), the same suppressed vision tokens (TRL's
``generation_kwargs``). ``generate`` is wrapped identically on both models to count completion tokens (up to and
including EOS) and time the calls; a step is timed from its start to the end of its optimizer step (TRL:
``on_step_begin`` -> ``on_step_end`` callbacks; gen-rl: ``time/step_s`` of ``metrics.jsonl``). The first step of each
training run is warm-up and left out. Rounds alternate the order (gen-rl then TRL, TRL then gen-rl); the medians
of the pooled step times and the pooled tokens/s are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gen_rl.core.config import from_dict
from gen_rl.vlm.config import VLMConfig
from gen_rl.vlm.data import load_images, read_records
from gen_rl.vlm.policy import load_policy
from gen_rl.vlm.rollout import completion_mask, vision_token_ids
from gen_rl.vlm.synthetic import write_colour_dataset
from gen_rl.vlm.tiny import tiny_qwen2_vl
from gen_rl.vlm.trainer import VLMTrainer


class GenerateTimer:
    """Wraps ``model.generate``: seconds per call and completion tokens (up to the first EOS) per call."""

    def __init__(self, model, eos_token_ids: list[int]) -> None:
        self.model = model
        self.eos_token_ids = eos_token_ids
        self.calls: list[tuple[float, int]] = []
        self._generate = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = self._generate(*args, **kwargs)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        sequences = output.sequences if hasattr(output, "sequences") else output
        prompt_length = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        mask, _ = completion_mask(sequences[:, prompt_length:], self.eos_token_ids)
        self.calls.append((seconds, int(mask.sum())))
        return output


def _summarise(runs: list[dict[str, list]]) -> dict[str, float]:
    """Median step seconds and total tokens / total seconds of ``generate`` over several training runs."""
    steps = [seconds for run in runs for seconds in run["step_s"]]
    calls = [call for run in runs for call in run["generate"]]
    tokens_per_s = sum(tokens for _, tokens in calls) / sum(seconds for seconds, _ in calls)
    return {"step_s": statistics.median(steps), "tokens_per_s": tokens_per_s}


def _gen_rl_config(model_dir: Path, data_jsonl: Path, output_dir: Path, args) -> VLMConfig:
    return from_dict(
        VLMConfig,
        {
            "task": "vlm",
            "seed": 0,
            "model": {"name_or_path": str(model_dir), "dtype": "float32", "freeze_vision_tower": False},
            "data": {
                "image_root": str(data_jsonl.parent),
                "stages": [{"name": "colour", "files": [str(data_jsonl)]}],
            },
            "sample": {
                "groups_per_step": args.prompts,
                "group_size": args.group,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "mask_truncated": False,  # TRL's default (mask_truncated_completions=False)
            },
            "algorithm": {"name": "grpo", "kl_coef": 0.0},
            "train": {
                "num_steps": args.steps,
                "lr": args.lr,
                "adam_betas": [0.9, 0.99],
                "inner_epochs": 1,
                "max_grad_norm": 1.0,
            },
            "reward": {"terms": [{"name": "exact", "weight": 1.0}]},
            "log": {"output_dir": str(output_dir), "log_completions": 0, "progress": False},
        },
    )


def run_gen_rl(model_dir: Path, data_jsonl: Path, output_dir: Path, args) -> dict[str, list]:
    """Train ``args.steps`` steps with gen-rl; returns step seconds and generate calls (warm-up left out)."""
    config = _gen_rl_config(model_dir, data_jsonl, output_dir, args)
    trainer = VLMTrainer(config)
    timer = GenerateTimer(trainer.accelerator.unwrap_model(trainer.model), trainer.settings.eos_token_ids)
    trainer.run()
    step_seconds = [record["time/step_s"] for record in trainer.metrics.read()]
    return {"step_s": step_seconds[1:], "generate": timer.calls[1:]}


def run_trl(model_dir: Path, data_jsonl: Path, output_dir: Path, args) -> dict[str, list]:
    """Train ``args.steps`` steps with TRL's GRPOTrainer on the same model, data and settings."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.verifiable import get_verifiable_reward

    exact = get_verifiable_reward("exact")

    def exact_reward(completions, solution, **kwargs):
        pairs = zip(completions, solution, strict=True)
        return [exact(completion[0]["content"], answer, None) for completion, answer in pairs]

    records = read_records(data_jsonl, data_jsonl.parent)
    dataset = Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.problem}]}
                ],
                "image": load_images(record)[0],
                "solution": record.solution,
            }
            for record in records
        ]
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, *unused, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    model, processor = load_policy(str(model_dir), dtype="float32")
    config = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        epsilon=0.2,
        max_steps=args.steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL defaults to True; gen-rl's config has it off here
        # TRL suppresses only the image token; suppress the same vision tokens as gen-rl so both sample from
        # the same distribution (otherwise TRL's completions run longer and "tokens/s" counts differ)
        generation_kwargs={"suppress_tokens": vision_token_ids(model.config, processor)},
    )
    step_timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_reward,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[step_timer],
    )
    timer = GenerateTimer(trainer.model, list(trainer.eos_token_ids))
    trainer.train()
    return {"step_s": step_timer.seconds[1:], "generate": timer.calls[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="steps per training run (the first is warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="pairs of runs, alternating which side goes first"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model, processor = tiny_qwen2_vl(seed=0)
        model.save_pretrained(root / "model")
        processor.save_pretrained(root / "model")
        data_jsonl = write_colour_dataset(root / "data", num_records=64, seed=0)
        runs: dict[str, list] = {"gen-rl": [], "TRL": []}
        sides = {"gen-rl": run_gen_rl, "TRL": run_trl}
        for round_index in range(args.rounds):
            order = ["gen-rl", "TRL"] if round_index % 2 == 0 else ["TRL", "gen-rl"]
            for name in order:
                runs[name].append(
                    sides[name](root / "model", data_jsonl, root / f"{name}-{round_index}", args)
                )
        ours, theirs = _summarise(runs["gen-rl"]), _summarise(runs["TRL"])

    device = "cuda" if torch.cuda.is_available() else f"cpu ({args.threads} threads)"
    print(
        f"tiny Qwen2-VL, {args.prompts} prompts x G={args.group}, {args.max_new_tokens} new tokens, "
        f"{args.rounds} x {args.steps} steps per side (first of each run left out), {device}"
    )
    print(f"{'':10s} {'rollout tok/s':>14s} {'step s':>9s}")
    print(f"{'gen-rl':10s} {ours['tokens_per_s']:14.0f} {ours['step_s']:9.3f}")
    print(f"{'TRL':10s} {theirs['tokens_per_s']:14.0f} {theirs['step_s']:9.3f}")
    print(
        f"ratio gen-rl / TRL: rollout tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f} (higher is "
        f"better), step time {ours['step_s'] / theirs['step_s']:.2f} (lower is better)"
    )


if __name__ == "__main__":
    main()
