"""Start-up checks of a ``task: reward_model`` config before torch is imported (called by ``gen_rl/train.py``).

The files named by the config must exist; every record and image is checked when the trainer reads them,
before any model loads (``gen_rl/reward_model/data.py``).
"""

from __future__ import annotations

from typing import Any

from gen_rl.core.config import ConfigError, resolve_path
from gen_rl.data import DataError


def check_reward_model_inputs(config: Any) -> None:
    """The data files and image root exist; the output folder is a folder (or can be made)."""
    from gen_rl.inputs import check_output_dir

    data = config.data
    for key, value in (("data.train_file", data.train_file), ("data.eval_file", data.eval_file)):
        if value and not resolve_path(value).is_file():
            raise DataError(
                f"{key} {resolve_path(value)} does not exist; fix the path (relative paths start at the "
                "working directory)"
            )
    if data.image_root and not resolve_path(data.image_root).is_dir():
        raise DataError(f"data.image_root {resolve_path(data.image_root)} is not a folder; fix the path")
    name = config.model.name_or_path
    if (
        not name.startswith("builtin:")
        and name.startswith((".", "/", "~"))
        and not resolve_path(name).exists()
    ):
        raise ConfigError(f"model.name_or_path {resolve_path(name)} does not exist; fix the path")
    check_output_dir(config.log.output_dir)
