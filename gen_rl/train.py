"""Entry point: ``accelerate launch gen_rl/train.py --config configs/<family>/<run>.yaml [key=value ...]``.

The YAML's ``task`` picks the trainer (``generation``, the default, ``vlm``, ``reward_model`` or ``unified``); dotted
overrides such as ``train.lr=1e-5`` replace values of the file. ``--resume`` continues from the run folder's
latest checkpoint. ``--describe`` prints every config key with its default and meaning. Relative paths in the
YAML resolve against the working directory.

A bad input (config, data file, weights, environment) ends the run before any model loads with one line on
stderr naming the problem and the fix, and exit status 2; ``--debug`` shows the traceback instead. The config
is read and checked before torch is imported (see ``gen_rl/inputs.py`` for the checks and their order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gen_rl.checkpoint import RunError  # noqa: E402
from gen_rl.core.config import ConfigError, describe, load_config, merge, parse_overrides, read_yaml  # noqa: E402

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line raises a ConfigError (one line) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}; run with --help to see the options")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments: --config, --resume, --describe, --debug and dotted overrides."""
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in a log.output_dir that holds a run: move that run aside (nothing is deleted)",
    )
    parser.add_argument("--describe", action="store_true", help="print every config key and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, data files, weights and names, then exit (no model loads)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    return parser.parse_args(argv)


def task_of(path: str | None, overrides: list[str]) -> str:
    """The ``task`` of a config file plus overrides (``generation`` when absent)."""
    data = merge(read_yaml(path) if path else {}, parse_overrides(overrides))
    task = data.get("task", "generation")
    if task not in ("generation", "vlm", "reward_model", "unified"):
        raise ConfigError(f"task must be 'generation', 'vlm', 'reward_model' or 'unified', got {task!r}")
    return task


def config_class_of(task: str) -> type:
    """The config dataclass of ``task`` (imports no torch)."""
    if task == "vlm":
        from gen_rl.vlm.config import VLMConfig

        return VLMConfig
    if task == "reward_model":
        from gen_rl.reward_model.config import RewardModelConfig

        return RewardModelConfig
    if task == "unified":
        from gen_rl.unified.config import UnifiedConfig

        return UnifiedConfig
    from gen_rl.trainer_config import GenerationConfig

    return GenerationConfig


def load_checked_config(args: argparse.Namespace) -> Any:
    """The validated config with every input checked that can be checked before torch is imported."""
    from gen_rl import inputs
    from gen_rl.run_folder import check_start

    task = task_of(args.config, args.overrides)
    if not args.config:
        raise ConfigError("--config is required (a YAML under configs/); --describe lists every key")
    config = load_config(config_class_of(task), args.config, args.overrides)
    if task == "vlm":
        inputs.check_vlm_inputs(config)
    elif task == "reward_model":
        from gen_rl.reward_model.inputs import check_reward_model_inputs

        check_reward_model_inputs(config)
    elif task == "unified":
        from gen_rl.unified.inputs import check_unified_inputs

        check_unified_inputs(config)
    else:
        inputs.check_generation_inputs(config)
    check_start(config, resume=args.resume, overwrite=args.overwrite)  # used folder, config change on resume
    return config


def run(config: Any, resume: bool, overwrite: bool = False) -> dict[str, Any]:
    """Import the trainer (torch and the model libraries load here), check names, build and train."""
    from gen_rl.inputs import check_registered_names

    if config.task == "reward_model":
        from gen_rl.reward_model.trainer import train as train_reward_model

        return train_reward_model(config, resume=resume, overwrite=overwrite)
    if config.task == "unified":
        from gen_rl.unified.trainer import train as train_unified

        return train_unified(config, resume=resume, overwrite=overwrite)
    check_registered_names(config)
    if config.task == "vlm":
        from gen_rl.vlm.trainer import train

        return train(config, resume=resume, overwrite=overwrite)
    from gen_rl.trainer import GenerationTrainer

    return GenerationTrainer(config, resume=resume, overwrite=overwrite).train()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Load and check the config, build the trainer its ``task`` names, train; returns the run summary."""
    args = parse_args(argv)
    if args.describe:
        print("\n".join(describe(config_class_of(task_of(args.config, args.overrides)))))
        return {}
    config = load_checked_config(args)
    if args.check:
        from gen_rl.inputs import check_registered_names

        if config.task == "unified":
            from gen_rl.unified.trainer import check_gold_names

            check_gold_names(config)
        elif config.task != "reward_model":  # its records and images are checked when the trainer reads them
            check_registered_names(config)
        print(f"{args.config}: config, data files and weights checked, no problem found")
        return {}
    return run(config, resume=args.resume, overwrite=args.overwrite)


def one_line(error: BaseException) -> str:
    """An error's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split())


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: an input error prints ``error: <message>`` on stderr and returns 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except ConfigError as error:
        if "--debug" in argv:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunError as error:  # a used run folder, a forbidden config change on resume, a full disk
        if "--debug" in argv:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0  # the trainer printed its closing summary in words


if __name__ == "__main__":
    sys.exit(cli())
