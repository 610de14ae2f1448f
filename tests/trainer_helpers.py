"""Shared pieces of the trainer tests: a small, fast config on the tiny pixel-decoder FLUX, and test rewards."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from gen_rl.core.config import load_config
from gen_rl.trainer_config import GenerationConfig
from rewards import Reward, RewardOutput

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny_flux_cpu.yaml"
TIMING_KEYS = {
    "time/sample_s",
    "time/reward_s",
    "time/advantage_s",
    "time/update_s",
    "time/step_s",
    "perf/samples_per_s",
}
TIMING_KEYS |= {"perf/peak_memory_mb"}
# The ratio check runs at the start of every run and resume: its floor is logged on the first step of each.
TIMING_KEYS |= {"ratio_check/floor", "ratio_check/tolerance"}

# overrides of the learning tests: 4 groups of 8 per step, one update of 16 per process, eval over 6 prompts x 2
LEARNING = (
    "sample.group_size=8",
    "sample.groups_per_step=4",
    "sample.groups_per_rollout=4",
    "train.samples_per_update=16",
    "train.microbatch_size=16",
    "eval.max_prompts=6",
    "eval.samples_per_prompt=2",
    "checkpoint.every_steps=0",
    "eval.every_steps=0",
    "log.monitors=false",
)


def small_config(output_dir: Path, *overrides: str, base_config: Path = DEMO) -> GenerationConfig:
    """The demo config (or ``base_config``) shrunk to a few seconds per run: 2 groups of 4, 4 steps, 16 px."""
    base = [
        f"log.output_dir={output_dir}",
        "log.tracker=none",
        "log.progress=false",
        "sample.num_steps=4",
        "sample.group_size=4",
        "sample.groups_per_step=2",
        "sample.groups_per_rollout=1",
        "train.samples_per_update=4",
        "train.microbatch_size=2",
        "train.num_steps=2",
        "eval.every_steps=2",
        "eval.max_prompts=2",
        "eval.samples_per_prompt=1",
        "checkpoint.every_steps=2",
        f"data.train_prompts={DEMO.parent / 'prompts' / 'colour_train.txt'}",
        f"data.eval_prompts={DEMO.parent / 'prompts' / 'colour_eval.txt'}",
    ]
    return load_config(GenerationConfig, base_config, [*base, *overrides])


def without_timing(record: dict) -> dict:
    """A metrics record minus the wall-clock fields (which differ between runs)."""
    return {key: value for key, value in record.items() if key not in TIMING_KEYS}


class SometimesNaN(Reward):
    """Mean brightness, but NaN for member 0 of every prompt containing ``bad_word`` (tests the NaN policy)."""

    def __init__(self, bad_word: str = "red") -> None:
        self.bad_word = bad_word

    def score(self, pixels, prompts, metadata):
        scores = pixels.float().mean(dim=(1, 2, 3)).cpu()
        seen: set[str] = set()
        for index, prompt in enumerate(prompts):
            if self.bad_word in prompt.split() and prompt not in seen:
                scores[index] = float("nan")
            seen.add(prompt)
        return RewardOutput(scores=scores)


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    """The trained parameters by name, copied to CPU."""
    return {
        name: p.detach().cpu().clone()
        for name, p in trainer.sampler.transformer.named_parameters()
        if p.requires_grad
    }


def free_port() -> int:
    """A TCP port free right now on loopback, for a multi-process test's rendezvous (never a fixed number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def finish_processes() -> None:
    """End a multi-process test worker once its results are written: wait for the other processes, destroy the
    process group, then leave without the interpreter's teardown.

    At teardown a native thread can abort the process (SIGABRT, "terminate called without an active
    exception"): seen in 2 of 60 two-process eval runs, always after every result was written, and still with
    the group destroyed. ``os._exit`` skips that teardown; the test then checks the written results as before.
    """
    import os
    import sys

    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
