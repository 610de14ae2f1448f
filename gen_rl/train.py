"""Entry point: ``accelerate launch gen_rl/train.py --config configs/<family>/<run>.yaml [key=value ...]``.

The YAML's ``task`` picks the trainer (``generation``, the default, or ``vlm``); dotted overrides such as
``train.lr=1e-5`` replace values of the file. ``--resume`` continues from the run folder's latest checkpoint.
``--describe`` prints every config key with its default and meaning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gen_rl.config import ConfigError, describe, load_config, merge, parse_overrides, read_yaml  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments: --config, --resume, --describe and dotted overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--describe", action="store_true", help="print every config key and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    return parser.parse_args(argv)


def task_of(path: str | None, overrides: list[str]) -> str:
    """The ``task`` of a config file plus overrides (``generation`` when absent)."""
    data = merge(read_yaml(path) if path else {}, parse_overrides(overrides))
    task = data.get("task", "generation")
    if task not in ("generation", "vlm"):
        raise ConfigError(f"task must be 'generation' or 'vlm', got {task!r}")
    return task


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Load the config, build the trainer its ``task`` names, train; returns the run summary."""
    args = parse_args(argv)
    task = task_of(args.config, args.overrides)
    if task == "vlm":
        from gen_rl.vlm.config import VLMConfig
        from gen_rl.vlm.trainer import train

        config_class, run = VLMConfig, lambda config: train(config, resume=args.resume)
    else:
        from gen_rl.trainer import GenerationTrainer
        from gen_rl.trainer_config import GenerationConfig

        config_class = GenerationConfig
        run = lambda config: GenerationTrainer(config, resume=args.resume).train()  # noqa: E731
    if args.describe:
        print("\n".join(describe(config_class)))
        return {}
    if not args.config:
        raise ConfigError("--config is required (a YAML under configs/); --describe lists every key")
    return run(load_config(config_class, args.config, args.overrides))


if __name__ == "__main__":
    try:
        summary = main()
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    if summary:
        print({key: value for key, value in summary.items()})
