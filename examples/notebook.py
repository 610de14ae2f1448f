"""Notebook-style tour (each ``# %%`` block is a cell): sample with an SDE pipeline, look at its per-step
log-probabilities, train a few steps, load the trained LoRA and compare.

    python examples/notebook.py --out outputs/notebook      # tiny FLUX built in code, CPU, ~30 s
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from pipelines.notebook import SDEPipeline


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/notebook")
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args(argv)

    # %% 1. A pipeline object like diffusers': from_pretrained (a local folder, a hub id, or a tiny model)
    pipe = SDEPipeline.from_pretrained("tiny:flux-pixel")
    out = pipe(
        ["a red hat", "a blue hat"], num_inference_steps=4, height=16, width=16, num_images_per_prompt=2
    )
    print(f"{len(out.images)} images of size {out.images[0].size}")

    # %% 2. The SDE: per-step log-probabilities, recomputed exactly (the ratio is 1 before any update)
    sde = pipe(
        "a red hat", num_inference_steps=4, height=16, width=16, noise_level=0.7, return_trajectory=True
    )
    print("log-probs per step:", " ".join(f"{value:+.3f}" for value in sde.log_probs[0].tolist()))
    worst = pipe.sampler.check_log_probs(sde.rollout)
    print(f"recomputed log-probs match the stored ones to {worst:.1e}")

    # %% 3. Train a few steps of the CPU demo, then load its LoRA as diffusers would
    from gen_rl.core.config import load_config
    from gen_rl.trainer import GenerationTrainer
    from gen_rl.trainer_config import GenerationConfig

    overrides = [f"log.output_dir={args.out}/run", f"train.num_steps={args.train_steps}", "log.tracker=none",
                 "log.progress=false", "sample.num_steps=4", "sample.height=16", "sample.width=16",
                 f"checkpoint.every_steps={args.train_steps}", "eval.every_steps=0"]  # fmt: skip
    config = load_config(GenerationConfig, "configs/demo/tiny_flux_cpu.yaml", overrides)
    GenerationTrainer(config, overwrite=True).train()
    lora = f"{args.out}/run/checkpoints/checkpoint-{args.train_steps:06d}/lora"
    before = pipe("a red hat", num_inference_steps=4, height=16, width=16).images[0]
    pipe.load_lora_weights(lora)
    after = pipe("a red hat", num_inference_steps=4, height=16, width=16).images[0]
    change = (torch.tensor(list(after.getdata())) - torch.tensor(list(before.getdata()))).abs().float().mean()
    print(f"loaded {lora}: mean pixel change {float(change):.2f} / 255")
    return {"pipe": pipe, "images": out.images, "sde": sde, "max_log_prob_error": worst, "before": before,
            "after": after}  # fmt: skip


if __name__ == "__main__":
    main()
