"""The ``gen-rl`` command: train, sample, eval, export, describe.

    gen-rl train configs/demo/tiny_flux_cpu.yaml [--num-processes 2] [key=value ...]
    gen-rl sample --model tiny:flux-pixel --prompt "a red hat" --out outputs/samples
    gen-rl sample --checkpoint outputs/demo/checkpoints/checkpoint-000030 --prompt "a red hat"
    gen-rl eval outputs/demo --out outputs/demo_compare
    gen-rl export outputs/demo --format merged --out outputs/demo_merged
    gen-rl describe [--task generation|vlm|reward_model]

``gen-rl train`` is ``accelerate launch gen_rl/train.py --config ...``: with ``--num-processes N > 1`` it launches N
processes through accelerate (on CPU too: gloo), with one it runs in this process. Every subcommand checks its
input first and ends with one line naming the problem and the fix (exit status 2) when something is wrong.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from gen_rl.core.config import ConfigError

ROOT = Path(__file__).resolve().parent
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}; run {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    """The ``gen-rl`` argument parser with its five subcommands."""
    parser = _Parser(prog="gen-rl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train from a YAML config (generation, vlm or reward_model)")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    train.add_argument(
        "--num-processes", type=int, default=1, help="processes to launch (GPUs, or CPU workers)"
    )
    train.add_argument(
        "--accelerate-config",
        help="an accelerate config file (examples/accelerate/: ddp, fsdp_<family>, deepspeed)",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="move an existing run in log.output_dir aside"
    )
    train.add_argument("--check", action="store_true", help="check config, data and weights, then exit")
    train.add_argument("--debug", action="store_true", help="show tracebacks of input errors")

    sample = commands.add_parser("sample", help="sample images or videos from a base model or a checkpoint")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local folder, hub id or tiny:<name> (base model)")
    source.add_argument("--checkpoint", help="a run folder or checkpoint folder: its model plus its LoRA")
    sample.add_argument("--family", help="model family (needed with --model unless it is tiny:<name>)")
    sample.add_argument("--lora", help="a LoRA folder in diffusers format to load on top of --model")
    sample.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    sample.add_argument("--prompts", help="a prompt file (.txt, one per line, or .jsonl)")
    sample.add_argument("--samples-per-prompt", type=int, default=1)
    sample.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's, or 20)")
    sample.add_argument("--height", type=int, default=None)
    sample.add_argument("--width", type=int, default=None)
    sample.add_argument("--frames", type=int, default=None, help="video families: frames per sample")
    sample.add_argument("--cfg-scale", type=float, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    sample.add_argument("--out", default="outputs/samples", help="folder for the PNGs / MP4s and the grid")

    evaluate = commands.add_parser("eval", help="compare the base model and checkpoints on held-out prompts")
    evaluate.add_argument(
        "items", nargs="+", metavar="CHECKPOINT | key=value",
        help="run folders (latest checkpoint) or checkpoint folders, then config overrides (eval.max_prompts=8)",
    )  # fmt: skip
    evaluate.add_argument("--out", default=None, help="output folder (default: <last run>/comparison)")
    evaluate.add_argument("--no-base", action="store_true", help="leave the base model out")

    export = commands.add_parser("export", help="export a checkpoint's LoRA, a merged model or a kohya file")
    export.add_argument("checkpoint", help="a run folder (latest checkpoint) or a checkpoint folder")
    export.add_argument("--format", choices=("lora", "merged", "kohya"), default="lora")
    export.add_argument("--out", required=True, help="folder (lora, merged) or .safetensors file (kohya)")

    describe = commands.add_parser("describe", help="every config key with its default, choices and meaning")
    describe.add_argument("--task", default="generation", choices=("generation", "vlm", "reward_model"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = build_parser().parse_known_args(argv)
        stray = [item for item in extra if item.startswith("-") or "=" not in item]
        if stray or (extra and not (hasattr(args, "overrides") or hasattr(args, "items"))):
            raise ConfigError(f"unrecognized arguments: {' '.join(stray or extra)}; run gen-rl --help")
        if extra and hasattr(args, "overrides"):  # key=value overrides after an option (argparse stops there)
            args.overrides = [*args.overrides, *extra]
        if extra and hasattr(args, "items"):
            args.items = [*args.items, *extra]
        return COMMANDS[args.command](args)
    except ConfigError as error:
        if "--debug" in argv:
            raise
        from gen_rl.train import one_line

        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run_train(args: argparse.Namespace) -> int:
    """``gen-rl train``: in this process, or ``accelerate launch`` of ``gen_rl/train.py`` on N processes."""
    from gen_rl import train

    flags = [flag for flag in ("resume", "overwrite", "check", "debug") if getattr(args, flag)]
    train_argv = ["--config", args.config, *[f"--{flag}" for flag in flags], *args.overrides]
    if args.num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1; got {args.num_processes}")
    if args.num_processes == 1 and not args.accelerate_config:
        return train.cli(train_argv)
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise ConfigError(
            f"--accelerate-config {args.accelerate_config} does not exist; see examples/accelerate/"
        )
    command = launch_command(args.num_processes, train_argv, args.accelerate_config)
    print(f"[gen-rl] launching {args.num_processes} processes: {' '.join(command)}", flush=True)
    return subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    ).returncode


def launch_command(
    num_processes: int, train_argv: list[str], accelerate_config: str | None = None
) -> list[str]:
    """``accelerate launch`` of ``gen_rl/train.py`` on ``num_processes`` processes of this machine.

    Without a config file, ``--multi_gpu`` is accelerate's multi-process mode; on a machine without GPUs the
    trainers build their ``Accelerator(cpu=True)`` and the processes talk over gloo (``--cpu`` would silently run
    one process). With ``accelerate_config`` its distributed type (DDP, FSDP, DeepSpeed) applies."""
    mode = (
        ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu", "--num_machines", "1"]
    )
    return [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(ROOT / "train.py"), *train_argv,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_sample(args: argparse.Namespace) -> int:
    """``gen-rl sample``: one PNG (or MP4) per sample plus a labelled grid in ``--out``."""
    from gen_rl.sampling import sample_to_folder

    paths = sample_to_folder(args)
    print(f"[gen-rl] wrote {len(paths) - 1} samples and the grid {paths[-1]}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``gen-rl eval``: the evaluation harness (``gen_rl/evaluation.py``)."""
    from gen_rl.evaluation import evaluate_models, targets_of

    overrides = [item for item in args.items if "=" in item]
    checkpoints = [item for item in args.items if "=" not in item]
    config, targets = targets_of(checkpoints, include_base=not args.no_base, overrides=overrides)
    first = targets[-1].lora.parent  # a checkpoint folder
    out = Path(args.out) if args.out else first.parent.parent / "comparison"
    report = evaluate_models(config, targets, out)
    print((report.files["markdown"]).read_text(), end="")
    print(f"[gen-rl] wrote {', '.join(str(path) for path in report.files.values())}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``gen-rl export``: ``gen_rl/export.py``'s exports of a checkpoint."""
    from gen_rl.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"[gen-rl] wrote {args.format} export to {path}")
    return 0


def run_describe(args: argparse.Namespace) -> int:
    """``gen-rl describe``: the config reference of a task (``gen_rl/train.py --describe``)."""
    from gen_rl.core.config import describe
    from gen_rl.train import config_class_of

    print("\n".join(describe(config_class_of(args.task))))
    return 0


COMMANDS = {
    "train": run_train,
    "sample": run_sample,
    "eval": run_eval,
    "export": run_export,
    "describe": run_describe,
}


if __name__ == "__main__":
    sys.exit(main())
