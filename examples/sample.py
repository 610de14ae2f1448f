"""Sample groups of images along the Flow-GRPO SDE, save them as a grid and print per-step log-probs.

    python examples/sample.py --out outputs/sample                      # tiny FLUX built in code, no download
    python examples/sample.py --family flux --model black-forest-labs/FLUX.1-dev --dtype bfloat16 \
        --height 512 --width 512 --steps 16 --out outputs/flux
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from gen_rl.core.dtypes import DTYPES
from gen_rl.core.images import save_image_grid
from pipelines import SAMPLERS, RolloutOptions, build_sampler
from pipelines.tiny import tiny_flux_pipeline


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="flux", choices=sorted(SAMPLERS))
    parser.add_argument(
        "--model", default="tiny", help="local folder or hub id; 'tiny' builds a tiny FLUX in code"
    )
    parser.add_argument("--prompts", nargs="+", default=["a red circle", "a blue square"])
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--sde", default="flow_grpo", help="flow_grpo | dance_grpo | cps")
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/sample")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.model == "tiny":
        sampler = build_sampler("flux", tiny_flux_pipeline().to(dtype=dtype))
    else:
        sampler = build_sampler(args.family, args.model, dtype=dtype)
    sampler.pipeline.to(args.device)
    options = RolloutOptions(
        num_steps=args.steps,
        height=args.height,
        width=args.width,
        sde_type=args.sde,
        noise_level=args.noise_level,
        seed=args.seed,
        max_sequence_length=64 if args.model == "tiny" else None,
    )
    rollout = sampler.rollout(args.prompts, options, group_size=args.group_size)
    grid_path = save_image_grid(rollout.pixels, f"{args.out}/samples.png", columns=args.group_size)
    print(f"wrote {len(rollout)} samples to {grid_path} (rows: prompts, columns: group members)")
    print("per-step log-prob (mean over latent elements), first sample of each prompt:")
    for index, prompt in enumerate(args.prompts):
        values = " ".join(f"{value:+.3f}" for value in rollout.log_probs[index * args.group_size].tolist())
        print(f"  {prompt!r}: {values}")
    worst = sampler.check_log_probs(rollout)
    print(f"ratio-1 check passed: recomputed log-probs match the stored ones to {worst:.2e}")
    return {"grid": grid_path, "rollout": rollout, "max_log_prob_error": worst}


if __name__ == "__main__":
    main()
