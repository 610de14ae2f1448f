"""Torch-free input checks of ``task: unified`` (stage 1, before torch is imported): prompt files, model weights."""

from __future__ import annotations

import json
from typing import Any

from gen_rl.core.config import ConfigError, resolve_path
from gen_rl.unified.config import UnifiedConfig


def read_prompt_records(prompts: list[str], prompt_file: str, key: str) -> list[dict[str, Any]]:
    """Records ``{"prompt": ..., **metadata}``: the inline prompts, then the JSONL file's lines."""
    records = [{"prompt": prompt} for prompt in prompts]
    if prompt_file:
        path = resolve_path(prompt_file)
        if not path.is_file():
            raise ConfigError(f'{key}: {path} does not exist; give a JSONL file of {{"prompt": ...}} records')
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{key}: {path} line {number} is not JSON ({error.msg})") from error
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f'{key}: {path} line {number} needs a "prompt" string')
            records.append(record)
    return records


def check_unified_inputs(config: UnifiedConfig) -> None:
    """Stage 1 (torch-free): prompt files parse, the model folder or cached hub id exists, gold names resolve
    later in :class:`UnifiedTrainer` before the model loads."""
    read_prompt_records(config.data.prompts, config.data.prompt_file, "data.prompt_file")
    read_prompt_records(config.eval.prompts, config.eval.prompt_file, "eval.prompt_file")
    if not config.model.name_or_path.startswith("builtin:"):
        from gen_rl.core.hub import check_weights

        check_weights(config.model.name_or_path, "model.name_or_path", "config.json")
